"""The bad-night drill (issue #25): real `batchrec run` processes on ml-latest-small, night by night.

Night 1 loads ml-latest-small up to a cut-off and publishes; night 2 brings the release's
ratings after the cut-off (a small genuine batch) and passes the gate with its figures in
`publish_log`; night 3 brings a corrupted but valid-looking batch (every user's latest ratings
re-sent with shuffled movie ids, as a broken upstream join would) and the gate keeps night 2's
lists: exit code 3, one error line saying which check failed and by how much, the
`recommendations` table byte-identical, `batchrec status` saying why. `--force` then publishes
and says so. About a minute on 2 busy cores (five EASE fits); in the fast suite, as CI must run it.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import duckdb
import numpy as np
import polars as pl
import pytest
from warehouse_checks import table_checksums

ROOT = Path(__file__).resolve().parent.parent
ML_SMALL = ROOT / "batchrec" / "datasets" / "ml-latest-small"
BATCHREC = Path(sys.executable).parent / "batchrec"  # the installed console script: a real, separate process

GENUINE_SHARE = 0.01  # night 2: the release's last 1% of ratings (by time)
CORRUPT_SHARE = 0.3  # night 3: per user, this share of their ratings count re-sent with shuffled movie ids
JOB = """\
[job]
name = "nightly"

[[steps]]
step = "ingest"
path = "{landing}"

[[steps]]
step = "features"
protocols = "user_temporal"

[[steps]]
step = "train"
model = "ease"

[[steps]]
step = "evaluate"
models = "ease,popularity"
protocol = "user_temporal"
k = "10"
report = "{reports}"

[[steps]]
step = "score"
model = "ease"
top_n = 10
"""


def _landing(folder: Path, ratings: pl.DataFrame, catalogue: bool) -> Path:
    """A landing folder in the ml-latest-small layout: ratings.csv (+ movies, tags, links)."""
    folder.mkdir(parents=True)
    ratings.write_csv(folder / "ratings.csv")
    if catalogue:
        for name in ("movies.csv", "tags.csv", "links.csv"):
            shutil.copy(ML_SMALL / name, folder / name)
    return folder


def _corrupt_batch(ratings: pl.DataFrame, movies: pl.DataFrame, seed: int = 0) -> pl.DataFrame:
    """Each user's latest CORRUPT_SHARE x (their ratings count) ratings again, one day after the
    release ends, with their movie ids replaced by random catalogue ids: every row is valid
    (known ids, half-star ratings, past timestamps), the batch as a whole is garbage."""
    rng = np.random.default_rng(seed)
    latest = (
        ratings.sort("userId", "timestamp", "movieId", descending=[False, True, False])
        .with_columns(pos=pl.int_range(pl.len()).over("userId"), n=pl.len().over("userId"))
        .filter(pl.col("pos") < (pl.col("n") * CORRUPT_SHARE).ceil())
    )
    start = int(ratings["timestamp"].max()) + 86_400
    return latest.select(
        "userId",
        movieId=pl.Series(rng.choice(movies["movieId"].to_numpy(), latest.height)),
        rating="rating",
        timestamp=pl.Series(start + np.arange(latest.height, dtype=np.int64)),
    )


def _run(db: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BATCHREC), "-qqq", "--warehouse", str(db), *args],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


def _night(db: Path, job: Path, landing: Path, reports: Path, *extra: str) -> subprocess.CompletedProcess:
    job.write_text(JOB.format(landing=landing, reports=reports))
    return _run(db, "run", str(job), *extra)


def _rows(db: Path, sql: str) -> list[tuple]:
    con = duckdb.connect(str(db), read_only=True)
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


LOG = (
    "SELECT status, run_id, users, rows, items, coverage, new_item_share, overlap, overlap_users, top_n, "
    "live_run_id, gate_metric, candidate_value, live_value, tolerance, reason, seconds FROM publish_log "
    "ORDER BY logged_at"
)


def _log(db: Path) -> list[dict]:
    con = duckdb.connect(str(db), read_only=True)
    try:
        return con.sql(LOG).pl().to_dicts()
    finally:
        con.close()


def test_the_bad_night_drill(tmp_path):
    ratings = pl.read_csv(ML_SMALL / "ratings.csv")
    movies = pl.read_csv(ML_SMALL / "movies.csv")
    cut = int(ratings["timestamp"].quantile(1 - GENUINE_SHARE))
    db, job, reports = tmp_path / "wh" / "batchrec.duckdb", tmp_path / "job.toml", tmp_path / "reports"

    # Night 1: the release up to the cut-off. Nothing is live: the gate passes with a note.
    before = ratings.filter(pl.col("timestamp") < cut)
    night1 = _night(db, job, _landing(tmp_path / "night1", before, True), reports)
    assert night1.returncode == 0, night1.stderr
    [first] = _log(db)
    assert (
        first["status"] == "published"
        and first["reason"] == "nothing live to compare with (first publish): passed"
    )
    # every user with a rating (603 before the cut-off) or a tag has a list of 10
    users1 = _rows(db, "SELECT count(DISTINCT user_id) FROM recommendations")[0][0]
    assert (
        users1 >= before["userId"].n_unique()
        and _rows(db, "SELECT count(*) FROM recommendations")[0][0] == 10 * users1
    )
    assert first["users"] == users1 and first["rows"] == 10 * users1 and first["top_n"] == 10
    assert first["overlap"] is None and first["overlap_users"] == 0 and first["live_run_id"] is None
    assert first["new_item_share"] == 1.0  # nothing was ever recommended before
    assert first["candidate_value"] > 0.05  # EASE's NDCG@10 on user_temporal (0.089 on the whole release)

    # Night 2: the genuine last 1% of the release. It passes; its figures compare with night 1.
    night2 = _night(
        db, job, _landing(tmp_path / "night2", ratings.filter(pl.col("timestamp") >= cut), False), reports
    )
    assert night2.returncode == 0, night2.stderr
    assert "gate passed: ndcg@10" in night2.stdout
    second = _log(db)[1]
    assert second["status"] == "published" and second["live_run_id"] == first["run_id"]
    assert second["live_value"] == first["candidate_value"]
    assert second["candidate_value"] >= first["candidate_value"] * (1 - second["tolerance"])
    assert (
        second["users"] == 610 and second["overlap_users"] == users1 and 0.5 < second["overlap"] <= 1.0
    )  # a small batch moves few lists
    assert 0.0 <= second["new_item_share"] < 0.5
    live_items = _rows(db, "SELECT count(DISTINCT item_id) FROM recommendations")[0][0]
    assert second["items"] == live_items and second["coverage"] == pytest.approx(live_items / 9742)
    published = table_checksums(db)["recommendations"]
    night2_run = second["run_id"]

    # Night 3: the corrupted batch. The gate refuses; yesterday's lists stay, byte for byte.
    night3 = _night(db, job, _landing(tmp_path / "night3", _corrupt_batch(ratings, movies), False), reports)
    assert night3.returncode == 3, (night3.returncode, night3.stderr)  # what cron sees
    [line] = night3.stderr.strip().splitlines()
    assert re.fullmatch(
        r"error: job nightly failed at step 5:score: gated: run ease-\S+ \(ease\) was not published: "
        r"ndcg@10 0\.\d{4} is \d+\.\d% below the live run's 0\.\d{4} \(tolerance 5%\); the previous "
        r"lists stay \(publish anyway with --force\)",
        line,
    ), line
    assert table_checksums(db)["recommendations"] == published
    gated = _log(db)[2]
    assert gated["status"] == "gated" and gated["live_run_id"] == night2_run and gated["run_id"] != night2_run
    assert gated["live_value"] == second["candidate_value"]
    assert gated["candidate_value"] < 0.5 * second["candidate_value"]  # the measurement collapsed
    drop = 1 - gated["candidate_value"] / gated["live_value"]
    assert f"is {drop:.1%} below" in gated["reason"] and f"is {drop:.1%} below" in line
    assert _rows(db, "SELECT status FROM job_runs WHERE step = '5:score' ORDER BY started DESC LIMIT 1") == [
        ("gated",)
    ]

    # night 3's evaluate step (before its score step) wrote a report whose Nights section has nights 1 and 2
    report = max(reports.glob("*/index.html"))  # folders are named by UTC time
    html = report.read_text()
    assert "<h2 id='nights'>Nights</h2>" in html and (report.parent / "nights.png").stat().st_size > 10_000
    assert first["run_id"] in html and night2_run in html and gated["run_id"] not in html

    status = _run(db, "status")
    assert status.returncode == 0, status.stderr
    nights = [
        ln
        for ln in status.stdout.splitlines()
        if re.match(r"  \d{4}-\d\d-\d\d \d\d:\d\d (published|gated)", ln)
    ]
    assert (
        len(nights) == 3 and " gated " in nights[-1] and f"is {drop:.1%} below the live run's" in nights[-1]
    )
    print("\n`batchrec status` after a good night and a gated one:\n" + status.stdout)

    # --force: the same night published anyway, and the log says so.
    forced = _run(db, "run", str(job), "--force")
    assert forced.returncode == 0, forced.stderr
    assert "gate FORCED: forced past the gate: ndcg@10" in forced.stdout
    last = _log(db)[3]
    assert last["status"] == "forced" and last["run_id"] == gated["run_id"]
    assert _rows(db, "SELECT DISTINCT run_id FROM recommendations") == [(gated["run_id"],)]
    for row in _log(db):
        print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()})


# -- the gate's other checks, on one warehouse where EASE is live ------------------------------
@pytest.fixture(scope="module")
def ease_live(tmp_path_factory) -> Path:
    """ml-latest-small with EASE published through the gate and EASE and popularity measured."""
    from batchrec.evaluate import run_evaluation
    from batchrec.features import build_snapshot
    from batchrec.ingest import ingest_path
    from batchrec.scoring import score_command
    from batchrec.train import fit_run
    from batchrec.warehouse import Warehouse

    wh = Warehouse(tmp_path_factory.mktemp("ease_live") / "batchrec.duckdb")
    ingest_path(wh, dataset="ml-latest-small")
    build_snapshot(wh, protocols="user_temporal")
    fit_run(wh, "ease", "latest", None, {}, "cpu")
    fit_run(wh, "popularity", "latest", None, {}, "cpu")
    run_evaluation(wh, models="ease,popularity", protocol="user_temporal", ks="10", report_dir=None)
    score_command(wh, model="ease")
    return wh.path


def _copy(db: Path, folder: Path) -> Path:
    folder.mkdir()
    shutil.copy(db, folder / db.name)
    shutil.copytree(db.with_name(f"{db.stem}.artifacts"), folder / f"{db.stem}.artifacts")
    return folder / db.name


def test_a_switch_to_a_worse_family_is_gated_with_every_failed_check(ease_live, tmp_path):
    """Popularity after EASE: its NDCG@10 is about half EASE's and its lists (one global ranking)
    cover a small part of what EASE's lists cover; both checks fail, with their numbers."""
    db = _copy(ease_live, tmp_path / "wh")
    before = table_checksums(db)
    result = _run(db, "score", "--model", "popularity")
    assert result.returncode == 3, result.stderr
    [line] = result.stderr.strip().splitlines()
    assert re.fullmatch(
        r"error: gated: run popularity-\S+ \(popularity\) was not published: coverage collapsed: "
        r"\d+ distinct items against \d+ in the live lists \(under 50%\); ndcg@10 0\.\d{4} is "
        r"\d+\.\d% below the live run's 0\.\d{4} \(tolerance 5%\); the previous lists stay "
        r"\(publish anyway with --force\)",
        line,
    ), line
    after = table_checksums(db)
    assert after.pop("publish_log") != before.pop("publish_log")  # the refusal is recorded ...
    assert after == before  # ... and nothing else changed
    [(status, reason)] = _rows(db, "SELECT status, reason FROM publish_log WHERE model = 'popularity'")
    assert status == "gated" and reason in line

    # A wide tolerance lets the metric through; the collapsed coverage still stops it.
    wide = _run(db, "score", "--model", "popularity", "--gate-tolerance", "0.9")
    assert wide.returncode == 3 and "coverage collapsed" in wide.stderr and "ndcg@10" not in wide.stderr


def test_an_unmeasured_candidate_is_gated_and_force_publishes_it(ease_live, tmp_path):
    """A run on a new snapshot that nobody measured cannot be compared with the measured live run:
    refused with the command that measures it; --force publishes it and publish_log says so."""
    db = _copy(ease_live, tmp_path / "wh")
    for step in (("features", "--protocols", "user_temporal"), ("train", "ease")):
        assert _run(db, *step).returncode == 0
    result = _run(db, "score", "--model", "ease")
    assert result.returncode == 3
    assert (
        "the candidate is not measured: no ndcg@10 of ease on user_temporal for snapshot s" in result.stderr
    )
    assert "`batchrec evaluate --models ease --protocol user_temporal` first" in result.stderr
    forced = _run(db, "score", "--model", "ease", "--force")
    assert forced.returncode == 0, forced.stderr
    assert "gate FORCED: forced past the gate: the candidate is not measured" in forced.stdout
    assert _rows(db, "SELECT status FROM publish_log ORDER BY logged_at") == [
        ("published",),
        ("gated",),
        ("forced",),
    ]


def test_gate_options_are_checked(ease_live, tmp_path):
    db = _copy(ease_live, tmp_path / "wh")
    bad_metric = _run(db, "score", "--model", "ease", "--gate-metric", "users")
    assert bad_metric.returncode == 1
    assert bad_metric.stderr.startswith("error: --gate-metric: 'users' is not a metric the gate can compare")
    negative = _run(db, "score", "--model", "ease", "--gate-tolerance", "-0.1")
    assert negative.returncode == 2 and "'-0.1' is below the minimum 0.0" in negative.stderr
    job = tmp_path / "job.toml"
    job.write_text('[[steps]]\nstep = "score"\nmodel = "ease"\ngate_tolerance = "5%"\n')
    bad_job = _run(db, "run", str(job))
    assert bad_job.returncode == 1
    assert bad_job.stderr.strip() == (
        f"error: {job}:4: step 1 (score): gate_tolerance = '5%' is not valid (expected a valid number)"
    )


def test_a_rating_metric_is_worse_when_higher():
    """RMSE (lower is better): a candidate 10% above the live run's RMSE fails a 5% tolerance."""
    from batchrec.gate import Gate, GateSettings

    gate = Gate(GateSettings(), {"run_id": "mf-x", "model": "mf", "snapshot_id": "s"}, task="rating")
    figures = {"nonfinite": 0, "live_items": 0, "items": 10, "rows": 10}
    failures, _ = gate._checks(figures, candidate=0.99, live=0.90)
    assert gate.metric == "rmse" and failures == [
        "rmse 0.9900 is 10.0% above the live run's 0.9000 (tolerance 5%)"
    ]
    failures, notes = gate._checks(figures, candidate=0.92, live=0.90)
    assert failures == [] and notes == ["rmse 0.9200 against the live run's 0.9000 (+2.2%)"]
