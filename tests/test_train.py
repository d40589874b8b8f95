"""`batchrec train` end to end on a small real warehouse: the model_runs row and artifact, run
lookup, and every failure leaving neither a row nor an artifact."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from click.testing import CliRunner

from batchrec.cli import main
from batchrec.data import load_snapshot, shifted_back
from batchrec.errors import BatchrecError
from batchrec.features import build_snapshot
from batchrec.ingest import ingest_path
from batchrec.models.base import Recommender
from batchrec.runs import resolve_run
from batchrec.train import fit_run, load_run_model, train_model
from batchrec.warehouse import Warehouse, scalar

ML_SMALL = Path(__file__).resolve().parent.parent / "batchrec" / "datasets" / "ml-latest-small"

N_USERS = 120  # the first users of ml-latest-small: ~19k ratings, enough for every family


@pytest.fixture(scope="module")
def warehouse_template(tmp_path_factory) -> Warehouse:
    """ml-latest-small cut to its first users, ingested and featurised as the CLI does it."""
    root = tmp_path_factory.mktemp("wh")
    source = root / "ml-small-cut"
    source.mkdir()
    pl.read_csv(ML_SMALL / "ratings.csv").filter(pl.col("userId") <= N_USERS).write_csv(
        source / "ratings.csv"
    )
    shutil.copy(ML_SMALL / "movies.csv", source / "movies.csv")
    wh = Warehouse(root / "batchrec.duckdb")
    ingest_path(wh, path=str(source))
    build_snapshot(wh, protocols="user_temporal")
    return wh


@pytest.fixture
def wh(warehouse_template, tmp_path) -> Warehouse:
    """A private copy per test, so runs and artifacts of one test never leak into another."""
    copy = Warehouse(tmp_path / "batchrec.duckdb")
    copy.path.write_bytes(warehouse_template.path.read_bytes())
    return copy


def _runs(wh: Warehouse) -> int:
    with wh.connect(read_only=True) as con:
        return scalar(con, "SELECT count(*) FROM model_runs")


def _artifacts(wh: Warehouse) -> list[str]:
    return sorted(p.name for p in wh.artifacts_dir.iterdir()) if wh.artifacts_dir.exists() else []


def test_train_records_a_run_and_its_artifact(wh):
    summary = train_model(wh, "mf", protocol="user_temporal", params=("factors=8", "epochs=3"), device="cpu")
    assert summary.startswith("run mf-") and "valid rmse=" in summary and "\n" not in summary
    with wh.connect(read_only=True) as con:
        run = resolve_run(con, "latest")
        snapshot_id = scalar(con, "SELECT snapshot_id FROM feature_snapshots")
        data = load_snapshot(con, snapshot_id, "user_temporal")
    assert run["run_id"] in summary and run["run_id"].startswith("mf-")
    assert run["model"] == "mf" and run["protocol"] == "user_temporal" and run["snapshot_id"] == snapshot_id
    assert run["params"]["factors"] == 8 and run["params"]["lr"] == 5e-3  # defaults recorded too
    assert run["device"] == "cpu" and run["fit_seconds"] > 0
    metrics = run["metrics"]
    assert metrics["n_train"] == len(data.train)
    assert len(metrics["history"]) == 3 and all("valid_rmse" in h for h in metrics["history"])
    assert 0.5 < metrics["valid"]["rmse"] < 1.5 and 0 <= metrics["valid"]["ndcg@10"] <= 1
    assert _artifacts(wh) == [run["run_id"]]
    model = load_run_model(run, "cpu")
    assert model.n_users == data.n_users and model.n_items == data.n_items
    # The artifact scores like the validation metrics say it does.
    valid = data.valid
    pred = model.score(torch.from_numpy(valid.user_idx), torch.from_numpy(valid.item_idx)).numpy()
    known = (np.bincount(data.train.item_idx, minlength=data.n_items) > 0)[valid.item_idx]
    rmse = float(np.sqrt(np.mean((np.clip(pred[known], 0.5, 5.0) - valid.rating[known]) ** 2)))
    assert rmse == pytest.approx(metrics["valid"]["rmse"], abs=1e-5)


def test_without_protocol_trains_on_every_interaction(wh):
    run_id = fit_run(wh, "popularity")
    with wh.connect(read_only=True) as con:
        run = resolve_run(con, run_id)
        n_all = scalar(con, "SELECT count(*) FROM interactions")
        counts = np.bincount(
            con.sql("SELECT item_idx FROM interactions").fetchnumpy()["item_idx"],
            minlength=scalar(con, "SELECT count(*) FROM item_index"),
        )
    assert run["protocol"] is None and run["metrics"]["n_train"] == n_all and run["metrics"]["valid"] == {}
    scores = load_run_model(run, "cpu").score(torch.tensor([0]))[0].numpy()
    np.testing.assert_array_equal(scores, counts.astype(np.float32))


def test_resolve_run_by_id_latest_and_family(wh):
    first = fit_run(wh, "popularity", protocol="user_temporal")
    second = fit_run(wh, "svd", protocol="user_temporal", params={"factors": 4})
    with wh.connect(read_only=True) as con:
        assert resolve_run(con)["run_id"] == second
        assert resolve_run(con, "latest")["run_id"] == second
        assert resolve_run(con, model="popularity")["run_id"] == first
        assert resolve_run(con, first)["model"] == "popularity"
        with pytest.raises(BatchrecError, match=f"unknown run 'nope'; recent runs: {second}, {first}"):
            resolve_run(con, "nope")
        with pytest.raises(BatchrecError, match="no runs of model 'bpr'"):
            resolve_run(con, model="bpr")
        with pytest.raises(BatchrecError, match="is a popularity model, not svd"):
            resolve_run(con, first, model="svd")


def test_resolve_run_on_an_empty_table(wh):
    with wh.connect(read_only=True) as con, pytest.raises(BatchrecError, match="batchrec train MODEL"):
        resolve_run(con)


def test_missing_artifact_is_a_clear_error(wh):
    run_id = fit_run(wh, "popularity")
    with wh.connect(read_only=True) as con:
        run = resolve_run(con, run_id)
    for f in (wh.artifacts_dir / run_id).iterdir():
        f.unlink()
    with pytest.raises(BatchrecError, match=f"artifact of run {run_id} is missing"):
        load_run_model(run, "cpu")


def test_diverging_fit_records_nothing(wh):
    with pytest.raises(
        BatchrecError, match=r"^mf: training diverged \(loss is nan at epoch \d+\); lower the learning"
    ):
        train_model(
            wh,
            "mf",
            protocol="user_temporal",
            params=("optimizer=sgd", "lr=10", "init_std=1", "factors=8", "epochs=20"),
            device="cpu",
        )
    assert _runs(wh) == 0 and _artifacts(wh) == []


def test_failed_save_leaves_no_half_artifact(wh, monkeypatch):
    def broken_save(self, directory):
        (directory / "model.json").parent.mkdir(parents=True, exist_ok=True)
        (directory / "model.json").write_text("{}")
        raise OSError("disk full")

    monkeypatch.setattr(Recommender, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        fit_run(wh, "popularity")
    assert _runs(wh) == 0 and _artifacts(wh) == []


@pytest.mark.parametrize(
    "args, expected",
    [
        (["train", "nosuch"], "unknown model 'nosuch'; valid: popularity"),
        (["train", "mf", "--param", "factorz=8"], "unknown parameter 'factorz'; valid: factors (int"),
        (["train", "mf", "--param", "factors=many"], "factors='many' is not a valid int"),
        (["train", "mf", "--param", "reg=-1"], "reg=-1.0 is out of range"),
        (["train", "mf", "--snapshot", "s1999"], "unknown feature snapshot 's1999'"),
        (["train", "mf", "--protocol", "random"], "has no split for protocol 'random'"),
    ],
)
def test_bad_input_is_one_line_and_records_nothing(wh, args, expected):
    result = CliRunner().invoke(main, ["--warehouse", str(wh.path), *args])
    assert result.exit_code != 0
    assert result.output.startswith("error: ") and expected in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert _runs(wh) == 0 and _artifacts(wh) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_is_a_clear_error(wh):
    result = CliRunner().invoke(
        main, ["--warehouse", str(wh.path), "train", "popularity", "--device", "cuda"]
    )
    assert result.exit_code != 0 and "no CUDA device is available" in result.output
    assert _runs(wh) == 0


def test_cli_train_and_models(wh):
    result = CliRunner().invoke(
        main,
        [
            "--warehouse",
            str(wh.path),
            "train",
            "svd",
            "--protocol",
            "user_temporal",
            "--param",
            "factors=4",
            "--device",
            "cpu",
        ],
    )
    assert result.exit_code == 0, result.output
    with wh.connect(read_only=True) as con:
        row = resolve_run(con, model="svd")
    assert row["run_id"] in result.output and json.dumps(row["params"]["factors"]) == "4"
    listing = CliRunner().invoke(main, ["models"]).output
    for family in ("popularity", "mf", "svd", "bpr"):
        assert f"\n{family} [" in f"\n{listing}"
    assert "variant (str, default 'count' one of {count, bayes})" in listing


def test_shifted_back_moves_the_protocol_one_window_back(ml_small):
    """Tuning split: each user's last |valid| train events become valid', valid becomes test'."""
    shifted = shifted_back(ml_small)
    train, n_users = ml_small.train, ml_small.n_users
    assert shifted.test is ml_small.valid
    assert len(shifted.train) + len(shifted.valid) == len(train)
    pairs = lambda e: np.sort(e.user_idx.astype(np.int64) * ml_small.n_items + e.item_idx)  # noqa: E731
    np.testing.assert_array_equal(pairs(shifted.train.concat(shifted.valid)), pairs(train))
    count = lambda e: np.bincount(e.user_idx, minlength=n_users)  # noqa: E731
    want = np.minimum(count(ml_small.valid), count(train))
    np.testing.assert_array_equal(count(shifted.valid), want)
    # valid' is each user's latest train events: nothing in train' comes after any of them
    last_train = np.full(n_users, np.iinfo(np.int64).min)
    np.maximum.at(last_train, shifted.train.user_idx, shifted.train.ts)
    first_valid = np.full(n_users, np.iinfo(np.int64).max)
    np.minimum.at(first_valid, shifted.valid.user_idx, shifted.valid.ts)
    assert (last_train <= first_valid).all()
    with pytest.raises(BatchrecError, match="needs a protocol"):
        shifted_back(replace(ml_small, valid=None, test=None))
