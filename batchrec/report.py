"""The evaluation report: `<reports>/<UTC timestamp>-<protocol>/index.html` and `report.md`.

Fed with a results table (one `ReportRun` per evaluated run) and what produced it
(`ReportInfo`): the table of every run x metric with its 95% bootstrap interval and the paired
test against the best run (best per metric highlighted with --compare), the same by user
segment and item popularity, metric@K curves, the residual distribution of rating models, popularity bias against catalogue
coverage, training curves from `model_runs.metrics`, the snapshot and split parameters, for
presets the published numbers next to ours, the shipped family's trend over its last evaluations
(report_trend) and the nights of the publish log (report_nights). Plots are matplotlib PNGs (Agg, no display needed)
beside the HTML, so the folder can be copied or served as it is.
"""

from __future__ import annotations

import html
import json
import re
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np

from batchrec.metrics import base_metric_name, higher_is_better, metric_sort_key, split_segment
from batchrec.plots import plt
from batchrec.report_nights import HEADERS, nights_figure, nights_table
from batchrec.report_trend import trend_figure, trend_table
from batchrec.uncertainty import BOOTSTRAP_SAMPLES, CONFIDENCE, SIGNIFICANCE

# ranking metrics drawn as metric@K curves, in this order
CURVE_METRICS = ("precision", "recall", "ndcg", "hit_rate", "map", "mrr", "coverage", "novelty")


@dataclass
class ReportRun:
    """One evaluated run: its identity, metrics (name@k -> value) and what the plots need."""

    run_id: str
    model: str
    params: dict
    metrics: dict[str, float]
    residuals: np.ndarray | None = None  # clipped prediction - true rating (rating models)
    history: list[dict] = field(default_factory=list)  # training curve from model_runs.metrics
    note: str = ""  # e.g. "trained now"
    intervals: dict[str, tuple[float, float]] = field(
        default_factory=dict
    )  # 95% bootstrap interval per metric
    p_values: dict[str, float] = field(default_factory=dict)  # paired test against the best run, per metric


@dataclass
class Reference:
    """A published number a preset reproduces, and our family that corresponds to it."""

    approach: str
    family: str  # our model family for that approach ("" when we have none)
    metric: str  # name@k as in the metrics dicts
    value: float
    dataset: str
    source: str
    params: dict = field(default_factory=dict)  # our family's parameters closest to the approach


@dataclass
class ReportInfo:
    """What produced the results: protocol (or preset), snapshot, split and evaluation settings."""

    protocol: str
    split_protocol: str
    snapshot_id: str
    as_of: str
    split_params: dict
    split_sizes: dict
    ks: list[int]
    threshold: float
    evaluated_at: datetime
    description: str = ""
    references: list[Reference] = field(default_factory=list)


def run_labels(runs: list[ReportRun]) -> list[str]:
    """The family name, plus the run id where a family appears more than once."""
    models = [r.model for r in runs]
    return [r.model if models.count(r.model) == 1 else f"{r.model} {r.run_id}" for r in runs]


def metric_columns(runs: list[ReportRun], segments: bool = False) -> list[str]:
    """The metrics of the runs in display order: the overall ones, or (`segments`) those of user
    segments and item buckets."""
    names = {m for r in runs for m in r.metrics if bool(split_segment(m)[1]) == segments}
    return sorted(names, key=metric_sort_key)


# Said in the report beside the results, and in the docs: what each ranking metric divides by.
METRIC_NOTE = (
    "Ranking metrics average over the users with a relevant test item (rating >= the threshold). "
    "precision@k = hits / k; recall@k = hits / #relevant; ndcg@k: binary gain, ideal DCG over "
    "min(k, #relevant); hit_rate@k: at least one hit; mrr@k: 1 / rank of the first hit; map@k is the "
    "truncated average precision that divides by min(k, #relevant) (not by #relevant as trec_eval's "
    f"AP does). Intervals: {CONFIDENCE:.0%} percentile bootstrap, resampling users ({BOOTSTRAP_SAMPLES} "
    "resamples, seeded); for RMSE and MAE a resampled user brings all their test pairs."
)
WORSE, TIED = "\u25bc", "\u2248"
SIG_NOTE = (
    "Beside each run that is not the best on a metric, the paired bootstrap test against the best run "
    f"(same users, same resamples): {WORSE} p < {SIGNIFICANCE}, worse than the best; {TIED} p >= "
    f"{SIGNIFICANCE}, not distinguishable from it."
)


def _mark(run: ReportRun, metric: str) -> str:
    """The paired test's mark and p-value of `run` on `metric` ("" for the best run and for counts)."""
    p = run.p_values.get(metric)
    if p is None or not np.isfinite(p):
        return ""
    return f"{WORSE if p < SIGNIFICANCE else TIED} p {p:.3f}"


def _interval_text(run: ReportRun, metric: str) -> str:
    lo, hi = run.intervals.get(metric, (np.nan, np.nan))
    if not (np.isfinite(lo) and np.isfinite(hi)):
        return ""
    return f"[{format_value(metric, lo)}, {format_value(metric, hi)}]"


def best_values(runs: list[ReportRun], columns: list[str]) -> dict[str, float]:
    """Best value per metric over the runs, for metrics with a direction (not counts)."""
    best = {}
    for col in columns:
        direction = higher_is_better(col)
        values = [r.metrics[col] for r in runs if col in r.metrics and np.isfinite(r.metrics[col])]
        if direction is not None and len(values) > 1:
            best[col] = max(values) if direction else min(values)
    return best


def format_value(name: str, value: float | None) -> str:
    if value is None or not np.isfinite(value):
        return "-"
    if base_metric_name(name) in ("users", "events", "n", "n_known", "n_unknown"):  # counts, segments' too
        return f"{value:.0f}"
    if base_metric_name(name) == "avg_popularity":
        return f"{value:.1f}"
    return f"{value:.4f}"


# -- plots ---------------------------------------------------------------------------------------
def _metric_at_k(runs, labels, ks, path: Path) -> bool:
    present = [
        m for m in CURVE_METRICS if any(k.split("@")[0] == m and "@" in k for r in runs for k in r.metrics)
    ]
    if not present:
        return False
    cols = min(3, len(present))
    rows = -(-len(present) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax, metric in zip(axes.flat, present):
        for run, label in zip(runs, labels):
            pts = sorted(
                (int(k.split("@")[1]), v, *run.intervals.get(k, (np.nan, np.nan)))
                for k, v in run.metrics.items()
                if k.split("@")[0] == metric and "@" in k
            )
            if pts:
                xs, ys, lo, hi = (np.array(c, dtype=float) for c in zip(*pts))
                err = np.nan_to_num(np.vstack([ys - lo, hi - ys]), nan=0.0).clip(min=0.0)
                ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=label)
        ax.set_title(f"{metric}@K")
        ax.set_xlabel("K")
        ax.set_xticks(ks)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(present) :]:
        ax.axis("off")
    handles, names = axes.flat[0].get_legend_handles_labels()
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / (3.2 * rows)))
    fig.legend(handles, names, loc="upper center", ncol=min(len(names), 6), fontsize=8, frameon=False)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def _residuals(runs, labels, path: Path) -> bool:
    rated = [(r, lab) for r, lab in zip(runs, labels) if r.residuals is not None and len(r.residuals)]
    if not rated:
        return False
    fig, ax = plt.subplots(figsize=(7, 4))
    lim = max(float(np.abs(r.residuals).max()) for r, _ in rated)
    bins = np.linspace(-lim, lim, 41)
    for run, label in rated:
        rmse = run.metrics.get("rmse", float("nan"))
        ax.hist(
            run.residuals,
            bins=bins,
            histtype="step",
            linewidth=1.5,
            density=True,
            label=f"{label} (RMSE {rmse:.3f})",
        )
    ax.axvline(0, color="grey", linewidth=0.8)
    ax.set_xlabel("prediction - rating (clipped prediction, test pairs known to train)")
    ax.set_ylabel("density")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def _popularity_coverage(runs, labels, k: int, path: Path) -> bool:
    pts = [
        (r.metrics[f"coverage@{k}"], r.metrics[f"avg_popularity@{k}"], lab)
        for r, lab in zip(runs, labels)
        if f"coverage@{k}" in r.metrics and f"avg_popularity@{k}" in r.metrics
    ]
    if not pts:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for x, y, label in pts:
        ax.scatter(x, y, s=40)
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.set_xlabel(f"catalogue coverage@{k} (distinct recommended / candidate items)")
    ax.set_ylabel(f"mean training count of recommended items @{k}")
    ax.set_title("popularity bias vs coverage (right and low: more diverse)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


_NOT_CURVES = ("epoch", "lr", "seconds")


def _curve_keys(history: list[dict]) -> list[str]:
    """Numeric per-epoch series worth drawing (loss, validation metrics), not timings."""
    return sorted(
        {
            k
            for h in history
            for k, v in h.items()
            if k not in _NOT_CURVES and isinstance(v, (int, float)) and not isinstance(v, bool)
        }
    )


def _training_curves(runs, labels, path: Path) -> bool:
    curves = [
        (r, lab)
        for r, lab in zip(runs, labels)
        if len([h for h in r.history if "epoch" in h]) > 1 and _curve_keys(r.history)
    ]
    if not curves:
        return False
    cols = min(3, len(curves))
    rows = -(-len(curves) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax, (run, label) in zip(axes.flat, curves):
        hist = [h for h in run.history if "epoch" in h]
        epochs = [h["epoch"] for h in hist]
        if any("loss" in h for h in hist):
            ax.plot(epochs, [h.get("loss", np.nan) for h in hist], color="C0", label="train loss")
            ax.set_ylabel("train loss", color="C0")
        valid_keys = [k for k in _curve_keys(hist) if k != "loss"]
        if valid_keys:
            ax2 = ax.twinx()
            for j, key in enumerate(valid_keys):
                ax2.plot(
                    epochs, [h.get(key, np.nan) for h in hist], color=f"C{j + 1}", linestyle="--", label=key
                )
            ax2.set_ylabel(", ".join(valid_keys), color="C1")
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("epoch")
    for ax in list(axes.flat)[len(curves) :]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


# -- documents -----------------------------------------------------------------------------------
def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text)


def report_dir(root: str | Path, info: ReportInfo) -> Path:
    """A new folder `<root>/<UTC timestamp>-<protocol>` (suffixed if that second is taken)."""
    base = Path(root) / f"{info.evaluated_at:%Y%m%dT%H%M%SZ}-{_slug(info.protocol)}"
    path, n = base, 1
    while path.exists():
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    path.mkdir(parents=True)
    return path


def _setup_rows(info: ReportInfo) -> list[tuple[str, str]]:
    rows = [
        (
            "protocol",
            info.protocol
            if info.protocol == info.split_protocol
            else f"{info.protocol} (split {info.split_protocol})",
        ),
        ("snapshot", f"{info.snapshot_id} (as of {info.as_of})"),
        ("split parameters", json.dumps(info.split_params, sort_keys=True)),
        (
            "split sizes train / valid / test",
            " / ".join(f"{info.split_sizes.get(p, 0):,}" for p in ("train", "valid", "test")),
        ),
        ("cut-offs K", ", ".join(map(str, info.ks))),
        ("relevant", f"test rating >= {info.threshold:g}"),
        ("evaluated at", f"{info.evaluated_at:%Y-%m-%d %H:%M:%S} UTC"),
    ]
    if info.description:
        rows.insert(1, ("measures", info.description))
    return rows


def compare_references(
    refs: list[Reference], runs: list[ReportRun]
) -> list[tuple[Reference, float | None, str]]:
    """Each published number with our best value for it: from the runs of the matching family
    (and parameters), else from any run; (ref, None, "") when no run has that metric."""
    labels = run_labels(runs)
    out = []
    for ref in refs:
        ours = [
            (r.metrics[ref.metric], lab, r.model == ref.family and ref.params.items() <= r.params.items())
            for r, lab in zip(runs, labels)
            if ref.metric in r.metrics
        ]
        pick = [o for o in ours if o[2]] or ours
        best = (min if higher_is_better(ref.metric) is False else max)(pick) if pick else None
        out.append((ref, best[0], best[1]) if best else (ref, None, ""))
    return out


def _reference_rows(info: ReportInfo, runs: list[ReportRun]) -> list[tuple[str, ...]]:
    return [
        (
            ref.approach,
            ref.metric,
            f"{ref.value:g}",
            ref.dataset,
            f"{value:.4f} ({label})" if value is not None else "not measured",
            ref.source,
        )
        for ref, value, label in compare_references(info.references, runs)
    ]


def write_report(
    root: str | Path,
    info: ReportInfo,
    runs: list[ReportRun],
    compare: bool = False,
    nights: list[dict] | None = None,
    trend: tuple[str, list[dict]] | None = None,
) -> Path:
    """Write the report folder; returns the path of index.html. `nights`: publish_log rows, oldest
    first, for the "Nights" section (see report_nights); `trend`: the shipped family and its last
    evaluations (see report_trend)."""

    out = report_dir(root, info)
    labels = run_labels(runs)
    columns = metric_columns(runs)
    segment_columns = metric_columns(runs, segments=True)
    best = best_values(runs, columns + segment_columns) if compare else {}
    k_pop = 10 if 10 in info.ks else max(info.ks)
    figures = [
        (name, title)
        for name, title, made in (
            (
                "metric_at_k.png",
                "Metric@K per model (bars: 95% interval)",
                _metric_at_k(runs, labels, info.ks, out / "metric_at_k.png"),
            ),
            (
                "residuals.png",
                "Error distribution of rating models",
                _residuals(runs, labels, out / "residuals.png"),
            ),
            (
                "popularity_coverage.png",
                f"Popularity bias vs catalogue coverage (K = {k_pop})",
                _popularity_coverage(runs, labels, k_pop, out / "popularity_coverage.png"),
            ),
            (
                "training_curves.png",
                "Training curves (model_runs.metrics)",
                _training_curves(runs, labels, out / "training_curves.png"),
            ),
        )
        if made
    ]
    setup = _setup_rows(info)
    refs = _reference_rows(info, runs)
    night_rows = nights_table(nights or [])
    night_figure = nights_figure(nights or [], out / "nights.png")
    family, trend_data = trend or ("", [])
    trend_section = (
        (family, *trend_table(trend_data), trend_figure(trend_data, family, out / "trend.png"))
        if trend_data
        else None
    )
    tables = (columns, segment_columns)
    (out / "index.html").write_text(
        _html(info, runs, labels, tables, best, figures, setup, refs, night_rows, night_figure, trend_section)
    )
    (out / "report.md").write_text(
        _markdown(
            info, runs, labels, tables, best, figures, setup, refs, night_rows, night_figure, trend_section
        )
    )
    return out / "index.html"


_CSS = """body{font-family:system-ui,sans-serif;margin:2em;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:13px}
th,td{border:1px solid #ccc;padding:4px 8px;text-align:right}th{background:#f3f3f3}
td.name,th.name{text-align:left}td.best{background:#c8f0c8;font-weight:bold}
img{max-width:100%;border:1px solid #eee;margin:0.5em 0}.note{color:#666;font-size:12px}
.ci{display:block;color:#555;font-size:11px}.sig{display:block;font-size:11px}.sig.worse{color:#b00}"""


_NIGHTS_NOTE = (
    "Each publish of a run's lists and each attempt the publish gate refused (publish_log), oldest "
    "first: the candidate's measurement against the live run's, catalogue coverage, the share of "
    "items never recommended before, overlap with the previous lists."
)


def _cell_html(run: ReportRun, metric: str, best: dict) -> str:
    e = html.escape
    value = run.metrics.get(metric)
    is_best = metric in best and value == best[metric]
    ci = _interval_text(run, metric)
    mark = _mark(run, metric)
    worse = run.p_values.get(metric, 1.0) < SIGNIFICANCE
    return (
        f"<td{' class=best' if is_best else ''}>{format_value(metric, value)}"
        + (f"<span class='ci'>{e(ci)}</span>" if ci else "")
        + (f"<span class='sig{' worse' if worse else ''}'>{e(mark)}</span>" if mark else "")
        + "</td>"
    )


def _metric_table_html(table_id: str, runs, labels, columns, best) -> str:
    e = html.escape
    rows = [
        f"<table id='{table_id}'><tr><th class='name'>metric</th>"
        + "".join(f"<th>{e(label)}</th>" for label in labels)
        + "</tr>"
    ]
    for c in columns:
        rows.append(
            f"<tr><th class='name'>{e(c)}</th>{''.join(_cell_html(run, c, best) for run in runs)}</tr>"
        )
    return "".join(rows) + "</table>"


_SEGMENT_NOTE = (
    "Segments: _users_<n> are the users by their number of training interactions (1-19, 20-99, "
    "100+) and cold users (none; their rating pairs are scored by the fallback); _items_<n> the "
    "relevant items (NDCG) or rated pairs (RMSE) by the item's number of training interactions. "
    "users_<segment> counts the users of a segment, n_<segment> its rating pairs. Intervals resample "
    "all the users of the metric, the segment's count varying with the resample."
)


def _html(
    info, runs, labels, tables, best, figures, setup, refs, night_rows=(), night_figure=False, trend=None
) -> str:
    e = html.escape
    columns, segment_columns = tables
    parts = [
        f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>batchrec evaluation: {e(info.protocol)}</title>"
        f"<style>{_CSS}</style></head><body>",
        f"<h1>Evaluation: {e(info.protocol)}</h1>",
        "<h2>Setup</h2><table id='setup'>"
        + "".join(f"<tr><th class='name'>{e(k)}</th><td class='name'>{e(v)}</td></tr>" for k, v in setup)
        + "</table>",
        "<h2>Runs</h2><table id='runs'><tr><th class='name'>model</th><th class='name'>run</th>"
        "<th class='name'>parameters</th></tr>",
    ]
    for run, label in zip(runs, labels):
        note = f" <span class='note'>({e(run.note)})</span>" if run.note else ""
        parts.append(
            f"<tr><td class='name'>{e(label)}</td><td class='name'>{e(run.run_id)}{note}</td>"
            f"<td class='name note'>{e(json.dumps(run.params, sort_keys=True))}</td></tr>"
        )
    parts.append("</table><h2>Results</h2>")
    parts.append(f"<p class='note' id='metric-note'>{e(METRIC_NOTE)}</p>")
    if any(r.p_values for r in runs):
        parts.append(f"<p class='note' id='sig-note'>{e(SIG_NOTE)}</p>")
    if best:
        parts.append(
            "<p class='note'>Best run per metric highlighted (lower is better for RMSE and MAE; "
            "popularity and counts are not ranked).</p>"
        )
    parts.append(_metric_table_html("results", runs, labels, columns, best))
    if segment_columns:
        parts.append(
            f"<h2 id='segments-title'>Segments</h2><p class='note'>{e(_SEGMENT_NOTE)}</p>"
            + _metric_table_html("segments", runs, labels, segment_columns, best)
        )
    if refs:
        parts.append(
            "<h2>Published numbers</h2><p class='note'>Their figure on their dataset next to ours on this "
            "snapshot; datasets differ unless named the same.</p><table id='references'><tr>"
            + "".join(
                f"<th class='name'>{h}</th>"
                for h in ("approach", "metric", "theirs", "their dataset", "ours (run)", "source")
            )
            + "</tr>"
            + "".join(
                "<tr>" + "".join(f"<td class='name'>{e(c)}</td>" for c in row) + "</tr>" for row in refs
            )
            + "</table>"
        )
    for name, title in figures:
        parts.append(f"<h2>{e(title)}</h2><img src='{e(name)}' alt='{e(title)}'>")
    if trend:
        family, headers, rows, drawn = trend
        parts.append(
            f"<h2 id='trend'>Trend: {e(family)} (the shipped family) on {e(info.protocol)}</h2>"
            f"<p class='note'>Its last {len(rows)} evaluation(s) on this protocol, oldest first, with 95% "
            "intervals; the nightly job adds one a night.</p>"
            + ("<img id='trend-plot' src='trend.png' alt='trend'>" if drawn else "")
            + "<table id='trend-table'><tr>"
            + "".join(f"<th class='name'>{e(h)}</th>" for h in headers)
            + "</tr>"
            + "".join(
                "<tr>" + "".join(f"<td class='name'>{e(c)}</td>" for c in row) + "</tr>" for row in rows
            )
            + "</table>"
        )
    if night_rows:
        parts.append(
            f"<h2 id='nights'>Nights</h2><p class='note'>{e(_NIGHTS_NOTE)}</p>"
            + ("<img src='nights.png' alt='nights'>" if night_figure else "")
            + "<table id='nights-table'><tr>"
            + "".join(f"<th class='name'>{e(h)}</th>" for h in HEADERS)
            + "</tr>"
            + "".join(
                "<tr>" + "".join(f"<td class='name'>{e(c)}</td>" for c in row) + "</tr>" for row in night_rows
            )
            + "</table>"
        )
    parts.append("</body></html>\n")
    return "\n".join(parts)


def _markdown(
    info, runs, labels, tables, best, figures, setup, refs, night_rows=(), night_figure=False, trend=None
) -> str:
    def row(cells):
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    def cell(run, c):
        text = format_value(c, run.metrics.get(c))
        text = f"**{text}**" if c in best and run.metrics.get(c) == best[c] else text
        return " ".join(t for t in (text, _interval_text(run, c), _mark(run, c)) if t)

    columns, segment_columns = tables
    lines = [f"# Evaluation: {info.protocol}", "", "## Setup", "", row(("", "")), row(("---", "---"))]
    lines += [row((f"**{k}**", v)) for k, v in setup]
    lines += ["", "## Runs and results", "", METRIC_NOTE, ""]
    if any(r.p_values for r in runs):
        lines += [SIG_NOTE, ""]
    if best:
        lines += ["Best run per metric in **bold**.", ""]
    lines += [row(("model", "run", "parameters")), row(("---",) * 3)]
    lines += [
        row(
            (
                label,
                run.run_id + (f" ({run.note})" if run.note else ""),
                json.dumps(run.params, sort_keys=True),
            )
        )
        for run, label in zip(runs, labels)
    ]
    lines += ["", row(("metric", *labels)), row(("---",) * (len(labels) + 1))]
    lines += [row((c, *(cell(r, c) for r in runs))) for c in columns]
    if segment_columns:
        lines += [
            "",
            "## Segments",
            "",
            _SEGMENT_NOTE,
            "",
            row(("metric", *labels)),
            row(("---",) * (len(labels) + 1)),
        ]
        lines += [row((c, *(cell(r, c) for r in runs))) for c in segment_columns]
    if refs:
        lines += [
            "",
            "## Published numbers",
            "",
            "Their figure on their dataset next to ours on this snapshot.",
            "",
            row(("approach", "metric", "theirs", "their dataset", "ours (run)", "source")),
            row(("---",) * 6),
        ]
        lines += [row(r) for r in refs]
    for name, title in figures:
        lines += ["", f"## {title}", "", f"![{title}]({name})"]
    if trend:
        family, headers, rows, drawn = trend
        lines += ["", f"## Trend: {family} (the shipped family) on {info.protocol}", ""]
        lines += (["![trend](trend.png)", ""] if drawn else []) + [row(headers), row(("---",) * len(headers))]
        lines += [row(r) for r in rows]
    if night_rows:
        lines += ["", "## Nights", "", _NIGHTS_NOTE, ""] + (
            ["![nights](nights.png)", ""] if night_figure else []
        )
        lines += [row(HEADERS), row(("---",) * len(HEADERS))] + [row(r) for r in night_rows]
    return "\n".join(lines) + "\n"
