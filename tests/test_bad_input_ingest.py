"""Bad input to `batchrec ingest` (issue #17, the ingest cases), one table row per case.

Each row is the files of a dataset folder, the CLI arguments, the exit code and the one error line
expected (a regex after 'error: '; `{d}` is the folder). Every row runs the real CLI against a
warehouse that already holds a good load (the ml-20m fixture) and checks that every table of it
is byte-identical afterwards (`table_checksums`). The cases that need more than one line (what
--quarantine keeps, what does load, a full disk) follow the table.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import duckdb
import pytest
from click.testing import CliRunner
from test_ingest import FIXTURES, count, rows, utc
from warehouse_checks import table_checksums

from batchrec.cli import main

RATINGS_HEADER = "userId,movieId,rating,timestamp\n"
GOOD = "1,2,3.5,1112486027\n1,29,3.5,1112484676\n"  # two good ml-csv rows (lines 2 and 3 after the header)
CLI = [sys.executable, "-c", "import sys; from batchrec.cli import main; sys.exit(main())"]


def ratings_csv(*lines: str) -> dict[str, str]:
    """ml-csv ratings.csv: the header, two good rows, then `lines` (line 4 onwards)."""
    return {"ratings.csv": RATINGS_HEADER + GOOD + "".join(f"{line}\n" for line in lines)}


def parquet(select: str) -> Callable[[Path], None]:
    """A Parquet file written by DuckDB from `select` (its columns' types are the file's)."""

    def write(path: Path) -> None:
        with duckdb.connect() as con:
            con.execute(f"COPY ({select}) TO '{path}' (FORMAT parquet)")

    return write


def zip_of(members: dict[str, bytes]) -> Callable[[Path], None]:
    def write(path: Path) -> None:
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
            for name, data in members.items():
                zf.writestr(name, data)

    return write


PQ_ROW = "SELECT * FROM (VALUES {}) t(user_id, item_id, rating, timestamp)"
BOMB = (RATINGS_HEADER + "1,2,3.5,1112486027\n" * 150_000).encode()  # 2.8 MB that zips to ~6 KB


@dataclass(frozen=True)
class Case:
    files: dict[str, str | bytes | Callable[[Path], None]]
    error: str  # regex of the line after 'error: '; {d} is the dataset folder
    args: tuple[str, ...] = ("{d}",)
    exit: int = 1
    subprocess: bool = False  # run as a real `batchrec` process rather than in process


CASES = {
    # 1. non-integer ids and timestamps are bad rows, never rounded
    "csv id 1.5": Case(
        ratings_csv("1.5,47,3.5,1112484727"),
        r"{d}/ratings.csv:4: userId '1\.5' is not valid \(expected an integer id\)$",
        subprocess=True,
    ),
    "csv id 2.5": Case(
        ratings_csv("1,2.5,3.5,1112484727"), r"{d}/ratings.csv:4: movieId '2\.5' is not valid"
    ),
    "csv id 1e3": Case(ratings_csv("1e3,47,3.5,1112484727"), r"{d}/ratings.csv:4: userId '1e3' is not valid"),
    "csv id 0x10": Case(
        ratings_csv("1,0x10,3.5,1112484727"), r"{d}/ratings.csv:4: movieId '0x10' is not valid"
    ),
    "csv id 1_000": Case(
        ratings_csv("1_000,47,3.5,1112484727"), r"{d}/ratings.csv:4: userId '1_000' is not valid"
    ),
    "csv id out of range": Case(
        ratings_csv("99999999999999999999,47,3.5,1112484727"),
        r"{d}/ratings.csv:4: userId '99999999999999999999' is out of range",
    ),
    "csv fractional timestamp": Case(
        ratings_csv("1,47,3.5,964982703.6"),
        r"{d}/ratings.csv:4: timestamp '964982703\.6' is not valid \(expected unix seconds\)$",
    ),
    "u.data (tab) id 1.5": Case(
        {"u.data": "196\t242\t3\t881250949\n1.5\t302\t3\t891717742\n"},
        r"{d}/u.data:2: user id '1\.5' is not valid \(expected an integer id\)$",
    ),
    "ratings.dat (::) id 1e3": Case(
        {"ratings.dat": "1::1193::5::978300760\n1::1e3::3::978302109\n", "users.dat": "1::F::1::10::48067\n"},
        r"{d}/ratings.dat:2: MovieID '1e3' is not valid \(expected an integer id\)$",
    ),
    "ratings.dat (::) fractional timestamp": Case(
        {"ratings.dat": "1::122::5::838985046.5\n"},
        r"{d}/ratings.dat:1: Timestamp '838985046\.5' is not valid",
    ),
    "tags.dat id 0x10": Case(
        {"ratings.dat": "1::122::5::838985046\n", "tags.dat": "0x10::4973::excellent!::1215184630\n"},
        r"{d}/tags.dat:1: UserID '0x10' is not valid \(expected an integer id\)$",
    ),
    "generic csv id 2.5": Case(
        {"events.csv": "user_id,item_id,ts\n1,10,1262304000\n2,2.5,1262304000\n"},
        r"{d}/events.csv:3: item_id '2\.5' is not valid \(expected an integer id\)$",
    ),
    "parquet DOUBLE id 2.5": Case(
        {"ratings.parquet": parquet(PQ_ROW.format("(1.0, 5, 4.0, 1262304000), (2.5, 5, 3.0, 1262390400)"))},
        r"{d}/ratings.parquet:2: user_id '2\.5' is not a whole number \(expected an integer id\)$",
    ),
    "parquet BOOLEAN id": Case(
        {"ratings.parquet": parquet(PQ_ROW.format("(true, 5, 4.0, 1262304000)"))},
        r"{d}/ratings.parquet:1: user_id 'true' is a BOOLEAN \(expected an integer id\)$",
    ),
    "parquet DOUBLE timestamp with a fraction": Case(
        {"ratings.parquet": parquet(PQ_ROW.format("(1, 5, 4.0, 964982703.6::DOUBLE)"))},
        r"{d}/ratings.parquet:1: timestamp '964982703\.6' is not a whole number \(expected unix seconds or an ISO",
    ),
    # 2. a near-miss header is not a generic file; generic ratings are checked against the warehouse's scale
    "ratings.csv header user,movie,stars,time": Case(
        {"ratings.csv": "user,movie,stars,time\n1,2,7,964982703\n"},
        r"{d}/ratings.csv:1: header 'user,movie,stars,time' is not the ml-csv header \(expected "
        r"'userId,movieId,rating,timestamp'; to load this file as it is: --format generic --columns "
        r"user_id=user,item_id=movie,rating=stars,ts=time\)$",
    ),
    "ratings.csv lower-case header": Case(
        {"ratings.csv": "userid,movieid,rating,timestamp\n1,2,9.5,964982703\n"},
        r"{d}/ratings.csv:1: header 'userid,movieid,rating,timestamp' is not the ml-csv header \(expected "
        r"'userId,movieId,rating,timestamp'; .*--format generic",
    ),
    "tags.csv near-miss header": Case(
        {"ratings.csv": RATINGS_HEADER + GOOD, "tags.csv": "user,movie,tag,time\n1,2,x,1\n"},
        r"{d}/tags.csv:1: header 'user,movie,tag,time' is not the ml-csv header",
    ),
    "generic on purpose: 7 on a half-star warehouse": Case(
        {"ratings.csv": "user,movie,stars,time\n1,2,4.5,964982703\n1,3,7,964982703\n1,4,-3,964982703\n"},
        r"{d}/ratings.csv:3: stars '7' is outside the scale \(expected a rating 0\.5\.\.5\.0 in half stars\); "
        r"1 more bad line: --quarantine",
        ("{d}", "--format", "generic"),
    ),
    "generic with --rating-scale 1..10: -3 still off": Case(
        {"ratings.csv": "user,movie,stars,time\n1,2,9.5,964982703\n1,3,7,964982703\n1,4,-3,964982703\n"},
        r"{d}/ratings.csv:4: stars '-3' is outside the scale \(expected a rating 1\.\.10\)$",
        ("{d}", "--format", "generic", "--rating-scale", "1..10"),
    ),
    "--rating-scale not a scale": Case(
        ratings_csv(),
        r"--rating-scale '5\.\.1' is empty or its step does not fit",
        ("{d}", "--format", "generic", "--rating-scale", "5..1"),
    ),
    "--rating-scale with a MovieLens release": Case(
        ratings_csv(), r"--rating-scale applies to generic files", ("{d}", "--rating-scale", "1..10")
    ),
    # 3. NaN, ±inf and off-scale ratings are bad rows in every reader
    "csv rating nan": Case(
        ratings_csv("1,47,nan,1112484727"),
        r"{d}/ratings.csv:4: rating 'nan' is outside the scale \(expected a rating 0\.5\.\.5\.0 in half stars\)$",
    ),
    "csv rating inf": Case(
        ratings_csv("1,47,inf,1112484727"), r"{d}/ratings.csv:4: rating 'inf' is outside the scale"
    ),
    "csv rating -inf": Case(
        ratings_csv("1,47,-inf,1112484727"), r"{d}/ratings.csv:4: rating '-inf' is outside the scale"
    ),
    "ratings.dat rating NaN": Case(
        {"ratings.dat": "1::1193::NaN::978300760\n", "users.dat": "1::F::1::10::48067\n"},
        r"{d}/ratings.dat:1: Rating 'NaN' is outside the scale \(expected a rating 1\.\.5 in whole stars\)$",
    ),
    "generic csv rating NaN": Case(
        {"r.csv": "user_id,item_id,rating,ts\n1,10,4,1262304000\n1,11,NaN,1262304000\n"},
        r"{d}/r.csv:3: rating 'NaN' is outside the scale",
    ),
    "parquet rating NaN": Case(
        {
            "ratings.parquet": parquet(
                PQ_ROW.format("(1, 5, 4.0, 1262304000), (2, 2, 'nan'::DOUBLE, 1262390400)")
            )
        },
        r"{d}/ratings.parquet:2: rating 'nan' is outside the scale \(expected a rating 0\.5\.\.5\.0",
    ),
    "parquet rating inf": Case(
        {"ratings.parquet": parquet(PQ_ROW.format("(1, 5, 'inf'::DOUBLE, 1262304000)"))},
        r"{d}/ratings.parquet:1: rating 'inf' is outside the scale",
    ),
    "parquet rating off the scale": Case(
        {"ratings.parquet": parquet(PQ_ROW.format("(1, 5, 7.0, 1262304000)"))},
        r"{d}/ratings.parquet:1: rating '7\.0' is outside the scale",
    ),
    # 4. far-future timestamps
    "csv timestamp in 2100": Case(
        ratings_csv("1,47,3.5,4102444800"),
        r"{d}/ratings.csv:4: timestamp '4102444800' is after \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC, "
        r"the ingest time \+ --max-future \(expected unix seconds\)$",
    ),
    "generic ISO time in 2100": Case(
        {"r.csv": "user_id,item_id,ts\n1,10,2020-01-02\n1,11,2100-01-01 00:00:00\n"},
        r"{d}/r.csv:3: ts '2100-01-01 00:00:00' is after .* UTC, the ingest time \+ --max-future",
    ),
    "parquet TIMESTAMP in 2100": Case(
        {
            "ratings.parquet": parquet(
                "SELECT 1 AS user_id, 5 AS item_id, TIMESTAMP '2100-01-01' AS timestamp"
            )
        },
        r"{d}/ratings.parquet:1: timestamp '2100-01-01 00:00:00' is after .* UTC",
    ),
    "an hour ahead with --max-future 0s": Case(
        ratings_csv(f"1,47,3.5,{int(time.time()) + 3600}"),
        r"{d}/ratings.csv:4: timestamp '\d+' is after ",
        ("{d}", "--max-future", "0s"),
    ),
    "--max-future not a duration": Case(
        ratings_csv(), r"--max-future 'soon' is not a duration", ("{d}", "--max-future", "soon")
    ),
    # 7. documented codes and blank tags
    "users.dat occupation 99": Case(
        {"ratings.dat": "1::1193::5::978300760\n", "users.dat": "1::F::1::99::48067\n"},
        r"{d}/users.dat:1: Occupation '99' is not valid \(expected an occupation code 0\.\.20\)$",
    ),
    "users.dat age -4": Case(
        {"ratings.dat": "1::1193::5::978300760\n", "users.dat": "1::F::-4::10::48067\n"},
        r"{d}/users.dat:1: Age '-4' is not valid \(expected an age group \(1, 18, 25, 35, 45, 50 or 56\)\)$",
    ),
    "users.dat gender X": Case(
        {"ratings.dat": "1::1193::5::978300760\n", "users.dat": "1::X::1::10::48067\n"},
        r"{d}/users.dat:1: Gender 'X' is not valid \(expected M or F\)$",
    ),
    "u.user occupation not in u.occupation": Case(
        {"u.data": "196\t242\t3\t881250949\n", "u.user": "196|49|M|astronaut|55105\n"},
        r"{d}/u.user:1: occupation 'astronaut' is not valid \(expected an occupation of u\.occupation\)$",
    ),
    "tags.csv empty tag": Case(
        {
            "ratings.csv": RATINGS_HEADER + GOOD,
            "tags.csv": "userId,movieId,tag,timestamp\n65,208,dark hero,1368150078\n65,353,,1368150079\n",
        },
        r"{d}/tags.csv:3: tag is empty \(expected a tag\)$",
    ),
    "tags.dat blank tag": Case(
        {"ratings.dat": "1::122::5::838985046\n", "tags.dat": "15::4973::   ::1215184630\n"},
        r"{d}/tags.dat:1: Tag ' +' is not valid \(expected a tag\)$",
    ),
    # 9. faults of the input itself
    "corrupt Parquet": Case(
        {"ratings.parquet": b"PAR1" + bytes(range(200)) + b"PAR1"},
        r"{d}/ratings.parquet: not a readable Parquet file \(.*\) \(expected an intact Parquet file\)$",
    ),
    "invalid byte in a rating": Case(
        {"ratings.csv": RATINGS_HEADER.encode() + GOOD.encode() + b"1,47,3.\xff,1112484727\n"},
        r"{d}/ratings.csv:4: invalid UTF-8 byte sequence \(expected UTF-8 text\)$",
    ),
    "short line": Case(
        ratings_csv("1,47"), r"{d}/ratings.csv:4: 2 fields \(expected 4: userId,movieId,rating,timestamp\)$"
    ),
    "long line": Case(
        ratings_csv("1,47,3.5,1112484727,x"),
        r"{d}/ratings.csv:4: 5 fields \(expected 4: userId,movieId,rating,timestamp\)$",
    ),
    "off-scale rating then an invalid byte": Case(
        {
            "ratings.csv": (RATINGS_HEADER + GOOD + "1,32,9.0,1112484819\n").encode()
            + b"1,47,\xff,1112484727\n"
        },
        r"{d}/ratings.csv:4: rating '9\.0' is outside the scale \(expected a rating 0\.5\.\.5\.0 in half stars\); "
        r"1 more bad line: --quarantine loads the good rows and keeps the bad ones$",
    ),
    "invalid byte then an off-scale rating": Case(
        {"ratings.csv": (RATINGS_HEADER + GOOD).encode() + b"1,47,\xff,1112484727\n1,32,9.0,1112484819\n"},
        r"{d}/ratings.csv:4: invalid UTF-8 byte sequence \(expected UTF-8 text\); 1 more bad line",
    ),
    "bad row after an empty line": Case(
        ratings_csv("", "1,50,3.5,1112484580", "1,47,x,1112484727"),
        r"{d}/ratings.csv:6: rating 'x' is not a number",
    ),
    "bad row after a tag spanning lines": Case(
        {
            "ratings.csv": RATINGS_HEADER + GOOD,
            "tags.csv": 'userId,movieId,tag,timestamp\n65,208,"two\nlines",1368150078\n'
            "\n65,353,dark hero,x\n",
        },
        r"{d}/tags.csv:4: timestamp 'x' is not valid \(expected unix seconds\)$",
    ),
    "bad row after a quote inside a tag": Case(
        {
            "ratings.csv": RATINGS_HEADER + GOOD,
            "tags.csv": 'userId,movieId,tag,timestamp\n65,208,dark "hero,1368150078\n\n65,353,dark hero,x\n',
        },
        r"{d}/tags.csv:4: timestamp 'x' is not valid \(expected unix seconds\)$",
    ),
    # 10. zip input: members are streamed under a size and a ratio limit
    "zip bomb": Case(
        {"ml.zip": zip_of({"ml/ratings.csv": BOMB})},
        r"{d}/ml\.zip/ml/ratings\.csv: unzips to more than 1\.0 MiB from \d+\.\d KiB compressed \(expected at "
        r"most --zip-max-size 8\.0 GiB and --zip-max-ratio 100x; raise them to load it on purpose\)$",
        ("{d}/ml.zip",),
    ),
    "zip member over --zip-max-size": Case(
        {"ml.zip": zip_of({"ml/ratings.csv": (RATINGS_HEADER + GOOD).encode()})},
        r"{d}/ml\.zip/ml/ratings\.csv: unzips to more than 10 B from \d+ B compressed",
        ("{d}/ml.zip", "--zip-max-size", "10B"),
    ),
    "--zip-max-ratio not a number": Case(
        ratings_csv(), r"--zip-max-ratio 'lots' is not a number above 1", ("{d}", "--zip-max-ratio", "lots")
    ),
}


@pytest.fixture(scope="module")
def loaded_template(tmp_path_factory) -> Path:
    """A warehouse holding a good load (the ml-20m fixture), copied by each case."""
    wh = tmp_path_factory.mktemp("template") / "w.duckdb"
    result = CliRunner().invoke(main, ["--warehouse", str(wh), "ingest", str(FIXTURES / "ml-20m")])
    assert result.exit_code == 0, result.output
    return wh


@pytest.fixture
def loaded(loaded_template, tmp_path) -> Path:
    wh = tmp_path / "w.duckdb"
    shutil.copy(loaded_template, wh)
    return wh


def write_files(d: Path, files: dict) -> None:
    d.mkdir()
    for name, content in files.items():
        path = d / name
        if callable(content):
            content(path)
        else:
            path.write_bytes(content if isinstance(content, bytes) else content.encode())


def run_ingest(wh: Path, args: list[str], real_process: bool = False) -> tuple[int, list[str]]:
    """(exit code, stderr lines) of `batchrec -q --warehouse wh ingest ARGS`."""
    argv = ["-q", "--warehouse", str(wh), "ingest", *args]
    if real_process:
        proc = subprocess.run([*CLI, *argv], capture_output=True, text=True, timeout=120)
        return proc.returncode, proc.stderr.splitlines()
    result = CliRunner().invoke(main, argv)
    return result.exit_code, result.stderr.splitlines()


@pytest.mark.parametrize("name", CASES, ids=list(CASES))
def test_bad_input_fails_with_one_line_and_changes_nothing(name, tmp_path, loaded):
    case = CASES[name]
    d = tmp_path / "data"
    write_files(d, case.files)
    before = table_checksums(loaded)
    code, err = run_ingest(loaded, [a.format(d=d) for a in case.args], case.subprocess)
    assert code == case.exit
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert re.match(case.error.replace("{d}", re.escape(str(d))), err[0].removeprefix("error: ")), err[0]
    assert table_checksums(loaded) == before


# -- what loads, and what --quarantine keeps ------------------------------------------------------
def test_quarantine_keeps_bad_lines_with_their_numbers_and_loads_the_good_ones(tmp_path):
    """An off-scale rating, an invalid byte, a short line and a rounded id in one file: each bad
    line is kept with its own line number, the good rows load."""
    wh, d = tmp_path / "w.duckdb", tmp_path / "data"
    body = (
        (RATINGS_HEADER + GOOD + "1,32,9.0,1112484819\n").encode()
        + b"1,47,\xff,1112484727\n"
        + b"\n2,3,4.0,974820889\n1,50\n1.5,62,4.0,974820598\n2,70,nan,974820598\n"
    )
    write_files(d, {"ratings.csv": body})
    code, err = run_ingest(wh, [str(d), "--quarantine"])
    assert code == 0, err
    assert rows(wh, "SELECT line, reason, raw FROM quarantine ORDER BY line") == [
        (
            4,
            "rating '9.0' is outside the scale (expected a rating 0.5..5.0 in half stars)",
            "1,32,9.0,1112484819",
        ),
        (5, "invalid UTF-8 byte sequence (expected UTF-8 text)", "1,47,?,1112484727"),
        (8, "2 fields (expected 4: userId,movieId,rating,timestamp)", "1,50"),
        (9, "userId '1.5' is not valid (expected an integer id)", "1.5,62,4.0,974820598"),
        (
            10,
            "rating 'nan' is outside the scale (expected a rating 0.5..5.0 in half stars)",
            "2,70,nan,974820598",
        ),
    ]
    assert rows(wh, "SELECT user_id, item_id, rating FROM ratings ORDER BY ALL") == [
        (1, 2, 3.5),
        (1, 29, 3.5),
        (2, 3, 4.0),
    ]


def test_nan_in_parquet_never_overwrites_an_explicit_rating(tmp_path):
    """It once loaded as an implicit interaction (rating NULL) that replaced the stored rating."""
    wh, d = tmp_path / "w.duckdb", tmp_path / "data"
    write_files(d, {"ratings.csv": RATINGS_HEADER + "1,5,4.0,1262304000\n"})
    assert run_ingest(wh, [str(d)])[0] == 0
    later = tmp_path / "later"
    write_files(later, {"ratings.parquet": parquet(PQ_ROW.format("(1, 5, 'nan'::DOUBLE, 1262390400)"))})
    assert run_ingest(wh, [str(later), "--quarantine"])[0] == 0
    assert rows(wh, "SELECT rating, ts FROM ratings") == [(4.0, utc(1262304000))]


def test_integral_values_load_as_they_are(tmp_path):
    """Whole numbers load exactly, in any reader: Parquet DOUBLE 3.0 is id 3, leading zeros and
    negative ids are integers too; a timestamp an hour ahead is within the default --max-future."""
    wh, d = tmp_path / "w.duckdb", tmp_path / "data"
    ahead = int(time.time()) + 3600
    write_files(
        d,
        {
            "ratings.parquet": parquet(PQ_ROW.format("(3.0, 5.0, 4.5, 1262304000.0), (4, 6, 1, 1262304000)")),
            "more.csv": f"user_id,item_id,rating,ts\n007,-8,2.5,{ahead}\n",
        },
    )
    code, err = run_ingest(wh, [str(d)])
    assert code == 0, err
    assert rows(wh, "SELECT user_id, item_id, rating, ts FROM ratings ORDER BY ALL") == [
        (3, 5, 4.5, utc(1262304000)),
        (4, 6, 1.0, utc(1262304000)),
        (7, -8, 2.5, utc(ahead)),
    ]


def test_generic_scale_comes_from_the_first_load_or_the_option(tmp_path):
    """The first load sets the warehouse's scale; a generic load is checked against it unless it
    names its own; a new warehouse's generic load with --rating-scale stores that one."""
    whole, d = tmp_path / "whole.duckdb", tmp_path / "data"
    assert run_ingest(whole, [str(FIXTURES / "ml-1m")])[0] == 0
    assert rows(whole, "SELECT low, high, step FROM rating_scale") == [(1.0, 5.0, 1.0)]
    write_files(d, {"ratings.csv": "user,movie,stars,time\n1,2,3.5,964982703\n"})
    code, err = run_ingest(whole, [str(d), "--format", "generic"])
    assert code == 1 and "stars '3.5' is outside the scale (expected a rating 1..5 in whole stars)" in err[0]
    assert run_ingest(whole, [str(d), "--format", "generic", "--rating-scale", "0.5..5:0.5"])[0] == 0
    assert rows(whole, "SELECT low, high, step FROM rating_scale") == [
        (1.0, 5.0, 1.0)
    ]  # the option is for that load

    tens = tmp_path / "tens.duckdb"
    write_files(tmp_path / "t", {"ratings.csv": "user,movie,stars,time\n1,2,9.5,964982703\n"})
    assert (
        run_ingest(tens, [str(tmp_path / "t"), "--format", "generic", "--rating-scale", "0..10:0.5"])[0] == 0
    )
    assert rows(tens, "SELECT low, high, step, rating FROM rating_scale, ratings") == [(0.0, 10.0, 0.5, 9.5)]


def test_csv_without_a_final_newline_loads_its_last_row(tmp_path):
    wh, d = tmp_path / "w.duckdb", tmp_path / "data"
    write_files(d, {"ratings.csv": RATINGS_HEADER + GOOD + "2,3,4.0,974820889"})
    assert run_ingest(wh, [str(d)])[0] == 0
    assert count(wh, "ratings") == 3
    assert rows(wh, "SELECT rating FROM ratings WHERE user_id = 2 AND item_id = 3") == [(4.0,)]


def test_zip_extracts_only_the_members_it_reads(tmp_path):
    """A bomb beside the MovieLens files is never unzipped: only the layout's files are."""
    wh, d = tmp_path / "w.duckdb", tmp_path / "data"
    members = {f"ml-1m/{f.name}": f.read_bytes() for f in (FIXTURES / "ml-1m").iterdir()}
    write_files(d, {"ml-1m.zip": zip_of({**members, "ml-1m/notes.txt": BOMB})})
    code, err = run_ingest(wh, [str(d / "ml-1m.zip")])
    assert code == 0, err
    assert count(wh, "ratings") == 20


# -- a full disk -------------------------------------------------------------------------------------
FULL_DISK = """
import json, shutil, subprocess, sys
from warehouse_checks import table_checksums
mnt, template, data = sys.argv[1:4]
subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", mnt], check=True)
shutil.copy(template, mnt + "/w.duckdb")
before = table_checksums(mnt + "/w.duckdb")
proc = subprocess.run(sys.argv[4:] + ["-q", "--warehouse", mnt + "/w.duckdb", "ingest", data], capture_output=True, text=True)
print(json.dumps({"code": proc.returncode, "stderr": proc.stderr, "unchanged": table_checksums(mnt + "/w.duckdb") == before}))
"""


def test_disk_full_is_one_line_and_the_warehouse_stays_as_it_was(tmp_path, loaded_template):
    """The warehouse on a 3 MB tmpfs (mounted in a private user and mount namespace, which vanishes
    with the process) runs out of space while ingest ml-latest-small writes its rows."""
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare(1) to mount a small tmpfs")
    mnt = tmp_path / "small"
    mnt.mkdir()
    proc = subprocess.run(
        [
            "unshare",
            "-rm",
            sys.executable,
            "-c",
            FULL_DISK,
            str(mnt),
            str(loaded_template),
            str(Path(__file__).parent.parent / "batchrec" / "datasets" / "ml-latest-small"),
            *CLI,
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).parent,
    )
    if proc.returncode != 0 and "mount" in proc.stderr:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip().splitlines()[-1]}")
    result = json.loads(proc.stdout)
    assert result["code"] == 1
    assert re.fullmatch(
        rf"error: no space left on device while writing {re.escape(str(mnt))}/w\.duckdb\S*: "
        r"free space and rerun\n",
        result["stderr"],
    ), result["stderr"]
    assert result["unchanged"]
