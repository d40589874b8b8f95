"""Data-parallel training over several processes (torch DistributedDataParallel).

One process per rank, each with a full replica of the model; every rank trains on its own share
of the users, DDP averages the gradients after each backward pass, so every optimiser step is
the same on every rank. The processes come either from a launcher (torchrun, or any launcher
that sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT, on one or several
machines), or from `launch_local`, which starts N on this machine with those same variables.

What keeps the ranks in step: every rank runs the same number of optimiser steps per epoch
(`epoch_batches`), the epoch's loss and the validation metric are combined over the ranks in
rank order (`sum_over_ranks`, `mean_of_parts`), so every rank takes the same early-stopping
decision, and rank 0 alone reads the warehouse and hands the data to the others (`share`).
Backends: gloo on CPU, nccl on CUDA (one GPU per local rank).
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
import torch.distributed as dist

from batchrec.errors import BatchrecError, as_fault

log = logging.getLogger("batchrec.distributed")

T = TypeVar("T")

# A collective that waits longer than this means a peer is gone (killed, out of memory): fail
# instead of hanging until torch's default of 30 minutes.
COLLECTIVE_TIMEOUT = timedelta(minutes=10)
_REQUIRED_ENV = ("MASTER_ADDR", "MASTER_PORT")
_POLL_SECONDS = 0.2


@dataclass(frozen=True)
class Group:
    """This process's place in a training group."""

    rank: int
    world: int
    local_rank: int
    local_world: int
    backend: str
    device: torch.device

    @property
    def leader(self) -> bool:
        """Rank 0: the one that reads the warehouse, logs the epochs and records the run."""
        return self.rank == 0


_current: Group | None = None
_validation_split: Group | None = None


def current() -> Group | None:
    """The group this process trains in, None when it trains alone."""
    return _current


def _int_env(name: str, default: int | None = None) -> int:
    text = os.environ.get(name)
    if text is None:
        if default is None:
            raise BatchrecError(
                f"launched for distributed training but ${name} is not set "
                f"(expected RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT, as torchrun sets them)"
            )
        return default
    try:
        return int(text)
    except ValueError:
        raise BatchrecError(f"${name}={text!r} is not a whole number (expected what torchrun sets)") from None


def launched() -> bool:
    """True when a launcher started this process as one rank of a group (RANK and WORLD_SIZE set)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def _env_layout() -> tuple[int, int, int, int]:
    """(rank, world, local rank, local world) from the launcher's environment, checked."""
    rank, world = _int_env("RANK"), _int_env("WORLD_SIZE")
    local_rank = _int_env("LOCAL_RANK", rank)
    local_world = _int_env("LOCAL_WORLD_SIZE", world)
    missing = [name for name in _REQUIRED_ENV if not os.environ.get(name)]
    if missing:
        raise BatchrecError(
            f"launched as rank {rank} of {world} but {', '.join('$' + m for m in missing)} "
            "not set (expected the rendezvous address torchrun sets)"
        )
    if not (world >= 1 and 0 <= rank < world and 0 <= local_rank < local_world):
        raise BatchrecError(
            f"RANK={rank} WORLD_SIZE={world} LOCAL_RANK={local_rank} LOCAL_WORLD_SIZE={local_world} "
            "is not a valid layout (expected 0 <= RANK < WORLD_SIZE)"
        )
    return rank, world, local_rank, local_world


@contextmanager
def process_group(device: torch.device) -> Iterator[Group]:
    """Join the group the environment describes (gloo on CPU, nccl on CUDA: local rank k uses
    GPU k) for the duration of the block; `current()` answers it meanwhile."""
    global _current
    rank, world, local_rank, local_world = _env_layout()
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise BatchrecError(
                f"rank {rank}: local rank {local_rank} needs GPU {local_rank} but this machine has "
                f"{torch.cuda.device_count()} (expected one process per GPU, or --device cpu)"
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        backend = "gloo"
    try:
        dist.init_process_group(
            backend, init_method="env://", rank=rank, world_size=world, timeout=COLLECTIVE_TIMEOUT
        )
    except (RuntimeError, ValueError) as exc:
        raise BatchrecError(
            f"rank {rank} of {world} could not join the group at {os.environ.get('MASTER_ADDR')}:"
            f"{os.environ.get('MASTER_PORT')} ({str(exc).splitlines()[0] if str(exc) else exc!r})"
        ) from None
    _current = Group(rank, world, local_rank, local_world, backend, device)
    try:
        yield _current
    finally:
        _current = None
        dist.destroy_process_group()


def rank_seed(seed: int, group: Group | None) -> int:
    """The seed of this rank's random streams (batch order, dropout, sampling): the run's seed on
    rank 0, so one process and rank 0 of many draw alike; derived from it on the others."""
    if group is None or group.rank == 0:
        return seed
    return int(np.random.SeedSequence(seed, spawn_key=(group.rank,)).generate_state(1)[0])


# -- sharding and the collectives the trainer needs ----------------------------------------------
def user_shard(users: torch.Tensor, group: Group) -> torch.Tensor:
    """Mask of the rows (by their user column) this rank trains on: every user's rows on one
    rank; users dealt heaviest first in snake order (0, 1, ..., n-1, n-1, ..., 0), which keeps the
    ranks' row counts within about one heavy user of each other."""
    counts = torch.bincount(users)
    order = torch.argsort(counts, descending=True, stable=True)
    position = torch.arange(len(order), device=users.device)
    lap, seat = position // group.world, position % group.world
    owner = torch.where(lap % 2 == 0, seat, group.world - 1 - seat)
    rank_of_user = torch.empty_like(order)
    rank_of_user[order] = owner
    return rank_of_user[users] == group.rank


def gather(values: list[float], group: Group) -> np.ndarray:
    """[world x len(values)] float64: every rank's values, in rank order, on every rank."""
    mine = torch.tensor(values, dtype=torch.float64, device=group.device)
    parts = [torch.empty_like(mine) for _ in range(group.world)]
    dist.all_gather(parts, mine)
    return torch.stack(parts).cpu().numpy()


def sum_over_ranks(values: list[float], group: Group) -> list[float]:
    """Each value summed over the ranks in rank order: bit-identical on every rank."""
    table = gather(values, group)
    return [float(sum(table[r, j] for r in range(group.world))) for j in range(len(values))]


def epoch_batches(n_rows: int, batch_size: int, group: Group) -> int:
    """Optimiser steps this epoch, the same on every rank: the global rows over `batch_size`
    (the global batch stays `batch_size`, as with one process), at most the smallest rank's rows."""
    sizes = gather([float(n_rows)], group)[:, 0].astype(np.int64)
    if sizes.min() == 0:
        raise BatchrecError(
            f"{group.world} training processes but rank {int(sizes.argmin())} got no training rows "
            f"(rows per rank: {', '.join(map(str, sizes))}): use fewer processes"
        )
    return int(max(1, min(math.ceil(sizes.sum() / batch_size), sizes.min())))


@contextmanager
def split_validation(group: Group | None) -> Iterator[None]:
    """Within the block, validators measure their part of the users (`my_part`) and combine
    the parts (`mean_of_parts`): every rank must call the validator."""
    global _validation_split
    _validation_split = group
    try:
        yield
    finally:
        _validation_split = None


def my_part(rows):
    """This rank's share (every world-th row) of what a validator measures, or all of it
    outside `split_validation`. Works on numpy arrays and tensors."""
    g = _validation_split
    return rows if g is None else rows[g.rank :: g.world]


def mean_of_parts(mean: float, count: int) -> float:
    """The mean over all ranks' parts from this rank's part mean and size (identical on every
    rank); `mean` unchanged outside `split_validation`."""
    g = _validation_split
    if g is None:
        return mean
    weighted, total = sum_over_ranks([mean * count if count else 0.0, float(count)], g)
    return weighted / total if total else float("nan")


def share(read: Callable[[], T], group: Group) -> T:
    """Rank 0 calls `read()` (e.g. reads the warehouse) and every rank gets its result, so
    only rank 0 opens the warehouse and the other ranks need no access to it. If it fails on rank
    0, every rank raises that error."""
    payload: list = [None]
    if group.leader:
        try:
            payload = [("ok", read())]
        except BaseException as exc:
            error = exc if isinstance(exc, BatchrecError) else as_fault(exc)
            dist.broadcast_object_list([("error", f"rank 0 failed: {error or type(exc).__name__}")], src=0)
            raise
    dist.broadcast_object_list(payload, src=0)
    kind, value = payload[0]
    if kind == "error":
        raise BatchrecError(value)
    return value


# -- starting N ranks on this machine ------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RankFailed(BatchrecError):
    """A rank started by `launch_local` failed; carries that rank's exit code."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


def launch_local(nproc: int, entry: str, spec: dict, extra_env: dict[str, str] | None = None) -> dict:
    """Start `nproc` ranks on this machine, as torchrun would (RANK, WORLD_SIZE, LOCAL_RANK,
    LOCAL_WORLD_SIZE, MASTER_ADDR=127.0.0.1, a free MASTER_PORT; OMP_NUM_THREADS = cores / nproc
    unless set), each running `entry` ("module:function", called with the path of `spec` as JSON
    and the path where it writes its result as JSON). Waits for all; when one fails, the others
    are stopped. Returns rank 0's result; a failure is one error: the failed rank's own message
    and exit code, or how it died."""
    module, _, function = entry.partition(":")
    threads = str(max(1, (os.cpu_count() or 1) // nproc))
    port = str(_free_port())
    with tempfile.TemporaryDirectory(prefix="batchrec-ranks-") as tmp:
        spec_path = Path(tmp) / "spec.json"
        spec_path.write_text(json.dumps(spec))
        results = [Path(tmp) / f"rank{r}.json" for r in range(nproc)]
        code = f"from {module} import {function}; {function}({str(spec_path)!r}, {{result!r}})"
        procs = []
        try:
            for r in range(nproc):
                env = (
                    os.environ
                    | (extra_env or {})
                    | {
                        "RANK": str(r),
                        "WORLD_SIZE": str(nproc),
                        "LOCAL_RANK": str(r),
                        "LOCAL_WORLD_SIZE": str(nproc),
                        "MASTER_ADDR": "127.0.0.1",
                        "MASTER_PORT": port,
                    }
                )
                env.setdefault("OMP_NUM_THREADS", threads)
                # torch's C++ warnings (DDP's note that a step left no parameter unused: expected
                # for the families that never freeze part of the network) off unless asked for
                env.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
                procs.append(
                    subprocess.Popen([sys.executable, "-c", code.format(result=str(results[r]))], env=env)
                )
            failed = _wait(procs)
        except BaseException:
            _stop(procs)
            raise
        outcome = [json.loads(p.read_text()) if p.exists() else None for p in results]
        if failed is None:
            return outcome[0] or {}
        rank, returncode = failed
        # rank 0's own words, when it has some, unless the first failure was a rank killed by a
        # signal: then rank 0's error is only the lost connection to it, the death is the cause
        if outcome[0] and "error" in outcome[0] and returncode >= 0:
            rank = 0
        mine = outcome[rank]
        if mine and "error" in mine:
            prefix = "" if rank == 0 else f"training rank {rank} of {nproc}: "
            raise RankFailed(prefix + mine["error"], mine.get("exit_code", 1))
        how = f"killed by signal {-returncode}" if returncode < 0 else f"exit code {returncode}"
        raise RankFailed(
            f"training rank {rank} of {nproc} died ({how}; out of memory?): the other ranks were "
            "stopped and no run was recorded"
        )


def _wait(procs: list[subprocess.Popen]) -> tuple[int, int] | None:
    """Wait until every process has exited 0 (None), or the first one fails: (its rank, its
    return code), the others stopped."""
    while True:
        codes = [p.poll() for p in procs]
        bad = next(((r, c) for r, c in enumerate(codes) if c not in (None, 0)), None)
        if bad is not None:
            _stop(procs)
            return bad
        if all(c == 0 for c in codes):
            return None
        time.sleep(_POLL_SECONDS)


def _stop(procs: list[subprocess.Popen]) -> None:
    """Terminate the ranks still running (they were started by us), then reap them."""
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
