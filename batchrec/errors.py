"""The one exception type users see.

Anything raised as `BatchrecError` is printed by the CLI as a single line (`error: ...`) with a
non-zero exit; its message must name the file/line/parameter at fault and what was expected.
Faults of the machine (disk full, read-only file system, interrupts) become one line through
`as_fault`.
"""

import errno
import re


class BatchrecError(Exception):
    """A user-facing failure: bad input, bad parameters, a busy or missing warehouse."""

    exit_code = 1


class WarehouseBusy(BatchrecError):
    """Another batchrec process holds the warehouse for writing."""

    exit_code = 75  # EX_TEMPFAIL: cron wrappers may retry later


class Fault(BatchrecError):
    """The machine failed the command (disk full, read-only file system, I/O error), not the input."""

    exit_code = 74  # EX_IOERR


class Gated(BatchrecError):
    """The publish gate refused a run's lists (worse than the live run, or degenerate): nothing was
    published, yesterday's lists stay. Its own exit code, so cron can tell it from a failure."""

    exit_code = 3


class Interrupted(BatchrecError):
    """SIGINT (Ctrl-C) stopped the command; the message says what had been committed by then."""

    exit_code = 130  # 128 + SIGINT, as a shell reports it


class CorruptArtifact(BatchrecError):
    """A model artifact that cannot be loaded as the model its run recorded."""

    def __init__(self, path, what: str, family: str | None = None):
        self.path, self.what, self.family = path, what, family
        retrain = f"batchrec train {family}" if family else "batchrec train MODEL"
        super().__init__(f"artifact {path} is corrupt ({what}): retrain with {retrain}")


def first_line(exc: BaseException) -> str:
    """The first non-blank line of an exception's message (or its type's name)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


_OS_FAULTS = {  # errno -> (what happened, what to do)
    errno.ENOSPC: ("no space left on device writing", "free space there and rerun"),
    errno.EDQUOT: ("disk quota exceeded writing", "free space there and rerun"),
    errno.EROFS: ("read-only file system writing", "run this command where the warehouse folder is writable"),
    errno.EACCES: ("permission denied on", "give this user access to it"),
    errno.EPERM: ("operation not permitted on", "give this user access to it"),
}
# DuckDB reports the same faults as text inside its IOException
_DUCKDB_FAULTS = {
    "No space left on device": errno.ENOSPC,
    "Disk quota exceeded": errno.EDQUOT,
    "Read-only file system": errno.EROFS,
    "Permission denied": errno.EACCES,
}
_QUOTED_PATH = re.compile(r'"(/[^"]+)"')


def _at(what: str, path: str | None) -> str:
    """'no space left on device writing /x' (or without the path and its verb when unknown)."""
    return f"{what} {path}" if path else what.rsplit(" ", 1)[0]


def as_fault(exc: BaseException) -> BatchrecError | None:
    """The one-line form of an exception the machine caused (disk full, read-only or denied
    file system, a DuckDB I/O error, an interrupt); None for anything else."""
    if isinstance(exc, OSError) and exc.errno in _OS_FAULTS:
        what, todo = _OS_FAULTS[exc.errno]
        return Fault(f"{_at(what, exc.filename)}: {todo} (the warehouse keeps its previous contents)")
    module = type(exc).__module__ or ""
    if module.startswith(("duckdb", "_duckdb")):
        text = str(exc)
        if "interrupted" in text.lower():
            return Interrupted("interrupted")
        for needle, code in _DUCKDB_FAULTS.items():  # IOException, or a failed COMMIT's TransactionException
            if needle in text:
                what, todo = _OS_FAULTS[code]
                path = _QUOTED_PATH.search(text)
                return Fault(
                    f"{_at(what, path and path.group(1))}: {todo} (the warehouse keeps its previous contents)"
                )
        if type(exc).__name__ == "IOException":
            return Fault(f"I/O error: {first_line(exc)}: check the disk and rerun")
    if isinstance(exc, RuntimeError) and str(exc) == "Query interrupted":
        return Interrupted("interrupted")
    return None
