"""The serving path on ml-latest-small: the shipped run is what `score --model` publishes, readers
hold the serving file open through a whole nightly job, artifacts travel with their warehouse,
two warehouses in one folder keep to themselves, per-run headers, export."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import polars as pl
import pytest
from click.testing import CliRunner

from batchrec.cli import main
from batchrec.features import build_snapshot
from batchrec.ingest import ingest_path
from batchrec.jobs import run_job
from batchrec.runs import resolve_run
from batchrec.train import fit_run
from batchrec.warehouse import Warehouse, migrations, scalar

ROOT = Path(__file__).resolve().parent.parent
BATCHREC = Path(sys.executable).parent / "batchrec"  # the installed console script: a real, separate process


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Warehouse:
    """ml-latest-small ingested and featurised (user_temporal), no runs yet."""
    wh = Warehouse(tmp_path_factory.mktemp("prepared") / "wh" / "batchrec.duckdb")
    ingest_path(wh, dataset="ml-latest-small")
    build_snapshot(wh, protocols="user_temporal")
    return wh


def _copy(wh: Warehouse, folder: Path, name: str = "batchrec.duckdb") -> Warehouse:
    """A private copy of a warehouse (and its artifacts) as `folder/name`."""
    folder.mkdir(parents=True, exist_ok=True)
    copy = Warehouse(folder / name)
    shutil.copy(wh.path, copy.path)
    if wh.artifacts_dir.exists():
        shutil.copytree(wh.artifacts_dir, copy.artifacts_dir)
    return copy


def _cli(wh: Warehouse, *args: str):
    return CliRunner().invoke(main, ["--warehouse", str(wh.path), *args])


def _live(path: Path) -> set[str]:
    """Run ids in `recommendations` of a database file, read by a fresh read-only connection."""
    con = duckdb.connect(str(path), read_only=True)
    try:
        return {r[0] for r in con.execute("SELECT DISTINCT run_id FROM recommendations").fetchall()}
    finally:
        con.close()


# -- 1. the right model ships ------------------------------------------------------------------
def test_score_model_publishes_the_shipped_run_even_when_a_newer_protocol_run_exists(prepared, tmp_path):
    wh = _copy(prepared, tmp_path / "wh")
    shipped = fit_run(wh, "popularity", device="cpu")
    newer = fit_run(wh, "popularity", protocol="user_temporal", device="cpu")  # what evaluate trains, later
    result = _cli(wh, "score", "--model", "popularity", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert _live(wh.path) == {shipped} and _live(wh.serving_path) == {shipped}
    # a protocol run ships only when named
    result = _cli(wh, "score", "--run", newer, "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert _live(wh.path) == {newer}


def test_only_protocol_runs_is_an_error_that_says_how_to_ship(prepared, tmp_path):
    wh = _copy(prepared, tmp_path / "wh")
    run = fit_run(wh, "popularity", protocol="user_temporal", device="cpu")
    result = _cli(wh, "score", "--model", "popularity", "--device", "cpu")
    assert result.exit_code == 1 and result.output.count("\n") == 1
    assert "no shipped run of model 'popularity' (fitted on every interaction)" in result.output
    assert "batchrec train popularity" in result.output and run in result.output


RESCORE_JOB = """
[job]
name = "rescore"

[[steps]]
step = "train"
model = "popularity"

[[steps]]
step = "score"
model = "popularity"
top_n = {top_n}

[[steps]]
step = "evaluate"
models = "popularity"
protocol = "user_temporal"
k = "10"
report = "{report}"
"""


def test_job_rescoring_with_a_new_top_n_publishes_the_shipped_run_not_the_evaluation_run(prepared, tmp_path):
    wh = _copy(prepared, tmp_path / "wh")
    job = tmp_path / "rescore.toml"
    job.write_text(RESCORE_JOB.format(top_n=5, report=tmp_path / "reports"))
    run_job(wh, job)
    job.write_text(RESCORE_JOB.format(top_n=7, report=tmp_path / "reports"))  # no new data, a new top_n
    out = run_job(wh, job)
    assert "1:train: skipped" in out and "2:score: skipped" not in out
    with wh.connect(read_only=True) as con:
        rows = con.execute("SELECT coalesce(protocol, 'all'), run_id, created_at FROM model_runs").fetchall()
        kinds, created = {k: r for k, r, _ in rows}, {k: c for k, _, c in rows}
        per_user = scalar(
            con, "SELECT max(n) FROM (SELECT count(*) AS n FROM recommendations GROUP BY user_id)"
        )
    assert (
        set(kinds) == {"all", "user_temporal"} and created["user_temporal"] > created["all"]
    )  # evaluation run is newer (by time: two fits in one second have ids ordered by their random suffix)
    assert _live(wh.path) == {kinds["all"]} and per_user == 7


# -- 2. readers never block the writer ---------------------------------------------------------
READER = """
import json, sys, time, duckdb
con = duckdb.connect(sys.argv[1], read_only=True)
query = ("SELECT string_agg(DISTINCT run_id, ',' ORDER BY run_id), count(*), "
         "(SELECT count(*) FROM recommendations_with_titles) FROM recommendations")
states = [con.execute(query).fetchall()[0]]
print("open", flush=True)
stop = sys.argv[2]
while not __import__("os").path.exists(stop):
    state = con.execute(query).fetchall()[0]
    if state not in states:
        states.append(state)
    time.sleep(0.2)
print(json.dumps(states), flush=True)
"""


def _score_first_run(wh: Warehouse) -> str:
    run = fit_run(wh, "popularity", device="cpu")
    result = _cli(wh, "score", "--run", run, "--device", "cpu")
    assert result.exit_code == 0, result.output
    return run


def _nightly_with_a_reader_held_open(wh: Warehouse, job_file: Path, cwd: Path) -> tuple[list, float]:
    """Hold a read-only session on the serving file (a separate process) while `batchrec run
    job_file` runs as another; returns the states the reader saw and the job's wall seconds."""
    stop = cwd / "stop-reading"
    reader = subprocess.Popen(
        [sys.executable, "-c", READER, str(wh.serving_path), str(stop)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert reader.stdout.readline() == "open\n", reader.stderr.read()
        t0 = time.perf_counter()
        job = subprocess.run(
            [str(BATCHREC), "--warehouse", str(wh.path), "run", str(job_file)],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=900,
        )
        seconds = time.perf_counter() - t0
        assert job.returncode == 0, job.stderr[-3000:]
        assert "busy" not in job.stderr
        stop.touch()
        states = json.loads(reader.stdout.readline())
        assert reader.wait(timeout=60) == 0
    finally:
        reader.kill()
        reader.wait()
    return states, seconds


SMALL_NIGHTLY = (
    (ROOT / "jobs" / "nightly.toml")
    .read_text()
    .replace('"ease"', '"popularity"')
    .replace('"ease,popularity"', '"popularity"')
)


def test_a_reader_holding_the_serving_file_through_the_nightly_job_keeps_the_old_run(prepared, tmp_path):
    wh = _copy(prepared, tmp_path / "wh")
    old = _score_first_run(wh)
    job = tmp_path / "nightly.toml"
    job.write_text(SMALL_NIGHTLY)
    with wh.connect(read_only=True) as con:
        rows = scalar(con, "SELECT count(*) FROM recommendations")
    states, seconds = _nightly_with_a_reader_held_open(wh, job, tmp_path)
    assert states == [[old, rows, rows]]  # the whole job long: the old run, nothing else
    new = _live(wh.serving_path)  # a new reader gets the new run: the job's shipped one
    assert len(new) == 1 and new != {old} and new == _live(wh.path)
    with wh.connect(read_only=True) as con:
        assert resolve_run(con, next(iter(new)))["protocol"] is None


@pytest.mark.slow
def test_the_real_nightly_job_with_a_reader_held_open(prepared, tmp_path):
    """`batchrec run jobs/nightly.toml` (EASE, evaluate ease + popularity) as it ships."""
    wh = _copy(prepared, tmp_path / "wh")
    old = _score_first_run(wh)
    states, seconds = _nightly_with_a_reader_held_open(wh, ROOT / "jobs" / "nightly.toml", tmp_path)
    assert [s[0] for s in states] == [old]
    new = _live(wh.serving_path)
    with duckdb.connect(str(wh.serving_path), read_only=True) as con:
        shipped = {
            r[0]
            for r in con.execute(
                "SELECT run_id FROM model_runs WHERE model = 'ease' AND protocol IS NULL"
            ).fetchall()
        }
    assert new == shipped and len(new) == 1
    print(f"nightly.toml with a reader held open: exit 0 in {seconds:.1f} s")


def test_readers_use_the_serving_file_and_fall_back_to_the_warehouse_without_one(prepared, tmp_path):
    wh = _copy(prepared, tmp_path / "wh")
    run = _score_first_run(wh)
    assert oct(wh.serving_path.stat().st_mode & 0o777) == "0o444"
    query = "SELECT DISTINCT run_id FROM recommendations_with_titles"
    assert _cli(wh, "sql", "--format", "csv", query).output.splitlines() == ["run_id", run]
    # a writer's session on the warehouse does not stop the readers (they never open it)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"import duckdb,time; c=duckdb.connect({str(wh.path)!r}); "
            "print('held', flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline() == "held\n"
        for args in (["sql", query], ["status"], ["recommend", "1"]):
            result = _cli(wh, *args)
            assert result.exit_code == 0 and run in result.output, result.output
    finally:
        holder.kill()
        holder.wait()
    wh.serving_path.unlink()  # e.g. a warehouse from before serving files
    assert _cli(wh, "sql", "--format", "csv", query).output.splitlines() == ["run_id", run]


def test_export_writes_parquet_and_csv_of_the_serving_tables(prepared, tmp_path):
    wh = _copy(prepared, tmp_path / "wh")
    _score_first_run(wh)
    with wh.connect(read_only=True) as con:
        expected = con.sql("SELECT * FROM recommendations ORDER BY user_id, rank").pl()
    for name in ("out/recs.parquet", "out/recs.csv"):
        to = tmp_path / name
        result = _cli(wh, "export", "--table", "recommendations", "--to", str(to))
        assert result.exit_code == 0, result.output
        assert f"exported {len(expected)} rows of recommendations to {to}" in result.output
        got = pl.read_parquet(to) if to.suffix == ".parquet" else pl.read_csv(to, try_parse_dates=True)
        assert got.columns == expected.columns and len(got) == len(expected)
        assert got["user_id"].to_list() == expected["user_id"].to_list()
        assert got["item_id"].to_list() == expected["item_id"].to_list()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "recs.csv",
        "recs.parquet",
    ]  # no temp left
    for args, message in (
        (["--to", str(tmp_path / "r.json")], "unknown file type .json (expected .parquet or .csv)"),
        (["--table", "nope", "--to", str(tmp_path / "r.csv")], "--table nope: no such table"),
    ):
        result = _cli(wh, "export", *args)
        assert result.exit_code == 1 and result.output.startswith("error: ") and message in result.output
        assert result.output.count("\n") == 1


# -- 3. it installs as a package ---------------------------------------------------------------
def test_the_wheel_ships_the_sql_folder_and_runs_from_another_directory(tmp_path):
    """Build the wheel from a copy of the checkout, install it (no dependencies: those of this
    environment are added after it on sys.path) into a fresh venv, and build a snapshot from
    another directory: the installed package reads its own batchrec/sql. (.ci/run installs the
    wheel with its dependencies and runs the nightly job.)"""
    import zipfile

    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for name in ("batchrec", "sql"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            str(src),
            "-w",
            str(tmp_path / "dist"),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    wheel = next((tmp_path / "dist").glob("batchrec-*.whl"))
    shipped = {n for n in zipfile.ZipFile(wheel).namelist() if n.startswith("batchrec/sql/")}
    assert shipped == {
        f"batchrec/sql/{p.relative_to(ROOT / 'sql').as_posix()}" for p in (ROOT / "sql").rglob("*.sql")
    }
    venv = tmp_path / "venv"
    env = {
        k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "BATCHREC_WAREHOUSE")
    }  # no checkout
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(venv / "bin" / "python"),
            "install",
            "-q",
            "--no-deps",
            str(wheel),
        ],
        check=True,
        capture_output=True,
        timeout=300,
        env=env,
    )
    deps = [p for p in sys.path if p.endswith("site-packages")]
    code = (
        "import sys; sys.path += sys.argv[1:]\n"
        "import batchrec, batchrec.warehouse as w\n"
        "from batchrec.cli import main\n"
        "print(batchrec.__file__, w.SQL_DIR, flush=True)\n"
        "main(['ingest', '--dataset', 'ml-latest-small'], standalone_mode=False)\n"
        "main(['features', '--protocols', 'user_temporal'], standalone_mode=False)\n"
    )
    work = tmp_path / "elsewhere"
    work.mkdir()
    run = subprocess.run(
        [str(venv / "bin" / "python"), "-c", code, *deps],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    package = (
        venv
        / "lib"
        / f"python{sys.version_info.major}.{sys.version_info.minor}"
        / "site-packages"
        / "batchrec"
    )
    assert run.stdout.splitlines()[0] == f"{package / '__init__.py'} {package / 'sql'}"
    with Warehouse(work / "warehouse" / "batchrec.duckdb").connect(read_only=True) as con:
        assert scalar(con, "SELECT count(*) FROM user_index") == 610


# -- 4. artifacts belong to their warehouse ----------------------------------------------------
def test_a_warehouse_moved_to_another_folder_scores_with_its_artifacts(prepared, tmp_path):
    wh = _copy(prepared, tmp_path / "first" / "place")
    result = _cli(wh, "train", "popularity", "--device", "cpu")
    assert result.exit_code == 0, result.output
    with wh.connect(read_only=True) as con:
        run_id, stored = con.execute("SELECT run_id, artifact_path FROM model_runs").fetchall()[0]
    assert stored == f"batchrec.artifacts/{run_id}"
    shutil.move(tmp_path / "first" / "place", tmp_path / "elsewhere")
    moved = Warehouse(tmp_path / "elsewhere" / "batchrec.duckdb")
    result = _cli(moved, "score", "--model", "popularity", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert _live(moved.path) == {run_id}


def test_artifacts_option_puts_them_elsewhere_and_they_stay_found(prepared, tmp_path):
    wh = _copy(prepared, tmp_path / "wh")
    models = tmp_path / "models"
    result = CliRunner().invoke(
        main,
        ["--warehouse", str(wh.path), "--artifacts", str(models), "train", "popularity", "--device", "cpu"],
    )
    assert result.exit_code == 0, result.output
    with wh.connect(read_only=True) as con:
        run_id, stored = con.execute("SELECT run_id, artifact_path FROM model_runs").fetchall()[0]
    assert stored == str((models / run_id).resolve()) and not wh.artifacts_dir.exists()
    shutil.move(tmp_path / "wh", tmp_path / "moved")
    result = _cli(Warehouse(tmp_path / "moved" / "batchrec.duckdb"), "score", "--device", "cpu")
    assert result.exit_code == 0, result.output
    # s3:// is an object store (tests/test_scale.py); a scheme batchrec cannot reach is one line
    result = CliRunner().invoke(main, ["--warehouse", str(wh.path), "--artifacts", "gs://bucket/m", "status"])
    assert result.exit_code == 1 and "--artifacts gs://bucket/m: unsupported scheme gs://" in result.output


def _partial(wh: Warehouse, name: str, pid: int) -> Path:
    path = wh.artifacts_dir / f".{name}.{pid}@{socket.gethostname()}.partial"
    path.mkdir(parents=True)
    (path / "state.pt").write_bytes(b"half")
    return path


def test_two_warehouses_in_one_folder_never_touch_each_others_partials(prepared, tmp_path):
    a, b = _copy(prepared, tmp_path / "both", "a.duckdb"), _copy(prepared, tmp_path / "both", "b.duckdb")
    writer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])  # a live owner
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # an owner killed mid-save: its pid is free
    try:
        live_partial, dead_partial = (
            _partial(a, "popularity-live", writer.pid),
            _partial(a, "popularity-dead", gone.pid),
        )
        result = _cli(b, "train", "popularity", "--device", "cpu")
        assert result.exit_code == 0, result.output
        assert live_partial.exists() and dead_partial.exists()  # b trains in b.artifacts only
        assert len(list(b.artifacts_dir.iterdir())) == 1
        result = _cli(a, "train", "popularity", "--device", "cpu")
        assert result.exit_code == 0, result.output
        assert live_partial.exists() and not dead_partial.exists()  # only the orphan is cleaned up
    finally:
        writer.kill()
        writer.wait()
    assert sorted(p.name for p in (tmp_path / "both").iterdir() if p.is_dir()) == [
        "a.artifacts",
        "b.artifacts",
    ]


def test_migration_005_makes_artifact_paths_under_the_warehouse_relative(tmp_path, monkeypatch):
    import batchrec.warehouse as w

    path = tmp_path / "wh" / "batchrec.duckdb"
    monkeypatch.setattr(w, "migrations", lambda: [m for m in migrations() if m[0] < 5])
    with Warehouse(path).connect() as con:  # a warehouse as the previous release wrote it: absolute paths
        for run_id, where in (
            ("mf-1", f"{path.parent.resolve()}/artifacts/mf-1"),
            ("mf-2", "/mnt/models/mf-2"),
        ):
            con.execute(
                "INSERT INTO model_runs VALUES (?, 'mf', '{}', 's', NULL, '{}', ?, 'cpu', 1, now()::TIMESTAMP)",
                [run_id, where],
            )
    monkeypatch.undo()
    with Warehouse(path).connect() as con:  # the upgrade applies 005
        stored = dict(con.execute("SELECT run_id, artifact_path FROM model_runs").fetchall())
    assert stored == {"mf-1": "artifacts/mf-1", "mf-2": "/mnt/models/mf-2"}
    shutil.move(tmp_path / "wh", tmp_path / "moved")  # from now on the warehouse's folder can move
    with Warehouse(tmp_path / "moved" / "batchrec.duckdb").connect(read_only=True) as con:
        assert resolve_run(con, "mf-1")["artifact_path"] == str(
            (tmp_path / "moved").resolve() / "artifacts" / "mf-1"
        )
        assert resolve_run(con, "mf-2")["artifact_path"] == "/mnt/models/mf-2"


# -- 5. headers name every live run ------------------------------------------------------------
def test_after_a_partial_run_status_and_recommend_show_each_run_with_its_counts(prepared, tmp_path):
    wh = _copy(prepared, tmp_path / "wh")
    first = _score_first_run(wh)
    second = fit_run(wh, "popularity", device="cpu")
    users = tmp_path / "users.txt"
    users.write_text("1\n2\n3\n")
    result = _cli(wh, "score", "--run", second, "--users", str(users), "--device", "cpu")
    assert result.exit_code == 0, result.output
    with wh.connect(read_only=True) as con:
        n_users = scalar(con, "SELECT count(DISTINCT user_id) FROM ratings")
        first_at, second_at = (
            scalar(con, "SELECT max(scored_at) FROM recommendations WHERE run_id = ?", [r])
            for r in (first, second)
        )
    status = _cli(wh, "status").output
    assert (
        f"run {second} (popularity, trained on every interaction): 3 users, 30 rows, scored at {second_at}"
        in status
    )
    assert (
        f"run {first} (popularity, trained on every interaction): {n_users - 3} users, {10 * (n_users - 3)} rows, "
        f"scored at {first_at}" in status
    )
    assert status.index(f"run {second} (") < status.index(f"run {first} (")  # newest first
    one, ten = _cli(wh, "recommend", "1").output, _cli(wh, "recommend", "10").output
    assert one.startswith(f"user 1: recommendations from run {second} scored at {second_at}\n")
    assert ten.startswith(f"user 10: recommendations from run {first} scored at {first_at}\n")
    assert "recommendations now hold 2 runs:" in ten and f"{n_users - 3} users" in ten


# -- 6. progress bars on a terminal, key=value lines under cron --------------------------------
KV_LINE = (
    r"ts=\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z level=(debug|info|warning|error) logger=batchrec[\w.]* \S"
)


def _batchrec(wh: Warehouse, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BATCHREC), "--warehouse", str(wh.path), *args], capture_output=True, text=True, timeout=300
    )


def test_without_a_terminal_log_lines_are_key_value_or_json_and_q_v_work_after_the_subcommand(
    prepared, tmp_path
):
    import re

    wh = _copy(prepared, tmp_path / "wh")
    train = _batchrec(wh, "train", "ease", "--device", "cpu")
    assert train.returncode == 0, train.stderr
    score = _batchrec(wh, "score", "--model", "ease", "--device", "cpu")
    assert score.returncode == 0, score.stderr
    for proc in (train, score):  # no bar, no torch warning, nothing but key=value lines
        lines = proc.stderr.splitlines()
        assert lines and all(re.match(KV_LINE, line) for line in lines), proc.stderr
        assert "Sparse CSR" not in proc.stderr and "\r" not in proc.stderr
    assert any(
        'logger=batchrec.score msg="published 6100 rows in ' in line for line in score.stderr.splitlines()
    )
    as_json = _batchrec(wh, "score", "--model", "ease", "--device", "cpu", "--log-format", "json")
    records = [json.loads(line) for line in as_json.stderr.splitlines()]
    assert records and {"ts", "level", "logger", "msg"} <= set(records[0])
    quiet = _batchrec(wh, "score", "--model", "ease", "--device", "cpu", "-q")
    assert quiet.returncode == 0 and quiet.stderr == "" and quiet.stdout.startswith("run ease-")
    verbose = _batchrec(wh, "-q", "score", "--model", "ease", "--device", "cpu", "-v")  # -q, then -v after it
    assert verbose.returncode == 0 and "level=info logger=batchrec.score" in verbose.stderr


# -- 7. help -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "command, listed",
    [
        ("train", ["popularity", "ease", "multvae"]),
        ("score", ["popularity", "ease", "two_tower"]),
        ("evaluate", ["popularity", "ease", "user_temporal", "leave-last-5-positive-events"]),
        (
            "features",
            ["random", "user_random", "user_temporal", "global_temporal", "leave_last_n_positive", "as_of"],
        ),
        ("run", ["[[steps]]", "ingest: path", "score: model = (unset), top_n = 10", "evaluate: models"]),
        ("export", []),
        ("status", []),
    ],
)
def test_help_lists_what_the_command_takes_and_one_example(command, listed):
    result = CliRunner().invoke(main, [command, "--help"])
    assert result.exit_code == 0, result.output
    details, _, example = result.output.partition("\nExample:\n")
    assert example.strip().startswith(f"batchrec {command}")
    assert all(word in details.split("Details:")[-1] for word in listed)


def _on_a_terminal(wh: Warehouse, *args: str) -> str:
    """Run batchrec with stderr on a pseudo-terminal (120 columns); what the terminal received."""
    import fcntl
    import pty
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    proc = subprocess.Popen(
        [str(BATCHREC), "--warehouse", str(wh.path), *args], stdout=subprocess.DEVNULL, stderr=slave
    )
    os.close(slave)
    received = bytearray()
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # the child closed its end
            break
        if not chunk:
            break
        received += chunk
    assert proc.wait(timeout=300) == 0, received.decode(errors="replace")[-2000:]
    os.close(master)
    return received.decode(errors="replace")


def test_on_a_terminal_bars_show_and_log_lines_stay_whole(prepared, tmp_path):
    import re

    wh = _copy(prepared, tmp_path / "wh")
    shown = _on_a_terminal(
        wh,
        "train",
        "mf",
        "--protocol",
        "user_temporal",
        "--device",
        "cpu",
        "--param",
        "epochs=3",
        "--param",
        "factors=8",
    )
    pieces = [p.strip() for p in re.split(r"[\r\n]", shown) if p.strip()]
    epochs = [p for p in pieces if " INFO epoch=" in p]
    assert len(epochs) == 3  # each epoch's log line whole, on its own line, between redraws of the bar
    assert all(
        re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO epoch=\d .* seconds=[\d.e-]+", p)
        for p in epochs
    )
    assert any(re.match(r"mf:\s+\d+%\|", p) for p in pieces)  # the epoch bar
    run = fit_run(wh, "popularity", device="cpu")
    shown = _on_a_terminal(wh, "score", "--run", run, "--device", "cpu")
    assert re.search(r"scoring:\s+\d+%\|.*users", shown)  # the scoring blocks' bar
