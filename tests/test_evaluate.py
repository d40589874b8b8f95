"""`batchrec evaluate` on a real ml-latest-small warehouse: rows written, leakage refused, presets,
bad input as one line, and a report whose HTML is valid with every image present."""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from reference import known_test_pairs, popularity_scores, protocol_ndcg, protocol_users

from batchrec.cli import main
from batchrec.data import load_snapshot
from batchrec.errors import BatchrecError
from batchrec.evaluate import PRESETS, evaluate_command, parse_ks, parse_metrics, resolve_protocol
from batchrec.features import build_snapshot
from batchrec.report import Reference, ReportInfo, ReportRun, compare_references, write_report
from batchrec.train import fit_run
from batchrec.warehouse import Warehouse, utcnow

ML_SMALL = Path(__file__).resolve().parent.parent / "batchrec" / "datasets" / "ml-latest-small"


def _warehouse(path: Path, limit: int | None = None, *snapshot_params: str) -> Warehouse:
    """ml-latest-small in the raw tables (as ingest stores them) plus one feature snapshot."""
    wh = Warehouse(path / "wh.duckdb")
    lim = f"LIMIT {limit}" if limit else ""
    with wh.writer("test") as con:
        con.execute(f"""INSERT INTO ratings SELECT userId, movieId, rating, to_timestamp(timestamp)::TIMESTAMP, 0
                        FROM read_csv('{ML_SMALL}/ratings.csv') {lim}""")
        con.execute(f"""INSERT INTO items SELECT movieId, title, NULL,
                          CASE WHEN genres = '(no genres listed)' THEN []::VARCHAR[] ELSE string_split(genres, '|') END,
                          0 FROM read_csv('{ML_SMALL}/movies.csv')""")
    build_snapshot(wh, as_of="2030-01-01", params=snapshot_params)
    return wh


def _split(wh: Warehouse, protocol: str):
    """The newest snapshot's split as the model code reads it."""
    with wh.connect(read_only=True) as con:
        snapshot = con.sql(
            "SELECT snapshot_id FROM feature_snapshots ORDER BY created_at DESC LIMIT 1"
        ).fetchall()[0][0]
        return load_snapshot(con, snapshot, protocol)


@pytest.fixture(scope="module")
def wh(tmp_path_factory) -> Warehouse:
    return _warehouse(tmp_path_factory.mktemp("evaluate"))


def _evaluations(wh: Warehouse, where: str = "TRUE") -> list[dict]:
    with wh.connect(read_only=True) as con:
        return con.sql(f"SELECT * FROM evaluations WHERE {where} ORDER BY run_id, metric, k").pl().to_dicts()


class _Page(HTMLParser):
    """Collects image sources, table ids and the text of header cells per table."""

    def __init__(self):
        super().__init__()
        self.images, self.tables, self.best = [], {}, 0
        self._table, self._cell = None, None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.images.append(a["src"])
        elif tag == "table":
            self._table = a.get("id")
            self.tables[self._table] = []
        elif tag in ("td", "th"):
            self._cell = ""
            self.best += a.get("class") == "best"

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.tables[self._table].append(self._cell.strip())
            self._cell = None


def _check_report(index: Path, runs: list[str]) -> _Page:
    page = _Page()
    page.feed(index.read_text())
    page.close()
    assert page.images, "the report has no figures"
    for src in page.images:
        png = index.parent / src
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", src
    assert all(r in " ".join(page.tables["runs"]) for r in runs)
    md = (index.parent / "report.md").read_text()
    assert all(f"]({src})" in md for src in page.images) and all(r in md for r in runs)
    return page


def test_report_is_valid_html_with_its_images(tmp_path):
    rng = np.random.default_rng(0)
    hist = [{"epoch": e, "loss": 1.0 / e, "valid": 0.9 + 0.01 / e} for e in range(1, 6)]
    runs = [
        ReportRun(
            "mf-1",
            "mf",
            {"factors": 8},
            {
                "rmse": 0.88,
                "ndcg@5": 0.02,
                "ndcg@10": 0.03,
                "coverage@10": 0.2,
                "avg_popularity@10": 12.0,
                "users": 5,
            },
            rng.normal(0, 1, 100),
            hist,
        ),
        ReportRun(
            "pop-1",
            "popularity",
            {},
            {"ndcg@5": 0.04, "ndcg@10": 0.05, "coverage@10": 0.01, "avg_popularity@10": 90.0, "users": 5},
        ),
    ]
    info = ReportInfo(
        "user_temporal",
        "user_temporal",
        "s1",
        "2030-01-01 00:00:00",
        {"test_frac": 0.1},
        {"train": 8, "valid": 1, "test": 1},
        [5, 10],
        4.0,
        utcnow(),
    )
    index = write_report(tmp_path, info, runs, compare=True)
    assert index.parent.parent == tmp_path and index.parent.name.endswith("-user_temporal")
    page = _check_report(index, ["mf-1", "pop-1"])
    assert len(page.images) == 4  # metric@K, residuals, popularity vs coverage, training curves
    assert page.tables["results"][:3] == ["metric", "mf", "popularity"]
    # best: rmse (mf, only run with it: not ranked), ndcg@5, ndcg@10 (popularity), coverage@10 (mf)
    assert page.best == 3


def test_parsing_errors():
    assert resolve_protocol("leave-last-5-positive-events").split == "leave_last_n_positive"
    assert resolve_protocol("leave_last_n_positive_events").eventwise
    with pytest.raises(BatchrecError, match="unknown protocol 'nope'.*user_temporal.*random-80-10-10"):
        resolve_protocol("nope")
    assert parse_ks("20,5,10,5") == [5, 10, 20]
    for bad in ("0", "-5", "5,x", "", "2.5"):
        with pytest.raises(BatchrecError, match="--k"):
            parse_ks(bad)
    assert parse_metrics("ndcg, recall@10") == {"ndcg", "recall@10"}
    with pytest.raises(BatchrecError, match="unknown metric 'auc'"):
        parse_metrics("ndcg,auc")


def test_models_are_trained_measured_and_written(wh, tmp_path):
    out = evaluate_command(
        wh, models="popularity,svd", protocol="user_temporal", ks="5,10", report_dir=tmp_path, compare=True
    )
    assert "trained popularity now" in out and "trained svd now" in out
    rows = _evaluations(wh, "protocol = 'user_temporal'")
    by = {(r["run_id"].split("-")[0], r["metric"], r["k"]): r["value"] for r in rows}
    assert len({r["evaluated_at"] for r in rows}) == 1 and all(r["protocol"] == "user_temporal" for r in rows)
    assert len(by) == len(rows)  # one row per (run, protocol, metric, k)
    # most-popular, its users and the pairs RMSE is measured on, computed here from the split
    data = _split(wh, "user_temporal")
    assert by[("popularity", "ndcg", 10)] == pytest.approx(
        protocol_ndcg(popularity_scores(data), data), abs=1e-9
    )
    assert by[("popularity", "users", None)] == len(protocol_users(data)) > 500
    assert ("popularity", "rmse", None) not in by  # a ranking model has no rating error
    assert 0.8 < by[("svd", "rmse", None)] < 0.95 and by[("svd", "n_known", None)] == known_test_pairs(data)
    for metric in (
        "precision",
        "recall",
        "ndcg",
        "hit_rate",
        "map",
        "mrr",
        "coverage",
        "avg_popularity",
        "novelty",
    ):
        assert {("svd", metric, 5), ("svd", metric, 10)} <= by.keys()
    assert by[("svd", "coverage", 10)] > by[("popularity", "coverage", 10)]
    # 95% intervals around every average over users; none for counts and coverage
    for r in rows:
        if r["metric"] in ("coverage", "users", "n_known", "n_unknown") or r["metric"].startswith(
            ("n_", "users_")
        ):
            assert r["ci_low"] is None and r["ci_high"] is None, r
        else:
            assert r["ci_low"] - 1e-12 <= r["value"] <= r["ci_high"] + 1e-12, r
    ndcg = {r["run_id"].split("-")[0]: r for r in rows if (r["metric"], r["k"]) == ("ndcg", 10)}
    assert 0.0 < ndcg["svd"]["ci_high"] - ndcg["svd"]["ci_low"] < 0.05
    # the paired test against the best run, for the other run only
    best, other = sorted(ndcg, key=lambda f: -ndcg[f]["value"])
    assert ndcg[best]["p_vs_best"] is None and 0.0 < ndcg[other]["p_vs_best"] <= 1.0
    assert by[("svd", "ndcg_users_20-99", 10)] > 0 and by[("svd", "users_users_20-99", None)] > 100
    assert {
        ("svd", "ndcg_items_100+", 10),
        ("svd", "rmse_users_100+", None),
        ("svd", "n_users_100+", None),
    } <= by.keys()
    index = Path(out.rsplit("report: ", 1)[1].strip())
    page = _check_report(index, sorted({r["run_id"] for r in rows}))
    assert "ndcg_users_20-99@10" in page.tables["segments"] and "ndcg@10" in page.tables["results"]

    again = evaluate_command(
        wh,
        models="popularity",
        protocol="user_temporal",
        ks="10",
        report_dir=None,
        threshold=3.5,
        bootstrap=0,
    )
    assert "trained" not in again  # the latest run of the family is reused
    assert all(
        r["ci_low"] is None for r in _evaluations(wh, "protocol = 'user_temporal:threshold=3.5'")
    )  # no resamples
    lenient = {
        r["metric"]: r["value"]
        for r in _evaluations(wh, "protocol = 'user_temporal:threshold=3.5'")
        if r["k"] in (None, 10)
    }
    assert lenient["users"] == len(protocol_users(data, threshold=3.5)) > by[("popularity", "users", None)]
    assert lenient["ndcg"] == pytest.approx(
        protocol_ndcg(popularity_scores(data), data, threshold=3.5), abs=1e-9
    )


def test_eventwise_protocol_counts_every_positive_test_event(wh):
    out = evaluate_command(wh, models="popularity", protocol="leave-last-5-positive-events", report_dir=None)
    rows = {
        (r["metric"], r["k"]): r["value"]
        for r in _evaluations(wh, "protocol = 'leave-last-5-positive-events'")
    }
    # each published number beside ours: no mf run here, so the best run that has the metric
    assert _published_vs_ours(out) == {
        ("Funk-SVD", "ndcg@10"): (0.0217, f"{rows[('ndcg', 10)]:.4f}", "popularity"),
        ("Funk-SVD", "recall@10"): (0.0424, f"{rows[('recall', 10)]:.4f}", "popularity"),
    }
    assert set(rows) == {("ndcg", 10), ("recall", 10), ("events", None), ("users", None)}
    with wh.connect(read_only=True) as con:  # positive test events on items of the train catalogue
        events = con.execute("""
            SELECT count(*) FROM split_holdout h
            WHERE h.protocol = 'leave_last_n_positive' AND h.part = 'test' AND h.rating >= 4
              AND h.item_idx IN (SELECT item_idx FROM splits WHERE protocol = 'leave_last_n_positive' AND part = 'train')
            """).fetchall()[0][0]
    assert rows[("events", None)] == events
    assert 0 < rows[("ndcg", 10)] < rows[("recall", 10)] < 0.2


def test_leakage_risk_runs_are_refused(wh):
    everything = fit_run(wh, "popularity", "latest", None, {}, "cpu")
    other_protocol = fit_run(wh, "popularity", "latest", "random", {}, "cpu")
    with pytest.raises(BatchrecError, match=f"run {everything} was trained on every interaction.*leakage"):
        evaluate_command(wh, runs=everything, protocol="user_temporal", report_dir=None)
    with pytest.raises(BatchrecError, match="protocol random's train part.*user_temporal.*leakage"):
        evaluate_command(wh, runs=other_protocol, protocol="user_temporal", report_dir=None)
    assert "1 run(s)" in evaluate_command(wh, runs=other_protocol, protocol="random", report_dir=None)


def test_runs_of_another_snapshot_are_refused(tmp_path):
    wh = _warehouse(tmp_path, 20_000)
    first = fit_run(wh, "popularity", "latest", "user_temporal", {}, "cpu")
    build_snapshot(wh, as_of="2030-01-01")
    second = fit_run(wh, "popularity", "latest", "user_temporal", {}, "cpu")
    with pytest.raises(BatchrecError, match=f"run {second} was trained on snapshot .*leakage"):
        evaluate_command(wh, runs=f"{first},{second}", protocol="user_temporal", report_dir=None)
    assert "1 run(s)" in evaluate_command(wh, runs=second, protocol="user_temporal", report_dir=None)


def test_preset_needs_its_split_then_runs(tmp_path):
    wh = _warehouse(tmp_path)
    with pytest.raises(BatchrecError) as err:
        evaluate_command(wh, protocol="random-64-16-20", report_dir=None)
    hint = "batchrec features --param random.valid_frac=0.16 --param random.test_frac=0.2"
    assert hint in str(err.value)
    build_snapshot(wh, as_of="2030-01-01", params=tuple(hint.split("--param ")[1:]))
    out = evaluate_command(wh, models="svd,popularity", protocol="random-64-16-20", report_dir=tmp_path / "r")
    assert (
        "popularity" in out and "nothing this protocol measures applies" in out
    )  # no rating error to measure
    rows = _evaluations(wh)
    svd_rmse = next(r["value"] for r in rows if r["metric"] == "rmse")
    assert _published_vs_ours(out) == {("genre+tag DNN", "rmse"): (0.875, f"{svd_rmse:.4f}", "svd")}
    metrics = {r["metric"] for r in rows}
    # RMSE by item training count and by user segment, with the pairs each counts
    buckets = {m for m in metrics if m.startswith(("rmse_items_", "n_items_", "rmse_users_", "n_users_"))}
    assert metrics - buckets == {"rmse", "mae", "n_known", "n_unknown"} and "rmse_items_1-4" in buckets
    assert {"rmse_users_20-99", "n_users_20-99", "rmse_users_100+"} <= buckets
    assert all(r["protocol"] == "random-64-16-20" for r in rows)
    with wh.connect(read_only=True) as con:
        test_rows = con.execute("""SELECT n_test FROM split_protocols p JOIN feature_snapshots s USING (snapshot_id)
                                   WHERE protocol = 'random' ORDER BY s.created_at DESC LIMIT 1""").fetchall()[
            0
        ][0]
    assert test_rows == pytest.approx(0.2 * 100_836, rel=0.02)


def test_bad_input_is_one_line_and_a_nonzero_exit(tmp_path):
    wh = _warehouse(tmp_path, 3000, "random.test_frac=0")
    runner = CliRunner()
    cases = {
        ("--protocol", "nope"): "unknown protocol 'nope'",
        ("--k", "0"): "--k: '0' is not a positive integer",
        ("--k", "5,-1"): "--k: '-1'",
        ("--metrics", "auc"): "unknown metric 'auc'",
        ("--models", "nope"): "unknown model 'nope'",
        ("--runs", "r-missing"): "unknown run 'r-missing'",
        ("--protocol", "random", "--models", "popularity"): "empty test part",
    }
    for args, message in cases.items():
        result = runner.invoke(
            main, ["--warehouse", str(wh.path), "evaluate", "--report", str(tmp_path / "r"), *args]
        )
        assert result.exit_code != 0, args
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], (
            args,
            result.output,
        )
    assert not _evaluations(wh) and not (tmp_path / "r").exists()


def _published_vs_ours(out: str) -> dict[tuple[str, str], tuple[float, str, str]]:
    """The "published numbers vs ours" lines of evaluate's summary: {(approach, metric): (theirs,
    ours as printed, the run it came from)}."""
    found = re.findall(r"^  (.+?)\s+(\S+@?\d*)\s+theirs (\S+)\s+on .+? ours ([0-9.]+) \((.+)\)$", out, re.M)
    return {(a.strip(), m): (float(t), ours, run) for a, m, t, ours, run in found}


def test_published_numbers_are_compared_with_the_matching_family_first():
    """Ours for a published number: the best run of the matching family and parameters, else the
    best run of any family; lower is better for errors, higher for the rest; none without the metric."""
    runs = [
        ReportRun("mf-1", "mf", {"biased": True}, {"rmse": 0.80, "ndcg@10": 0.05}),
        ReportRun("mf-2", "mf", {"biased": False}, {"rmse": 0.90, "ndcg@10": 0.03}),
        ReportRun("svd-1", "svd", {}, {"rmse": 0.70, "ndcg@10": 0.04}),
    ]
    refs = [
        Reference("Funk-SVD", "mf", "rmse", 0.9, "d", "s", {"biased": False}),
        Reference("Funk-SVD", "mf", "ndcg@10", 0.02, "d", "s", {"biased": False}),
        Reference("biased MF", "mf", "rmse", 0.8, "d", "s"),
        Reference("NeuMF", "neumf", "rmse", 0.8, "d", "s"),
        Reference("NeuMF", "neumf", "ndcg@10", 0.2, "d", "s"),
        Reference("NeuMF", "neumf", "recall@10", 0.2, "d", "s"),
    ]
    got = [(value, label) for _, value, label in compare_references(refs, runs)]
    assert got == [
        (0.90, "mf mf-2"),
        (0.03, "mf mf-2"),
        (0.80, "mf mf-1"),
        (0.70, "svd"),
        (0.05, "mf mf-1"),
        (None, ""),
    ]


def test_presets_name_their_published_numbers():
    for preset in PRESETS.values():
        assert preset.references and all(r.source and r.dataset for r in preset.references)
        assert all(r.metric in preset.metrics for r in preset.references), preset.name
    assert (
        json.dumps(PRESETS["random-64-16-20"].split_params, sort_keys=True)
        == '{"test_frac": 0.2, "valid_frac": 0.16}'
    )
