"""Publishing a run's lists: the sanity checks that gate it (`list_sanity`), the one-transaction
swap into `recommendations` with history (`publish`), and the partition of users into shards
(`shard_of`; the shard files themselves: `shards.py`)."""

from __future__ import annotations

import json
import os
import time
from contextlib import ExitStack
from datetime import timedelta
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq

from batchrec.errors import BatchrecError, WarehouseBusy
from batchrec.gate import Gate
from batchrec.warehouse import Warehouse, transaction

PUBLISH_WAIT_S = 60.0  # how long the publish waits for other processes to close the DuckDB file


def mix64(values: np.ndarray) -> np.ndarray:
    """A fixed 64-bit hash of integers (splitmix64's finaliser): the same on every machine and
    Python, unlike the salted built-in hash."""
    x = np.asarray(values).astype(np.uint64)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def shard_of(user_ids: np.ndarray, n_shards: int) -> np.ndarray:
    """Shard of each raw user id: mix64(user_id) mod N."""
    return (mix64(user_ids) % np.uint64(n_shards)).astype(np.int64)


SANE_MIN_LISTS = 50  # the catalogue-wide checks need this many lists to mean anything
SANE_TIED_LISTS = 0.9  # at most this share of lists may have every score equal
SANE_MISSING_LISTS = 0.01  # at most this share of the scored users may end up with no list
SANE_TOP_ITEM_SHARE = 0.9  # personalised models: at most this share of lists may start with one item
SANE_COVERAGE = 2  # personalised models: at least this many times the list length in distinct items


def list_sanity(frame: pl.DataFrame, users: int | None = None, personalised: bool = True) -> list[str]:
    """What makes a run's lists unfit to publish, one short line per failed check (empty: fine).

    `frame` holds rows in the `recommendations` layout (user_id, rank, item_id, score at least);
    `users` is how many users were scored (a user whose every score was NaN has no rows at all);
    `personalised` is False for one global ranking (popularity), whose lists overlap by design,
    so the catalogue-wide checks (one item everywhere, collapsed coverage) do not apply.
    """
    problems = []
    rows = frame.height
    bad = int(frame.select(pl.col("score").is_finite().not_().fill_null(True).sum()).item()) if rows else 0
    if bad:
        problems.append(f"scores not finite: {bad} of {rows} rows are NaN, infinite or null")
    lists = frame.group_by("user_id").agg(n=pl.len(), tied=pl.col("score").min() == pl.col("score").max())
    n_lists = lists.height
    if users is not None and users - n_lists > SANE_MISSING_LISTS * users:
        problems.append(f"no list for {users - n_lists} of {users} scored users (no finite score)")
    ranked = lists.filter(pl.col("n") >= 2)
    tied = int(ranked["tied"].sum()) if ranked.height else 0
    if ranked.height and tied > SANE_TIED_LISTS * ranked.height:
        problems.append(f"every score equal within {tied} of {ranked.height} lists")
    if personalised and n_lists >= SANE_MIN_LISTS:
        # the first place, not any place: long lists of a good model share their popular items
        first = frame.filter(pl.col("rank") == 1)["item_id"].value_counts(sort=True)
        if first.height and first["count"][0] > SANE_TOP_ITEM_SHARE * n_lists:
            problems.append(f"item {first['item_id'][0]} is first in {first['count'][0]} of {n_lists} lists")
        distinct, longest = frame["item_id"].n_unique(), int(lists["n"].max())
        if distinct < SANE_COVERAGE * longest:
            problems.append(f"only {distinct} distinct items across {n_lists} lists of up to {longest}")
    return problems


def check_lists(frame: pl.DataFrame, run: dict, users: int | None, personalised: bool) -> None:
    """Raise one line naming every failed `list_sanity` check; nothing is published then."""
    problems = list_sanity(frame, users, personalised)
    if problems:
        raise BatchrecError(
            f"refusing to publish run {run['run_id']} ({run['model']}): {'; '.join(problems)}; "
            "the previous recommendations stay: check the run's parameters and data, and retrain"
        )


# -- publishing -------------------------------------------------------------------------------
def write_parquet(frame: pl.DataFrame, path: Path, metadata: dict | None = None) -> Path:
    """Write atomically (temp file + rename): a killed writer never leaves a half file at `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    table = frame.to_arrow()
    if metadata is not None:
        table = table.replace_schema_metadata(
            {**(table.schema.metadata or {}), b"batchrec": json.dumps(metadata).encode()}
        )
    pq.write_table(table, tmp)
    os.replace(tmp, path)
    return path


def _open_for_publish(wh: Warehouse, stack: ExitStack, wait_s: float = PUBLISH_WAIT_S):
    """A read-write connection; while another process has the file open (a reader's session),
    retry for up to `wait_s` before giving up as busy."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return stack.enter_context(wh.connect())
        except WarehouseBusy:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def publish(
    wh: Warehouse,
    rows: pl.DataFrame | list[Path],
    retention_days: int,
    scope_users: np.ndarray | None = None,
    gate: Gate | None = None,
) -> tuple[int, int, int]:
    """Swap `rows` (a frame in the `recommendations` layout, or Parquet files of them) into
    `recommendations` in ONE transaction (the caller holds the writer lock): current rows (of
    `scope_users` only, when given) move to `recommendation_history` with run_date =
    date(scored_at), history older than `retention_days` before the new run's date expires, the
    new rows go in. Returns (published, moved to history, expired).

    A frame is read by DuckDB straight from its Arrow buffers: no staging file to write and read
    back (a Parquet round trip cost a third of the publish at ML-20M shape). A `gate` checks the
    staged rows first (it raises `Gated` when it refuses) and logs the publish in its transaction."""
    cols = "user_id, rank, item_id, score, run_id, scored_at, reason"
    scope = "" if scope_users is None else "WHERE user_id IN (SELECT user_id FROM publish_scope)"
    users = np.zeros(0, np.int64) if scope_users is None else np.asarray(scope_users, np.int64)
    with ExitStack() as stack:
        con = _open_for_publish(wh, stack)
        con.register("publish_scope", pl.DataFrame({"user_id": users}).to_arrow())
        if isinstance(rows, pl.DataFrame):
            con.register("publish_rows", rows.to_arrow())
        else:
            con.read_parquet([str(f) for f in rows]).create_view("publish_rows")
        if gate is not None:
            gate.check(con)
        with transaction(con, "the new recommendations"):
            moved = con.execute(
                f"INSERT INTO recommendation_history SELECT {cols}, CAST(scored_at AS DATE) "
                f"FROM recommendations {scope}"
            ).fetchall()[0][0]
            con.execute(f"DELETE FROM recommendations {scope}").fetchall()
            published = con.execute(
                f"INSERT INTO recommendations SELECT {cols} FROM publish_rows"
            ).fetchall()[0][0]
            newest = con.execute("SELECT CAST(max(scored_at) AS DATE) FROM publish_rows").fetchall()[0][0]
            expired = 0
            if newest is not None:
                expired = con.execute(
                    "DELETE FROM recommendation_history WHERE run_date < ?",
                    [newest - timedelta(days=retention_days)],
                ).fetchall()[0][0]
            if gate is not None:
                gate.record(con)
    return published, moved, expired
