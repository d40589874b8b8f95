"""`batchrec evaluate`: measure runs on a protocol's test part, write `evaluations`, write a report.

Protocols are the feature store's split protocols plus `leave_last_n_positive_events` (the
leave_last_n_positive split measured with one query per held-out positive event). Presets name a
protocol, the split parameters and the metrics of a published set-up, with the published
numbers (PRESETS below); a preset's split must exist in a snapshot with exactly those
parameters, otherwise the error gives the `batchrec features` command that builds it.

Leakage guard: a run is measured only on the test part of the split it was trained on (same
snapshot, same protocol). A run fitted on every interaction, or on another protocol's or
snapshot's train part, has (or may have) the test rows in its training data, so it is refused.

Each (run, protocol, metric, k) is one `evaluations` row; `protocol` is the name asked for (a
preset's name for a preset), suffixed `:threshold=X` when relevance is not the default rating >= 4.
Beside the value: the 95% bootstrap interval over users (`ci_low`, `ci_high`) and, for runs that
are not the best on a metric, the paired bootstrap p-value against the best run (`p_vs_best`),
see batchrec/uncertainty.py. Metrics are also measured per user segment and item bucket
(`metrics.measure(segments=True)`).
Scoring goes through `metrics.measure`, which uses the production scorer (`ranking.topn`).
The database is opened read-only for the reads and once, under the writer lock, for the final
insert (one transaction): a failure part-way writes nothing.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import duckdb
import numpy as np
import torch

from batchrec import tracking
from batchrec.data import load_snapshot
from batchrec.errors import BatchrecError
from batchrec.executors import check_executor, open_executor
from batchrec.features.params import PROTOCOLS as SPLIT_PROTOCOLS
from batchrec.gate import recent_publishes
from batchrec.metrics import METRICS, base_metric_name, measure, metric_sort_key, split_segment
from batchrec.models import available, get_model_class
from batchrec.options import EXECUTOR, RELEVANCE_THRESHOLD, TASK_CPUS, TASK_GPUS
from batchrec.report import (
    Reference,
    ReportInfo,
    ReportRun,
    best_values,
    compare_references,
    format_value,
    run_labels,
    write_report,
)
from batchrec.report_nights import NIGHTS_IN_REPORT
from batchrec.report_trend import shipped_family, trend_rows
from batchrec.runs import find_runs, resolve_run
from batchrec.serving import refresh as refresh_serving
from batchrec.train import fit_run, load_run_model
from batchrec.training import choose_device
from batchrec.uncertainty import (
    BOOTSTRAP_SAMPLES,
    BOOTSTRAP_SEED,
    PerUser,
    interval,
    paired_p_value,
    replicates,
)
from batchrec.warehouse import Warehouse, query_pl, transaction, utcnow

log = logging.getLogger("batchrec.evaluate")

EVENTWISE = "leave_last_n_positive_events"
# evaluation protocol -> the split it reads
PROTOCOLS: dict[str, str] = {p: p for p in SPLIT_PROTOCOLS} | {EVENTWISE: "leave_last_n_positive"}
# counts written beside the metrics (how many users / events / pairs a figure averages over)
COUNTS = ("users", "events", "n_known", "n_unknown")
# metrics shown in the terminal summary (the report has them all)
SUMMARY = (
    "rmse",
    "mae",
    "precision",
    "recall",
    "ndcg",
    "hit_rate",
    "map",
    "mrr",
    "coverage",
    "users",
    "events",
)


@dataclass(frozen=True)
class Preset:
    """A published set-up: protocol, the split parameters it needs, the metrics it reports."""

    name: str
    protocol: str
    split_params: dict
    metrics: tuple[str, ...]  # name or name@k, as in the metrics dicts
    families: tuple[str, ...]  # our families measured when neither --runs nor --models is given
    description: str
    references: tuple[Reference, ...] = field(default=())

    @property
    def ks(self) -> list[int]:
        return sorted({int(m.split("@")[1]) for m in self.metrics if "@" in m}) or [10]


def _ref(approach, family, metric, value, dataset, source, **params) -> Reference:
    return Reference(approach, family, metric, value, dataset, source, params)


# two_tower with the BPR set-up of the published two-tower BPR (its defaults are a softmax now)
TWO_TOWER_BPR = dict(
    loss="bpr",
    user_id=True,
    dim=64,
    id_dropout=0.3,
    min_rating=4.0,
    weighting="binary",
    recency_halflife=0.0,
    batch_size=1024,
    ensemble=1,
)  # one model, like the published one

# The published numbers (sources: the seed projects in DESIGN.md's protocol table).
PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            "random-80-10-10",
            "random",
            {"valid_frac": 0.1, "test_frac": 0.1},
            ("rmse", "mae"),
            ("neumf", "mf", "svd"),
            "global random 80/10/10 split; RMSE over test pairs known to train",
            (_ref("NeuralMF", "neumf", "rmse", 0.815, "ml-20m", "seed 000 (NeuralMF)"),),
        ),
        Preset(
            "random-64-16-20",
            "random",
            {"valid_frac": 0.16, "test_frac": 0.2},
            ("rmse", "mae"),
            ("content_dnn", "mf", "svd"),
            "global random 64/16/20 split; RMSE over test pairs known to train",
            (_ref("genre+tag DNN", "content_dnn", "rmse", 0.875, "ml-latest-small", "seed 004 (DNN)"),),
        ),
        Preset(
            "user-random-20",
            "user_random",
            {"test_frac": 0.2},
            ("rmse", "mae"),
            ("autorec", "neumf", "mf"),
            "per-user random 20% test holdout (10% more of each user's ratings held for early stopping, "
            "so models fit on 70%, not 80%); RMSE over test pairs known to train",
            (
                _ref("AutoRec", "autorec", "rmse", 1.283, "ml-100k", "seed 001 (AutoRec)"),
                _ref("NCF-MLP", "neumf", "rmse", 0.943, "ml-100k", "seed 001 (NCF-MLP)"),
            ),
        ),
        Preset(
            "user-temporal-80-10-10",
            "user_temporal",
            {"valid_frac": 0.1, "test_frac": 0.1},
            ("rmse", "mae"),
            ("svd", "mf"),
            "per-user temporal 80/10/10 (each user's last 10% test); RMSE over test pairs known to train",
            (_ref("truncated SVD", "svd", "rmse", 0.963, "ml-latest-small", "seed 004 (SVD)"),),
        ),
        Preset(
            "global-temporal-70-10-20",
            "global_temporal",
            {"valid_frac": 0.1, "test_frac": 0.2},
            ("rmse", "mae", "precision@10", "recall@10", "ndcg@10"),
            ("neumf", "two_tower", "mf", "bpr"),
            "global time cut 70/10/20 (train past, test future); RMSE and P/R/NDCG@10",
            (
                _ref("NeuralMF", "neumf", "rmse", 0.937, "ml-1m", "seed 003 (NeuralMF)"),
                _ref(
                    "two-tower BPR",
                    "two_tower",
                    "precision@10",
                    0.185,
                    "ml-1m",
                    "seed 003 (two-tower BPR)",
                    **TWO_TOWER_BPR,
                ),
                _ref(
                    "two-tower BPR",
                    "two_tower",
                    "recall@10",
                    0.054,
                    "ml-1m",
                    "seed 003 (two-tower BPR)",
                    **TWO_TOWER_BPR,
                ),
                _ref(
                    "two-tower BPR",
                    "two_tower",
                    "ndcg@10",
                    0.243,
                    "ml-1m",
                    "seed 003 (two-tower BPR)",
                    **TWO_TOWER_BPR,
                ),
            ),
        ),
        Preset(
            "leave-last-5-positive-events",
            EVENTWISE,
            {"n": 5},
            ("ndcg@10", "recall@10"),
            ("mf", "bpr", "ease"),
            "per user, from the 5th-last positive (rating >= 4) on is test; one query per positive test event, "
            "NDCG@10 / Recall@10 averaged over events",
            (
                _ref(
                    "Funk-SVD",
                    "mf",
                    "ndcg@10",
                    0.0217,
                    "ml-1m (modified)",
                    "seed 002 (Funk-SVD)",
                    biased=False,
                ),
                _ref(
                    "Funk-SVD",
                    "mf",
                    "recall@10",
                    0.0424,
                    "ml-1m (modified)",
                    "seed 002 (Funk-SVD)",
                    biased=False,
                ),
            ),
        ),
    )
}


@dataclass
class Spec:
    """What one `evaluate` call measures."""

    name: str  # protocol or preset name, as written to evaluations.protocol
    split: str  # the split protocol it reads
    eventwise: bool
    split_params: dict
    preset: Preset | None


# -- parsing ---------------------------------------------------------------------------------------
def resolve_protocol(name: str) -> Spec:
    name = (name or "").strip()
    if name in PRESETS:
        p = PRESETS[name]
        return Spec(name, PROTOCOLS[p.protocol], p.protocol == EVENTWISE, p.split_params, p)
    if name in PROTOCOLS:
        return Spec(name, PROTOCOLS[name], name == EVENTWISE, {}, None)
    raise BatchrecError(
        f"--protocol: unknown protocol {name!r} (valid protocols: {', '.join(PROTOCOLS)}; "
        f"presets: {', '.join(PRESETS)})"
    )


def parse_ks(text: str | list | tuple) -> list[int]:
    parts = [str(p).strip() for p in (text.split(",") if isinstance(text, str) else text)]
    ks = []
    for p in parts:
        try:
            k = int(p)
        except ValueError:
            k = 0
        if k <= 0 or str(k) != p:
            raise BatchrecError(f"--k: {p!r} is not a positive integer cut-off (expected e.g. 5,10,20)")
        ks.append(k)
    return sorted(set(ks))


def parse_metrics(text: str | None) -> set[str] | None:
    """--metrics: names (ndcg) or name@k (ndcg@10); None = all."""
    if not text:
        return None
    wanted = {m.strip() for m in text.split(",") if m.strip()}
    valid = [m for m, d in METRICS.items() if d is not None]
    for m in wanted:
        name, at, k = m.partition("@")
        if name not in valid or (at and not k.isdigit()):
            raise BatchrecError(
                f"--metrics: unknown metric {m!r} (valid: {', '.join(valid)}, optionally as name@K)"
            )
    return wanted


def _split_list(text: str | None) -> list[str]:
    return [t.strip() for t in (text or "").split(",") if t.strip()]


# -- snapshot and runs -----------------------------------------------------------------------------
def _split_rows(con: duckdb.DuckDBPyConnection, split: str, snapshot: str | None = None) -> list[dict]:
    """split_protocols rows of `split` (one snapshot, or all), newest snapshot first."""
    df = query_pl(
        con,
        """
        SELECT p.snapshot_id, p.params, p.n_train, p.n_valid, p.n_test, s.as_of
        FROM split_protocols p JOIN feature_snapshots s USING (snapshot_id)
        WHERE p.protocol = $p AND ($s IS NULL OR p.snapshot_id = $s)
        ORDER BY s.created_at DESC, s.snapshot_id DESC""",
        {"p": split, "s": snapshot},
    )
    return [r | {"params": json.loads(r["params"])} for r in df.to_dicts()]


def _params_match(have: dict, want: dict) -> bool:
    def same(a, b):
        numbers = isinstance(a, (int, float)) and isinstance(b, (int, float))
        return math.isclose(a, b) if numbers else a == b

    return all(k in have and same(have[k], v) for k, v in want.items())


def _build_hint(spec: Spec) -> str:
    return (
        "`"
        + " ".join(
            ["batchrec features", *(f"--param {spec.split}.{k}={v}" for k, v in spec.split_params.items())]
        )
        + "`"
    )


def choose_split(con: duckdb.DuckDBPyConnection, spec: Spec, snapshot: str | None = None) -> dict:
    """The split to measure on: of `snapshot` (the runs'), else of the newest snapshot that has
    `spec.split` with the preset's parameters."""
    rows = _split_rows(con, spec.split, snapshot)
    fitting = [r for r in rows if _params_match(r["params"], spec.split_params)]
    if fitting:
        return fitting[0]
    if snapshot is None and not query_pl(con, "SELECT 1 FROM feature_snapshots LIMIT 1").height:
        raise BatchrecError("no feature snapshots in the warehouse: run `batchrec features` first")
    where = f"snapshot {snapshot}" if snapshot else "no feature snapshot"
    if not rows:
        raise BatchrecError(
            f"{where} has {'no ' if snapshot else ''}split for protocol {spec.split!r}; "
            f"build one with {_build_hint(spec)}"
        )
    raise BatchrecError(
        f"{spec.name} needs the {spec.split} split with {json.dumps(spec.split_params, sort_keys=True)} "
        f"but {where if snapshot else 'the newest snapshot with that split'} has "
        f"{json.dumps(rows[0]['params'], sort_keys=True)}; build one with {_build_hint(spec)}"
    )


def given_runs(con: duckdb.DuckDBPyConnection, run_ids: list[str]) -> list[dict]:
    """model_runs rows of the given ids ('latest': the newest run), each once, in the order given."""
    rows: dict[str, dict] = {}
    for run_id in run_ids:
        row = resolve_run(con, run_id)
        rows.setdefault(row["run_id"], row)
    return list(rows.values())


def check_leakage(runs: list[dict], spec: Spec, snapshot: str) -> None:
    """Refuse a run whose training data may contain the test part being measured."""
    for r in runs:
        if r["snapshot_id"] != snapshot:
            raise BatchrecError(
                f"run {r['run_id']} was trained on snapshot {r['snapshot_id']}, not on {snapshot} whose "
                f"{spec.split} split is measured: its training data may include this test part (leakage risk); "
                f"evaluate runs of one snapshot together, or train one with `batchrec train {r['model']} "
                f"--snapshot {snapshot} --protocol {spec.split}`"
            )
        if r["protocol"] != spec.split:
            how = (
                "on every interaction"
                if r["protocol"] is None
                else f"on protocol {r['protocol']}'s train part"
            )
            raise BatchrecError(
                f"run {r['run_id']} was trained {how}, which includes test rows of protocol {spec.split} "
                f"(leakage risk); train one with `batchrec train {r['model']} --snapshot {snapshot} "
                f"--protocol {spec.split}`"
            )


# -- the command -----------------------------------------------------------------------------------
def _select_metrics(metrics: dict[str, float], spec: Spec, wanted: set[str] | None) -> dict[str, float]:
    """The metrics to keep: the preset's (or --metrics), plus the counts they average over."""
    keep = set(spec.preset.metrics) if spec.preset else wanted

    def chosen(name: str) -> bool:
        if name == "mrr":  # the whole-list MRR duplicates mrr@max(K)
            return False
        # a segment of a kept metric is kept with it
        return (
            keep is None or name in keep or base_metric_name(name) in keep or split_segment(name)[0] in keep
        )

    def count(name: str) -> bool:
        return base_metric_name(name) in ("users", "events", "n", "n_known", "n_unknown")

    out = {k: v for k, v in metrics.items() if not count(k) and chosen(k) and math.isfinite(v)}
    ranking, rating = any("@" in k for k in out), any(k in ("rmse", "mae") for k in out)
    # a segment's count goes with its kept metrics: users (users_<segment>) for ranking, pairs (n_<segment>) for rating
    segments = {("users" if "@" in k else "n", *split_segment(k)[1:]) for k in out}
    out |= {
        k: v
        for k, v in metrics.items()
        if count(k)
        and (
            (base_metric_name(k), *split_segment(k)[1:]) in segments
            if split_segment(k)[1]
            else (k in ("users", "events") and ranking) or (k.startswith("n_") and rating)
        )
    }
    return out


EVALUATION_COLUMNS = (
    "run_id",
    "protocol",
    "metric",
    "k",
    "value",
    "evaluated_at",
    "ci_low",
    "ci_high",
    "p_vs_best",
)


def _finite_or_none(x: float | None) -> float | None:
    return float(x) if x is not None and math.isfinite(x) else None


def _rows_for(run: ReportRun, protocol: str, at) -> list[tuple]:
    """The `evaluations` rows of one run, in EVALUATION_COLUMNS order."""
    rows = []
    for name, value in run.metrics.items():
        base, _, k = name.partition("@")
        lo, hi = run.intervals.get(name, (None, None))
        rows.append(
            (
                run.run_id,
                protocol,
                base,
                int(k) if k else None,
                float(value),
                at,
                _finite_or_none(lo),
                _finite_or_none(hi),
                _finite_or_none(run.p_values.get(name)),
            )
        )
    return rows


def write_evaluations(wh: Warehouse, rows: list[tuple]) -> None:
    """Insert the rows in one transaction under the writer lock, then rebuild the serving database."""
    with wh.writer("evaluate") as con:
        with transaction(con, f"{len(rows)} evaluation rows"):
            con.executemany(
                f"INSERT INTO evaluations ({', '.join(EVALUATION_COLUMNS)}) "
                f"VALUES ({', '.join('?' * len(EVALUATION_COLUMNS))})",
                rows,
            )
        refresh_serving(wh, con)


@dataclass
class _Resamples:
    """One run's bootstrap replicates per metric, with the users they resample (for pairing)."""

    reps: dict[str, np.ndarray]
    users: dict[str, np.ndarray]


def _resample(groups: list[PerUser], kept: dict[str, float], samples: int, seed: int) -> _Resamples:
    """Replicates of the kept metrics that have per-user parts (not coverage, not counts)."""
    out = _Resamples({}, {})
    for group in groups:
        parts = {name: part for name, part in group.parts.items() if name in kept}
        for name, reps in replicates(PerUser(group.users, parts, group.sqrt), samples, seed).items():
            out.reps[name], out.users[name] = reps, group.users
    return out


def attach_uncertainty(runs: list[ReportRun], resamples: list[_Resamples]) -> None:
    """Each run's 95% intervals, and for every metric with a direction the paired test of each run
    against the best one (same users, same resamples); the best run gets no p-value."""
    for run, res in zip(runs, resamples):
        run.intervals = {name: interval(reps) for name, reps in res.reps.items()}
    names = sorted({m for r in runs for m in r.metrics})
    for name, best in best_values(runs, names).items():
        leader = next((r, res) for r, res in zip(runs, resamples) if r.metrics.get(name) == best)
        if name not in leader[1].reps:
            continue
        for run, res in zip(runs, resamples):
            if run is leader[0] or run.metrics.get(name) == best or name not in res.reps:
                continue
            if np.array_equal(res.users[name], leader[1].users[name]):
                run.p_values[name] = paired_p_value(res.reps[name], leader[1].reps[name])


def _history(run_metrics: dict) -> list[dict]:
    """The training curve recorded in model_runs.metrics (a list of per-epoch dicts), if any."""
    hist = run_metrics.get("history") if isinstance(run_metrics, dict) else None
    return [h for h in hist if isinstance(h, dict)] if isinstance(hist, list) else []


def summary_table(runs: list[ReportRun], compare: bool) -> str:
    """Headline metrics (rows) x runs (columns) as aligned text; '*' marks the best with --compare."""
    names = sorted({m for r in runs for m in r.metrics if m.split("@")[0] in SUMMARY}, key=metric_sort_key)
    best = best_values(runs, names) if compare else {}
    table = [("", *run_labels(runs)), ("run", *(r.run_id for r in runs))]
    for n in names:
        table.append(
            (
                n,
                *(
                    format_value(n, r.metrics.get(n))
                    + ("*" if n in best and r.metrics.get(n) == best[n] else " ")
                    for r in runs
                ),
            )
        )
    widths = [max(len(row[c]) for row in table) for c in range(len(table[0]))]
    return "\n".join(
        "  ".join(c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(row, widths))).rstrip()
        for row in table
    )


@dataclass
class Evaluation:
    """What one evaluation measured and where it went."""

    spec: Spec
    split: dict  # the split_protocols row measured (snapshot_id, params, n_train/n_valid/n_test, as_of)
    ks: list[int]
    threshold: float
    runs: list[ReportRun]
    notes: list[str]
    rows_written: int
    evaluated_at: object
    report: Path | None
    mlflow_runs: dict[str, str | None] = field(default_factory=dict)  # batchrec run id -> MLflow run id
    rows: list[tuple] = field(default_factory=list)  # the `evaluations` rows written (EVALUATION_COLUMNS)

    @property
    def label(self) -> str:
        """The protocol as `evaluations.protocol` records it (see `protocol_label`)."""
        return protocol_label(self.spec.name, self.threshold)


def protocol_label(name: str, threshold: float) -> str:
    """`evaluations` has no threshold column: a non-default one is part of the protocol's name there."""
    return name if threshold == RELEVANCE_THRESHOLD else f"{name}:threshold={threshold:g}"


def _pick_runs(
    wh: Warehouse, spec: Spec, run_ids: list[str], families: list[str], device: str, track: bool = False
) -> tuple[dict, list[dict], list[str], set[str]]:
    """The split to measure and the runs to measure on it: the given runs (checked for leakage),
    else the latest run of each family on that split, fitted now where there is none."""
    notes, trained = [], set()
    with wh.connect(read_only=True) as con:
        chosen = given_runs(con, run_ids) if run_ids else []
        split = choose_split(con, spec, chosen[0]["snapshot_id"] if chosen else None)
        snapshot = split["snapshot_id"]
        check_leakage(chosen, spec, snapshot)
        if split["n_test"] == 0:
            raise BatchrecError(
                f"protocol {spec.split} of snapshot {snapshot} has an empty test part: nothing to evaluate"
            )
        if run_ids:
            return split, chosen, notes, trained
        latest: dict[str, dict] = {}
        for r in find_runs(con, snapshot_id=snapshot, protocol=spec.split):
            latest.setdefault(r["model"], r)
    if not families and spec.preset:
        families = [f for f in spec.preset.families if f in available()]
    if not families:
        if not latest:
            raise BatchrecError(
                f"no runs trained on protocol {spec.split} of snapshot {snapshot}: give "
                f"--models m1,m2 (trains them) or `batchrec train MODEL --protocol {spec.split}`"
            )
        families = sorted(latest)
    for fam in families:
        if fam in latest:
            continue
        run_id = fit_run(wh, fam, snapshot, spec.split, {}, device, mlflow=track)  # takes the writer lock
        trained.add(run_id)
        notes.append(
            f"trained {fam} now with default parameters: run {run_id} "
            f"(no run of it on protocol {spec.split} of snapshot {snapshot})"
        )
        with wh.connect(read_only=True) as con:
            latest[fam] = resolve_run(con, run_id)
    return split, [latest[f] for f in families], notes, trained


@dataclass(frozen=True)
class RunMeasurement:
    """What measuring one run returned (small: it travels back from an executor's task)."""

    metrics: dict[str, float]
    residuals: object  # the rating model's test residuals (numpy), else None
    task: str
    seconds: float
    per_user: object  # the per-user parts of each metric (metrics.measure), for the bootstrap


def measure_run(
    warehouse_path: str,
    snapshot_id: str,
    split: str,
    row: dict,
    cutoffs: list[int],
    threshold: float,
    eventwise: bool,
    device: str,
    data=None,
) -> RunMeasurement:
    """Measure one run on the test part of `split` of `snapshot_id`: an executor task (it reads
    the snapshot itself, read-only, unless the caller passes `data` it already holds)."""
    if data is None:
        with Warehouse(warehouse_path).connect(read_only=True) as con:
            data = load_snapshot(con, snapshot_id, split)
    model = load_run_model(row, choose_device(device))
    started = time.perf_counter()
    with torch.no_grad():
        m = measure(model, data, cutoffs, threshold, eventwise=eventwise, segments=True)
    return RunMeasurement(
        m.metrics,
        m.residuals if model.task == "rating" else None,
        model.task,
        time.perf_counter() - started,
        m.per_user,
    )


def _measure_runs(
    wh: Warehouse,
    snapshot_id: str,
    spec: Spec,
    chosen: list[dict],
    cutoffs: list[int],
    threshold: float,
    device: str,
    executor: str,
    ray_address: str | None,
    task_cpus: float,
    task_gpus: float,
) -> list[RunMeasurement]:
    """Every chosen run measured, in order: one after another here (the snapshot read once), or
    as parallel tasks on Ray (each task reads the snapshot)."""
    data = None
    if executor == "local":
        with wh.connect(read_only=True) as con:
            data = load_snapshot(con, snapshot_id, spec.split)
    calls = [
        (
            (
                str(wh.path.resolve()),
                snapshot_id,
                spec.split,
                row,
                list(cutoffs),
                threshold,
                spec.eventwise,
                device,
            ),
            {"data": data},
        )
        for row in chosen
    ]
    labels = [f"measuring run {row['run_id']} on {spec.name}" for row in chosen]
    measured: list[RunMeasurement | None] = [None] * len(chosen)
    with open_executor(executor, ray_address, cpus=task_cpus, gpus=task_gpus) as ex:
        for index, result in ex.map(measure_run, calls, labels):
            measured[index] = result
    return measured  # type: ignore[return-value]


def run_evaluation(
    wh: Warehouse,
    runs: str | None = None,
    models: str | None = None,
    protocol: str = "user_temporal",
    ks: str = "5,10,20",
    report_dir: str | Path | None = "reports",
    compare: bool = False,
    threshold: float = RELEVANCE_THRESHOLD,
    metrics: str | None = None,
    device: str = "auto",
    bootstrap: int = BOOTSTRAP_SAMPLES,
    seed: int = BOOTSTRAP_SEED,
    executor: str = EXECUTOR.default,
    ray_address: str | None = None,
    task_cpus: float = TASK_CPUS.default,
    task_gpus: float = TASK_GPUS.default,
    mlflow: bool | None = None,
) -> Evaluation:
    """Evaluate runs (given, or the latest of each family, trained now if missing) on a protocol's
    test part, with `bootstrap` resamples of the users (seeded by `seed`) for the intervals and the
    paired tests; write the `evaluations` rows (one transaction) and the report. `mlflow`: log each
    run's metrics to MLflow after the commit (None: when MLFLOW_TRACKING_URI is set)."""
    spec = resolve_protocol(protocol)
    cutoffs = spec.preset.ks if spec.preset else parse_ks(ks)
    wanted = parse_metrics(metrics)
    run_ids, families = _split_list(runs), _split_list(models)
    if runs is not None and models is not None:
        raise BatchrecError("give --runs or --models, not both")
    if (runs is not None and not run_ids) or (models is not None and not families):
        raise BatchrecError(
            "--runs/--models: empty list (expected comma-separated run ids or model families)"
        )
    for fam in families:
        get_model_class(fam)  # unknown family: one line listing the valid ones
    if not math.isfinite(threshold):
        raise BatchrecError(f"--threshold: {threshold} is not a number")
    if bootstrap < 0 or seed < 0:
        raise BatchrecError(
            f"--bootstrap {bootstrap} / --seed {seed}: negative (expected whole numbers >= 0)"
        )
    choose_device(device)  # an unusable device fails before any work
    check_executor(executor)
    if ray_address is not None and executor != "ray":
        raise BatchrecError("--ray-address needs --executor ray")
    track = tracking.start(mlflow)

    split, chosen, notes, trained = _pick_runs(wh, spec, run_ids, families, device, track)
    measured = _measure_runs(
        wh,
        split["snapshot_id"],
        spec,
        chosen,
        cutoffs,
        threshold,
        device,
        executor,
        ray_address,
        task_cpus,
        task_gpus,
    )
    results: list[ReportRun] = []
    resamples: list[_Resamples] = []
    for row, m in zip(chosen, measured):
        log.info("measured %s run %s on %s in %.1f s", row["model"], row["run_id"], spec.name, m.seconds)
        kept = _select_metrics(m.metrics, spec, wanted)
        if not any(k not in COUNTS for k in kept):
            notes.append(
                f"{row['model']} run {row['run_id']}: nothing this protocol measures applies "
                f"(a {m.task} model); skipped"
            )
            continue
        results.append(
            ReportRun(
                row["run_id"],
                row["model"],
                row["params"],
                kept,
                m.residuals if m.task == "rating" else None,
                _history(row["metrics"]),
                "trained now" if row["run_id"] in trained else "",
            )
        )
        resamples.append(_resample(m.per_user, kept, bootstrap, seed))
    if not results:
        raise BatchrecError(f"no run could be measured on {spec.name}: " + "; ".join(notes))
    attach_uncertainty(results, resamples)

    at = utcnow()
    label = protocol_label(spec.name, threshold)
    rows = [r for res in results for r in _rows_for(res, label, at)]
    write_evaluations(wh, rows)
    report = None
    if report_dir:
        k_trend = 10 if 10 in cutoffs else max(cutoffs)
        with wh.connect(read_only=True) as con:
            nights = recent_publishes(con, NIGHTS_IN_REPORT).to_dicts()
            family = shipped_family(con)
            trend = (family, trend_rows(con, family, label, k_trend)) if family else None
        info = ReportInfo(
            protocol=spec.name,
            split_protocol=spec.split,
            snapshot_id=split["snapshot_id"],
            as_of=str(split["as_of"]),
            split_params=split["params"],
            split_sizes={p: split[f"n_{p}"] for p in ("train", "valid", "test")},
            ks=cutoffs,
            threshold=threshold,
            evaluated_at=at,
            description=spec.preset.description if spec.preset else "",
            references=list(spec.preset.references) if spec.preset else [],
        )
        report = write_report(report_dir, info, results, compare, nights=nights, trend=trend)
    tracked = (
        {
            res.run_id: tracking.log_evaluation(
                {"run_id": res.run_id, "model": res.model},
                label,
                res.metrics,
                {
                    "snapshot_id": split["snapshot_id"],
                    "ks": ",".join(map(str, cutoffs)),
                    "threshold": threshold,
                    "evaluated_at": f"{at:%Y-%m-%d %H:%M:%S}",
                },
            )
            for res in results
        }
        if track
        else {}
    )
    return Evaluation(spec, split, cutoffs, threshold, results, notes, len(rows), at, report, tracked, rows)


def evaluate_command(wh: Warehouse, **settings) -> str:
    """`batchrec evaluate`: `run_evaluation` (same keywords), summarised as text (table, published
    numbers, report path)."""
    ev = run_evaluation(wh, **settings)
    spec, split = ev.spec, ev.split
    out = [
        f"{spec.name}: snapshot {split['snapshot_id']}, split {spec.split} {json.dumps(split['params'], sort_keys=True)} "
        f"({split['n_train']:,} / {split['n_valid']:,} / {split['n_test']:,}), K = {', '.join(map(str, ev.ks))}, "
        f"relevant: rating >= {ev.threshold:g}"
        f"{', one query per positive test event' if spec.eventwise else ''}",
        *ev.notes,
        "",
        summary_table(ev.runs, settings.get("compare", False)),
        "",
        f"wrote {ev.rows_written} rows to evaluations ({len(ev.runs)} run(s), evaluated_at "
        f"{ev.evaluated_at:%Y-%m-%d %H:%M:%S} UTC)",
    ]
    if spec.preset:
        out += ["", "published numbers (their dataset) vs ours (this snapshot):"]
        for ref, value, label in compare_references(spec.preset.references, ev.runs):
            ours = f"{value:.4f} ({label})" if value is not None else "not measured (family not available)"
            out.append(
                f"  {ref.approach:<15} {ref.metric:<12} theirs {ref.value:<7g} on {ref.dataset:<17} ours {ours}"
            )
    if ev.report:
        out.append(f"report: {ev.report}")
    if ev.mlflow_runs:
        logged = [f"{run} -> {mlflow_run}" for run, mlflow_run in ev.mlflow_runs.items() if mlflow_run]
        out.append(
            f"mlflow: {len(logged)} of {len(ev.mlflow_runs)} run(s) logged"
            + (f" ({', '.join(logged)})" if logged else " (see the warnings above)")
        )
    return "\n".join(out)
