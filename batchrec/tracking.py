"""Optional experiment tracking with MLflow (the extra `batchrec[mlflow]`).

Tracking is on when asked for (`--mlflow` on `train`/`evaluate`, `mlflow=True` in the Python API)
or when `MLFLOW_TRACKING_URI` is set (`mlflow=False` turns it off even then); it goes to that URI
(else MLflow's default) under the experiment `$MLFLOW_EXPERIMENT_NAME` or "batchrec". Asked for
without MLflow installed, or with a tracking store that cannot be opened, it is a one-line error
before any work is done. Once a model run or an evaluation is committed to the warehouse, a
failure to log it is a warning, not a failed command: the warehouse is the record, MLflow a copy.

One MLflow run per batchrec model run, tagged `batchrec.run_id`: `train` logs its parameters,
the per-epoch history the trainer recorded, the final validation metrics and the artifact folder;
`evaluate` logs each measured run's test metrics into that run's MLflow run when the tracking
store has one (`<protocol>/<metric>`), else into a new one with the same tag. MLflow names allow
no `@`: `ndcg@10` is logged as `ndcg_at_10`.

`tracking_run`, `log_params`, `log_metrics` and `log_epoch` are the pieces other steps (tuning)
use for their own runs.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from batchrec.errors import BatchrecError, first_line

log = logging.getLogger("batchrec.tracking")

URI_ENV = "MLFLOW_TRACKING_URI"
EXPERIMENT_ENV = "MLFLOW_EXPERIMENT_NAME"
DEFAULT_EXPERIMENT = "batchrec"
RUN_TAG = "batchrec.run_id"
EXTRA = "pip install 'batchrec[mlflow]'"
_BAD_NAME_CHARS = re.compile(r"[^\w\-. :/]")
_MAX_PARAM_LENGTH = 6000  # MLflow's limit on a parameter value (older servers: 500; values are short here)


def wanted(flag: bool | None) -> bool:
    """Whether to track: the flag when given (True / False), else whether MLFLOW_TRACKING_URI is set."""
    return bool(os.environ.get(URI_ENV)) if flag is None else bool(flag)


def _why(flag: bool | None) -> str:
    return "--mlflow was given" if flag else f"{URI_ENV} is set"


def _mlflow(flag: bool | None = None):
    """The mlflow module; a one-line error naming the extra when it is not installed."""
    try:
        import mlflow  # an optional extra: imported only when tracking is asked for
    except ImportError:
        raise BatchrecError(
            f"MLflow tracking was asked for ({_why(flag)}) but mlflow is not installed "
            f"(expected `{EXTRA}`, or unset {URI_ENV} / drop --mlflow)"
        ) from None
    return mlflow


def experiment_name() -> str:
    return os.environ.get(EXPERIMENT_ENV) or DEFAULT_EXPERIMENT


def start(flag: bool | None) -> bool:
    """Check tracking before a command does any work: False when it is not wanted; True once the
    tracking store is open and the experiment exists. Either failure is one line (BatchrecError)."""
    if not wanted(flag):
        return False
    mlflow = _mlflow(flag)
    try:
        mlflow.set_experiment(experiment_name())
    except Exception as exc:  # any store failure (bad URI, unreachable server, refused backend)
        raise BatchrecError(
            f"MLflow tracking store {mlflow.get_tracking_uri()} cannot be used ({_why(flag)}): "
            f"{first_line(exc)} (expected a reachable tracking URI in {URI_ENV})"
        ) from None
    return True


def metric_key(name: str) -> str:
    """An MLflow-safe name: `ndcg@10` -> `ndcg_at_10`, other characters MLflow refuses -> `_`."""
    return _BAD_NAME_CHARS.sub("_", name.replace("@", "_at_"))


def _existing_run(mlflow, run_id: str) -> str | None:
    """The MLflow run tagged with this batchrec run id in the current experiment, if any."""
    experiment = mlflow.get_experiment_by_name(experiment_name())
    if experiment is None:
        return None
    found = mlflow.MlflowClient().search_runs(
        [experiment.experiment_id], filter_string=f"tags.`{RUN_TAG}` = '{run_id}'", max_results=1
    )
    return found[0].info.run_id if found else None


@contextmanager
def tracking_run(
    name: str,
    *,
    batchrec_run_id: str | None = None,
    tags: Mapping[str, str] | None = None,
    resume: bool = False,
    nested: bool = False,
) -> Iterator[str]:
    """An MLflow run (its id yielded) in the current experiment, tagged with `batchrec_run_id`;
    `resume`: log into the existing MLflow run of that batchrec run when there is one."""
    mlflow = _mlflow(True)
    existing = _existing_run(mlflow, batchrec_run_id) if resume and batchrec_run_id else None
    all_tags = dict(tags or {}) | ({RUN_TAG: batchrec_run_id} if batchrec_run_id else {})
    with mlflow.start_run(
        run_id=existing, run_name=None if existing else name, nested=nested, tags=all_tags
    ) as active:
        yield active.info.run_id


def log_params(params: Mapping[str, Any]) -> None:
    """Parameters of the active run (values as text; None and nested values as JSON-ish text)."""
    mlflow = _mlflow(True)
    mlflow.log_params({metric_key(k): str(v)[:_MAX_PARAM_LENGTH] for k, v in params.items()})


def log_metrics(metrics: Mapping[str, Any], step: int | None = None, prefix: str = "") -> None:
    """Finite numeric metrics of the active run (names made MLflow-safe); the rest skipped."""
    mlflow = _mlflow(True)
    kept = {
        metric_key(prefix + k): float(v)
        for k, v in metrics.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    }
    if kept:
        mlflow.log_metrics(kept, step=step)


def log_epoch(fields: Mapping[str, Any], step: int) -> None:
    """One epoch of a training history (a `Trainer.history` row) as metrics at `step`: `loss`,
    `lr`, the validation metric... (`member{k}/...` for member k > 0 of an ensemble)."""
    member = fields.get("member", 0)
    prefix = f"member{member}/" if member else ""
    log_metrics({k: v for k, v in fields.items() if k not in ("epoch", "member")}, step=step, prefix=prefix)


def log_history(history: list[dict]) -> None:
    """Every epoch of a training history, each at its epoch number."""
    for n, fields in enumerate(history, start=1):
        log_epoch(fields, int(fields.get("epoch", n)))


def _flat(prefix: str, value: Any) -> dict[str, Any]:
    if isinstance(value, Mapping):
        return {k: v for key, inner in value.items() for k, v in _flat(f"{prefix}{key}.", inner).items()}
    return {prefix.rstrip("."): value}


def log_train(row: dict, artifact: Path) -> str | None:
    """Log one committed model run (a `model_runs` row as train records it); returns the MLflow
    run id, or None with a warning when logging failed (the model run itself is recorded)."""
    try:
        with tracking_run(
            f"train {row['run_id']}",
            batchrec_run_id=row["run_id"],
            tags={"batchrec.family": row["model"], "batchrec.kind": "train"},
        ) as mlflow_run:
            log_params(
                _flat("", row["params"])
                | {
                    "family": row["model"],
                    "snapshot_id": row["snapshot_id"],
                    "protocol": row["protocol"] or "all",
                    "device": row["device"],
                }
            )
            log_history(row["metrics"].get("history") or [])
            log_metrics(row["metrics"].get("valid") or {}, prefix="valid/")
            log_metrics({"fit_seconds": row["fit_seconds"], "n_train": row["metrics"].get("n_train")})
            _mlflow(True).log_artifacts(str(artifact), artifact_path="model")
        return mlflow_run
    except BatchrecError:
        raise
    except Exception as exc:
        log.warning(
            "MLflow logging of run %s failed: %s (the run is recorded in the warehouse)",
            row["run_id"],
            first_line(exc),
        )
        return None


def log_evaluation(
    run: dict, protocol: str, metrics: Mapping[str, float], settings: Mapping[str, Any]
) -> str | None:
    """Log one measured run's metrics on `protocol` into its MLflow run (found by tag, else new);
    returns the MLflow run id, or None with a warning when logging failed."""
    try:
        with tracking_run(
            f"evaluate {run['run_id']}",
            batchrec_run_id=run["run_id"],
            resume=True,
            tags={"batchrec.family": run["model"]},
        ) as mlflow_run:
            # settings as tags, not parameters: MLflow refuses a parameter that changes value, and a
            # run may be evaluated again on the same protocol with other cut-offs
            _mlflow(True).set_tags(
                {metric_key(f"batchrec.evaluate/{protocol}/{k}"): str(v) for k, v in settings.items()}
            )
            log_metrics(metrics, prefix=f"{protocol}/")
        return mlflow_run
    except BatchrecError:
        raise
    except Exception as exc:
        log.warning(
            "MLflow logging of the evaluation of run %s failed: %s (the evaluation is recorded in the "
            "warehouse)",
            run["run_id"],
            first_line(exc),
        )
        return None
