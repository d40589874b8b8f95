"""Feature snapshots: build one point in time, list them, prune old ones, resolve ids.

A build runs `sql/features/*.sql` in order (the split files only for the chosen protocols) plus
the TF-IDF step, all inside ONE transaction under the warehouse writer lock: a failure or an
interrupt part-way rolls everything back, so there is never a half snapshot.

Point in time: with as_of T only ratings and tags with ts < T are read (see
010_snapshot_scope.sql), so adding ratings, tags or users dated at or after T and rebuilding at T
gives the same rows in every table. The items catalogue has no timestamps and is taken whole;
and a re-rating after T that ingest stored over an earlier one is, by the ratings contract (latest
rating wins), no longer visible at T.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime

import duckdb

from batchrec import options, serving
from batchrec.errors import BatchrecError
from batchrec.features.params import parse_params, parse_protocols, parse_timestamp
from batchrec.features.splits import build_split, split_files
from batchrec.features.tfidf import build_item_tag_tfidf
from batchrec.serving import refresh as refresh_serving
from batchrec.warehouse import SQL_DIR, Warehouse, run_sql_file, scalar, transaction, utcnow

FEATURES_SQL = SQL_DIR / "features"

# Every table that holds rows of a snapshot (besides feature_snapshots itself).
SNAPSHOT_TABLES = (
    "user_index",
    "item_index",
    "interactions",
    "user_features",
    "item_features",
    "item_genres",
    "item_tag_tfidf",
    "split_holdout",
    "split_protocols",
)
_TEMP_TABLES = ("snap_user_index", "snap_item_index", "snap_interactions", "snap_tags")
_TEMP_MACROS = ("time_key", "shuffle_key")

log = logging.getLogger(__name__)

EMPTY_WAREHOUSE = "no ratings in the warehouse: run `batchrec ingest` first"


def _stamp(ts: datetime) -> str:
    return ts.isoformat(sep=" ", timespec="seconds")


def new_snapshot_id(created: datetime) -> str:
    """Sortable by creation time; the random suffix keeps ids unique within a second."""
    return f"s{created:%Y%m%dT%H%M%S}-{secrets.token_hex(3)}"


def latest_snapshot_id(con: duckdb.DuckDBPyConnection) -> str:
    snapshot_id = scalar(
        con, "SELECT snapshot_id FROM feature_snapshots ORDER BY created_at DESC, snapshot_id DESC LIMIT 1"
    )
    if snapshot_id is None:
        raise BatchrecError("no feature snapshots in the warehouse: run `batchrec features` first")
    return snapshot_id


def resolve_snapshot(con: duckdb.DuckDBPyConnection, snapshot: str) -> str:
    """'latest' or a snapshot id -> an existing snapshot id."""
    if snapshot == "latest":
        return latest_snapshot_id(con)
    if not scalar(con, "SELECT count(*) FROM feature_snapshots WHERE snapshot_id = ?", [snapshot]):
        raise BatchrecError(
            f"unknown feature snapshot {snapshot!r} (never built or pruned; `batchrec features list` shows those kept)"
        )
    return snapshot


def _check_data(con: duckdb.DuckDBPyConnection, as_of: datetime) -> None:
    n, earliest = con.execute("SELECT count(*), min(ts) FROM ratings").fetchall()[0]
    if not n:
        raise BatchrecError(EMPTY_WAREHOUSE)
    if earliest >= as_of:
        raise BatchrecError(f"no ratings before {_stamp(as_of)}; earliest is {_stamp(earliest)}")


@contextmanager
def _timed(step: str) -> Iterator[None]:
    wall, cpu = time.perf_counter(), time.process_time()
    yield
    log.info(
        "features: %s in %.1f s (cpu %.1f s)", step, time.perf_counter() - wall, time.process_time() - cpu
    )


def _build(
    con: duckdb.DuckDBPyConnection,
    snapshot_id: str,
    as_of: datetime,
    protocols: tuple[str, ...],
    values: dict,
) -> dict[str, dict[str, int]]:
    """Write every table of the snapshot; returns the split sizes per protocol."""
    bind = {"snapshot_id": snapshot_id, "as_of": as_of, "bayes_c": values["bayes_c"]}
    split_sql = split_files(FEATURES_SQL)
    for path in sorted(FEATURES_SQL.glob("*.sql")):
        if path not in split_sql.values():
            with _timed(path.name):
                run_sql_file(con, path, bind)
    with _timed("tf-idf"):
        build_item_tag_tfidf(
            con, snapshot_id, min_df=values["tfidf.min_df"], max_terms=values["tfidf.max_terms"]
        )
    n_interactions = scalar(con, "SELECT count(*) FROM snap_interactions")
    sizes = {}
    for protocol in protocols:
        with _timed(f"split {protocol}"):
            sizes[protocol] = build_split(
                con, split_sql[protocol], protocol, snapshot_id, as_of, values, n_interactions
            )
    for table in _TEMP_TABLES:
        con.execute(f"DROP TABLE {table}")
    for macro in _TEMP_MACROS:
        con.execute(f"DROP MACRO {macro}")
    return sizes


def _row_counts(con: duckdb.DuckDBPyConnection, snapshot_id: str) -> dict[str, int]:
    return {
        table: scalar(con, f"SELECT count(*) FROM {table} WHERE snapshot_id = ?", [snapshot_id])
        for table in SNAPSHOT_TABLES
    }


def _prune(con: duckdb.DuckDBPyConnection, keep: int) -> list[str]:
    """Delete every snapshot beyond the newest `keep`, from every table; returns their ids."""
    old = [
        row[0]
        for row in con.execute(
            "SELECT snapshot_id FROM feature_snapshots ORDER BY created_at DESC, snapshot_id DESC OFFSET ?",
            [keep],
        ).fetchall()
    ]
    if old:
        for table in (*SNAPSHOT_TABLES, "feature_snapshots"):
            con.execute(f"DELETE FROM {table} WHERE list_contains(?, snapshot_id)", [old])
    return old


@dataclass(frozen=True)
class Snapshot:
    """A feature snapshot just built: its id and the one-line summary `batchrec features` prints."""

    snapshot_id: str
    summary: str

    def __str__(self) -> str:
        return self.summary


def build_snapshot(
    wh: Warehouse,
    as_of: str | None = None,
    protocols: str = options.FEATURES_PROTOCOLS.default,
    params: tuple[str, ...] = (),
    keep: int = options.FEATURES_KEEP.default,
) -> str:
    """Build one feature snapshot (nothing at or after `as_of`, default now); returns a summary line."""
    return make_snapshot(wh, as_of, protocols, params, keep).summary


def make_snapshot(
    wh: Warehouse,
    as_of: str | None = None,
    protocols: str = options.FEATURES_PROTOCOLS.default,
    params: tuple[str, ...] = (),
    keep: int = options.FEATURES_KEEP.default,
) -> Snapshot:
    """`build_snapshot`, returning the new snapshot's id beside its summary (the Python API's)."""
    chosen = parse_protocols(protocols)
    values = parse_params(params)
    cutoff = parse_timestamp(as_of, "--as-of") if as_of else utcnow()
    if keep < 1:
        raise BatchrecError(f"bad value for --keep: {keep} (expected an integer >= 1)")
    if not wh.path.exists():
        raise BatchrecError(EMPTY_WAREHOUSE)
    started = time.perf_counter()
    with wh.writer("features") as con:
        _check_data(con, cutoff)
        # Nothing in a build depends on row order (ids come from explicit ORDER BYs), and without
        # order preservation DuckDB materialises and inserts with less work and memory.
        con.execute("SET preserve_insertion_order = false")
        created = utcnow()
        snapshot_id = new_snapshot_id(created)
        recorded = {"as_of": cutoff.isoformat(sep=" "), "protocols": list(chosen), **values}
        with _timed("whole transaction"), transaction(con, f"feature snapshot {snapshot_id}"):
            sizes = _build(con, snapshot_id, cutoff, chosen, values)
            with _timed("row counts, record, prune"):
                counts = _row_counts(con, snapshot_id)
                con.execute(
                    "INSERT INTO feature_snapshots VALUES (?, ?, ?, ?, ?)",
                    [snapshot_id, cutoff, created, json.dumps(recorded), json.dumps(counts)],
                )
                pruned = _prune(con, keep)
        refresh_serving(wh, con)
    splits = ", ".join(f"{p} {s['train']}/{s['valid']}/{s['test']}" for p, s in sizes.items())
    summary = (
        f"snapshot {snapshot_id} as of {_stamp(cutoff)}: {counts['user_index']} users, "
        f"{counts['item_index']} items, {counts['interactions']} interactions, "
        f"{counts['item_tag_tfidf']} tf-idf weights; splits train/valid/test: {splits or 'none'}; "
        f"{time.perf_counter() - started:.1f} s"
    )
    if pruned:
        summary += f"; pruned {len(pruned)} older snapshot(s) beyond --keep {keep}: {', '.join(pruned)}"
    return Snapshot(snapshot_id, summary)


def list_snapshots(wh: Warehouse) -> str:
    """The kept snapshots, newest first, as a text table (from the serving database: a reader)."""
    with serving.connect(wh) as con:
        rows = con.execute("""
            SELECT s.snapshot_id, s.as_of, s.created_at, s.row_counts,
                   coalesce(string_agg(p.protocol, ',' ORDER BY p.protocol), '') AS protocols
            FROM feature_snapshots s LEFT JOIN split_protocols p USING (snapshot_id)
            GROUP BY ALL ORDER BY s.created_at DESC, s.snapshot_id DESC""").fetchall()
    if not rows:
        return "no feature snapshots yet: run `batchrec features`"
    header = (
        "snapshot_id",
        "as_of",
        "created_at",
        "users",
        "items",
        "interactions",
        "tfidf",
        "holdout",
        "protocols",
    )
    table = [header]
    for snapshot_id, snap_as_of, created_at, row_counts, names in rows:
        counts = json.loads(row_counts)
        table.append(
            (
                snapshot_id,
                _stamp(snap_as_of),
                _stamp(created_at),
                *(
                    str(counts[t])
                    for t in ("user_index", "item_index", "interactions", "item_tag_tfidf", "split_holdout")
                ),
                names,
            )
        )
    widths = [max(len(row[c]) for row in table) for c in range(len(header))]
    numeric = range(3, 8)
    return "\n".join(
        "  ".join(
            cell.rjust(w) if c in numeric else cell.ljust(w) for c, (cell, w) in enumerate(zip(row, widths))
        ).rstrip()
        for row in table
    )
