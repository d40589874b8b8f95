"""The generic reader: CSV or Parquet files whose header names the columns.

Each file's header is matched against common names (userId / user_id / UserID, movieId / itemId /
item_id / MovieID, rating, timestamp / ts, tag, title, genres, gender, age, occupation, zip),
case- and punctuation-insensitively; `--columns user_id=UserID,item_id=MovieID,...` names them
explicitly. A file's columns decide its kind: user + item + tag -> tags, user + item -> ratings,
item + title/genres -> items, user + demographics -> users; other files (e.g. links.csv) are
ignored.

Choices, documented: generic ratings are checked against the warehouse's rating scale (set by its
first load, or `--rating-scale`; see run.py); without a rating column the interactions are
implicit (rating NULL); a timestamp column is required and each of its values may be unix
seconds or an ISO date-time (without an offset, UTC); an age must be a whole number; gender,
occupation and zip are free text. CSV dialects come from DuckDB's sniffer, and every field is
read as text and checked (spec.py). Parquet has no lines: its errors name the 1-based row.
"""

from __future__ import annotations

import re
from pathlib import Path

import duckdb

from batchrec.errors import BatchrecError
from batchrec.ingest.sources import Source
from batchrec.ingest.spec import (
    KINDS,
    TEXT,
    Column,
    FileSpec,
    Limits,
    Text,
    dialect,
    lit,
    role_checks,
    select_sql,
)
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
SUFFIXES = {".csv", ".tsv", ".txt", ".dat", ".parquet"}


def parse_columns(text: str | None) -> dict[str, str]:
    """'user_id=UserID,item_id=MovieID' -> {'user_id': 'UserID', 'item_id': 'MovieID'}."""
    if not text:
        return {}
    mapping = {}
    for part in text.split(","):
        role, sep, name = part.partition("=")
        role, name = role.strip(), name.strip()
        if not sep or not name:
            raise BatchrecError(
                f"--columns: {part.strip()!r} is not FIELD=COLUMN (expected e.g. "
                f"'user_id=UserID,item_id=MovieID,rating=Rating,ts=Timestamp')"
            )
        if role not in ROLES:
            raise BatchrecError(f"--columns: unknown field {role!r} (expected some of {', '.join(ROLES)})")
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


def _is_parquet(path: Path) -> bool:
    with open(path, "rb") as fh:
        return path.suffix.lower() == ".parquet" or fh.read(4) == b"PAR1"


def _describe(con, path: Path, label: str) -> tuple[dict | None, list[tuple[str, str]]]:
    """(CSV dialect or None for Parquet, [(column, type the reader hands it over as)])."""
    if _is_parquet(path):
        try:
            rows = con.execute(f"DESCRIBE SELECT * FROM read_parquet({lit(str(path))})").fetchall()
        except duckdb.Error as exc:
            raise BatchrecError(
                f"{label}: not a readable Parquet file ({str(exc).splitlines()[0]}) (expected an "
                f"intact Parquet file)"
            ) from None
        return None, [(r[0], r[1]) for r in rows]
    sniff = query_pl(
        con, f"SELECT Delimiter, Quote, Escape, HasHeader, Columns FROM sniff_csv({lit(str(path))})"
    ).row(0, named=True)
    if not sniff["HasHeader"]:
        return {}, []
    unquote = lambda s: "" if s == "(empty)" else s  # noqa: E731 - sniff_csv spells "none" this way
    read_as = dialect(
        sniff["Delimiter"], header=True, quote=unquote(sniff["Quote"]), escape=unquote(sniff["Escape"])
    )
    return read_as, [(c["name"], TEXT) for c in sniff["Columns"]]


STORED = {  # the roles each kind stores; other recognised columns are kept as text, unchecked
    "ratings": ("user_id", "item_id", "rating", "ts"),
    "tags": ("user_id", "item_id", "tag", "ts"),
    "items": ("item_id", "title", "genres"),
    "users": ("user_id", *DEMOGRAPHICS),
}


def _spec(
    path: Path,
    label: str,
    read_as: dict | None,
    described: list[tuple[str, str]],
    roles: dict[str, str],
    kind: str,
    limits: Limits,
) -> FileSpec:
    checks = role_checks(limits.latest, limits.scale, iso=True)
    stored = {role: column for role, column in roles.items() if role in STORED[kind]}
    check_of = {column: checks[role] for role, column in stored.items() if role in checks}
    columns = tuple(Column(name, check_of.get(name, Text()), sql_type) for name, sql_type in described)
    scale = limits.scale if "rating" in stored else None
    return FileSpec(kind, path, label, "generic", columns, select_sql(kind, stored), read_as, scale=scale)


def layout(con, source: Source, mapping: dict[str, str], limits: Limits) -> tuple[FileSpec, ...]:
    """Every recognisable CSV/Parquet file of `source` (none: an empty tuple)."""
    specs: list[FileSpec] = []
    used: set[str] = set()
    for rel in source.files():
        if rel.suffix.lower() not in SUFFIXES:
            continue
        path = source.path(rel)
        if path.stat().st_size == 0:
            continue
        label = source.label_of(rel)
        try:
            read_as, described = _describe(con, path, label)
        except duckdb.Error:  # not a CSV DuckDB can make sense of: not one of ours
            continue
        roles = _roles([c for c, _ in described], mapping)
        kind = _kind(roles)
        if kind is None:
            continue
        if kind in ("ratings", "tags") and "ts" not in roles:
            raise BatchrecError(
                f"{label}:1: no timestamp column among {', '.join(c for c, _ in described)} (expected "
                f"one named timestamp/ts/time/datetime or --columns ts=NAME)"
            )
        used.update(roles.values())
        specs.append(_spec(path, label, read_as, described, roles, kind, limits))
    unmatched = [f"{role}={name}" for role, name in mapping.items() if name not in used]
    if unmatched:
        raise BatchrecError(
            f"--columns: {', '.join(unmatched)} matches no column of the files in {source.label} "
            f"(expected column names from their headers)"
        )
    if specs and not any(s.kind == "ratings" for s in specs):
        found = ", ".join(f"{s.label} ({s.kind})" for s in specs)
        raise BatchrecError(
            f"{source.label}: found {found} but no ratings file (expected a CSV/Parquet file "
            f"with user, item and timestamp columns)"
        )
    return tuple(sorted(specs, key=lambda s: (KINDS.index(s.kind), s.label)))
