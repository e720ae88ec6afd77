"""The repository's layout: subpackages by job without import cycles, and only files that exist cited."""

import ast
import os
import re

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(REPO, "l2vit_jax")
# A repository path as code and docs cite it: docs/…, configs/…, scripts/…, tests/…, l2vit_jax/….
CITED_PATH = re.compile(r"(?<![\w/.])((?:docs|configs|scripts|tests|l2vit_jax)/[A-Za-z0-9_/.-]*[A-Za-z0-9_])")


def _modules() -> dict[str, str]:
  """Dotted module name → file, for every module of the package."""
  found = {}
  for root, _, files in os.walk(PACKAGE):
    for name in files:
      if name.endswith(".py"):
        relative = os.path.relpath(os.path.join(root, name), REPO)[:-3].split(os.sep)
        if relative[-1] == "__init__":
          relative = relative[:-1]
        found[".".join(relative)] = os.path.join(root, name)
  return found


def import_graph() -> dict[str, set[str]]:
  """Module → the package's modules it imports anywhere in its body (lazy imports included)."""
  modules = _modules()
  graph = {}
  for module, path in modules.items():
    targets = set()
    for node in ast.walk(ast.parse(open(path).read())):
      if isinstance(node, ast.Import):
        targets.update(alias.name for alias in node.names)
      elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
        submodules = {f"{node.module}.{alias.name}" for alias in node.names} & set(modules)
        targets.update(submodules or {node.module})  # `from pkg import module` needs only the module
    graph[module] = {
      t for t in targets if t in modules and t != module and not module.startswith(t + ".")
    }  # a package's own __init__ is no cycle
  return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
  """One import cycle as [a, b, ..., a], or None."""
  state = {}

  def visit(node, trail):
    state[node] = "open"
    for target in sorted(graph[node]):
      if state.get(target) == "open":
        return trail[trail.index(target) :] + [target]
      if target not in state:
        cycle = visit(target, trail + [target])
        if cycle:
          return cycle
    state[node] = "done"
    return None

  for node in sorted(graph):
    if node not in state:
      cycle = visit(node, [node])
      if cycle:
        return cycle
  return None


def test_the_cycle_finder_finds_a_planted_cycle():
  assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
  assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_package_has_no_import_cycle():
  assert find_cycle(import_graph()) is None


def test_models_and_data_import_nothing_above_them():
  allowed = (
    "l2vit_jax.models",
    "l2vit_jax.data",
    "l2vit_jax.errors",
    "l2vit_jax.runtime.paths",
    "l2vit_jax.runtime.console",
  )
  for module, targets in import_graph().items():
    if module.startswith(("l2vit_jax.models", "l2vit_jax.data")):
      assert all(t.startswith(allowed) for t in targets), (module, targets)


def _python_files(*folders: str):
  """(repository path, text) of every Python file under ``folders`` of the repository."""
  for folder in folders:
    for root, _, files in os.walk(os.path.join(REPO, folder)):
      for name in sorted(files):
        if name.endswith(".py"):
          path = os.path.join(root, name)
          yield os.path.relpath(path, REPO), open(path, encoding="utf-8").read()


def test_files_are_renamed_into_place_only_by_runtime_paths():
  """One atomic replacement (``paths.replacing``): one temporary name, removed on failure, swept after
  a kill and recognised by scripts/chaos_run.py. Another rename would bring its own."""
  renaming = [
    path
    for path, text in _python_files("l2vit_jax", "scripts")
    if "os.replace(" in text and path != os.path.join("l2vit_jax", "runtime", "paths.py")
  ]
  assert renaming == []


def test_progress_bars_are_drawn_only_by_runtime_console():
  """One progress bar (``console.ProgressBar``) for every long pass: on a terminal of process 0 only,
  cleared when the pass fails, one line with the rate at the end."""
  drawing = [
    path
    for path, text in _python_files("l2vit_jax", "scripts")
    if re.search(r"^\s*(import tqdm|from tqdm\b)", text, re.MULTILINE)
    and path != os.path.join("l2vit_jax", "runtime", "console.py")
  ]
  assert drawing == []


# The detector's geometry: data/detector.py defines each of these once, and everything else reads it there.
GEOMETRY_NAMES = {
  "REAL_IMAGE_SIZE",
  "CRYSTAL_SIZE",
  "WINDOW_HALF_WIDTH",
  "WINDOW_WIDTH",
  "CRYSTALS_PER_TOWER",
  "HCAL_TOWER_SIZE",
  "NUM_HCAL_TOWERS",
  "JET_RADIUS",
  "MAX_PIXEL_VALUE",
  "MAGNETIC_FIELD_T",
  "BEND_PER_METRE",
  "ECAL_RADIUS",
  "HCAL_RADIUS",
  "PIXEL_LAYER_RADII",
}
GEOMETRY_FUNCTIONS = {"pixel_size", "_pixel_size", "wrap_phi", "_wrap_phi"}


def test_detector_geometry_is_defined_only_in_detector():
  defined = []
  for path, text in _python_files("l2vit_jax", "scripts"):
    if path == os.path.join("l2vit_jax", "data", "detector.py"):
      continue
    for node in ast.parse(text).body:
      targets = (
        node.targets
        if isinstance(node, ast.Assign)
        else [node.target]
        if isinstance(node, ast.AnnAssign)
        else []
      )
      names = {t.id for target in targets for t in ast.walk(target) if isinstance(t, ast.Name)}
      if isinstance(node, ast.FunctionDef):
        names = {node.name} & GEOMETRY_FUNCTIONS
      defined += [f"{path}: {name}" for name in sorted(names & (GEOMETRY_NAMES | GEOMETRY_FUNCTIONS))]
  assert defined == []


def test_at_most_eight_modules_sit_directly_in_the_package():
  top = [name for name in os.listdir(PACKAGE) if name.endswith(".py")]
  assert len(top) <= 8, sorted(top)


def _repository_texts():
  for root, dirs, files in os.walk(REPO):
    dirs[:] = [
      d
      for d in dirs
      if not d.startswith(".") and d not in ("runs", "data", "__pycache__") and not d.endswith(".egg-info")
    ]
    for name in files:
      if name.endswith((".py", ".md", ".toml", ".txt")) or name == "run":
        path = os.path.join(root, name)
        yield os.path.relpath(path, REPO), open(path, encoding="utf-8").read()


def test_every_repository_file_that_code_and_docs_cite_exists():
  missing = []
  for source, text in _repository_texts():
    if source.startswith("tests" + os.sep):  # tests name files they create, or that must not exist
      continue
    for cited in CITED_PATH.findall(text):
      if "*" in cited or "{" in cited or cited.endswith(("/", "_")):
        continue
      if not os.path.exists(os.path.join(REPO, cited)) and not os.path.exists(
        os.path.join(REPO, cited.rsplit(":", 1)[0])
      ):
        missing.append(f"{source}: {cited}")
  assert not missing, "\n".join(missing)


def test_nothing_cites_a_design_file_outside_the_repository():
  outside = "DESIGN" + ".md"  # spelled apart so that this file does not cite it either
  assert [source for source, text in _repository_texts() if outside in text] == []
