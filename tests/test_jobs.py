"""The nightly job end to end on ml-latest-small, resume, failure injection, and the ops commands."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import pytest
from click.testing import CliRunner

import batchrec.evaluate
import batchrec.features.snapshots
import batchrec.ingest.run
import batchrec.score
import batchrec.warehouse
from batchrec.cli import main
from batchrec.errors import BatchrecError
from batchrec.jobs import load_job, run_job
from batchrec.models.base import Recommender
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
    assert [s["kind"] for s in steps] == ["ingest", "features", "train", "evaluate", "score"]  # measure, then publish
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


# Published tables that a failure at each step (or later) must leave as they were: the steps
# before it did their own atomic work.
UNTOUCHED = {"ingest": PUBLISHED, "features": PUBLISHED[3:], "train": PUBLISHED[4:], "evaluate": PUBLISHED[5:],
             "score": PUBLISHED[6:]}


def _second_run(tmp_path, job) -> tuple[Warehouse, dict]:
    """A warehouse after one full job run, the job pointed at a new ratings file (so every step
    has work to do again), and the contents of its published tables."""
    wh = Warehouse(tmp_path / "w.duckdb")
    run_job(wh, job)
    (tmp_path / "landing").mkdir()
    (tmp_path / "landing" / "ratings.csv").write_text("userId,movieId,rating,timestamp\n1,2,4.5,1600000000\n")
    job.write_text(job.read_text().replace('dataset = "ml-latest-small"', f'path = "{tmp_path / "landing"}"'))
    return wh, _contents(wh)


@pytest.mark.parametrize("step", ["ingest", "features", "train", "evaluate", "score"])
def test_failure_in_any_step_leaves_published_tables_unchanged(tmp_path, job, step):
    wh, before = _second_run(tmp_path, job)
    with pytest.raises(BatchrecError, match=f"failed at step .*{step}"):
        run_job(wh, job, fail_step=step)
    after = _contents(wh)
    for table in UNTOUCHED[step]:
        assert after[table] == before[table], table
    with wh.connect(read_only=True) as con:
        failed = con.sql("SELECT step, error FROM job_runs WHERE status = 'failed'").fetchall()
    assert len(failed) == 1 and failed[0][0].endswith(step) and "injected failure" in failed[0][1]


def _fail_at_commit(monkeypatch, module) -> None:
    """The step does all its work, then its final transaction fails just before COMMIT."""
    real = batchrec.warehouse.transaction

    @contextmanager
    def failing(con, what="a change"):
        with real(con, what):
            yield con
            raise OSError("injected: disk full at commit")

    monkeypatch.setattr(module, "transaction", failing)


def _fail_while_saving(monkeypatch) -> None:
    def save(self, path):
        Path(path).mkdir(parents=True, exist_ok=True)
        (Path(path) / "half-written").write_text("x")
        raise OSError("injected: disk full while saving the artifact")

    monkeypatch.setattr(Recommender, "save", save)


MID_STEP = {"ingest": lambda mp: _fail_at_commit(mp, batchrec.ingest.run),
            "features": lambda mp: _fail_at_commit(mp, batchrec.features.snapshots),
            "train": _fail_while_saving,
            "score": lambda mp: _fail_at_commit(mp, batchrec.score),
            "evaluate": lambda mp: _fail_at_commit(mp, batchrec.evaluate)}


@pytest.mark.parametrize("step", list(MID_STEP))
def test_failure_inside_a_step_after_its_work_leaves_published_tables_unchanged(tmp_path, job, step, monkeypatch):
    wh, before = _second_run(tmp_path, job)
    artifacts = sorted(p.name for p in wh.artifacts_dir.iterdir())
    MID_STEP[step](monkeypatch)
    with pytest.raises(OSError, match="injected"):
        run_job(wh, job)
    after = _contents(wh)
    for table in UNTOUCHED[step]:
        assert after[table] == before[table], table
    if step == "train":  # the half-written artifact is gone too
        assert sorted(p.name for p in wh.artifacts_dir.iterdir()) == artifacts
    monkeypatch.undo()
    run_job(wh, job)  # and the rerun resumes at the failed step
    with wh.connect(read_only=True) as con:
        statuses = dict(con.sql("SELECT step, status FROM job_runs ORDER BY started").fetchall())
    assert all(v in ("ok", "skipped") for v in statuses.values())


def test_ops_commands_on_a_scored_warehouse(tmp_path, job):
    wh_path = tmp_path / "w.duckdb"
    run_job(Warehouse(wh_path), job)
    runner = CliRunner()
    res = runner.invoke(main, ["--warehouse", str(wh_path), "recommend", "1"])
    assert res.exit_code == 0, res.output
    assert "recommendations from run popularity-" in res.output and "recent history" in res.output
    res = runner.invoke(main, ["--warehouse", str(wh_path), "status"])
    assert res.exit_code == 0, res.output
    for needle in ("recommendations", "latest snapshot: s", "recent model runs", "live recommendations, per run",
                   "last evaluation", "recent job failures"):
        assert needle in res.output
    res = runner.invoke(main, ["--warehouse", str(wh_path), "sql", "--format", "csv",
                               "SELECT user_id, count(*) AS n FROM recommendations GROUP BY 1 ORDER BY 1 LIMIT 2"])
    assert res.exit_code == 0 and res.output.splitlines() == ["user_id,n", "1,5", "2,5"]
    res = runner.invoke(main, ["--warehouse", str(wh_path), "sql", "SELEC nonsense"])
    assert res.exit_code != 0 and res.output.startswith("error: query failed")
    res = runner.invoke(main, ["--warehouse", str(wh_path), "recommend", "987654321"])
    assert res.exit_code != 0 and "no recommendations and no ratings" in res.output
