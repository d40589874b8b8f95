"""Bad input to `batchrec ingest`: one-line errors naming file and line, a non-zero exit, a
warehouse left exactly as it was; --quarantine; a busy warehouse."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from test_ingest import FIXTURES, copy_fixture, count, ingest, ingest_ok, rows, snapshot

from batchrec.warehouse import Warehouse


def _edit_line(path: Path, line: int, new: str | bytes) -> None:
    """Replace 1-based physical line `line` of a file, byte-exact (fixtures may be latin-1)."""
    lines = path.read_bytes().split(b"\n")
    lines[line - 1] = new if isinstance(new, bytes) else new.encode()
    path.write_bytes(b"\n".join(lines))


def _fails_cleanly(wh: Path, args: list[str], message: str) -> str:
    """Run the ingest; it must fail with one `error: ...` line matching `message` and leave
    every raw table exactly as it was."""
    before = snapshot(wh)
    result = ingest(wh, *args)
    assert result.exit_code != 0
    err = result.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), result.stderr
    assert message in err[0], err[0]
    assert snapshot(wh) == before
    return err[0]


@pytest.fixture
def loaded(tmp_path) -> Path:
    """A warehouse already holding ml-10m, so 'unchanged' is checked against real contents."""
    wh = tmp_path / "w.duckdb"
    ingest_ok(wh, str(FIXTURES / "ml-10m"))
    return wh


# (fixture, file, 1-based line, new text, expected message after 'error: ')
LINE_CASES = {
    "non-numeric id": (
        "ml-20m",
        "ratings.csv",
        5,
        "abc,47,3.5,1112484727",
        "ml-20m/ratings.csv:5: userId 'abc' is not valid (expected an integer id)",
    ),
    "empty id": (
        "ml-1m",
        "ratings.dat",
        3,
        "1::::3::978301968",
        "ml-1m/ratings.dat:3: MovieID is empty (expected an integer id)",
    ),
    "rating off the half-star scale": (
        "ml-20m",
        "ratings.csv",
        17,
        "4,11,7.5,840879116",
        "ml-20m/ratings.csv:17: rating '7.5' is outside the scale (expected a rating 0.5..5.0 in half stars)",
    ),
    "half star in a whole-star release": (
        "ml-1m",
        "ratings.dat",
        4,
        "1::3408::3.5::978300275",
        "ml-1m/ratings.dat:4: Rating '3.5' is outside the scale (expected a rating 1..5 in whole stars)",
    ),
    "rating not a number": (
        "ml-10m",
        "ratings.dat",
        2,
        "1::185::five::838983525",
        "ml-10m/ratings.dat:2: Rating 'five' is not a number (expected a rating 0.5..5.0 in half stars)",
    ),
    "unparseable timestamp": (
        "ml-10m",
        "tags.dat",
        4,
        "20::2424::chick flick::yesterday",
        "ml-10m/tags.dat:4: Timestamp 'yesterday' is not valid (expected unix seconds)",
    ),
    "negative timestamp": (
        "ml-100k",
        "u.data",
        9,
        "305\t451\t3\t-886324817",
        "ml-100k/u.data:9: timestamp '-886324817' is not valid (expected unix seconds)",
    ),
    "too few fields": (
        "ml-100k",
        "u.data",
        7,
        "115\t265\t2",
        "ml-100k/u.data:7: 3 fields (expected 4: user id,item id,rating,timestamp)",
    ),
    "too many fields": (
        "ml-20m",
        "movies.csv",
        4,
        "3,Grumpier Old Men (1995),Comedy,Romance",
        "ml-20m/movies.csv:4: 4 fields (expected 3: movieId,title,genres)",
    ),
    "invalid UTF-8": (
        "ml-20m",
        "tags.csv",
        3,
        b"65,208,dark \xff hero,1368150078",
        "ml-20m/tags.csv:3: invalid UTF-8 byte sequence (expected UTF-8 text)",
    ),
    "bad genre flag": (
        "ml-100k",
        "u.item",
        2,
        "40|To Wong Foo (1995)|01-Jan-1995||http://x|0|0|0|0|0|yes|0|0|0|0|0|0|0|0|0|0|0|0|0",
        "ml-100k/u.item:2: Comedy 'yes' is not valid (expected a genre flag 0 or 1)",
    ),
}


@pytest.mark.parametrize("case", LINE_CASES, ids=list(LINE_CASES))
def test_bad_line_fails_with_file_and_line(case, tmp_path, loaded):
    fixture, name, line, text, message = LINE_CASES[case]
    d = copy_fixture(fixture, tmp_path)
    _edit_line(d / name, line, text)
    _fails_cleanly(loaded, [str(d)], message.replace(f"{fixture}/", f"{d}/"))


def test_several_bad_lines_report_the_first_and_count_the_rest(tmp_path, loaded):
    d = copy_fixture("ml-20m", tmp_path)
    _edit_line(d / "ratings.csv", 9, "2,62,9.0,974820598")
    _edit_line(d / "ratings.csv", 4, "1,32,x,1112484819")
    _fails_cleanly(
        loaded,
        [str(d)],
        f"{d}/ratings.csv:4: rating 'x' is not a number (expected a rating 0.5..5.0 in "
        f"half stars); 1 more bad line: --quarantine loads the good rows and keeps the bad ones",
    )


FILE_CASES = {
    "missing ratings file": (
        lambda d: (d / "ratings.csv").unlink(),
        "{d}: ml-csv layout: found movies.csv, tags.csv but no ratings.csv (expected ratings.csv",
    ),
    "empty file": (
        lambda d: (d / "ratings.csv").write_bytes(b""),
        "{d}/ratings.csv: empty file (expected ratings rows)",
    ),
    "header only": (
        lambda d: (d / "tags.csv").write_text("userId,movieId,tag,timestamp\n"),
        "{d}/tags.csv: no data rows (expected tags rows after the header)",
    ),
    "wrong header": (
        lambda d: (d / "movies.csv").write_text("id,name,genres\n1,A (1990),Drama\n"),
        "{d}/movies.csv:1: header 'id,name,genres' is not the ml-csv header (expected 'movieId,title,genres'; "
        "to load this file as it is: --format generic --columns item_id=id,title=name,genres=genres)",
    ),
    "unknown format": (
        lambda d: [f.unlink() for f in d.iterdir()] + [(d / "notes.txt").write_text("hello\n")],
        "{d}: unknown format (expected u.data (ml-100k), ratings.dat (ml-1m, ml-10m), ratings.csv",
    ),
}


@pytest.mark.parametrize("case", FILE_CASES, ids=list(FILE_CASES))
def test_bad_file_fails_clearly(case, tmp_path, loaded):
    change, message = FILE_CASES[case]
    d = copy_fixture("ml-20m", tmp_path)
    change(d)
    _fails_cleanly(loaded, [str(d)], message.format(d=d))


def test_a_zip_that_is_not_one(tmp_path, loaded):
    fake = tmp_path / "ml-1m.zip"
    fake.write_text("this is not a zip archive\n")
    _fails_cleanly(loaded, [str(fake)], f"{fake}: not a zip archive")


def test_a_truncated_zip(tmp_path, loaded):
    archive = tmp_path / "ml-1m.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.write(FIXTURES / "ml-1m" / "ratings.dat", "ml-1m/ratings.dat")
    archive.write_bytes(archive.read_bytes()[:-30])
    _fails_cleanly(loaded, [str(archive)], f"{archive}: not a zip archive")


def test_forced_format_checks_that_releases_scale(tmp_path, loaded):
    """--format ml-1m on ml-10m files: whole stars only, so the first half star is an error."""
    _fails_cleanly(
        loaded,
        [str(FIXTURES / "ml-10m"), "--format", "ml-1m"],
        f"{FIXTURES}/ml-10m/ratings.dat:9: Rating '4.5' is outside the scale (expected a rating 1..5 in whole stars)",
    )


def test_unknown_format_name(tmp_path, loaded):
    _fails_cleanly(
        loaded,
        [str(FIXTURES / "ml-1m"), "--format", "ml-2m"],
        "--format 'ml-2m' is unknown (expected auto, ml-100k, ml-1m, ml-10m, ml-csv, generic",
    )


def test_unknown_columns_mapping_field(tmp_path, loaded):
    _fails_cleanly(
        loaded,
        [str(FIXTURES / "generic"), "--columns", "user=UserID"],
        "--columns: unknown field 'user' (expected some of user_id, item_id",
    )


def test_mapping_to_a_column_that_is_not_there(tmp_path, loaded):
    _fails_cleanly(
        loaded,
        [str(FIXTURES / "generic"), "--columns", "rating=Stars"],
        "--columns: rating=Stars matches no column",
    )


def test_generic_parquet_bad_row_names_the_row(tmp_path, loaded):
    import duckdb

    d = tmp_path / "pq"
    d.mkdir()
    with duckdb.connect() as con:
        con.execute(f"""COPY (SELECT * FROM (VALUES ('1', 5, 1262304000), ('x', 5, 1262390400))
                        t(user_id, item_id, timestamp)) TO '{d / "ratings.parquet"}' (FORMAT parquet)""")
    _fails_cleanly(
        loaded, [str(d)], f"{d}/ratings.parquet:2: user_id 'x' is not valid (expected an integer id)"
    )


# -- the failed-ingest-leaves-nothing property -------------------------------------------------
def test_error_in_a_later_file_rolls_back_the_earlier_ones(tmp_path, loaded):
    """ratings.csv and movies.csv merge before tags.csv fails: none of it may stay."""
    d = copy_fixture("ml-20m", tmp_path)
    _edit_line(d / "tags.csv", 10, "121,1,pixar,not-a-time")
    before = snapshot(loaded)
    _fails_cleanly(
        loaded, [str(d)], f"{d}/tags.csv:10: timestamp 'not-a-time' is not valid (expected unix seconds)"
    )
    assert count(loaded, "ratings") == len(before["ratings"]) == 16  # ml-10m only, nothing of ml-20m
    # and once fixed, the same files load in full
    _edit_line(d / "tags.csv", 10, "121,1,pixar,1300000000")
    ingest_ok(loaded, str(d))
    assert count(loaded, "ratings") == 16 + 18 - 1  # the pair (2, 110) is in both; ml-20m's later rating wins
    assert rows(loaded, "SELECT source FROM ratings_with_source WHERE user_id = 2 AND item_id = 110") == [
        (f"{d}/ratings.csv",)
    ]


def test_failed_first_ingest_leaves_an_empty_warehouse(tmp_path):
    wh = tmp_path / "new.duckdb"
    d = copy_fixture("ml-1m", tmp_path)
    _edit_line(d / "users.dat", 2, "2::M::fifty::16::70072")
    result = ingest(wh, str(d))
    assert result.exit_code != 0 and "users.dat:2: Age 'fifty' is not valid" in result.stderr
    assert all(v == [] for v in snapshot(wh).values())


# -- quarantine --------------------------------------------------------------------------------
def test_quarantine_loads_good_rows_and_keeps_bad_ones(tmp_path):
    wh = tmp_path / "w.duckdb"
    d = copy_fixture("ml-20m", tmp_path)
    _edit_line(d / "ratings.csv", 3, "1,29,6.0,1112484676")
    _edit_line(d / "ratings.csv", 6, "1,50,3.5")
    _edit_line(d / "ratings.csv", 8, "2,x,4.0,974820889")
    out = ingest_ok(wh, "--quarantine", str(d))
    assert "18 read, 15 new or changed, 3 rejected" in out
    assert count(wh, "ratings") == 15
    assert rows(wh, "SELECT file, line, reason, raw FROM quarantine ORDER BY line") == [
        (
            f"{d}/ratings.csv",
            3,
            "rating '6.0' is outside the scale (expected a rating 0.5..5.0 in half stars)",
            "1,29,6.0,1112484676",
        ),
        (f"{d}/ratings.csv", 6, "3 fields (expected 4: userId,movieId,rating,timestamp)", "1,50,3.5"),
        (f"{d}/ratings.csv", 8, "movieId 'x' is not valid (expected an integer id)", "2,x,4.0,974820889"),
    ]
    ingest_id = rows(wh, "SELECT DISTINCT ingest_id FROM quarantine")
    assert ingest_id == rows(wh, "SELECT DISTINCT ingest_id FROM ingest_log")
    assert rows(
        wh, "SELECT rows_read, rows_loaded, rows_rejected FROM ingest_log WHERE kind = 'ratings'"
    ) == [(18, 15, 3)]
    # none of the bad lines' pairs is in ratings; the good neighbours are
    assert rows(wh, "SELECT count(*) FROM ratings WHERE (user_id, item_id) IN ((1, 29), (1, 50))") == [(0,)]
    assert rows(wh, "SELECT rating FROM ratings WHERE user_id = 1 AND item_id = 32") == [(3.5,)]


# -- a second writer -----------------------------------------------------------------------------
def test_busy_warehouse_refuses_a_second_writer(tmp_path):
    wh = tmp_path / "w.duckdb"
    code = "import sys; from batchrec.cli import main; sys.exit(main())"
    with Warehouse(wh).lock("test-holder"):
        proc = subprocess.run(
            [sys.executable, "-c", code, "--warehouse", str(wh), "ingest", str(FIXTURES / "ml-1m")],
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert proc.returncode != 0
    assert "warehouse is busy (held by" in proc.stderr and "test-holder" in proc.stderr
    assert not wh.exists() or snapshot(wh) == {t: [] for t in snapshot(wh)}
