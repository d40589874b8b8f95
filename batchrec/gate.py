"""The publish gate and the nightly monitoring figures: never ship a worse model silently.

Before a run's lists replace every user's lists (`batchrec score`, the job's score step, `score
--publish` of shards), `Gate.check` runs on the publishing connection, outside the publish
transaction:

1. The figures of the staged lists, in SQL (sql/monitoring/publish_figures.sql): users, rows,
   distinct items, catalogue coverage, the share of items never recommended before, the mean
   Jaccard overlap with each user's current list, non-finite scores.
2. The candidate's measurement: the latest evaluation of its family, fitted on its snapshot, on
   the gate's protocol and headline metric (NDCG@10 for rankers, RMSE for rating models;
   sql/monitoring/measurement.sql). The job's evaluate step, which runs before the score step,
   writes it.
3. The live run's measurement: the candidate value `publish_log` recorded when the live run (the
   run with most rows in `recommendations`) was published, else that run's own measurement.
4. The checks: the metric no worse than the tolerance (relative), the scorer's list sanity checks
   (`score.list_sanity`, passed in), catalogue coverage not collapsed below half the live lists'.

A refused publish writes a `publish_log` row with status 'gated' and the reason, and raises
`Gated` (exit code 3): nothing is published, yesterday's lists stay. With `force` it publishes
anyway, status 'forced' with the checks it overrode; non-finite scores are refused even then.
A passed publish inserts its row inside the publish transaction (`Gate.record`). With nothing
live or nothing measured to compare with (the first night), the metric check passes with a note.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

import duckdb
import polars as pl

from batchrec import options
from batchrec.errors import BatchrecError, Gated
from batchrec.metrics import METRICS, higher_is_better
from batchrec.warehouse import SQL_DIR, query_pl, table_exists, transaction, utcnow

log = logging.getLogger("batchrec.gate")

MONITORING_SQL = SQL_DIR / "monitoring"
COVERAGE_COLLAPSE = (
    0.5  # refused when the lists cover fewer distinct items than this share of the live lists'
)
HEADLINE = {"ranking": "ndcg@10", "rating": "rmse"}  # the default metric per model task
LOG_COLUMNS = (
    "logged_at",
    "run_id",
    "model",
    "status",
    "users",
    "rows",
    "items",
    "coverage",
    "new_item_share",
    "overlap",
    "overlap_users",
    "top_n",
    "live_run_id",
    "gate_metric",
    "gate_protocol",
    "candidate_value",
    "live_value",
    "tolerance",
    "reason",
    "seconds",
)


@dataclass(frozen=True)
class GateSettings:
    """How a publish is gated: the options of `batchrec score` and of a job's score step."""

    metric: str | None = options.GATE_METRIC.default  # None: the task's headline metric
    tolerance: float = options.GATE_TOLERANCE.default
    protocol: str = options.GATE_PROTOCOL.default
    force: bool = options.FORCE.default

    def __post_init__(self):
        if not (math.isfinite(self.tolerance) and self.tolerance >= 0):
            raise BatchrecError(
                f"--gate-tolerance: {self.tolerance} is not valid (expected a number >= 0, e.g. 0.05)"
            )
        if self.metric is not None:
            parse_metric(self.metric)


DEFAULT_GATE = GateSettings()  # every option at its default (batchrec.options)


def parse_metric(text: str) -> tuple[str, int | None]:
    """`ndcg@10` -> ("ndcg", 10), `rmse` -> ("rmse", None); one line for a metric without a direction."""
    name, at, k = text.strip().partition("@")
    if (
        higher_is_better(name) is None
        or name not in METRICS
        or (at and not k.isdigit())
        or (at and int(k) < 1)
    ):
        valid = ", ".join(m for m, d in METRICS.items() if d is not None)
        raise BatchrecError(
            f"--gate-metric: {text!r} is not a metric the gate can compare "
            f"(expected one of {valid}, ranking ones as name@K, e.g. ndcg@10)"
        )
    return name, int(k) if at else None


@dataclass
class Gate:
    """One gated publish of `run`'s full lists; `check` then `record` (see the module docstring).

    `problems` are the scorer's list sanity failures (`score.list_sanity`) for these lists."""

    settings: GateSettings
    run: dict
    task: str
    problems: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)
    row: dict | None = None  # the publish_log row, once checked

    @property
    def metric(self) -> str:
        return self.settings.metric or HEADLINE.get(self.task, HEADLINE["ranking"])

    def check(self, con: duckdb.DuckDBPyConnection) -> dict:
        """Measure the staged `publish_rows` and decide; a refusal is recorded, then raised as `Gated`."""
        figures = query_pl(
            con, (MONITORING_SQL / "publish_figures.sql").read_text(), {"snapshot": self.run["snapshot_id"]}
        ).row(0, named=True)
        candidate = measurement(con, self.run, self.metric, self.settings.protocol)
        live_value = live_measurement(con, figures["live_run_id"], self.metric, self.settings.protocol)
        failures, notes = self._checks(figures, candidate, live_value)
        status = "published"
        if failures:
            status = "forced" if self.settings.force and not figures["nonfinite"] else "gated"
        reason = "; ".join(failures + notes) or None
        if status == "forced":
            reason = "forced past the gate: " + reason
        self.row = {
            "logged_at": utcnow(),
            "run_id": self.run["run_id"],
            "model": self.run["model"],
            "status": status,
            **{
                k: figures[k]
                for k in (
                    "users",
                    "rows",
                    "items",
                    "coverage",
                    "new_item_share",
                    "overlap",
                    "overlap_users",
                    "top_n",
                    "live_run_id",
                )
            },
            "gate_metric": self.metric,
            "gate_protocol": self.settings.protocol,
            "candidate_value": candidate,
            "live_value": live_value,
            "tolerance": self.settings.tolerance,
            "reason": reason,
            "seconds": 0.0,
        }
        if status == "gated":
            with transaction(con, f"publish_log: run {self.run['run_id']} gated"):
                self.record(con)
            log.error("gate=refused run=%s reason=%s", self.run["run_id"], reason)
            forced_too = " (even with --force: scores must be finite)" if self.settings.force else ""
            raise Gated(
                f"gated: run {self.run['run_id']} ({self.run['model']}) was not published: "
                f"{'; '.join(failures)}; the previous lists stay{forced_too} "
                f"(publish anyway with --force)"
            )
        if status == "forced":
            log.warning("gate=forced run=%s reason=%s", self.run["run_id"], reason)
        else:
            log.info("gate=passed run=%s %s", self.run["run_id"], reason or "")
        return self.row

    def _checks(
        self, figures: dict, candidate: float | None, live: float | None
    ) -> tuple[list[str], list[str]]:
        """(failed checks, notes), each a short phrase saying by how much."""
        failures, notes = list(self.problems), []
        if figures["nonfinite"] and not any(p.startswith("scores not finite") for p in failures):
            failures.append(f"scores not finite: {figures['nonfinite']} of {figures['rows']} rows")
        if figures["live_items"] and figures["items"] < COVERAGE_COLLAPSE * figures["live_items"]:
            failures.append(
                f"coverage collapsed: {figures['items']} distinct items against "
                f"{figures['live_items']} in the live lists (under {COVERAGE_COLLAPSE:.0%})"
            )
        metric, higher = self.metric, higher_is_better(self.metric)
        if live is None:
            live_run = figures["live_run_id"]
            notes.append(
                "nothing live to compare with (first publish): passed"
                if live_run is None
                else f"no {metric} of the live run {live_run} on {self.settings.protocol} to compare with: passed"
            )
        elif candidate is None:
            failures.append(
                f"the candidate is not measured: no {metric} of {self.run['model']} on "
                f"{self.settings.protocol} for snapshot {self.run['snapshot_id']} (run `batchrec "
                f"evaluate --models {self.run['model']} --protocol {self.settings.protocol}` first)"
            )
        else:
            change = (candidate - live) / abs(live) if live else 0.0
            worse = -change if higher else change
            if worse > self.settings.tolerance:
                failures.append(
                    f"{metric} {candidate:.4f} is {worse:.1%} {'below' if higher else 'above'} the live "
                    f"run's {live:.4f} (tolerance {self.settings.tolerance:.0%})"
                )
            else:
                notes.append(f"{metric} {candidate:.4f} against the live run's {live:.4f} ({change:+.1%})")
        return failures, notes

    def record(self, con: duckdb.DuckDBPyConnection) -> None:
        """Insert the checked publish_log row (inside the caller's transaction)."""
        row = self.row | {"seconds": time.perf_counter() - self.started}
        con.execute(
            f"INSERT INTO publish_log ({', '.join(LOG_COLUMNS)}) VALUES ({', '.join('?' * len(LOG_COLUMNS))})",
            [row[c] for c in LOG_COLUMNS],
        )

    def summary(self) -> str:
        """The outcome for the command's summary line."""
        r = self.row
        what = {"published": "passed", "forced": "FORCED", "gated": "refused"}[r["status"]]
        return f"gate {what}: {r['reason'] or 'all checks passed'}"


def measurement(con: duckdb.DuckDBPyConnection, run: dict, metric: str, protocol: str) -> float | None:
    """The latest `metric` of `run`'s family fitted on its snapshot, measured on `protocol`."""
    name, k = parse_metric(metric)
    found = con.execute(
        (MONITORING_SQL / "measurement.sql").read_text(),
        {
            "model": run["model"],
            "snapshot": run["snapshot_id"],
            "protocol": protocol,
            "metric": name,
            "k": k,
            "run": run["run_id"],
        },
    ).fetchall()
    return found[0][0] if found else None


def live_measurement(
    con: duckdb.DuckDBPyConnection, live_run_id: str | None, metric: str, protocol: str
) -> float | None:
    """What the live run measured when it was published (publish_log), else its own measurement."""
    if live_run_id is None:
        return None
    logged = con.execute(
        "SELECT candidate_value FROM publish_log WHERE run_id = ? AND status <> 'gated' "
        "AND gate_metric = ? AND gate_protocol = ? AND candidate_value IS NOT NULL "
        "ORDER BY logged_at DESC LIMIT 1",
        [live_run_id, metric, protocol],
    ).fetchall()
    if logged:
        return logged[0][0]
    run = con.execute(
        "SELECT run_id, model, snapshot_id FROM model_runs WHERE run_id = ?", [live_run_id]
    ).fetchall()
    if not run:  # the live run's model_runs row is gone
        return None
    return measurement(con, dict(zip(("run_id", "model", "snapshot_id"), run[0])), metric, protocol)


# -- reading the log: `batchrec status` and the evaluation report's nights ----------------------
def recent_publishes(con: duckdb.DuckDBPyConnection, n: int = 7) -> pl.DataFrame:
    """The last `n` publish_log rows, oldest first (empty where the table does not exist yet)."""
    if not table_exists(con, "publish_log"):
        return pl.DataFrame()
    return query_pl(
        con,
        "SELECT * FROM (SELECT * FROM publish_log ORDER BY logged_at DESC LIMIT $n) ORDER BY logged_at",
        {"n": n},
    )


def night_lines(frame: pl.DataFrame) -> list[str]:
    """One line per publish_log row: when, status, run, size, the figures, the gate's numbers and why."""

    def pct(v):
        return "-" if v is None else f"{v:.1%}"

    lines = []
    for r in frame.iter_rows(named=True):
        overlap = "-" if r["overlap"] is None else f"{r['overlap']:.3f}"
        value = "-" if r["candidate_value"] is None else f"{r['candidate_value']:.4f}"
        live = "" if r["live_value"] is None else f" (live {r['live_value']:.4f})"
        line = (
            f"  {r['logged_at']:%Y-%m-%d %H:%M} {r['status']:<9} {r['run_id']}: {r['users']} users, "
            f"{r['rows']} rows, coverage {pct(r['coverage'])}, new items {pct(r['new_item_share'])}, "
            f"overlap@{r['top_n'] or '-'} {overlap}, {r['gate_metric']} {value}{live}, {r['seconds']:.1f} s"
        )
        if r["reason"]:
            line += f"; {r['reason']}"
        lines.append(line)
    return lines
