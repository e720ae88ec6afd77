"""The resumable, validating downloader against a local HTTP server with injected faults.

The server only listens on 127.0.0.1. URLs are ``/<mode>/<kind>/<tag>``: ``mode`` picks the fault,
``kind`` the body (a valid labelled or unlabelled file, one without ``Y``, an HTML page) and ``tag`` is
unique per URL so each test sees only its own requests and "the first time" means first for that URL.
"""

import collections
import http.server
import io
import itertools
import os
import re
import socket
import subprocess
import sys
import threading
import time

import pytest

from conftest import write_jet_file
from l2vit_jax import errors
from l2vit_jax.data import download, hdf5

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HTML_PAGE = b"<!DOCTYPE html>\n<html><head><title>Error</title></head><body>Quota exceeded</body></html>\n"
EXTRA = 100  # how many bytes the "wrongsize" mode claims beyond what it sends
CAP = 64 << 10  # the most bytes the "capped" mode sends per Range reply


class LocalServer:
  """A threaded HTTP server with fault modes; records (path, Range header) for every GET."""

  def __init__(self, bodies):
    self.bodies = bodies
    self.requests = collections.defaultdict(list)
    self.lock = threading.Lock()
    self.release = threading.Event()  # lets "stall" handlers finish at teardown
    self._tags = itertools.count()
    self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
    self.httpd.daemon_threads = True
    self.thread = threading.Thread(
      target=self.httpd.serve_forever, kwargs=dict(poll_interval=0.05), daemon=True
    )

  def url(self, mode, kind="labelled"):
    return f"http://127.0.0.1:{self.httpd.server_address[1]}/{mode}/{kind}/{next(self._tags)}"

  def close(self):
    self.release.set()
    self.httpd.shutdown()
    self.httpd.server_close()
    self.thread.join(timeout=5)


def _path_of(url):
  return "/" + url.split("/", 3)[3]


def _make_handler(server):

  class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"  # one request per connection: a dropped connection is unambiguous

    def log_message(self, *args):  # keep pytest output clean
      pass

    def do_GET(self):  # pylint: disable=invalid-name
      mode, kind, _ = self.path.strip("/").split("/")
      range_header = self.headers.get("Range")
      with server.lock:
        first = not server.requests[self.path]
        server.requests[self.path].append(range_header)
      if mode == "missing":
        self.send_error(404, "Not Found")
        return
      if mode == "flaky503" and first:
        self.send_error(503, "Service Unavailable")
        return
      body = server.bodies[kind]
      size = len(body) + (EXTRA if mode == "wrongsize" else 0)
      start = 0
      if range_header and mode != "norange":
        start = int(re.fullmatch(r"bytes=(\d+)-", range_header).group(1))
        if start >= size:
          self.send_response(416)
          self.send_header("Content-Range", f"bytes */{size}")
          self.send_header("Content-Length", "0")
          self.end_headers()
          return
      self.send_response(206 if start or (range_header and mode != "norange") else 200)
      html_type = kind == "html" and mode != "octet"
      self.send_header("Content-Type", "text/html; charset=utf-8" if html_type else "application/x-hdf5")
      end = min(start + CAP, size) if mode == "capped" and range_header else size
      self.send_header("Content-Length", str(end - start))
      if range_header and mode != "norange":
        self.send_header("Content-Range", f"bytes {start}-{end - 1}/{size}")
      self.end_headers()
      data = body[start:end]
      if mode in ("drop", "stall") and first:
        self.wfile.write(data[: len(data) // 2])
        self.wfile.flush()
        if mode == "stall":
          server.release.wait(timeout=5)  # the client's read timeout fires long before this
        self.connection.shutdown(socket.SHUT_RDWR)
        return
      self.wfile.write(data)

  return Handler


@pytest.fixture(scope="module")
def server(tmp_path_factory):
  root = tmp_path_factory.mktemp("served")
  bodies = {"html": HTML_PAGE}
  for kind, kwargs in {"labelled": {}, "unlabelled": dict(labelled=False), "noY": dict(drop=("Y",))}.items():
    path = write_jet_file(root / f"{kind}.h5", num=16, size=25, seed=1, **kwargs)
    with open(path, "rb") as f:
      bodies[kind] = f.read()
  srv = LocalServer(bodies)
  srv.thread.start()
  yield srv
  srv.close()


def _requests(server, url):
  """The Range header (or None) of every request the server got for ``url``, in order."""
  with server.lock:
    return list(server.requests[_path_of(url)])


def _get(url, dest, **kwargs):
  options = dict(
    labelled=True, chunk_size=16 << 10, timeout=2.0, max_retries=3, progress=False, retry_wait=0.0
  )
  options.update(kwargs)
  return download.download_file(url, str(dest), **options)


def _read(path):
  with open(path, "rb") as f:
    return f.read()


def test_downloads_and_validates(server, tmp_path):
  url = server.url("normal")
  dest = tmp_path / "sub" / "labelled.h5"
  assert _get(url, dest) == str(dest)
  assert _read(dest) == server.bodies["labelled"]
  assert not os.path.exists(f"{dest}.part")
  assert hdf5.validate_file(str(dest), labelled=True).num_examples == 16
  assert _requests(server, url) == [None]


def test_dropped_connection_resumes_with_range(server, tmp_path):
  url = server.url("drop")
  dest = tmp_path / "labelled.h5"
  _get(url, dest)
  half = len(server.bodies["labelled"]) // 2
  assert _requests(server, url) == [None, f"bytes={half}-"]
  assert _read(dest) == server.bodies["labelled"]


def test_stalled_connection_times_out_and_resumes(server, tmp_path):
  url = server.url("stall")
  dest = tmp_path / "labelled.h5"
  _get(url, dest, timeout=0.5)
  ranges = _requests(server, url)
  assert len(ranges) == 2 and ranges[0] is None and ranges[1].startswith("bytes=")
  assert _read(dest) == server.bodies["labelled"]


def test_server_ignoring_range_restarts_from_zero(server, tmp_path):
  url = server.url("norange")
  dest = tmp_path / "labelled.h5"
  # A plausible prefix whose tail is wrong: only a truncating restart gives an identical file.
  with open(f"{dest}.part", "wb") as f:
    f.write(server.bodies["labelled"][:8] + b"x" * 992)
  _get(url, dest)
  assert _requests(server, url) == ["bytes=1000-"]
  assert _read(dest) == server.bodies["labelled"]
  assert not os.path.exists(f"{dest}.part")


def test_resumes_a_partial_file_from_a_previous_run(server, tmp_path):
  url = server.url("normal")
  dest = tmp_path / "labelled.h5"
  with open(f"{dest}.part", "wb") as f:
    f.write(server.bodies["labelled"][:5000])
  _get(url, dest)
  assert _requests(server, url) == ["bytes=5000-"]
  assert _read(dest) == server.bodies["labelled"]


def test_short_range_replies_are_continued_without_backoff(server, tmp_path):
  url = server.url("capped")
  dest = tmp_path / "labelled.h5"
  with open(f"{dest}.part", "wb") as f:
    f.write(server.bodies["labelled"][:5000])
  start = time.monotonic()
  _get(url, dest, retry_wait=5.0)
  assert time.monotonic() - start < 4.0  # no 5 s back-off: each reply made progress
  size = len(server.bodies["labelled"])
  assert _requests(server, url) == [f"bytes={begin}-" for begin in range(5000, size, CAP)]
  assert _read(dest) == server.bodies["labelled"]


@pytest.mark.parametrize(
  "part_content, expected_ranges",
  [
    pytest.param(lambda body: body, lambda body: [f"bytes={len(body)}-"], id="complete_part"),
    pytest.param(lambda body: body + b"extra", lambda body: [f"bytes={len(body) + 5}-", None], id="too_long"),
    pytest.param(lambda body: b"garbage" * 100, lambda body: [None], id="not_hdf5"),
  ],
)
def test_leftover_part_file_is_finished_or_discarded(server, tmp_path, part_content, expected_ranges):
  url = server.url("normal")
  dest = tmp_path / "labelled.h5"
  body = server.bodies["labelled"]
  with open(f"{dest}.part", "wb") as f:
    f.write(part_content(body))
  _get(url, dest)
  assert _requests(server, url) == expected_ranges(body)
  assert _read(dest) == body


class _Terminal(io.StringIO):
  def isatty(self):
    return True


def test_the_byte_bar_is_drawn_only_on_a_terminal_from_the_resumed_byte_and_cleared(
  server, tmp_path, monkeypatch
):
  """The one progress bar of every long pass (runtime.console.ProgressBar): a log file gets no bar."""
  log_file = io.StringIO()
  monkeypatch.setattr(sys, "stderr", log_file)
  _get(server.url("normal"), tmp_path / "quiet.h5", progress=True)
  assert log_file.getvalue() == ""
  terminal = _Terminal()
  monkeypatch.setattr(sys, "stderr", terminal)
  dest = tmp_path / "labelled.h5"
  with open(f"{dest}.part", "wb") as f:
    f.write(server.bodies["labelled"][:5000])
  _get(server.url("capped"), dest, progress=True)  # several Range replies, resumed at byte 5000
  drawn = terminal.getvalue()
  assert re.search(r"labelled\.h5: +\d+%.* 4\.88k/\d+k \[.*B/s\]", drawn), drawn  # 5000 B = 4.88 KiB
  assert re.search(r" 68\.9k/\d+k ", drawn), drawn  # the next reply's bar starts where the first ended
  assert drawn.endswith("\r") and drawn.rsplit("\r", 2)[-2].strip() == ""  # cleared, not left behind


def test_a_failed_download_is_a_user_error_the_command_line_reports_in_one_line(server, tmp_path):
  with pytest.raises(errors.UserError, match=r"HTTP 404 Not Found"):
    _get(server.url("missing"), tmp_path / "labelled.h5")


def test_retries_server_errors(server, tmp_path):
  url = server.url("flaky503")
  dest = tmp_path / "labelled.h5"
  _get(url, dest)
  assert _requests(server, url) == [None, None]
  assert _read(dest) == server.bodies["labelled"]


def test_http_404_is_a_one_line_error(server, tmp_path):
  url = server.url("missing")
  dest = tmp_path / "labelled.h5"
  with pytest.raises(download.DownloadError, match=r"HTTP 404 Not Found") as error:
    _get(url, dest)
  assert url in str(error.value) and "\n" not in str(error.value)
  assert _requests(server, url) == [None]  # not retried
  assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("mode", ["normal", "octet"])  # Content-Type text/html, or only the bytes tell
def test_html_error_page_is_never_saved(server, tmp_path, mode):
  url = server.url(mode, kind="html")
  dest = tmp_path / "labelled.h5"
  with pytest.raises(download.DownloadError, match=r"server returned an HTML page, not HDF5"):
    _get(url, dest)
  assert os.listdir(tmp_path) == []


def test_wrong_size_is_never_renamed_into_place(server, tmp_path):
  url = server.url("wrongsize")
  dest = tmp_path / "labelled.h5"
  size = len(server.bodies["labelled"])
  with pytest.raises(download.DownloadError, match=rf"got {size} bytes, expected {size + EXTRA}") as error:
    _get(url, dest, max_retries=2)
  assert "\n" not in str(error.value)
  assert len(_requests(server, url)) == 3  # the first read progressed, then 2 retries without progress
  assert not dest.exists()
  # What arrived is a correct prefix, kept for the next run to resume.
  assert _read(f"{dest}.part") == server.bodies["labelled"]


def test_file_failing_schema_validation_is_not_renamed(server, tmp_path):
  url = server.url("normal", kind="noY")
  dest = tmp_path / "labelled.h5"
  with pytest.raises(download.DownloadError, match=r"not a valid jet file: .*key 'Y': missing"):
    _get(url, dest)
  assert os.listdir(tmp_path) == []  # complete but unusable: the part file is removed too


def test_existing_valid_file_is_skipped(server, tmp_path, capsys):
  url = server.url("normal")
  dest = write_jet_file(tmp_path / "labelled.h5", num=8, seed=7)  # differs from the served file
  before = _read(dest)
  assert _get(url, dest) == dest
  assert _read(dest) == before
  assert _requests(server, url) == []
  assert "already present and valid" in capsys.readouterr().out


def test_existing_invalid_file_is_left_alone(server, tmp_path):
  url = server.url("normal")
  dest = tmp_path / "labelled.h5"
  dest.write_bytes(b"not hdf5 at all")
  with pytest.raises(download.DownloadError, match=r"already exists but is not a valid jet file"):
    _get(url, dest)
  assert dest.read_bytes() == b"not hdf5 at all"
  assert _requests(server, url) == []


def test_insufficient_disk_space_fails_before_writing(server, tmp_path, monkeypatch):
  usage = collections.namedtuple("usage", "total used free")
  monkeypatch.setattr(download.shutil, "disk_usage", lambda path: usage(100, 90, 10))
  dest = tmp_path / "labelled.h5"
  with pytest.raises(download.DownloadError, match=r"not enough disk space"):
    _get(server.url("normal"), dest)
  assert os.listdir(tmp_path) == []


def test_main_downloads_both_files(server, tmp_path, capsys):
  data_dir = tmp_path / "data"
  argv = [
    "--data-dir",
    str(data_dir),
    "--no-progress",
    "--labelled-url",
    server.url("normal"),
    "--unlabelled-url",
    server.url("normal", kind="unlabelled"),
  ]
  assert download.main(argv) == 0
  assert sorted(os.listdir(data_dir)) == sorted([download.LABELLED_FILENAME, download.UNLABELLED_FILENAME])
  hdf5.validate_file(str(data_dir / download.UNLABELLED_FILENAME), labelled=False)
  assert _read(data_dir / download.LABELLED_FILENAME) == server.bodies["labelled"]
  # Running again downloads nothing.
  assert download.main(argv) == 0
  assert capsys.readouterr().out.count("already present and valid") == 2


def test_main_reports_real_sizes_and_checks_disk_space(tmp_path, monkeypatch, capsys):
  usage = collections.namedtuple("usage", "total used free")
  monkeypatch.setattr(download.shutil, "disk_usage", lambda path: usage(1 << 40, 0, 10 << 30))
  # Real URLs (never contacted: 10 GiB free is too little for 32.6 GiB, so it stops before any request).
  assert download.main(["--data-dir", str(tmp_path), "--no-progress"]) == 1
  captured = capsys.readouterr()
  assert "4.66 GiB" in captured.out and "27.94 GiB" in captured.out
  assert captured.err.count("\n") == 1 and "not enough disk space" in captured.err


def test_main_rejects_both_only_flags():
  with pytest.raises(SystemExit) as exit_info:
    download.main(["--labelled-only", "--unlabelled-only"])
  assert exit_info.value.code == 2


def _run_cli(*args):
  return subprocess.run(
    [sys.executable, "scripts/download_data.py", *args],
    cwd=REPO_ROOT,
    capture_output=True,
    text=True,
    timeout=60,
    check=False,
  )


def test_cli_success(server, tmp_path):
  result = _run_cli(
    "--data-dir", str(tmp_path), "--labelled-only", "--timeout", "5", "--labelled-url", server.url("normal")
  )
  assert result.returncode == 0, result.stderr
  assert os.listdir(tmp_path) == [download.LABELLED_FILENAME]
  assert _read(tmp_path / download.LABELLED_FILENAME) == server.bodies["labelled"]


def test_cli_http_404(server, tmp_path):
  url = server.url("missing")
  result = _run_cli("--data-dir", str(tmp_path), "--labelled-only", "--timeout", "5", "--labelled-url", url)
  assert result.returncode != 0
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and "HTTP 404" in lines[0] and url in lines[0], result.stderr
  assert os.listdir(tmp_path) == []
