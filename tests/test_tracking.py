"""MLflow tracking (batchrec.tracking) with a real local file-based tracking store, read back with
MlflowClient: `train --mlflow` logs parameters, the per-epoch history, final metrics and the
artifact; `evaluate --mlflow` adds the test metrics to the same MLflow run; MLFLOW_TRACKING_URI
alone turns it on; without mlflow, or with a store that cannot be used, one line before any work."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

import batchrec
from batchrec.cli import main
from batchrec.tracking import metric_key

mlflow = pytest.importorskip("mlflow")  # the extra batchrec[mlflow]; .ci/run installs it
from mlflow.tracking import MlflowClient  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CLI = "from batchrec.cli import main; main()"


def _env(store: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["MLFLOW_TRACKING_URI"] = store.as_uri()
    # MLflow 3 keeps the file store behind this switch; MLflow 2 ignores it
    return env | {"MLFLOW_ALLOW_FILE_STORE": "true"} | extra


def _batchrec(args: list[str], env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", CLI, *args], capture_output=True, text=True, env=env, timeout=600
    )


def _runs_tagged(client: MlflowClient, run_id: str) -> list:
    experiment = client.get_experiment_by_name("batchrec")
    return client.search_runs(
        [experiment.experiment_id], filter_string=f"tags.`batchrec.run_id` = '{run_id}'"
    )


@pytest.fixture(autouse=True)
def file_store_allowed(monkeypatch):
    """The reading MlflowClient of these tests uses the file store too (see `_env`)."""
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")


@pytest.fixture(scope="module")
def warehouse(tmp_path_factory, copy_warehouse) -> batchrec.Warehouse:
    return batchrec.Warehouse(copy_warehouse(tmp_path_factory.mktemp("tracking") / "wh"))


@pytest.mark.slow  # two `batchrec` processes loading torch and mlflow, an MF fit: ~50 s on the 2-core machine
def test_train_and_evaluate_log_to_mlflow(warehouse, tmp_path):
    store = tmp_path / "mlruns"
    env = _env(store)
    wh = ["-q", "--warehouse", str(warehouse.path)]
    trained = _batchrec(
        [
            *wh,
            "train",
            "mf",
            "--protocol",
            "user_temporal",
            "--param",
            "epochs=2",
            "--param",
            "factors=8",
            "--mlflow",
        ],
        env,
    )
    assert trained.returncode == 0, trained.stderr
    run = warehouse.run("latest", family="mf")
    assert trained.stdout.startswith(f"run {run.run_id}: mf") and "; mlflow run " in trained.stdout

    client = MlflowClient(tracking_uri=store.as_uri())
    [logged] = _runs_tagged(client, run.run_id)
    assert trained.stdout.rstrip().endswith(f"; mlflow run {logged.info.run_id}")
    params = logged.data.params
    assert params["family"] == "mf" and params["protocol"] == "user_temporal" and params["factors"] == "8"
    assert (
        params["epochs"] == "2" and params["snapshot_id"] == run.snapshot_id and "lr" in params
    )  # defaults too
    # the per-epoch history, each epoch at its step, exactly what model_runs recorded
    history = run.history
    assert history["epoch"].to_list() == [1, 2]
    for name in ("loss", "valid_rmse"):
        logged_curve = client.get_metric_history(logged.info.run_id, name)
        assert [m.step for m in logged_curve] == [1, 2]
        assert [m.value for m in logged_curve] == pytest.approx(history[name].to_list())
    assert logged.data.metrics["valid/rmse"] == pytest.approx(run.valid_metrics["rmse"])
    assert logged.data.metrics["valid/ndcg_at_10"] == pytest.approx(run.valid_metrics["ndcg@10"])
    assert logged.data.metrics["fit_seconds"] > 0
    artifacts = {a.path for a in client.list_artifacts(logged.info.run_id, "model")}
    assert artifacts == {"model/model.json", "model/state.pt"}
    assert (
        Path(client.download_artifacts(logged.info.run_id, "model/model.json")).read_bytes()
        == (Path(run.artifact_path) / "model.json").read_bytes()
    )

    evaluated = _batchrec(
        [
            *wh,
            "evaluate",
            "--runs",
            run.run_id,
            "--protocol",
            "user_temporal",
            "--k",
            "10",
            "--report",
            "",
            "--mlflow",
        ],
        env,
    )
    assert evaluated.returncode == 0, evaluated.stderr
    assert f"mlflow: 1 of 1 run(s) logged ({run.run_id} -> {logged.info.run_id})" in evaluated.stdout
    [after] = _runs_tagged(client, run.run_id)  # the same MLflow run, not a second one
    table = warehouse.sql(
        "SELECT metric, k, value FROM evaluations WHERE run_id = $r AND protocol = 'user_temporal'",
        {"r": run.run_id},
    )
    assert len(table) >= 5
    for metric, k, value in table.iter_rows():
        name = metric_key(f"user_temporal/{metric}" + (f"@{k}" if k is not None else ""))
        assert after.data.metrics[name] == pytest.approx(value)
    assert "user_temporal/ndcg_at_10" in after.data.metrics and "user_temporal/users" in after.data.metrics
    assert after.data.tags["batchrec.evaluate/user_temporal/ks"] == "10"


def test_the_environment_variable_alone_turns_tracking_on(warehouse, tmp_path, monkeypatch):
    for key, value in _env(tmp_path / "mlruns").items():
        if key.startswith("MLFLOW_"):
            monkeypatch.setenv(key, value)
    tracked = batchrec.train("popularity", protocol="user_temporal", warehouse=warehouse)
    untracked = batchrec.train("popularity", protocol="user_temporal", mlflow=False, warehouse=warehouse)
    client = MlflowClient(tracking_uri=(tmp_path / "mlruns").as_uri())
    [logged] = _runs_tagged(client, tracked.run_id)
    assert tracked.mlflow_run_id == logged.info.run_id and logged.data.params["variant"] == "count"
    assert untracked.mlflow_run_id is None and _runs_tagged(client, untracked.run_id) == []


@pytest.mark.parametrize(
    "args, uri, installed, message",
    [
        (
            ["train", "popularity", "--mlflow"],
            None,
            False,
            "error: MLflow tracking was asked for (--mlflow was given) but mlflow is not installed "
            "(expected `pip install 'batchrec[mlflow]'`, or unset MLFLOW_TRACKING_URI / drop --mlflow)",
        ),
        (
            ["evaluate", "--models", "popularity", "--report", ""],
            "file:///tmp/mlruns",
            False,
            "error: MLflow tracking was asked for (MLFLOW_TRACKING_URI is set) but mlflow is not installed "
            "(expected `pip install 'batchrec[mlflow]'`, or unset MLFLOW_TRACKING_URI / drop --mlflow)",
        ),
        (
            ["train", "popularity"],
            "nosuchscheme://store",
            True,
            "error: MLflow tracking store nosuchscheme://store cannot be used (MLFLOW_TRACKING_URI is set): ",
        ),
    ],
    ids=["no mlflow, --mlflow", "no mlflow, environment", "unusable store"],
)
def test_tracking_that_cannot_work_stops_before_any_work(
    warehouse, monkeypatch, args, uri, installed, message
):
    if not installed:
        monkeypatch.setitem(sys.modules, "mlflow", None)  # `import mlflow` fails as if it were not installed
    if uri:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    runs_before = warehouse.runs()
    done = CliRunner().invoke(main, ["--warehouse", str(warehouse.path), *args])
    assert done.exit_code == 1 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and done.stderr.startswith(message), done.stderr
    assert warehouse.runs().equals(runs_before)  # nothing fitted or recorded
