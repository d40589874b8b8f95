"""The evaluation report's "Nights" section: the trend of `publish_log` (batchrec/gate.py).

One PNG with four panels over the recent publishes and gated attempts (the gate's headline
metric of each candidate against the live run's, catalogue coverage, the share of new items,
overlap@N with the previous lists), gated attempts marked, and a table of the same rows.
"""

from __future__ import annotations

from pathlib import Path

from batchrec.plots import plt

NIGHTS_IN_REPORT = 30  # publish_log rows the report shows
HEADERS = (
    "logged at (UTC)",
    "status",
    "run",
    "users",
    "coverage",
    "new items",
    "overlap@N",
    "metric",
    "candidate",
    "live",
    "reason",
)


def _pct(v) -> str:
    return "-" if v is None else f"{v:.1%}"


def _num(v, digits: int = 4) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def nights_table(nights: list[dict]) -> list[tuple[str, ...]]:
    """publish_log rows (oldest first) as text cells under HEADERS."""
    return [
        (
            f"{r['logged_at']:%Y-%m-%d %H:%M}",
            r["status"],
            r["run_id"],
            str(r["users"]),
            _pct(r["coverage"]),
            _pct(r["new_item_share"]),
            _num(r["overlap"], 3),
            r["gate_metric"] or "-",
            _num(r["candidate_value"]),
            _num(r["live_value"]),
            r["reason"] or "",
        )
        for r in nights
    ]


def nights_figure(nights: list[dict], path: Path) -> bool:
    """Draw the trend of the publish_log rows (oldest first) to `path`; False when there are none."""
    if not nights:
        return False
    x = list(range(len(nights)))
    labels = [f"{r['logged_at']:%m-%d %H:%M}" for r in nights]
    gated = [i for i, r in enumerate(nights) if r["status"] == "gated"]
    panels = (
        ("candidate_value", f"{nights[-1]['gate_metric']} (candidate; dashed: live run)"),
        ("coverage", "catalogue coverage"),
        ("new_item_share", "share of new items"),
        ("overlap", f"overlap@{nights[-1]['top_n']} with the previous lists"),
    )
    fig, axes = plt.subplots(2, 2, figsize=(10, 6), squeeze=False)
    for ax, (key, title) in zip(axes.flat, panels):
        values = [float("nan") if r[key] is None else r[key] for r in nights]
        ax.plot(x, values, marker="o", color="C0")
        if key == "candidate_value":
            ax.plot(
                x,
                [float("nan") if r["live_value"] is None else r["live_value"] for r in nights],
                linestyle="--",
                color="grey",
            )
        if gated:
            ax.scatter(
                gated, [values[i] for i in gated], marker="x", s=80, color="C3", zorder=3, label="gated"
            )
            ax.legend(fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.set_xticks(x)
        ax.set_xticklabels(labels, rotation=45, ha="right", fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True
