"""The MovieLens release layouts, and which format a set of files is.

The layouts are described here from the published READMEs (see spec.py for how a spec is read
and checked). Conventions (documented choices):
* Unix timestamps are whole seconds from 0 up to the ingest time + --max-future; they become
  naive UTC TIMESTAMPs via `make_timestamp`, which no session time zone can shift.
* ml-1m's users.dat holds the README's codes only: gender M/F, age group 1, 18, 25, 35, 45, 50
  or 56 (the group's lower bound is stored), occupation 0..20 (stored as the README's name);
  ml-100k's u.user gender M/F and an occupation from its u.occupation list. A tag is never blank.
* ml-100k's genre flag `unknown` and ml-latest's "(no genres listed)" both give the empty list.
* A file named like a MovieLens file whose header is not that release's is an error, not a
  generic file: `--format generic` (with `--columns`) loads it on purpose, with its ratings
  checked against the warehouse's scale.
"""

from __future__ import annotations

from pathlib import Path

from batchrec.errors import BatchrecError
from batchrec.ingest import generic
from batchrec.ingest.sources import Source, first_line, is_utf8
from batchrec.ingest.spec import (
    HALF_STARS,
    KINDS,
    WHOLE_STARS,
    Column,
    FileSpec,
    Limits,
    OneOf,
    dialect,
    lit,
    q,
    role_checks,
    select_sql,
)

FORMATS = ("ml-100k", "ml-1m", "ml-10m", "ml-csv", "generic")
ALIASES = {name: "ml-csv" for name in ("ml-20m", "ml-25m", "ml-32m", "ml-latest", "ml-latest-small")}

ML100K_GENRES = (
    "unknown",
    "Action",
    "Adventure",
    "Animation",
    "Children's",
    "Comedy",
    "Crime",
    "Documentary",
    "Drama",
    "Fantasy",
    "Film-Noir",
    "Horror",
    "Musical",
    "Mystery",
    "Romance",
    "Sci-Fi",
    "Thriller",
    "War",
    "Western",
)
ML100K_OCCUPATIONS = (
    "administrator",
    "artist",
    "doctor",
    "educator",
    "engineer",
    "entertainment",
    "executive",
    "healthcare",
    "homemaker",
    "lawyer",
    "librarian",
    "marketing",
    "none",
    "other",
    "programmer",
    "retired",
    "salesman",
    "scientist",
    "student",
    "technician",
    "writer",
)
ML1M_OCCUPATIONS = (
    "other",
    "academic/educator",
    "artist",
    "clerical/admin",
    "college/grad student",
    "customer service",
    "doctor/health care",
    "executive/managerial",
    "farmer",
    "homemaker",
    "K-12 student",
    "lawyer",
    "programmer",
    "retired",
    "sales/marketing",
    "scientist",
    "self-employed",
    "technician/engineer",
    "tradesman/craftsman",
    "unemployed",
    "writer",
)
ML1M_AGES = ("1", "18", "25", "35", "45", "50", "56")
GENDER = OneOf(("M", "F"), "M or F")

ML_FILES = {
    "ml-100k": {"ratings": "u.data", "items": "u.item", "users": "u.user"},
    "ml-1m": {"ratings": "ratings.dat", "items": "movies.dat", "users": "users.dat"},
    "ml-10m": {"ratings": "ratings.dat", "items": "movies.dat", "tags": "tags.dat"},
    "ml-csv": {"ratings": "ratings.csv", "items": "movies.csv", "tags": "tags.csv"},
}
ML_CSV_HEADERS = {
    "ratings": ("userId", "movieId", "rating", "timestamp"),
    "items": ("movieId", "title", "genres"),
    "tags": ("userId", "movieId", "tag", "timestamp"),
}
# Column names of the files without a header, as their READMEs name them.
ML_DAT_NAMES = {
    "ratings": ("UserID", "MovieID", "Rating", "Timestamp"),
    "items": ("MovieID", "Title", "Genres"),
    "tags": ("UserID", "MovieID", "Tag", "Timestamp"),
}
ML100K_RATINGS = ("user id", "item id", "rating", "timestamp")
ROLES = {  # the roles of each kind's columns, in file order
    "ratings": ("user_id", "item_id", "rating", "ts"),
    "items": ("item_id", "title", "genres"),
    "tags": ("user_id", "item_id", "tag", "ts"),
}


def _ml_spec(fmt: str, kind: str, path: Path, label: str, limits: Limits) -> FileSpec:
    """The spec of one MovieLens file; column names are the READMEs' (or the header's)."""
    scale = WHOLE_STARS if fmt in ("ml-100k", "ml-1m") else HALF_STARS
    if fmt == "ml-csv":
        header = ML_CSV_HEADERS[kind]
        read_as = dialect(",", header=True, quote='"')
    else:  # the older releases' metadata may be latin-1 (ml-csv is UTF-8: no need to decode it all first)
        header = ()
        encoding = "utf-8" if kind == "ratings" or is_utf8(path) else "latin-1"
        read_as = dialect("\t" if path.name == "u.data" else "|" if fmt == "ml-100k" else "::", encoding)

    checks = role_checks(limits.latest, scale)

    def spec(columns: tuple[Column, ...], select: str, scale=None) -> FileSpec:
        return FileSpec(kind, path, label, fmt, columns, select, read_as, header, scale)

    if fmt == "ml-100k" and kind == "items":  # u.item: genres as 19 flags
        flag = OneOf(("0", "1"), "a genre flag 0 or 1")
        columns = (
            Column("movie id", checks["item_id"]),
            Column("movie title"),
            Column("release date"),
            Column("video release date"),
            Column("IMDb URL"),
            *(Column(g, flag) for g in ML100K_GENRES),
        )
        names = ", ".join(lit(g) for g in ML100K_GENRES[1:])  # the 'unknown' flag is the empty list
        flags = ", ".join(f"{q(g)} = '1'" for g in ML100K_GENRES[1:])
        genres = f"list_filter([{names}], lambda g, k: [{flags}][k])"
        return spec(columns, select_sql(kind, {"item_id": "movie id", "title": "movie title"}, genres=genres))

    if kind in ROLES:
        names = header or (ML100K_RATINGS if fmt == "ml-100k" else ML_DAT_NAMES[kind])
        roles = dict(zip(ROLES[kind], names))
        columns = tuple(
            Column(name, checks[role]) if role in checks else Column(name) for role, name in roles.items()
        )
        return spec(columns, select_sql(kind, roles), scale if kind == "ratings" else None)

    if fmt == "ml-100k":  # users
        columns = (
            Column("user id", checks["user_id"]),
            Column("age", checks["age"]),
            Column("gender", GENDER),
            Column("occupation", OneOf(ML100K_OCCUPATIONS, "an occupation of u.occupation")),
            Column("zip code"),
        )
        roles = {
            "user_id": "user id",
            "age": "age",
            "gender": "gender",
            "occupation": "occupation",
            "zip": "zip code",
        }
        return spec(columns, select_sql(kind, roles))

    columns = (
        Column("UserID", checks["user_id"]),
        Column("Gender", GENDER),
        Column("Age", OneOf(ML1M_AGES, "an age group (1, 18, 25, 35, 45, 50 or 56)", "INTEGER")),
        Column("Occupation", OneOf(tuple(map(str, range(21))), "an occupation code 0..20", "INTEGER")),
        Column("Zip-code"),
    )
    names = ", ".join(lit(o) for o in ML1M_OCCUPATIONS)
    roles = {"user_id": "UserID", "gender": "Gender", "age": "Age", "zip": "Zip-code"}
    return spec(columns, select_sql(kind, roles, occupation=f'[{names}]["Occupation" + 1]'))


# -- detection ---------------------------------------------------------------------------------
LOOKED_FOR = (
    "u.data (ml-100k), ratings.dat (ml-1m, ml-10m), ratings.csv with header "
    "userId,movieId,rating,timestamp (ml-20m/25m/32m/latest), or a CSV/Parquet file with a header "
    "naming user and item columns (generic)"
)


def _by_name(source: Source) -> dict[str, list[Path]]:
    found: dict[str, list[Path]] = {}
    for rel in source.files():
        found.setdefault(rel.name, []).append(rel)
    return found


def _guess_format(names: dict[str, list[Path]]) -> str | None:
    """The MovieLens release whose file names are present (by name only: a file named like one
    must then be one)."""
    if any(n in names for n in ML_FILES["ml-100k"].values()):
        return "ml-100k"
    if any(n in names for n in ("ratings.dat", "movies.dat", "users.dat", "tags.dat")):
        return "ml-1m" if "users.dat" in names else "ml-10m"
    if any(n in names for n in ML_FILES["ml-csv"].values()):
        return "ml-csv"
    return None


def _header(path: Path) -> tuple[str, ...]:
    return tuple(h.strip().strip('"') for h in first_line(path).split(","))


def _check_header(spec: FileSpec) -> None:
    got = _header(spec.path)
    if got == spec.header or spec.path.stat().st_size == 0:
        return
    roles = ROLES[spec.kind]
    names = got if len(got) == len(roles) else ("COLUMN",) * len(roles)
    mapping = ",".join(f"{role}={name}" for role, name in zip(roles, names))
    raise BatchrecError(
        f"{spec.label}:1: header '{','.join(got)}' is not the {spec.format} header (expected "
        f"'{','.join(spec.header)}'; to load this file as it is: --format generic --columns {mapping})"
    )


def ml_layout(source: Source, fmt: str, limits: Limits) -> tuple[FileSpec, ...]:
    """The files of MovieLens release `fmt` in `source`; the ratings file is required."""
    names = _by_name(source)
    wanted = ML_FILES[fmt]
    ratings_name = wanted["ratings"]
    if ratings_name not in names:
        present = sorted(n for n in wanted.values() if n in names)
        have = f"found {', '.join(present)} but " if present else ""
        raise BatchrecError(
            f"{source.label}: {fmt} layout: {have}no {ratings_name} (expected {ratings_name} "
            f"with the interactions)"
        )
    folder = min(names[ratings_name], key=lambda p: len(p.parts)).parent
    present = {rel for found in names.values() for rel in found}
    specs = []
    for kind in KINDS:
        name = wanted.get(kind)
        rel = folder / name if name else None
        if rel not in present:
            continue
        spec = _ml_spec(fmt, kind, source.path(rel), source.label_of(rel), limits)
        if spec.header:
            _check_header(spec)
        specs.append(spec)
    return tuple(specs)


def detect(
    con, source: Source, fmt: str, mapping: dict[str, str], limits: Limits
) -> tuple[str, tuple[FileSpec, ...]]:
    """Pick the format (unless given) and describe every file to read: (format, specs)."""
    fmt = ALIASES.get(fmt, fmt)
    if fmt != "auto" and fmt not in FORMATS:
        raise BatchrecError(
            f"--format {fmt!r} is unknown (expected auto, {', '.join(FORMATS)}, "
            f"or ml-20m/25m/32m/latest for ml-csv)"
        )
    if fmt == "auto":
        fmt = "generic" if mapping else (_guess_format(_by_name(source)) or "generic")
    if fmt == "generic":
        specs = generic.layout(con, source, mapping, limits)
        if not specs:
            raise BatchrecError(f"{source.label}: unknown format (expected {LOOKED_FOR})")
        return fmt, specs
    return fmt, ml_layout(source, fmt, limits)
