"""The file spec every reader shares: its columns, what each must hold, and the SQL that checks it.

A `FileSpec` says how DuckDB reads one file (a CSV dialect, or Parquet), what each column must
hold (a `Check`) and which SELECT list turns the checked columns into the staging columns of its
kind. `formats.py` builds specs for the MovieLens releases, `generic.py` from a file's header;
`read.py` runs them.

How a field is checked: a CSV field is read as text, verbatim, and a check turns the text into
its typed value with a strict pattern in SQL; the value is NULL exactly when the field is bad,
so a row is good when all its checked values are non-NULL (one vectorised pass). Nothing is
rounded: ids and unix seconds must be written as whole numbers (`1.5`, `1e3`, `0x10`, `1_000`,
`964982703.6` are bad, where DuckDB's own integer parsing would round or accept them); a
rating must be a finite number on the scale; a timestamp may not be later than the ingest time
plus `--max-future`. Why a field is bad (`reason_sql`) is only worked out for bad rows.

A Parquet column keeps its own type: integer columns hold ids and unix seconds as they are;
a FLOAT/DOUBLE/DECIMAL id or timestamp must be exactly integral (3.0 is 3; 2.5 is a bad row),
TIMESTAMP/DATE columns are times; a BOOLEAN (or any other type) is never an id, a time or a
rating.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

from batchrec.errors import BatchrecError

KINDS = ("ratings", "items", "tags", "users")  # processing order
STAGE_COLUMNS = {  # what a file of each kind gives, in the warehouse's types
    "ratings": {"user_id": "BIGINT", "item_id": "BIGINT", "rating": "FLOAT", "ts": "TIMESTAMP"},
    "items": {"item_id": "BIGINT", "title": "VARCHAR", "year": "INTEGER", "genres": "VARCHAR[]"},
    "tags": {"user_id": "BIGINT", "item_id": "BIGINT", "tag": "VARCHAR", "ts": "TIMESTAMP"},
    "users": {
        "user_id": "BIGINT",
        "gender": "VARCHAR",
        "age": "INTEGER",
        "occupation": "VARCHAR",
        "zip": "VARCHAR",
    },
}
TEXT = "VARCHAR"  # how a CSV reader hands over every field
NEVER_NULL = "\x01"  # CSV nullstr: an empty field stays '' (a bad id, not a NULL found later)

_INTEGER_TYPES = {
    "TINYINT",
    "SMALLINT",
    "INTEGER",
    "BIGINT",
    "HUGEINT",
    "UTINYINT",
    "USMALLINT",
    "UINTEGER",
    "UBIGINT",
    "UHUGEINT",
}
_TIME_TYPES = {"DATE", "TIMESTAMP", "TIMESTAMP_S", "TIMESTAMP_MS", "TIMESTAMP_NS", "TIMESTAMP WITH TIME ZONE"}


def q(name: str) -> str:
    """A SQL identifier."""
    return '"' + name.replace('"', '""') + '"'


def lit(text: str) -> str:
    """A SQL string literal."""
    return "'" + text.replace("'", "''") + "'"


def _family(sql_type: str) -> str:
    """text, integer, fraction (FLOAT/DOUBLE/DECIMAL), time or other."""
    if sql_type == TEXT:
        return "text"
    if sql_type in _INTEGER_TYPES:
        return "integer"
    if sql_type in ("FLOAT", "DOUBLE") or sql_type.startswith("DECIMAL"):
        return "fraction"
    return "time" if sql_type in _TIME_TYPES else "other"


def _whole(x: str) -> str:
    """A FLOAT/DOUBLE/DECIMAL value that is exactly an integer."""
    return f"(isfinite({x}::DOUBLE) AND {x} = trunc({x}))"


# -- rating scales ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Scale:
    """A rating scale: low..high, in steps of `step` from low (None: any value in between)."""

    low: float
    high: float
    step: float | None

    @classmethod
    def parse(cls, text: str) -> Scale:
        """'MIN..MAX' or 'MIN..MAX:STEP', e.g. '0.5..5:0.5' (half stars) or '1..10'."""
        m = re.fullmatch(r"\s*(-?[\d.]+)\s*\.\.\s*(-?[\d.]+)\s*(?::\s*([\d.]+))?\s*", text)
        try:
            low, high, step = float(m[1]), float(m[2]), float(m[3]) if m[3] else None
        except (TypeError, ValueError):
            raise BatchrecError(
                f"--rating-scale {text!r} is not MIN..MAX[:STEP] (expected e.g. 0.5..5:0.5 or 1..10)"
            ) from None
        if not low < high or (step is not None and not 0 < step <= high - low):
            raise BatchrecError(
                f"--rating-scale {text!r} is empty or its step does not fit (expected MIN < MAX "
                f"and 0 < STEP <= MAX - MIN)"
            )
        return cls(low, high, step)

    def ok(self, n: str) -> str:
        """SQL: number `n` is on the scale (never true for NaN or ±inf)."""
        on_step = (
            f" AND abs(({n} - {self.low!r}) / {self.step!r} - round(({n} - {self.low!r}) / {self.step!r})) < 1e-6"
            if self.step
            else ""
        )
        return f"(isfinite({n}) AND {n} BETWEEN {self.low!r} AND {self.high!r}{on_step})"

    def __str__(self) -> str:
        if self.step == 1:
            return f"{self.low:g}..{self.high:g} in whole stars"
        if self.step == 0.5:
            return f"{self.low:.1f}..{self.high:.1f} in half stars"
        return f"{self.low:g}..{self.high:g}" + (f" in steps of {self.step:g}" if self.step else "")


WHOLE_STARS = Scale(1, 5, 1)  # ml-100k, ml-1m
HALF_STARS = Scale(0.5, 5, 0.5)  # ml-10m and every later release; generic files in a new warehouse


# -- checks: what a field must hold --------------------------------------------------------------
class Check:
    """What a field must hold: `value` is SQL giving the field's typed value, NULL exactly when it
    is bad; `problems` are (condition, what is wrong) pairs tried in order for a bad one that is
    not empty ('is not valid' when none holds)."""

    checked = True
    expected = ""

    def value(self, x: str, sql_type: str) -> str:
        raise NotImplementedError

    def problems(self, x: str, sql_type: str) -> list[tuple[str, str]]:
        return [] if _family(sql_type) in ("text", "integer", "fraction") else [("true", f"is a {sql_type}")]


class Text(Check):
    """Any text (titles, genres, zip codes): not checked."""

    checked = False

    def value(self, x: str, sql_type: str) -> str:
        return f"{x}::VARCHAR"


@dataclass(frozen=True)
class Integer(Check):
    """A whole number in the file's own text (or an integer / exactly integral column)."""

    expected: str = "an integer id"
    sql_type: str = "BIGINT"

    def value(self, x: str, sql_type: str) -> str:
        family = _family(sql_type)
        if family == "text":
            return f"CASE WHEN regexp_full_match({x}, '-?[0-9]+') THEN TRY_CAST({x} AS {self.sql_type}) END"
        if family == "fraction":
            return f"CASE WHEN {_whole(x)} THEN TRY_CAST({x} AS {self.sql_type}) END"
        return f"TRY_CAST({x} AS {self.sql_type})" if family == "integer" else f"NULL::{self.sql_type}"

    def problems(self, x: str, sql_type: str) -> list[tuple[str, str]]:
        family = _family(sql_type)
        if family == "text":
            return [(f"regexp_full_match({x}, '-?[0-9]+')", "is out of range")]
        if family == "fraction":
            return [(_whole(x), "is out of range"), ("true", "is not a whole number")]
        return super().problems(x, sql_type) or [("true", "is out of range")]


@dataclass(frozen=True)
class Timestamp(Check):
    """A time no later than `latest` (the ingest time plus --max-future): unix seconds as a whole
    number (0 = 1970-01-01 UTC), or with `iso` also an ISO date-time (UTC unless it has an offset);
    Parquet TIMESTAMP/DATE columns as they are. The value is a naive UTC TIMESTAMP; nothing here
    depends on the session's time zone except ISO text without an offset (ingest sets it to UTC)."""

    latest: datetime
    iso: bool = False

    @property
    def expected(self) -> str:
        return "unix seconds or an ISO date-time" if self.iso else "unix seconds"

    def _seconds(self, n: str) -> str:
        latest = int((self.latest - datetime(1970, 1, 1)).total_seconds())
        return f"CASE WHEN {n} BETWEEN 0 AND {latest} THEN make_timestamp({n} * 1000000) END"

    def _not_late(self, t: str) -> str:
        return f"CASE WHEN {t} <= TIMESTAMP '{self.latest:%Y-%m-%d %H:%M:%S.%f}' THEN {t} END"

    def value(self, x: str, sql_type: str) -> str:
        family = _family(sql_type)
        if family == "text":
            iso = f" ELSE {self._not_late(self._iso(x))}" if self.iso else ""
            return f"CASE WHEN regexp_full_match({x}, '[0-9]+') THEN {self._seconds(f'TRY_CAST({x} AS BIGINT)')}{iso} END"
        if family == "integer":
            return self._seconds(f"TRY_CAST({x} AS BIGINT)")
        if family == "fraction":
            return f"CASE WHEN {_whole(x)} THEN {self._seconds(f'TRY_CAST({x} AS BIGINT)')} END"
        if family == "time":
            t = f"timezone('UTC', {x})" if sql_type == "TIMESTAMP WITH TIME ZONE" else f"{x}::TIMESTAMP"
            return self._not_late(t)
        return "NULL::TIMESTAMP"

    @staticmethod
    def _iso(x: str) -> str:
        return f"timezone('UTC', TRY_CAST({x} AS TIMESTAMPTZ))"

    def problems(self, x: str, sql_type: str) -> list[tuple[str, str]]:
        late = f"is after {self.latest:%Y-%m-%d %H:%M:%S} UTC, the ingest time + --max-future"
        family = _family(sql_type)
        if family == "text":
            parsed = f"regexp_full_match({x}, '[0-9]+')" + (
                f" OR {self._iso(x)} IS NOT NULL" if self.iso else ""
            )
            return [(parsed, late)]
        if family == "integer":
            return [(f"{x} > 0", late)]
        if family == "fraction":
            return [(f"{_whole(x)} AND {x} > 0", late), (f"NOT {_whole(x)}", "is not a whole number")]
        return [("true", late)] if family == "time" else super().problems(x, sql_type)


@dataclass(frozen=True)
class Rating(Check):
    """A finite number on the scale (NaN and ±inf never are)."""

    scale: Scale

    @property
    def expected(self) -> str:
        return f"a rating {self.scale}"

    @staticmethod
    def _number(x: str, sql_type: str) -> str:
        family = _family(sql_type)
        if family == "text":
            return f"TRY_CAST({x} AS DOUBLE)"
        return f"{x}::DOUBLE" if family in ("integer", "fraction") else "NULL::DOUBLE"

    def value(self, x: str, sql_type: str) -> str:
        n = self._number(x, sql_type)
        return f"CASE WHEN {self.scale.ok(n)} THEN {n}::FLOAT END"

    def problems(self, x: str, sql_type: str) -> list[tuple[str, str]]:
        return super().problems(x, sql_type) or [
            (f"{self._number(x, sql_type)} IS NOT NULL", "is outside the scale"),
            ("true", "is not a number"),
        ]


@dataclass(frozen=True)
class OneOf(Check):
    """One of the documented codes (text files only), as `sql_type`."""

    codes: tuple[str, ...]
    expected: str
    sql_type: str = "VARCHAR"

    def value(self, x: str, sql_type: str) -> str:
        return f"CASE WHEN {x} IN ({', '.join(lit(c) for c in self.codes)}) THEN {x}::{self.sql_type} END"


@dataclass(frozen=True)
class NonBlank(Check):
    """Text that is not empty or only spaces (a tag)."""

    expected: str

    def value(self, x: str, sql_type: str) -> str:
        return f"CASE WHEN trim({x}::VARCHAR) <> '' THEN {x}::VARCHAR END"


def role_checks(latest: datetime, scale: Scale, iso: bool = False) -> dict[str, Check]:
    """The check of each role's column (e.g. 'user_id' -> Integer); roles not named are text.
    `iso`: timestamps may be ISO date-times too (generic files)."""
    return {
        "user_id": Integer(),
        "item_id": Integer(),
        "rating": Rating(scale),
        "ts": Timestamp(latest, iso),
        "tag": NonBlank("a tag"),
        "age": Integer("an integer age", "INTEGER"),
    }


# -- what one file is ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Column:
    name: str  # header name, or the README's name for files without a header
    check: Check = field(default_factory=Text)
    type: str = TEXT  # how the reader hands the field over (Parquet: the column's type)


@dataclass(frozen=True)
class FileSpec:
    kind: str
    path: Path
    label: str
    format: str
    columns: tuple[Column, ...]
    select: str  # SQL over the checked columns giving STAGE_COLUMNS[kind]
    csv: dict | None = None  # read_csv dialect; None for Parquet
    header: tuple[str, ...] = ()  # the expected header line, when the format has one
    scale: Scale | None = None  # the scale its ratings are checked against (None: no ratings)


MAX_FUTURE = "1d"  # how much later than the ingest time a timestamp may be (clocks differ)
_DURATION = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([smhd])\s*")


def parse_duration(text: str) -> timedelta:
    """'1d', '36h', '90m', '0s' -> timedelta (the --max-future allowance)."""
    m = _DURATION.fullmatch(str(text))
    if not m:
        raise BatchrecError(f"--max-future {text!r} is not a duration (expected e.g. 1d, 12h, 30m or 0s)")
    return timedelta(seconds=float(m[1]) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[m[2]])


@dataclass(frozen=True)
class Limits:
    """What the values of one ingest are checked against."""

    latest: datetime  # the ingest time + --max-future: later timestamps are bad rows
    scale: Scale  # generic ratings (MovieLens releases have their published scale)


def dialect(
    delim: str, encoding: str = "utf-8", header: bool = False, quote: str = "", escape: str | None = None
) -> dict:
    return {
        "delim": delim,
        "header": header,
        "quote": quote,
        "escape": quote if escape is None else escape,
        "encoding": encoding,
    }


# -- SQL over a spec ---------------------------------------------------------------------------------
def typed_sql(spec: FileSpec) -> str:
    """SELECT list: every column as its checked, typed value (NULL when bad), under its own name."""
    return ", ".join(f"{c.check.value(q(c.name), c.type)} AS {q(c.name)}" for c in spec.columns)


def valid_sql(spec: FileSpec) -> str:
    """SQL over typed_sql's columns: the row is good. For CSV it names every column, so every
    query of the file makes the reader parse every field (DuckDB skips the fields a query does
    not use, and with them their encoding errors, which would make two reads of one file reject
    different lines)."""
    columns = spec.columns if spec.csv is not None else [c for c in spec.columns if c.check.checked]
    return " AND ".join(f"{q(c.name)} IS NOT NULL" for c in columns) or "true"


def reason_sql(spec: FileSpec) -> str:
    """SQL over the file's own columns: why the row is bad ('' when it is good), e.g.
    "userId '1.5' is not valid (expected an integer id); rating 'nan' is outside the scale (...)"."""
    reasons = []
    for c in spec.columns:
        if not c.check.checked:
            continue
        x = q(c.name)
        cases = "".join(f"WHEN {cond} THEN {lit(what)} " for cond, what in c.check.problems(x, c.type))
        problem = f"CASE {cases}ELSE 'is not valid' END" if cases else "'is not valid'"
        what = (
            f"CASE WHEN {x} IS NULL OR {x}::VARCHAR = '' THEN 'is empty' "
            f"ELSE '''' || {x}::VARCHAR || ''' ' || {problem} END"
        )
        reasons.append(
            f"CASE WHEN ({c.check.value(x, c.type)}) IS NULL THEN {lit(c.name + ' ')} || {what} || "
            f"{lit(f' (expected {c.check.expected})')} END"
        )
    return f"concat_ws('; ', {', '.join(reasons)})" if reasons else "''"


def raw_sql(spec: FileSpec) -> str:
    """SQL over the file's own columns: the row as text (its fields joined by the delimiter)."""
    delim = spec.csv["delim"] if spec.csv else ","
    return f"concat_ws({lit(delim)}, {', '.join(f'{q(c.name)}::VARCHAR' for c in spec.columns)})"


def year_sql(col: str) -> str:
    """The last '(YYYY)' (or '(YYYY-YYYY)' for series) of a title; NULL when there is none."""
    return f"TRY_CAST(nullif(regexp_extract(trim({q(col)}), '.*\\((\\d{{4}})(?:[-–]\\d{{0,4}})?\\)', 1), '') AS INTEGER)"


def genres_sql(col: str) -> str:
    """'A|B' -> ['A', 'B']; '' and '(no genres listed)' -> []."""
    return (
        f"CASE WHEN coalesce({q(col)}, '') IN ('', '(no genres listed)') THEN []::VARCHAR[] "
        f"ELSE string_split({q(col)}, '|') END"
    )


def select_sql(kind: str, roles: dict[str, str], **exprs: str) -> str:
    """The SELECT list giving STAGE_COLUMNS[kind] from the columns named in `roles` (role ->
    column); `exprs` give SQL for roles that are not one column's value (e.g. ml-100k's genre
    flags); roles with neither are NULL. Items get their title trimmed and their year from it."""
    sql = {role: q(column) for role, column in roles.items()}
    if kind == "items":
        title = roles.get("title")
        sql.update(
            title=f"trim({q(title)})" if title else "NULL",
            year=year_sql(title) if title else "NULL",
            genres=genres_sql(roles["genres"]) if "genres" in roles else "[]",
        )
    sql.update(exprs)
    return ", ".join(
        f"{sql.get(name, 'NULL')}::{sql_type} AS {name}" for name, sql_type in STAGE_COLUMNS[kind].items()
    )
