"""The tuning registry: every read and write of `tuning_trials` and `tuned_params`.

`batchrec tune` (batchrec/tune.py) writes one `tuning_trials` row per finished trial and, when the
study ends, one `tuned_params` row: the family's tuned setting. Training reads the newest setting
of a family (`batchrec train FAMILY --tuned`, a job's `params = "tuned"`); it sits below the steps
so that train and the job runner read it without importing the tuner (and Optuna).
"""

from __future__ import annotations

import json
import logging
import math

import duckdb

from batchrec.warehouse import Warehouse, table_exists

log = logging.getLogger("batchrec.tuned")

TRIAL_COLUMNS = (
    "study",
    "trial",
    "family",
    "protocol",
    "metric",
    "snapshot_id",
    "params",
    "value",
    "state",
    "intermediate",
    "error",
    "seconds",
    "finished_at",
)
TUNED_COLUMNS = (
    "family",
    "tuned_at",
    "study",
    "protocol",
    "metric",
    "snapshot_id",
    "params",
    "value",
    "default_value",
    "trials",
)
_JSON = ("params", "intermediate")


def _finite(value):
    return value if value is None or math.isfinite(value) else None


def insert_trial(con: duckdb.DuckDBPyConnection, row: dict) -> None:
    """Record one finished trial (params and intermediate as Python values)."""
    values = [
        json.dumps(row[k]) if k in _JSON else _finite(row[k]) if k == "value" else row[k]
        for k in TRIAL_COLUMNS
    ]
    con.execute(
        f"INSERT INTO tuning_trials ({', '.join(TRIAL_COLUMNS)}) VALUES ({', '.join('?' * len(TRIAL_COLUMNS))})",
        values,
    )


def study_trials(con: duckdb.DuckDBPyConnection, study: str) -> list[dict]:
    """The finished trials of `study`, by trial number, decoded."""
    rows = con.execute(
        f"SELECT {', '.join(TRIAL_COLUMNS)} FROM tuning_trials WHERE study = ? ORDER BY trial", [study]
    ).fetchall()
    out = []
    for values in rows:
        row = dict(zip(TRIAL_COLUMNS, values))
        for key in _JSON:
            row[key] = json.loads(row[key]) if row[key] is not None else None
        out.append(row)
    return out


def insert_tuned(con: duckdb.DuckDBPyConnection, row: dict) -> None:
    """Record a study's outcome as the family's tuned setting."""
    values = [json.dumps(row[k]) if k == "params" else row[k] for k in TUNED_COLUMNS]
    con.execute(
        f"INSERT INTO tuned_params ({', '.join(TUNED_COLUMNS)}) VALUES ({', '.join('?' * len(TUNED_COLUMNS))})",
        values,
    )


def latest_tuned(con: duckdb.DuckDBPyConnection, family: str) -> dict | None:
    """The newest tuned setting of `family` (params decoded), or None."""
    if not table_exists(con, "tuned_params"):  # a warehouse opened read-only before its migration
        return None
    found = con.execute(
        f"SELECT {', '.join(TUNED_COLUMNS)} FROM tuned_params WHERE family = ? "
        "ORDER BY tuned_at DESC LIMIT 1",
        [family],
    ).fetchall()
    if not found:
        return None
    row = dict(zip(TUNED_COLUMNS, found[0]))
    row["params"] = json.loads(row["params"])
    return row


def tuned_or_defaults(wh: Warehouse, family: str) -> tuple[dict, str]:
    """The parameters of `family`'s tuned setting and a few words saying where they come from; its
    defaults ({}) when the family has none, which is logged (the nightly job falls back to them)."""
    found = None
    if wh.path.exists():
        with wh.connect(read_only=True) as con:
            found = latest_tuned(con, family)
    if found is None:
        log.warning(
            'family=%s params=defaults reason="no tuned setting (run `batchrec tune %s`)"', family, family
        )
        return {}, "defaults (no tuned setting)"
    log.info("family=%s params=tuned study=%s value=%.5g", family, found["study"], found["value"])
    return dict(
        found["params"]
    ), f"tuned (study {found['study']}, valid {found['metric']} {found['value']:.4f})"
