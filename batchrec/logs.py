"""Log lines and progress bars the way terminals and cron each expect them.

* On a terminal: readable lines (time, level, message) and tqdm bars for long loops (scoring
  blocks, training epochs; `progress` is the hook ingest can use for big files). While a bar is
  shown, log lines go through tqdm (`logging_redirect_tqdm`), so they print above the bar
  instead of breaking it.
* Not on a terminal (cron, a pipe): no bars, and `key=value` lines only
  (`ts=... level=info logger=batchrec.score msg="..."`; a message that is already key=value
  pairs is kept as they are), or one JSON object per line with `--log-format json`.

`-v`/`-q`/`--log-format` work before or after the subcommand (`configure`, then `adjust`).
"""

from __future__ import annotations

import json
import logging
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from datetime import UTC, datetime

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

LOG_FORMATS = ("auto", "text", "kv", "json")  # auto: text on a terminal, kv otherwise
DEFAULT_FORMAT = "auto"
_PAIRS = re.compile(r"^[A-Za-z_][\w.]*=\S*( [A-Za-z_][\w.]*=\S*)*$")
_state = {"verbose": 0, "quiet": 0, "format": DEFAULT_FORMAT}
_handler: logging.Handler | None = None


def _timestamp(record: logging.LogRecord) -> str:
    stamp = datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")
    return stamp.replace("+00:00", "Z")


def _fields(record: logging.LogRecord, formatter: logging.Formatter) -> dict[str, str]:
    """Time, level, logger, then the message as its own key=value pairs or as msg=<the text>."""
    message = record.getMessage()
    fields = {"ts": _timestamp(record), "level": record.levelname.lower(), "logger": record.name}
    fields |= (
        dict(pair.split("=", 1) for pair in message.split(" ")) if _PAIRS.match(message) else {"msg": message}
    )
    if record.exc_info:
        fields["exc"] = formatter.formatException(record.exc_info)
    return fields


class KeyValueFormatter(logging.Formatter):
    """`ts=2026-01-01T02:30:00.000Z level=info logger=batchrec.jobs job=nightly step=1:ingest ...`;
    free text is one quoted msg="..." field."""

    def format(self, record: logging.LogRecord) -> str:
        return " ".join(
            f"{k}={json.dumps(v) if k in ('msg', 'exc') else v}" for k, v in _fields(record, self).items()
        )


class JsonFormatter(logging.Formatter):
    """One JSON object per line, for log shippers."""

    def format(self, record: logging.LogRecord) -> str:
        return json.dumps(_fields(record, self))


def _formatter(fmt: str) -> logging.Formatter:
    if fmt == "auto":
        fmt = "text" if sys.stderr.isatty() else "kv"
    if fmt == "json":
        return JsonFormatter()
    if fmt == "kv":
        return KeyValueFormatter()
    return logging.Formatter("%(asctime)s %(levelname)s %(message)s")


def _apply() -> None:
    """Like logging.basicConfig: our one handler on the current stderr, unless the application
    that embeds batchrec (or a test runner) has configured logging itself; then only the level."""
    global _handler
    root = logging.getLogger()
    if _handler in root.handlers:
        root.removeHandler(_handler)
    if not root.handlers:
        _handler = logging.StreamHandler(sys.stderr)
        _handler.setFormatter(_formatter(_state["format"]))
        root.addHandler(_handler)
    root.setLevel(logging.INFO - 10 * _state["verbose"] + 10 * _state["quiet"])


def configure(verbose: int = 0, quiet: int = 0, fmt: str = DEFAULT_FORMAT) -> None:
    """Set up the one stderr handler: level INFO, -10 per -v, +10 per -q; `fmt` one of LOG_FORMATS."""
    _state.update(verbose=verbose, quiet=quiet, format=fmt)
    _apply()


def adjust(verbose: int = 0, quiet: int = 0, fmt: str | None = None) -> None:
    """More -v/-q (given after the subcommand) or another format, on top of `configure`."""
    _state["verbose"] += verbose
    _state["quiet"] += quiet
    if fmt is not None:
        _state["format"] = fmt
    _apply()


def settings() -> dict:
    """The current verbosity and format, to start a worker process logging alike (`configure`)."""
    return dict(_state)


def bars_enabled() -> bool:
    """Bars only on a terminal, and not when asked to be quiet."""
    return sys.stderr.isatty() and logging.getLogger().getEffectiveLevel() <= logging.INFO


@contextmanager
def progress(
    total: int | None, desc: str, unit: str = "it", enabled: bool | None = None, unit_scale: bool = False
) -> Iterator[tqdm]:
    """A tqdm bar on stderr (disabled off a terminal: `update` then costs nothing) with log lines
    redirected above it while it is shown. `enabled=None`: `bars_enabled()`."""
    show = bars_enabled() if enabled is None else enabled
    with logging_redirect_tqdm() if show else nullcontext():
        with tqdm(
            total=total,
            desc=desc,
            unit=unit,
            unit_scale=unit_scale,
            disable=not show,
            leave=False,
            file=sys.stderr,
            dynamic_ncols=True,
        ) as bar:
            yield bar
