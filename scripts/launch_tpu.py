#!/usr/bin/env python3
"""Runs one l2vit_jax command on a Cloud TPU VM slice, from any machine with gcloud and this checkout.

  python scripts/launch_tpu.py all --name=l2vit --zone=us-west4-a --accelerator-type=v5litepod-8 \\
      --data=gs://BUCKET/data --config=configs/simclr.py --workdir=gs://BUCKET/runs/simclr \\
      --config.data.unlabelled_path=data/Dataset_Specific_Unlabelled.sparse

Stages, each its own subcommand; ``all`` runs the first three, then ``delete`` even if one failed:
  create  gcloud compute tpus tpu-vm create (--spot or --preemptible for the cheaper kinds)
  setup   ships ``git archive`` of --ref (default HEAD) to every worker; makes a Python >= 3.11 venv with
          uv (TPU images ship an older python3) and runs ``pip install -e ".[tpu]"``; syncs --data=gs://...
          into ``~/l2vit_jax/data/`` on every worker, since the project reads data only from local disk
  run     the same ``python -m l2vit_jax.main --config=... --workdir=gs://...`` on every worker
          (--worker=all), as multi-host slices need. Rerunning ``run`` resumes from the workdir's latest
          checkpoint.
  delete  gcloud compute tpus tpu-vm delete

``--config.FIELD=value`` arguments are passed on to ``l2vit_jax.main``. ``--dry-run`` prints every command,
one per line and shell-quoted, exactly as it would run them, and runs nothing. A real run echoes each
command (``+ ...`` on stderr) and stops at the first that fails, naming it. ``--keep`` keeps the VM after
``all``; a failed ``create`` deletes nothing, since the name may belong to a VM that was there before.

Why ``git archive`` rather than ``git clone`` on the workers: it ships exactly the commit named, works for
private and unpushed repositories, and puts no credentials on the workers. Uncommitted changes are not
shipped (a warning says so).
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
import tempfile

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REMOTE_DIR = "l2vit_jax"  # on every worker, relative to the login directory
STAGES = ("create", "setup", "run", "delete")
# Google's recommended TPU software versions for JAX (cloud.google.com/tpu/docs/runtimes).
DEFAULT_RUNTIME = {
  "v6e": "v2-alpha-tpuv6e",
  "v5p": "v2-alpha-tpuv5",
  "v5litepod": "v2-alpha-tpuv5-lite",
  "v4": "tpu-ubuntu2204-base",
  "v3": "tpu-ubuntu2204-base",
  "v2": "tpu-ubuntu2204-base",
}
UV_INSTALLER = "https://astral.sh/uv/install.sh"
# What each stage needs, beyond the stage name, as (argparse dest, flag).
REQUIRED = {
  "create": (("name", "--name"), ("zone", "--zone"), ("accelerator_type", "--accelerator-type")),
  "setup": (("name", "--name"), ("zone", "--zone")),
  "run": (("name", "--name"), ("zone", "--zone"), ("config", "--config"), ("workdir", "--workdir")),
  "delete": (("name", "--name"), ("zone", "--zone")),
}
NAME_PATTERN = re.compile(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?")  # Cloud resource names
ZONE_PATTERN = re.compile(r"[a-z]+-[a-z]+[0-9]+-[a-z]")
ACCELERATOR_PATTERN = re.compile(r"(v[0-9][a-z0-9]*)-([0-9]+)")
GCS_PATTERN = re.compile(r"gs://[a-z0-9][-a-z0-9_.]{1,220}[a-z0-9](/\S*)?")
OVERRIDE_PATTERN = re.compile(r"--config\.[A-Za-z_][\w.]*=.*", re.DOTALL)


class UsageError(Exception):
  """A bad command line: reported as one line with exit status 2, before anything runs."""


class StepFailed(Exception):
  """A command that exited non-zero (or could not start); the message names it."""


class _Parser(argparse.ArgumentParser):
  def error(self, message):
    raise UsageError(message)


def _parser() -> argparse.ArgumentParser:
  parser = _Parser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
  )
  parser.add_argument("stage", choices=STAGES + ("all",), help="what to do (see above)")
  parser.add_argument("--name", help="TPU VM name")
  parser.add_argument("--zone", help="zone with TPU quota, e.g. us-west4-a")
  parser.add_argument("--project", help="Google Cloud project (default: gcloud's configured one)")
  parser.add_argument("--accelerator-type", help="Cloud accelerator type, e.g. v5litepod-8, v6e-16, v5p-8")
  parser.add_argument(
    "--runtime-version",
    help="TPU software version (default: Google's JAX choice "
    f"for the generation: {', '.join(f'{k}: {v}' for k, v in DEFAULT_RUNTIME.items())})",
  )
  kind = parser.add_mutually_exclusive_group()
  kind.add_argument("--spot", action="store_true", help="a Spot VM (cheaper; may be preempted any time)")
  kind.add_argument("--preemptible", action="store_true", help="a preemptible VM (at most 24 h)")
  parser.add_argument("--service-account", help="service account of the VM (needs read/write on the bucket)")
  parser.add_argument("--ref", default="HEAD", help="git commit, branch or tag shipped to the workers")
  parser.add_argument("--python", default="3.12", help="Python version of the workers' venv (>= 3.11)")
  parser.add_argument("--data", help="gs:// folder synced to ~/l2vit_jax/data/ on every worker")
  parser.add_argument("--config", help="config file, relative to the repository root, e.g. configs/simclr.py")
  parser.add_argument("--workdir", help="gs:// workdir of the run (checkpoints, metrics, reports)")
  parser.add_argument("--keep", action="store_true", help="'all': keep the VM afterwards")
  parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
  return parser


def parse_args(argv: list[str]) -> argparse.Namespace:
  """Parses and validates; ``--config.FIELD=value`` arguments land in ``args.overrides``.

  Raises:
    UsageError: naming the first bad or missing argument.
  """
  args, unknown = _parser().parse_known_args(argv)
  bad = [arg for arg in unknown if not OVERRIDE_PATTERN.fullmatch(arg)]
  if bad:
    raise UsageError(f"unrecognized argument {bad[0]!r} (config overrides are --config.FIELD=value)")
  args.overrides = unknown
  _validate(args)
  return args


def _validate(args: argparse.Namespace) -> None:
  stages = STAGES if args.stage == "all" else (args.stage,)
  for stage in stages:
    for dest, flag in REQUIRED[stage]:
      if not getattr(args, dest):
        raise UsageError(f"{args.stage} needs {flag}")
  if args.overrides and "run" not in stages:
    raise UsageError(f"{args.overrides[0]}: config overrides only apply to 'run' and 'all'")
  if not NAME_PATTERN.fullmatch(args.name):
    raise UsageError(
      f"--name={args.name}: expected lower-case letters, digits and hyphens, starting with a "
      "letter, at most 63 characters"
    )
  if not ZONE_PATTERN.fullmatch(args.zone):
    raise UsageError(f"--zone={args.zone}: expected a zone such as us-west4-a")
  if args.accelerator_type is not None:
    match = ACCELERATOR_PATTERN.fullmatch(args.accelerator_type)
    if not match:
      raise UsageError(
        f"--accelerator-type={args.accelerator_type}: expected a Cloud accelerator type "
        "such as v5litepod-8, v6e-16, v5p-8 or v4-32"
      )
    if args.runtime_version is None:
      if match.group(1) not in DEFAULT_RUNTIME:
        raise UsageError(
          f"--accelerator-type={args.accelerator_type}: no default TPU software version for "
          f"{match.group(1)}; pass --runtime-version"
        )
      args.runtime_version = DEFAULT_RUNTIME[match.group(1)]
  if not re.fullmatch(r"3\.(1[1-9]|[2-9][0-9])", args.python):
    raise UsageError(f"--python={args.python}: expected a version >= 3.11, e.g. 3.12")
  if args.data is not None and not GCS_PATTERN.fullmatch(args.data):
    raise UsageError(f"--data={args.data}: expected a gs://BUCKET/FOLDER (workers copy it to local disk)")
  if args.workdir is not None and not (
    GCS_PATTERN.fullmatch(args.workdir) and args.workdir.rstrip("/").count("/") >= 3
  ):
    raise UsageError(
      f"--workdir={args.workdir}: expected gs://BUCKET/PATH (every worker must see the same "
      "workdir, and the VM's disk goes with the VM)"
    )
  if args.config is not None:
    _check_config_file(args.config, args.ref)


def _check_config_file(config: str, ref: str) -> None:
  """The config must be in the commit the workers get, at a path relative to the repository root."""
  path = config.split(":", 1)[0]  # ml_collections accepts configs/study.py:quick
  if os.path.isabs(path) or path.startswith(".."):
    raise UsageError(
      f"--config={config}: expected a path relative to the repository root, e.g. configs/simclr.py"
    )
  if not os.path.isfile(os.path.join(REPO_ROOT, path)):
    raise UsageError(f"--config={config}: no such file in {REPO_ROOT}")
  if _git("cat-file", "-e", f"{ref}:{path}").returncode != 0:
    raise UsageError(
      f"--config={config}: not in commit {ref}, which is what the workers get; commit it first or pass --ref"
    )


def _git(*args: str) -> subprocess.CompletedProcess:
  return subprocess.run(["git", "-C", REPO_ROOT, *args], capture_output=True, text=True, check=False)


def _tpu_vm(args: argparse.Namespace, verb: str, positionals: list[str], *flags: str) -> list[str]:
  """``gcloud compute tpus tpu-vm VERB POSITIONALS --zone=... [--project=...] FLAGS``."""
  project = [f"--project={args.project}"] if args.project else []
  return ["gcloud", "compute", "tpus", "tpu-vm", verb, *positionals, f"--zone={args.zone}", *project, *flags]


def _on_every_worker(args: argparse.Namespace, *commands: str) -> list[str]:
  """One ssh to all workers at once, running ``commands`` joined with ``&&``."""
  return _tpu_vm(args, "ssh", [args.name], "--worker=all", f"--command={' && '.join(commands)}")


def archive_path(args: argparse.Namespace) -> str:
  return os.path.join(tempfile.gettempdir(), f"l2vit_jax-{args.name}.tar.gz")


def create_commands(args: argparse.Namespace) -> list[list[str]]:
  kind = ["--spot"] if args.spot else ["--preemptible"] if args.preemptible else []
  account = [f"--service-account={args.service_account}"] if args.service_account else []
  return [
    _tpu_vm(
      args,
      "create",
      [args.name],
      f"--accelerator-type={args.accelerator_type}",
      f"--version={args.runtime_version}",
      *kind,
      *account,
    )
  ]


def setup_commands(args: argparse.Namespace) -> list[list[str]]:
  archive = archive_path(args)
  remote_archive = f"{REMOTE_DIR}.tar.gz"
  uv = "~/.local/bin/uv"
  commands = [
    ["git", "-C", REPO_ROOT, "archive", "--format=tar.gz", f"--output={archive}", args.ref],
    _tpu_vm(args, "scp", [archive, f"{args.name}:{remote_archive}"], "--worker=all"),
    _on_every_worker(
      args, f"mkdir -p {REMOTE_DIR}", f"tar -xzf {remote_archive} -C {REMOTE_DIR}", f"rm {remote_archive}"
    ),
    # A venv made once and kept: rerunning setup only reinstalls the (editable) project.
    _on_every_worker(
      args,
      f"cd {REMOTE_DIR}",
      f"{{ test -x .venv/bin/python || {{ curl -LsSf {UV_INSTALLER} | "
      f"env UV_INSTALL_DIR=$HOME/.local/bin sh && "
      f"{uv} venv --seed --python={args.python} .venv; }}; }}",
      '.venv/bin/pip install -e ".[tpu]"',
    ),
  ]
  if args.data:
    # rsync, not cp: a rerun fetches only what is missing or changed.
    commands.append(
      _on_every_worker(
        args,
        f"mkdir -p {REMOTE_DIR}/data",
        shlex.join(
          ["gcloud", "storage", "rsync", "--recursive", args.data.rstrip("/"), f"{REMOTE_DIR}/data"]
        ),
      )
    )
  return commands


def run_commands(args: argparse.Namespace) -> list[list[str]]:
  # L2VIT_DISTRIBUTED=1: every worker calls jax.distributed.initialize(), which finds its peers itself.
  main = [
    "env",
    "L2VIT_DISTRIBUTED=1",
    ".venv/bin/python",
    "-m",
    "l2vit_jax.main",
    f"--config={args.config}",
    f"--workdir={args.workdir}",
    *args.overrides,
  ]
  return [_on_every_worker(args, f"cd {REMOTE_DIR}", shlex.join(main))]


def delete_commands(args: argparse.Namespace) -> list[list[str]]:
  return [_tpu_vm(args, "delete", [args.name], "--quiet")]


STAGE_COMMANDS = {
  "create": create_commands,
  "setup": setup_commands,
  "run": run_commands,
  "delete": delete_commands,
}


def plan(args: argparse.Namespace) -> tuple[list[tuple[str, list[str]]], list[list[str]]]:
  """(stage, command) pairs in order, and the clean-up commands to run after them, even on failure."""
  stages = STAGES[:-1] if args.stage == "all" else (args.stage,)
  steps = [(stage, command) for stage in stages for command in STAGE_COMMANDS[stage](args)]
  cleanup = delete_commands(args) if args.stage == "all" and not args.keep else []
  return steps, cleanup


def _execute(command: list[str]) -> None:
  print(f"+ {shlex.join(command)}", file=sys.stderr, flush=True)
  try:
    subprocess.run(command, check=True)
  except FileNotFoundError:
    raise StepFailed(f"{command[0]} not found on PATH: {shlex.join(command)}") from None
  except subprocess.CalledProcessError as error:
    raise StepFailed(f"exit status {error.returncode}: {shlex.join(command)}") from None


def _warn_if_uncommitted(ref: str) -> None:
  if ref == "HEAD" and _git("status", "--porcelain", "--untracked-files=no").stdout.strip():
    print(
      "warning: uncommitted changes are not shipped; the workers get the last commit (git archive HEAD)",
      file=sys.stderr,
    )


def execute(args: argparse.Namespace) -> int:
  """Runs the plan; returns 0, or 1 after the first failing command (clean-up still runs)."""
  steps, cleanup = plan(args)
  if any(stage == "setup" for stage, _ in steps):
    _warn_if_uncommitted(args.ref)
  failure, created, stage = None, False, steps[0][0]
  try:
    for stage, command in steps:
      _execute(command)
      created = created or stage == "create"
  except StepFailed as error:
    failure = f"{stage} failed ({error})"
  except KeyboardInterrupt:  # Ctrl-C still deletes the VM: a forgotten TPU VM is billed by the hour
    failure = f"{stage} interrupted"
  finally:
    if cleanup and created:
      try:
        for command in cleanup:
          _execute(command)
      except StepFailed as error:
        failure = (failure + "; " if failure else "") + f"delete failed ({error}); delete the VM by hand"
  if failure:
    print(f"error: {failure}", file=sys.stderr)
    return 1
  return 0


def main(argv: list[str] | None = None) -> int:
  try:
    args = parse_args(sys.argv[1:] if argv is None else argv)
  except UsageError as error:
    print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
    return 2
  if args.dry_run:
    steps, cleanup = plan(args)
    for command in [command for _, command in steps] + cleanup:
      print(shlex.join(command))
    return 0
  return execute(args)


if __name__ == "__main__":
  sys.exit(main())
