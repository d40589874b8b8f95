"""Where independent tasks run: in this process one after another (`local`), or as Ray tasks on a
Ray cluster (`ray`: the optional extra `pip install 'batchrec[ray]'`).

Scoring shards and measuring evaluation runs are independent tasks that read the warehouse
(read-only) and return a small result; the caller publishes once when every task is in. An
executor only maps a module-level function over argument tuples and yields each result as it
arrives, so the steps never know where they ran:

    with open_executor("ray", address="10.0.0.5:6379", cpus=2) as ex:
        for index, result in ex.map(score_shard, calls, labels):
            ...

Ray tasks get `cpus` CPUs (and `gpus` GPUs) each, run with every thread pool (torch, BLAS,
OpenMP) limited to their CPUs so N tasks on one node do not oversubscribe it, and are retried by
Ray itself when their worker dies (killed, out of memory, a lost node) up to `retries` times
(a transient object-store error is retried below that, by the S3 client's own retry policy). Any
other failure cancels the remaining tasks and ends in one line naming the task: retrying bad
input or a corrupt artifact would only fail again.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from batchrec.errors import BatchrecError, first_line
from batchrec.options import EXECUTORS

log = logging.getLogger("batchrec.executors")

RAY_EXTRA = "pip install 'batchrec[ray]'"
TASK_RETRIES = 3  # Ray's own retries of a task whose worker died


def _import_ray():
    """Ray, or one line naming the extra that installs it."""
    try:
        import ray
    except ImportError:
        raise BatchrecError(
            f"--executor ray needs Ray, which is not installed (expected the extra: {RAY_EXTRA})"
        ) from None
    return ray


def run_limited(fn: Callable, threads: int, args: tuple, kwargs: dict) -> Any:
    """`fn(*args, **kwargs)` with torch's and the BLAS/OpenMP pools limited to `threads` (a Ray
    worker is reused across tasks, so the limit is set per task, not per process)."""
    torch.set_num_threads(max(1, threads))
    try:
        from threadpoolctl import threadpool_limits  # part of the ray extra
    except ImportError:
        return fn(*args, **kwargs)
    with threadpool_limits(limits=max(1, threads)):
        return fn(*args, **kwargs)


class LocalExecutor:
    """Tasks in this process, one after another, in order."""

    name = "local"

    def map(
        self, fn: Callable, calls: Sequence[tuple[tuple, dict]], labels: Sequence[str]
    ) -> Iterator[tuple[int, Any]]:
        for index, (args, kwargs) in enumerate(calls):
            yield index, fn(*args, **kwargs)


class RayExecutor:
    """Tasks on a Ray cluster: the one at `address` ('auto': the cluster this machine belongs to;
    None: $RAY_ADDRESS, else a local cluster started for this command and stopped after it), or
    the one this process is already connected to."""

    name = "ray"

    def __init__(
        self, address: str | None = None, cpus: float = 1, gpus: float = 0, retries: int = TASK_RETRIES
    ):
        self.ray = _import_ray()
        self.cpus, self.gpus, self.retries = cpus, gpus, retries
        self._started = False
        if not self.ray.is_initialized():
            t0 = time.perf_counter()
            try:
                self.ray.init(
                    address=address, include_dashboard=False, log_to_driver=False, configure_logging=False
                )
            except (ConnectionError, RuntimeError, ValueError) as exc:
                raise BatchrecError(
                    f"cannot connect to the Ray cluster at {address or os.environ.get('RAY_ADDRESS') or 'a new local one'}: "
                    f"{first_line(exc)} (expected --ray-address HOST:PORT of a running cluster)"
                ) from None
            self._started = True
            log.info(
                "connected to Ray (%s) in %.1f s: %s CPUs",
                address or "local",
                time.perf_counter() - t0,
                self.ray.cluster_resources().get("CPU", 0),
            )
        self._task = self.ray.remote(run_limited)

    def close(self) -> None:
        if self._started:
            self.ray.shutdown()

    def map(
        self, fn: Callable, calls: Sequence[tuple[tuple, dict]], labels: Sequence[str]
    ) -> Iterator[tuple[int, Any]]:
        ray = self.ray
        threads = max(1, int(self.cpus))
        pending = {}
        for index, ((args, kwargs), label) in enumerate(zip(calls, labels)):
            ref = self._task.options(
                num_cpus=self.cpus,
                num_gpus=self.gpus,
                max_retries=self.retries,
                retry_exceptions=False,
                name=label,
            ).remote(fn, threads, args, kwargs)
            pending[ref] = index
        try:
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                index = pending.pop(done[0])
                try:
                    result = ray.get(done[0])
                except ray.exceptions.RayTaskError as exc:
                    cause = exc.cause if isinstance(exc.cause, BaseException) else exc
                    if isinstance(cause, BatchrecError):  # its line, named, with its exit code
                        error = BatchrecError(f"{labels[index]}: {first_line(cause)}")
                        error.exit_code = cause.exit_code
                        raise error from None
                    raise BatchrecError(
                        f"{labels[index]} failed on Ray: {type(cause).__name__}: {first_line(cause)}"
                    ) from None
                except (
                    ray.exceptions.WorkerCrashedError,
                    ray.exceptions.NodeDiedError,
                    ray.exceptions.OutOfMemoryError,
                ) as exc:
                    raise BatchrecError(
                        f"{labels[index]}: its Ray worker died {self.retries + 1} times "
                        f"({type(exc).__name__}: killed or out of memory?)"
                    ) from None
                yield index, result
        finally:
            for ref in pending:  # a failure (or an interrupt) leaves nothing running for nobody
                ray.cancel(ref, force=True)


def check_executor(name: str) -> None:
    """Fail at once (one line) on an unknown executor, or on `ray` where Ray is not installed:
    before any work, not after it."""
    if name not in EXECUTORS:
        raise BatchrecError(f"--executor {name!r} is not known (expected one of {', '.join(EXECUTORS)})")
    if name == "ray":
        _import_ray()


@contextmanager
def open_executor(
    name: str = "local", address: str | None = None, cpus: float = 1, gpus: float = 0
) -> Iterator[LocalExecutor | RayExecutor]:
    """The executor called `name` (EXECUTORS), closed (a local Ray cluster it started: stopped) after."""
    check_executor(name)
    if name == "local":
        if address is not None:
            raise BatchrecError("--ray-address needs --executor ray")
        yield LocalExecutor()
        return
    executor = RayExecutor(address, cpus, gpus)
    try:
        yield executor
    finally:
        executor.close()
