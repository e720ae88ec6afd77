"""What a user of JAX research code expects around a run: TensorBoard events that hold what
``metrics.jsonl`` holds, a profiler trace on request, the persistent compilation cache, a start-up
without libtpu's noise on a machine without a TPU, and report figures in TensorBoard.

One real command line trains twice in one workdir (stopped after 4 steps with a profile of steps 2-3,
then resumed to the end), with ``JAX_PLATFORMS`` removed from its environment as a user's shell would
have it; the tests read what those two runs left. Event files are parsed here (TFRecord framing with
its CRCs, tensorboardX's protos), applying TensorBoard's purge rule: a ``SessionLog.START`` at step s
hides the values earlier files logged at steps >= s.
"""

import glob
import importlib.util
import io
import itertools
import json
import logging
import os
import re
import struct
import subprocess
import sys

import numpy as np
import pytest

from conftest import write_jet_file
from l2vit_jax import errors
from l2vit_jax.runtime import compilation, console, process_setup
from l2vit_jax.training import loop, metrics_log
from test_reliability import ENV, _assert_one_line_error, _write_config

LIBTPU_NOISE = (
  "libtpu",
  "host bounds",
  "InitGoogle",
  "backend 'tpu'",
  "TPU_WORKER_HOSTNAMES",
  "common_lib.cc",
)


def _masked_crc(data: bytes) -> int:
  from tensorboardX.crc32c import crc32c  # pylint: disable=import-outside-toplevel

  crc = crc32c(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def read_events(data: bytes) -> list:
  """The ``Event`` protos of one event file's bytes, every record's two CRCs checked."""
  from tensorboardX.proto import event_pb2  # pylint: disable=import-outside-toplevel

  events, position = [], 0
  while position < len(data):
    header = data[position : position + 8]
    (length,) = struct.unpack("<Q", header)
    assert struct.unpack("<I", data[position + 8 : position + 12])[0] == _masked_crc(header)
    body = data[position + 12 : position + 12 + length]
    assert struct.unpack("<I", data[position + 12 + length : position + 16 + length])[0] == _masked_crc(body)
    events.append(event_pb2.Event.FromString(body))
    position += 16 + length
  return events


def event_scalars(files: list[bytes]) -> dict[str, list[tuple[int, float]]]:
  """Tag → [(step, value)] over event files in the order written, as TensorBoard would show them."""
  from tensorboardX.proto import event_pb2  # pylint: disable=import-outside-toplevel

  scalars: dict[str, list[tuple[int, float]]] = {}
  for data in files:
    for event in read_events(data):
      if event.HasField("session_log") and event.session_log.status == event_pb2.SessionLog.START:
        scalars = {tag: [(s, v) for s, v in rows if s < event.step] for tag, rows in scalars.items()}
      for value in event.summary.value:
        if value.HasField("simple_value"):
          scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
  return scalars


def _event_files(directory) -> list[bytes]:
  """The event files' bytes in name order, the order TensorBoard reads them in."""
  return [open(path, "rb").read() for path in sorted(glob.glob(os.path.join(directory, "*tfevents*")))]


def _rows(workdir) -> list[dict]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def _cache_hits(stderr: str) -> int:
  """Cache hits from the run's last ``XLA:`` line (main logs it at the end)."""
  lines = [line for line in stderr.splitlines() if "XLA: " in line and "(so far)" not in line]
  assert lines, stderr[-3000:]
  return int(re.search(r"; (\d+) read from the persistent cache", lines[-1]).group(1))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  root = tmp_path_factory.mktemp("services")
  labelled = write_jet_file(root / "labelled.h5", num=65)  # 46 train jets: 5 steps an epoch, 10 in all
  config = _write_config(root / "config.py", "finetune", labelled, num_epochs=2)
  env = {k: v for k, v in ENV.items() if k not in ("JAX_PLATFORMS", "JAX_COMPILATION_CACHE_DIR")}
  env["L2VIT_COMPILATION_CACHE"] = str(root / "xla")
  workdir = root / "run"

  def cli(*flags):
    result = subprocess.run(
      [sys.executable, "-m", "l2vit_jax.main", f"--config={config}", f"--workdir={workdir}", *flags],
      env=env,
      capture_output=True,
      text=True,
      timeout=400,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result

  first = cli("--config.stop_after_steps=4", "--config.profile_steps=2,3")
  second = cli()  # resumes from step 4 to the end, with the first run's compilations in the cache
  return {"workdir": str(workdir), "first": first, "second": second, "cache": str(root / "xla")}


def test_every_scalar_of_metrics_jsonl_is_in_tensorboard_at_its_step(runs):
  rows = _rows(runs["workdir"])
  assert [row["step"] for row in rows] == list(range(1, 11))
  files = _event_files(os.path.join(runs["workdir"], metrics_log.TENSORBOARD_DIR))
  assert len(files) == 2  # one per run
  scalars = event_scalars(files)
  expected_tags = {
    key for row in rows for key, value in row.items() if key != "step" and isinstance(value, (int, float))
  }
  assert {"train/loss", "val/loss", "learning_rate", "images_per_second"} <= expected_tags
  assert set(scalars) == expected_tags
  for tag in expected_tags:
    logged = [(row["step"], row[tag]) for row in rows if tag in row]
    assert [step for step, _ in scalars[tag]] == [step for step, _ in logged], tag
    assert [value for _, value in scalars[tag]] == [np.float32(value) for _, value in logged], tag


def test_the_resolved_config_is_in_tensorboard_as_text_once_per_run(runs):
  texts = []
  for data in _event_files(os.path.join(runs["workdir"], metrics_log.TENSORBOARD_DIR)):
    texts += [
      value.tensor.string_val[0].decode()
      for event in read_events(data)
      for value in event.summary.value
      if value.tag == "config/text_summary"
    ]
  assert len(texts) == 2
  with open(os.path.join(runs["workdir"], "config.json")) as f:
    saved = json.load(f)
  assert json.loads(texts[-1]) == saved  # a Markdown code block: the JSON indented by four spaces
  assert saved["tensorboard"] is True


def test_profile_steps_leave_a_trace_of_those_steps_in_the_workdir(runs):
  traces = glob.glob(
    os.path.join(runs["workdir"], loop.PROFILE_DIR, "plugins", "profile", "*", "*.xplane.pb")
  )
  assert len(traces) == 1 and os.path.getsize(traces[0]) > 0
  assert "Profile of steps 2-3 in" in runs["first"].stderr
  assert "Profile of steps" not in runs["second"].stderr  # the resumed run is past those steps


def test_the_second_run_of_a_config_reads_its_compilations_from_the_persistent_cache(runs):
  assert os.listdir(runs["cache"])  # the cache folder chosen by $L2VIT_COMPILATION_CACHE filled up
  first, second = _cache_hits(runs["first"].stderr), _cache_hits(runs["second"].stderr)
  assert second > first and second > 0


def test_a_run_without_jax_platforms_prints_no_libtpu_errors(runs):
  for result in (runs["first"], runs["second"]):
    noise = [line for line in result.stderr.splitlines() if any(f in line for f in LIBTPU_NOISE)]
    assert noise == [], noise
    assert "on 1 cpu devices" in result.stderr


def test_without_jax_platforms_a_config_error_is_still_the_only_line(tmp_path):
  labelled = write_jet_file(tmp_path / "labelled.h5", num=20)
  config = _write_config(tmp_path / "config.py", "finetune", labelled)
  env = {k: v for k, v in ENV.items() if k != "JAX_PLATFORMS"}
  result = subprocess.run(
    [
      sys.executable,
      "-m",
      "l2vit_jax.main",
      f"--config={config}",
      f"--workdir={tmp_path / 'run'}",
      "--config.profile_steps=9,2",
    ],
    env=env,
    capture_output=True,
    text=True,
    timeout=120,
  )
  _assert_one_line_error(result, "profile_steps='9,2'", "START,END")  # no libtpu lines before it
  assert not os.path.exists(tmp_path / "run")


def test_a_resumed_writer_hides_the_rows_it_redoes_in_tensorboard_as_in_metrics_jsonl(tmp_path):
  writer = metrics_log.MetricWriter(str(tmp_path))
  for step in range(1, 7):
    writer.write(step, {"train/loss": 1.0 / step, "flag": True, "note": "text"})
  writer.close()
  resumed = metrics_log.MetricWriter(str(tmp_path), resume_step=4)  # killed after its step-4 checkpoint
  resumed.write(5, {"train/loss": 0.5})
  resumed.close()
  rows = _rows(tmp_path)
  scalars = event_scalars(_event_files(tmp_path / metrics_log.TENSORBOARD_DIR))
  assert set(scalars) == {"train/loss"}  # bools and strings are no scalars
  assert scalars["train/loss"] == [(row["step"], np.float32(row["train/loss"])) for row in rows]
  assert [step for step, _ in scalars["train/loss"]] == [1, 2, 3, 4, 5]


def test_tensorboard_events_are_written_without_importing_torch_which_still_imports_after(tmp_path):
  # tensorboardX imports torch whenever it is installed: 2.4 s of every run's start-up here.
  code = (
    "import importlib.util, sys\n"
    "from l2vit_jax.training import metrics_log\n"
    "writer = metrics_log.EventWriter(sys.argv[1])\n"
    "writer.scalars(1, {'train/loss': 0.5})\n"
    "writer.close()\n"
    "print('torch' in sys.modules)\n"
    "if importlib.util.find_spec('torch'):\n"
    "  import torch\n"
    "  print(torch.ones(2).sum().item())\n"
  )
  result = subprocess.run(
    [sys.executable, "-c", code, str(tmp_path)],
    env=ENV,
    capture_output=True,
    text=True,
    check=False,
    timeout=120,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  lines = result.stdout.split()
  assert lines[0] == "False"
  assert lines[1:] == (["2.0"] if importlib.util.find_spec("torch") else [])
  assert glob.glob(str(tmp_path / "events.out.tfevents.*"))


def test_event_files_of_one_process_sort_in_the_order_they_were_opened(tmp_path, monkeypatch):
  # TensorBoard reads event files in name order; the 10th and 11th writer of a process once sorted
  # backwards (".9" after ".10") when opened within the same second, undoing a resume's purge.
  monkeypatch.setattr(metrics_log, "_event_files", itertools.count(9))
  writers = [metrics_log.EventWriter(str(tmp_path)) for _ in range(2)]
  for writer in writers:
    writer.close()
  assert sorted(glob.glob(str(tmp_path / "*tfevents*"))) == [writer.path for writer in writers]


def test_tensorboard_false_writes_no_events(tmp_path):
  writer = metrics_log.MetricWriter(str(tmp_path), tensorboard=False)
  writer.write(1, {"train/loss": 1.0})
  writer.close()
  assert os.listdir(tmp_path) == ["metrics.jsonl"]


def _png(color) -> bytes:
  import matplotlib  # pylint: disable=import-outside-toplevel

  matplotlib.use("Agg")
  from matplotlib import pyplot  # pylint: disable=import-outside-toplevel

  figure = pyplot.figure(figsize=(1, 1), dpi=20)
  figure.patch.set_facecolor(color)
  buffer = io.BytesIO()
  figure.savefig(buffer, format="png")
  pyplot.close(figure)
  return buffer.getvalue()


def test_the_figures_a_report_links_become_tensorboard_images(tmp_path):
  (tmp_path / "ft").mkdir()
  figures = {"roc.png": _png("red"), "ft/confusion_matrix.png": _png("blue")}
  for name, data in figures.items():
    (tmp_path / name).write_bytes(data)
  (tmp_path / "report.md").write_text(
    "# Report\n\n![ROC](roc.png)\n\n![ft: confusion](ft/confusion_matrix.png)\n"
    "![missing](gone.png) [see](https://example.org/x.png)\n"
  )
  assert metrics_log.write_report_images(str(tmp_path)) == 2
  images = {
    value.tag: value.image
    for data in _event_files(tmp_path / metrics_log.TENSORBOARD_DIR)
    for event in read_events(data)
    for value in event.summary.value
    if value.HasField("image")
  }
  assert set(images) == {"roc", "ft/confusion_matrix"}
  for name, data in figures.items():
    image = images[name[: -len(".png")]]
    assert image.encoded_image_string == data  # the PNG as the report has it
    assert (image.width, image.height) == metrics_log.png_size(data)[:2] == (20, 20)


def test_profile_steps_accept_a_range_or_one_step_and_refuse_anything_else():
  assert loop.parse_profile_steps("") is None
  assert loop.parse_profile_steps("5,8") == (5, 8)
  assert loop.parse_profile_steps(" 3 ") == (3, 3)
  for bad in ("8,5", "0,2", "a,b", "1,2,3"):
    with pytest.raises(errors.ConfigError, match=f"profile_steps='{bad}'"):
      loop.parse_profile_steps(bad)


def test_the_compilation_cache_setting_names_a_folder_or_turns_it_off(monkeypatch, tmp_path):
  monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
  monkeypatch.delenv(compilation.COMPILATION_CACHE_VARIABLE, raising=False)
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
  assert compilation.resolve_compilation_cache("auto") == str(tmp_path / "l2vit_jax" / "xla")
  assert compilation.resolve_compilation_cache("auto", default="/study/cache") == "/study/cache"
  assert compilation.resolve_compilation_cache("") is None
  assert compilation.resolve_compilation_cache("gs://bucket/xla") == "gs://bucket/xla"
  monkeypatch.setenv(compilation.COMPILATION_CACHE_VARIABLE, "/shared/xla")
  assert compilation.resolve_compilation_cache("auto") == "/shared/xla"
  monkeypatch.setenv(compilation.COMPILATION_CACHE_VARIABLE, "")
  assert compilation.resolve_compilation_cache("auto") is None
  monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", "/jax/own")
  assert compilation.resolve_compilation_cache("auto") == "/jax/own"


def test_tests_keep_the_compilation_cache_out_of_the_home_folder():
  cache = compilation.resolve_compilation_cache("auto")
  assert cache and not cache.startswith(os.path.expanduser("~"))


def test_a_tpu_is_assumed_only_with_a_sign_of_one(tmp_path):
  assert not process_setup.tpu_may_be_present({}, root=str(tmp_path))
  assert process_setup.tpu_may_be_present({"TPU_ACCELERATOR_TYPE": "v5litepod-8"}, root=str(tmp_path))
  (tmp_path / "sys" / "bus" / "pci" / "devices" / "0000:00:04.0").mkdir(parents=True)
  (tmp_path / "sys" / "bus" / "pci" / "devices" / "0000:00:04.0" / "vendor").write_text("0x1af4\n")
  assert not process_setup.tpu_may_be_present({}, root=str(tmp_path))  # a virtio device is no TPU
  (tmp_path / "sys" / "bus" / "pci" / "devices" / "0000:00:04.0" / "vendor").write_text("0x1ae0\n")
  assert process_setup.tpu_may_be_present({}, root=str(tmp_path))  # a Google PCI device
  other = tmp_path / "other"
  (other / "dev").mkdir(parents=True)
  (other / "dev" / "accel0").write_text("")
  assert process_setup.tpu_may_be_present({}, root=str(other))


def test_without_a_tpu_jax_gets_every_platform_but_the_tpu(tmp_path):
  assert process_setup.platforms_without_tpu(set(), root=str(tmp_path)) == "cpu"
  assert process_setup.platforms_without_tpu({"xla_cuda12"}, root=str(tmp_path)) == "cuda,cpu"
  assert process_setup.platforms_without_tpu({"xla_rocm"}, root=str(tmp_path)) == "cpu"  # no /dev/kfd
  # A plugin of another kind: JAX decides.
  assert process_setup.platforms_without_tpu({"some_vendor_plugin"}, root=str(tmp_path)) is None
  chosen = {"JAX_PLATFORMS": "tpu"}
  assert process_setup.configure_platforms(chosen) is None and chosen == {"JAX_PLATFORMS": "tpu"}  # user's
  if importlib.util.find_spec("libtpu") and not process_setup.tpu_may_be_present():
    unset = {}
    chosen_here = process_setup.configure_platforms(unset)
    assert chosen_here == unset["JAX_PLATFORMS"] == process_setup.platforms_without_tpu()


# --- progress of long passes -----------------------------------------------------------------------------


class _Terminal(io.StringIO):
  def isatty(self):
    return True


@pytest.fixture
def info_log(caplog):
  """``caplog`` with absl's INFO lines (absl drops them before its flags are parsed)."""
  caplog.set_level(logging.INFO, logger="absl")
  return caplog


def test_a_long_pass_shows_count_rate_and_eta_on_a_terminal_and_logs_its_rate(monkeypatch, info_log):
  caplog = info_log
  terminal = _Terminal()
  monkeypatch.setattr(sys, "stderr", terminal)
  with console.ProgressBar(40, "jet observables", "jet") as bar:
    for _ in range(4):
      bar.update(10)
    bar._bar.refresh()  # pylint: disable=protected-access  # a frame now, not after tqdm's 1 s interval
  drawn = terminal.getvalue()
  assert re.search(r"jet observables: 100%.*40/40 \[00:\d\d<00:00, +[\d.]+jet/s\]", drawn), drawn
  assert drawn.endswith("\r") and drawn.rsplit("\r", 2)[-2].strip() == ""  # cleared, not left behind
  assert re.search(r"jet observables: 40 jet\(s\) in [\d.]+ s \([\d.]+ jet/s\)", caplog.text)


def test_a_failed_pass_clears_its_bar_and_logs_no_rate(monkeypatch, info_log):
  caplog = info_log
  terminal = _Terminal()
  monkeypatch.setattr(sys, "stderr", terminal)
  with pytest.raises(RuntimeError):
    with console.ProgressBar(40, "inference", "jet") as bar:
      bar.update(10)
      raise RuntimeError("a bad file")
  assert terminal.getvalue().rsplit("\r", 2)[-2].strip() == ""  # nothing of the bar above an error line
  assert "inference: " not in caplog.text


def test_without_a_terminal_a_pass_draws_no_bar_but_logs_its_rate(monkeypatch, info_log, jet_file):
  caplog = info_log
  from l2vit_jax.baselines import observables  # pylint: disable=import-outside-toplevel
  from l2vit_jax.data import sources  # pylint: disable=import-outside-toplevel

  log_file = io.StringIO()  # what stderr is under a scheduler: a file
  monkeypatch.setattr(sys, "stderr", log_file)
  features = observables.source_observables(sources.open_source(jet_file, labelled=False), chunk_size=16)
  assert features.shape == (40, len(observables.observable_names()))
  assert log_file.getvalue() == ""
  assert re.search(r"jet observables: 40 jet\(s\) in [\d.]+ s", caplog.text)
  caplog.clear()
  done = []
  observables.source_observables(
    sources.open_source(jet_file, labelled=False), chunk_size=16, progress=done.append
  )
  assert done == [16, 32, 40] and "jet observables" not in caplog.text  # the caller reports progress


def test_inference_over_a_file_logs_its_rate(jet_file, info_log):
  caplog = info_log
  import jax  # pylint: disable=import-outside-toplevel
  from l2vit_jax.data import sources  # pylint: disable=import-outside-toplevel
  from l2vit_jax.evaluation import inference  # pylint: disable=import-outside-toplevel
  from l2vit_jax.runtime import sharding  # pylint: disable=import-outside-toplevel

  source = sources.open_source(jet_file, labelled=True, indices=np.arange(11))
  out = inference.map_source(
    jax.jit(lambda images: {"total": images.sum(axis=(1, 2, 3))}),
    source,
    pixel_scale=1.0,
    batch_size=4,
    mesh=sharding.make_mesh(),
  )
  np.testing.assert_array_equal(out["index"], np.arange(11))
  assert re.search(r"inference: 11 jet\(s\) in [\d.]+ s", caplog.text)
