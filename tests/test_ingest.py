"""`batchrec ingest`: every format from fixture files in the published layouts, zip input,
timestamps, idempotence, incremental merges. Bad input is in test_ingest_errors.py."""

from __future__ import annotations

import hashlib
import shutil
import zipfile
from datetime import UTC, datetime
from pathlib import Path

import duckdb
import numpy as np
import pytest
from click.testing import CliRunner

from batchrec.cli import main

FIXTURES = Path(__file__).resolve().parent / "fixtures"
ML_SMALL = Path(__file__).resolve().parent.parent / "batchrec" / "datasets" / "ml-latest-small"
RAW_TABLES = ("ratings", "items", "tags", "users", "sources", "ingest_log", "quarantine")


# -- helpers (test_ingest_errors.py uses them too) ---------------------------------------------
def ingest(wh: Path, *args: str):
    """`batchrec --warehouse wh ingest ARGS` in process; click's Result."""
    return CliRunner().invoke(main, ["--warehouse", str(wh), "ingest", *args])


def ingest_ok(wh: Path, *args: str) -> str:
    result = ingest(wh, *args)
    assert result.exit_code == 0, result.output
    return result.stdout


def rows(wh: Path, sql: str, params: list | None = None) -> list[tuple]:
    with duckdb.connect(str(wh), read_only=True) as con:
        return con.execute(sql, params or []).fetchall()


def count(wh: Path, table: str) -> int:
    return rows(wh, f"SELECT count(*) FROM {table}")[0][0]


def snapshot(wh: Path) -> dict[str, list[tuple]]:
    """Every raw table's rows, sorted; equal snapshots = unchanged warehouse."""
    if not wh.exists():
        return {}
    with duckdb.connect(str(wh), read_only=True) as con:
        return {t: con.execute(f"SELECT * FROM {t} ORDER BY ALL").fetchall() for t in RAW_TABLES}


def utc(unix_seconds: int) -> datetime:
    return datetime.fromtimestamp(unix_seconds, UTC).replace(tzinfo=None)


def copy_fixture(name: str, tmp_path: Path) -> Path:
    return Path(shutil.copytree(FIXTURES / name, tmp_path / name))


# -- the embedded default ----------------------------------------------------------------------
def test_ml_latest_small_embedded(tmp_path):
    wh = tmp_path / "w.duckdb"
    ingest_ok(wh, "--dataset", "ml-latest-small")
    # exactly the GroupLens release (its README.txt states these counts)
    assert count(wh, "ratings") == 100_836
    assert rows(wh, "SELECT count(DISTINCT user_id) FROM ratings") == [(610,)]
    assert count(wh, "tags") == 3_683
    assert count(wh, "items") == 9_742
    assert rows(wh, "SELECT rating, ts FROM ratings WHERE user_id = 1 AND item_id = 1") == [
        (4.0, utc(964982703))
    ]
    log = rows(
        wh,
        "SELECT file, kind, format, checksum, rows_read, rows_loaded, rows_rejected FROM ingest_log ORDER BY kind",
    )
    sha = {
        n: hashlib.sha256((ML_SMALL / n).read_bytes()).hexdigest()
        for n in ("movies.csv", "ratings.csv", "tags.csv")
    }
    assert log == [
        ("ml-latest-small/movies.csv", "items", "ml-csv", sha["movies.csv"], 9_742, 9_742, 0),
        ("ml-latest-small/ratings.csv", "ratings", "ml-csv", sha["ratings.csv"], 100_836, 100_836, 0),
        ("ml-latest-small/tags.csv", "tags", "ml-csv", sha["tags.csv"], 3_683, 3_683, 0),
    ]


# -- each MovieLens release format ---------------------------------------------------------------
def test_ml_100k(tmp_path):
    wh = tmp_path / "w.duckdb"
    ingest_ok(wh, str(FIXTURES / "ml-100k"))
    assert (count(wh, "ratings"), count(wh, "items"), count(wh, "users")) == (20, 22, 20)
    assert rows(wh, "SELECT rating, ts FROM ratings WHERE user_id = 196 AND item_id = 242") == [
        (3.0, utc(881250949))
    ]
    items = {r[0]: r[1:] for r in rows(wh, "SELECT item_id, title, year, genres FROM items")}
    assert items[29] == ("Batman Forever (1995)", 1995, ["Action", "Adventure", "Comedy", "Crime"])
    assert items[465] == ("Jungle Book, The (1994)", 1994, ["Adventure", "Children's", "Romance"])
    assert items[1306] == ("Délusions (1991)", 1991, ["Drama"])  # latin-1 byte 0xE9
    assert items[267] == ("unknown", None, [])  # the 'unknown' genre flag is the empty list
    assert rows(wh, "SELECT gender, age, occupation, zip FROM users WHERE user_id = 196") == [
        ("M", 49, "writer", "55105")
    ]
    assert rows(wh, "SELECT DISTINCT format FROM ingest_log") == [("ml-100k",)]


def test_ml_1m(tmp_path):
    wh = tmp_path / "w.duckdb"
    ingest_ok(wh, str(FIXTURES / "ml-1m"))
    assert (count(wh, "ratings"), count(wh, "items"), count(wh, "users")) == (20, 19, 6)
    assert rows(wh, "SELECT rating, ts FROM ratings WHERE user_id = 1 AND item_id = 1193") == [
        (5.0, utc(978300760))
    ]
    assert rows(wh, "SELECT title, year, genres FROM items WHERE item_id = 3579") == [
        ("Eréndira (1983)", 1983, ["Drama"])
    ]
    assert rows(wh, "SELECT genres FROM items WHERE item_id = 1") == [
        (["Animation", "Children's", "Comedy"],)
    ]
    # users.dat: UserID::Gender::Age::Occupation::Zip-code, occupation codes named as in the README
    assert rows(wh, "SELECT gender, age, occupation, zip FROM users ORDER BY user_id LIMIT 2") == [
        ("F", 1, "K-12 student", "48067"),
        ("M", 56, "self-employed", "70072"),
    ]


def test_ml_10m(tmp_path):
    wh = tmp_path / "w.duckdb"
    ingest_ok(wh, str(FIXTURES / "ml-10m"))
    assert (count(wh, "ratings"), count(wh, "items"), count(wh, "tags"), count(wh, "users")) == (
        16,
        15,
        10,
        0,
    )
    assert rows(wh, "SELECT rating FROM ratings WHERE user_id = 3 ORDER BY item_id") == [
        (4.5,),
        (4.5,),
        (5.0,),
        (3.5,),
    ]
    assert rows(wh, "SELECT min(rating) FROM ratings") == [(0.5,)]
    assert rows(
        wh, "SELECT title, year, genres FROM items WHERE item_id IN (4973, 8606) ORDER BY item_id"
    ) == [
        ("Amelie (Fabuleux destin d'Amélie Poulain, Le) (2001)", 2001, ["Comedy", "Romance"]),
        ("Pull My Daisy (1958)", 1958, []),
    ]
    assert rows(wh, "SELECT user_id, item_id, tag, ts FROM tags WHERE tag = 'excellent!'") == [
        (15, 4973, "excellent!", utc(1215184630))
    ]


def test_ml_csv_layout(tmp_path):
    wh = tmp_path / "w.duckdb"
    ingest_ok(wh, str(FIXTURES / "ml-20m"))
    assert (count(wh, "ratings"), count(wh, "items"), count(wh, "tags")) == (18, 18, 9)
    items = {r[0]: r[1:] for r in rows(wh, "SELECT item_id, title, year, genres FROM items")}
    assert items[11] == ("American President, The (1995)", 1995, ["Comedy", "Drama", "Romance"])
    assert items[29][:2] == ("City of Lost Children, The (Cité des enfants perdus, La) (1995)", 1995)
    assert items[40697] == ("Babylon 5", None, ["Sci-Fi"])
    assert items[131260] == ("Rentun Ruusu (2001)", 2001, [])
    tags = {r[0] for r in rows(wh, "SELECT tag FROM tags")}
    assert {"screwball comedy, classic", '"pixar"', "dark hero"} <= tags
    assert rows(wh, "SELECT rating, ts FROM ratings WHERE user_id = 4 AND item_id = 131262") == [
        (4.5, utc(1427771112))
    ]


def test_generic_csv_with_users(tmp_path):
    """Its ratings.csv header is not ml-csv's (UserID, not userId): generic on purpose only."""
    wh = tmp_path / "w.duckdb"
    ingest_ok(wh, str(FIXTURES / "generic"), "--format", "generic")
    assert (count(wh, "ratings"), count(wh, "items"), count(wh, "users")) == (6, 4, 3)
    assert rows(wh, "SELECT rating, ts FROM ratings WHERE user_id = 10 AND item_id = 101") == [
        (2.5, utc(1262390400))
    ]
    assert rows(wh, "SELECT gender, age, occupation, zip FROM users WHERE user_id = 10") == [
        ("F", 34, "engineer", "10001")
    ]
    assert rows(wh, "SELECT title, year, genres FROM items WHERE item_id IN (102, 103) ORDER BY 1") == [
        ("Delta (1999)", 1999, []),
        ("Gamma", None, ["Horror"]),
    ]
    assert rows(wh, "SELECT DISTINCT format FROM ingest_log") == [("generic",)]


def test_generic_column_mapping_iso_timestamps_and_implicit_feedback(tmp_path):
    d = tmp_path / "clicks"
    d.mkdir()
    (d / "events.csv").write_text(
        "who,what,when\n1,10,2020-01-02 03:04:05\n1,11,2020-01-02T03:04:05+02:00\n2,10,2020-01-03\n"
    )
    wh = tmp_path / "w.duckdb"
    ingest_ok(wh, str(d), "--columns", "user_id=who,item_id=what,ts=when")
    assert rows(wh, "SELECT user_id, item_id, rating, ts FROM ratings ORDER BY ALL") == [
        (1, 10, None, datetime(2020, 1, 2, 3, 4, 5)),
        (1, 11, None, datetime(2020, 1, 2, 1, 4, 5)),  # +02:00 -> UTC
        (2, 10, None, datetime(2020, 1, 3)),
    ]


def test_generic_parquet(tmp_path):
    d = tmp_path / "pq"
    d.mkdir()
    with duckdb.connect() as con:
        con.execute(f"""COPY (SELECT * FROM (VALUES (1, 5, 4.0, 1262304000), (2, 5, 3.5, 1262390400),
                                                    (3, 6, 2.0, 1262476800)) t(user_id, item_id, rating, timestamp))
                        TO '{d / "ratings.parquet"}' (FORMAT parquet)""")
    wh = tmp_path / "w.duckdb"
    ingest_ok(wh, str(d))
    assert rows(wh, "SELECT user_id, item_id, rating, ts FROM ratings ORDER BY ALL") == [
        (1, 5, 4.0, utc(1262304000)),
        (2, 5, 3.5, utc(1262390400)),
        (3, 6, 2.0, utc(1262476800)),
    ]


def test_zip_with_top_folder(tmp_path):
    archive = tmp_path / "ml-1m.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        for f in sorted((FIXTURES / "ml-1m").iterdir()):
            zf.write(f, f"ml-1m/{f.name}")
    wh = tmp_path / "w.duckdb"
    ingest_ok(wh, str(archive))
    assert (count(wh, "ratings"), count(wh, "items"), count(wh, "users")) == (20, 19, 6)
    assert rows(wh, "SELECT DISTINCT source FROM ratings_with_source") == [(f"{archive}/ml-1m/ratings.dat",)]
    assert rows(wh, "SELECT title FROM items WHERE item_id = 3579") == [("Eréndira (1983)",)]


def test_release_names_select_the_csv_layout(tmp_path):
    wh = tmp_path / "w.duckdb"
    ingest_ok(wh, str(FIXTURES / "ml-20m"), "--format", "ml-25m")
    assert rows(wh, "SELECT DISTINCT format FROM ingest_log") == [("ml-csv",)]
    assert count(wh, "ratings") == 18


def test_single_file_path(tmp_path):
    wh = tmp_path / "w.duckdb"
    ingest_ok(wh, str(FIXTURES / "ml-20m" / "ratings.csv"))
    assert (count(wh, "ratings"), count(wh, "items")) == (18, 0)


# -- timestamps --------------------------------------------------------------------------------
def test_timestamps_are_naive_utc_whatever_the_time_zone(tmp_path, monkeypatch):
    import time

    monkeypatch.setenv("TZ", "Asia/Kolkata")  # +05:30: a shift would show
    time.tzset()
    try:
        wh = tmp_path / "w.duckdb"
        ingest_ok(wh, str(FIXTURES / "ml-100k"))
        with duckdb.connect(str(wh)) as con:
            con.execute("SET TimeZone = 'America/New_York'")  # readers' sessions must not matter either
            assert con.execute("SELECT ts FROM ratings WHERE user_id = 196").fetchall() == [(utc(881250949),)]
        assert rows(wh, "SELECT typeof(ts) FROM ratings LIMIT 1") == [("TIMESTAMP",)]
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()


# -- idempotence and incremental merges ------------------------------------------------------------
def test_same_files_twice_change_nothing(tmp_path):
    wh = tmp_path / "w.duckdb"
    ingest_ok(wh, str(FIXTURES / "ml-20m"))
    before = snapshot(wh)
    out = ingest_ok(wh, str(FIXTURES / "ml-20m"))
    assert "skipped" in out
    after = snapshot(wh)
    assert {t: after[t] for t in ("ratings", "items", "tags", "users")} == {
        t: before[t] for t in ("ratings", "items", "tags", "users")
    }
    second = [r for r in after["ingest_log"] if r not in before["ingest_log"]]
    assert len(second) == 3 and all(r[5:8] == (0, 0, 0) for r in second)  # rows_read, loaded, rejected


def _ratings_dir(tmp_path: Path, name: str, body: str) -> Path:
    d = tmp_path / name
    d.mkdir()
    (d / "ratings.csv").write_text("userId,movieId,rating,timestamp\n" + body)
    return d


def test_incremental_append_and_latest_rating_wins(tmp_path):
    wh = tmp_path / "w.duckdb"
    ingest_ok(
        wh,
        str(_ratings_dir(tmp_path, "day1", "1,10,3.0,1000\n1,11,4.0,1000\n2,10,2.0,1000\n3,12,5.0,1000\n")),
    )
    out = ingest_ok(
        wh,
        str(
            _ratings_dir(
                tmp_path,
                "day2",
                "1,10,4.5,2000\n"  # re-rated later: replaces
                "1,11,1.0,500\n"  # older than stored: ignored
                "2,10,3.5,1000\n"  # same ts, other rating: the later file wins
                "3,12,5.0,1000\n"  # identical: untouched
                "4,13,2.5,3000\n",
            )
        ),
    )  # new: appended
    assert "5 read, 3 new or changed" in out
    assert rows(wh, "SELECT user_id, item_id, rating, ts, source FROM ratings_with_source ORDER BY ALL") == [
        (1, 10, 4.5, utc(2000), f"{tmp_path}/day2/ratings.csv"),
        (1, 11, 4.0, utc(1000), f"{tmp_path}/day1/ratings.csv"),
        (2, 10, 3.5, utc(1000), f"{tmp_path}/day2/ratings.csv"),
        (3, 12, 5.0, utc(1000), f"{tmp_path}/day1/ratings.csv"),
        (4, 13, 2.5, utc(3000), f"{tmp_path}/day2/ratings.csv"),
    ]


def test_rerating_within_one_file_keeps_the_latest(tmp_path):
    wh = tmp_path / "w.duckdb"
    ingest_ok(
        wh, str(_ratings_dir(tmp_path, "d", "1,10,3.0,2000\n1,10,5.0,3000\n1,10,1.0,1000\n2,10,4.0,10\n"))
    )
    assert rows(wh, "SELECT user_id, item_id, rating, ts FROM ratings ORDER BY ALL") == [
        (1, 10, 5.0, utc(3000)),
        (2, 10, 4.0, utc(10)),
    ]


def test_items_upsert_and_tags_dedupe(tmp_path):
    wh = tmp_path / "w.duckdb"
    ingest_ok(wh, str(FIXTURES / "ml-20m"))
    d = copy_fixture("ml-20m", tmp_path)
    movies = (
        (d / "movies.csv")
        .read_text()
        .replace("Heat (1995),Action|Crime|Thriller", "Heat (1996),Action|Crime")
    )
    (d / "movies.csv").write_text(movies + "999,New Film (2020),Drama\n")
    (d / "tags.csv").write_text(
        (d / "tags.csv").read_text() + "65,208,dark hero,1368150078\n"
        "65,208,dark hero,1368150078\n7,1,new tag,1500000000\n"
    )
    out = ingest_ok(wh, str(d))
    assert "19 read, 2 new or changed" in out  # movie 6 changed, 999 new
    assert "12 read, 1 new or changed" in out  # one new tag; the exact repeats are dropped
    assert rows(wh, "SELECT title, year, genres FROM items WHERE item_id = 6") == [
        ("Heat (1996)", 1996, ["Action", "Crime"])
    ]
    assert count(wh, "items") == 19
    assert rows(wh, "SELECT count(*) FROM tags WHERE user_id = 65 AND item_id = 208") == [(1,)]
    assert count(wh, "tags") == 10


def test_repeated_tags_in_a_first_load_are_dropped(tmp_path):
    """A first load reads tags straight into the empty table; exact repeats still go, near ones stay."""
    d = copy_fixture("ml-20m", tmp_path)
    (d / "tags.csv").write_text(
        (d / "tags.csv").read_text() + "65,208,dark hero,1368150078\n"  # repeats line 3
        '65,208,Dark hero,1368150078\n65,208,dark hero,1368150090\n121,1,"""pixar""",1300000000\n'
    )
    wh = tmp_path / "w.duckdb"
    assert "13 read, 11 new or changed" in ingest_ok(wh, str(d))
    assert rows(wh, "SELECT user_id, tag, ts FROM tags WHERE item_id IN (1, 208) ORDER BY ALL") == [
        (65, "Dark hero", utc(1368150078)),
        (65, "dark hero", utc(1368150078)),
        (65, "dark hero", utc(1368150090)),
        (121, '"pixar"', utc(1300000000)),
    ]


@pytest.mark.parametrize("layout", ["sorted", "two_runs", "swapped_halves", "chunks_dealt", "shuffled"])
@pytest.mark.parametrize("repeat", [False, True])
@pytest.mark.parametrize("jump", [None, 2 << 32])
def test_repeat_check_agrees_with_unique(layout, repeat, jump):
    """The in-file duplicate check (merge._repeats) on the key orders a read can leave: the file's
    (sorted) order, its chunks dealt to two threads, halves swapped, many chunks in any order, no
    order at all. File chunks in any order are decided without sorting when pieces are cut at
    jumps; a repeat or a shuffle needs the sort."""
    from batchrec.ingest.merge import _disjoint_pieces, _repeats

    rng = np.random.default_rng(len(layout) + repeat)
    keys = np.unique(rng.integers(0, 1 << 40, 20_000))
    if repeat:
        keys = np.sort(np.r_[keys, keys[rng.integers(len(keys))]])
    chunks = np.array_split(keys, 16)
    keys = {
        "sorted": keys,
        "two_runs": np.concatenate(chunks[0::2] + chunks[1::2]),
        "swapped_halves": np.concatenate(chunks[8:] + chunks[:8]),
        "chunks_dealt": np.concatenate([chunks[i] for i in rng.permutation(16)]),
        "shuffled": rng.permutation(keys),
    }[layout]
    expected = len(np.unique(keys)) < len(keys)
    assert expected == repeat
    as_read = [keys[:7000], keys[7000:]]  # in chunks, as a read hands them over
    assert _repeats(as_read, jump) == expected
    fast = (
        not repeat and layout != "shuffled" and (jump is not None or layout in ("sorted", "swapped_halves"))
    )
    assert _disjoint_pieces(as_read, jump) == fast  # decided in one pass, without a sort
