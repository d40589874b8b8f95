"""Scoring and evaluation past one process, on the real engines: a local Ray cluster
(`ray.init(num_cpus=2)`), a real moto S3 server on 127.0.0.1, real `batchrec` child processes
and a Ray worker killed for real mid-task.

What is checked: 3 shards on Ray publish exactly the rows (user, rank, item, score, reason) of
the unsharded run; a task whose worker is SIGKILLed is retried by Ray and the result is still
identical; a missing shard at publish is one line and nothing is published; shards written to
S3 by Ray tasks from an artifact stored on S3 are published into the warehouse; `evaluate` on
Ray measures what it measures locally; without Ray the option is one line naming the extra.
The tests that need the fitted warehouse or the cluster take 10-50 s each on the 2-core CI
machine, so they are marked slow (CI's second step).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest
from faults import BATCHREC, ROOT, fault_env

from batchrec.errors import BatchrecError
from batchrec.evaluate import run_evaluation
from batchrec.executors import open_executor
from batchrec.features import build_snapshot
from batchrec.ingest.run import ingest_path
from batchrec.processes import pid_exists
from batchrec.runs import resolve_run
from batchrec.scoring import load_model, publish_shards, score_run, score_shard, score_sharded
from batchrec.train import fit_run
from batchrec.warehouse import Warehouse

BUCKET = "batchrec-test"
MF = {"factors": 16, "epochs": 2, "batch_size": 8192}
COLUMNS = ["user_id", "rank", "item_id", "score", "reason"]

# Ray workers import this at start-up (its folder is first on the cluster's PYTHONPATH): while the
# file ARM exists, the first worker to score shard 1 writes its pid to FIRED and SIGKILLs itself.
KILL_SHARD_1 = """
import sys
if any(arg.endswith("default_worker.py") for arg in sys.argv):
    import batchrec.scoring.shards as shards

    _score_shard = shards.score_shard

    def score_shard(*args, **kwargs):
        shard = args[2] if len(args) > 2 else kwargs["shard"]
        if tuple(shard)[0] == 1 and os.path.exists(os.path.join(_DIR, "ARM")) \\
                and not os.path.exists(os.path.join(_DIR, "FIRED")):
            with open(os.path.join(_DIR, "FIRED"), "w") as fh:
                fh.write(str(os.getpid()))
            os.kill(os.getpid(), 9)
        return _score_shard(*args, **kwargs)

    shards.score_shard = score_shard
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server on 127.0.0.1 (its own process) with one bucket; the AWS_* variables
    that point batchrec (and the Ray workers started after it) at it."""
    boto3 = pytest.importorskip("boto3")
    pytest.importorskip("moto.server")
    port = _free_port()
    with open(tmp_path_factory.mktemp("moto") / "moto.log", "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    env = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_REGION": "us-east-1",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, "moto server did not start"
                time.sleep(0.2)
        client = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name="us-east-1")
        client.create_bucket(Bucket=BUCKET)
        yield client
    finally:
        proc.terminate()
        proc.wait(30)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="module")
def cluster(s3, tmp_path_factory):
    """A local Ray cluster of 2 CPUs started by this process; its workers see the S3 settings and
    the fault folder (KILL_SHARD_1, armed only by the test that wants it). Yields (address, fault folder)."""
    ray = pytest.importorskip("ray")
    faults = tmp_path_factory.mktemp("faults")
    env = fault_env(faults, KILL_SHARD_1)
    saved = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = env["PYTHONPATH"]
    try:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
        yield ray.get_runtime_context().gcs_address, faults
    finally:
        ray.shutdown()
        if saved is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = saved


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> dict:
    """ml-latest-small ingested, one snapshot, a shipped mf run, and the rows the unsharded
    scorer gives every user (computed here, in this process, nothing published)."""
    wh = Warehouse(tmp_path_factory.mktemp("scale") / "wh" / "batchrec.duckdb")
    ingest_path(wh, dataset="ml-latest-small")
    build_snapshot(wh, protocols="user_temporal")
    run_id = fit_run(wh, "mf", params=MF, device="cpu")
    with wh.connect(read_only=True) as con:
        run = resolve_run(con, run_id)
    frame, _ = score_run(wh, run, load_model(run, "cpu"), 10, 1 << 30)
    return {"wh": wh, "run": run_id, "expected": frame.select(COLUMNS).sort("user_id", "rank")}


def _copy(base: dict, tmp_path: Path) -> Warehouse:
    dst = tmp_path / "wh"
    dst.mkdir()
    shutil.copy(base["wh"].path, dst / base["wh"].path.name)
    copy = Warehouse(dst / base["wh"].path.name)
    shutil.copytree(base["wh"].artifacts_dir, copy.artifacts_dir)
    return copy


def _published(wh: Warehouse) -> pl.DataFrame:
    with wh.connect(read_only=True) as con:
        return con.sql(f"SELECT {', '.join(COLUMNS)} FROM recommendations ORDER BY user_id, rank").pl()


def _batchrec(wh: Warehouse, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BATCHREC), "--warehouse", str(wh.path), *args],
        capture_output=True,
        text=True,
        env=env or {**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=600,
    )


def _objects(s3, prefix: str) -> set[str]:
    """The objects under `prefix` (pyarrow's empty folder markers, keys ending in /, left out)."""
    found = s3.list_objects_v2(Bucket=BUCKET, Prefix=prefix).get("Contents", [])
    return {o["Key"] for o in found if not o["Key"].endswith("/")}


def _identical(a: pl.DataFrame, b: pl.DataFrame) -> None:
    assert a.height == b.height and a.height > 6000
    assert a.equals(b), "published rows differ from the unsharded run"


@pytest.mark.slow
def test_three_shards_on_ray_publish_the_unsharded_table(cluster, base, tmp_path):
    address, _ = cluster
    wh = _copy(base, tmp_path)
    result = _batchrec(
        wh,
        "score",
        "--run",
        base["run"],
        "--device",
        "cpu",
        "--executor",
        "ray",
        "--ray-address",
        address,
        "--shards",
        "3",
    )
    assert result.returncode == 0, result.stderr
    assert "3 shards" in result.stdout and "published 3 shards" in result.stdout
    _identical(_published(wh), base["expected"])
    assert not list(wh.shards_dir.rglob("*.parquet"))  # published, then removed
    # a task that fails (not a dead worker: retrying cannot help) is one line; nothing changes
    with wh.connect(read_only=True) as con:
        before = con.sql("SELECT * FROM recommendations ORDER BY user_id, rank").pl()
    shutil.rmtree(wh.artifacts_dir / base["run"])
    result = _batchrec(
        wh,
        "-q",
        "score",
        "--run",
        base["run"],
        "--device",
        "cpu",
        "--executor",
        "ray",
        "--ray-address",
        address,
        "--shards",
        "2",
    )
    assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
    assert re.match(
        rf"error: shard [01]/2 of run {base['run']}: artifact of run {base['run']} is missing", result.stderr
    )
    with wh.connect(read_only=True) as con:
        assert con.sql("SELECT * FROM recommendations ORDER BY user_id, rank").pl().equals(before)


@pytest.mark.slow
def test_a_killed_ray_worker_is_retried_and_the_result_is_identical(cluster, base, tmp_path):
    _, faults = cluster
    wh = _copy(base, tmp_path)
    (faults / "ARM").touch()
    try:
        with open_executor("ray") as ex:  # the cluster this process is connected to
            results, published = score_sharded(wh, ex, base["run"], 3, device="cpu")
    finally:
        (faults / "ARM").unlink()
    killed = int((faults / "FIRED").read_text())
    assert not pid_exists(killed)  # the worker really died mid-task ...
    assert sorted(r.shard for r in results) == [0, 1, 2] and published.shards == 3
    _identical(_published(wh), base["expected"])  # ... and Ray's retry made the same rows


@pytest.mark.slow
def test_a_missing_shard_is_one_line_and_nothing_is_published(base, tmp_path):
    wh = _copy(base, tmp_path)
    out = tmp_path / "shards"
    for i in (0, 2):
        assert score_shard(wh, base["run"], (i, 3), out, device="cpu").uri.endswith(f"shard={i}.parquet")
    before = _published(wh)
    with pytest.raises(BatchrecError, match=r"shard 1/3 is missing"):
        publish_shards(wh, base["run"], out)
    result = _batchrec(wh, "score", "--publish", base["run"], "--shards-uri", str(out))
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ")
    assert f"shard 1/3 is missing in {out}/run_id={base['run']}" in result.stderr
    assert _published(wh).equals(before) and before.height == 0


@pytest.mark.slow
def test_s3_round_trip_artifact_and_shards_through_ray(cluster, s3, base, tmp_path):
    wh = _copy(base, tmp_path)
    # the artifact goes to S3 (a real child process, settings from the environment) ...
    remote = Warehouse(wh.path, artifacts=f"s3://{BUCKET}/artifacts")
    result = _batchrec(
        remote,
        "--artifacts",
        f"s3://{BUCKET}/artifacts",
        "train",
        "mf",
        "--device",
        "cpu",
        *[x for k, v in MF.items() for x in ("--param", f"{k}={v}")],
    )
    assert result.returncode == 0, result.stderr
    with wh.connect(read_only=True) as con:
        run = resolve_run(con, None, "mf", shipped=True)
    assert run["artifact_path"].startswith(f"s3://{BUCKET}/artifacts/{run['run_id']}")
    assert _objects(s3, "artifacts/") == {
        f"artifacts/{run['run_id']}/model.json",
        f"artifacts/{run['run_id']}/state.pt",
    }
    expected, _ = score_run(wh, run, load_model(run, "cpu"), 10, 1 << 30)  # loaded from S3 here
    # ... Ray tasks load it from there and write their shards to S3, the driver publishes them
    with open_executor("ray") as ex:
        results, published = score_sharded(wh, ex, run["run_id"], 2, f"s3://{BUCKET}/shards", device="cpu")
    assert sorted(r.uri for r in results) == [
        f"s3://{BUCKET}/shards/run_id={run['run_id']}/shard={i}.parquet" for i in range(2)
    ]
    assert published.published == expected.height
    _identical(_published(wh), expected.select(COLUMNS).sort("user_id", "rank"))
    assert _objects(s3, "shards/") == set()  # removed after the publish


@pytest.mark.slow
def test_evaluate_on_ray_measures_what_it_measures_here(cluster, base, tmp_path):
    address, _ = cluster
    wh = _copy(base, tmp_path)
    runs = [
        fit_run(wh, m, protocol="user_temporal", params=p, device="cpu")
        for m, p in (("mf", MF), ("popularity", {}))
    ]
    here = run_evaluation(wh, runs=",".join(runs), ks="10", report_dir=None, device="cpu")
    result = _batchrec(
        wh,
        "evaluate",
        "--runs",
        ",".join(runs),
        "--k",
        "10",
        "--report",
        str(tmp_path / "r"),
        "--executor",
        "ray",
        "--ray-address",
        address,
    )
    assert result.returncode == 0, result.stderr
    with wh.connect(read_only=True) as con:
        latest = con.sql("""SELECT run_id, metric, k, value FROM evaluations
                            WHERE evaluated_at = (SELECT max(evaluated_at) FROM evaluations)""").fetchall()
    measured = {(r, m, k): v for r, m, k, v in latest}
    local = {
        (run.run_id, *(name.split("@") if "@" in name else (name, None))): value
        for run in here.runs
        for name, value in run.metrics.items()
    }
    assert len(measured) >= 2 * 5
    for (run_id, metric, k), value in measured.items():
        assert local[(run_id, metric, None if k is None else str(k))] == pytest.approx(
            value, abs=1e-9, nan_ok=True
        )


def test_without_ray_the_executor_option_is_one_line_naming_the_extra(tmp_path):
    env = fault_env(tmp_path / "noray", "import sys\nsys.modules['ray'] = None  # as if not installed\n")
    wh = Warehouse(tmp_path / "wh" / "batchrec.duckdb")
    for args in (["score", "--executor", "ray", "--shards", "2"], ["evaluate", "--executor", "ray"]):
        result = _batchrec(wh, *args, env=env)
        assert result.returncode == 1, result.stderr
        assert result.stderr.strip().count("\n") == 0
        assert "pip install 'batchrec[ray]'" in result.stderr and result.stderr.startswith("error: ")


def test_job_steps_take_the_executor(tmp_path):
    from batchrec.jobs import load_job

    job = tmp_path / "job.toml"
    job.write_text(
        '[[steps]]\nstep = "score"\nexecutor = "ray"\nshards = 4\nshards_uri = "s3://b/p"\ntask_cpus = 2\n'
        '[[steps]]\nstep = "evaluate"\nexecutor = "ray"\nray_address = "10.0.0.5:6379"\n'
    )
    _, steps = load_job(job)
    assert (steps[0]["executor"], steps[0]["shards"], steps[0]["shards_uri"], steps[0]["task_cpus"]) == (
        "ray",
        4,
        "s3://b/p",
        2,
    )
    assert steps[1]["ray_address"] == "10.0.0.5:6379"
    job.write_text('[[steps]]\nstep = "score"\nexecutor = "spark"\n')
    with pytest.raises(BatchrecError, match=r"job.toml:3: step 1 \(score\): executor = 'spark' is not valid"):
        load_job(job)


def test_locations_are_paths_file_uris_or_s3_and_nothing_else(tmp_path):
    from batchrec import storage
    from batchrec.warehouse import artifact_root

    local, uri = storage.location(tmp_path / "a"), storage.location(f"file://{tmp_path}/a")
    assert local.local and uri.local and local.path == uri.path == f"{tmp_path}/a"
    assert (local / "x.parquet").path == f"{tmp_path}/a/x.parquet"
    assert storage.files(local) == []  # a folder that does not exist holds nothing
    for bad, message in (
        ("gs://bucket/p", r"unsupported storage scheme gs:// \(expected a path, file:// or s3://\)"),
        ("s3://", r"no bucket named"),
    ):
        with pytest.raises(BatchrecError, match=message):
            storage.location(bad)
    assert artifact_root("s3://bucket/models/") == "s3://bucket/models"
    with pytest.raises(BatchrecError, match=r"--artifacts hdfs://x: unsupported scheme hdfs://"):
        artifact_root("hdfs://x")
