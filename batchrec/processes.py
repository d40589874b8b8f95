"""Which process ran a step, and whether it still runs: what job_runs records so that a step
left `running` by a killed process is told apart from one still at work (jobs, status), and
what train checks before removing another process's partial artifact."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any


def pid_exists(pid: int) -> bool:
    """Whether a process with this pid exists on this machine (one we may not signal exists too)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def start_ticks(pid: int) -> str | None:
    """When process `pid` started (clock ticks since boot, field 22 of /proc/<pid>/stat): with the
    pid it names one process, even after the pid is reused. None where there is no such entry."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # the fields after "(command name)" start at field 3


def this_process() -> dict[str, Any]:
    """The job_runs columns that name the running process."""
    return {"pid": os.getpid(), "host": socket.gethostname(), "process_start": start_ticks(os.getpid())}


def process_gone(pid: int | None, host: str | None, process_start: str | None) -> bool:
    """Whether the process that ran a step has certainly ended: it ran on this machine and no
    process with its pid and start time exists now (unknown pid or another machine: False)."""
    if pid is None or host != socket.gethostname():
        return False
    if Path("/proc/self/stat").exists():
        now = start_ticks(pid)
        return now is None or (process_start is not None and now != process_start)
    return not pid_exists(pid)  # no /proc: ask the kernel whether the pid exists at all
