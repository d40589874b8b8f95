"""What every bench shares: the machine it ran on, clean child processes, alternating medians.

A ratio is only meaningful beside the hardware and thread pools that produced it, so each bench
prints `describe()` (CPU model, torch / numba / BLAS thread counts, the BLAS kernel threadpoolctl
reports) next to its ratio, measured in the process that did the work.

Some machines export OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE (e.g. CORETYPE=Haswell on an AVX-512
CPU): OpenBLAS then runs an older kernel, which slows numpy's matmul and every peer that uses
BLAS. Floors and peers must run at the fastest the hardware gives, so every measured child runs
with `clean_env()` (those variables removed), and `reexec_clean()` restarts a bench that does its
measuring in-process (or in forked children) without them. OpenBLAS reads them once, when it
loads, so removing them from `os.environ` later would change nothing.
"""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence

SLOWING = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")  # cleared in every measured process
THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS")
_REEXEC_MARK = "BATCHREC_BENCH_CLEAN"


def clean_env(threads: int | None = None, base: dict | None = None) -> dict[str, str]:
    """The environment for a measured child: `SLOWING` removed; with `threads`, every thread pool
    (OpenBLAS, OpenMP for torch and numba, MKL) sized to it."""
    env = {k: v for k, v in (os.environ if base is None else base).items() if k not in SLOWING}
    if threads:
        env |= {k: str(threads) for k in THREAD_VARS}
    return env


def reexec_clean(threads: int | None = None) -> None:
    """Restart this script with `clean_env(threads)` unless it already runs that way; call first
    thing in `main()` of a bench that measures in its own process or in forked children."""
    want = clean_env(threads)
    if os.environ.get(_REEXEC_MARK) == "1" and not any(k in os.environ for k in SLOWING):
        return
    cleared = [f"{k}={os.environ[k]}" for k in SLOWING if k in os.environ]
    if cleared:
        print(
            f"(restarting without {' '.join(cleared)}: measured processes run OpenBLAS's own kernel choice)",
            flush=True,
        )
    os.execve(sys.executable, [sys.executable, *sys.argv], want | {_REEXEC_MARK: "1"})


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        if names:
            return names[0]
    except OSError:
        pass
    return platform.processor() or platform.machine()


def runtime() -> dict:
    """Thread pools and BLAS of *this* process (call it where the work ran): a JSON-able dict."""
    info: dict = {
        "cpu": cpu_model(),
        "cpus": os.cpu_count(),
        "slowing_env": {k: os.environ[k] for k in SLOWING if k in os.environ},
    }
    if "torch" in sys.modules or _importable("torch"):
        import torch

        info["torch_threads"] = torch.get_num_threads()
    if "numba" in sys.modules or _importable("numba"):
        import numba

        info["numba_threads"] = numba.config.NUMBA_NUM_THREADS
    try:
        import numpy  # noqa: F401  (loads OpenBLAS so threadpoolctl can see it)
        from threadpoolctl import threadpool_info

        pools = threadpool_info()
    except ImportError:
        pools = []
    info["blas"] = [
        {
            "lib": p.get("internal_api"),
            "kernel": p.get("architecture"),
            "threads": p.get("num_threads"),
            "version": p.get("version"),
            "prefix": p.get("prefix"),
        }
        for p in pools
        if p.get("user_api") == "blas"
    ]
    return info


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def describe(info: dict | None = None) -> str:
    """One line: CPU, thread counts and BLAS kernel(s) of `info` (default: this process)."""
    info = runtime() if info is None else info
    blas = (
        ", ".join(f"{b['lib']} {b['version']} {b['kernel']} kernel x{b['threads']}" for b in info["blas"])
        or "none"
    )
    threads = [
        f"{name} {info[key]}"
        for name, key in (("torch", "torch_threads"), ("numba", "numba_threads"))
        if key in info
    ]
    env = " ".join(f"{k}={v}" for k, v in info["slowing_env"].items())
    return (
        f"[{info['cpu']}, {info['cpus']} CPUs; threads: {', '.join(threads)}; BLAS: {blas}"
        f"{'; SET: ' + env if env else ''}]"
    )


def run_child(args: Sequence[str], env: dict | None = None) -> tuple[float, float, float, str]:
    """(wall s, CPU s of the child and its threads, peak RSS GiB, stdout) of one child process,
    run with `env` (default: `clean_env()`); CPU and RSS from its own rusage."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            list(args), stdout=out, stderr=err, text=True, env=clean_env() if env is None else env
        )
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        out.seek(0)
        err.seek(0)
        if os.waitstatus_to_exitcode(status) != 0:
            raise SystemExit(f"child failed: {' '.join(args)}\n{err.read()}")
        sys.stderr.write(err.read())
        return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 2**20, out.read()


def alternate(repeat: int, jobs: dict[str, Callable[[], object]]) -> dict[str, list]:
    """Run every job `repeat` times, interleaved A B, B A, A B ... (so a drift in the machine's
    load falls on both sides alike); each job's results in run order."""
    names = list(jobs)
    got: dict[str, list] = {n: [] for n in names}
    for r in range(repeat):
        for n in names if r % 2 == 0 else names[::-1]:
            got[n].append(jobs[n]())
    return got


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


def load_line() -> str:
    return f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
