"""`batchrec score --pairs`: score given (user_id, item_id) pairs; and the user-id files of
`--users`."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import polars as pl
import torch

from batchrec.data import rating_range, snapshot_ids, train_counts
from batchrec.errors import BatchrecError
from batchrec.models.base import Recommender
from batchrec.scoring.inputs import check_fits_snapshot, check_snapshot_kept


def _read_table(path: Path, what: str) -> pl.DataFrame:
    try:
        if path.suffix.lower() == ".parquet":
            return pl.read_parquet(path)
        return pl.read_csv(path, schema_overrides={"user_id": pl.Utf8, "item_id": pl.Utf8})
    except (pl.exceptions.PolarsError, OSError) as exc:
        raise BatchrecError(f"{what} {path}: cannot read it ({str(exc).splitlines()[0]})") from None


def _int_column(df: pl.DataFrame, column: str, path: Path | str, csv: bool) -> np.ndarray:
    """An integer id column; names the first bad line (CSV) or row (Parquet)."""
    if column not in df.columns:
        raise BatchrecError(f"{path}: no {column!r} column (columns: {', '.join(df.columns) or 'none'})")
    values = df[column].cast(pl.Int64, strict=False)
    bad = values.is_null()
    if bad.any():
        at = int(bad.arg_max())
        where = f"line {at + 2}" if csv else f"row {at + 1}"
        value = df[column][at]
        raise BatchrecError(
            f"{path}, {where}, column {column}: "
            f"{'an empty value' if value is None else repr(value)} is not an integer id"
        )
    return values.to_numpy()


def read_users(path: str | Path) -> np.ndarray:
    """User ids from a file: one per line (an optional `user_id` header), or a CSV/Parquet with a
    `user_id` column."""
    path = Path(path)
    if path.suffix.lower() == ".parquet":
        return _int_column(pl.read_parquet(path), "user_id", path, csv=False)
    lines = path.read_text().splitlines()
    header = 1 if lines and lines[0].split(",")[0].strip().lower() == "user_id" else 0
    values = pl.Series([line.split(",")[0].strip() for line in lines[header:]], dtype=pl.Utf8)
    ids = values.cast(pl.Int64, strict=False)
    blank = values == ""
    bad = ids.is_null() & ~blank
    if bad.any():
        at = int(bad.arg_max())
        raise BatchrecError(f"{path}, line {at + header + 1}: {values[at]!r} is not an integer user id")
    return np.unique(ids.filter(~blank).to_numpy())


def _lookup(ids: np.ndarray, query: np.ndarray) -> np.ndarray:
    """Dense index of each raw id in `query` (-1 where absent)."""
    if not len(ids):
        return np.full(len(query), -1)
    order = np.argsort(ids, kind="stable")
    pos = np.searchsorted(ids[order], query).clip(max=len(ids) - 1)
    return np.where(ids[order][pos] == query, order[pos], -1)


def score_pair_frame(
    model: Recommender, run: dict, con, frame: pl.DataFrame, what: str | Path = "pairs", csv: bool = False
) -> pl.DataFrame:
    """`frame` (user_id, item_id, any other columns) with `score` and `fallback` columns added,
    rows in order: the run's model where it knows both ids, its fallback otherwise (an unknown
    user or item), rating models clipped to the snapshot's scale. `what` names the input in errors."""
    users, items = _int_column(frame, "user_id", what, csv), _int_column(frame, "item_id", what, csv)
    check_snapshot_kept(con, run)
    s = run["snapshot_id"]
    user_ids, item_ids = snapshot_ids(con, s)
    check_fits_snapshot(model, run, len(user_ids), len(item_ids))
    user_train, item_train = train_counts(con, s, run.get("protocol"), len(user_ids), len(item_ids))
    scale = rating_range(con, s)
    uidx, iidx = _lookup(user_ids, users), _lookup(item_ids, items)
    uidx = np.where(
        (uidx >= 0) & (user_train[np.maximum(uidx, 0)] > 0), uidx, -1
    )  # the model learned nothing else
    iidx = np.where((iidx >= 0) & (item_train[np.maximum(iidx, 0)] > 0), iidx, -1)
    known = (uidx >= 0) & (iidx >= 0)
    scores = np.empty(len(frame), np.float32)
    step = 1 << 20
    with torch.no_grad():
        for a in range(0, len(frame), step):
            ut = torch.from_numpy(uidx[a : a + step]).to(model.device)
            it = torch.from_numpy(iidx[a : a + step]).to(model.device)
            k = torch.from_numpy(known[a : a + step]).to(model.device)
            chunk = torch.empty(len(ut), device=model.device)
            if k.any():
                chunk[k] = model.score(ut[k], it[k]).float()
            if (~k).any():
                chunk[~k] = model.score_fallback(ut[~k], it[~k]).float()
            scores[a : a + step] = chunk.cpu().numpy()
    if model.task == "rating" and scale is not None:
        np.clip(scores, *scale, out=scores)
    return frame.with_columns(pl.Series("score", scores), pl.Series("fallback", ~known))


def score_pairs(model: Recommender, run: dict, con, pairs: Path, out: Path) -> str:
    """Score (user_id, item_id) pairs with the run's model; extra columns and row order kept."""
    frame = _read_table(pairs, "--pairs")
    result = score_pair_frame(model, run, con, frame, pairs, csv=pairs.suffix.lower() != ".parquet")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    if out.suffix.lower() == ".parquet":
        result.write_parquet(tmp)
    else:
        result.write_csv(tmp)
    os.replace(tmp, out)
    return (
        f"scored {len(frame)} pairs from {pairs} with run {run['run_id']} ({run['model']}): "
        f"{int(result['fallback'].sum())} by the fallback (unknown user or item) -> {out}"
    )
