"""The serving database: what readers query, rebuilt after each publishing step and swapped in
with one atomic rename, so readers and the nightly writer never wait on each other.

DuckDB lets a process write a file only while no other process has it open: one analyst's
session on the warehouse used to hold the nightly publish back (and fail it as busy). Readers
(`batchrec sql`, `recommend`, `status`, `export`, an analyst's duckdb shell) therefore open
`<warehouse stem>.serving.duckdb` instead. After each step that publishes (ingest, features,
train, score, evaluate, and the end of a job) the writer, still under its writer lock, copies
SERVING_TABLES and the analyst views over them into a new file beside it and renames that over
the previous one (`os.replace`). A reader that opened the old file keeps reading it (its inode
lives until the reader closes it); a new reader opens the new one. The writer never opens the
serving file, so nothing a reader does can block it.

The serving file is a copy: it is made read-only on disk (open it with `duckdb -readonly`) and
rebuilt whole each time, so it can be deleted at any time; until one exists, readers read the
warehouse itself.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import duckdb

from batchrec.errors import BatchrecError
from batchrec.warehouse import Warehouse, scalar, utcnow

log = logging.getLogger("batchrec.serving")

# What readers need: the published lists and their history, the catalogue and ratings (a user's
# history for `recommend`), the small operational tables `status` shows, and what ingest reports.
SERVING_TABLES = (
    "recommendations",
    "recommendation_history",
    "items",
    "ratings",
    "tags",
    "users",
    "sources",
    "evaluations",
    "model_runs",
    "feature_snapshots",
    "split_protocols",
    "job_runs",
    "ingest_log",
    "quarantine",
    "schema_version",
    "publish_log",
    "tuning_trials",
    "tuned_params",
)
# Analyst views over those tables; their definitions are copied from the warehouse (written once, in sql/schema).
SERVING_VIEWS = (
    "recommendations_with_titles",
    "ratings_with_source",
    "items_with_source",
    "tags_with_source",
    "users_with_source",
)
BUILD_ALIAS = "batchrec_serving_build"


def _literal(path: Path) -> str:
    return "'" + str(path).replace("'", "''") + "'"


def _remove(*paths: Path) -> None:
    for p in paths:
        p.unlink(missing_ok=True)


def _build(con: duckdb.DuckDBPyConnection, wh: Warehouse, tmp: Path) -> None:
    """Write the serving database to `tmp` from the warehouse open on `con`."""
    tables = [
        t
        for (t,) in con.execute(
            "SELECT table_name FROM duckdb_tables() WHERE database_name = current_database() AND NOT internal "
            "AND table_name NOT LIKE '%\\_\\_staging' ESCAPE '\\' ORDER BY 1"
        ).fetchall()
    ]
    counts = [(t, scalar(con, f'SELECT count(*) FROM "{t}"')) for t in tables]
    views = dict(
        con.execute(
            "SELECT view_name, sql FROM duckdb_views() WHERE database_name = current_database() "
            "AND NOT internal"
        ).fetchall()
    )
    version = scalar(con, "SELECT max(version) FROM schema_version")
    con.execute(f"ATTACH {_literal(tmp)} AS {BUILD_ALIAS}")
    try:
        for t in SERVING_TABLES:
            if t in tables:
                con.execute(f'CREATE TABLE {BUILD_ALIAS}."{t}" AS SELECT * FROM "{t}"')
        con.execute(
            f"CREATE TABLE {BUILD_ALIAS}.warehouse_tables (table_name VARCHAR NOT NULL, rows BIGINT NOT NULL)"
        )
        if counts:
            con.executemany(f"INSERT INTO {BUILD_ALIAS}.warehouse_tables VALUES (?, ?)", counts)
        con.execute(
            f"CREATE TABLE {BUILD_ALIAS}.serving_info AS SELECT ?::TIMESTAMP AS built_at, "
            "?::VARCHAR AS warehouse, ?::INTEGER AS schema_version",
            [utcnow(), str(wh.path), version],
        )
    finally:
        con.execute(f"DETACH {BUILD_ALIAS}")
    # Views are created from a connection on the new file itself, so their names bind to its tables.
    out = duckdb.connect(str(tmp))
    try:
        for name in SERVING_VIEWS:
            if name in views:
                out.execute(views[name])
    finally:
        out.close()


def refresh(wh: Warehouse, con: duckdb.DuckDBPyConnection | None = None) -> Path:
    """Rebuild `wh.serving_path` from the warehouse and swap it in atomically.

    Call it after a step's commit, with that step's read-write connection `con` (or none: one is
    opened) and under the writer lock (taken here if the caller does not hold it), so refreshes
    never interleave. A failure leaves the previous serving file in place and says so; the step's
    own commit stands."""
    if con is None:
        with wh.lock("serving refresh"), wh.connect() as own:
            return refresh(wh, own)
    path = wh.serving_path
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    wal = tmp.with_name(tmp.name + ".wal")
    t0 = time.perf_counter()
    _remove(tmp, wal)
    try:
        with wh.lock("serving refresh"):
            _build(con, wh, tmp)
            os.chmod(tmp, 0o444)  # a copy for readers: nobody should write to it
            os.replace(tmp, path)
    except BaseException as exc:
        _remove(tmp, wal)
        if isinstance(exc, (duckdb.Error, OSError)):
            raise BatchrecError(
                f"the warehouse was updated, but the serving database {path} could not be rebuilt "
                f"({str(exc).splitlines()[0]}): readers still see the previous state; fix the cause "
                f"and rerun the step"
            ) from None
        raise
    log.info("serving database %s rebuilt in %.2f s", path, time.perf_counter() - t0)
    return path


def reader_path(wh: Warehouse) -> Path:
    """The file readers open: the serving database, or the warehouse while none has been built
    (a warehouse from before serving files)."""
    return wh.serving_path if wh.serving_path.exists() else wh.path


@contextmanager
def connect(wh: Warehouse) -> Iterator[duckdb.DuckDBPyConnection]:
    """A read-only session for readers (see `reader_path`)."""
    path = reader_path(wh)
    if path == wh.path:
        with wh.connect(read_only=True) as con:
            yield con
        return
    try:
        con = duckdb.connect(str(path), read_only=True)
    except duckdb.Error as exc:
        raise BatchrecError(
            f"cannot open the serving database {path}: {str(exc).splitlines()[0]} "
            f"(delete it; the next publishing step rebuilds it)"
        ) from None
    try:
        yield con
    finally:
        con.close()


# -- export ------------------------------------------------------------------------------------
EXPORT_FORMATS = {".parquet": "FORMAT parquet", ".csv": "FORMAT csv, HEADER true"}
EXPORT_ORDER = {
    "recommendations": "user_id, rank",
    "recommendations_with_titles": "user_id, rank",
    "recommendation_history": "run_date, user_id, rank",
}


def export(wh: Warehouse, table: str, to: str | os.PathLike) -> str:
    """Write a serving table or view to a Parquet or CSV file (by its suffix) for downstream
    systems: through a temporary file and a rename, so a reader of `to` never sees half a file."""
    to = Path(to)
    options = EXPORT_FORMATS.get(to.suffix.lower())
    if options is None:
        raise BatchrecError(
            f"--to {to}: unknown file type {to.suffix or '(none)'} (expected .parquet or .csv)"
        )
    with connect(wh) as con:
        known = [
            t
            for (t,) in con.execute("SELECT table_name FROM information_schema.tables ORDER BY 1").fetchall()
        ]
        if table not in known:
            raise BatchrecError(
                f"--table {table}: no such table or view in {reader_path(wh)} "
                f"(expected one of {', '.join(known)})"
            )
        to.parent.mkdir(parents=True, exist_ok=True)
        tmp = to.with_name(f".{to.name}.{os.getpid()}.tmp")
        order = f" ORDER BY {EXPORT_ORDER[table]}" if table in EXPORT_ORDER else ""
        try:
            rows = con.execute(
                f'COPY (SELECT * FROM "{table}"{order}) TO {_literal(tmp)} ({options})'
            ).fetchall()[0][0]
            os.replace(tmp, to)
        except BaseException as exc:
            _remove(tmp)
            if isinstance(exc, (duckdb.Error, OSError)):
                raise BatchrecError(f"cannot write {to}: {str(exc).splitlines()[0]}") from None
            raise
    return f"exported {rows} rows of {table} to {to}"
