"""Source ids: raw rows name their file by `sources.source_id` (schema 002), the
`<table>_with_source` views give the file name back, and a schema-1 warehouse filled by the old
ingest (file names in VARCHAR `source` columns) is converted in place when it is opened."""

from __future__ import annotations

import hashlib
from datetime import datetime
from pathlib import Path

import duckdb
import pytest
from test_ingest import FIXTURES, _ratings_dir, copy_fixture, ingest_ok, rows, snapshot, utc

import batchrec.warehouse as warehouse
from batchrec.errors import BatchrecError
from batchrec.warehouse import Warehouse

RAW = ("ratings", "items", "tags", "users")


def test_each_file_gets_one_id_that_its_rows_carry(tmp_path):
    wh = tmp_path / "w.duckdb"
    d = copy_fixture("ml-20m", tmp_path)
    ingest_ok(wh, str(d))
    files = {
        kind: f"{d}/{name}"
        for kind, name in (("ratings", "ratings.csv"), ("items", "movies.csv"), ("tags", "tags.csv"))
    }
    assert rows(wh, "SELECT source_id, file FROM sources ORDER BY source_id") == [
        (1, files["ratings"]),
        (2, files["items"]),
        (3, files["tags"]),
    ]  # ingest order: ratings, items, tags
    for kind, file in files.items():
        assert rows(wh, f"SELECT DISTINCT source FROM {kind}_with_source") == [(file,)]
        assert rows(wh, f"SELECT count(*) FROM {kind}_with_source") == rows(
            wh, f"SELECT count(*) FROM {kind}"
        )
    assert rows(
        wh,
        "SELECT data_type FROM information_schema.columns WHERE table_name = 'ratings' "
        "AND column_name LIKE 'source%'",
    ) == [("INTEGER",)]


def test_a_file_ingested_again_keeps_its_id_and_new_files_get_the_next(tmp_path):
    wh = tmp_path / "w.duckdb"
    day = _ratings_dir(tmp_path, "day", "1,10,3.0,1000\n2,10,2.0,1000\n")
    ingest_ok(wh, str(day))
    (day / "ratings.csv").write_text(
        "userId,movieId,rating,timestamp\n1,10,4.0,2000\n"
    )  # same path, new content
    ingest_ok(wh, str(day))
    ingest_ok(wh, str(_ratings_dir(tmp_path, "next", "3,10,5.0,3000\n")))
    assert rows(wh, "SELECT source_id, file FROM sources ORDER BY source_id") == [
        (1, f"{day}/ratings.csv"),
        (2, f"{tmp_path}/next/ratings.csv"),
    ]
    assert rows(wh, "SELECT user_id, rating, source_id FROM ratings ORDER BY user_id") == [
        (1, 4.0, 1),
        (2, 2.0, 1),
        (3, 5.0, 2),
    ]
    # ingest_log has one row per ingest of a file; sources one per file
    assert rows(
        wh,
        "SELECT s.source_id, count(*) FROM ingest_log l JOIN sources s USING (file) GROUP BY ALL ORDER BY 1",
    ) == [(1, 2), (2, 1)]


# -- schema 1 -> 2 -------------------------------------------------------------------------------
def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _schema1_warehouse(path: Path, d: Path, monkeypatch) -> list[str]:
    """A warehouse at schema version 1 holding what the schema-1 ingest wrote for `ingest d`
    (ml-20m fixture), a later day file that re-rated one pair, and a users file; returns the files
    in ingest order."""
    first = warehouse.migrations()[:1]
    with monkeypatch.context() as m:
        m.setattr(warehouse, "migrations", lambda: first)
        with Warehouse(path).connect():
            pass
    files = [f"{d}/ratings.csv", f"{d}/movies.csv", f"{d}/tags.csv", "day2/ratings.csv", "people/users.csv"]
    ratings, movies, tags, day2, people = files
    with duckdb.connect(str(path)) as con:
        con.execute(
            """INSERT INTO ratings SELECT userId, movieId, rating, make_timestamp(timestamp * 1000000), ?
                       FROM read_csv(?)""",
            [ratings, str(d / "ratings.csv")],
        )
        con.execute("DELETE FROM ratings WHERE user_id = 1 AND item_id = 2")
        con.execute(
            "INSERT INTO ratings VALUES (1, 2, 5.0, TIMESTAMP '2010-01-01', ?), (7, 7, NULL, TIMESTAMP '2010-01-02', ?)",
            [day2, day2],
        )
        con.execute(
            """INSERT INTO items SELECT movieId, title, NULL, string_split(genres, '|'), ?
                       FROM read_csv(?)""",
            [movies, str(d / "movies.csv")],
        )
        con.execute(
            """INSERT INTO tags SELECT userId, movieId, tag, make_timestamp(timestamp * 1000000), ?
                       FROM read_csv(?)""",
            [tags, str(d / "tags.csv")],
        )
        con.execute(
            "INSERT INTO users VALUES (1, 'F', 25, 'writer', '55105', ?), (7, NULL, NULL, NULL, NULL, ?)",
            [people, people],
        )
        for n, (file, kind) in enumerate(zip(files, ("ratings", "items", "tags", "ratings", "users"))):
            started = datetime(2024, 1, 1 + n)
            checksum = _sha256(Path(file)) if file.startswith(str(d)) else "0" * 64
            con.execute(
                "INSERT INTO ingest_log VALUES (?, ?, ?, 'ml-csv', ?, 1, 1, 0, ?, ?)",
                [f"ingest{n}", file, kind, checksum, started, started],
            )
    return files


def test_schema1_warehouse_is_converted_in_place_and_rows_keep_their_file(tmp_path, monkeypatch):
    wh = tmp_path / "w.duckdb"
    d = copy_fixture("ml-20m", tmp_path)
    files = _schema1_warehouse(wh, d, monkeypatch)
    before = {t: rows(wh, f"SELECT * FROM {t} ORDER BY ALL") for t in RAW}
    assert {t: len(r) for t, r in before.items()} == {"ratings": 19, "items": 18, "tags": 9, "users": 2}

    with Warehouse(wh).connect():  # the current code: migrates
        pass
    assert rows(wh, "SELECT version FROM schema_version ORDER BY 1") == [
        (v,) for v, _ in warehouse.migrations()
    ]
    assert rows(wh, "SELECT low, high, step FROM rating_scale") == [
        (0.5, 5.0, 0.5)
    ]  # migration 003: the ratings range, in half stars
    assert rows(wh, "SELECT file FROM sources ORDER BY source_id") == [(f,) for f in files]  # in ingest order
    for t in RAW:  # same rows, each with the same file, and no file name left in the table itself
        assert rows(wh, f"SELECT * EXCLUDE (source_id) FROM {t}_with_source ORDER BY ALL") == before[t]
        columns = [
            r[0]
            for r in rows(wh, "SELECT column_name FROM information_schema.columns WHERE table_name = ?", [t])
        ]
        assert columns[-1] == "source_id" and "source" not in columns
    assert rows(wh, "SELECT rating, source FROM ratings_with_source WHERE user_id = 1 AND item_id = 2") == [
        (5.0, "day2/ratings.csv")
    ]

    # the converted warehouse goes on as one built by the current ingest: unchanged files are
    # skipped by checksum, a new file's rows get the next id
    unchanged = snapshot(wh)
    out = ingest_ok(wh, str(d))
    assert out.count("skipped") == 3
    after = snapshot(wh)
    assert {t: after[t] for t in (*RAW, "sources")} == {t: unchanged[t] for t in (*RAW, "sources")}
    ingest_ok(wh, str(_ratings_dir(tmp_path, "day3", "1,2,1.0,1500000000\n")))
    assert rows(
        wh, "SELECT rating, ts, source_id, source FROM ratings_with_source WHERE user_id = 1 AND item_id = 2"
    ) == [(1.0, utc(1500000000), 6, f"{tmp_path}/day3/ratings.csv")]
    assert rows(wh, "SELECT count(*) FROM ratings") == [(19,)]


def test_warehouse_newer_than_the_code_still_fails_clearly(tmp_path):
    wh = tmp_path / "w.duckdb"
    ingest_ok(wh, str(FIXTURES / "ml-20m"))
    known = warehouse.migrations()[-1][0]
    with duckdb.connect(str(wh)) as con:
        con.execute("INSERT INTO schema_version VALUES (?, 'future', now()::TIMESTAMP)", [known + 1])
    with pytest.raises(
        BatchrecError, match=f"schema version {known + 1}, newer than this batchrec understands \\({known}\\)"
    ):
        with Warehouse(wh).connect():
            pass
