"""Everyday read-only commands: `recommend`, `status`, `sql`.

They read the serving database (see serving.py), never the warehouse itself, so they never block a
writer's work nor wait for it: they see the state of the last publishing step.
"""

from __future__ import annotations

import io

import duckdb
import polars as pl

from batchrec import serving
from batchrec.errors import BatchrecError
from batchrec.gate import night_lines, recent_publishes
from batchrec.processes import process_gone
from batchrec.runs import find_runs, live_runs
from batchrec.warehouse import Warehouse, open_readonly_sandboxed, query_pl, scalar, table_exists


def _frame_text(df: pl.DataFrame, max_rows: int = 50) -> str:
    with pl.Config(
        tbl_rows=max_rows,
        tbl_cols=-1,
        tbl_width_chars=160,
        fmt_str_lengths=60,
        tbl_hide_dataframe_shape=True,
        tbl_hide_column_data_types=True,
    ):
        return str(df)


def sql_text(wh: Warehouse, query: str, fmt: str = "table") -> str:
    """Run one query on the serving database, on a read-only, sandboxed connection (no file,
    network or settings access: `open_readonly_sandboxed`); a table for people, CSV for scripts."""
    with open_readonly_sandboxed(serving.reader_path(wh)) as con:
        try:
            result = con.sql(query)
            df = None if result is None else result.pl()  # the query runs here
        except duckdb.Error as exc:
            sandboxed = isinstance(exc, duckdb.PermissionException) or "configuration has been locked" in str(
                exc
            )
            raise BatchrecError(
                f"query failed: {str(exc).splitlines()[0]}"
                + (" (expected a read-only query of the warehouse's own tables)" if sandboxed else "")
            ) from None
    if df is None:  # a statement without rows that the sandbox allows (e.g. CREATE TEMP TABLE)
        return "ok (no rows)"
    if fmt == "csv":
        buf = io.StringIO()
        df.write_csv(buf)
        return buf.getvalue().rstrip("\n")
    return _frame_text(df, max_rows=1000)


def _live_lines(live: list[dict]) -> list[str]:
    """One line per run that `recommendations` holds, newest scoring first."""
    return [
        f"  run {r['run_id']} ({r['model'] or 'unknown model'}, trained on "
        f"{r['protocol'] or 'every interaction'}): {r['users']} users, {r['rows']} rows, scored at {r['scored_at']}"
        for r in live
    ]


def recommend_text(wh: Warehouse, user_id: int, history: int = 10) -> str:
    """A user's current list (titles, scores, reasons) and their most recent ratings."""
    with serving.connect(wh) as con:
        recs = query_pl(
            con,
            """
            SELECT rank, item_id, title, round(score, 3) AS score, reason
            FROM recommendations_with_titles WHERE user_id = $u ORDER BY rank""",
            {"u": user_id},
        )
        hist = query_pl(
            con,
            """
            SELECT r.ts::DATE AS date, r.item_id, i.title, r.rating
            FROM ratings r LEFT JOIN items i USING (item_id)
            WHERE r.user_id = $u ORDER BY r.ts DESC, r.item_id LIMIT $n""",
            {"u": user_id, "n": history},
        )
        mine = con.execute(
            "SELECT run_id, max(scored_at) FROM recommendations WHERE user_id = ? GROUP BY run_id", [user_id]
        ).fetchall()
        live = live_runs(con)
    if recs.is_empty() and hist.is_empty():
        raise BatchrecError(f"user {user_id} has no recommendations and no ratings in {wh.path}")
    if mine:
        parts = [f"user {user_id}: recommendations from run {mine[0][0]} scored at {mine[0][1]}"]
        if len(live) > 1:  # e.g. after `score --users`: say which runs serve whom
            parts += [f"recommendations now hold {len(live)} runs:", *_live_lines(live)]
        parts.append(_frame_text(recs))
    else:
        parts = [f"user {user_id}: no recommendations yet (run `batchrec score`)"]
    parts.append(f"recent history ({len(hist)} of their latest ratings):")
    parts.append(_frame_text(hist) if not hist.is_empty() else "  (none: a cold-start user)")
    return "\n".join(parts)


def _shipped_per_family(con, live: list[dict]) -> pl.DataFrame:
    """Per model family: the run that ships (latest fitted on every interaction), the run(s) live in
    `recommendations` and when they were scored."""
    shipped: dict[str, str] = {}
    for r in find_runs(con, shipped=True):  # newest first: the first of a family is its shipped run
        shipped.setdefault(r["model"], r["run_id"])
    families = sorted(set(shipped) | {r["model"] for r in live if r["model"]})
    rows = []
    for family in families:
        mine = [r for r in live if r["model"] == family]
        rows.append(
            {
                "model": family,
                "shipped_run": shipped.get(family, "(none)"),
                "live_run": ", ".join(r["run_id"] for r in mine) or "(not scored)",
                "scored_at": str(mine[0]["scored_at"]) if mine else "",
                "users": sum(r["users"] for r in mine),
            }
        )
    return pl.DataFrame(
        rows,
        schema={
            "model": pl.Utf8,
            "shipped_run": pl.Utf8,
            "live_run": pl.Utf8,
            "scored_at": pl.Utf8,
            "users": pl.Int64,
        },
    )


NIGHTS_SHOWN = 7  # publish_log rows `batchrec status` shows


def status_text(wh: Warehouse) -> str:
    """Tables and row counts, latest snapshot, runs, what is live per model family, last
    evaluation, job failures: from the serving database (as of the last publishing step)."""
    with serving.connect(wh) as con:
        if table_exists(con, "warehouse_tables"):
            counts = query_pl(con, 'SELECT table_name AS "table", rows FROM warehouse_tables ORDER BY 1')
            built = scalar(con, "SELECT built_at FROM serving_info")
            source = f"; serving copy {wh.serving_path} built at {built}"
        else:
            tables = [
                r[0]
                for r in con.sql(
                    "SELECT table_name FROM information_schema.tables WHERE table_type = 'BASE TABLE' "
                    "AND table_name NOT LIKE '%__staging' ORDER BY 1"
                ).fetchall()
            ]
            counts = pl.DataFrame(
                {"table": tables, "rows": [scalar(con, f'SELECT count(*) FROM "{t}"') for t in tables]}
            )
            source = ""
        lines = [
            f"warehouse {wh.path} (schema v{scalar(con, 'SELECT max(version) FROM schema_version')}){source}",
            _frame_text(counts),
        ]
        snap = con.sql(
            "SELECT snapshot_id, as_of, created_at FROM feature_snapshots ORDER BY created_at DESC LIMIT 1"
        ).fetchall()
        lines.append(
            f"latest snapshot: {snap[0][0]} as of {snap[0][1]} (built {snap[0][2]})"
            if snap
            else "latest snapshot: none (run `batchrec features`)"
        )
        recent = find_runs(con, limit=5)
        runs = pl.DataFrame(
            [
                {
                    "run_id": r["run_id"],
                    "model": r["model"],
                    "trained_on": r["protocol"] or "all",
                    "device": r["device"],
                    "fit_s": round(r["fit_seconds"], 1),
                    "created_at": r["created_at"],
                }
                for r in recent
            ]
        )
        lines.append("recent model runs:\n" + (_frame_text(runs) if recent else "  none"))
        live = live_runs(con)
        lines.append(
            "live recommendations, per run:\n" + ("\n".join(_live_lines(live)) if live else "  none")
        )
        per_family = _shipped_per_family(con, live)
        lines.append(
            "per model family, the shipped run (latest fitted on every interaction) and the live one:\n"
            + (_frame_text(per_family) if not per_family.is_empty() else "  none")
        )
        evals = query_pl(
            con,
            """
            WITH last AS (SELECT max(evaluated_at) AS t FROM evaluations)
            SELECT run_id, protocol, metric || coalesce('@' || k::VARCHAR, '') AS metric, round(value, 4) AS value
            FROM evaluations, last WHERE evaluated_at = last.t
              AND metric IN ('rmse', 'ndcg', 'recall', 'precision') ORDER BY run_id, metric""",
        )
        lines.append("last evaluation:\n" + (_frame_text(evals) if not evals.is_empty() else "  none"))
        nights = recent_publishes(con, NIGHTS_SHOWN)
        lines.append(
            f"last {NIGHTS_SHOWN} publishes (publish_log; gated: refused by the publish gate, lists kept):\n"
            + ("\n".join(night_lines(nights)) if not nights.is_empty() else "  none")
        )
        if table_exists(con, "job_runs"):
            lines.append("recent job failures:\n" + _job_failures(con))
    return "\n".join(lines)


def _job_failures(con) -> str:
    """The last failed job steps, with steps still `running` whose process is gone shown as
    failed (killed): the next `batchrec run` records them so."""

    failed = query_pl(
        con,
        """SELECT job, step, started,
                                     CASE WHEN error LIKE 'killed:%' THEN 'failed (killed)' ELSE status END AS status,
                                     error
                              FROM job_runs WHERE status IN ('failed', 'gated') ORDER BY started DESC LIMIT 5""",
    )
    if scalar(
        con,
        "SELECT count(*) FROM information_schema.columns WHERE table_name = 'job_runs' AND column_name = 'pid'",
    ):
        running = query_pl(
            con,
            """SELECT job, step, started, pid, host, process_start FROM job_runs
                                   WHERE status = 'running' ORDER BY started DESC""",
        )
        gone = [process_gone(*r) for r in running.select("pid", "host", "process_start").iter_rows()]
        killed = running.filter(pl.Series(gone, dtype=pl.Boolean)).select(
            "job",
            "step",
            "started",
            status=pl.lit("failed (killed)"),
            error=pl.format("killed: process {} on {} ended while the step was running", "pid", "host"),
        )
        failed = pl.concat([killed, failed], how="vertical_relaxed").sort("started", descending=True).head(5)
    return _frame_text(failed) if not failed.is_empty() else "  none"
