"""The shipped path as cron runs it: `batchrec run jobs/nightly.toml` as a real process on a fresh
warehouse, what it publishes, and the exit codes cron sees (0 done, 1 a step failed, 75 busy).

Every expectation comes from the job file itself (read here with tomllib) and from the tables the
job wrote: which model ships, N, the evaluated families, protocol and cut-offs.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import duckdb
import pytest
from faults import BATCHREC, ROOT
from warehouse_checks import table_checksums

JOB = ROOT / "jobs" / "nightly.toml"


def _step(kind: str) -> dict:
    """The job file's options of its one step of `kind`."""
    steps = [s for s in tomllib.loads(JOB.read_text())["steps"] if s["step"] == kind]
    assert len(steps) == 1, f"{JOB} has {len(steps)} {kind} steps"
    return steps[0]


def _batchrec(cwd: Path, env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BATCHREC), "-q", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


@pytest.fixture(scope="module")
def nightly(tmp_path_factory):
    """One nightly run on a fresh warehouse, from a working directory of its own (the job's
    relative paths, such as its report folder, land there); removed afterwards (the EASE
    artifacts are 380 MB each)."""
    cwd = tmp_path_factory.mktemp("nightly")
    db = cwd / "warehouse" / "batchrec.duckdb"
    env = {**os.environ, "BATCHREC_WAREHOUSE": str(db)}
    result = _batchrec(cwd, env, "run", str(JOB))
    yield {"cwd": cwd, "db": db, "env": env, "result": result}
    shutil.rmtree(cwd, ignore_errors=True)


def _published(db: Path) -> dict[str, str]:
    """Checksums of every table but the job's own log (a failed step records itself there)."""
    return {t: c for t, c in table_checksums(db).items() if t != "job_runs"}


def test_the_nightly_job_publishes_every_users_top_n_from_the_run_fitted_on_all_data(nightly):
    result = nightly["result"]
    assert result.returncode == 0, result.stderr
    score, n = _step("score"), _step("score")["top_n"]
    assert _step("train")["model"] == score["model"]  # the job trains what it ships
    con = duckdb.connect(str(nightly["db"]), read_only=True)
    try:
        ((snapshot,),) = con.sql("SELECT snapshot_id FROM feature_snapshots").fetchall()
        shipped = con.execute(
            "SELECT run_id, snapshot_id FROM model_runs WHERE model = ? AND protocol IS NULL",
            [score["model"]],
        ).fetchall()
        assert len(shipped) == 1 and shipped[0][1] == snapshot
        shipped_run = shipped[0][0]
        per_user = con.sql("""
            SELECT user_id, count(*) AS n, count(DISTINCT item_id) AS items, min(rank) AS lo, max(rank) AS hi,
                   min(run_id) AS first_run, max(run_id) AS last_run
            FROM recommendations GROUP BY user_id""").pl()
        raters = {u for (u,) in con.sql("SELECT DISTINCT user_id FROM ratings").fetchall()}
        snapshot_users = {
            u
            for (u,) in con.execute(
                "SELECT user_id FROM user_index WHERE snapshot_id = ?", [snapshot]
            ).fetchall()
        }
        seen = con.sql("""SELECT count(*) FROM recommendations r
                          JOIN ratings x ON x.user_id = r.user_id AND x.item_id = r.item_id""").fetchall()[0][
            0
        ]
        unknown = con.execute(
            """SELECT count(*) FROM recommendations
                                 WHERE item_id NOT IN (SELECT item_id FROM item_index WHERE snapshot_id = ?)""",
            [snapshot],
        ).fetchall()[0][0]
    finally:
        con.close()
    assert len(raters) == 610 and snapshot_users == raters == set(per_user["user_id"].to_list())
    assert (per_user["n"] == n).all() and (per_user["items"] == n).all()
    assert (per_user["lo"] == 1).all() and (per_user["hi"] == n).all()
    assert set(per_user["first_run"]) == set(per_user["last_run"]) == {shipped_run}
    assert seen == 0 and unknown == 0


def test_the_nightly_job_measures_its_families_on_the_protocol(nightly):
    assert nightly["result"].returncode == 0, nightly["result"].stderr
    evaluate = _step("evaluate")
    families = set(evaluate["models"].split(","))
    ks = {int(k) for k in evaluate["k"].split(",")}
    con = duckdb.connect(str(nightly["db"]), read_only=True)
    try:
        ((snapshot,),) = con.sql("SELECT snapshot_id FROM feature_snapshots").fetchall()
        rows = con.sql("""SELECT e.protocol, e.metric, e.k, e.value, r.model, r.protocol AS fitted_on, r.snapshot_id
                          FROM evaluations e JOIN model_runs r USING (run_id)""").pl()
        orphans = con.sql(
            "SELECT count(*) FROM evaluations WHERE run_id NOT IN (SELECT run_id FROM model_runs)"
        ).fetchall()[0][0]
        # the users the protocol ranks for: a test rating >= 4 on an item of the train part
        users = con.execute(
            """
            SELECT count(DISTINCT user_idx) FROM split_holdout h
            WHERE h.snapshot_id = $s AND h.protocol = $p AND h.part = 'test' AND h.rating >= 4
              AND h.item_idx IN (SELECT x.item_idx FROM interactions x
                                 ANTI JOIN (SELECT user_idx, item_idx FROM split_holdout
                                            WHERE snapshot_id = $s AND protocol = $p) USING (user_idx, item_idx)
                                 WHERE x.snapshot_id = $s)""",
            {"s": snapshot, "p": evaluate["protocol"]},
        ).fetchall()[0][0]
    finally:
        con.close()
    assert orphans == 0 and set(rows["model"]) == families
    assert set(rows["protocol"]) == set(rows["fitted_on"]) == {evaluate["protocol"]}  # no leakage
    assert set(rows["snapshot_id"]) == {snapshot}
    ndcg = {
        (m, k): v
        for m, metric, k, v in rows.select("model", "metric", "k", "value").iter_rows()
        if metric == "ndcg"
    }
    assert set(ndcg) == {(m, k) for m in families for k in ks}
    counted = {
        m: v for m, metric, v in rows.select("model", "metric", "value").iter_rows() if metric == "users"
    }
    assert counted == {m: users for m in families} and users > 500
    if {"ease", "popularity"} <= families:  # the shipped family earns its place over the baseline
        assert all(ndcg[("ease", k)] > ndcg[("popularity", k)] for k in ks)
    reports = list((nightly["cwd"] / evaluate["report"]).glob("*/index.html"))
    assert len(reports) == 1  # the job's relative report path, from the job's working directory


def test_scoring_the_shipped_family_again_ignores_its_newer_protocol_runs(nightly):
    """After the job, the newest run of the shipped family is the one `evaluate` fitted on the
    protocol's train part; `batchrec score --model` must still publish the run fitted on all data."""
    assert nightly["result"].returncode == 0, nightly["result"].stderr
    model, n = _step("score")["model"], _step("score")["top_n"]
    result = _batchrec(nightly["cwd"], nightly["env"], "score", "--model", model, "--top-n", str(n))
    assert result.returncode == 0, result.stderr
    con = duckdb.connect(str(nightly["db"]), read_only=True)
    try:
        newest = con.execute(
            "SELECT protocol FROM model_runs WHERE model = ? ORDER BY created_at DESC LIMIT 1", [model]
        ).fetchall()[0][0]
        published = con.sql(
            "SELECT DISTINCT r.protocol FROM recommendations JOIN model_runs r USING (run_id)"
        ).fetchall()
    finally:
        con.close()
    assert newest is not None and published == [(None,)]


def test_a_failing_step_exits_1_with_one_error_line_and_changes_nothing(nightly, tmp_path):
    assert nightly["result"].returncode == 0, nightly["result"].stderr
    landing = tmp_path / "landing"
    landing.mkdir()
    (landing / "ratings.csv").write_text(
        "userId,movieId,rating,timestamp\n1,1,4.0,964982703\n1,abc,4.0,964981247\n"
    )
    text = JOB.read_text()
    assert 'dataset = "ml-latest-small"' in text
    job = tmp_path / "nightly.toml"  # the nightly job with its ingest pointed at a landing folder
    job.write_text(text.replace('dataset = "ml-latest-small"', f'path = "{landing}"'))
    before = _published(nightly["db"])
    result = _batchrec(nightly["cwd"], nightly["env"], "run", str(job))
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "ratings.csv:3" in errors[0] and "Traceback" not in result.stderr
    assert _published(nightly["db"]) == before


def test_a_second_writer_exits_75_and_changes_nothing(nightly):
    assert nightly["result"].returncode == 0, nightly["result"].stderr
    before = table_checksums(nightly["db"])
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            (  # another process holds the writer lock
                "import sys, time; from batchrec.warehouse import Warehouse\n"
                "with Warehouse(sys.argv[1]).lock('train'):\n    print('held', flush=True); time.sleep(120)"
            ),
            str(nightly["db"]),
        ],
        stdout=subprocess.PIPE,
        env=nightly["env"],
    )
    try:
        assert holder.stdout.readline() == b"held\n"
        result = _batchrec(nightly["cwd"], nightly["env"], "run", str(JOB))
    finally:
        holder.kill()
        holder.wait()
    assert result.returncode == 75, result.stderr
    assert "warehouse is busy" in result.stderr and "Traceback" not in result.stderr
    assert table_checksums(nightly["db"]) == before
