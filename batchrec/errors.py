"""The one exception type users see.

Anything raised as `BatchrecError` is printed by the CLI as a single line (`error: ...`) with a
non-zero exit; its message must name the file/line/parameter at fault and what was expected.
"""


class BatchrecError(Exception):
    """A user-facing failure: bad input, bad parameters, a busy or missing warehouse."""

    exit_code = 1


class WarehouseBusy(BatchrecError):
    """Another batchrec process holds the warehouse for writing."""

    exit_code = 75  # EX_TEMPFAIL: cron wrappers may retry later
