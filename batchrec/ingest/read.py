"""Read one file into a staging table and find its bad lines, all inside DuckDB.

CSV-like files are read once by DuckDB's native reader with every column typed (see
formats.py): a line whose fields do not parse, or that has too few or too many fields, is
rejected by the reader itself, which records its line number and raw text (`store_rejects`).
The only check that is not a parse is the rating scale; it is counted on the staged rows, and
only when some rating is off the scale is the file read a second time with the rating typed as
an ENUM of the spellings that are on it, so that the reader rejects those lines too, with their
line numbers. Valid files therefore cost one native read.

Line numbers are DuckDB's: 1-based lines of the file (the header is line 1), which are physical
lines unless a quoted field spans several (MovieLens files have none). Parquet has no lines; its
rows are validated with TRY_CAST and numbered from 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import duckdb

from batchrec.errors import BatchrecError
from batchrec.ingest.formats import NEVER_NULL, FileSpec, lit, q
from batchrec.warehouse import scalar


@dataclass(frozen=True)
class Staged:
    spec: FileSpec
    table: str       # where the good rows are: a temp table (STAGE_COLUMNS[kind]) or the target itself
    direct: bool     # True: the rows were appended straight to the (empty) warehouse table
    source_id: int   # the file's id in `sources`, which every row it adds carries
    bad: str         # temp table (line, reason, raw) of the rejected lines
    rows_read: int   # data lines (or rows) in the file
    n_bad: int


@dataclass(frozen=True)
class _Destination:
    """A new temp table, or (direct) an empty warehouse table the rows are appended to."""

    table: str
    direct: bool
    source_id: int

    def fill(self, con, select: str, source: str) -> None:
        if self.direct:
            con.execute(f"INSERT INTO {self.table} BY NAME SELECT {select}, {self.source_id:d} AS source_id "
                        f"FROM {source}").fetchall()
        else:
            con.execute(f"CREATE TEMP TABLE {self.table} AS SELECT {select} FROM {source}")

    def clear(self, con) -> None:
        con.execute(f"DELETE FROM {self.table}" if self.direct else f"DROP TABLE IF EXISTS {self.table}").fetchall()


def stage(con: duckdb.DuckDBPyConnection, spec: FileSpec, n: int, source_id: int, into: str | None = None) -> Staged:
    """Read `spec` into temp table stage_<n> (or, with `into`, straight into that empty warehouse
    table with `source_id`, which saves a copy of a big first load) and its rejected lines into bad_<n>."""
    if spec.path.stat().st_size == 0:
        raise BatchrecError(f"{spec.label}: empty file, expected {spec.kind} rows")
    dest = _Destination(into or f"stage_{n}", into is not None, source_id)
    bad = f"bad_{n}"
    try:
        if spec.csv is None:
            _stage_parquet(con, spec, dest, bad)
        else:
            _stage_csv(con, spec, dest, bad)
    except duckdb.Error as exc:  # a file the reader cannot even start on (I/O, encoding setup)
        raise BatchrecError(f"{spec.label}: cannot read ({str(exc).splitlines()[0]}), expected a "
                            f"{spec.format} {spec.kind} file") from None
    good = scalar(con, f"SELECT count(*) FROM {dest.table}")
    n_bad = scalar(con, f"SELECT count(*) FROM {bad}")
    if good + n_bad == 0:
        raise BatchrecError(f"{spec.label}: no data rows, expected {spec.kind} rows"
                            + (" after the header" if spec.csv and spec.csv["header"] else ""))
    return Staged(spec, dest.table, dest.direct, source_id, bad, good + n_bad, n_bad)


# -- CSV and friends: the native reader does the validation -----------------------------------
def _read_csv(spec: FileSpec, rejects: str | None, types: dict[str, str] | None = None) -> str:
    """The read_csv call: explicit dialect and types; bad lines go to table `rejects` (or are skipped)."""
    types = types or {}
    columns = ", ".join(f"{lit(c.name)}: {lit(types.get(c.name, c.type))}" for c in spec.columns)
    d = spec.csv
    on_error = (f"store_rejects=true, rejects_table={lit(rejects)}, rejects_scan={lit(rejects + '_scan')}"
                if rejects else "ignore_errors=true")
    return (f"read_csv({lit(str(spec.path))}, auto_detect=false, delim={lit(d['delim'])}, quote={lit(d['quote'])}, "
            f"escape={lit(d['escape'])}, header={str(d['header']).lower()}, encoding={lit(d['encoding'])}, "
            f"nullstr={lit(NEVER_NULL)}, columns={{{columns}}}, {on_error})")


def _stage_csv(con, spec: FileSpec, dest: _Destination, bad: str) -> None:
    rejects = f"{bad}_rejects"
    _read_into(con, spec, dest, rejects)
    off_scale = 0
    if spec.scale is not None:
        off_scale = scalar(con, f"SELECT count(*) FROM {dest.table} WHERE NOT {spec.scale.ok('rating')}")
    if off_scale:
        _reread_with_scale(con, spec, dest, rejects, off_scale)
    _bad_lines(con, spec, rejects, bad)


def _read_into(con, spec: FileSpec, dest: _Destination, rejects: str, rating_type: str | None = None) -> None:
    """The file's rows through `spec.select` into `dest`; bad lines into `rejects`."""
    source = _read_csv(spec, rejects, {spec.rating: rating_type} if rating_type else None)
    whole = f"{rejects}_whole"
    if not all(q(c.name) in spec.select for c in spec.columns):
        # DuckDB's reader names the wrong column in its rejects when the scan skips columns the
        # query does not use, so files with unused columns (small ones) are read whole first.
        con.execute(f"CREATE TEMP TABLE {whole} AS SELECT * FROM {source}")
        source = whole
    if rating_type:
        source = f"(SELECT * REPLACE ({q(spec.rating)}::VARCHAR::DOUBLE AS {q(spec.rating)}) FROM {source})"
    dest.fill(con, spec.select, source)
    con.execute(f"DROP TABLE IF EXISTS {whole}")


def _reread_with_scale(con, spec: FileSpec, dest: _Destination, rejects: str, off_scale: int) -> None:
    """Read again with the rating typed as an ENUM of its valid spellings in this file, so the
    reader rejects the off-scale lines with their line numbers like any other bad field."""
    parse_errors = scalar(con, f"SELECT count(DISTINCT line) FROM {rejects}")
    as_text = _read_csv(spec, None, {spec.rating: "VARCHAR"})
    spellings = con.execute(
        f"SELECT DISTINCT r FROM (SELECT {q(spec.rating)} AS r FROM {as_text}) "
        f"WHERE {spec.scale.ok('TRY_CAST(r AS FLOAT)')}").fetchall()
    members = ", ".join(lit(s) for (s,) in spellings) or lit(NEVER_NULL)
    dest.clear(con)
    con.execute(f"DROP TABLE {rejects}")
    con.execute(f"DROP TABLE {rejects}_scan")
    _read_into(con, spec, dest, rejects, f"ENUM({members})")
    found = scalar(con, f"SELECT count(DISTINCT line) FROM {rejects}")
    if found != parse_errors + off_scale:  # both passes use one parser; a mismatch is a bug here
        raise RuntimeError(f"{spec.label}: {off_scale} ratings off the scale but {found - parse_errors} located")


def _bad_lines(con, spec: FileSpec, rejects: str, bad: str) -> None:
    """One row per rejected line: its number, every reason ('; '-joined) and the raw text."""
    names = [c.name for c in spec.columns]
    params = {
        "names": names,
        "expected": [c.expected for c in spec.columns],
        "rating": spec.rating or "",
        "scale": str(spec.scale) if spec.scale else "",
        "layout": f"{len(names)} ({','.join(names)})",
    }
    con.execute(f"""
        CREATE TEMP TABLE {bad} AS
        WITH e AS (
            SELECT line, column_idx, column_name AS col, error_type, error_message,
                   trim(csv_line, chr(10) || chr(13)) AS raw,
                   regexp_extract(error_message, 'Could not convert string "(.*?)" to ', 1) AS val,
                   $expected[list_position($names, column_name)] AS expected
            FROM {rejects}
        )
        SELECT line::BIGINT AS line, string_agg(reason, '; ' ORDER BY column_idx) AS reason, any_value(raw) AS raw
        FROM (
            -- a line with the wrong number of fields says only that (its fields are misaligned)
            SELECT line, column_idx, raw, error_type IN ('MISSING COLUMNS', 'TOO MANY COLUMNS') AS count_error,
                   bool_or(count_error) OVER (PARTITION BY line) AS line_has_count_error, CASE
                WHEN error_type = 'CAST' AND col = $rating AND TRY_CAST(val AS DOUBLE) IS NOT NULL
                    THEN col || ' ''' || val || ''' outside the scale, expected ' || $scale
                WHEN error_type = 'CAST' AND val = ''
                    THEN col || ' is empty, expected ' || expected
                WHEN error_type = 'CAST'
                    THEN col || ' ''' || val || ''' is not valid, expected ' || expected
                WHEN error_type IN ('MISSING COLUMNS', 'TOO MANY COLUMNS')
                    THEN regexp_extract(error_message, 'Found: (\\d+)', 1) || ' fields, expected ' || $layout
                WHEN error_type IN ('INVALID ENCODING', 'INVALID UNICODE')
                    THEN 'invalid UTF-8 byte sequence, expected UTF-8 text'
                ELSE lower(error_type) || ' (' || split_part(error_message, chr(10), 1) || '), expected ' || $layout
            END AS reason
            FROM e
        )
        WHERE count_error OR NOT line_has_count_error
        GROUP BY line
    """, params)


# -- Parquet: typed already; validate the role columns with TRY_CAST ---------------------------
def _stage_parquet(con, spec: FileSpec, dest: _Destination, bad: str) -> None:
    typed, reasons = [], []
    for c in spec.columns:
        if c.expected in ("", "a value", "text"):
            typed.append(q(c.name))
            continue
        cast = f"TRY_CAST({q(c.name)} AS {c.type})"
        typed.append(f"{cast} AS {q(c.name)}")
        reasons.append(f"CASE WHEN {q(c.name)} IS NULL THEN {lit(c.name + ' is empty, expected ' + c.expected)} "
                       f"WHEN {cast} IS NULL THEN {lit(c.name + ' ')} || '''' || {q(c.name)}::VARCHAR || '''' || "
                       f"{lit(' is not valid, expected ' + c.expected)} END")
    raw = "concat_ws(',', " + ", ".join(f"{q(c.name)}::VARCHAR" for c in spec.columns) + ")"
    checked = f"{bad}_checked"
    con.execute(f"""
        CREATE TEMP TABLE {checked} AS
        SELECT file_row_number + 1 AS line, concat_ws('; ', {', '.join(reasons) or 'NULL'}) AS reason,
               {raw} AS raw, {', '.join(typed)}
        FROM read_parquet({lit(str(spec.path))}, file_row_number = true)
    """)
    dest.fill(con, spec.select, f"(SELECT * FROM {checked} WHERE reason = '')")
    con.execute(f"CREATE TEMP TABLE {bad} AS SELECT line::BIGINT AS line, reason, raw FROM {checked} WHERE reason <> ''")
    con.execute(f"DROP TABLE {checked}")

