"""The TPU VM launcher (scripts/launch_tpu.py) with a fake ``gcloud``, and the packaging metadata.

The fake ``gcloud`` is a script on PATH that appends its argv to a JSON-lines log. It exits 3 when an
argument contains ``$FAKE_GCLOUD_FAIL_ON``, sleeps a minute when one contains ``$FAKE_GCLOUD_HANG_ON``,
and with ``$FAKE_WORKER_HOME`` set it runs an ssh ``--command`` through bash there, as a worker's login
shell would.
"""

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import tomllib

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCHER = os.path.join(REPO_ROOT, "scripts", "launch_tpu.py")
BASE = ["--name=l2vit-test", "--zone=us-east5-a"]
ALL = [
  "all",
  *BASE,
  "--accelerator-type=v5litepod-8",
  "--data=gs://my-bucket/data/",
  "--config=configs/simclr.py",
  "--workdir=gs://my-bucket/runs/simclr",
]
OVERRIDES = ["--config.batch_size=256", "--config.data.unlabelled_path=data/with space's.sparse"]

FAKE_GCLOUD = """#!{python}
import json, os, subprocess, sys, time
with open(os.environ["FAKE_GCLOUD_LOG"], "a") as log:
  log.write(json.dumps(sys.argv[1:]) + "\\n")
fail_on = os.environ.get("FAKE_GCLOUD_FAIL_ON")
if fail_on and any(fail_on in arg for arg in sys.argv[1:]):
  sys.exit(3)
hang_on = os.environ.get("FAKE_GCLOUD_HANG_ON")
if hang_on and any(hang_on in arg for arg in sys.argv[1:]):
  time.sleep(60)
home = os.environ.get("FAKE_WORKER_HOME")
commands = [arg[len("--command="):] for arg in sys.argv if arg.startswith("--command=")]
if home and commands:
  sys.exit(subprocess.run(["bash", "-c", commands[0]], cwd=home).returncode)
"""


def launch(*args, env=None):
  return subprocess.run(
    [sys.executable, LAUNCHER, *args], capture_output=True, text=True, env=env, check=False, timeout=60
  )


def remote_command(gcloud_argv):
  """The --command of a ``gcloud ... ssh`` argv, or None."""
  return next((arg.split("=", 1)[1] for arg in gcloud_argv if arg.startswith("--command=")), None)


def describe(commands):
  """Short names for command lines: the gcloud verb, or what an ssh runs on the workers."""
  names = []
  for argv in commands:
    if argv[0] == "git":
      names.append(f"git {argv[3]}")
      continue
    remote = remote_command(argv) or ""
    markers = {
      "tar -xzf": "unpack",
      "pip install": "install",
      "storage rsync": "data",
      "l2vit_jax.main": "run",
    }
    names.append(
      next((name for marker, name in markers.items() if marker in remote), argv[argv.index("tpu-vm") + 1])
    )
  return names


@pytest.fixture
def fake_gcloud(tmp_path):
  """Environment with the fake gcloud first on PATH; ``env.calls()`` gives the gcloud command lines."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  script = bin_dir / "gcloud"
  script.write_text(FAKE_GCLOUD.format(python=sys.executable))
  script.chmod(0o755)
  log = tmp_path / "gcloud.jsonl"
  env = dict(
    os.environ,
    PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
    FAKE_GCLOUD_LOG=str(log),
    TMPDIR=str(tmp_path),
  )

  class Env(dict):
    def calls(self):
      lines = log.read_text().splitlines() if log.exists() else []
      return [["gcloud", *json.loads(line)] for line in lines]

  return Env(env)


def test_dry_run_prints_every_stage_in_order_with_overrides_quoted(tmp_path):
  result = launch(*ALL, *OVERRIDES, "--spot", "--project=my-project", "--dry-run")
  assert result.returncode == 0, result.stderr
  lines = [shlex.split(line) for line in result.stdout.splitlines()]
  assert describe(lines) == ["create", "git archive", "scp", "unpack", "install", "data", "run", "delete"]
  create, archive, scp, unpack, install, data, run, delete = lines
  assert create[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "l2vit-test"]
  assert {
    "--zone=us-east5-a",
    "--project=my-project",
    "--accelerator-type=v5litepod-8",
    "--version=v2-alpha-tpuv5-lite",
    "--spot",
  } <= set(create)
  output = next(arg.split("=", 1)[1] for arg in archive if arg.startswith("--output="))
  assert archive[-1] == "HEAD" and scp[5] == output  # ships the archive it just wrote
  assert all(
    "--worker=all" in line and "--project=my-project" in line for line in (scp, unpack, install, data, run)
  )
  assert 'pip install -e ".[tpu]"' in remote_command(install)
  assert "gcloud storage rsync --recursive gs://my-bucket/data l2vit_jax/data" in remote_command(data)
  # The remote shell sees exactly the arguments given, the awkward override included.
  cd, main = remote_command(run).split(" && ")
  assert cd == "cd l2vit_jax"
  assert shlex.split(main) == [
    "env",
    "L2VIT_DISTRIBUTED=1",
    ".venv/bin/python",
    "-m",
    "l2vit_jax.main",
    "--config=configs/simclr.py",
    "--workdir=gs://my-bucket/runs/simclr",
    *OVERRIDES,
  ]
  assert delete[4:6] == ["delete", "l2vit-test"] and "--quiet" in delete


def test_dry_run_keep_and_single_stages():
  kept = launch(*ALL, "--keep", "--dry-run").stdout.splitlines()
  assert len(kept) == 7 and "delete" not in kept[-1]
  run_only = launch("run", *BASE, "--config=configs/finetune.py", "--workdir=gs://b-1/x", "--dry-run")
  assert run_only.returncode == 0 and len(run_only.stdout.splitlines()) == 1
  setup = launch("setup", *BASE, "--dry-run").stdout.splitlines()  # no --data: no rsync step
  assert len(setup) == 4 and not any("rsync" in line for line in setup)
  default_runtime = launch("create", *BASE, "--accelerator-type=v6e-16", "--dry-run").stdout
  assert "--version=v2-alpha-tpuv6e" in default_runtime and "--spot" not in default_runtime


@pytest.mark.parametrize(
  "args, message",
  [
    (["run", *BASE, "--config=configs/simclr.py", "--workdir=runs/simclr"], "--workdir=runs/simclr"),
    (["run", *BASE, "--config=configs/simclr.py", "--workdir=gs://bucket"], "gs://BUCKET/PATH"),
    (["run", *BASE, "--config=configs/nope.py", "--workdir=gs://b-1/x"], "no such file"),
    (["run", *BASE, "--workdir=gs://b-1/x"], "run needs --config"),
    (["create", *BASE, "--accelerator-type=tpu-8"], "--accelerator-type=tpu-8"),
    (["create", *BASE, "--accelerator-type=v9z-8"], "pass --runtime-version"),
    (["create", *BASE], "create needs --accelerator-type"),
    (["delete", "--name=Bad_Name", "--zone=us-east5-a"], "--name=Bad_Name"),
    (["delete", "--name=x", "--zone=east"], "--zone=east"),
    (["setup", *BASE, "--data=/local/data"], "--data=/local/data"),
    (["setup", *BASE, "--python=3.10"], "--python=3.10"),
    (["delete", *BASE, "--config.batch_size=3"], "only apply to 'run'"),
    ([*ALL, "--bogus=1"], "--bogus=1"),
    ([*ALL, "--spot", "--preemptible"], "not allowed with"),
    (["launch", *BASE], "invalid choice"),
  ],
)
def test_bad_arguments_fail_with_one_line_and_status_2(args, message):
  result = launch(*args, "--dry-run")
  assert result.returncode == 2
  assert result.stdout == ""
  assert len(result.stderr.splitlines()) == 1 and result.stderr.startswith("error: ")
  assert message in result.stderr


def test_real_run_calls_gcloud_in_order(fake_gcloud):
  result = launch(*ALL, *OVERRIDES, env=fake_gcloud)
  assert result.returncode == 0, result.stderr
  assert describe(fake_gcloud.calls()) == ["create", "scp", "unpack", "install", "data", "run", "delete"]
  echoed = [line[2:] for line in result.stderr.splitlines() if line.startswith("+ ")]
  assert len(echoed) == 8 and echoed[1].startswith("git ")  # every command echoed, git archive too
  scp = fake_gcloud.calls()[1]
  assert os.path.getsize(scp[5]) > 0  # the archive really was written


@pytest.mark.parametrize("keep", [False, True])
def test_failing_step_stops_the_run_and_still_deletes_unless_kept(fake_gcloud, keep):
  fake_gcloud["FAKE_GCLOUD_FAIL_ON"] = "pip install"
  result = launch(*ALL, *(["--keep"] if keep else []), env=fake_gcloud)
  assert result.returncode == 1
  expected = ["create", "scp", "unpack", "install"] + ([] if keep else ["delete"])
  assert describe(fake_gcloud.calls()) == expected
  error = result.stderr.splitlines()[-1]
  assert error.startswith("error: setup failed (exit status 3: gcloud compute tpus tpu-vm ssh")
  assert "pip install" in error


def test_ctrl_c_during_the_run_still_deletes_the_vm(fake_gcloud):
  fake_gcloud["FAKE_GCLOUD_HANG_ON"] = "l2vit_jax.main"
  # A shell that starts jobs in the background (CI under nohup, `cmd &`) makes them ignore SIGINT, and
  # children inherit that: give the launcher Python's usual Ctrl-C handling, as in a terminal.
  with_ctrl_c = (
    "import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
    "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"
  )
  process = subprocess.Popen(
    [sys.executable, "-c", with_ctrl_c, LAUNCHER, *ALL], env=fake_gcloud, stderr=subprocess.PIPE, text=True
  )
  deadline = time.monotonic() + 30
  while "run" not in describe(fake_gcloud.calls()):
    assert process.poll() is None and time.monotonic() < deadline
    time.sleep(0.05)
  process.send_signal(signal.SIGINT)
  _, stderr = process.communicate(timeout=30)
  assert process.returncode == 1 and "error: run interrupted" in stderr
  assert describe(fake_gcloud.calls())[-2:] == ["run", "delete"]


def test_failing_create_deletes_nothing(fake_gcloud):
  fake_gcloud["FAKE_GCLOUD_FAIL_ON"] = "--accelerator-type"
  result = launch(*ALL, env=fake_gcloud)
  assert result.returncode == 1 and "error: create failed" in result.stderr
  assert describe(fake_gcloud.calls()) == ["create"]


def test_workers_receive_the_arguments_unchanged(fake_gcloud, tmp_path):
  """The run step's --command, run by bash in a fake worker, hands main.py exactly the given argv."""
  worker = tmp_path / "worker"
  python = worker / "l2vit_jax" / ".venv" / "bin" / "python"
  python.parent.mkdir(parents=True)
  python.write_text(
    f"#!{sys.executable}\nimport json, sys\n"
    f"open({str(tmp_path / 'argv.json')!r}, 'w').write(json.dumps(sys.argv[1:]))\n"
  )
  python.chmod(0o755)
  fake_gcloud["FAKE_WORKER_HOME"] = str(worker)
  overrides = [*OVERRIDES, '--config.init_from=gs://b-1/a "quoted" $HOME `x`']
  result = launch(
    "run", *BASE, "--config=configs/finetune.py", "--workdir=gs://b-1/run", *overrides, env=fake_gcloud
  )
  assert result.returncode == 0, result.stderr
  assert json.loads((tmp_path / "argv.json").read_text()) == [
    "-m",
    "l2vit_jax.main",
    "--config=configs/finetune.py",
    "--workdir=gs://b-1/run",
    *overrides,
  ]


def _bash_blocks(markdown):
  """The ```bash blocks of a markdown text, backslash-continued lines joined."""
  blocks = markdown.split("```bash\n")[1:]
  return [block.split("```", 1)[0].replace("\\\n", " ") for block in blocks]


def test_the_documented_manual_sequence_is_what_the_launcher_runs():
  with open(os.path.join(REPO_ROOT, "docs", "scaling.md")) as f:
    text = f.read()
  heading = re.search(r"^(#+) TPU VMs.*$", text, re.M)
  section = text[heading.end() :]
  end = re.search(rf"^#{{1,{len(heading.group(1))}}} ", section, re.M)
  section = section[: end.start()] if end else section
  launch_block = _bash_blocks(section.split("**3. Launch.**", 1)[1])[0]
  manual_block = _bash_blocks(section.split("**The same by hand.**", 1)[1])[0]
  command = shlex.split(launch_block)
  assert command[:2] == ["python", "scripts/launch_tpu.py"]
  result = launch(*command[2:], "--dry-run", env=dict(os.environ, TMPDIR="/tmp"))
  assert result.returncode == 0, result.stderr
  printed = result.stdout.replace(f"git -C {REPO_ROOT} archive", "git archive")
  assert printed.splitlines() == manual_block.strip().splitlines()


def test_pyproject_declares_the_extras_from_the_requirements_files():
  with open(os.path.join(REPO_ROOT, "pyproject.toml"), "rb") as f:
    pyproject = tomllib.load(f)
  project, setuptools = pyproject["project"], pyproject["tool"]["setuptools"]
  assert project["requires-python"] == ">=3.11"
  assert set(project["dynamic"]) == {"dependencies", "optional-dependencies"}
  assert setuptools["packages"]["find"]["include"] == ["l2vit_jax*"]
  dynamic = setuptools["dynamic"]
  extras = dynamic["optional-dependencies"]
  assert set(extras) == {"tpu", "cuda12", "torch", "export", "hep", "tensorboard", "test"}
  files = {"": dynamic["dependencies"]["file"], **{name: extra["file"] for name, extra in extras.items()}}
  # Each extra reads its own file; the test extra adds the extras whose code the suite tests.
  assert files[""] == ["requirements.txt"]
  for name in set(extras) - {"test"}:
    assert files[name] == [f"requirements-{name}.txt"], name
  assert files["test"] == [
    "requirements-test.txt",
    "requirements-torch.txt",
    "requirements-export.txt",
    "requirements-hep.txt",
  ]
  with open(os.path.join(REPO_ROOT, "constraints.txt")) as f:
    pinned = dict(line.strip().split("==", 1) for line in f if line.strip() and not line.startswith("#"))
  pinned = {re.sub(r"[-_.]+", "-", name).lower(): version for name, version in pinned.items()}
  for name, paths in files.items():
    requirements = []
    for path in paths:
      with open(os.path.join(REPO_ROOT, path)) as f:
        requirements += [line.strip() for line in f if line.strip() and not line.startswith("#")]
    assert requirements, f"extra {name!r}: {paths} list no requirements"
    if name in ("tpu", "cuda12"):
      assert requirements == [f"jax[{name}]>=0.10.2"]
    # README's commands install with -c constraints.txt: every named package has its tested version.
    for requirement in requirements:
      package = re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9._-]+", requirement).group()).lower()
      assert package in pinned, f"{requirement} (extra {name!r}) is not pinned in constraints.txt"
