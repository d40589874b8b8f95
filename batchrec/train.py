"""`batchrec train`: fit a model on a snapshot (with the shared `batchrec.training.Trainer`),
save its artifact atomically and record a `model_runs` row.

`--nproc N` trains the neural families data-parallel (torch DDP, `batchrec.distributed`): this
process holds the writer lock and starts N ranks on this machine; under torchrun (or any launcher
setting RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT) each process is one rank of the launcher's group.
Either way rank 0 alone reads the warehouse (and hands the data to the others), writes the
artifact and records the one run."""

from __future__ import annotations

import json
import logging
import math
import os
import re
import secrets
import shutil
import socket
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from batchrec import distributed, logs, options, storage, tracking
from batchrec.data import load_snapshot
from batchrec.errors import BatchrecError, Fault, Interrupted, as_fault, first_line
from batchrec.features import resolve_snapshot
from batchrec.metrics import validation_metrics
from batchrec.models import create_model, parse_params
from batchrec.models.base import ARTIFACT_META, ARTIFACT_STATE, Recommender
from batchrec.processes import pid_exists
from batchrec.runs import insert_run, stored_artifact_path
from batchrec.serving import refresh as refresh_serving
from batchrec.training import Trainer, choose_device
from batchrec.tuned import tuned_or_defaults
from batchrec.warehouse import Warehouse, transaction, utcnow

log = logging.getLogger("batchrec.train")

_PARTIAL = re.compile(r"^\.(?P<run>[^.]+)\.(?P<pid>\d+)@(?P<host>.+)\.partial$")
# The families `--nproc` trains data-parallel: those whose whole fit is `Trainer.fit` over
# per-user rows with dense gradients (mf and bpr step sparse embeddings with LazyAdam instead).
DDP_FAMILIES = ("neumf", "multvae", "autorec", "two_tower", "content_dnn")
# How torch's zip writer reports a write the file system refused (a full disk, an I/O error)
_TORCH_WRITE_FAILED = re.compile(r"inline_container|PytorchStreamWriter|iostream error|file write failed")


def fit_model(
    model_name: str,
    data,
    params: dict | None = None,
    device: torch.device | str = "cpu",
    progress: bool | None = None,
    on_epoch: Callable[[dict], None] | None = None,
):
    """Create, prepare and fit one model on `data` (a SnapshotData); returns (model, trainer).

    The one place a model gets fitted (CLI, evaluation, tuning, benchmarks). A model whose scores
    come out non-finite is rejected here, so a broken model is never saved. `on_epoch` sees each
    epoch's logged row (see `Trainer.on_epoch`).
    """
    model = create_model(model_name, params)
    group = distributed.current()  # in a DDP group: this rank's own random streams
    trainer = Trainer(
        device=torch.device(device),
        seed=distributed.rank_seed(model.params.get("seed", 0), group),
        progress=progress,
        on_epoch=on_epoch,
    )
    model.prepare(data, trainer.device)
    model.fit(data, trainer)
    with torch.no_grad():
        probe = model.score(torch.arange(min(data.n_users, 64), device=trainer.device))
    if not bool(torch.isfinite(probe).all()):
        raise BatchrecError(
            f"{model_name}: training diverged (non-finite scores after fitting); "
            "lower the learning rate or raise regularisation"
        )
    return model, trainer


def new_run_id(model_name: str, created) -> str:
    """Sortable by creation time; the random suffix keeps ids unique within a second."""
    return f"{model_name}-{created:%Y%m%dT%H%M%S}-{secrets.token_hex(3)}"


def save_artifact(model, artifacts_dir: Path | str, run_id: str) -> Path | str:
    """Write the artifact under a temporary name that records its owner (pid and host), then
    rename: there is never a half artifact at the final name. An object-store root (a URI,
    batchrec.storage) gets the artifact written locally first, then uploaded; it returns the URI
    (only a complete upload is ever recorded in `model_runs`).

    torch reports a failed write (a full disk) as a RuntimeError from its zip writer
    ("PytorchStreamWriter failed writing file", "unexpected pos"): that becomes one line."""
    if storage.is_remote(artifacts_dir):
        with tempfile.TemporaryDirectory(prefix="batchrec-artifact-") as tmp:
            local = save_artifact(model, Path(tmp), run_id)
            dest = storage.location(artifacts_dir) / run_id
            storage.upload_dir(Path(local), dest)
        return dest.uri
    final = artifacts_dir / run_id
    tmp = artifacts_dir / f".{run_id}.{os.getpid()}@{socket.gethostname()}.partial"
    try:
        model.save(tmp)
        os.replace(tmp, final)
    except RuntimeError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if not _TORCH_WRITE_FAILED.search(str(exc)):
            raise
        raise Fault(
            f"writing the model artifact to {artifacts_dir} failed part-way (disk full? torch says: "
            f"{first_line(exc)}): free space there and rerun (no run was recorded)"
        ) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _owner_alive(pid: int, host: str) -> bool:
    if host != socket.gethostname():
        return True  # another machine's process: nothing here can tell, so leave its partial alone
    return pid_exists(pid)


def remove_orphan_partials(artifacts_dir: Path | str) -> list[str]:
    """Delete the temporary artifacts in `artifacts_dir` whose writing process is gone (killed
    mid-save; no run row points at them); a live writer's partial is never touched. Returns the
    names removed. (An object store has no partials: an upload is written locally first.)"""
    removed: list[str] = []
    if storage.is_remote(artifacts_dir):
        return removed
    for path in artifacts_dir.glob(".*.partial") if artifacts_dir.is_dir() else ():
        owner = _PARTIAL.match(path.name)
        if owner is None or _owner_alive(int(owner["pid"]), owner["host"]):
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path.name)
    return removed


def _fit_run(
    wh,
    model_name: str,
    snapshot: str,
    protocol: str | None,
    params: dict,
    device: str,
    publish: bool = False,
    mlflow: bool | None = False,
) -> dict | None:
    """Fit and record one run under the writer lock; `publish`: rebuild the serving database
    after (a command's last step; evaluate's own fits leave that to evaluate). `mlflow`: log the
    committed run to MLflow (None: when MLFLOW_TRACKING_URI is set; see batchrec.tracking); the
    returned row then carries `mlflow_run_id`. In a DDP group every rank fits, rank 0 alone
    reads, records, tracks and returns the row (the others: None)."""
    dev = choose_device(device)
    create_model(model_name, params)  # unknown model or bad parameter: fail before any work
    group = distributed.current()
    leader = group is None or group.leader
    track = tracking.start(mlflow) if leader else False  # asked for but unusable: fail before any work too
    with wh.lock("train") if leader else nullcontext():

        def read_inputs():
            remove_orphan_partials(wh.artifacts_dir)
            with wh.connect(read_only=True) as con:
                snapshot_id = resolve_snapshot(con, snapshot)
                return snapshot_id, load_snapshot(con, snapshot_id, protocol)

        snapshot_id, data = read_inputs() if group is None else distributed.share(read_inputs, group)
        started = time.perf_counter()
        model, trainer = fit_model(model_name, data, params, dev if group is None else group.device)
        fit_seconds = time.perf_counter() - started
        if group is not None:
            decisions = _check_same_decisions(trainer.history, group)
        if not leader:
            return None
        metrics = {
            "valid": validation_metrics(model, data),
            "n_train": len(data.train),
            "history": trainer.history,
        }
        if group is not None:
            metrics["distributed"] = {
                "processes": group.world,
                "backend": group.backend,
                "epochs_per_rank": decisions,
            }
        created = utcnow()
        run_id = new_run_id(model_name, created)
        artifact = save_artifact(model, wh.artifacts_dir, run_id)
        row = {
            "run_id": run_id,
            "model": model_name,
            "params": model.params,
            "snapshot_id": snapshot_id,
            "protocol": protocol,
            "metrics": metrics,
            "artifact_path": stored_artifact_path(wh.path, artifact),
            "device": str(dev),
            "fit_seconds": fit_seconds,
            "created_at": created,
        }
        try:
            with wh.connect() as con, transaction(con, f"model run {run_id}"):
                insert_run(con, row)
        except BaseException:
            if not storage.is_remote(artifact):
                shutil.rmtree(artifact, ignore_errors=True)
            raise
        if publish:
            refresh_serving(wh)
    if track:
        row["mlflow_run_id"] = tracking.log_train(row, artifact)
    return row


def _check_same_decisions(history: list[dict], group) -> list[int]:
    """Every rank's epoch count (the early-stopping decisions), checked equal, with the validation
    figures they saw: they must be, as the ranks combine them identically (a difference is a bug,
    and recording that run would hide it)."""
    seen = math.fsum(
        v for row in history for k, v in row.items() if k.startswith("valid") and not math.isnan(v)
    )
    table = distributed.gather([float(len(history)), seen], group)
    if not (table == table[0]).all():
        raise BatchrecError(
            f"the {group.world} training ranks disagreed on early stopping (epochs per rank: "
            f"{', '.join(str(int(n)) for n in table[:, 0])}); no run was recorded"
        )
    return [int(n) for n in table[:, 0]]


def fit_run(
    wh,
    model_name: str,
    snapshot: str = "latest",
    protocol: str | None = None,
    params: dict | None = None,
    device: str = "auto",
    mlflow: bool | None = False,
) -> str:
    """Fit `model_name` on a snapshot (a protocol's train part, or every interaction), save the
    artifact beside the warehouse and record a `model_runs` row; returns the run id. A failed fit
    leaves neither a row nor an artifact."""
    return _fit_run(wh, model_name, snapshot, protocol, dict(params or {}), device, mlflow=mlflow)["run_id"]


def model_params(model: str, params: Mapping[str, Any] | Sequence[str] | None) -> dict:
    """A family's parameters from a dict (Python values) or KEY=VALUE strings (the command line's
    `--param`); both are checked against the family when the model is created."""
    if params is None:
        return {}
    if isinstance(params, Mapping):
        return dict(params)
    if isinstance(params, str):  # one KEY=VALUE given as a plain string, not a list of them
        params = (params,)
    return parse_params(model, tuple(params))


def train_run(
    wh,
    model: str,
    snapshot: str | None = options.TRAIN_SNAPSHOT.default,
    protocol: str | None = None,
    params: Mapping[str, Any] | Sequence[str] | None = None,
    device: str = options.DEVICE.default,
    mlflow: bool | None = None,
    nproc: int = options.TRAIN_NPROC.default,
    tuned: bool = options.TRAIN_TUNED.default,
) -> dict | None:
    """`batchrec train` (and the API's `train`): fit, record, rebuild the serving database; returns
    the recorded run as `batchrec.runs` rows look (artifact path as stored).

    `nproc` > 1: start that many DDP ranks on this machine (a neural family only); started by a
    launcher (torchrun), this process is one rank of its group whatever `nproc` says, and ranks
    other than 0 return None. `tuned`: start from the family's tuned setting (`batchrec tune`;
    the defaults, logged, when there is none), `params` on top."""
    snapshot = snapshot or options.TRAIN_SNAPSHOT.default
    parsed = model_params(model, params)
    source = None
    if tuned:
        create_model(model, parsed)  # unknown model or bad parameter: fail before reading the tuned setting
        start, source = tuned_or_defaults(wh, model)
        parsed = start | parsed
    if distributed.launched():
        row = _train_rank(wh, model, snapshot, protocol, parsed, device, nproc, mlflow)
    elif nproc > 1:
        row = _train_local_ranks(wh, model, snapshot, protocol, parsed, device, nproc, mlflow)
    else:
        row = _fit_run(wh, model, snapshot, protocol, parsed, device, publish=True, mlflow=mlflow)
    if row is not None and source:
        row["params_source"] = source
    return row


def _where(row: dict) -> str:
    ddp = row["metrics"].get("distributed")
    return row["device"] + (f" x {ddp['processes']} processes (DDP, {ddp['backend']})" if ddp else "")


def run_summary(row: dict) -> str:
    """The one line `batchrec train` prints for a recorded run."""
    valid = row["metrics"].get("valid") or {}
    shown = [
        f"{k}={valid[k]:.4f}"
        for k in ("rmse", "ndcg@10", "recall@10", "precision@10")
        if isinstance(valid.get(k), (int, float))
    ]
    scope = f"protocol {row['protocol']} train part" if row["protocol"] else "all interactions"
    tracked = f"; mlflow run {row['mlflow_run_id']}" if row.get("mlflow_run_id") else ""
    return (
        f"run {row['run_id']}: {row['model']} on snapshot {row['snapshot_id']} ({scope}, "
        f"{row['metrics'].get('n_train')} rows) fitted in {row['fit_seconds']:.1f} s on {_where(row)}"
        + (f"; valid {' '.join(shown)}" if shown else "")
        + (f"; params {row['params_source']}" if row.get("params_source") else "")
        + f"; artifact {row['artifact_path']}"
        + tracked
    )


def train_model(
    wh,
    model: str,
    snapshot: str = options.TRAIN_SNAPSHOT.default,
    protocol: str | None = None,
    params: Sequence[str] = (),
    device: str = options.DEVICE.default,
    mlflow: bool | None = None,
    nproc: int = options.TRAIN_NPROC.default,
    tuned: bool = options.TRAIN_TUNED.default,
) -> str:
    """`batchrec train`: parse KEY=VALUE parameters (on top of the family's tuned setting with
    `tuned`), fit, record; returns a one-line summary."""
    row = train_run(wh, model, snapshot, protocol, tuple(params), device, mlflow, nproc, tuned)
    if row is None:  # a rank other than 0 under a launcher: rank 0 records and reports the run
        group = distributed.current()
        return f"rank {group.rank} of {group.world}: done (rank 0 records the run)" if group else "done"
    return run_summary(row)


def _check_distributable(model: str, device: str, nproc: int) -> None:
    if model not in DDP_FAMILIES:
        raise BatchrecError(
            f"--nproc {nproc}: {model} is not trained data-parallel "
            f"(expected one of {', '.join(DDP_FAMILIES)}, or --nproc 1)"
        )
    dev = choose_device(device)
    if dev.type == "cuda" and nproc > torch.cuda.device_count():
        raise BatchrecError(
            f"--nproc {nproc} on CUDA needs {nproc} GPUs (one per process), this machine has "
            f"{torch.cuda.device_count()} (expected --nproc {torch.cuda.device_count()} or --device cpu)"
        )


def _train_rank(
    wh,
    model: str,
    snapshot: str,
    protocol: str | None,
    params: dict,
    device: str,
    nproc: int,
    mlflow: bool | None,
) -> dict | None:
    """This process as one rank of a launcher's group: train; rank 0 records (and tracks) the run
    and returns its row, the other ranks None."""
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"]))
    if nproc not in (1, local_world):
        raise BatchrecError(
            f"--nproc {nproc}, but the launcher started {local_world} processes on this machine "
            "(expected --nproc left out: under torchrun the launcher decides)"
        )
    _check_distributable(model, device, local_world)
    with distributed.process_group(choose_device(device)) as group:
        if not group.leader:
            logs.adjust(quiet=1)  # one rank logs the epochs
        return _fit_run(wh, model, snapshot, protocol, params, device, publish=True, mlflow=mlflow)


def _train_local_ranks(
    wh,
    model: str,
    snapshot: str,
    protocol: str | None,
    params: dict,
    device: str,
    nproc: int,
    mlflow: bool | None,
) -> dict:
    """Hold the writer lock and run `nproc` ranks on this machine (`distributed.launch_local`):
    rank 0 works under this lock (`Warehouse.lock_of_parent`); returns the run's row."""
    _check_distributable(model, device, nproc)
    tracking.start(mlflow)  # asked for but unusable: fail here, before any rank starts
    spec = {
        "warehouse": str(wh.path),
        "artifacts": str(wh.artifacts_dir),
        "model": model,
        "snapshot": snapshot,
        "protocol": protocol,
        "params": params,
        "device": device,
        "mlflow": mlflow,
        "logs": logs.settings(),
    }
    with wh.lock(f"train {model} --nproc {nproc}"):
        result = distributed.launch_local(nproc, "batchrec.train:rank_main", spec)
    return result["row"]


def rank_main(spec_path: str, result_path: str) -> None:
    """Entry point of a rank started by `_train_local_ranks`: train, write {"row"} (rank 0: the
    recorded run; others: null) or {"error", "exit_code"} as JSON to `result_path`, exit with
    that code (errors are reported by the parent, in one line)."""
    spec = json.loads(Path(spec_path).read_text())
    settings = spec["logs"]
    rank = int(os.environ["RANK"])
    logs.configure(settings["verbose"], settings["quiet"], settings["format"])
    wh = Warehouse(spec["warehouse"], artifacts=spec["artifacts"])
    code, result = 0, {}
    try:
        with wh.lock_of_parent("train") if rank == 0 else nullcontext():
            result = {
                "row": train_run(
                    wh,
                    spec["model"],
                    spec["snapshot"],
                    spec["protocol"],
                    spec["params"],
                    spec["device"],
                    spec["mlflow"],
                )
            }
    except BaseException as exc:
        error = exc if isinstance(exc, BatchrecError) else as_fault(exc)
        if isinstance(exc, KeyboardInterrupt):
            error = Interrupted(f"rank {rank} interrupted (SIGINT)")
        if error is None:
            if settings["verbose"]:
                traceback.print_exc()
            error = BatchrecError(
                f"unexpected {type(exc).__name__}: {first_line(exc)} (run with -v for the traceback)"
            )
        code, result = error.exit_code, {"error": first_line(error), "exit_code": error.exit_code}
    Path(result_path).write_text(json.dumps(result, default=str))  # datetimes as text
    sys.exit(code)


def load_run_model(run_row: dict, device: torch.device | str = "auto"):
    """The fitted model of a run (a row as `batchrec.runs` returns it, artifact path resolved), on
    `device` ('auto'/'cpu'/'cuda' or a torch device). An artifact in an object store (a URI) is
    downloaded into a temporary folder first."""
    dev = device if isinstance(device, torch.device) else choose_device(device)
    stored = run_row["artifact_path"]
    missing = BatchrecError(
        f"artifact of run {run_row['run_id']} is missing at {stored} (deleted or moved?); "
        f"retrain with `batchrec train {run_row['model']}`"
    )
    if storage.is_remote(stored):
        remote = storage.location(stored)
        if not storage.exists(remote / ARTIFACT_META) or not storage.exists(remote / ARTIFACT_STATE):
            raise missing
        with tempfile.TemporaryDirectory(prefix="batchrec-artifact-") as tmp:
            return Recommender.load(storage.download_dir(remote, Path(tmp)), dev, family=run_row["model"])
    path = Path(stored)
    if not ((path / ARTIFACT_META).exists() and (path / ARTIFACT_STATE).exists()):
        raise missing
    return Recommender.load(path, dev, family=run_row["model"])
