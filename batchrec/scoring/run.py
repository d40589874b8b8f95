"""`batchrec score`: read a run's inputs, score every user in blocks, publish atomically (or write
a shard); see docs/scoring.md and the `batchrec.scoring` package docstring."""

from __future__ import annotations

import json
import logging
import re
import time
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq

from batchrec import options
from batchrec.errors import BatchrecError, Gated
from batchrec.gate import DEFAULT_GATE, Gate, GateSettings
from batchrec.models import get_model_class
from batchrec.models.base import Recommender
from batchrec.runs import resolve_run
from batchrec.scoring.inputs import check_fits_snapshot, load_inputs
from batchrec.scoring.pairs import _lookup, read_users, score_pairs
from batchrec.scoring.publishing import (
    check_lists,
    list_sanity,
    publish,
    shard_files,
    shard_of,
    shard_path,
    write_parquet,
)
from batchrec.scoring.sources import recommend
from batchrec.serving import refresh as refresh_serving
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


def _resolve(con, run_id: str | None, model: str | None) -> dict:
    """The run named by --run, else the latest shipped run (fitted on every interaction) of
    --model or of any family: a protocol run is published only when named."""
    return resolve_run(con, run_id, model, shipped=True)


def _load_model(run: dict, device: str) -> Recommender:
    return load_run_model(run, choose_device(device))


def score_run(wh: Warehouse, run: dict, model: Recommender, top_n: int, memory_budget: int,
              users: np.ndarray | None = None, shard: tuple[int, int] | None = None,
              min_history: int = 1, explain: bool = True) -> tuple[pl.DataFrame, dict]:
    """Read the inputs (one short read-only session) and score the chosen users; writes nothing."""
    t0 = time.perf_counter()
    with wh.connect(read_only=True) as con:
        inputs = load_inputs(con, run, min_history)
    check_fits_snapshot(model, run, inputs.n_model_users, len(inputs.item_ids))
    n_known = int(inputs.candidates.sum())
    if top_n > n_known:
        raise BatchrecError(f"--top-n {top_n} is larger than the catalogue: run {run['run_id']} knows {n_known} items")
    log.info("read inputs of run %s (snapshot %s): %d users, %d items in %.2f s", run["run_id"], inputs.snapshot_id,
             len(inputs.user_ids), len(inputs.item_ids), time.perf_counter() - t0)
    rows = np.arange(len(inputs.user_ids))
    info: dict = {}
    if users is not None:
        pos = _lookup(inputs.user_ids, users)
        info["unknown_users"] = int((pos < 0).sum())
        rows = np.sort(pos[pos >= 0])
    if shard is not None:
        rows = rows[shard_of(inputs.user_ids[rows], shard[1]) == shard[0]]
    frame, counts = recommend(model, inputs, rows, top_n, memory_budget, run["run_id"], utcnow(), explain=explain)
    return frame, info | counts | {"users": len(rows)}


def score_and_publish(wh: Warehouse, run: dict, model: Recommender, top_n: int = 10, memory_budget: int = 1 << 30,
                      retention_days: int = 30, users: np.ndarray | None = None, min_history: int = 1,
                      explain: bool = True, gate: GateSettings | None = None) -> dict:
    """Score, then publish: the body of `batchrec score` (the caller holds `wh.lock`). With `gate`
    settings a full publish goes through the publish gate (batchrec.gate); `info["gate"]` is it."""
    started = time.perf_counter()
    frame, info = score_run(wh, run, model, top_n, memory_budget, users=users, min_history=min_history,
                            explain=explain)
    checked = None
    if gate is not None and users is None:
        checked = Gate(gate, run, model.task, list_sanity(frame, info["users"], model.personalised), started)
    else:
        check_lists(frame, run, info["users"], model.personalised)
    t0 = time.perf_counter()
    published, moved, expired = publish(wh, frame, retention_days, scope_users=users, gate=checked)
    log.info("published %d rows in %.2f s", published, time.perf_counter() - t0)
    return info | {"published": published, "moved": moved, "expired": expired, "gate": checked}


def score_command(wh: Warehouse, run_id: str | None = None, model: str | None = None,
                  top_n: int = options.TOP_N.default, shard: str | None = None, publish_run: str | None = None,
                  users_file: str | None = None, pairs: str | None = None, out: str | None = None,
                  memory_budget: str = options.MEMORY_BUDGET.default,
                  retention_days: int = options.RETENTION_DAYS.default, device: str = options.DEVICE.default,
                  min_history: int = 1, gate: GateSettings | None = DEFAULT_GATE) -> str:
    """`batchrec score`: see the module docstring; returns a one-line summary. Full publishes (not
    `--users`) go through the publish `gate` (None: the list sanity checks only)."""
    budget = parse_memory_budget(memory_budget)
    if top_n <= 0:
        raise BatchrecError(f"--top-n must be at least 1 (got {top_n})")
    if retention_days < 0:
        raise BatchrecError(f"--retention-days must be >= 0 (got {retention_days})")
    if pairs is not None:
        if out is None:
            raise BatchrecError("--pairs needs --out FILE for the scored pairs")
        if shard or publish_run or users_file:
            raise BatchrecError("--pairs cannot be combined with --shard, --publish or --users")
        with wh.connect(read_only=True) as con:
            run = _resolve(con, run_id, model)
            return score_pairs(_load_model(run, device), run, con, Path(pairs), Path(out))
    if out is not None:
        raise BatchrecError("--out is only for --pairs")
    if publish_run is not None:
        if shard or users_file:
            raise BatchrecError("--publish cannot be combined with --shard or --users")
        return _publish_shards(wh, publish_run, retention_days, gate)
    shard_spec = parse_shard(shard) if shard is not None else None
    if shard_spec is not None and users_file:
        raise BatchrecError("--shard cannot be combined with --users")
    users = read_users(users_file) if users_file else None
    t0 = time.perf_counter()
    if shard_spec is not None:  # no lock: shards may run anywhere, in parallel, on a read-only warehouse
        with wh.connect(read_only=True) as con:
            run = _resolve(con, run_id, model)
        frame, info = score_run(wh, run, _load_model(run, device), top_n, budget, shard=shard_spec,
                                min_history=min_history)
        i, n = shard_spec
        path = write_parquet(frame, shard_path(wh, run["run_id"], i), {
            "run_id": run["run_id"], "shard": i, "n_shards": n, "top_n": top_n, "users": info["users"]})
        return (f"shard {i}/{n} of run {run['run_id']} ({run['model']}): {info['users']} users, {len(frame)} rows "
                f"-> {path} in {time.perf_counter() - t0:.1f} s; when all {n} are written: "
                f"`batchrec score --publish {run['run_id']}`")
    with wh.lock("score"):
        with wh.connect(read_only=True) as con:
            run = _resolve(con, run_id, model)
        try:
            info = score_and_publish(wh, run, _load_model(run, device), top_n, budget, retention_days, users=users,
                                     min_history=min_history, gate=gate)
        except Gated:
            refresh_serving(wh)  # readers (`batchrec status`) see the refusal in publish_log
            raise
        refresh_serving(wh)
    summary = (f"run {run['run_id']} ({run['model']}) top-{top_n}: {info['users']} users (model {info['model']}, "
               f"genre/tag {info['profile']}, popular {info['popular']}), {info['published']} rows published to "
               f"recommendations; {info['moved']} earlier rows moved to recommendation_history, {info['expired']} "
               f"expired (retention {retention_days} days); {time.perf_counter() - t0:.1f} s")
    if info.get("unknown_users"):
        summary += f"; {info['unknown_users']} listed users are not in the warehouse and were skipped"
    if info["gate"] is not None:
        summary += f"; {info['gate'].summary()}"
    return summary


def _check_shard_lists(files: list[Path], run: dict, gate: GateSettings | None = None) -> Gate | None:
    """`check_lists` over the union of a run's shards (reading every row also finds a damaged page);
    with `gate` settings, the problems go to the returned `Gate` instead."""
    users = sum(json.loads(pq.read_schema(f).metadata[b"batchrec"])["users"] for f in files)
    try:
        frame = pl.read_parquet(files, columns=["user_id", "rank", "item_id", "score"])
    except (OSError, pl.exceptions.PolarsError) as exc:
        raise BatchrecError(f"the shards of run {run['run_id']} cannot be read ({str(exc).splitlines()[0]}): "
                            f"rescore them with `batchrec score --run {run['run_id']} --shard i/N`") from None
    family = get_model_class(run["model"])
    if gate is not None:
        return Gate(gate, run, family.task, list_sanity(frame, users, family.personalised))
    check_lists(frame, run, users, family.personalised)
    return None


def _publish_shards(wh: Warehouse, run_id: str, retention_days: int, gate: GateSettings | None = None) -> str:
    t0 = time.perf_counter()
    with wh.lock("score --publish"):
        with wh.connect(read_only=True) as con:
            run = _resolve(con, run_id, None)
        files = shard_files(wh, run["run_id"])
        checked = _check_shard_lists(files, run, gate)
        try:
            published, moved, expired = publish(wh, files, retention_days, gate=checked)
        except Gated:
            refresh_serving(wh)  # readers (`batchrec status`) see the refusal in publish_log
            raise
        for f in files:
            f.unlink()
        refresh_serving(wh)
    return (f"published {len(files)} shards of run {run['run_id']}: {published} rows in recommendations; {moved} "
            f"earlier rows moved to recommendation_history, {expired} expired (retention {retention_days} days); "
            f"{time.perf_counter() - t0:.1f} s" + (f"; {checked.summary()}" if checked else ""))
