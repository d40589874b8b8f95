"""`batchrec train`: fit a model on a snapshot (with the shared `batchrec.training.Trainer`),
save its artifact atomically and record a `model_runs` row."""

from __future__ import annotations

import logging
import os
import re
import secrets
import shutil
import socket
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

from batchrec import options
from batchrec.data import load_snapshot
from batchrec.errors import BatchrecError, Fault, first_line
from batchrec.features import resolve_snapshot
from batchrec.metrics import validation_metrics
from batchrec.models import create_model, parse_params
from batchrec.models.base import ARTIFACT_META, ARTIFACT_STATE, Recommender
from batchrec.processes import pid_exists
from batchrec.runs import insert_run, stored_artifact_path
from batchrec.serving import refresh as refresh_serving
from batchrec.training import Trainer, choose_device
from batchrec.tuned import tuned_or_defaults
from batchrec.warehouse import transaction, utcnow

log = logging.getLogger("batchrec.train")

_PARTIAL = re.compile(r"^\.(?P<run>[^.]+)\.(?P<pid>\d+)@(?P<host>.+)\.partial$")
# How torch's zip writer reports a write the file system refused (a full disk, an I/O error)
_TORCH_WRITE_FAILED = re.compile(r"inline_container|PytorchStreamWriter|iostream error|file write failed")


def fit_model(model_name: str, data, params: dict | None = None, device: torch.device | str = "cpu",
              progress: bool | None = None, on_epoch: Callable[[dict], None] | None = None):
    """Create, prepare and fit one model on `data` (a SnapshotData); returns (model, trainer).

    The one place a model gets fitted (CLI, evaluation, tuning, benchmarks). A model whose scores
    come out non-finite is rejected here, so a broken model is never saved. `on_epoch` sees each
    epoch's logged row (see `Trainer.on_epoch`).
    """
    model = create_model(model_name, params)
    trainer = Trainer(device=torch.device(device), seed=model.params.get("seed", 0), progress=progress,
                      on_epoch=on_epoch)
    model.prepare(data, trainer.device)
    model.fit(data, trainer)
    with torch.no_grad():
        probe = model.score(torch.arange(min(data.n_users, 64), device=trainer.device))
    if not bool(torch.isfinite(probe).all()):
        raise BatchrecError(f"{model_name}: training diverged (non-finite scores after fitting); "
                            "lower the learning rate or raise regularisation")
    return model, trainer


def new_run_id(model_name: str, created) -> str:
    """Sortable by creation time; the random suffix keeps ids unique within a second."""
    return f"{model_name}-{created:%Y%m%dT%H%M%S}-{secrets.token_hex(3)}"


def save_artifact(model, artifacts_dir: Path, run_id: str) -> Path:
    """Write the artifact under a temporary name that records its owner (pid and host), then
    rename: there is never a half artifact at the final name.

    torch reports a failed write (a full disk) as a RuntimeError from its zip writer
    ("PytorchStreamWriter failed writing file", "unexpected pos"): that becomes one line."""
    final = artifacts_dir / run_id
    tmp = artifacts_dir / f".{run_id}.{os.getpid()}@{socket.gethostname()}.partial"
    try:
        model.save(tmp)
        os.replace(tmp, final)
    except RuntimeError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if not _TORCH_WRITE_FAILED.search(str(exc)):
            raise
        raise Fault(f"writing the model artifact to {artifacts_dir} failed part-way (disk full? torch says: "
                    f"{first_line(exc)}): free space there and rerun (no run was recorded)") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _owner_alive(pid: int, host: str) -> bool:
    if host != socket.gethostname():
        return True  # another machine's process: nothing here can tell, so leave its partial alone
    return pid_exists(pid)


def remove_orphan_partials(artifacts_dir: Path) -> list[str]:
    """Delete the temporary artifacts in `artifacts_dir` whose writing process is gone (killed
    mid-save; no run row points at them); a live writer's partial is never touched. Returns the
    names removed."""
    removed = []
    for path in artifacts_dir.glob(".*.partial") if artifacts_dir.is_dir() else ():
        owner = _PARTIAL.match(path.name)
        if owner is None or _owner_alive(int(owner["pid"]), owner["host"]):
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path.name)
    return removed


def _fit_run(wh, model_name: str, snapshot: str, protocol: str | None, params: dict, device: str,
             publish: bool = False) -> dict:
    """Fit and record one run under the writer lock; `publish`: rebuild the serving database
    after (a command's last step; evaluate's own fits leave that to evaluate)."""
    dev = choose_device(device)
    create_model(model_name, params)  # unknown model or bad parameter: fail before any work
    with wh.lock("train"):
        remove_orphan_partials(wh.artifacts_dir)
        with wh.connect(read_only=True) as con:
            snapshot_id = resolve_snapshot(con, snapshot)
            data = load_snapshot(con, snapshot_id, protocol)
        started = time.perf_counter()
        model, trainer = fit_model(model_name, data, params, dev)
        fit_seconds = time.perf_counter() - started
        metrics = {"valid": validation_metrics(model, data), "n_train": len(data.train), "history": trainer.history}
        created = utcnow()
        run_id = new_run_id(model_name, created)
        artifact = save_artifact(model, wh.artifacts_dir, run_id)
        row = {"run_id": run_id, "model": model_name, "params": model.params, "snapshot_id": snapshot_id,
               "protocol": protocol, "metrics": metrics, "artifact_path": stored_artifact_path(wh.path, artifact),
               "device": str(dev), "fit_seconds": fit_seconds, "created_at": created}
        try:
            with wh.connect() as con, transaction(con, f"model run {run_id}"):
                insert_run(con, row)
        except BaseException:
            shutil.rmtree(artifact, ignore_errors=True)
            raise
        if publish:
            refresh_serving(wh)
    return row


def fit_run(wh, model_name: str, snapshot: str = "latest", protocol: str | None = None,
            params: dict | None = None, device: str = "auto") -> str:
    """Fit `model_name` on a snapshot (a protocol's train part, or every interaction), save the
    artifact beside the warehouse and record a `model_runs` row; returns the run id. A failed fit
    leaves neither a row nor an artifact."""
    return _fit_run(wh, model_name, snapshot, protocol, dict(params or {}), device)["run_id"]


def train_model(wh, model: str, snapshot: str = options.TRAIN_SNAPSHOT.default, protocol: str | None = None,
                params: Sequence[str] = (), device: str = options.DEVICE.default,
                tuned: bool = options.TRAIN_TUNED.default) -> str:
    """`batchrec train`: parse KEY=VALUE parameters (on top of the family's tuned setting with
    `tuned`), fit, record; returns a one-line summary."""
    given = parse_params(model, tuple(params))
    create_model(model, given)  # unknown model or bad parameter: fail before reading the tuned setting
    start, source = tuned_or_defaults(wh, model) if tuned else ({}, None)
    row = _fit_run(wh, model, snapshot, protocol, start | given, device, publish=True)
    valid = row["metrics"]["valid"]
    shown = [f"{k}={valid[k]:.4f}" for k in ("rmse", "ndcg@10", "recall@10", "precision@10") if k in valid]
    scope = f"protocol {protocol} train part" if protocol else "all interactions"
    return (f"run {row['run_id']}: {model} on snapshot {row['snapshot_id']} ({scope}, "
            f"{row['metrics']['n_train']} rows) fitted in {row['fit_seconds']:.1f} s on {row['device']}"
            + (f"; valid {' '.join(shown)}" if shown else "") + (f"; params {source}" if source else "")
            + f"; artifact {row['artifact_path']}")


def load_run_model(run_row: dict, device: torch.device | str = "auto"):
    """The fitted model of a run (a row as `batchrec.runs` returns it, artifact path resolved), on
    `device` ('auto'/'cpu'/'cuda' or a torch device)."""
    dev = device if isinstance(device, torch.device) else choose_device(device)
    path = Path(run_row["artifact_path"])
    if not ((path / ARTIFACT_META).exists() and (path / ARTIFACT_STATE).exists()):
        raise BatchrecError(f"artifact of run {run_row['run_id']} is missing at {path} (deleted or moved?); "
                            f"retrain with `batchrec train {run_row['model']}`")
    return Recommender.load(path, dev, family=run_row["model"])
