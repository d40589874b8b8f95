"""`batchrec run JOB.toml`: run the steps a job file lists, recording each in `job_runs`.

A job file is TOML: a `[job]` table (name) and an ordered list of `[[steps]]`, each with a
`step` kind (ingest, features, train, score, evaluate) and that step's options (the same names
as the CLI options). See jobs/nightly.toml.

Resume: every step computes a fingerprint of its inputs (files' checksums, the raw tables' state,
the snapshot, the run). A step whose fingerprint already finished `ok` in an earlier run of the
same job is skipped (status `skipped`) instead of repeated, so re-running a job after a failure
picks up where it stopped, and a nightly run with no new data does no new work. Each step
publishes atomically itself, so a failing step leaves every published table as it was; the job
stops there with a non-zero exit.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import tomllib
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from batchrec.errors import BatchrecError
from batchrec.warehouse import Warehouse, scalar, utcnow

log = logging.getLogger("batchrec.jobs")

STEP_KINDS = ("ingest", "features", "train", "score", "evaluate")

# Options each step kind accepts in a job file, with defaults.
STEP_OPTIONS: dict[str, dict[str, Any]] = {
    "ingest": {"path": None, "dataset": None, "format": "auto", "quarantine": False, "columns": None},
    "features": {"as_of": None, "protocols": "all", "params": [], "keep": 5},
    "train": {"model": None, "protocol": None, "params": [], "device": "auto"},
    "score": {"model": None, "top_n": 10, "memory_budget": "1GB", "retention_days": 30, "device": "auto"},
    "evaluate": {"models": None, "protocol": "user_temporal", "k": "5,10,20", "report": "reports",
                 "threshold": 4.0},
}


@dataclass
class StepResult:
    summary: str
    rows: int | None = None


def load_job(path: str | Path) -> tuple[str, list[dict]]:
    """Parse and check a job file; every problem is one line naming the file and step."""
    path = Path(path)
    try:
        doc = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise BatchrecError(f"{path}: not valid TOML: {exc}") from None
    name = doc.get("job", {}).get("name") or path.stem
    steps = doc.get("steps")
    if not isinstance(steps, list) or not steps:
        raise BatchrecError(f"{path}: expected at least one [[steps]] table")
    checked = []
    for n, step in enumerate(steps, 1):
        kind = step.get("step")
        if kind not in STEP_KINDS:
            raise BatchrecError(f"{path}: step {n} has step = {kind!r}; expected one of {', '.join(STEP_KINDS)}")
        unknown = sorted(set(step) - set(STEP_OPTIONS[kind]) - {"step", "name"})
        if unknown:
            raise BatchrecError(f"{path}: step {n} ({kind}) has unknown option {unknown[0]!r}; "
                                f"valid: {', '.join(STEP_OPTIONS[kind])}")
        opts = {**STEP_OPTIONS[kind], **{k: v for k, v in step.items() if k not in ("step", "name")}}
        if kind in ("train",) and not opts["model"]:
            raise BatchrecError(f"{path}: step {n} (train) needs model = \"...\"")
        checked.append({"kind": kind, "name": step.get("name", kind), **opts})
    return name, checked


# -- input fingerprints ------------------------------------------------------------------------
def _digest(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _raw_state(wh: Warehouse) -> str:
    """What the raw tables hold: every ingest that loaded rows changes it."""
    if not wh.path.exists():
        return "empty"
    with wh.connect(read_only=True) as con:
        return _digest(con.sql("SELECT count(*), max(finished_at), sum(rows_loaded) FROM ingest_log").fetchall())


def _latest(wh: Warehouse, sql: str, params: list | None = None) -> Any:
    if not wh.path.exists():
        return None
    with wh.connect(read_only=True) as con:
        return scalar(con, sql, params)


def _ingest_files(opts: dict) -> list[Path]:
    if opts["dataset"]:
        root = Path(__file__).resolve().parent / "datasets" / opts["dataset"]
    else:
        root = Path(opts["path"])
    if not root.exists():
        raise BatchrecError(f"ingest path {root} does not exist")
    return sorted(p for p in ([root] if root.is_file() else root.rglob("*")) if p.is_file())


def _fingerprint(wh: Warehouse, step: dict) -> str:
    kind = step["kind"]
    opts = {k: v for k, v in step.items() if k not in ("kind", "name")}
    if kind == "ingest":
        files = [(str(p), hashlib.sha256(p.read_bytes()).hexdigest()) for p in _ingest_files(step)]
        return _digest(kind, opts, files)
    if kind == "features":
        # as_of "now" is pinned to the raw data: a new snapshot only when the raw data changed.
        return _digest(kind, opts, _raw_state(wh))
    snapshot = _latest(wh, "SELECT snapshot_id FROM feature_snapshots ORDER BY created_at DESC LIMIT 1")
    if kind == "train":
        return _digest(kind, opts, snapshot)
    run = _latest(wh, "SELECT run_id FROM model_runs WHERE protocol IS NULL AND (? IS NULL OR model = ?) "
                      "ORDER BY created_at DESC LIMIT 1", [step.get("model"), step.get("model")])
    return _digest(kind, opts, snapshot, run)


# -- step runners ------------------------------------------------------------------------------
def _run_ingest(wh: Warehouse, s: dict) -> StepResult:
    from batchrec.ingest import ingest_path

    return StepResult(ingest_path(wh, path=s["path"], dataset=s["dataset"], fmt=s["format"],
                                  quarantine=s["quarantine"], columns=s["columns"]))


def _run_features(wh: Warehouse, s: dict) -> StepResult:
    from batchrec.features import build_snapshot

    return StepResult(build_snapshot(wh, as_of=s["as_of"], protocols=s["protocols"], params=tuple(s["params"]),
                                     keep=s["keep"]))


def _run_train(wh: Warehouse, s: dict) -> StepResult:
    from batchrec.train import train_model

    return StepResult(train_model(wh, s["model"], snapshot="latest", protocol=s["protocol"],
                                  params=tuple(s["params"]), device=s["device"]))


def _run_score(wh: Warehouse, s: dict) -> StepResult:
    from batchrec.score import score_command

    summary = score_command(wh, run_id=None, model=s["model"], top_n=s["top_n"], shard=None, publish_run=None,
                            users_file=None, pairs=None, out=None, memory_budget=s["memory_budget"],
                            retention_days=s["retention_days"], device=s["device"])
    return StepResult(summary, _latest(wh, "SELECT count(*) FROM recommendations"))


def _run_evaluate(wh: Warehouse, s: dict) -> StepResult:
    from batchrec.evaluate import evaluate_command

    return StepResult(evaluate_command(wh, runs=None, models=s["models"], protocol=s["protocol"], ks=s["k"],
                                       report_dir=s["report"], compare=True, threshold=s["threshold"]))


RUNNERS: dict[str, Callable[[Warehouse, dict], StepResult]] = {
    "ingest": _run_ingest, "features": _run_features, "train": _run_train, "score": _run_score,
    "evaluate": _run_evaluate,
}


# -- the job -----------------------------------------------------------------------------------
def _record(wh: Warehouse, row: dict) -> None:
    with wh.connect() as con:
        con.execute("DELETE FROM job_runs WHERE job_run_id = ? AND step = ?", [row["job_run_id"], row["step"]])
        con.execute(f"INSERT INTO job_runs ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})", list(row.values()))


def _already_done(wh: Warehouse, job: str, step: str, inputs: str) -> bool:
    return bool(_latest(wh, "SELECT count(*) FROM job_runs WHERE job = ? AND step = ? AND inputs = ? AND status = 'ok'",
                        [job, step, inputs]))


def run_job(wh: Warehouse, job_file: str | Path) -> str:
    """Run a job file's steps in order under one writer lock; stop at the first failure."""
    job, steps = load_job(job_file)
    job_run_id = f"{job}-{utcnow():%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:6]}"
    lines = []
    with wh.lock(f"run {job}"):
        for n, step in enumerate(steps, 1):
            name = f"{n}:{step['name']}"
            started, t0 = utcnow(), time.perf_counter()
            row = {"job_run_id": job_run_id, "job": job, "step": name, "started": started, "finished": None,
                   "status": "running", "rows": None, "inputs": None, "error": None}
            try:
                row["inputs"] = _fingerprint(wh, step)
                if _already_done(wh, job, name, row["inputs"]):
                    row.update(status="skipped", finished=utcnow())
                    _record(wh, row)
                    lines.append(f"{name}: skipped (inputs unchanged since its last successful run)")
                    log.info("job=%s step=%s status=skipped inputs=%s", job, name, row["inputs"])
                    continue
                _record(wh, row)
                result = RUNNERS[step["kind"]](wh, step)
            except Exception as exc:
                row.update(status="failed", finished=utcnow(), error=f"{type(exc).__name__}: {exc}")
                _record(wh, row)
                log.error("job=%s step=%s status=failed seconds=%.2f error=%s", job, name,
                          time.perf_counter() - t0, exc)
                if isinstance(exc, BatchrecError):
                    raise BatchrecError(f"job {job} failed at step {name}: {exc}") from None
                raise
            row.update(status="ok", finished=utcnow(), rows=result.rows)
            _record(wh, row)
            log.info("job=%s step=%s status=ok seconds=%.2f", job, name, time.perf_counter() - t0)
            lines.append(f"{name}: {result.summary}")
    return "\n".join(lines + [f"job {job} ({job_run_id}) finished: {len(steps)} steps"])
