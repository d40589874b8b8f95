"""A small job end to end on ml-latest-small, resume, kill -9 inside each step (a real process), and the
ops commands. The shipped jobs/nightly.toml itself runs in test_nightly.py."""

from __future__ import annotations

import shutil
import signal
from pathlib import Path

import pytest
from click.testing import CliRunner
from faults import fault_env, start_batchrec, wait_until_paused

from batchrec.cli import main
from batchrec.errors import BatchrecError
from batchrec.jobs import load_job, run_job
from batchrec.warehouse import Warehouse

ROOT = Path(__file__).resolve().parent.parent
PUBLISHED = ("ratings", "items", "tags", "feature_snapshots", "model_runs", "evaluations", "recommendations")

SMALL_JOB = """
[job]
name = "t"

[[steps]]
step = "ingest"
dataset = "ml-latest-small"

[[steps]]
step = "features"
protocols = "user_temporal"

[[steps]]
step = "train"
model = "popularity"

[[steps]]
step = "evaluate"
models = "popularity"
protocol = "user_temporal"
k = "10"
report = "{report}"

[[steps]]
step = "score"
model = "popularity"
top_n = 5
"""


def _contents(wh: Warehouse) -> dict[str, list]:
    with wh.connect(read_only=True) as con:
        return {t: sorted(map(repr, con.sql(f"SELECT * FROM {t}").fetchall())) for t in PUBLISHED}


@pytest.fixture()
def job(tmp_path) -> Path:
    path = tmp_path / "t.toml"
    path.write_text(SMALL_JOB.format(report=tmp_path / "reports"))
    return path


def test_nightly_job_file_is_valid():
    name, steps = load_job(ROOT / "jobs" / "nightly.toml")
    assert name == "nightly"
    assert [s["kind"] for s in steps] == [
        "ingest",
        "features",
        "train",
        "evaluate",
        "score",
    ]  # measure, then publish
    assert [s["gate_metric"] for s in steps if s["kind"] == "score"] == ["ndcg@10"]


def test_bad_job_files_fail_with_one_line(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[[steps]]\nstep = "teleport"\n')
    with pytest.raises(BatchrecError, match=r"bad.toml:2: step 1 has step = 'teleport'"):
        load_job(bad)
    bad.write_text('[[steps]]\nstep = "train"\nmodel = "mf"\nepochz = 3\n')
    with pytest.raises(BatchrecError, match="unknown option 'epochz'"):
        load_job(bad)
    bad.write_text("steps = [")
    with pytest.raises(BatchrecError, match="not valid TOML"):
        load_job(bad)


def test_job_runs_end_to_end_then_resumes_incrementally(tmp_path, job):
    wh = Warehouse(tmp_path / "w.duckdb")
    out = run_job(wh, job)
    assert "finished: 5 steps" in out
    with wh.connect(read_only=True) as con:
        n_users = con.sql("SELECT count(DISTINCT user_id) FROM ratings").fetchall()[0][0]
        recs = con.sql("SELECT count(DISTINCT user_id), count(*) FROM recommendations").fetchall()[0]
        statuses = con.sql("SELECT status, count(*) FROM job_runs GROUP BY 1").fetchall()
        n_evals = con.sql("SELECT count(*) FROM evaluations").fetchall()[0][0]
    assert recs == (n_users, 5 * n_users)
    assert dict(statuses) == {"ok": 5}
    assert n_evals > 0
    before = _contents(wh)

    # Second night, no new data: every step sees unchanged inputs and is skipped.
    out = run_job(wh, job)
    assert out.count("skipped") == 5
    assert _contents(wh) == before

    # New data lands: a new rating for an existing user -> ingest, features, ... run again.
    landing = tmp_path / "landing"
    landing.mkdir()
    (landing / "ratings.csv").write_text("userId,movieId,rating,timestamp\n1,2,4.5,1600000000\n")
    job.write_text(job.read_text().replace('dataset = "ml-latest-small"', f'path = "{landing}"'))
    out = run_job(wh, job)
    assert "skipped" not in out
    with wh.connect(read_only=True) as con:
        assert con.sql("SELECT count(*) FROM feature_snapshots").fetchall()[0][0] == 2


# Published tables that a kill inside each step must leave as they were: the steps
# before it did their own atomic work.
UNTOUCHED = {
    "ingest": PUBLISHED,
    "features": PUBLISHED[3:],
    "train": PUBLISHED[4:],
    "evaluate": PUBLISHED[5:],
    "score": PUBLISHED[6:],
}

# Where each step's `batchrec run` process is paused, then killed with SIGKILL: inside the step's
# publishing transaction with all its work done (before COMMIT); for train, after the artifact is
# written and before its row and name exist.
KILL_POINT = {
    "ingest": "import batchrec.ingest.run as m\nm.transaction = pause_in(m.transaction)",
    "features": "import batchrec.features.snapshots as m\nm.transaction = pause_in(m.transaction)",
    "train": "import batchrec.models.base as m\nm.Recommender.save = pause_after(m.Recommender.save)",
    "score": "import batchrec.scoring.publishing as m\nm.transaction = pause_in(m.transaction)",
    "evaluate": "import batchrec.evaluate as m\nm.transaction = pause_in(m.transaction)",
}


@pytest.fixture(scope="module")
def first_night(tmp_path_factory) -> Path:
    """The warehouse folder after one run of the small job."""
    root = tmp_path_factory.mktemp("first-night")
    job = root / "t.toml"
    job.write_text(SMALL_JOB.format(report=root / "reports"))
    run_job(Warehouse(root / "wh" / "w.duckdb"), job)
    return root / "wh"


def _second_night(first_night: Path, tmp_path: Path, job: Path) -> Warehouse:
    """A copy of the first night's warehouse, and the job pointed at a new ratings file, so that
    every step has work to do again."""
    shutil.copytree(first_night, tmp_path / "wh")
    (tmp_path / "landing").mkdir()
    (tmp_path / "landing" / "ratings.csv").write_text("userId,movieId,rating,timestamp\n1,2,4.5,1600000000\n")
    job.write_text(job.read_text().replace('dataset = "ml-latest-small"', f'path = "{tmp_path / "landing"}"'))
    return Warehouse(tmp_path / "wh" / "w.duckdb")


@pytest.mark.parametrize("step", list(KILL_POINT))
def test_kill_9_inside_a_step_leaves_published_tables_unchanged_and_the_rerun_resumes(
    first_night, tmp_path, job, step
):
    wh = _second_night(first_night, tmp_path, job)
    before = _contents(wh)
    fault = tmp_path / "fault"
    proc = start_batchrec(
        ["--warehouse", str(wh.path), "run", str(job)], env=fault_env(fault, KILL_POINT[step])
    )
    try:
        wait_until_paused(proc, fault)
    finally:
        proc.kill()  # SIGKILL: no handler, no rollback, no clean-up of its own
        proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    after = _contents(wh)
    for table in UNTOUCHED[step]:
        assert after[table] == before[table], table
    partial = [p.name for p in wh.artifacts_dir.iterdir() if p.name.startswith(".")]
    assert len(partial) == (step == "train")  # the killed fit left its unnamed artifact behind
    run_job(wh, job)  # the next run cleans up and resumes at the killed step
    with wh.connect(read_only=True) as con:
        statuses = dict(con.sql("SELECT step, status FROM job_runs ORDER BY started").fetchall())
        snapshots = con.sql("SELECT count(*) FROM feature_snapshots").fetchall()[0][0]
    assert all(v in ("ok", "skipped") for v in statuses.values()) and snapshots == 2
    assert not [p.name for p in wh.artifacts_dir.iterdir() if p.name.startswith(".")]
    assert _contents(wh)["recommendations"] != before["recommendations"]


def test_ops_commands_on_a_scored_warehouse(tmp_path, job):
    wh_path = tmp_path / "w.duckdb"
    run_job(Warehouse(wh_path), job)
    runner = CliRunner()
    res = runner.invoke(main, ["--warehouse", str(wh_path), "recommend", "1"])
    assert res.exit_code == 0, res.output
    assert "recommendations from run popularity-" in res.output and "recent history" in res.output
    res = runner.invoke(main, ["--warehouse", str(wh_path), "status"])
    assert res.exit_code == 0, res.output
    for needle in (
        "recommendations",
        "latest snapshot: s",
        "recent model runs",
        "live recommendations, per run",
        "last evaluation",
        "recent job failures",
    ):
        assert needle in res.output
    res = runner.invoke(
        main,
        [
            "--warehouse",
            str(wh_path),
            "sql",
            "--format",
            "csv",
            "SELECT user_id, count(*) AS n FROM recommendations GROUP BY 1 ORDER BY 1 LIMIT 2",
        ],
    )
    assert res.exit_code == 0 and res.output.splitlines() == ["user_id,n", "1,5", "2,5"]
    res = runner.invoke(main, ["--warehouse", str(wh_path), "sql", "SELEC nonsense"])
    assert res.exit_code != 0 and res.output.startswith("error: query failed")
    res = runner.invoke(main, ["--warehouse", str(wh_path), "recommend", "987654321"])
    assert res.exit_code != 0 and "no recommendations and no ratings" in res.output
