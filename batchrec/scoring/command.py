"""`batchrec score`: one function that reads the command line's options and runs the right mode:
a full single-machine run (score and publish), `--pairs`, `--shard i/N` (`shards.score_shard`),
`--publish RUN` (`shards.publish_shards`), or `--shards N` on an executor (local or Ray:
`shards.score_sharded`)."""

from __future__ import annotations

import time
from pathlib import Path

from batchrec import options
from batchrec.errors import BatchrecError, Gated
from batchrec.executors import check_executor, open_executor
from batchrec.gate import DEFAULT_GATE, GateSettings
from batchrec.scoring.pairs import read_users, score_pairs
from batchrec.scoring.run import (
    load_model,
    parse_memory_budget,
    parse_shard,
    resolve_shipped,
    score_and_publish,
)
from batchrec.scoring.shards import publish_shards, score_shard, score_sharded
from batchrec.serving import refresh as refresh_serving
from batchrec.warehouse import Warehouse


def score_command(
    wh: Warehouse,
    run_id: str | None = None,
    model: str | None = None,
    top_n: int = options.TOP_N.default,
    shard: str | None = None,
    publish_run: str | None = None,
    users_file: str | None = None,
    pairs: str | None = None,
    out: str | None = None,
    memory_budget: str = options.MEMORY_BUDGET.default,
    retention_days: int = options.RETENTION_DAYS.default,
    device: str = options.DEVICE.default,
    min_history: int = 1,
    gate: GateSettings | None = DEFAULT_GATE,
    executor: str = options.EXECUTOR.default,
    ray_address: str | None = None,
    shards: int | None = None,
    shards_uri: str | None = None,
    task_cpus: float = options.TASK_CPUS.default,
    task_gpus: float = options.TASK_GPUS.default,
) -> str:
    """`batchrec score`: see the module docstring; returns a one-line summary. Full publishes (not
    `--users`) go through the publish `gate` (None: the list sanity checks only)."""
    budget = parse_memory_budget(memory_budget)
    if top_n <= 0:
        raise BatchrecError(f"--top-n must be at least 1 (got {top_n})")
    if retention_days < 0:
        raise BatchrecError(f"--retention-days must be >= 0 (got {retention_days})")
    check_executor(executor)
    distributed = executor != "local" or shards is not None
    if ray_address is not None and executor != "ray":
        raise BatchrecError("--ray-address needs --executor ray")
    if pairs is not None:
        if out is None:
            raise BatchrecError("--pairs needs --out FILE for the scored pairs")
        if shard or publish_run or users_file or distributed:
            raise BatchrecError(
                "--pairs cannot be combined with --shard, --publish, --users, --shards or --executor"
            )
        with wh.connect(read_only=True) as con:
            run = resolve_shipped(con, run_id, model)
            return score_pairs(load_model(run, device), run, con, Path(pairs), Path(out))
    if out is not None:
        raise BatchrecError("--out is only for --pairs (shard files go to --shards-uri)")
    if publish_run is not None:
        if shard or users_file or distributed:
            raise BatchrecError("--publish cannot be combined with --shard, --users, --shards or --executor")
        return publish_shards(wh, publish_run, shards_uri, retention_days=retention_days, gate=gate).summary()
    if shard is not None:  # no lock: shards may run anywhere, in parallel, on a read-only warehouse
        spec = parse_shard(shard)
        if users_file or distributed:
            raise BatchrecError("--shard cannot be combined with --users, --shards or --executor")
        result = score_shard(
            wh,
            run_id,
            spec,
            shards_uri,
            model=model,
            top_n=top_n,
            memory_budget=memory_budget,
            device=device,
            min_history=min_history,
        )
        return (
            f"{result.summary()}; when all {result.n_shards} are written: "
            f"`batchrec score --publish {result.run_id}`"
        )
    if distributed:
        if users_file:
            raise BatchrecError("--users cannot be combined with --shards or --executor")
        n = 1 if shards is None else shards
        t0 = time.perf_counter()
        with open_executor(executor, ray_address, cpus=task_cpus, gpus=task_gpus) as ex:
            results, published = score_sharded(
                wh,
                ex,
                run_id,
                n,
                shards_uri,
                model=model,
                top_n=top_n,
                memory_budget=memory_budget,
                device=device,
                min_history=min_history,
                retention_days=retention_days,
                gate=gate,
            )
        slowest = max(r.seconds for r in results)
        peak = max(r.peak_rss_mb for r in results)
        return (
            f"run {published.run_id} top-{top_n} on {executor}: {n} shards ({sum(r.users for r in results)} users, "
            f"slowest shard {slowest:.1f} s, peak RSS per worker {peak:.0f} MB); {published.summary()}; "
            f"{time.perf_counter() - t0:.1f} s in all"
        )
    users = read_users(users_file) if users_file else None
    if shards_uri is not None:
        raise BatchrecError("--shards-uri is only for --shard, --publish and --shards")
    t0 = time.perf_counter()
    with wh.lock("score"):
        with wh.connect(read_only=True) as con:
            run = resolve_shipped(con, run_id, model)
        try:
            info = score_and_publish(
                wh,
                run,
                load_model(run, device),
                top_n,
                budget,
                retention_days,
                users=users,
                min_history=min_history,
                gate=gate,
            )
        except Gated:
            refresh_serving(wh)  # readers (`batchrec status`) see the refusal in publish_log
            raise
        refresh_serving(wh)
    summary = (
        f"run {run['run_id']} ({run['model']}) top-{top_n}: {info['users']} users (model {info['model']}, "
        f"genre/tag {info['profile']}, popular {info['popular']}), {info['published']} rows published to "
        f"recommendations; {info['moved']} earlier rows moved to recommendation_history, {info['expired']} "
        f"expired (retention {retention_days} days); {time.perf_counter() - t0:.1f} s"
    )
    if info.get("unknown_users"):
        summary += f"; {info['unknown_users']} listed users are not in the warehouse and were skipped"
    if info["gate"] is not None:
        summary += f"; {info['gate'].summary()}"
    return summary
