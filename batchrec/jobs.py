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
import re
import time
import tomllib
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, ValidationError, create_model

from batchrec import options
from batchrec.errors import BatchrecError, Gated, Interrupted, as_fault
from batchrec.processes import this_process
from batchrec.runs import latest_shipped_run_id
from batchrec.serving import refresh as refresh_serving
from batchrec.warehouse import Warehouse, scalar, utcnow

log = logging.getLogger("batchrec.jobs")

STEP_KINDS = ("ingest", "features", "train", "tune", "score", "evaluate")

# Keys each step kind accepts in a job file: the command line's options (batchrec.options).
STEP_OPTIONS: dict[str, dict[str, options.Option]] = {
    "ingest": {
        "path": options.INGEST_PATH,
        "dataset": options.INGEST_DATASET,
        "format": options.INGEST_FORMAT,
        "quarantine": options.INGEST_QUARANTINE,
        "columns": options.INGEST_COLUMNS,
    },
    "features": {
        "as_of": options.FEATURES_AS_OF,
        "protocols": options.FEATURES_PROTOCOLS,
        "params": options.FEATURES_PARAMS,
        "keep": options.FEATURES_KEEP,
    },
    "train": {
        "model": options.TRAIN_MODEL,
        "protocol": options.TRAIN_PROTOCOL,
        "params": options.TRAIN_PARAMS,
        "device": options.DEVICE,
        "nproc": options.TRAIN_NPROC,
    },
    "tune": {
        "model": options.TUNE_MODEL,
        "protocol": options.TUNE_PROTOCOL,
        "trials": options.TUNE_TRIALS,
        "timeout": options.TUNE_TIMEOUT,
        "metric": options.TUNE_METRIC,
        "seed": options.TUNE_SEED,
        "params": options.TUNE_PARAMS,
        "device": options.DEVICE,
    },
    "score": {
        "model": options.SCORE_MODEL,
        "top_n": options.TOP_N,
        "memory_budget": options.MEMORY_BUDGET,
        "retention_days": options.RETENTION_DAYS,
        "device": options.DEVICE,
        "gate_metric": options.GATE_METRIC,
        "gate_tolerance": options.GATE_TOLERANCE,
        "gate_protocol": options.GATE_PROTOCOL,
        "executor": options.EXECUTOR,
        "ray_address": options.RAY_ADDRESS,
        "shards": options.SHARDS,
        "shards_uri": options.SHARDS_URI,
        "task_cpus": options.TASK_CPUS,
        "task_gpus": options.TASK_GPUS,
    },
    "evaluate": {
        "models": options.EVALUATE_MODELS,
        "protocol": options.EVALUATE_PROTOCOL,
        "k": options.EVALUATE_KS,
        "report": options.EVALUATE_REPORT,
        "threshold": options.EVALUATE_THRESHOLD,
        "bootstrap": options.EVALUATE_BOOTSTRAP,
        "seed": options.EVALUATE_SEED,
        "executor": options.EXECUTOR,
        "ray_address": options.RAY_ADDRESS,
        "task_cpus": options.TASK_CPUS,
        "task_gpus": options.TASK_GPUS,
    },
}

# One pydantic model per step kind: strict types (TOML already has them: "10" is not 10) and no
# unknown keys.
STEP_SCHEMAS: dict[str, type[BaseModel]] = {
    kind: create_model(
        f"{kind}_step",
        __config__=ConfigDict(extra="forbid", strict=True),
        step=(str, ...),
        name=(Optional[str], None),  # noqa: UP045 (a runtime type for pydantic)
        **{key: option.field() for key, option in opts.items()},
    )
    for kind, opts in STEP_OPTIONS.items()
}


@dataclass
class StepResult:
    summary: str
    rows: int | None = None


def load_job(path: str | Path) -> tuple[str, list[dict]]:
    """Parse and check a job file; every problem is one line naming the file, line, step and key.

    Returns the job's name and its steps as dicts: kind, name and every option (defaults filled in).
    """
    path = Path(path)
    text = path.read_text()
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise BatchrecError(f"{path}: not valid TOML: {exc}") from None
    job = doc.get("job", {})
    name = (job.get("name") if isinstance(job, dict) else None) or path.stem
    if not isinstance(name, str):
        raise BatchrecError(f"{path}: [job] name = {name!r} is not valid (expected a string)")
    steps = doc.get("steps")
    if not isinstance(steps, list) or not steps or not all(isinstance(s, dict) for s in steps):
        raise BatchrecError(f"{path}: expected at least one [[steps]] table")
    checked = []
    for n, step in enumerate(steps, 1):
        kind = step.get("step")
        if kind not in STEP_KINDS:
            raise BatchrecError(
                f"{path}:{_line_of(text, n, 'step')}: step {n} has step = {kind!r}; "
                f"expected one of {', '.join(STEP_KINDS)}"
            )
        try:
            opts = STEP_SCHEMAS[kind].model_validate(step).model_dump(exclude={"step"})
        except ValidationError as exc:
            raise BatchrecError(_schema_error(path, text, n, kind, step, exc.errors()[0])) from None
        checked.append({**opts, "kind": kind, "name": opts["name"] or kind})
    return name, checked


def _line_of(text: str, step: int, key: str | None) -> int:
    """Line (1-based) of `key` in the `step`-th [[steps]] table (its header when the key is absent)."""
    lines = text.splitlines()
    headers = [i for i, line in enumerate(lines) if re.match(r"\s*\[\[\s*steps\s*\]\]", line)]
    if len(headers) < step:
        return 1
    start = headers[step - 1]
    end = headers[step] if step < len(headers) else len(lines)
    for i in range(start + 1, end):
        if key is not None and re.match(rf"\s*\"?{re.escape(key)}\"?\s*=", lines[i]):
            return i + 1
    return start + 1


def _schema_error(path: Path, text: str, n: int, kind: str, step: dict, error: dict) -> str:
    """One line for the first pydantic error of step `n`: file:line, step, key, value, expectation."""
    key = str(error["loc"][0]) if error["loc"] else None
    where = f"{path}:{_line_of(text, n, key)}: step {n} ({kind})"
    valid = ", ".join(STEP_OPTIONS[kind])
    if error["type"] == "extra_forbidden":
        return f"{where} has unknown option {key!r} (expected one of: {valid})"
    if error["type"] == "missing":
        return f'{where} needs {key} = "..." ({STEP_OPTIONS[kind][key].help})'
    expected = re.sub(r"^Input should be ", "", error["msg"])
    return f"{where}: {key} = {step.get(key)!r} is not valid (expected {expected})"


# -- input fingerprints ------------------------------------------------------------------------
def _digest(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _raw_state(wh: Warehouse) -> str:
    """What the raw tables hold: every ingest that loaded rows changes it."""
    if not wh.path.exists():
        return "empty"
    with wh.connect(read_only=True) as con:
        return _digest(
            con.sql("SELECT count(*), max(finished_at), sum(rows_loaded) FROM ingest_log").fetchall()
        )


def _latest(wh: Warehouse, sql: str, params: list | None = None) -> Any:
    if not wh.path.exists():
        return None
    with wh.connect(read_only=True) as con:
        return scalar(con, sql, params)


def _has_table(wh: Warehouse, name: str) -> bool:
    return bool(_latest(wh, "SELECT count(*) FROM information_schema.tables WHERE table_name = ?", [name]))


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
        # params = "tuned": a new tuned setting is a new input
        tuned = (
            _latest(wh, "SELECT max(tuned_at) FROM tuned_params WHERE family = ?", [step["model"]])
            if step["params"] == "tuned" and _has_table(wh, "tuned_params")
            else None
        )
        return _digest(kind, opts, snapshot, tuned)
    if kind == "tune":
        return _digest(kind, opts, snapshot)
    run = None
    if wh.path.exists():  # the run the step would publish or measure against: the registry's answer
        with wh.connect(read_only=True) as con:
            run = latest_shipped_run_id(con, step.get("model"))
    return _digest(kind, opts, snapshot, run)


# -- step runners ------------------------------------------------------------------------------
def _run_ingest(wh: Warehouse, s: dict) -> StepResult:
    from batchrec.ingest import ingest_path

    return StepResult(
        ingest_path(
            wh,
            path=s["path"],
            dataset=s["dataset"],
            fmt=s["format"],
            quarantine=s["quarantine"],
            columns=s["columns"],
        )
    )


def _run_features(wh: Warehouse, s: dict) -> StepResult:
    from batchrec.features import build_snapshot

    return StepResult(
        build_snapshot(
            wh, as_of=s["as_of"], protocols=s["protocols"], params=tuple(s["params"]), keep=s["keep"]
        )
    )


def _run_train(wh: Warehouse, s: dict) -> StepResult:
    from batchrec.train import train_model

    tuned = s["params"] == "tuned"
    return StepResult(
        train_model(
            wh,
            s["model"],
            snapshot="latest",
            protocol=s["protocol"],
            params=() if tuned else tuple(s["params"]),
            device=s["device"],
            tuned=tuned,
            nproc=s["nproc"],
        )
    )


def _run_tune(wh: Warehouse, s: dict) -> StepResult:
    from batchrec.tune import tune

    result = tune(
        wh,
        s["model"],
        s["protocol"],
        s["trials"],
        s["timeout"],
        s["metric"],
        s["seed"],
        params=tuple(s["params"]),
        device=s["device"],
    )
    return StepResult(result.summary(), result.trials)


def _run_score(wh: Warehouse, s: dict) -> StepResult:
    from batchrec.gate import GateSettings
    from batchrec.scoring import score_command

    gate = GateSettings(
        metric=s["gate_metric"], tolerance=s["gate_tolerance"], protocol=s["gate_protocol"], force=s["force"]
    )
    summary = score_command(
        wh,
        run_id=None,
        model=s["model"],
        top_n=s["top_n"],
        shard=None,
        publish_run=None,
        users_file=None,
        pairs=None,
        out=None,
        memory_budget=s["memory_budget"],
        retention_days=s["retention_days"],
        device=s["device"],
        gate=gate,
        executor=s["executor"],
        ray_address=s["ray_address"],
        shards=s["shards"],
        shards_uri=s["shards_uri"],
        task_cpus=s["task_cpus"],
        task_gpus=s["task_gpus"],
    )
    return StepResult(summary, _latest(wh, "SELECT count(*) FROM recommendations"))


def _run_evaluate(wh: Warehouse, s: dict) -> StepResult:
    from batchrec.evaluate import evaluate_command

    return StepResult(
        evaluate_command(
            wh,
            runs=None,
            models=s["models"],
            protocol=s["protocol"],
            ks=s["k"],
            report_dir=s["report"],
            compare=True,
            threshold=s["threshold"],
            bootstrap=s["bootstrap"],
            seed=s["seed"],
            executor=s["executor"],
            ray_address=s["ray_address"],
            task_cpus=s["task_cpus"],
            task_gpus=s["task_gpus"],
        )
    )


RUNNERS: dict[str, Callable[[Warehouse, dict], StepResult]] = {
    "ingest": _run_ingest,
    "features": _run_features,
    "train": _run_train,
    "tune": _run_tune,
    "score": _run_score,
    "evaluate": _run_evaluate,
}


# -- the job -----------------------------------------------------------------------------------
def _mark_killed(wh: Warehouse) -> list[str]:
    """Mark steps left `running` by a job process that was killed as failed ("killed: ...").

    The caller holds the writer lock, and a job holds it from its first step to its last, so
    every `running` row is then stale: its process ended without recording the outcome. Returns
    the marked steps, as "job_run_id step"."""
    if not wh.path.exists():
        return []
    with wh.connect() as con:
        stale = con.execute(
            "SELECT job_run_id, step, pid, host FROM job_runs WHERE status = 'running' ORDER BY started"
        ).fetchall()
        for job_run_id, step, pid, host in stale:  # a handful of rows at most
            who = f"process {pid} on {host}" if pid is not None else "its process"
            con.execute(
                "UPDATE job_runs SET status = 'failed', finished = ?, error = ? "
                "WHERE job_run_id = ? AND step = ? AND status = 'running'",
                [utcnow(), f"killed: {who} ended while the step was running", job_run_id, step],
            )
    for job_run_id, step, _, _ in stale:
        log.warning("job_run=%s step=%s status=failed error=killed (marked by a later run)", job_run_id, step)
    return [f"{job_run_id} {step}" for job_run_id, step, _, _ in stale]


def _record(wh: Warehouse, row: dict) -> None:
    with wh.connect() as con:
        con.execute(
            "DELETE FROM job_runs WHERE job_run_id = ? AND step = ?", [row["job_run_id"], row["step"]]
        )
        con.execute(
            f"INSERT INTO job_runs ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})",
            list(row.values()),
        )


def _already_done(wh: Warehouse, job: str, step: str, inputs: str) -> bool:
    return bool(
        _latest(
            wh,
            "SELECT count(*) FROM job_runs WHERE job = ? AND step = ? AND inputs = ? AND status = 'ok'",
            [job, step, inputs],
        )
    )


@contextmanager
def _serving_refreshed_after(wh: Warehouse) -> Iterator[None]:
    """Rebuild the serving database when the job ends, however it ends, so readers see its
    `job_runs` rows (each step already refreshed it after its own publish). A failure to do so
    is logged and never hides the job's own outcome."""
    try:
        yield
    finally:
        if wh.path.exists():
            try:
                refresh_serving(wh)
            except BatchrecError as exc:
                log.error("job serving refresh failed: %s", exc)


def _step_failed(job: str, name: str, exc: BaseException) -> BaseException:
    """What a failed step raises: one line naming the job and step, with the cause's exit code
    (75 busy, 74 a machine fault, ...); an interrupt goes on as it is (the CLI reports it)."""
    error = exc if isinstance(exc, BatchrecError) else as_fault(exc)
    if error is None or isinstance(error, Interrupted):
        return exc
    failed = BatchrecError(f"job {job} failed at step {name}: {error}")
    failed.exit_code = error.exit_code
    return failed


def run_job(wh: Warehouse, job_file: str | Path, force: bool = False) -> str:
    """Run a job file's steps in order under one writer lock; stop at the first failure.

    Each step's row in `job_runs` names the process running it; steps that an earlier, killed
    job left `running` are marked failed first (`_mark_killed`). `force` publishes past the
    publish gate; a refused publish is recorded `gated` and ends the job with the gate's exit code
    (3).
    """
    job, steps = load_job(job_file)
    job_run_id = f"{job}-{utcnow():%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:6]}"
    lines = []
    with wh.lock(f"run {job}"), _serving_refreshed_after(wh):
        killed = _mark_killed(wh)
        if killed:
            lines.append(f"marked {len(killed)} step(s) of killed job runs as failed: {', '.join(killed)}")
        for n, step in enumerate(steps, 1):
            name = f"{n}:{step['name']}"
            started, t0 = utcnow(), time.perf_counter()
            row = {
                "job_run_id": job_run_id,
                "job": job,
                "step": name,
                "started": started,
                "finished": None,
                "status": "running",
                "rows": None,
                "inputs": None,
                "error": None,
                **this_process(),
            }
            try:
                row["inputs"] = _fingerprint(wh, step)
                if _already_done(wh, job, name, row["inputs"]):
                    row.update(status="skipped", finished=utcnow())
                    _record(wh, row)
                    lines.append(f"{name}: skipped (inputs unchanged since its last successful run)")
                    log.info("job=%s step=%s status=skipped inputs=%s", job, name, row["inputs"])
                    continue
                _record(wh, row)
                # readers (`status`) see the step running, so a kill -9 now shows as "failed (killed)"
                refresh_serving(wh)
                result = RUNNERS[step["kind"]](wh, {**step, "force": force})  # force: not an input
            except BaseException as exc:  # KeyboardInterrupt too: the step did not finish
                interrupted = not isinstance(exc, Exception)
                row.update(
                    status="gated" if isinstance(exc, Gated) else "failed",
                    finished=utcnow(),
                    error="interrupted (SIGINT)" if interrupted else f"{type(exc).__name__}: {exc}",
                )
                _record(wh, row)
                log.error(
                    "job=%s step=%s status=%s seconds=%.2f error=%s",
                    job,
                    name,
                    row["status"],
                    time.perf_counter() - t0,
                    row["error"],
                )
                failed = _step_failed(job, name, exc)
                if failed is exc:
                    raise
                raise failed from None
            row.update(status="ok", finished=utcnow(), rows=result.rows)
            _record(wh, row)
            log.info("job=%s step=%s status=ok seconds=%.2f", job, name, time.perf_counter() - t0)
            lines.append(f"{name}: {result.summary}")
    return "\n".join(lines + [f"job {job} ({job_run_id}) finished: {len(steps)} steps"])
