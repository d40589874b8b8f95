"""Sharded scoring, the public API: score one shard anywhere (`score_shard`), publish a run's
complete set of shards in one transaction (`publish_shards`), or both on an executor
(`score_sharded`: every shard as a task, in this process or on Ray, then one publish).

A shard is the users whose raw id hashes to `i` of `n` (`publishing.shard_of`: the same on every
machine), scored exactly as a full run scores them, so the union of the n shards is the full
run's rows. Shard files go under a root location (a local path, `file://` or `s3://` URI, see
`batchrec.storage`; default `<warehouse stem>.shards/` beside the warehouse) as
`<root>/run_id=<RUN>/shard=<i>.parquet`, each written whole or not at all, with the run, i/n,
top-n and user count in its Parquet metadata. A task that scores a shard opens the warehouse
read-only and takes no lock, so any number run at once on any machine that can read the DuckDB
file and the run's artifact.

    from batchrec.scoring.shards import publish_shards, score_shard

    for i in range(4):  # anywhere: Kubernetes pods, Slurm array tasks, Ray tasks, threads
        score_shard("/shared/wh/batchrec.duckdb", "mf-2026...", shard=(i, 4), out="s3://bucket/shards")
    publish_shards("/shared/wh/batchrec.duckdb", "mf-2026...", shards="s3://bucket/shards")
"""

from __future__ import annotations

import json
import logging
import os
import re
import resource
import time
from dataclasses import dataclass

import polars as pl
import pyarrow as pa

from batchrec import options, storage
from batchrec.errors import BatchrecError, Gated
from batchrec.gate import DEFAULT_GATE, Gate, GateSettings
from batchrec.logs import progress
from batchrec.models import get_model_class
from batchrec.scoring.publishing import check_lists, list_sanity, publish
from batchrec.scoring.run import load_model, parse_memory_budget, resolve_shipped, score_run
from batchrec.serving import refresh as refresh_serving
from batchrec.storage import Location
from batchrec.warehouse import Warehouse

log = logging.getLogger("batchrec.score")

# The columns of a shard file, as a `recommend` frame writes them
SHARD_SCHEMA = {
    "user_id": pl.Int64,
    "rank": pl.Int32,
    "item_id": pl.Int64,
    "score": pl.Float32,
    "run_id": pl.String,
    "scored_at": pl.Datetime("us"),
    "reason": pl.String,
}
_META_KEYS = {"run_id", "shard", "n_shards", "top_n", "users"}


@dataclass(frozen=True)
class ShardResult:
    """What `score_shard` did: which shard of which run, how many users and rows, where it went
    (`uri`; None with `write=False`, then `table` holds the rows), and the task's cost."""

    run_id: str
    model: str
    shard: int
    n_shards: int
    users: int
    rows: int
    seconds: float
    peak_rss_mb: float  # of the process that scored it (a reused worker: its peak so far)
    uri: str | None = None
    table: pa.Table | None = None

    def summary(self) -> str:
        where = f"-> {self.uri}" if self.uri else "(not written)"
        return (
            f"shard {self.shard}/{self.n_shards} of run {self.run_id} ({self.model}): {self.users} users, "
            f"{self.rows} rows {where} in {self.seconds:.1f} s"
        )


@dataclass(frozen=True)
class PublishResult:
    """What `publish_shards` published."""

    run_id: str
    shards: int
    published: int
    moved: int
    expired: int
    retention_days: int
    seconds: float
    gate: Gate | None = None

    def summary(self) -> str:
        return (
            f"published {self.shards} shards of run {self.run_id}: {self.published} rows in recommendations; "
            f"{self.moved} earlier rows moved to recommendation_history, {self.expired} expired (retention "
            f"{self.retention_days} days); {self.seconds:.1f} s"
            + (f"; {self.gate.summary()}" if self.gate else "")
        )


def as_warehouse(warehouse: Warehouse | str | os.PathLike) -> Warehouse:
    return warehouse if isinstance(warehouse, Warehouse) else Warehouse(warehouse)


def shards_root(wh: Warehouse, shards: str | os.PathLike | Location | None = None) -> Location:
    """Where a warehouse's shard files go: `shards` (path or URI), else `<stem>.shards/` beside it."""
    return storage.location(shards if shards is not None else wh.shards_dir)


def shard_location(root: Location, run_id: str, shard: int) -> Location:
    return root / f"run_id={run_id}" / f"shard={shard}.parquet"


def _check_shard(shard: tuple[int, int]) -> tuple[int, int]:
    try:
        i, n = (int(x) for x in shard)
    except (TypeError, ValueError):
        raise BatchrecError(f"shard {shard!r} is not valid (expected (i, n) with 0 <= i < n)") from None
    if not 0 <= i < n:
        raise BatchrecError(f"shard {i}/{n} is not valid (expected i/N with 0 <= i < N)")
    return i, n


def score_shard(
    warehouse: Warehouse | str | os.PathLike,
    run: str | None = None,
    shard: tuple[int, int] = (0, 1),
    out: str | os.PathLike | Location | None = None,
    *,
    model: str | None = None,
    top_n: int = options.TOP_N.default,
    memory_budget: str = options.MEMORY_BUDGET.default,
    device: str = options.DEVICE.default,
    min_history: int = 1,
    write: bool = True,
) -> ShardResult:
    """Score shard `shard` = (i, n) of run `run` (an id; None or 'latest': the latest shipped run
    of `model`, or of any family) and write it under `out` (a path or URI; default the
    warehouse's shards folder). Opens the warehouse read-only and takes no lock. With
    `write=False` nothing is written and the result carries the rows as an Arrow table."""
    t0 = time.perf_counter()
    wh = as_warehouse(warehouse)
    i, n = _check_shard(shard)
    if top_n <= 0:
        raise BatchrecError(f"--top-n must be at least 1 (got {top_n})")
    budget = parse_memory_budget(memory_budget)
    with wh.connect(read_only=True) as con:
        run_row = resolve_shipped(con, run, model)
    frame, info = score_run(
        wh, run_row, load_model(run_row, device), top_n, budget, shard=(i, n), min_history=min_history
    )
    table = frame.to_arrow()
    meta = {"run_id": run_row["run_id"], "shard": i, "n_shards": n, "top_n": top_n, "users": info["users"]}
    table = table.replace_schema_metadata(
        {**(table.schema.metadata or {}), b"batchrec": json.dumps(meta).encode()}
    )
    uri = None
    if write:
        uri = storage.write_table(table, shard_location(shards_root(wh, out), run_row["run_id"], i)).uri
        table = None
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux
    return ShardResult(
        run_row["run_id"],
        run_row["model"],
        i,
        n,
        info["users"],
        len(frame),
        time.perf_counter() - t0,
        rss,
        uri,
        table,
    )


def _shard_metadata(loc: Location, run_id: str) -> dict:
    """A shard's batchrec metadata, after checking that the file is a whole shard of the
    `recommendations` layout; a one-line error naming the file and how to rewrite it."""

    def corrupt(what: str) -> BatchrecError:
        shard = re.search(r"shard=(\d+)", loc.name)
        return BatchrecError(
            f"shard {loc.uri} is corrupt ({what}): rescore it with `batchrec score --run {run_id} "
            f"--shard {shard.group(1) if shard else 'i'}/N` and publish again"
        )

    try:
        schema = storage.read_schema(loc)
        columns = dict(pl.from_arrow(schema.empty_table()).schema)
    except (OSError, ValueError, pl.exceptions.PolarsError) as exc:  # pyarrow's ArrowInvalid is a ValueError
        raise corrupt(f"not a readable Parquet file: {str(exc).splitlines()[0]}") from None
    wrong = [
        f"column {name} is {columns[name]} (expected {kind})" if name in columns else f"no column {name}"
        for name, kind in SHARD_SCHEMA.items()
        if columns.get(name) != kind
    ]
    wrong += [f"unexpected column {name}" for name in columns if name not in SHARD_SCHEMA]
    if wrong:
        raise corrupt("; ".join(wrong))
    try:
        meta = json.loads((schema.metadata or {})[b"batchrec"])
        if not set(meta) >= _META_KEYS:
            raise KeyError("n_shards")
    except (KeyError, TypeError, ValueError):
        raise corrupt("its batchrec metadata (run, shard i/N, top-n) is missing") from None
    return meta


def find_shards(root: Location, run_id: str) -> tuple[list[Location], list[dict]]:
    """The complete set of a run's shard files under `root`, with their metadata; a one-line
    error when any is missing or they come from different shardings."""
    folder = root / f"run_id={run_id}"
    found = storage.files(folder, "shard=", ".parquet")
    if not found:
        raise BatchrecError(
            f"no shards of run {run_id} in {folder}: run `batchrec score --run {run_id} --shard i/N` first"
        )
    meta = [_shard_metadata(f, run_id) for f in found]
    n_shards = {m["n_shards"] for m in meta}
    top_n = {m["top_n"] for m in meta}
    if len(n_shards) > 1 or len(top_n) > 1 or {m["run_id"] for m in meta} != {run_id}:
        raise BatchrecError(
            f"shards in {folder} mix different settings (N {sorted(n_shards)}, top-n {sorted(top_n)}); "
            f"delete the folder and rescore"
        )
    n = n_shards.pop()
    by_shard = {m["shard"]: (f, m) for f, m in zip(found, meta)}
    missing = sorted(set(range(n)) - set(by_shard))
    if missing:
        raise BatchrecError(
            f"run {run_id}: shard {missing[0]}/{n} is missing in {folder} ({len(missing)} of {n} "
            f"missing); run `batchrec score --run {run_id} --shard {missing[0]}/{n}`"
        )
    return [by_shard[i][0] for i in range(n)], [by_shard[i][1] for i in range(n)]


def _read_shards(files: list[Location], run_id: str) -> pl.DataFrame:
    try:
        return pl.from_arrow(storage.read_tables(files, list(SHARD_SCHEMA)))
    except (OSError, ValueError, pl.exceptions.PolarsError) as exc:
        raise BatchrecError(
            f"the shards of run {run_id} cannot be read ({str(exc).splitlines()[0]}): "
            f"rescore them with `batchrec score --run {run_id} --shard i/N`"
        ) from None


def publish_shards(
    warehouse: Warehouse | str | os.PathLike,
    run: str,
    shards: str | os.PathLike | Location | None = None,
    *,
    retention_days: int = options.RETENTION_DAYS.default,
    gate: GateSettings | None = DEFAULT_GATE,
) -> PublishResult:
    """Publish the union of run `run`'s shards under `shards` (path or URI; default the
    warehouse's shards folder) in ONE transaction, exactly as a single-machine run publishes,
    through the publish `gate` (None: the list sanity checks only). Nothing is published when a
    shard is missing, unreadable or of another sharding (one-line error), or the gate refuses
    (`Gated`). The shard files are deleted after the commit."""
    t0 = time.perf_counter()
    wh = as_warehouse(warehouse)
    if retention_days < 0:
        raise BatchrecError(f"--retention-days must be >= 0 (got {retention_days})")
    with wh.lock("score --publish"):
        with wh.connect(read_only=True) as con:
            run_row = resolve_shipped(con, run, None)
        files, meta = find_shards(shards_root(wh, shards), run_row["run_id"])
        frame = _read_shards(files, run_row["run_id"])
        users = sum(m["users"] for m in meta)
        family = get_model_class(run_row["model"])
        checked = None
        if gate is not None:
            checked = Gate(gate, run_row, family.task, list_sanity(frame, users, family.personalised), t0)
        else:
            check_lists(frame, run_row, users, family.personalised)
        try:
            published, moved, expired = publish(wh, frame, retention_days, gate=checked)
        except Gated:
            refresh_serving(wh)  # readers (`batchrec status`) see the refusal in publish_log
            raise
        for f in files:
            storage.delete(f)
        refresh_serving(wh)
    return PublishResult(
        run_row["run_id"],
        len(files),
        published,
        moved,
        expired,
        retention_days,
        time.perf_counter() - t0,
        checked,
    )


def score_sharded(
    warehouse: Warehouse | str | os.PathLike,
    executor,
    run: str | None = None,
    n_shards: int = 1,
    shards: str | os.PathLike | None = None,
    *,
    model: str | None = None,
    top_n: int = options.TOP_N.default,
    memory_budget: str = options.MEMORY_BUDGET.default,
    device: str = options.DEVICE.default,
    min_history: int = 1,
    retention_days: int = options.RETENTION_DAYS.default,
    gate: GateSettings | None = DEFAULT_GATE,
) -> tuple[list[ShardResult], PublishResult]:
    """Score every shard of `n_shards` as a task on `executor` (`batchrec.executors`), then, when
    all are in, publish them once. Holds the writer lock throughout, so the run is pinned and no
    other publish interleaves; a failed task publishes nothing."""
    wh = as_warehouse(warehouse)
    if n_shards < 1:
        raise BatchrecError(f"--shards must be at least 1 (got {n_shards})")
    parse_memory_budget(memory_budget)  # bad settings fail here, not in n tasks
    if top_n <= 0:
        raise BatchrecError(f"--top-n must be at least 1 (got {top_n})")
    root = shards_root(wh, shards)
    with wh.lock("score"):
        with wh.connect(read_only=True) as con:
            run_row = resolve_shipped(con, run, model)
        run_id = run_row["run_id"]
        for stale in storage.files(root / f"run_id={run_id}", "shard=", ".parquet"):
            storage.delete(stale)  # an earlier attempt's files, possibly of another N
        # Absolute locations: a task may run in another folder or on another machine.
        calls = [
            (
                (str(wh.path.resolve()), run_id, (i, n_shards), root.uri),
                {
                    "top_n": top_n,
                    "memory_budget": memory_budget,
                    "device": device,
                    "min_history": min_history,
                },
            )
            for i in range(n_shards)
        ]
        labels = [f"shard {i}/{n_shards} of run {run_id}" for i in range(n_shards)]
        results: list[ShardResult | None] = [None] * n_shards
        t0 = time.perf_counter()
        with progress(n_shards, f"scoring {n_shards} shards on {executor.name}", unit="shard") as bar:
            for index, result in executor.map(score_shard, calls, labels):
                results[index] = result
                bar.update(1)
                log.info(
                    "%s (%d of %d shards in, %.1f s)",
                    result.summary(),
                    sum(r is not None for r in results),
                    n_shards,
                    time.perf_counter() - t0,
                )
        published = publish_shards(wh, run_id, root, retention_days=retention_days, gate=gate)
    return [r for r in results if r is not None], published
