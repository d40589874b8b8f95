"""Faults in a real `batchrec` process, with no test hook in the product.

`fault_env(tmp, code)` writes a `sitecustomize.py` into `tmp` that Python imports at start-up in
the child process (its folder comes first on PYTHONPATH). `code` patches the real functions there
with the helpers below, e.g. `run.publish = pause_before(run.publish)` in `batchrec.scoring.run`. A pause writes the file
`PAUSED` (so the test knows the process got there) and then waits for the file `GO` (or forever,
until the test kills it with SIGKILL).

    pause_before(f)   pauses before f runs (e.g. before the scorer's publish: the file is closed)
    pause_after(f)    pauses after f returned (e.g. after an artifact was written, before its row)
    pause_in(cm)      for a context-manager factory such as `transaction`: pauses at the end of
                      the `with` body, i.e. inside the transaction with all its work done, before
                      COMMIT
    mark_after(f, name) writes the time f returned to the file `name` in `tmp` and goes on
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BATCHREC = Path(sys.executable).parent / "batchrec"  # the installed console script

_PRELUDE = """
import functools, os, time
from contextlib import contextmanager

_DIR = {folder!r}


def _pause():
    open(os.path.join(_DIR, "PAUSED"), "w").close()
    while not os.path.exists(os.path.join(_DIR, "GO")):
        time.sleep(0.05)


def pause_before(f):
    @functools.wraps(f)
    def wrapped(*args, **kwargs):
        _pause()
        return f(*args, **kwargs)
    return wrapped


def pause_after(f):
    @functools.wraps(f)
    def wrapped(*args, **kwargs):
        out = f(*args, **kwargs)
        _pause()
        return out
    return wrapped


def pause_in(cm):
    @contextmanager
    def wrapped(*args, **kwargs):
        with cm(*args, **kwargs) as value:
            yield value
            _pause()
    return wrapped


def mark_after(f, name):
    @functools.wraps(f)
    def wrapped(*args, **kwargs):
        out = f(*args, **kwargs)
        with open(os.path.join(_DIR, name), "w") as fh:
            fh.write(repr(time.time()))
        return out
    return wrapped

"""


def fault_env(folder: Path, code: str) -> dict[str, str]:
    """The environment of a child process whose start-up runs `code` (see the module docstring)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(_PRELUDE.format(folder=str(folder)) + textwrap.dedent(code))
    path = os.pathsep.join([str(folder), str(ROOT), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path.rstrip(os.pathsep)}


def start_batchrec(args: list[str], env: dict | None = None, cwd: Path | None = None) -> subprocess.Popen:
    """`batchrec ARGS` as a real child process; stdout and stderr are kept for the checks."""
    return subprocess.Popen(
        [str(BATCHREC), *args], env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def wait_until_paused(proc: subprocess.Popen, folder: Path, timeout: float = 300) -> None:
    """Until the child writes PAUSED; a child that exits first fails the test with its output."""
    deadline = time.monotonic() + timeout
    while not (folder / "PAUSED").exists():
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"batchrec exited with {proc.returncode} before its pause:\n{out}\n{err}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"batchrec did not reach its pause in {timeout} s")
        time.sleep(0.05)


def go(folder: Path) -> None:
    """Let a paused child go on."""
    (folder / "GO").touch()
