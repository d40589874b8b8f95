"""The Python API: the pipeline as functions, for notebooks and orchestrators (docs/api.md).

Each function is one pipeline step and runs the same code as its `batchrec` command (the CLI is
glue over these and the step functions they call). Every function takes `warehouse=`: a
`Warehouse`, a path, or None for the CLI's default ($BATCHREC_WAREHOUSE, else
warehouse/batchrec.duckdb). Ids are raw ids throughout (users and items as in the ingested
files), never a snapshot's dense indices. Failures raise `BatchrecError`, whose message is the
one line the CLI would print; writes are as safe as the CLI's (one transaction per step, the
writer lock, a failure leaves the warehouse as it was).
"""

from __future__ import annotations

import importlib
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import polars as pl

from batchrec import _API, options, serving, warehouse as store
from batchrec.errors import BatchrecError
from batchrec.evaluate import EVALUATION_COLUMNS, run_evaluation
from batchrec.features import Snapshot, make_snapshot
from batchrec.gate import GateSettings
from batchrec.ingest.run import ingest_path
from batchrec.ingest.sources import ZIP_MAX_RATIO, ZIP_MAX_SIZE
from batchrec.ingest.spec import MAX_FUTURE
from batchrec.models.base import Recommender
from batchrec.runs import find_runs, resolve_run
from batchrec.scoring import load_inputs, parse_memory_budget, recommend as rank_users, score_command
from batchrec.scoring.inputs import check_fits_snapshot, with_unknown_users
from batchrec.scoring.pairs import _lookup, score_pair_frame
from batchrec.train import load_run_model, run_summary, train_run
from batchrec.warehouse import query_pl, utcnow

__all__ = list(_API)  # the names `import batchrec` exposes, listed once in batchrec/__init__.py

RECOMMENDATION_COLUMNS = ("user_id", "rank", "item_id", "score", "reason")
# `evaluations` columns (batchrec.evaluate.EVALUATION_COLUMNS) as polars types
EVALUATION_TYPES = {
    "run_id": pl.Utf8,
    "protocol": pl.Utf8,
    "metric": pl.Utf8,
    "k": pl.Int64,
    "value": pl.Float64,
    "evaluated_at": pl.Datetime("us"),
    "ci_low": pl.Float64,
    "ci_high": pl.Float64,
    "p_vs_best": pl.Float64,
}


class Warehouse(store.Warehouse):
    """A warehouse: the DuckDB file at `path` (None: $BATCHREC_WAREHOUSE, else
    warehouse/batchrec.duckdb) and what lives beside it, named after it (model artifacts in
    `<stem>.artifacts/` unless `artifacts` says elsewhere, the readers' copy
    `<stem>.serving.duckdb`). Nothing is opened until a step needs it."""

    def runs(
        self, family: str | None = None, *, protocol: str | None = None, shipped: bool = False
    ) -> pl.DataFrame:
        """The model runs, newest first (of `family`; on `protocol`; `shipped`: only runs fitted on
        every interaction, the ones `score` publishes by default)."""
        with self.connect(read_only=True) as con:
            rows = find_runs(con, model=family, protocol=protocol, shipped=shipped)
        return pl.DataFrame(
            [
                {
                    "run_id": r["run_id"],
                    "family": r["model"],
                    "protocol": r["protocol"],
                    "snapshot_id": r["snapshot_id"],
                    "created_at": r["created_at"],
                    "fit_seconds": r["fit_seconds"],
                    "params": json.dumps(r["params"], sort_keys=True),
                }
                for r in rows
            ],
            schema={
                "run_id": pl.Utf8,
                "family": pl.Utf8,
                "protocol": pl.Utf8,
                "snapshot_id": pl.Utf8,
                "created_at": pl.Datetime("us"),
                "fit_seconds": pl.Float64,
                "params": pl.Utf8,
            },
        )

    def run(self, run_id: str = "latest", *, family: str | None = None) -> Run:
        """One run by id, or 'latest' (of `family`)."""
        with self.connect(read_only=True) as con:
            return Run(resolve_run(con, run_id, family), self)

    def sql(self, query: str, params: Mapping[str, Any] | None = None) -> pl.DataFrame:
        """A read-only query on what readers see (the serving copy, as `batchrec sql` reads it)."""
        with serving.connect(self) as con:
            return query_pl(con, query, dict(params or {}))


def _warehouse(warehouse: Warehouse | store.Warehouse | str | os.PathLike | None) -> Warehouse:
    if isinstance(warehouse, Warehouse):
        return warehouse
    if isinstance(warehouse, store.Warehouse):
        return Warehouse(warehouse.path, artifacts=warehouse.artifacts_dir)
    return Warehouse(warehouse)


class Run:
    """One fitted model run (a `model_runs` row) and its model, loaded on first use.

    `recommend` and `predict` answer in raw ids with the same code `batchrec score` publishes
    with, so a user's `recommend` list is the list `score` would write for this run."""

    def __init__(
        self, row: dict, warehouse: Warehouse, mlflow_run_id: str | None = None, summary: str | None = None
    ):
        self._row = row
        self.warehouse = warehouse
        self.mlflow_run_id = mlflow_run_id  # set when `train` logged it to MLflow
        self._summary = summary
        self._model: Recommender | None = None

    run_id = property(lambda self: self._row["run_id"], doc="The run's id.")
    family = property(lambda self: self._row["model"], doc="Its model family.")
    protocol = property(
        lambda self: self._row["protocol"],
        doc="The protocol whose train part it was fitted on; None: every interaction (shipped).",
    )
    snapshot_id = property(
        lambda self: self._row["snapshot_id"], doc="The feature snapshot it was fitted on."
    )
    params = property(lambda self: dict(self._row["params"]), doc="Its parameters, defaults included.")
    created_at = property(lambda self: self._row["created_at"], doc="When it was recorded (UTC).")
    artifact_path = property(lambda self: self._row["artifact_path"], doc="Its model artifact folder.")
    shipped = property(lambda self: self._row["protocol"] is None, doc="Fitted on every interaction.")

    @property
    def valid_metrics(self) -> dict[str, float]:
        """The metrics on the protocol's valid part measured after fitting (empty for shipped runs)."""
        return dict(self._row["metrics"].get("valid") or {})

    @property
    def history(self) -> pl.DataFrame:
        """The training curve: one row per epoch (loss, validation metric, seconds), as the trainer logged it."""
        return pl.DataFrame(self._row["metrics"].get("history") or [])

    def __repr__(self) -> str:
        return f"Run({self.run_id!r}, family={self.family!r}, protocol={self.protocol!r})"

    def __str__(self) -> str:
        """The line `batchrec train` prints for it."""
        return self._summary or run_summary(self._row | {"mlflow_run_id": self.mlflow_run_id})

    @property
    def model(self) -> Recommender:
        """The fitted model (`Recommender`; dense indices inside: use `recommend`/`predict` for raw ids)."""
        if self._model is None:
            self._model = load_run_model(self._row, options.DEVICE.default)
        return self._model

    def recommend(
        self,
        user_ids: int | Iterable[int],
        n: int = options.TOP_N.default,
        *,
        memory_budget: str = options.MEMORY_BUDGET.default,
        explain: bool = True,
    ) -> pl.DataFrame:
        """Each user's top-`n` (user_id, rank, item_id, score, reason), sorted by user and rank:
        seen items removed; users the model cannot serve get the genre/tag-profile list, users
        the warehouse knows nothing about (even ids it has never seen) the popular items, as
        `batchrec score` serves them. Reads the warehouse (read-only) each call; writes nothing."""
        ids = _ids(user_ids, "user_ids")
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise BatchrecError(f"n: {n!r} is not a list length (expected an integer >= 1)")
        budget = parse_memory_budget(memory_budget)
        model = self.model
        with self.warehouse.connect(read_only=True) as con:
            inputs = load_inputs(con, self._row)
        check_fits_snapshot(model, self._row, inputs.n_model_users, len(inputs.item_ids))
        known = int(inputs.candidates.sum())
        if n > known:
            raise BatchrecError(
                f"n: {n} is larger than the catalogue (expected at most {known}: run {self.run_id} "
                f"knows {known} items)"
            )
        inputs = with_unknown_users(inputs, ids)
        rows = np.sort(_lookup(inputs.user_ids, ids))
        frame, _ = rank_users(model, inputs, rows, int(n), budget, self.run_id, utcnow(), explain=explain)
        return frame.select(RECOMMENDATION_COLUMNS)

    def predict(
        self, pairs: pl.DataFrame | Mapping[str, Sequence[int]] | Iterable[tuple[int, int]]
    ) -> pl.DataFrame:
        """Scores of (user_id, item_id) pairs: a frame with those columns (others kept), a dict of
        the two columns, or (user, item) tuples. Adds `score` and `fallback` (True where the
        model does not know the user or the item and its fallback scored it), rows in order."""
        frame = _pairs(pairs)
        with self.warehouse.connect(read_only=True) as con:
            return score_pair_frame(self.model, self._row, con, frame, "pairs")


def _ids(values: int | Iterable[int], what: str) -> np.ndarray:
    """Unique integer ids from an int, a list, an array or a Series; one-line error otherwise."""
    if isinstance(values, (int, np.integer)) and not isinstance(values, bool):
        values = [values]
    try:
        array = np.asarray(values if isinstance(values, (np.ndarray, pl.Series)) else list(values))
    except TypeError:
        raise BatchrecError(f"{what}: {values!r} is not a list of ids (expected integers)") from None
    if array.size and array.dtype.kind not in "iu":
        raise BatchrecError(f"{what}: {array.tolist()[:5]!r} are not integer ids (expected integers)")
    return np.unique(array.astype(np.int64))


def _pairs(pairs) -> pl.DataFrame:
    if isinstance(pairs, pl.DataFrame):
        return pairs
    if isinstance(pairs, Mapping):
        return pl.DataFrame(dict(pairs))
    rows = list(pairs)
    if any(not isinstance(p, (tuple, list)) or len(p) != 2 for p in rows[:1]):
        raise BatchrecError(
            f"pairs: {rows[0]!r} is not a (user_id, item_id) pair (expected a frame with user_id "
            "and item_id columns, or (user, item) tuples)"
        )
    return pl.DataFrame(rows, schema={"user_id": pl.Int64, "item_id": pl.Int64}, orient="row")


def _strings(values: Mapping[str, Any] | Sequence[str] | str | None) -> tuple[str, ...]:
    """KEY=VALUE strings (what the command line passes) from a dict or a list of them."""
    if values is None:
        return ()
    if isinstance(values, str):
        return (values,)
    if isinstance(values, Mapping):
        return tuple(f"{k}={v}" for k, v in values.items())
    return tuple(values)


# -- the steps ---------------------------------------------------------------------------------
def ingest(
    path: str | os.PathLike | None = None,
    *,
    dataset: str | None = None,
    format: str = "auto",
    quarantine: bool = False,
    columns: str | None = None,
    rating_scale: str | None = None,
    max_future: str = MAX_FUTURE,
    zip_max_size: str = ZIP_MAX_SIZE,
    zip_max_ratio: str | float = ZIP_MAX_RATIO,
    warehouse: Warehouse | str | os.PathLike | None = None,
) -> str:
    """Load raw files (a file, folder or zip: any MovieLens release, or generic CSV/Parquet with
    `format="generic"` and `columns`) or an embedded `dataset` ("ml-latest-small"); returns the
    summary line `batchrec ingest` prints. Options as on the command line."""
    if (path is None) == (dataset is None):
        raise BatchrecError("give exactly one of PATH or --dataset")
    return ingest_path(
        _warehouse(warehouse),
        path=None if path is None else str(path),
        dataset=dataset,
        fmt=format,
        quarantine=quarantine,
        columns=columns,
        rating_scale=rating_scale,
        max_future=max_future,
        zip_max_size=zip_max_size,
        zip_max_ratio=zip_max_ratio,
    )


def build_features(
    as_of: str | None = None,
    *,
    protocols: str | Sequence[str] = options.FEATURES_PROTOCOLS.default,
    params: Mapping[str, Any] | Sequence[str] | None = None,
    keep: int = options.FEATURES_KEEP.default,
    warehouse: Warehouse | str | os.PathLike | None = None,
) -> Snapshot:
    """Build a point-in-time feature snapshot with its split protocols (`batchrec features`);
    `params` e.g. {"random.test_frac": 0.2}. Returns the `Snapshot` (its id and summary)."""
    chosen = protocols if isinstance(protocols, str) else ",".join(protocols)
    return make_snapshot(
        _warehouse(warehouse), as_of=as_of, protocols=chosen, params=_strings(params), keep=keep
    )


def train(
    family: str,
    params: Mapping[str, Any] | Sequence[str] | None = None,
    protocol: str | None = None,
    snapshot: str | None = None,
    *,
    device: str = options.DEVICE.default,
    mlflow: bool | None = None,
    nproc: int = options.TRAIN_NPROC.default,
    tuned: bool = options.TRAIN_TUNED.default,
    warehouse: Warehouse | str | os.PathLike | None = None,
) -> Run | None:
    """Fit `family` (`params`: a dict, or KEY=VALUE strings; unset ones keep their defaults) on
    a snapshot (None: the latest): on every interaction (a shipped run, what `score` publishes),
    or on `protocol`'s train part with early stopping on its valid part (what `evaluate`
    measures). `mlflow`: log it to MLflow (None: when MLFLOW_TRACKING_URI is set). `nproc` > 1:
    data-parallel in that many local processes (torch DDP; neural families). Returns the `Run`
    (None in a DDP rank other than 0 under a launcher such as torchrun: rank 0 records the run).
    `tuned`: start from the family's tuned setting (`tune`), `params` on top."""
    wh = _warehouse(warehouse)
    row = train_run(wh, family, snapshot, protocol, params, device, mlflow, nproc, tuned)
    if row is None:
        return None
    return Run(wh.run(row["run_id"])._row, wh, row.get("mlflow_run_id"), run_summary(row))


def score(
    run: Run | str | None = None,
    top_n: int = options.TOP_N.default,
    *,
    family: str | None = None,
    memory_budget: str = options.MEMORY_BUDGET.default,
    retention_days: int = options.RETENTION_DAYS.default,
    device: str = options.DEVICE.default,
    gate_metric: str | None = options.GATE_METRIC.default,
    gate_tolerance: float = options.GATE_TOLERANCE.default,
    gate_protocol: str = options.GATE_PROTOCOL.default,
    force: bool = False,
    warehouse: Warehouse | str | os.PathLike | None = None,
) -> str:
    """Publish every user's top-`top_n` of `run` (a Run or run id; None: the latest shipped run
    of `family`, else of any family) to `recommendations`, through the publish gate
    (`batchrec score`); a refused publish raises `Gated` (a BatchrecError) and keeps the live
    lists. Returns the summary line."""
    wh = _warehouse(run.warehouse if isinstance(run, Run) and warehouse is None else warehouse)
    gate = GateSettings(metric=gate_metric, tolerance=gate_tolerance, protocol=gate_protocol, force=force)
    return score_command(
        wh,
        run_id=run.run_id if isinstance(run, Run) else run,
        model=family,
        top_n=top_n,
        memory_budget=memory_budget,
        retention_days=retention_days,
        device=device,
        gate=gate,
    )


def evaluate(
    runs: Run | str | Iterable[Run | str] | None = None,
    protocol: str = options.EVALUATE_PROTOCOL.default,
    k: int | Sequence[int] | str = options.EVALUATE_KS.default,
    *,
    families: str | Sequence[str] | None = None,
    threshold: float = options.EVALUATE_THRESHOLD.default,
    metrics: str | Sequence[str] | None = None,
    report: str | os.PathLike | None = None,
    compare: bool = False,
    device: str = options.DEVICE.default,
    mlflow: bool | None = None,
    warehouse: Warehouse | str | os.PathLike | None = None,
) -> pl.DataFrame:
    """Measure `runs` (Runs or run ids; or the latest run of each of `families` on the protocol,
    trained now where there is none) on `protocol`'s test part (or a preset), write the
    `evaluations` rows (and the HTML report to `report` when given), and return them: one row
    per run, metric and cut-off (run_id, family, protocol, metric, k, value, evaluated_at, the 95%
    bootstrap interval ci_low/ci_high, p_vs_best). Runs that may have seen the test part are refused. `mlflow`: log the metrics (None: when MLFLOW_TRACKING_URI is set)."""
    given = [runs] if isinstance(runs, (Run, str)) else None if runs is None else list(runs)
    owner = next((r.warehouse for r in given or () if isinstance(r, Run)), None)
    wh = _warehouse(owner if warehouse is None else warehouse)
    ids = None if given is None else ",".join(r.run_id if isinstance(r, Run) else str(r) for r in given)
    ks = str(k) if isinstance(k, (int, np.integer)) else k if isinstance(k, str) else ",".join(map(str, k))
    fams = families if families is None or isinstance(families, str) else ",".join(families)
    wanted = metrics if metrics is None or isinstance(metrics, str) else ",".join(metrics)
    ev = run_evaluation(
        wh,
        runs=ids,
        models=fams,
        protocol=protocol,
        ks=ks,
        report_dir=report,
        compare=compare,
        threshold=threshold,
        metrics=wanted,
        device=device,
        mlflow=mlflow,
    )
    family = {res.run_id: res.model for res in ev.runs}
    frame = pl.DataFrame(ev.rows, schema={c: EVALUATION_TYPES[c] for c in EVALUATION_COLUMNS}, orient="row")
    return frame.select(
        "run_id",
        pl.col("run_id").replace_strict(family, return_dtype=pl.Utf8).alias("family"),
        pl.exclude("run_id"),
    )


def tune(
    family: str,
    protocol: str | None = None,
    *,
    warehouse: Warehouse | str | os.PathLike | None = None,
    **settings: Any,
):
    """Search `family`'s parameters on `protocol`'s valid part (None: the tuning module's default)
    and store the best as its tuned setting (`batchrec tune`; needs the extra `batchrec[tune]`).
    `settings` are the tuning module's keywords (trials, timeout, metric, seed, params, ...)."""
    try:  # the tuning module loads optuna, an optional extra; `import batchrec` never pays for it
        tuning = importlib.import_module("batchrec.tune")
    except ModuleNotFoundError as exc:
        if exc.name != "batchrec.tune":
            raise
        raise BatchrecError(
            "tuning is not available in this installation (expected the module batchrec.tune)"
        ) from None
    return tuning.tune(
        _warehouse(warehouse), family, **({"protocol": protocol} if protocol else {}), **settings
    )
