"""The run registry: every read and write of `model_runs`, and where a run's artifact lives.

Two kinds of run share the table:

* a *shipped* run is fitted on every interaction of its snapshot (protocol NULL): what
  `batchrec score --model M` publishes (the latest one of the family) and what the nightly job's
  score step fingerprints;
* a *protocol* run is fitted on a protocol's train part for `batchrec evaluate`; it never saw each
  user's held-out events, so it is published only when named with `score --run RUN`.

Artifacts: `artifact_path` is stored relative to the folder of the warehouse file when the
artifact lies under it (the default, `<warehouse stem>.artifacts/<run_id>`), so a warehouse moved,
copied or mounted elsewhere together with its folder loads its models; an artifact root outside
that folder (`--artifacts`) is stored as given, an object-store URI (`s3://...`) too. Rows come
back decoded: params and metrics as dicts, `artifact_path` resolved against the folder of the database they were read from.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import duckdb

from batchrec.errors import BatchrecError
from batchrec.warehouse import scalar

RUN_COLUMNS = (
    "run_id",
    "model",
    "params",
    "snapshot_id",
    "protocol",
    "metrics",
    "artifact_path",
    "device",
    "fit_seconds",
    "created_at",
)
_COLS = ", ".join(RUN_COLUMNS)
_NEWEST = "ORDER BY created_at DESC, run_id DESC"


# -- artifact locations ------------------------------------------------------------------------
def database_folder(con: duckdb.DuckDBPyConnection) -> Path | None:
    """The folder of the database file `con` has open (None for an in-memory database)."""
    path = scalar(con, "SELECT path FROM duckdb_databases() WHERE database_name = current_database()")
    return Path(path).resolve().parent if path else None


def stored_artifact_path(warehouse_path: Path, artifact: Path | str) -> str:
    """What `model_runs.artifact_path` records for an artifact written at `artifact`: relative to
    the warehouse's folder when it lies under it, else the absolute path (an object-store URI:
    as it is)."""
    if isinstance(artifact, str) and "://" in artifact:
        return artifact
    folder, artifact = warehouse_path.resolve().parent, Path(artifact).resolve()
    return artifact.relative_to(folder).as_posix() if artifact.is_relative_to(folder) else str(artifact)


def _resolve_artifact(stored: str, folder: Path | None) -> str:
    if "://" in stored:  # a URI (e.g. a pyarrow.fs location): loaded as written
        return stored
    path = Path(stored)
    return str(path if path.is_absolute() or folder is None else folder / path)


# -- rows --------------------------------------------------------------------------------------
def _to_json(value) -> str:
    """JSON text with NaN/inf as null (JSON has no NaN; e.g. an RMSE over zero pairs)."""

    def clean(v):
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v

    return json.dumps(clean(value), allow_nan=False)


def insert_run(con: duckdb.DuckDBPyConnection, row: dict) -> None:
    """Record one run (a dict with every RUN_COLUMNS key; params and metrics as dicts)."""
    con.execute(
        f"INSERT INTO model_runs ({_COLS}) VALUES ({', '.join('?' * len(RUN_COLUMNS))})",
        [_to_json(row[k]) if k in ("params", "metrics") else row[k] for k in RUN_COLUMNS],
    )


def _decode(con: duckdb.DuckDBPyConnection, rows: list[tuple]) -> list[dict]:
    folder = database_folder(con) if rows else None
    out = []
    for values in rows:
        row = dict(zip(RUN_COLUMNS, values))
        row["params"], row["metrics"] = json.loads(row["params"]), json.loads(row["metrics"])
        row["artifact_path"] = _resolve_artifact(row["artifact_path"], folder)
        out.append(row)
    return out


def find_runs(
    con: duckdb.DuckDBPyConnection,
    *,
    model: str | None = None,
    snapshot_id: str | None = None,
    protocol: str | None = None,
    shipped: bool = False,
    limit: int | None = None,
) -> list[dict]:
    """Decoded runs, newest first, filtered by family, snapshot and protocol (`shipped`: only runs
    fitted on every interaction; otherwise `protocol=None` means any protocol)."""
    where, params = ["TRUE"], {}
    for column, value in (("model", model), ("snapshot_id", snapshot_id), ("protocol", protocol)):
        if value is not None:
            where.append(f"{column} = ${column}")
            params[column] = value
    if shipped:
        where.append("protocol IS NULL")
    sql = f"SELECT {_COLS} FROM model_runs WHERE {' AND '.join(where)} {_NEWEST}"
    if limit is not None:
        sql += f" LIMIT {int(limit)}"
    return _decode(con, con.sql(sql, params=params).fetchall())


def latest_shipped_run_id(con: duckdb.DuckDBPyConnection, model: str | None = None) -> str | None:
    """Id of the newest run fitted on every interaction (of `model`), or None."""
    found = find_runs(con, model=model, shipped=True, limit=1)
    return found[0]["run_id"] if found else None


def resolve_run(
    con: duckdb.DuckDBPyConnection, run: str | None = None, model: str | None = None, shipped: bool = False
) -> dict:
    """A decoded run: by id (any protocol; must be of `model` when that is given), else
    (None / 'latest') the newest run of `model` or of any family, only shipped runs when
    `shipped`. An unknown or missing run is a one-line error naming what there is."""
    if run not in (None, "latest"):
        found = _decode(
            con, con.execute(f"SELECT {_COLS} FROM model_runs WHERE run_id = ?", [run]).fetchall()
        )
        if found and model is not None and found[0]["model"] != model:
            raise BatchrecError(f"run {run!r} is a {found[0]['model']} model, not {model}")
    else:
        found = find_runs(con, model=model, shipped=shipped, limit=1)
    if found:
        return found[0]
    recent = [r[0] for r in con.execute(f"SELECT run_id FROM model_runs {_NEWEST} LIMIT 5").fetchall()]
    of = f" of model {model!r}" if model is not None else ""
    if run not in (None, "latest"):
        what = f"unknown run {run!r}"
    elif shipped and scalar(
        con, "SELECT count(*) FROM model_runs WHERE ? IS NULL OR model = ?", [model, model]
    ):
        # only protocol runs: they never saw each user's held-out events, so they do not ship by default
        raise BatchrecError(
            f"no shipped run{of} (fitted on every interaction): train one with `batchrec train "
            f"{model or 'MODEL'}`, or publish a protocol run on purpose with --run RUN (recent runs: {', '.join(recent)})"
        )
    else:
        what = f"no runs{of}" if model is not None else "no model runs"
    hint = f"recent runs: {', '.join(recent)}" if recent else "run `batchrec train MODEL` first"
    raise BatchrecError(f"{what}; {hint}")


def live_runs(con: duckdb.DuckDBPyConnection) -> list[dict]:
    """The runs `recommendations` holds now, newest scoring first: run id, family, protocol, users,
    rows and when they were scored. A `score --users` run leaves two or more runs live side by side."""
    rows = con.sql("""
        SELECT r.run_id, m.model, m.protocol, count(DISTINCT r.user_id) AS users, count(*) AS rows,
               max(r.scored_at) AS scored_at
        FROM recommendations r LEFT JOIN model_runs m USING (run_id)
        GROUP BY ALL ORDER BY scored_at DESC, r.run_id""").fetchall()
    return [dict(zip(("run_id", "model", "protocol", "users", "rows", "scored_at"), r)) for r in rows]
