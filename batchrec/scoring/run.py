"""The scorer's core: read a run's inputs, score the chosen users in blocks (`score_run`), and
the body of a single-machine `batchrec score` (`score_and_publish`); see docs/scoring.md and
the `batchrec.scoring` package docstring."""

from __future__ import annotations

import logging
import re
import time

import numpy as np
import polars as pl

from batchrec.errors import BatchrecError
from batchrec.gate import Gate, GateSettings
from batchrec.models.base import Recommender
from batchrec.runs import resolve_run
from batchrec.scoring.inputs import check_fits_snapshot, load_inputs
from batchrec.scoring.pairs import _lookup
from batchrec.scoring.publishing import check_lists, list_sanity, publish, shard_of
from batchrec.scoring.sources import recommend
from batchrec.train import load_run_model
from batchrec.training import choose_device
from batchrec.warehouse import Warehouse, utcnow

log = logging.getLogger("batchrec.score")

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)B?\s*$", re.I)
_SHARD = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")


def parse_memory_budget(text: str) -> int:
    """'512MB', '2GB', '1.5G', '100000' -> bytes."""
    m = _SIZE.match(str(text))
    if not m:
        raise BatchrecError(f"--memory-budget {text!r} is not a size like 512MB or 2GB")
    value = float(m.group(1)) * 1024 ** " KMGT".index(m.group(2).upper() or " ")
    if value < 1024 * 1024:
        raise BatchrecError(f"--memory-budget {text!r} is too small (at least 1MB)")
    return int(value)


def parse_shard(text: str) -> tuple[int, int]:
    """'2/8' -> (2, 8)."""
    m = _SHARD.match(str(text))
    if not m or not int(m.group(1)) < int(m.group(2)):
        raise BatchrecError(f"--shard expects i/N with 0 <= i < N (got {text!r})")
    return int(m.group(1)), int(m.group(2))


def resolve_shipped(con, run_id: str | None, model: str | None) -> dict:
    """The run named by --run, else the latest shipped run (fitted on every interaction) of
    --model or of any family: a protocol run is published only when named."""
    return resolve_run(con, run_id, model, shipped=True)


def load_model(run: dict, device: str) -> Recommender:
    """The fitted model of a run row, on `device` ('auto', 'cpu', 'cuda')."""
    return load_run_model(run, choose_device(device))


def score_run(
    wh: Warehouse,
    run: dict,
    model: Recommender,
    top_n: int,
    memory_budget: int,
    users: np.ndarray | None = None,
    shard: tuple[int, int] | None = None,
    min_history: int = 1,
    explain: bool = True,
) -> tuple[pl.DataFrame, dict]:
    """Read the inputs (one short read-only session) and score the chosen users; writes nothing."""
    t0 = time.perf_counter()
    with wh.connect(read_only=True) as con:
        inputs = load_inputs(con, run, min_history)
    check_fits_snapshot(model, run, inputs.n_model_users, len(inputs.item_ids))
    n_known = int(inputs.candidates.sum())
    if top_n > n_known:
        raise BatchrecError(
            f"--top-n {top_n} is larger than the catalogue: run {run['run_id']} knows {n_known} items"
        )
    log.info(
        "read inputs of run %s (snapshot %s): %d users, %d items in %.2f s",
        run["run_id"],
        inputs.snapshot_id,
        len(inputs.user_ids),
        len(inputs.item_ids),
        time.perf_counter() - t0,
    )
    rows = np.arange(len(inputs.user_ids))
    info: dict = {}
    if users is not None:
        pos = _lookup(inputs.user_ids, users)
        info["unknown_users"] = int((pos < 0).sum())
        rows = np.sort(pos[pos >= 0])
    if shard is not None:
        rows = rows[shard_of(inputs.user_ids[rows], shard[1]) == shard[0]]
    frame, counts = recommend(
        model, inputs, rows, top_n, memory_budget, run["run_id"], utcnow(), explain=explain
    )
    return frame, info | counts | {"users": len(rows)}


def score_and_publish(
    wh: Warehouse,
    run: dict,
    model: Recommender,
    top_n: int = 10,
    memory_budget: int = 1 << 30,
    retention_days: int = 30,
    users: np.ndarray | None = None,
    min_history: int = 1,
    explain: bool = True,
    gate: GateSettings | None = None,
) -> dict:
    """Score, then publish: the body of `batchrec score` (the caller holds `wh.lock`). With `gate`
    settings a full publish goes through the publish gate (batchrec.gate); `info["gate"]` is it."""
    started = time.perf_counter()
    frame, info = score_run(
        wh, run, model, top_n, memory_budget, users=users, min_history=min_history, explain=explain
    )
    checked = None
    if gate is not None and users is None:
        checked = Gate(gate, run, model.task, list_sanity(frame, info["users"], model.personalised), started)
    else:
        check_lists(frame, run, info["users"], model.personalised)
    t0 = time.perf_counter()
    published, moved, expired = publish(wh, frame, retention_days, scope_users=users, gate=checked)
    log.info("published %d rows in %.2f s", published, time.perf_counter() - t0)
    return info | {"published": published, "moved": moved, "expired": expired, "gate": checked}
