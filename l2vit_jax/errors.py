"""Every error the command line reports as one line: ``error: MESSAGE`` on stderr, no traceback.

``main`` catches ``UserError`` by type. Each subclass names a kind of bad input or setup; its message
is one line naming the file, key or field, the value found and what was expected. Anything else that
escapes is a bug and keeps its traceback. Each class also derives from the built-in exception it
specialises (``ValueError``, ``RuntimeError``, ``FileNotFoundError``), so library callers can catch
either.
"""


class UserError(Exception):
  """Bad input, configuration or workdir state: reported in one line, exit status 1."""


class ConfigError(UserError, ValueError):
  """A config that cannot work, found before anything runs; the message names every bad field."""


class DataError(UserError, ValueError):
  """A data file that cannot be used; the message is one line naming file, key and expectation."""


class CheckpointMismatchError(UserError, ValueError):
  """A checkpoint whose tensors (or task) do not fit the model being restored into."""


class CheckpointImportError(UserError, ValueError):
  """A PyTorch checkpoint that cannot be imported; the message lists every offending tensor."""


class CheckpointDamagedError(UserError, RuntimeError):
  """A checkpoint whose arrays differ from the digests saved with them, or that cannot be read.

  ``proven``: the error shows the checkpoint's bytes are wrong or missing (a digest mismatch,
  undecodable data), so a resuming run may set the step aside; else the read failed for a reason that
  says nothing about the files (memory, a library), and the step is kept.
  """

  def __init__(self, message: str, *, proven: bool = True):
    super().__init__(message)
    self.proven = proven


class StorageError(UserError, OSError):
  """The storage did not answer a read (a network or permission error, retried first): nothing was
  changed or set aside, and the same command can simply be run again."""


class CheckpointSaveError(UserError, RuntimeError):
  """Writing a checkpoint failed (disk full, write error); nothing of it is taken for a checkpoint."""


class MissingCheckpointError(UserError, FileNotFoundError):
  """A directory given as a checkpoint holds none."""


class DivergenceError(UserError, RuntimeError):
  """Training produced a non-finite loss or gradient; nothing from that state was saved."""


class WorkdirLockedError(UserError, RuntimeError):
  """Another live run holds the workdir's lock.

  ``expires``: False for a lock that is never taken over however long one waits (unparsable, or of an
  older version without a refresh time), so that a caller that would wait for it stops instead.
  """

  def __init__(self, message: str, *, expires: bool = True):
    super().__init__(message)
    self.expires = expires


class Preempted(Exception):
  """SIGTERM/SIGINT (or a multi-host preemption notice) stopped training after a final checkpoint.

  Not a ``UserError``: ``main`` exits with ``exit_status``, 128 + the signal number (143 for SIGTERM),
  as if the signal had ended the process, so schedulers and retry loops see an unfinished run and
  restart it, and the restart resumes.
  """

  def __init__(self, message: str, exit_status: int = 143):
    super().__init__(message)
    self.exit_status = exit_status


class ExportError(UserError, RuntimeError):
  """An export that cannot be made: a checkpoint without the meta of a finetuned model, a converter
  that is not installed, or an operation it cannot convert (named)."""


class DownloadError(UserError, RuntimeError):
  """A download that failed; the message is one line naming the URL or file and what was wrong."""


def one_line(value: object, limit: int | None = None) -> str:
  """``str(value)`` with every run of whitespace (newlines included) made one space, cut to ``limit``
  characters: how an error that may span lines (h5py's, a server's reason, a converter's) is quoted
  inside a one-line message."""
  return " ".join(str(value).split())[:limit]
