"""The evaluation report's "Trend" section: the shipped family's metrics over its last evaluations.

The nightly job's evaluate step appends one evaluation of the shipped family a night
(`evaluations`, with its 95% interval); this section draws the headline metrics at one cut-off
over the last TREND_EVALUATIONS of them on the report's protocol, the interval as error bars, and
lists them in a table. The shipped family is the live run's (what `recommendations` holds), else
the family of the newest run fitted on every interaction (what the next publish would ship).
"""

from __future__ import annotations

from pathlib import Path

import duckdb
import numpy as np

from batchrec.metrics import metric_sort_key
from batchrec.plots import plt
from batchrec.runs import find_runs, live_runs
from batchrec.warehouse import query_pl

TREND_EVALUATIONS = 30
TREND_METRICS = ("ndcg", "recall", "precision", "map", "hit_rate", "mrr", "rmse", "mae")


def shipped_family(con: duckdb.DuckDBPyConnection) -> str | None:
    """The family whose lists are live, else of the newest shipped run; None when there is neither."""
    live = [r["model"] for r in live_runs(con) if r["model"]]
    if live:
        return live[0]
    shipped = find_runs(con, shipped=True, limit=1)
    return shipped[0]["model"] if shipped else None


def trend_rows(
    con: duckdb.DuckDBPyConnection, family: str, protocol: str, k: int, n: int = TREND_EVALUATIONS
) -> list[dict]:
    """The last `n` evaluations of `family` on `protocol` (oldest first): evaluated_at, run_id,
    metric (name or name@k), value, ci_low, ci_high, for TREND_METRICS at cut-off `k` (or
    none); one run per evaluation (the newest id where one evaluation measured several)."""
    rows = query_pl(
        con,
        """
        WITH picked AS (
            SELECT e.evaluated_at, e.run_id, e.metric, e.k, e.value, e.ci_low, e.ci_high
            FROM evaluations e JOIN model_runs r USING (run_id)
            WHERE r.model = $family AND e.protocol = $protocol AND list_contains($metrics, e.metric)
              AND (e.k = $k OR e.k IS NULL) AND isfinite(e.value)
            QUALIFY dense_rank() OVER (PARTITION BY e.evaluated_at ORDER BY e.run_id DESC) = 1),
        last AS (SELECT DISTINCT evaluated_at FROM picked ORDER BY evaluated_at DESC LIMIT $n)
        SELECT * FROM picked WHERE evaluated_at IN (SELECT evaluated_at FROM last)
        ORDER BY evaluated_at""",
        {"family": family, "protocol": protocol, "metrics": list(TREND_METRICS), "k": k, "n": n},
    ).to_dicts()
    for r in rows:
        r["metric"] = r["metric"] if r["k"] is None else f"{r['metric']}@{r['k']}"
    return rows


def trend_metrics(rows: list[dict]) -> list[str]:
    return sorted({r["metric"] for r in rows}, key=metric_sort_key)


def trend_table(rows: list[dict]) -> tuple[list[str], list[tuple[str, ...]]]:
    """(headers, one row of text cells per evaluation): value [low, high] per metric."""
    metrics = trend_metrics(rows)
    by_time: dict = {}
    for r in rows:
        by_time.setdefault((r["evaluated_at"], r["run_id"]), {})[r["metric"]] = r
    table = []
    for (at, run_id), cells in by_time.items():
        table.append(
            (
                f"{at:%Y-%m-%d %H:%M}",
                run_id,
                *(
                    "-"
                    if m not in cells
                    else f"{cells[m]['value']:.4f}"
                    + (
                        f" [{cells[m]['ci_low']:.4f}, {cells[m]['ci_high']:.4f}]"
                        if cells[m]["ci_low"] is not None and np.isfinite(cells[m]["ci_low"])
                        else ""
                    )
                    for m in metrics
                ),
            )
        )
    return ["evaluated at (UTC)", "run", *metrics], table


def trend_figure(rows: list[dict], family: str, path: Path) -> bool:
    """One panel per metric: value per evaluation (oldest left) with its 95% interval; False
    when there is nothing to draw."""
    if not rows:
        return False
    metrics = trend_metrics(rows)
    times = sorted({r["evaluated_at"] for r in rows})
    x = {t: i for i, t in enumerate(times)}
    cols = min(3, len(metrics))
    nrows = -(-len(metrics) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.4 * cols, 3.2 * nrows), squeeze=False)
    for ax, metric in zip(axes.flat, metrics):
        pts = [r for r in rows if r["metric"] == metric]
        xs = [x[r["evaluated_at"]] for r in pts]
        ys = np.array([r["value"] for r in pts])
        lo = np.array([r["ci_low"] if r["ci_low"] is not None else np.nan for r in pts], dtype=float)
        hi = np.array([r["ci_high"] if r["ci_high"] is not None else np.nan for r in pts], dtype=float)
        err = np.vstack([np.where(np.isfinite(lo), ys - lo, 0.0), np.where(np.isfinite(hi), hi - ys, 0.0)])
        ax.errorbar(xs, ys, yerr=np.maximum(err, 0.0), marker="o", capsize=3, color="C0")
        ax.set_title(f"{family} {metric} (95% interval)", fontsize=10)
        ax.set_xticks(range(len(times)))
        ax.set_xticklabels([f"{t:%m-%d %H:%M}" for t in times], rotation=45, ha="right", fontsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(metrics) :]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True
