"""What each source format looks like, and which format a set of files is.

A `FileSpec` says how to read one file natively with DuckDB: its dialect, every column with the
type the reader parses it into (a value that does not parse rejects its line, with the line
number, inside DuckDB), and a SELECT list that turns those columns into the staging columns of
its kind. The MovieLens layouts are described here from the published READMEs; the generic
reader (`generic.py`) builds the same specs from a file's header.

Conventions (documented choices):
* Unix timestamps are parsed as UINTEGER: seconds 0..4294967295 (1970..2106); anything else is
  a bad line. They become naive UTC TIMESTAMPs via `make_timestamp`, which no session time
  zone can shift.
* Empty fields are not NULL (`nullstr` is set to a byte that never occurs), so an empty id is a
  parse error with its line rather than a NULL found later.
* ml-100k's genre flag `unknown` and ml-latest's "(no genres listed)" both give the empty list.
* ml-1m's occupation codes become the README's names; its age stays the bucket's lower bound.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from batchrec.errors import BatchrecError
from batchrec.ingest.sources import Source, first_line, is_utf8

KINDS = ("ratings", "items", "tags", "users")  # processing order
STAGE_COLUMNS = {
    "ratings": ("user_id", "item_id", "rating", "ts"),
    "items": ("item_id", "title", "year", "genres"),
    "tags": ("user_id", "item_id", "tag", "ts"),
    "users": ("user_id", "gender", "age", "occupation", "zip"),
}
FORMATS = ("ml-100k", "ml-1m", "ml-10m", "ml-csv", "generic")
ALIASES = {name: "ml-csv" for name in ("ml-20m", "ml-25m", "ml-32m", "ml-latest", "ml-latest-small")}

ID = "an integer id"
UNIX_SECONDS = "unix seconds (an integer 0..4294967295)"
NEVER_NULL = "\x01"  # nullstr: an empty field stays '' and fails to parse as a number


@dataclass(frozen=True)
class Scale:
    """A rating scale: low..high in steps of `step`."""

    low: float
    high: float
    step: float

    def ok(self, col: str) -> str:
        return f"({col} BETWEEN {self.low} AND {self.high} AND round({col} / {self.step}) = {col} / {self.step})"

    def __str__(self) -> str:
        if self.step == 1:
            return f"{self.low:g}..{self.high:g} in whole stars"
        return f"{self.low:.1f}..{self.high:.1f} in half stars"


WHOLE_STARS = Scale(1, 5, 1)     # ml-100k, ml-1m
HALF_STARS = Scale(0.5, 5, 0.5)  # ml-10m and every later release


@dataclass(frozen=True)
class Column:
    name: str       # header name, or the README's name for files without a header
    type: str       # DuckDB type the reader parses the field into
    expected: str   # what a valid value looks like, for messages


@dataclass(frozen=True)
class FileSpec:
    kind: str
    path: Path
    label: str
    format: str
    columns: tuple[Column, ...]
    select: str                      # SQL over the read columns giving STAGE_COLUMNS[kind]
    csv: dict | None = None          # read_csv dialect; None for Parquet
    rating: str | None = None        # the column holding the rating, when a scale applies
    scale: Scale | None = None
    header: tuple[str, ...] = field(default=())  # expected header line, when the format has one


@dataclass(frozen=True)
class Layout:
    format: str
    files: list[FileSpec]


def q(name: str) -> str:
    """A SQL identifier."""
    return '"' + name.replace('"', '""') + '"'


def lit(text: str) -> str:
    """A SQL string literal."""
    return "'" + text.replace("'", "''") + "'"


# -- SQL snippets shared by every reader -------------------------------------------------------
def unix_ts(col: str) -> str:
    return f"make_timestamp({q(col)}::BIGINT * 1000000)"


def title_sql(col: str) -> str:
    return f"trim({q(col)})"


def year_sql(col: str) -> str:
    """The last '(YYYY)' (or '(YYYY-YYYY)' for series) of a title; NULL when there is none."""
    return f"TRY_CAST(nullif(regexp_extract(trim({q(col)}), '.*\\((\\d{{4}})(?:[-–]\\d{{0,4}})?\\)', 1), '') AS INTEGER)"


def genres_sql(col: str) -> str:
    return (f"CASE WHEN {q(col)} IN ('', '(no genres listed)') THEN []::VARCHAR[] "
            f"ELSE string_split({q(col)}, '|') END")


def ratings_select(user: str, item: str, rating: str | None, ts_sql: str) -> str:
    rating_sql = f"{q(rating)}::FLOAT" if rating else "NULL::FLOAT"  # the warehouse type; checks use it too
    return f"{q(user)} AS user_id, {q(item)} AS item_id, {rating_sql} AS rating, {ts_sql} AS ts"


def items_select(item: str, title: str | None, genres_expr: str) -> str:
    if title is None:
        return f"{q(item)} AS item_id, NULL::VARCHAR AS title, NULL::INTEGER AS year, {genres_expr} AS genres"
    return f"{q(item)} AS item_id, {title_sql(title)} AS title, {year_sql(title)} AS year, {genres_expr} AS genres"


def tags_select(user: str, item: str, tag: str, ts_sql: str) -> str:
    return f"{q(user)} AS user_id, {q(item)} AS item_id, {q(tag)} AS tag, {ts_sql} AS ts"


# -- the MovieLens layouts ---------------------------------------------------------------------
ML100K_GENRES = ("unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
                 "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller",
                 "War", "Western")
ML1M_OCCUPATIONS = ("other", "academic/educator", "artist", "clerical/admin", "college/grad student",
                    "customer service", "doctor/health care", "executive/managerial", "farmer", "homemaker",
                    "K-12 student", "lawyer", "programmer", "retired", "sales/marketing", "scientist",
                    "self-employed", "technician/engineer", "tradesman/craftsman", "unemployed", "writer")

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


def _dialect(delim: str, encoding: str = "utf-8", header: bool = False, quoted: bool = False) -> dict:
    quote = '"' if quoted else ""
    return {"delim": delim, "header": header, "quote": quote, "escape": quote, "encoding": encoding}


def _ml_spec(fmt: str, kind: str, path: Path, label: str) -> FileSpec:
    """The spec of one MovieLens file; column names are the READMEs' (or the header's)."""
    scale = WHOLE_STARS if fmt in ("ml-100k", "ml-1m") else HALF_STARS
    rating_expected = f"a rating {scale}"
    if fmt == "ml-csv":
        header = ML_CSV_HEADERS[kind]
        dialect = _dialect(",", header=True, quoted=True)
    else:  # the older releases' metadata may be latin-1 (ml-csv is UTF-8: no need to decode it all first)
        header = ()
        legacy_encoding = "utf-8" if kind == "ratings" or is_utf8(path) else "latin-1"
        dialect = _dialect("\t" if path.name == "u.data" else "|" if fmt == "ml-100k" else "::", legacy_encoding)

    if kind == "ratings":
        names = header or (("user id", "item id", "rating", "timestamp") if fmt == "ml-100k"
                           else ("UserID", "MovieID", "Rating", "Timestamp"))
        u, i, r, t = names
        cols = (Column(u, "BIGINT", ID), Column(i, "BIGINT", ID), Column(r, "DOUBLE", rating_expected),
                Column(t, "UINTEGER", UNIX_SECONDS))
        return FileSpec(kind, path, label, fmt, cols, ratings_select(u, i, r, unix_ts(t)), dialect, r, scale, header)

    if kind == "tags":
        u, i, tag, t = header or ("UserID", "MovieID", "Tag", "Timestamp")
        cols = (Column(u, "BIGINT", ID), Column(i, "BIGINT", ID), Column(tag, "VARCHAR", "a tag"),
                Column(t, "UINTEGER", UNIX_SECONDS))
        return FileSpec(kind, path, label, fmt, cols, tags_select(u, i, tag, unix_ts(t)), dialect, header=header)

    if kind == "items" and fmt == "ml-100k":
        cols = (Column("movie id", "BIGINT", ID), Column("movie title", "VARCHAR", "a title"),
                Column("release date", "VARCHAR", "a date"), Column("video release date", "VARCHAR", "a date"),
                Column("IMDb URL", "VARCHAR", "a URL"),
                *(Column(g, "ENUM('0', '1')", "a genre flag 0 or 1") for g in ML100K_GENRES))
        names = ", ".join(lit(g) for g in ML100K_GENRES[1:])  # the 'unknown' flag is the empty list
        flags = ", ".join(f"{q(g)} = '1'" for g in ML100K_GENRES[1:])
        genres = f"list_filter([{names}], lambda g, k: [{flags}][k])"
        return FileSpec(kind, path, label, fmt, cols, items_select("movie id", "movie title", genres), dialect)

    if kind == "items":
        i, title, genres = header or ("MovieID", "Title", "Genres")
        cols = (Column(i, "BIGINT", ID), Column(title, "VARCHAR", "a title"), Column(genres, "VARCHAR", "genres"))
        return FileSpec(kind, path, label, fmt, cols, items_select(i, title, genres_sql(genres)), dialect, header=header)

    if fmt == "ml-100k":  # users
        cols = (Column("user id", "BIGINT", ID), Column("age", "INTEGER", "an integer age"),
                Column("gender", "VARCHAR", "M or F"), Column("occupation", "VARCHAR", "an occupation"),
                Column("zip code", "VARCHAR", "a zip code"))
        select = '"user id" AS user_id, "gender" AS gender, "age" AS age, "occupation" AS occupation, "zip code" AS zip'
        return FileSpec(kind, path, label, fmt, cols, select, dialect)

    cols = (Column("UserID", "BIGINT", ID), Column("Gender", "VARCHAR", "M or F"),
            Column("Age", "INTEGER", "an age group (1, 18, 25, 35, 45, 50 or 56)"),
            Column("Occupation", "UTINYINT", "an occupation code 0..20"), Column("Zip-code", "VARCHAR", "a zip code"))
    names = ", ".join(lit(o) for o in ML1M_OCCUPATIONS)
    select = (f'"UserID" AS user_id, "Gender" AS gender, "Age" AS age, '
              f'coalesce([{names}]["Occupation" + 1], "Occupation"::VARCHAR) AS occupation, "Zip-code" AS zip')
    return FileSpec(kind, path, label, fmt, cols, select, dialect)


# -- detection ---------------------------------------------------------------------------------
LOOKED_FOR = ("u.data (ml-100k), ratings.dat (ml-1m, ml-10m), ratings.csv with header "
              "userId,movieId,rating,timestamp (ml-20m/25m/32m/latest), or a CSV/Parquet file with a header "
              "naming user and item columns (generic)")


def _by_name(source: Source) -> dict[str, list[Path]]:
    found: dict[str, list[Path]] = {}
    for rel in source.files():
        found.setdefault(rel.name, []).append(rel)
    return found


def _guess_format(names: dict[str, list[Path]], source: Source) -> str | None:
    if any(n in names for n in ML_FILES["ml-100k"].values()):
        return "ml-100k"
    if any(n in names for n in ("ratings.dat", "movies.dat", "users.dat", "tags.dat")):
        return "ml-1m" if "users.dat" in names else "ml-10m"
    if "ratings.csv" in names:
        path = source.root / min(names["ratings.csv"], key=lambda p: len(p.parts))
        return "ml-csv" if path.stat().st_size == 0 or _header(path) == ML_CSV_HEADERS["ratings"] else None
    if "movies.csv" in names or "tags.csv" in names:
        return "ml-csv"
    return None


def _header(path: Path) -> tuple[str, ...]:
    return tuple(h.strip().strip('"') for h in first_line(path).split(","))


def ml_layout(source: Source, fmt: str) -> Layout:
    """The files of MovieLens release `fmt` in `source`; the ratings file is required."""
    names = _by_name(source)
    wanted = ML_FILES[fmt]
    ratings_name = wanted["ratings"]
    if ratings_name not in names:
        present = sorted(n for n in wanted.values() if n in names)
        have = f"found {', '.join(present)} but " if present else ""
        raise BatchrecError(f"{source.label}: {fmt} layout: {have}no {ratings_name}, expected {ratings_name} "
                            f"with the interactions")
    folder = min(names[ratings_name], key=lambda p: len(p.parts)).parent
    present = {rel for found in names.values() for rel in found}
    specs = []
    for kind in KINDS:
        name = wanted.get(kind)
        rel = folder / name if name else None
        if rel not in present:
            continue
        spec = _ml_spec(fmt, kind, source.root / rel, source.label_of(rel))
        if spec.header:
            got = _header(spec.path)
            if got != spec.header and spec.path.stat().st_size > 0:
                raise BatchrecError(f"{spec.label}:1: header '{','.join(got)}' does not match {fmt}, "
                                    f"expected '{','.join(spec.header)}'")
        specs.append(spec)
    return Layout(fmt, specs)


def detect(con, source: Source, fmt: str, mapping: dict[str, str]) -> Layout:
    """Pick the format (unless given) and describe every file to read."""
    from batchrec.ingest import generic

    fmt = ALIASES.get(fmt, fmt)
    if fmt != "auto" and fmt not in FORMATS:
        raise BatchrecError(f"--format {fmt!r} is unknown, expected auto, {', '.join(FORMATS)} "
                            f"(or ml-20m/25m/32m/latest for ml-csv)")
    if fmt == "auto":
        fmt = "generic" if mapping else (_guess_format(_by_name(source), source) or "generic")
    if fmt == "generic":
        layout = generic.layout(con, source, mapping)
        if layout is None:
            raise BatchrecError(f"{source.label}: unknown format, looked for {LOOKED_FOR}")
        return layout
    return ml_layout(source, fmt)
