"""`batchrec train --nproc N`: torch DDP over real processes of the installed command (gloo on
CPU) on ml-latest-small: one run and one artifact, written by rank 0, that scores; a rank killed
with SIGKILL fails the command in one line with nothing recorded; and the checks that refuse
before any rank starts."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from batchrec.data import load_snapshot
from batchrec.distributed import Group, user_shard
from batchrec.errors import BatchrecError
from batchrec.features import latest_snapshot_id
from batchrec.jobs import load_job
from batchrec.warehouse import Warehouse, scalar

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = Path(sys.executable).with_name("batchrec")
# Small networks and few epochs: what is tested is the distributed run, not the model's quality.
SMALL = {
    "multvae": ["epochs=2", "ensemble=1", "hidden=32", "latent=8", "encoder_layers=2", "batch_size=64"],
    "neumf": ["epochs=2", "factors=8", "hidden=16", "blocks=1", "batch_size=4096"],
}


def batchrec(db: Path, *args: str, timeout: float = 300, **popen):
    """The installed command (this checkout's code) on warehouse `db`, logging off."""
    command = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "batchrec"]
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "PYTHONPATH": path, "PYTHONWARNINGS": "ignore"}
    argv = [*command, "-qqq", "--warehouse", str(db), *args]
    if popen.pop("background", False):
        return subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env, **popen)


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    """ml-latest-small ingested with a user_temporal snapshot, built once."""
    from batchrec.features import build_snapshot
    from batchrec.ingest import ingest_path

    wh = Warehouse(tmp_path_factory.mktemp("ddp") / "batchrec.duckdb")
    ingest_path(wh, dataset="ml-latest-small")
    build_snapshot(wh, protocols="user_temporal")
    return wh.path


@pytest.fixture
def db(template, tmp_path) -> Path:
    copy = tmp_path / "batchrec.duckdb"
    copy.write_bytes(template.read_bytes())
    return copy


def _runs(db: Path) -> list[tuple]:
    with Warehouse(db).connect(read_only=True) as con:
        return con.execute("SELECT run_id, model, metrics FROM model_runs ORDER BY created_at").fetchall()


def _artifacts(db: Path) -> list[str]:
    folder = Warehouse(db).artifacts_dir
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) if folder.exists() else []


# -- sharding: no processes needed ----------------------------------------------------------------
def test_user_shard_puts_each_user_on_one_rank_and_balances_rows():
    gen = torch.Generator().manual_seed(0)
    users = torch.randint(0, 500, (20_000,), generator=gen) ** 2 // 500  # skewed: a few heavy users
    owners = []
    for rank in range(3):
        mask = user_shard(users, Group(rank, 3, rank, 3, "gloo", torch.device("cpu")))
        owners.append(mask)
    owned = torch.stack(owners).sum(0)
    assert bool((owned == 1).all())  # every row on exactly one rank
    for a in range(3):
        for b in range(a + 1, 3):  # no user split over two ranks
            assert not set(users[owners[a]].tolist()) & set(users[owners[b]].tolist())
    rows = [int(m.sum()) for m in owners]
    assert max(rows) - min(rows) <= int(torch.bincount(users).max())  # within one heavy user


# -- refused before any rank starts ----------------------------------------------------------------
def test_nproc_on_a_family_without_gradient_training_is_one_line(db):
    done = batchrec(db, "train", "ease", "--nproc", "2")
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        "error: --nproc 2: ease is not trained data-parallel (expected one of neumf, multvae, autorec, two_tower, "
        "content_dnn, or --nproc 1)"
    ]
    assert _runs(db) == []


def test_nproc_on_a_busy_warehouse_starts_no_rank(db):
    with Warehouse(db).lock("test"):
        done = batchrec(db, "train", "neumf", "--nproc", "2")
    assert done.returncode == 75
    assert "warehouse is busy" in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert _runs(db) == [] and _artifacts(db) == []


def test_a_rank_works_under_its_parents_lock_only(db):
    """rank 0 of `--nproc` writes under the launching process's lock; any other holder is refused."""
    with pytest.raises(BatchrecError, match="expected the parent process"):
        with Warehouse(db).lock_of_parent("train"):
            pass


def test_job_step_takes_nproc(tmp_path):
    job = tmp_path / "job.toml"
    job.write_text('[job]\nname = "n"\n\n[[steps]]\nstep = "train"\nmodel = "neumf"\nnproc = 2\n')
    assert load_job(job)[1][0]["nproc"] == 2
    job.write_text('[job]\nname = "n"\n\n[[steps]]\nstep = "train"\nmodel = "neumf"\nnproc = 0\n')
    with pytest.raises(BatchrecError, match="nproc"):
        load_job(job)


# -- real DDP runs -------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("family", ["multvae", "neumf"])
def test_two_processes_write_one_run_that_scores(db, family):
    """A protocol run, so that every epoch validates through the ranks' combined figure; multvae
    from the command line, neumf as a job step (rank 0 then works under the job's lock)."""
    if family == "multvae":
        done = batchrec(
            db,
            "train",
            family,
            "--nproc",
            "2",
            "--device",
            "cpu",
            "--protocol",
            "user_temporal",
            *(f"--param={p}" for p in SMALL[family]),
        )
    else:
        job = db.with_name("job.toml")
        job.write_text(
            f'[job]\nname = "ddp"\n\n[[steps]]\nstep = "train"\nmodel = "{family}"\n'
            f'protocol = "user_temporal"\ndevice = "cpu"\nnproc = 2\nparams = {json.dumps(SMALL[family])}\n'
        )
        done = batchrec(db, "run", str(job))
    assert done.returncode == 0, done.stderr
    runs = _runs(db)
    assert len(runs) == 1 and _artifacts(db) == [runs[0][0]]  # one row, one artifact: rank 0's
    run_id, model, metrics = runs[0]
    metrics = json.loads(metrics)
    # both ranks ran the same epochs, having seen the same validation figures (checked by the run)
    assert model == family and metrics["distributed"] == {
        "processes": 2,
        "backend": "gloo",
        "epochs_per_rank": [2, 2],
    }
    assert done.stdout.count("run ") == 1 and "x 2 processes (DDP, gloo)" in done.stdout
    metric = "valid_ndcg" if family == "multvae" else "valid_rmse"
    assert [h["epoch"] for h in metrics["history"]] == [1, 2]
    assert all(0 < h[metric] < 5 and h["loss"] > 0 for h in metrics["history"])
    with Warehouse(db).connect(read_only=True) as con:
        train_rows = len(load_snapshot(con, latest_snapshot_id(con), "user_temporal").train)
    assert metrics["n_train"] == train_rows
    scored = batchrec(db, "score", "--run", run_id, "--top-n", "5", "--force", "--device", "cpu")
    assert scored.returncode == 0, scored.stderr
    with Warehouse(db).connect(read_only=True) as con:
        assert scalar(con, "SELECT count(*) FROM recommendations WHERE run_id = ?", [run_id]) == 610 * 5
        assert scalar(con, "SELECT count(*) FROM recommendations WHERE NOT isfinite(score)") == 0


def _rank_pids(parent: int) -> dict[int, int]:
    """{rank: pid} of the ranks `parent` has started so far (from /proc)."""
    found = {}
    children = Path(f"/proc/{parent}/task/{parent}/children")
    for pid in children.read_text().split() if children.exists() else ():
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        rank = next((int(e[5:]) for e in env if e.startswith(b"RANK=")), None)
        if rank is not None:
            found[rank] = int(pid)
    return found


@pytest.mark.slow
def test_a_killed_rank_fails_the_command_in_one_line_and_records_nothing(db):
    proc = batchrec(
        db,
        "train",
        "neumf",
        "--nproc",
        "2",
        "--device",
        "cpu",
        "--param=epochs=200",
        "--param=patience=200",
        "--param=factors=8",
        "--param=hidden=16",
        background=True,
    )
    deadline = time.monotonic() + 120
    while len(ranks := _rank_pids(proc.pid)) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(ranks) == 2, "the ranks never started"
    time.sleep(3)  # into the run (joining the group, or training)
    os.kill(ranks[1], signal.SIGKILL)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1
    assert err.strip().splitlines() == [
        "error: training rank 1 of 2 died (killed by signal 9; out of memory?): "
        "the other ranks were stopped and no run was recorded"
    ]
    assert _runs(db) == [] and _artifacts(db) == []
    assert not any(Path(f"/proc/{pid}").exists() for pid in ranks.values())  # rank 0 stopped (and reaped) too
