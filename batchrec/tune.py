"""`batchrec tune`: search a family's parameters with Optuna on a protocol's validation part.

* The search space is declared beside the family's parameters (`Param(..., search=...)`,
  `models/search.py`); `--param KEY=VALUE` holds a parameter fixed (and out of the search).
* Each trial fits the family on the protocol's train part and measures the metric on its valid
  part, the train part as the users' history (`metrics.validation_metrics`: what `train` reports
  as `valid`). The test part is never loaded (`load_snapshot(..., with_test=False)`), so a
  setting chosen here can be measured on test afterwards without having seen it.
* Sampler: TPE, seeded. Pruner: the median rule over the per-epoch validation values the trainer
  already computes (`Trainer.on_epoch`; the first member of an ensemble); families without a
  per-epoch validation (ease, ials) run every trial to the end.
* Trial 0 of a new study is the family's defaults, so the tuned setting is never worse on
  validation than the defaults, and the table says by how much it is better.
* Every finished trial is one `tuning_trials` row, committed as the trial ends; a study is keyed
  by family, protocol, metric, snapshot and the search space (`study_name`), so running the same
  command again after a kill replays the finished trials into the sampler and runs only the rest.
* The best trial's parameters become the family's tuned setting (`tuned_params`), which
  `batchrec train FAMILY --tuned` and a job's `params = "tuned"` use.

Optuna is an optional extra (`pip install 'batchrec[tune]'`), imported only here, only when tuning.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from batchrec import options
from batchrec.data import load_snapshot
from batchrec.errors import BatchrecError, first_line
from batchrec.features import resolve_snapshot
from batchrec.metrics import validation_metrics
from batchrec.models import available, create_model, get_model_class, parse_params
from batchrec.models.search import Choice, IntRange, SearchSpace, Uniform
from batchrec.serving import refresh as refresh_serving
from batchrec.train import fit_model
from batchrec.training import choose_device
from batchrec.tuned import insert_trial, insert_tuned, latest_tuned, study_trials
from batchrec.warehouse import Warehouse, transaction, utcnow

log = logging.getLogger("batchrec.tune")

RANKING_METRICS = ("ndcg", "recall", "precision", "hit_rate", "map", "mrr")
RATING_METRICS = ("rmse", "mae")
_METRIC = re.compile(
    rf"^(?:(?P<rating>{'|'.join(RATING_METRICS)})|(?P<ranking>{'|'.join(RANKING_METRICS)})@(?P<k>[1-9]\d*))$"
)
# The per-epoch row keys the families' validators log, by the metric they measure.
EPOCH_KEYS = {"ndcg@10": ("valid_ndcg@10", "valid_ndcg"), "rmse": ("valid_rmse",)}
# Median pruning: not before this many trials finished, nor before this many epochs of a trial.
PRUNER_STARTUP_TRIALS, PRUNER_WARMUP_EPOCHS = 4, 5


@dataclass
class TuneResult:
    """What a study found: the best parameters, their validation value against the defaults',
    and how the study's trials went."""

    study: str
    family: str
    protocol: str
    metric: str
    snapshot_id: str
    best_params: dict[str, Any]
    best_value: float
    best_trial: int
    default_value: float | None  # trial 0, the defaults (None if it failed or was pruned)
    trials: int  # finished trials of the study (resumed ones included)
    resumed: int  # of those, finished by an earlier, interrupted run
    pruned: int
    failed: int
    seconds: float  # this run's wall time

    @property
    def higher_is_better(self) -> bool:
        return self.metric not in RATING_METRICS

    def summary(self) -> str:
        chosen = " ".join(f"{k}={_show(v)}" for k, v in self.best_params.items())
        versus = f"defaults {self.default_value:.4f} -> " if self.default_value is not None else ""
        resumed = f", {self.resumed} resumed" if self.resumed else ""
        return (
            f"study {self.study}: {self.trials} trials ({self.pruned} pruned, {self.failed} failed{resumed}) "
            f"in {self.seconds:.0f} s; valid {self.metric} {versus}best {self.best_value:.4f} (trial "
            f"{self.best_trial}); tuned setting of {self.family}: {chosen or 'the defaults'} "
            f"(`batchrec train {self.family} --tuned`); test part not read"
        )


def _show(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _optuna():
    try:
        import optuna
    except ImportError:
        raise BatchrecError(
            "batchrec tune needs Optuna, which is not installed "
            "(expected the extra: pip install 'batchrec[tune]')"
        ) from None
    # The trial lines are ours (key=value; a failed trial's one names its error): Optuna's own would add a
    # traceback for each failed trial.
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    return optuna


def resolve_metric(metric: str | None, family: str, task: str) -> str:
    """The metric a study optimises: as given (checked), else ndcg@10 for rankers, rmse for
    rating models."""
    if metric is None:
        return "rmse" if task == "rating" else "ndcg@10"
    found = _METRIC.match(metric.strip().lower())
    if found is None:
        raise BatchrecError(
            f"--metric {metric!r} is not a tuning metric (expected rmse, mae or "
            f"{'/'.join(RANKING_METRICS)}@K, e.g. ndcg@10)"
        )
    if found["rating"] and task != "rating":
        raise BatchrecError(
            f"--metric {found['rating']}: {family} ranks items and predicts no ratings "
            "(expected a ranking metric such as ndcg@10)"
        )
    return found.group(0)


def distribution(optuna, space: SearchSpace):
    """The Optuna distribution of a declared search space."""
    if isinstance(space, Uniform):
        return optuna.distributions.FloatDistribution(space.low, space.high, log=space.log)
    if isinstance(space, IntRange):
        return optuna.distributions.IntDistribution(space.low, space.high, log=space.log, step=space.step)
    if isinstance(space, Choice):
        return optuna.distributions.CategoricalDistribution(space.options)
    raise BatchrecError(f"unknown search space {space!r} (expected Uniform, IntRange or Choice)")


def study_name(
    family: str,
    protocol: str,
    metric: str,
    snapshot_id: str,
    space: dict[str, SearchSpace],
    fixed: dict[str, Any],
    seed: int,
) -> str:
    """The key a study is resumed by: the same family, protocol, metric, snapshot, search space,
    fixed parameters and seed continue one study; any change starts another."""
    what = json.dumps(
        {"space": {k: repr(v) for k, v in sorted(space.items())}, "fixed": fixed, "seed": seed},
        sort_keys=True,
        default=str,
    )
    return f"{family}:{protocol}:{metric}:{snapshot_id}:{hashlib.sha256(what.encode()).hexdigest()[:8]}"


def _fixed_params(family: str, params: dict | Sequence[str] | None) -> dict[str, Any]:
    if params is None:
        return {}
    if isinstance(params, dict):
        create_model(family, params)  # checked as the family checks them
        return dict(params)
    return parse_params(family, tuple(params))


def _replay(optuna, study, rows: list[dict], distributions: dict) -> None:
    """Put the finished trials of an earlier run of the study back into it, in order."""
    states = {
        "complete": optuna.trial.TrialState.COMPLETE,
        "pruned": optuna.trial.TrialState.PRUNED,
        "failed": optuna.trial.TrialState.FAIL,
    }
    for row in rows:
        state = states[row["state"]]
        searched = {k: v for k, v in row["params"].items() if k in distributions}
        study.add_trial(
            optuna.trial.create_trial(
                params=searched,
                distributions={k: distributions[k] for k in searched},
                value=row["value"] if state == optuna.trial.TrialState.COMPLETE else None,
                intermediate_values={int(step): value for step, value in (row["intermediate"] or [])},
                state=state,
            )
        )


def tune(
    warehouse: Warehouse | str | Path,
    family: str,
    protocol: str = options.TUNE_PROTOCOL.default,
    trials: int = options.TUNE_TRIALS.default,
    timeout: float | None = options.TUNE_TIMEOUT.default,
    metric: str | None = options.TUNE_METRIC.default,
    seed: int = options.TUNE_SEED.default,
    *,
    params: dict | Sequence[str] | None = None,
    snapshot: str = options.TRAIN_SNAPSHOT.default,
    device: str = options.DEVICE.default,
) -> TuneResult:
    """Tune `family` on `protocol`'s validation part of a snapshot (see the module docstring) and
    store the best parameters as its tuned setting. `params`: parameters held fixed (a dict or
    KEY=VALUE strings). Bad input is a one-line `BatchrecError` before any trial runs."""
    wh = warehouse if isinstance(warehouse, Warehouse) else Warehouse(warehouse)
    cls = get_model_class(family)
    fixed = _fixed_params(family, params)
    space = {k: v for k, v in cls.search_space().items() if k not in fixed}
    if not space:
        tunable = [f for f in available() if get_model_class(f).search_space()]
        why = (
            "every searched parameter is fixed by --param"
            if cls.search_space()
            else "it declares no search space"
        )
        raise BatchrecError(f"{family} cannot be tuned: {why} (expected one of: {', '.join(tunable)})")
    metric = resolve_metric(metric, family, cls.task)
    if not isinstance(trials, int) or isinstance(trials, bool) or trials < 1:
        raise BatchrecError(f"--trials {trials!r} is not valid (expected a whole number >= 1)")
    if timeout is not None and not (
        isinstance(timeout, (int, float)) and math.isfinite(timeout) and timeout > 0
    ):
        raise BatchrecError(f"--timeout {timeout!r} is not valid (expected a number of seconds > 0)")
    if not isinstance(seed, int) or not options.SEED_MIN <= seed <= options.SEED_MAX:
        raise BatchrecError(
            f"--seed {seed!r} is not valid (expected an integer in [{options.SEED_MIN}, {options.SEED_MAX}])"
        )
    dev = choose_device(device)
    optuna = _optuna()
    started = time.perf_counter()
    with wh.lock("tune"):
        with wh.connect(read_only=True) as con:
            snapshot_id = resolve_snapshot(con, snapshot)
            data = load_snapshot(con, snapshot_id, protocol, with_test=False)  # the test part is never read
        if data.valid is None or len(data.valid) == 0:
            raise BatchrecError(
                f"protocol {protocol!r} of snapshot {snapshot_id} has no validation part to tune on "
                "(expected a protocol with valid rows, e.g. user_temporal or random)"
            )
        name = study_name(family, protocol, metric, snapshot_id, space, fixed, seed)
        with wh.connect() as con:  # read-write: applies the migration that makes the tables
            done = study_trials(con, name)
        distributions = {k: distribution(optuna, s) for k, s in space.items()}
        higher = metric not in RATING_METRICS
        study = optuna.create_study(
            study_name=name,
            direction="maximize" if higher else "minimize",
            # A resumed study reseeds from (seed, finished trials): with the plain seed its sampler
            # would draw the first run's random trials again.
            sampler=optuna.samplers.TPESampler(
                seed=_sampler_seed(seed, len(done)), n_startup_trials=max(3, min(10, trials // 3))
            ),
            pruner=optuna.pruners.MedianPruner(
                n_startup_trials=PRUNER_STARTUP_TRIALS, n_warmup_steps=PRUNER_WARMUP_EPOCHS
            ),
        )
        _replay(optuna, study, done, distributions)
        if not done:
            defaults = {p.name: p.default for p in cls.all_params()}
            study.enqueue_trial({k: defaults[k] for k in space})
        elif len(done) < trials:
            log.info("study=%s resumed=%d remaining=%d", name, len(done), trials - len(done))
        record = _Recorder(wh, name, family, protocol, metric, snapshot_id, fixed)
        if len(done) < trials:
            study.optimize(
                _objective(optuna, family, data, space, fixed, metric, dev, record),
                n_trials=trials - len(done),
                timeout=timeout,
                callbacks=[record],
                catch=(BatchrecError,),
                gc_after_trial=True,
            )
        result = _result(
            optuna,
            study,
            name,
            family,
            protocol,
            metric,
            snapshot_id,
            fixed,
            len(done),
            time.perf_counter() - started,
        )
        _store(wh, result)
    return result


class _Recorder:
    """The study's callback: one `tuning_trials` row per finished trial, committed before the
    next trial starts (a kill -9 loses at most the trial that was running)."""

    def __init__(
        self,
        wh: Warehouse,
        study: str,
        family: str,
        protocol: str,
        metric: str,
        snapshot_id: str,
        fixed: dict,
    ):
        self.wh, self.study, self.family, self.protocol = wh, study, family, protocol
        self.metric, self.snapshot_id, self.fixed = metric, snapshot_id, fixed
        self.intermediate: dict[int, list] = {}  # trial number -> [[step, value], ...] as reported

    def __call__(self, study, trial) -> None:
        state = trial.state.name.lower().replace("fail", "failed")
        steps = self.intermediate.pop(trial.number, [])
        value = trial.value if state == "complete" else steps[-1][1] if state == "pruned" and steps else None
        seconds = trial.duration.total_seconds() if trial.duration is not None else 0.0
        row = {
            "study": self.study,
            "trial": trial.number,
            "family": self.family,
            "protocol": self.protocol,
            "metric": self.metric,
            "snapshot_id": self.snapshot_id,
            "params": trial.params | self.fixed,
            "value": value,
            "state": state,
            "intermediate": steps,
            "error": trial.user_attrs.get("error"),
            "seconds": seconds,
            "finished_at": utcnow(),
        }
        with self.wh.connect() as con, transaction(con, f"tuning trial {trial.number} of {self.study}"):
            insert_trial(con, row)
        shown = "none" if value is None else f"{value:.5g}"
        log.info(
            "study=%s trial=%d state=%s %s=%s seconds=%.1f params=%s%s",
            self.study,
            trial.number,
            state,
            self.metric,
            shown,
            seconds,
            json.dumps(row["params"], separators=(",", ":")),
            f' error="{row["error"]}"' if row["error"] else "",
        )


def _sampler_seed(seed: int, finished: int) -> int:
    """The sampler's seed: `seed` for a new study, one derived from it and the number of trials
    already finished for a resumed one (deterministic, and a stream the first run did not use)."""
    return seed if finished == 0 else int(np.random.SeedSequence([seed, finished]).generate_state(1)[0])


def suggest(trial, name: str, space: SearchSpace) -> Any:
    """One parameter of a trial, drawn from its declared space."""
    if isinstance(space, Uniform):
        return trial.suggest_float(name, space.low, space.high, log=space.log)
    if isinstance(space, IntRange):
        return trial.suggest_int(name, space.low, space.high, step=space.step, log=space.log)
    return trial.suggest_categorical(name, space.options)


def _objective(
    optuna,
    family: str,
    data,
    space: dict[str, SearchSpace],
    fixed: dict,
    metric: str,
    device: torch.device,
    record: _Recorder,
):
    name, _, k = metric.partition("@")
    ks = (int(k),) if k else (10,)
    epoch_keys = EPOCH_KEYS.get(metric, ())

    def objective(trial) -> float:
        params = {k: suggest(trial, k, s) for k, s in space.items()} | fixed
        steps = record.intermediate.setdefault(trial.number, [])

        def report(row: dict) -> None:
            # The first member's curve only: members of an ensemble restart their epochs.
            value = next((row[key] for key in epoch_keys if key in row), None)
            if value is None or "member" in row:
                return
            trial.report(float(value), len(steps))
            steps.append([len(steps), float(value)])
            if trial.should_prune():
                raise optuna.TrialPruned()

        try:
            model, _ = fit_model(
                family, data, params, device, progress=False, on_epoch=report if epoch_keys else None
            )
            value = validation_metrics(model, data, ks=ks).get(metric)
            del model
        except BatchrecError as exc:  # a setting the family cannot fit (e.g. it diverged): a failed trial
            trial.set_user_attr("error", first_line(exc))
            raise
        if value is None or not math.isfinite(value):
            trial.set_user_attr("error", f"validation {metric} is {value}")
            raise BatchrecError(f"validation {metric} is {value}")
        return float(value)

    return objective


def _result(
    optuna,
    study,
    name: str,
    family: str,
    protocol: str,
    metric: str,
    snapshot_id: str,
    fixed: dict,
    resumed: int,
    seconds: float,
) -> TuneResult:
    finished = [t for t in study.trials if t.state.is_finished()]
    complete = [t for t in finished if t.state == optuna.trial.TrialState.COMPLETE]
    failed = [t for t in finished if t.state == optuna.trial.TrialState.FAIL]
    if not complete:
        why = (
            failed[0].user_attrs.get("error", "no reason recorded")
            if failed
            else "none finished in the time given"
        )
        raise BatchrecError(
            f"study {name}: no trial completed ({len(failed)} failed, first: {why}); "
            "nothing was stored as the tuned setting (expected at least one trial to finish)"
        )
    best = study.best_trial
    default = next((t.value for t in complete if t.number == 0), None)
    return TuneResult(
        study=name,
        family=family,
        protocol=protocol,
        metric=metric,
        snapshot_id=snapshot_id,
        best_params=best.params | fixed,
        best_value=float(best.value),
        best_trial=best.number,
        default_value=default,
        trials=len(finished),
        resumed=resumed,
        pruned=sum(t.state == optuna.trial.TrialState.PRUNED for t in finished),
        failed=len(failed),
        seconds=seconds,
    )


def _store(wh: Warehouse, result: TuneResult) -> None:
    """The study's best parameters as the family's tuned setting (unless this study already stored
    exactly that), and the serving copy rebuilt so `batchrec sql` sees the trials."""
    with wh.connect() as con:
        latest = latest_tuned(con, result.family)
        if latest is None or (latest["study"], latest["trials"], latest["params"]) != (
            result.study,
            result.trials,
            json.loads(json.dumps(result.best_params)),
        ):
            with transaction(con, f"tuned setting of {result.family}"):
                insert_tuned(
                    con,
                    {
                        "family": result.family,
                        "tuned_at": utcnow(),
                        "study": result.study,
                        "protocol": result.protocol,
                        "metric": result.metric,
                        "snapshot_id": result.snapshot_id,
                        "params": result.best_params,
                        "value": result.best_value,
                        "default_value": result.default_value,
                        "trials": result.trials,
                    },
                )
    refresh_serving(wh)
