"""Read one file into a staging table and find its bad lines, all inside DuckDB.

One native read per file: DuckDB's CSV reader hands every field over as text (Parquet: in its
own type) and rejects, with their line numbers, the lines it cannot split into the spec's fields
(too few or too many, bytes that are not UTF-8: `store_rejects`); the spec's checks (spec.py)
type the fields and flag the bad ones in the same pass, and the staging table keeps the typed
rows with a `_valid` flag. A valid file costs that one read.

Only when some row is bad is the file read a second time, to say which lines and why: the bad
rows with their reasons and their ordinal in file order (lines.py turns ordinals into line
numbers). Line numbers are DuckDB's: 1-based lines of the file (the header is line 1), where a
quoted field that spans lines counts once. Parquet has no lines: its rows are numbered from 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import duckdb

from batchrec.errors import BatchrecError
from batchrec.ingest.lines import empty_lines
from batchrec.ingest.spec import NEVER_NULL, TEXT, FileSpec, lit, raw_sql, reason_sql, typed_sql, valid_sql
from batchrec.warehouse import scalar

NO_SPACE = "No space left on device"


@dataclass(frozen=True)
class Staged:
    spec: FileSpec
    table: str  # temp table of the good rows (STAGE_COLUMNS[kind], plus _valid)
    source_id: int  # the file's id in `sources`, which every row it adds carries
    bad: str  # temp table (line, reason, raw) of the bad lines
    rows_read: int  # data lines (or rows) in the file
    n_bad: int


def stage(con: duckdb.DuckDBPyConnection, spec: FileSpec, n: int, source_id: int) -> Staged:
    """Read `spec` into temp table stage_<n> (its good rows) and bad_<n> (its bad lines)."""
    if spec.path.stat().st_size == 0:
        raise BatchrecError(f"{spec.label}: empty file (expected {spec.kind} rows)")
    table, bad = f"stage_{n}", f"bad_{n}"
    # DuckDB pushes a TRY_CAST of a CSV column into its reader as the column's type, where a
    # value that does not convert rejects the whole line instead of giving NULL; the checks
    # need TRY_CAST's meaning.
    con.execute("SET disabled_optimizers = 'type_pushdown'")
    try:
        if spec.csv is None:
            _stage_parquet(con, spec, table, bad)
        else:
            _stage_csv(con, spec, table, bad)
    except (
        duckdb.Error
    ) as exc:  # a file the reader cannot even start on (I/O, encoding setup, corrupt Parquet)
        if NO_SPACE in str(exc):
            raise
        raise BatchrecError(
            f"{spec.label}: cannot read ({str(exc).splitlines()[0]}) (expected a {spec.format} "
            f"{spec.kind} file)"
        ) from None
    good = scalar(con, f"SELECT count(*) FROM {table}")
    n_bad = scalar(con, f"SELECT count(*) FROM {bad}")
    if good + n_bad == 0:
        after = " after the header" if spec.csv and spec.csv["header"] else ""
        raise BatchrecError(f"{spec.label}: no data rows (expected {spec.kind} rows{after})")
    return Staged(spec, table, source_id, bad, good + n_bad, n_bad)


def _typed_into(con, spec: FileSpec, table: str, source: str) -> int:
    """Stage the typed rows of `source`; returns how many are bad."""
    con.execute(
        f"CREATE TEMP TABLE {table} AS SELECT {spec.select}, {valid_sql(spec)} AS _valid "
        f"FROM (SELECT {typed_sql(spec)} FROM {source})"
    )
    return scalar(con, f"SELECT count(*) FROM {table} WHERE NOT _valid")


def _find_bad_rows(con, spec: FileSpec, numbered: str, number: str, found: str) -> None:
    """Temp table `found` (n, reason, raw): the bad rows of `numbered`, n being column `number`."""
    con.execute(
        f"CREATE TEMP TABLE {found} AS SELECT n, reason, {raw_sql(spec)} AS raw "
        f"FROM (SELECT {number} AS n, *, {reason_sql(spec)} AS reason FROM {numbered}) WHERE reason <> ''"
    )


# -- CSV and friends -----------------------------------------------------------------------------
def _read_csv(spec: FileSpec, rejects: str) -> str:
    """The read_csv call: explicit dialect, every field as text; bad lines go to table `rejects`."""
    columns = ", ".join(f"{lit(c.name)}: {lit(TEXT)}" for c in spec.columns)
    d = spec.csv
    return (
        f"read_csv({lit(str(spec.path))}, auto_detect=false, delim={lit(d['delim'])}, quote={lit(d['quote'])}, "
        f"escape={lit(d['escape'])}, header={str(d['header']).lower()}, encoding={lit(d['encoding'])}, "
        f"nullstr={lit(NEVER_NULL)}, columns={{{columns}}}, store_rejects=true, rejects_table={lit(rejects)}, "
        f"rejects_scan={lit(rejects + '_scan')})"
    )


def _stage_csv(con, spec: FileSpec, table: str, bad: str) -> None:
    rejects = f"{bad}_rejects"
    if not _typed_into(con, spec, table, _read_csv(spec, rejects)):
        con.execute(f"CREATE TEMP TABLE {bad} AS {_rejected_lines(spec, rejects)}")
    else:
        emitted = scalar(con, f"SELECT count(*) FROM {table}")
        _locate_bad_csv_rows(con, spec, bad, emitted)
        con.execute(f"DELETE FROM {table} WHERE NOT _valid")
    con.execute(f"DROP TABLE {rejects}")
    con.execute(f"DROP TABLE {rejects}_scan")


def _locate_bad_csv_rows(con, spec: FileSpec, bad: str, emitted: int) -> None:
    """Read the file again, in order, for its bad rows and their line numbers (see lines.py)."""
    rejects, found, skipped = f"{bad}_rejects2", f"{bad}_found", f"{bad}_skipped"
    keep_order = scalar(con, "SELECT current_setting('preserve_insertion_order')")
    con.execute("SET preserve_insertion_order = true")  # ordinals in file order
    _find_bad_rows(con, spec, f"{_read_csv(spec, rejects)} WITH ORDINALITY", "ordinality", found)
    con.execute(f"SET preserve_insertion_order = {str(keep_order).lower()}")
    header = [1] if spec.csv["header"] else []
    accounted = emitted + len(header) + scalar(con, f"SELECT count(DISTINCT line) FROM {rejects}")
    # Lines as the file has them, unless quoted fields span lines (then only the numbering that
    # honours the quotes accounts for every line; a quote inside a field, which DuckDB reads as
    # text, would mislead it, so it comes second).
    for quote in dict.fromkeys(("", spec.csv["quote"])):
        empty, n_lines = empty_lines(spec.path, quote)
        if accounted + len(empty) == n_lines:
            break
    else:
        raise BatchrecError(
            f"{spec.label}: has bad rows but its lines cannot be numbered ({n_lines:,} lines, "
            f"{accounted:,} of them read or rejected) (expected a CSV file whose quotes are "
            f"RFC 4180's)"
        )
    con.execute(
        f"CREATE TEMP TABLE {skipped} AS SELECT s, row_number() OVER (ORDER BY s) AS j "
        f"FROM (SELECT DISTINCT line AS s FROM {rejects} UNION SELECT unnest($others::BIGINT[]))",
        {"others": [*header, *empty.tolist()]},
    )
    # The k-th row is on the k-th line not skipped: k plus the skipped lines before it, which are
    # those whose count of unskipped lines before them (s - j) is below k.
    con.execute(f"""
        CREATE TEMP TABLE {bad} AS
        {_rejected_lines(spec, rejects)}
        UNION ALL
        SELECT f.n + coalesce(m.j, 0) AS line, f.reason, f.raw
        FROM {found} f ASOF LEFT JOIN (SELECT s - j AS g, max(j) AS j FROM {skipped} GROUP BY ALL) m ON f.n > m.g
    """)
    for t in (found, skipped, rejects, rejects + "_scan"):
        con.execute(f"DROP TABLE {t}")


def _rejected_lines(spec: FileSpec, rejects: str) -> str:
    """SELECT (line, reason, raw) of the lines DuckDB's reader rejected, one row per line."""
    layout = lit(f"{len(spec.columns)}: {','.join(c.name for c in spec.columns)}")
    return f"""
        SELECT line::BIGINT AS line, CASE
            WHEN error_type IN ('MISSING COLUMNS', 'TOO MANY COLUMNS')
                THEN regexp_extract(error_message, 'Found: (\\d+)', 1) || ' fields (expected ' || {layout} || ')'
            WHEN error_type IN ('INVALID ENCODING', 'INVALID UNICODE')
                THEN 'invalid UTF-8 byte sequence (expected UTF-8 text)'
            ELSE lower(error_type) || ': ' || split_part(error_message, chr(10), 1) || ' (expected ' || {layout} || ')'
        END AS reason, trim(csv_line, chr(10) || chr(13)) AS raw
        FROM {rejects}
        -- one reason per line; a wrong number of fields says the most (the fields are misaligned)
        QUALIFY row_number() OVER (PARTITION BY line ORDER BY error_type NOT IN ('MISSING COLUMNS', 'TOO MANY COLUMNS'),
                                                         column_idx) = 1"""


# -- Parquet: typed already; rows numbered from 1 -------------------------------------------------
def _stage_parquet(con, spec: FileSpec, table: str, bad: str) -> None:
    source = f"read_parquet({lit(str(spec.path))}, file_row_number = true)"
    if not _typed_into(con, spec, table, source):
        con.execute(f"CREATE TEMP TABLE {bad} (line BIGINT, reason VARCHAR, raw VARCHAR)")
        return
    _find_bad_rows(con, spec, source, "file_row_number + 1", f"{bad}_found")
    con.execute(f"CREATE TEMP TABLE {bad} AS SELECT n AS line, reason, raw FROM {bad}_found")
    con.execute(f"DROP TABLE {bad}_found")
    con.execute(f"DELETE FROM {table} WHERE NOT _valid")
