"""Everyday read-only commands: `recommend`, `status`, `sql`.

They open the warehouse read-only, so they never block or damage a writer's work (while a writer
holds the DuckDB file they fail at once with the usual "warehouse is busy" line).
"""

from __future__ import annotations

import io

import polars as pl

from batchrec.errors import BatchrecError
from batchrec.warehouse import Warehouse, open_readonly_sandboxed, query_pl, scalar, table_exists


def _frame_text(df: pl.DataFrame, max_rows: int = 50) -> str:
    with pl.Config(tbl_rows=max_rows, tbl_cols=-1, tbl_width_chars=160, fmt_str_lengths=60,
                   tbl_hide_dataframe_shape=True, tbl_hide_column_data_types=True):
        return str(df)


def sql_text(wh: Warehouse, query: str, fmt: str = "table") -> str:
    """Run one query on a read-only, sandboxed connection (no file, network or settings access:
    `open_readonly_sandboxed`); a table for people, CSV for scripts."""
    import duckdb

    with open_readonly_sandboxed(wh.path) as con:
        try:
            result = con.sql(query)
            df = None if result is None else result.pl()  # the query runs here
        except duckdb.Error as exc:
            sandboxed = isinstance(exc, duckdb.PermissionException) or "configuration has been locked" in str(exc)
            raise BatchrecError(f"query failed: {str(exc).splitlines()[0]}"
                                + (" (expected a read-only query of the warehouse's own tables)" if sandboxed else "")
                                ) from None
    if df is None:  # a statement without rows that the sandbox allows (e.g. CREATE TEMP TABLE)
        return "ok (no rows)"
    if fmt == "csv":
        buf = io.StringIO()
        df.write_csv(buf)
        return buf.getvalue().rstrip("\n")
    return _frame_text(df, max_rows=1000)


def recommend_text(wh: Warehouse, user_id: int, history: int = 10) -> str:
    """A user's current list (titles, scores, reasons) and their most recent ratings."""
    with wh.connect(read_only=True) as con:
        recs = query_pl(con, """
            SELECT rank, item_id, title, round(score, 3) AS score, reason
            FROM recommendations_with_titles WHERE user_id = $u ORDER BY rank""", {"u": user_id})
        hist = query_pl(con, """
            SELECT r.ts::DATE AS date, r.item_id, i.title, r.rating
            FROM ratings r LEFT JOIN items i USING (item_id)
            WHERE r.user_id = $u ORDER BY r.ts DESC, r.item_id LIMIT $n""", {"u": user_id, "n": history})
        run = scalar(con, "SELECT any_value(run_id) || ' at ' || max(scored_at)::VARCHAR FROM recommendations")
    if recs.is_empty() and hist.is_empty():
        raise BatchrecError(f"user {user_id} has no recommendations and no ratings in {wh.path}")
    parts = [f"user {user_id}: recommendations from run {run}" if run else f"user {user_id}: no recommendations yet "
             "(run `batchrec score`)"]
    if not recs.is_empty():
        parts.append(_frame_text(recs))
    parts.append(f"recent history ({len(hist)} of their latest ratings):")
    parts.append(_frame_text(hist) if not hist.is_empty() else "  (none: a cold-start user)")
    return "\n".join(parts)


def status_text(wh: Warehouse) -> str:
    """Tables and row counts, latest snapshot, runs, last scoring and evaluation, job failures."""
    with wh.connect(read_only=True) as con:
        tables = [r[0] for r in con.sql(
            "SELECT table_name FROM information_schema.tables WHERE table_type = 'BASE TABLE' "
            "AND table_name NOT LIKE '%__staging' ORDER BY 1").fetchall()]
        counts = pl.DataFrame({"table": tables, "rows": [scalar(con, f'SELECT count(*) FROM "{t}"') for t in tables]})
        lines = [f"warehouse {wh.path} (schema v{scalar(con, 'SELECT max(version) FROM schema_version')})",
                 _frame_text(counts)]
        snap = con.sql("SELECT snapshot_id, as_of, created_at FROM feature_snapshots "
                       "ORDER BY created_at DESC LIMIT 1").fetchall()
        lines.append(f"latest snapshot: {snap[0][0]} as of {snap[0][1]} (built {snap[0][2]})" if snap
                     else "latest snapshot: none (run `batchrec features`)")
        runs = query_pl(con, """SELECT run_id, model, coalesce(protocol, 'all') AS trained_on, device,
                                       round(fit_seconds, 1) AS fit_s, created_at
                                FROM model_runs ORDER BY created_at DESC LIMIT 5""")
        lines.append("recent model runs:\n" + (_frame_text(runs) if not runs.is_empty() else "  none"))
        scored = con.sql("SELECT any_value(run_id), max(scored_at), count(DISTINCT user_id), count(*) "
                         "FROM recommendations").fetchall()[0]
        lines.append(f"last scoring: run {scored[0]} at {scored[1]}: {scored[2]} users, {scored[3]} rows"
                     if scored[0] else "last scoring: none")
        evals = query_pl(con, """
            WITH last AS (SELECT max(evaluated_at) AS t FROM evaluations)
            SELECT run_id, protocol, metric || coalesce('@' || k::VARCHAR, '') AS metric, round(value, 4) AS value
            FROM evaluations, last WHERE evaluated_at = last.t
              AND metric IN ('rmse', 'ndcg', 'recall', 'precision') ORDER BY run_id, metric""")
        lines.append("last evaluation:\n" + (_frame_text(evals) if not evals.is_empty() else "  none"))
        if table_exists(con, "job_runs"):
            lines.append("recent job failures:\n" + _job_failures(con))
    return "\n".join(lines)


def _job_failures(con) -> str:
    """The last failed job steps, with steps still `running` whose process is gone shown as
    failed (killed): the next `batchrec run` records them so."""
    from batchrec.jobs import process_gone

    failed = query_pl(con, """SELECT job, step, started,
                                     CASE WHEN error LIKE 'killed:%' THEN 'failed (killed)' ELSE status END AS status,
                                     error
                              FROM job_runs WHERE status = 'failed' ORDER BY started DESC LIMIT 5""")
    if scalar(con, "SELECT count(*) FROM information_schema.columns WHERE table_name = 'job_runs' AND column_name = 'pid'"):
        running = query_pl(con, """SELECT job, step, started, pid, host, process_start FROM job_runs
                                   WHERE status = 'running' ORDER BY started DESC""")
        gone = [process_gone(*r) for r in running.select("pid", "host", "process_start").iter_rows()]
        killed = running.filter(pl.Series(gone, dtype=pl.Boolean)).select(
            "job", "step", "started", status=pl.lit("failed (killed)"),
            error=pl.format("killed: process {} on {} ended while the step was running", "pid", "host"))
        failed = pl.concat([killed, failed], how="vertical_relaxed").sort("started", descending=True).head(5)
    return _frame_text(failed) if not failed.is_empty() else "  none"
