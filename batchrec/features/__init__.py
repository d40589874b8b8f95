"""The feature store: point-in-time feature snapshots built by DuckDB SQL (sql/features) and Polars.

`build_snapshot` / `list_snapshots` back `batchrec features`; `latest_snapshot_id` and
`resolve_snapshot` are how the other steps find the snapshot they read.
"""

from batchrec.features.params import PROTOCOLS
from batchrec.features.snapshots import (
    Snapshot,
    build_snapshot,
    latest_snapshot_id,
    list_snapshots,
    make_snapshot,
    resolve_snapshot,
)

__all__ = [
    "PROTOCOLS",
    "Snapshot",
    "build_snapshot",
    "latest_snapshot_id",
    "list_snapshots",
    "make_snapshot",
    "resolve_snapshot",
]
