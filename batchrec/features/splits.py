"""Split protocols: which interactions of a snapshot are held out (valid/test) under each rule.

Each protocol is one SQL file `sql/features/NNN_split_<protocol>.sql` that inserts its held-out
rows into `split_holdout`; everything else in `interactions` is that protocol's train part (the
`splits` view shows the full labelling). The rules are in the SQL files' headers. Randomness
comes only from a seeded hash of (user_idx, item_idx), so the same snapshot parameters give the
same splits. This module resolves the time cuts of global_temporal and as_of (exact order
statistics, recorded with the parameters) and records each protocol's part sizes in
`split_protocols`.
"""

from __future__ import annotations

import json
import math
import re
from datetime import datetime
from pathlib import Path

import duckdb

from batchrec.errors import BatchrecError
from batchrec.features.params import PROTOCOLS, protocol_params
from batchrec.warehouse import run_sql_file, scalar

_SPLIT_FILE = re.compile(r"^\d+_split_(\w+)\.sql$")

# Protocol parameters renamed for SQL: run_sql_file binds every `$key` found in a statement, and
# `$n` would also be found inside `$n_valid`.
_SQL_NAMES = {"n": "n_last"}


def split_files(sql_dir: Path) -> dict[str, Path]:
    """protocol name -> its SQL file."""
    found = {}
    for path in sorted(sql_dir.glob("*.sql")):
        match = _SPLIT_FILE.match(path.name)
        if match:
            found[match.group(1)] = path
    missing = set(PROTOCOLS) - set(found)
    if missing:
        raise BatchrecError(f"{sql_dir}: no split file for protocol(s) {', '.join(sorted(missing))}")
    return found


def _latest_from(con: duckdb.DuckDBPyConnection, k: int, before: datetime | None = None) -> datetime | None:
    """Timestamp of the k-th latest interaction (among those before `before`); None when k = 0.

    An exact order statistic without a sort: DuckDB's quantile_disc is the nearest-rank quantile
    (the ceil(q*n)-th smallest), and q in the middle of rank n-k+1's interval selects it exactly.
    """
    n = scalar(
        con,
        "SELECT count(*) FROM snap_interactions WHERE $before IS NULL OR ts < $before",
        {"before": before},
    )
    if k <= 0 or n == 0:
        return None
    q = (n - min(k, n) + 0.5) / n
    return scalar(
        con,
        "SELECT quantile_disc(ts, $q) FROM snap_interactions WHERE $before IS NULL OR ts < $before",
        {"q": q, "before": before},
    )


def _time_cuts(con: duckdb.DuckDBPyConnection, protocol: str, own: dict, n: int, as_of: datetime) -> dict:
    """test_from / valid_from of the time-cut protocols (global_temporal, as_of)."""
    if protocol == "global_temporal":
        test_from = _latest_from(con, math.floor(own["test_frac"] * n))
    elif own["cutoff"] is None:  # as_of by default: the latest tenth is test
        test_from = _latest_from(con, math.floor(0.1 * n))
    else:
        test_from = datetime.fromisoformat(own["cutoff"])
        first_ts = scalar(con, "SELECT min(ts) FROM snap_interactions")
        if not first_ts < test_from < as_of:
            raise BatchrecError(
                f"bad value for parameter as_of.cutoff: {own['cutoff']!r} (expected a time after the "
                f"snapshot's first interaction {first_ts} and before its as_of {as_of})"
            )
    valid_from = _latest_from(con, math.floor(own["valid_frac"] * n), before=test_from)
    return {"test_from": test_from, "valid_from": valid_from}


def build_split(
    con: duckdb.DuckDBPyConnection,
    path: Path,
    protocol: str,
    snapshot_id: str,
    as_of: datetime,
    values: dict,
    n_interactions: int,
) -> dict[str, int]:
    """Insert one protocol's held-out rows and its `split_protocols` row; returns the part sizes.

    Reads the build's temp table `snap_interactions` (see 010_snapshot_scope.sql).
    """
    own = protocol_params(values, protocol)
    bind = {_SQL_NAMES.get(k, k): v for k, v in own.items()}
    if protocol in ("global_temporal", "as_of"):
        cuts = _time_cuts(con, protocol, own, n_interactions, as_of)
        bind.update(cuts)
        own.update({k: v and v.isoformat(sep=" ") for k, v in cuts.items()})
    run_sql_file(con, path, {**bind, "snapshot_id": snapshot_id})
    held = dict(
        con.execute(
            "SELECT part, count(*) FROM split_holdout WHERE snapshot_id = ? AND protocol = ? GROUP BY part",
            [snapshot_id, protocol],
        ).fetchall()
    )
    sizes = {
        "train": n_interactions - sum(held.values()),
        "valid": held.get("valid", 0),
        "test": held.get("test", 0),
    }
    con.execute(
        "INSERT INTO split_protocols VALUES (?, ?, ?, ?, ?, ?)",
        [
            snapshot_id,
            protocol,
            json.dumps(own, sort_keys=True),
            sizes["train"],
            sizes["valid"],
            sizes["test"],
        ],
    )
    return sizes
