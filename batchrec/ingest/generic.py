"""The generic reader: CSV or Parquet files whose header names the columns.

Each file's header is matched against common names (userId / user_id / UserID, movieId / itemId /
item_id / MovieID, rating, timestamp / ts, tag, title, genres, gender, age, occupation, zip),
case- and punctuation-insensitively; `--columns user_id=UserID,item_id=MovieID,...` names them
explicitly. A file's columns decide its kind: user + item + tag -> tags, user + item -> ratings,
item + title/genres -> items, user + demographics -> users; other files (e.g. links.csv) are
ignored.

Choices, documented: generic ratings have no published scale, so any finite number is accepted
(parsed as DECIMAL, which rejects 'nan' and 'inf'); without a rating column the interactions are
implicit (rating NULL); a timestamp column is required and may hold unix seconds or ISO date-times
(without an offset they are UTC). CSV dialects come from DuckDB's sniffer. Parquet has no lines:
its errors name the 1-based row instead.
"""

from __future__ import annotations

import re
from pathlib import Path

import duckdb

from batchrec.errors import BatchrecError
from batchrec.ingest.formats import (
    ID, KINDS, NEVER_NULL, UNIX_SECONDS, Column, FileSpec, Layout, genres_sql, items_select, lit, q, ratings_select,
    tags_select, unix_ts,
)
from batchrec.ingest.sources import Source
from batchrec.warehouse import query_pl

ROLES = {
    "user_id": ("userid", "user", "uid", "customerid"),
    "item_id": ("itemid", "item", "movieid", "movie", "iid", "productid"),
    "rating": ("rating", "score", "stars"),
    "ts": ("timestamp", "ts", "time", "datetime", "ratedat", "date"),
    "tag": ("tag",),
    "title": ("title",),
    "genres": ("genres", "genre"),
    "gender": ("gender", "sex"),
    "age": ("age",),
    "occupation": ("occupation", "job"),
    "zip": ("zip", "zipcode", "postcode", "postalcode"),
}
DEMOGRAPHICS = ("gender", "age", "occupation", "zip")
INTEGER_TYPES = {"TINYINT", "SMALLINT", "INTEGER", "BIGINT", "HUGEINT", "UTINYINT", "USMALLINT", "UINTEGER", "UBIGINT"}
SUFFIXES = {".csv", ".tsv", ".txt", ".dat", ".parquet"}
TS_EXPECTED = "unix seconds or an ISO date-time"


def parse_columns(text: str | None) -> dict[str, str]:
    """'user_id=UserID,item_id=MovieID' -> {'user_id': 'UserID', 'item_id': 'MovieID'}."""
    if not text:
        return {}
    mapping = {}
    for part in text.split(","):
        role, sep, name = part.partition("=")
        role, name = role.strip(), name.strip()
        if not sep or not name:
            raise BatchrecError(f"--columns: {part.strip()!r} is not FIELD=COLUMN, expected e.g. "
                                f"'user_id=UserID,item_id=MovieID,rating=Rating,ts=Timestamp'")
        if role not in ROLES:
            raise BatchrecError(f"--columns: unknown field {role!r}, expected some of {', '.join(ROLES)}")
        mapping[role] = name
    return mapping


def _norm(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def _roles(columns: list[str], mapping: dict[str, str]) -> dict[str, str]:
    """Role -> column name of this file: the mapping first, then the common names."""
    by_norm = {_norm(c): c for c in columns}
    found = {}
    for role, names in ROLES.items():
        if role in mapping:
            if mapping[role] in columns:
                found[role] = mapping[role]
            continue
        hit = next((by_norm[n] for n in names if n in by_norm), None)
        if hit is not None and hit not in found.values():
            found[role] = hit
    return found


def _kind(roles: dict[str, str]) -> str | None:
    if "user_id" in roles and "item_id" in roles:
        return "tags" if "tag" in roles else "ratings"
    if "item_id" in roles and ("title" in roles or "genres" in roles):
        return "items"
    if "user_id" in roles and any(r in roles for r in DEMOGRAPHICS):
        return "users"
    return None


def _describe(con, path: Path) -> tuple[dict | None, list[tuple[str, str]]]:
    """(CSV dialect or None for Parquet, [(column, sniffed type)])."""
    if path.suffix.lower() == ".parquet":
        rows = con.execute(f"DESCRIBE SELECT * FROM read_parquet({lit(str(path))})").fetchall()
        return None, [(r[0], r[1]) for r in rows]
    sniff = query_pl(con, f"SELECT Delimiter, Quote, Escape, HasHeader, Columns FROM sniff_csv({lit(str(path))})").row(0, named=True)
    if not sniff["HasHeader"]:
        return {}, []
    unquote = lambda s: "" if s == "(empty)" else s  # noqa: E731 - sniff_csv spells "none" this way
    dialect = {"delim": sniff["Delimiter"], "header": True, "quote": unquote(sniff["Quote"]),
               "escape": unquote(sniff["Escape"]), "encoding": "utf-8"}
    return dialect, [(c["name"], c["type"]) for c in sniff["Columns"]]


def _spec(path: Path, label: str, dialect: dict | None, described: list[tuple[str, str]], roles: dict[str, str],
          kind: str) -> FileSpec:
    ts = roles.get("ts")
    ts_numeric = ts is not None and dict(described)[ts] in INTEGER_TYPES
    types = {roles.get("user_id"): ("BIGINT", ID), roles.get("item_id"): ("BIGINT", ID),
             roles.get("rating"): ("DECIMAL(18,6)", "a finite number"),
             ts: ("UINTEGER", UNIX_SECONDS) if ts_numeric else ("TIMESTAMPTZ", TS_EXPECTED)}
    columns = tuple(Column(name, *types.get(name, ("VARCHAR", "text"))) for name, _ in described)
    ts_sql = (unix_ts(ts) if ts_numeric else f"timezone('UTC', {q(ts)})") if ts else None
    r = roles
    if kind == "ratings":
        select = ratings_select(r["user_id"], r["item_id"], r.get("rating"), ts_sql)
    elif kind == "tags":
        select = tags_select(r["user_id"], r["item_id"], r["tag"], ts_sql)
    elif kind == "items":
        genres = genres_sql(r["genres"]) if "genres" in r else "[]::VARCHAR[]"
        select = items_select(r["item_id"], r.get("title"), genres)
    else:
        col = lambda role: q(r[role]) if role in r else "NULL"  # noqa: E731
        select = (f"{q(r['user_id'])} AS user_id, {col('gender')}::VARCHAR AS gender, "
                  f"TRY_CAST({col('age')} AS INTEGER) AS age, {col('occupation')}::VARCHAR AS occupation, "
                  f"{col('zip')}::VARCHAR AS zip")
    if dialect is None:  # Parquet: columns keep their own types; read.py validates with TRY_CAST
        columns = tuple(Column(name, types.get(name, (t, ""))[0], types.get(name, (t, "a value"))[1])
                        for name, t in described)
    return FileSpec(kind, path, label, "generic", columns, select, dialect)


def layout(con, source: Source, mapping: dict[str, str]) -> Layout | None:
    """Every recognisable CSV/Parquet file of `source`, or None when there is none."""
    specs: list[FileSpec] = []
    used: set[str] = set()
    for rel in source.files():
        path = source.root / rel
        if path.suffix.lower() not in SUFFIXES or path.stat().st_size == 0:
            continue
        try:
            dialect, described = _describe(con, path)
        except duckdb.Error:  # not a CSV/Parquet DuckDB can make sense of: not one of ours
            continue
        roles = _roles([c for c, _ in described], mapping)
        kind = _kind(roles)
        if kind is None:
            continue
        label = source.label_of(rel)
        if kind in ("ratings", "tags") and "ts" not in roles:
            raise BatchrecError(f"{label}:1: no timestamp column among {', '.join(c for c, _ in described)}, expected "
                                f"one named timestamp/ts/time/datetime or --columns ts=NAME")
        used.update(roles.values())
        specs.append(_spec(path, label, dialect, described, roles, kind))
    unmatched = [f"{role}={name}" for role, name in mapping.items() if name not in used]
    if unmatched:
        raise BatchrecError(f"--columns: {', '.join(unmatched)} matches no column of the files in {source.label}, "
                            f"expected column names from their headers")
    if not specs:
        return None
    if not any(s.kind == "ratings" for s in specs):
        found = ", ".join(f"{s.label} ({s.kind})" for s in specs)
        raise BatchrecError(f"{source.label}: found {found} but no ratings file, expected a CSV/Parquet file "
                            f"with user, item and timestamp columns")
    specs.sort(key=lambda s: (KINDS.index(s.kind), s.label))
    return Layout("generic", specs)
