"""The Python API (batchrec.api, docs/api.md) on real data: the documented example runs as
written; `Run.recommend` / `Run.predict` answer in raw ids with exactly what `batchrec score`
publishes; `evaluate` returns the rows it wrote; `import batchrec` stays light."""

from __future__ import annotations

import importlib
import importlib.util
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import polars as pl
import pytest

import batchrec
from batchrec.errors import BatchrecError

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "api.md"
CLI = [sys.executable, "-c", "from batchrec.cli import main; main()"]
NEVER_SEEN = 123456789  # a user id the warehouse has never seen
AS_OF = "2018-06-01"  # ml-latest-small runs to 2018-09


def python_blocks(text: str) -> list[str]:
    """The ```python blocks of a markdown page, in order (```python no-run blocks left out)."""
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.M | re.S)


def test_import_batchrec_is_light_and_lists_the_api():
    code = (
        "import sys, batchrec\n"
        "heavy = sorted(m for m in ('torch', 'polars', 'duckdb', 'batchrec.api') if m in sys.modules)\n"
        "print(heavy, sorted(dir(batchrec)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == (
        "[] ['BatchrecError', 'Run', 'Snapshot', 'Warehouse', '__version__', 'build_features', "
        "'evaluate', 'ingest', 'score', 'train', 'tune']"
    )


def test_step_modules_stay_callable_as_api_functions():
    """`batchrec.train` is the module of the train step and calls the API's `train`, however often
    the module has been imported (importing binds it to the package)."""
    import batchrec.evaluate as evaluate_module
    import batchrec.train

    assert batchrec.train.fit_model is not None and evaluate_module.run_evaluation is not None
    for name in ("train", "evaluate", "ingest"):
        assert callable(getattr(batchrec, name))
    assert list(__import__("inspect").signature(batchrec.train).parameters)[:4] == [
        "family",
        "params",
        "protocol",
        "snapshot",
    ]
    with pytest.raises(BatchrecError, match="give exactly one of PATH or --dataset"):
        batchrec.ingest()


@pytest.fixture(scope="module")
def published(tmp_path_factory, copy_warehouse):
    """A shipped EASE run trained through the API and published by the real `batchrec score`
    command (another process) with its top-10: (warehouse, run, recommendations table)."""
    wh = batchrec.Warehouse(copy_warehouse(tmp_path_factory.mktemp("api") / "wh"))
    batchrec.build_features(
        AS_OF, protocols=["user_temporal"], warehouse=wh
    )  # users who started later are cold
    run = batchrec.train("ease", warehouse=wh)
    subprocess.run(
        [*CLI, "-q", "--warehouse", str(wh.path), "score", "--run", run.run_id, "--top-n", "10"],
        check=True,
        capture_output=True,
        text=True,
    )
    table = wh.sql("SELECT user_id, rank, item_id, score, reason FROM recommendations ORDER BY user_id, rank")
    return wh, run, table


def test_recommend_gives_the_published_lists_in_raw_ids(published):
    wh, run, table = published
    sources = table["reason"].str.extract(r"^(because|genre|tag|popular|model)").value_counts()
    assert set(sources["reason"]) >= {
        "because",
        "genre",
    }  # model-served and cold (profile) users both checked
    got = run.recommend(table["user_id"].unique(), n=10)
    assert got.columns == ["user_id", "rank", "item_id", "score", "reason"]
    assert got.equals(table)
    # raw ids: every item is in the catalogue as ingested, every user in the ratings
    items = set(wh.sql("SELECT item_id FROM items")["item_id"])
    assert set(got["item_id"]) <= items and set(got["user_id"]) <= set(
        wh.sql("SELECT user_id FROM ratings")["user_id"]
    )


def test_recommend_serves_a_never_seen_user_the_popular_items(published):
    wh, run, _ = published
    got = run.recommend([NEVER_SEEN, 1], n=5)
    stranger = got.filter(pl.col("user_id") == NEVER_SEEN)
    assert stranger["reason"].to_list() == ["popular"] * 5 and stranger["rank"].to_list() == [1, 2, 3, 4, 5]
    counts = wh.sql(f"""SELECT item_id, count(*) AS n FROM ratings WHERE ts < TIMESTAMP '{AS_OF}'
                       GROUP BY item_id ORDER BY n DESC, item_id LIMIT 5""")
    assert stranger["score"].to_list() == counts["n"].cast(pl.Float32).to_list()
    assert set(stranger["item_id"]) == set(counts["item_id"])  # ties among equal counts in pop_rank order
    assert got.filter(pl.col("user_id") == 1)["reason"].str.starts_with("because").all()


def test_predict_scores_the_published_pairs(published):
    _, run, table = published
    served = table.filter(pl.col("reason").str.starts_with("because")).head(200)
    pairs = served.select("user_id", "item_id", pl.col("rank").alias("extra"))
    got = run.predict(pairs)
    assert got.columns == ["user_id", "item_id", "extra", "score", "fallback"]
    assert got.select("user_id", "item_id", "extra").equals(pairs)  # order and extra columns kept
    assert not got["fallback"].any()
    np.testing.assert_allclose(got["score"].to_numpy(), served["score"].to_numpy(), rtol=1e-5, atol=1e-6)
    tuples = run.predict([(1, int(served["item_id"][0])), (1, 999999999), (NEVER_SEEN, 1)])
    assert tuples["fallback"].to_list() == [False, True, True]


def test_bad_calls_are_one_line_errors(published):
    _, run, _ = published
    for call, message in [
        (lambda: run.recommend([1], n=0), r"^n: 0 is not a list length \(expected an integer >= 1\)$"),
        (lambda: run.recommend(["a"]), r"^user_ids: \['a'\] are not integer ids \(expected integers\)$"),
        (
            lambda: run.recommend([1], n=10**7),
            r"^n: 10000000 is larger than the catalogue \(expected at most \d+",
        ),
        (lambda: run.predict(pl.DataFrame({"user": [1]})), r"^pairs: no 'user_id' column \(columns: user\)$"),
        (lambda: run.predict([1, 2]), r"^pairs: 1 is not a \(user_id, item_id\) pair"),
        (lambda: batchrec.train("nope", warehouse=run.warehouse), r"^unknown model 'nope'; valid: "),
        (lambda: batchrec.train("mf", {"factors": 0}, warehouse=run.warehouse), r"^mf: parameter factors"),
    ]:
        with pytest.raises(BatchrecError, match=message) as caught:
            call()
        assert "\n" not in str(caught.value)


def test_evaluate_returns_the_rows_it_wrote(published):
    wh, _, _ = published
    run = batchrec.train("popularity", protocol="user_temporal", warehouse=wh)
    frame = batchrec.evaluate(run, k=[5, 10])
    assert frame.columns == [
        "run_id",
        "family",
        "protocol",
        "metric",
        "k",
        "value",
        "evaluated_at",
        "ci_low",
        "ci_high",
        "p_vs_best",
    ]
    assert set(frame["run_id"]) == {run.run_id} and set(frame["family"]) == {"popularity"}
    assert {"ndcg", "recall", "precision"} <= set(frame["metric"]) and set(frame["k"].drop_nulls()) == {5, 10}
    ndcg = frame.filter(pl.col("metric") == "ndcg", pl.col("k") == 10).row(0, named=True)
    assert ndcg["ci_low"] < ndcg["value"] < ndcg["ci_high"]  # the 95% interval comes with the value
    table = wh.sql("SELECT * FROM evaluations WHERE run_id = $r", {"r": run.run_id})
    order = ["metric", "k"]
    assert (
        frame.drop("family")
        .sort(order, nulls_last=True)
        .equals(table.select(frame.drop("family").columns).sort(order, nulls_last=True))
    )
    with pytest.raises(BatchrecError, match="leakage risk"):
        batchrec.evaluate(wh.run(published[1].run_id), protocol="user_temporal")


@pytest.mark.slow  # ingest, features, three fits, a publish: over a minute on the shared 2-core machine
def test_the_documented_example_runs(tmp_path, monkeypatch):
    """Every ```python block of docs/api.md, in order, in one namespace, in a fresh folder."""
    blocks = python_blocks(DOC.read_text())
    assert len(blocks) >= 4 and "batchrec.tune(" not in "".join(blocks)  # the no-run block is left out
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.delenv("BATCHREC_WAREHOUSE", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    namespace: dict = {}
    for n, block in enumerate(blocks, start=1):
        exec(compile(block, f"{DOC}, python block {n}", "exec"), namespace)
    results, lists = namespace["results"], namespace["lists"]
    assert set(results["family"]) == {"ease", "mf"} and (results["value"] >= 0).all()
    assert lists.filter(pl.col("user_id") == NEVER_SEEN)["reason"].unique().to_list() == ["popular"]
    assert namespace["wh"].path.parent == Path(namespace["folder"]) and str(tmp_path) in str(
        namespace["folder"]
    )


@pytest.mark.slow  # two EASE fits
@pytest.mark.skipif(
    not (importlib.util.find_spec("optuna") and importlib.util.find_spec("batchrec.tune")),
    reason="needs the tuning module (batchrec/tune.py) and the extra batchrec[tune]",
)
def test_tune_is_reachable_from_the_api(published):
    tuning = importlib.import_module("batchrec.tune")
    wh, _, _ = published
    first = batchrec.tune("ease", "user_temporal", trials=2, seed=0, warehouse=wh)
    assert isinstance(first, tuning.TuneResult) and first.family == "ease" and first.trials == 2
    # the module is imported now, and bound on the package: batchrec.tune is still the function
    again = batchrec.tune("ease", "user_temporal", trials=2, seed=0, warehouse=wh)
    assert again.best_params == first.best_params and again.resumed == 2
