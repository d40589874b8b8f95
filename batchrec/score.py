"""Nightly scoring: every user's top-N into `recommendations`, blocked, explained, atomic, shardable.

`batchrec score` (`score_command`) runs in three steps:

1. Read (one short read-only session): the run, its model artifact, and from the run's snapshot
   the users, items, seen items and content features (`load_inputs`). Users in the raw tables
   but not in the snapshot are appended as cold rows.
2. Score in user blocks sized by `--memory-budget` (`blocked_topk`): one matmul per block for
   factor models (`model.score` for the rest) against the items the model knows, seen items set
   to -inf, a top-k per row (`batchrec.topk`), and the "because you rated <title>" anchor found
   in the same pass (`explain_anchors`). Users the model cannot serve get a genre/tag profile
   ranking, or popularity when nothing is known about them. No per-row Python anywhere.
3. Publish: the new rows wait in memory (an Arrow table; shards: their Parquet files) while
   one transaction moves the current `recommendations` to `recommendation_history`, expires old
   history and inserts the new run. The DuckDB file is not held while scoring, so readers see
   the old run until the commit and the new one after; a crash or kill -9 before the commit
   leaves the old run in place.

`--shard i/N` scores a fixed hash partition of users to a Parquet file (no lock, read-only
warehouse) and `--publish RUN` swaps in the union of a run's N shards the same way.
`topn` is the blocked core that evaluation shares, so what is measured is what ships.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Callable

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import scipy.sparse as sp
import torch

from batchrec import options
from batchrec.errors import BatchrecError, CorruptArtifact, Gated, WarehouseBusy
from batchrec.gate import DEFAULT_GATE, Gate, GateSettings
from batchrec.logs import progress as progress_bar
from batchrec.models.base import Recommender
from batchrec.runs import resolve_run
from batchrec.serving import refresh as refresh_serving
from batchrec.topk import row_topk
from batchrec.warehouse import Warehouse, scalar, transaction, utcnow

log = logging.getLogger("batchrec.score")

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)B?\s*$", re.I)
_SHARD = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")

# Test hook: seconds to sleep between scoring and publishing (lets tests kill -9 or read there).
PAUSE_ENV = "BATCHREC_SCORE_PAUSE_BEFORE_PUBLISH"

EXPLAIN_ANCHORS = 32  # liked items per user that explanations consider (a fixed sample beyond that)
EXPLAIN_ENTRIES = 1 << 17  # padded (user, liked item) pairs per explanation batch
EXPLAIN_DIMS = 32  # item vectors for explanations are reduced to this many dimensions
CONTENT_WEIGHT = 0.7  # cold-start blend: profile similarity vs log popularity
POOL_MARGIN = 4  # extra candidates per row rescored one by one before the final top-n
PUBLISH_WAIT_S = 60.0  # how long the publish waits for other processes to close the DuckDB file

# reason kinds (the `reason` text is built from these in one vectorised pass)
MODEL, BECAUSE, GENRE, TAG, POPULAR = range(5)


def parse_memory_budget(text: str) -> int:
    """'512MB', '2GB', '1.5G', '100000' -> bytes."""
    m = _SIZE.match(str(text))
    if not m:
        raise BatchrecError(f"--memory-budget {text!r} is not a size like 512MB or 2GB")
    value = float(m.group(1)) * 1024 ** " KMGT".index(m.group(2).upper() or " ")
    if value < 1024 * 1024:
        raise BatchrecError(f"--memory-budget {text!r} is too small (at least 1MB)")
    return int(value)


def parse_shard(text: str) -> tuple[int, int]:
    """'2/8' -> (2, 8)."""
    m = _SHARD.match(str(text))
    if not m or not int(m.group(1)) < int(m.group(2)):
        raise BatchrecError(f"--shard expects i/N with 0 <= i < N (got {text!r})")
    return int(m.group(1)), int(m.group(2))


def mix64(values: np.ndarray) -> np.ndarray:
    """A fixed 64-bit hash of integers (splitmix64's finaliser): the same on every machine and
    Python, unlike the salted built-in hash."""
    x = np.asarray(values).astype(np.uint64)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def shard_of(user_ids: np.ndarray, n_shards: int) -> np.ndarray:
    """Shard of each raw user id: mix64(user_id) mod N."""
    return (mix64(user_ids) % np.uint64(n_shards)).astype(np.int64)


# -- the blocked core -------------------------------------------------------------------------
def block_size(n_items: int, memory_budget: int) -> int:
    """Users per block so that the score block (+ a mask copy) fits in the budget."""
    return max(1, memory_budget // (max(n_items, 1) * 4 * 2))


def _ragged(indptr: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray | slice]:
    """For CSR rows `rows`: (position in `rows`, offsets into indices) of every stored entry."""
    starts = indptr[rows]
    counts = indptr[rows + 1] - starts
    pos = np.repeat(np.arange(len(rows)), counts)
    if len(rows) and rows[-1] - rows[0] == len(rows) - 1 and (np.diff(rows) == 1).all():
        return pos, slice(starts[0], starts[0] + counts.sum())  # consecutive rows: one slice, no copy
    first = np.cumsum(counts) - counts
    return pos, np.repeat(starts - first, counts) + np.arange(counts.sum())


def blocked_topk(
    score_block: Callable[[np.ndarray], torch.Tensor],
    rows: np.ndarray,
    n: int,
    n_cols: int,
    exclude: tuple = (),
    col_of: np.ndarray | None = None,
    memory_budget: int = 1 << 30,
    on_block: Callable[[slice, np.ndarray, np.ndarray], None] | None = None,
    rescore: Callable[[np.ndarray, torch.Tensor], torch.Tensor] | None = None,
    progress: Callable[[int], object] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-`n` columns per row, scoring `block_size` rows at a time.

    `score_block(rows)` returns a fresh contiguous float32 [len(rows), n_cols] tensor; every
    stored (row, item) of each CSR in `exclude` is set to -inf (items mapped to columns by
    `col_of`, -1 = not a column). `on_block(span, rows, cols)` sees each block's top columns.
    Returns (cols int64 [len(rows), n], scores float32), padded with -1 / NaN where
    a row has fewer than `n` finite scores.

    A row's result never depends on which other rows share its block (so shards, `--users` runs
    and any memory budget agree exactly): a BLAS matmul's rounding can, so when `rescore(rows,
    cols)` is given the top n + POOL_MARGIN are scored again one (row, column) at a time, and the
    final order is by score, then column, whatever order the top-k kernel returned ties in.
    `progress(n)` (a progress bar's update) is told of each block's rows when it is done.
    """
    k = min(n, n_cols)
    pool = min(n_cols, k + POOL_MARGIN)
    out_cols = np.full((len(rows), n), -1, np.int64)
    out_vals = np.full((len(rows), n), np.nan, np.float32)
    step = block_size(n_cols, memory_budget)
    with torch.no_grad():
        for start in range(0, len(rows), step):
            block = rows[start:start + step]
            s = score_block(block)
            for m in exclude:
                pos, offs = _ragged(m.indptr, block)
                cols = m.indices[offs]
                if col_of is not None:
                    cols = col_of[cols]
                    pos, cols = pos[cols >= 0], cols[cols >= 0]
                if len(pos):  # flat index_fill: about twice as fast as a 2-D index_put
                    flat = torch.from_numpy(pos * n_cols + cols).to(s.device)
                    s.view(-1).index_fill_(0, flat, -torch.inf)
            val, ind = row_topk(s, pool)
            if rescore is not None:
                val = torch.where(torch.isfinite(val), rescore(block, ind), val)
            val, ind = val.cpu().numpy(), ind.cpu().numpy()
            order = np.lexsort((ind, -val), axis=1)[:, :k]
            val, ind = np.take_along_axis(val, order, 1), np.take_along_axis(ind, order, 1)
            ok = np.isfinite(val)  # -inf: masked; fewer allowed items than k
            span = slice(start, start + len(block))
            out_cols[span, :k] = np.where(ok, ind, -1)
            out_vals[span, :k] = np.where(ok, val, np.nan)
            if on_block is not None:
                on_block(span, block, out_cols[span, :k])
            if progress is not None:
                progress(len(block))
    return out_cols, out_vals


def _columns(candidates: np.ndarray | None, n_items: int) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(item of each column, column of each item or -1); (None, None) when every item is one."""
    if candidates is None or np.asarray(candidates, bool).all():
        return None, None
    cand = np.flatnonzero(candidates)
    col_of = np.full(n_items, -1, np.int64)
    col_of[cand] = np.arange(len(cand))
    return cand, col_of


Scorer = tuple[Callable[[np.ndarray], torch.Tensor], Callable[[np.ndarray, torch.Tensor], torch.Tensor] | None]


def model_scorer(model: Recommender, cand: np.ndarray | None) -> Scorer:
    """(scores of a block of users against the candidate items, rescore for `blocked_topk`):
    one matmul per block for factor models, rescored as per-pair dot products."""
    dev = model.device
    cand_t = None if cand is None else torch.from_numpy(cand).to(dev)
    U, V = model.user_vectors(), model.item_vectors()
    if U is not None:
        U = U.float()
        Vc = (V if cand_t is None else V.index_select(0, cand_t)).float()

        if dev.type == "cpu":  # numpy's BLAS (OpenBLAS) multiplies ~1.7x faster than torch's here (DESIGN)
            U_np, V_np = U.numpy(), Vc.numpy()
            # einsum without `optimize` is a plain loop per (row, column): no BLAS, 3x cheaper than torch here
            # np.take gathers rows ~1.5x faster than fancy indexing
            return ((lambda rows: torch.from_numpy(np.take(U_np, rows, 0) @ V_np.T)),
                    lambda rows, cols: torch.from_numpy(np.einsum("bd,bkd->bk", np.take(U_np, rows, 0),
                                                                  np.take(V_np, cols.numpy(), 0))))

        def rescore(rows: np.ndarray, cols: torch.Tensor) -> torch.Tensor:  # equal-shaped matrices per row
            return torch.bmm(U[torch.from_numpy(rows).to(dev)][:, None, :], Vc[cols].transpose(1, 2))[:, 0]

        return (lambda rows: U[torch.from_numpy(rows).to(dev)] @ Vc.T), rescore

    def score(rows: np.ndarray) -> torch.Tensor:  # row by row for these models (a sparse row times a matrix)
        s = model.score(torch.from_numpy(rows).to(dev)).float()
        return (s if cand_t is None else s.index_select(1, cand_t)).contiguous()  # masking writes in place

    return score, None


def topn(
    model: Recommender,
    users: np.ndarray,
    n: int,
    exclude: sp.csr_matrix | None = None,
    candidates: np.ndarray | None = None,
    memory_budget: int = 1 << 30,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-`n` items for each user in `users` (dense idx).

    Returns (items [len(users), n] int64, scores [len(users), n] float32); where a user has fewer
    than `n` allowed items the row is padded with item -1 and score NaN.
    `exclude`: CSR [n_users, n_items] of items never to recommend (seen items);
    `candidates`: bool [n_items] of items allowed at all (None: every item). Only candidate items
    are scored (factor models multiply by the candidates' vectors only).
    """
    cand, col_of = _columns(candidates, model.n_items)
    score, rescore = model_scorer(model, cand)
    cols, vals = blocked_topk(score, np.asarray(users, np.int64), n, model.n_items if cand is None else len(cand),
                              exclude=() if exclude is None else (exclude,), col_of=col_of,
                              memory_budget=memory_budget, rescore=rescore)
    return _items_of(cols, cand), vals


def _items_of(cols: np.ndarray, cand: np.ndarray | None) -> np.ndarray:
    if cand is None:
        return cols
    return np.where(cols >= 0, cand[np.maximum(cols, 0)], -1)


Similarity = Callable[[np.ndarray, np.ndarray], np.ndarray]


def explain_anchors(similarity: Similarity, pad: int, recs: np.ndarray, liked: sp.csr_matrix,
                    rows: np.ndarray) -> np.ndarray:
    """For each recommended item recs[b, k] (-1: none), the item of liked[rows[b]] most similar to
    it by `similarity(recs [g, k], liked items [g, w]) -> [g, k, w]`; -1 when the user liked
    nothing. Short histories are padded with item `pad`, which `similarity` scores lowest.

    Each user's history is padded to the next power of two of its own length (so at most twice
    the work, and a user's similarities are computed the same way whoever shares the batch:
    shards agree exactly), and users of equal padded width are batched: per batch one gather of
    their liked items and one batched similarity against their recommendations.
    """
    anchors = np.full_like(recs, -1)
    starts = liked.indptr[rows]
    counts = liked.indptr[rows + 1] - starts
    widths = 1 << np.ceil(np.log2(np.maximum(counts, 1))).astype(np.int64)
    for width in np.unique(widths[counts > 0]):
        same = np.flatnonzero((widths == width) & (counts > 0))
        for group in np.array_split(same, -(-len(same) * width // EXPLAIN_ENTRIES)):
            offs = np.minimum(starts[group][:, None] + np.arange(width), len(liked.indices) - 1)
            items = np.where(np.arange(width) < counts[group][:, None], liked.indices[offs], pad)
            rec = recs[group]
            best = np.take_along_axis(items, similarity(np.maximum(rec, 0), items).argmax(2), 1)
            anchors[group] = np.where(rec >= 0, best, -1)
    return anchors


# -- what scoring reads from the warehouse ----------------------------------------------------
@dataclass
class ScoringInputs:
    """Everything scoring needs from a run's snapshot, in dense ids.

    Rows 0..n_model_users-1 are the snapshot's users (row = user_idx); later rows are users in
    the raw tables the snapshot does not have (cold). `seen` and `liked` are pattern CSRs
    [rows, items]; `profile` holds the raw rated/tagged items of the users the model cannot
    serve (the cold-start profile, also never recommended to them).
    """

    run_id: str
    family: str
    snapshot_id: str
    user_ids: np.ndarray
    n_model_users: int
    item_ids: np.ndarray
    titles: pl.Series
    n_ratings: np.ndarray
    pop_rank: np.ndarray
    seen: sp.csr_matrix
    liked: sp.csr_matrix
    user_train: np.ndarray  # the model's training interactions per row
    item_train: np.ndarray  # ... per item: > 0 means the model knows the item
    served: np.ndarray  # bool per row: the model scores this user
    profile: sp.csr_matrix
    genres: sp.csr_matrix
    genre_names: list[str]
    tags: sp.csr_matrix
    tag_terms: list[str]
    rating_scale: tuple[float, float] | None

    @property
    def candidates(self) -> np.ndarray:
        return self.item_train > 0


def _pattern(rows: np.ndarray, cols: np.ndarray, shape: tuple[int, int]) -> sp.csr_matrix:
    """Row-grouped CSR of (rows, cols). Entries stay in input order within a row (no per-row sort:
    nothing downstream needs sorted columns). Snapshots store interactions by user, so the usual
    input is already grouped and becomes a CSR as is; otherwise an O(nnz) counting sort."""
    if len(rows) and not (rows[1:] >= rows[:-1]).all():
        coo = sp.coo_matrix((np.ones(len(rows), bool), (rows, cols)), shape=shape)
        coo.has_canonical_format = True  # skip sum_duplicates' per-row sort; duplicates are harmless here
        return coo.tocsr()
    index = np.int32 if len(rows) < 2**31 else np.int64  # one dtype for both, or scipy converts them
    indptr = np.zeros(shape[0] + 1, index)
    np.cumsum(np.bincount(rows, minlength=shape[0]), out=indptr[1:])
    return sp.csr_matrix((np.ones(len(rows), bool), cols.astype(index, copy=False), indptr), shape=shape)


def _sample_rows(m: sp.csr_matrix, cap: int) -> sp.csr_matrix:
    """Rows with more than `cap` entries keep `cap` of them, evenly spaced in the row's order (a
    user's history in time order: a sample spanning it). The same entries on every run."""
    counts = np.diff(m.indptr)
    long = np.flatnonzero(counts > cap)
    if not len(long):
        return m
    keep = ~np.repeat(counts > cap, counts)
    keep[(m.indptr[long][:, None] + (np.arange(cap) * counts[long][:, None]) // cap).ravel()] = True
    indptr = np.zeros(len(counts) + 1, np.int64)
    np.cumsum(np.minimum(counts, cap), out=indptr[1:])
    return sp.csr_matrix((m.data[keep], m.indices[keep], indptr), shape=m.shape)


def _np(con, sql: str, params: dict) -> dict[str, np.ndarray]:
    table = con.sql(sql, params=params).to_arrow_table()
    return {c: table.column(c).to_numpy() for c in table.column_names}


def _train_counts(con, run: dict, n_users: int, n_items: int) -> tuple[np.ndarray, np.ndarray]:
    """Per user and per item, the interactions the run's model was fitted on: the snapshot's
    counts (user_features / item_features), minus the protocol's holdout for a protocol run."""
    s = {"s": run["snapshot_id"], "p": run.get("protocol")}
    users, items = np.zeros(n_users, np.int64), np.zeros(n_items, np.int64)
    for counts, sql in ((users, "SELECT user_idx AS idx, n_ratings AS n FROM user_features WHERE snapshot_id = $s"),
                        (items, "SELECT item_idx AS idx, n_ratings AS n FROM item_features WHERE snapshot_id = $s")):
        got = _np(con, sql, {"s": s["s"]})
        counts[got["idx"]] = got["n"]
    if s["p"]:
        for counts, col in ((users, "user_idx"), (items, "item_idx")):
            held = _np(con, f"SELECT {col} AS idx, count(*) AS n FROM split_holdout "
                            f"WHERE snapshot_id = $s AND protocol = $p GROUP BY 1", s)
            counts[held["idx"]] -= held["n"]
    return users, items


def _check_snapshot(con, run: dict) -> None:
    if not scalar(con, "SELECT count(*) FROM feature_snapshots WHERE snapshot_id = ?", [run["snapshot_id"]]):
        raise BatchrecError(
            f"run {run['run_id']} was trained on feature snapshot {run['snapshot_id']}, which has been pruned; "
            f"train a new run (`batchrec train {run['model']}`) or keep more snapshots (`batchrec features --keep`)")


def _ids(con, sql: str, snapshot_id: str) -> np.ndarray:
    return _np(con, sql, {"s": snapshot_id})["id"].astype(np.int64)


def load_inputs(con, run: dict, min_history: int = 1) -> ScoringInputs:
    """Read what scoring needs for `run` (a model_runs row) from its snapshot and the raw tables."""
    _check_snapshot(con, run)
    s = run["snapshot_id"]
    user_ids = _ids(con, "SELECT user_id AS id FROM user_index WHERE snapshot_id = $s ORDER BY user_idx", s)
    items = con.sql("""
        SELECT ii.item_id, coalesce(f.n_ratings, 0) AS n_ratings, f.pop_rank,
               coalesce(t.title, 'item ' || ii.item_id) AS title
        FROM item_index ii
        LEFT JOIN item_features f ON f.snapshot_id = ii.snapshot_id AND f.item_idx = ii.item_idx
        LEFT JOIN (SELECT item_id, min(title) AS title FROM items GROUP BY item_id) t ON t.item_id = ii.item_id
        WHERE ii.snapshot_id = $s ORDER BY ii.item_idx""", params={"s": s}).pl()
    n_users, n_items = len(user_ids), len(items)
    # users of the raw tables that the snapshot does not have: cold rows after the snapshot's
    cold = _ids(con, """
        SELECT DISTINCT user_id AS id FROM (
            SELECT user_id FROM ratings UNION ALL SELECT user_id FROM users UNION ALL SELECT user_id FROM tags)
        ANTI JOIN (SELECT user_id FROM user_index WHERE snapshot_id = $s) USING (user_id) ORDER BY 1""", s)
    all_ids = np.concatenate([user_ids, cold])
    n_rows = len(all_ids)

    user_train, item_train = _train_counts(con, run, n_users, n_items)
    user_train = np.concatenate([user_train, np.zeros(len(cold), user_train.dtype)])
    served = user_train >= max(min_history, 1)
    # seen = every interaction of the snapshot; liked (the "because you rated" anchors) = rated at
    # or above the user's own mean rating (or implicit), at most ~EXPLAIN_ANCHORS per user
    x = _np(con, "SELECT user_idx, item_idx, rating FROM interactions WHERE snapshot_id = $s", {"s": s})
    seen = _pattern(x["user_idx"], x["item_idx"], (n_rows, n_items))
    means = _np(con, "SELECT user_idx, mean_rating FROM user_features WHERE snapshot_id = $s", {"s": s})
    mean = np.full(n_users, -np.inf, np.float32)  # no mean (implicit only): everything is liked
    mean[means["user_idx"]] = np.nan_to_num(means["mean_rating"].astype(np.float32), nan=-np.inf)
    rating = x["rating"].astype(np.float32)
    like = np.isnan(rating) | (rating >= mean[x["user_idx"]] - 1e-6)
    liked = _sample_rows(_pattern(x["user_idx"][like], x["item_idx"][like], (n_rows, n_items)), EXPLAIN_ANCHORS)
    del x, rating, like

    fallback = pl.DataFrame({"user_id": all_ids[~served], "row": np.flatnonzero(~served)})
    acts = {"row": np.zeros(0, np.int64), "item_idx": np.zeros(0, np.int64)}
    if len(fallback):
        con.register("scoring_fallback", fallback.to_arrow())
        acts = _np(con, """
            WITH acts AS (
                SELECT user_id, item_id FROM ratings WHERE user_id IN (SELECT user_id FROM scoring_fallback)
                UNION SELECT user_id, item_id FROM tags WHERE user_id IN (SELECT user_id FROM scoring_fallback))
            SELECT f.row, ii.item_idx FROM acts
            JOIN scoring_fallback f USING (user_id)
            JOIN item_index ii ON ii.snapshot_id = $s AND ii.item_id = acts.item_id""", {"s": s})
        con.unregister("scoring_fallback")
    profile = _pattern(acts["row"], acts["item_idx"], (n_rows, n_items))

    genres, genre_names = _content(con, "SELECT item_idx, genre AS term, 1.0 AS weight FROM item_genres "
                                        "WHERE snapshot_id = $s", s, n_items)
    tags, tag_terms = _content(con, "SELECT item_idx, term, weight FROM item_tag_tfidf WHERE snapshot_id = $s", s, n_items)
    lo, hi = con.sql("SELECT min(rating), max(rating) FROM interactions WHERE snapshot_id = $s",
                     params={"s": s}).fetchall()[0]
    pop_rank = items["pop_rank"].fill_null(items["n_ratings"].rank("ordinal", descending=True)).to_numpy()
    return ScoringInputs(
        run_id=run["run_id"], family=run["model"], snapshot_id=s, user_ids=all_ids, n_model_users=n_users,
        item_ids=items["item_id"].to_numpy().astype(np.int64), titles=items["title"],
        n_ratings=items["n_ratings"].to_numpy().astype(np.float32), pop_rank=pop_rank.astype(np.int64),
        seen=seen, liked=liked, user_train=user_train, item_train=item_train, served=served, profile=profile,
        genres=genres, genre_names=genre_names, tags=tags, tag_terms=tag_terms,
        rating_scale=None if lo is None else (float(lo), float(hi)))


def _content(con, sql: str, snapshot_id: str, n_items: int) -> tuple[sp.csr_matrix, list[str]]:
    cols = _np(con, sql, {"s": snapshot_id})
    names, codes = np.unique(cols["term"].astype(str), return_inverse=True)
    m = sp.csr_matrix((cols["weight"].astype(np.float32), (cols["item_idx"].astype(np.int64), codes.ravel())),
                      shape=(n_items, len(names)))
    return m, names.tolist()


# -- the three sources of recommendations ------------------------------------------------------
@dataclass
class Ranked:
    """Top-N of some rows: item idx (-1 pad), score, and the reason kind and its arguments."""

    rows: np.ndarray
    items: np.ndarray
    scores: np.ndarray
    kind: np.ndarray
    arg1: np.ndarray  # anchor item / first genre / tag term
    arg2: np.ndarray  # second genre


def _normalise(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=1, keepdim=True).clamp(min=1e-12)


def explanation_similarity(model: Recommender, inputs: ScoringInputs) -> tuple[Similarity, int] | None:
    """How "because you rated" measures how close a liked item is to a recommended one, and the
    padding item for `explain_anchors`:

    * a model exposing `item_item()` (an [n_items, n_items] tensor W where W[l, r] is how much
      having item l raises item r's score, as EASE's B or item-kNN's weights): the liked item
      contributing most to the recommendation, W[l, r];
    * factor models: the cosine of the item vectors, centred (constant columns such as folded-in
      biases vanish) and reduced to their top EXPLAIN_DIMS principal directions (exact at or below
      that width; gathering every liked item's vector is what explanations cost);
    * other models: the cosine of the items' genre + TF-IDF vectors (randomly projected when
      wide). None for one-dimensional item vectors (popularity): nothing item-specific to say.
    """
    item_item = getattr(model, "item_item", None)
    if callable(item_item):
        W, n = item_item(), model.n_items

        def weight(rec: np.ndarray, items: np.ndarray) -> np.ndarray:
            liked_t, rec_t = (torch.from_numpy(a).to(W.device) for a in (np.minimum(items, n - 1), rec))
            w = W[liked_t[:, None, :], rec_t[:, :, None]].float().cpu().numpy()
            return np.where(items[:, None, :] == n, -np.inf, w)

        return weight, n
    V = model.item_vectors()
    if V is not None:
        if V.shape[1] < 2:
            return None
        V = V.float() - V.float().mean(0)
        if V.shape[1] > EXPLAIN_DIMS:  # d x d eigenproblem, in float64 on the CPU (tiny; float32 LAPACK is slow)
            _, vecs = np.linalg.eigh((V.T @ V).double().cpu().numpy())  # ascending eigenvalues
            V = V @ torch.from_numpy(vecs[:, -EXPLAIN_DIMS:].astype(np.float32)).to(V.device)
    else:
        content = sp.hstack([inputs.genres, inputs.tags], format="csr", dtype=np.float32)
        if content.shape[1] == 0:
            return None
        if content.shape[1] > EXPLAIN_DIMS:  # Johnson-Lindenstrauss: cosines survive a random projection
            g = np.random.default_rng(0).standard_normal((content.shape[1], EXPLAIN_DIMS)).astype(np.float32)
            content = content @ g
        V = torch.from_numpy(np.asarray(content.todense() if sp.issparse(content) else content)).to(model.device)
    # Liked items are looked up with an extra 0 column and a padding row (0, ..., 0, -4);
    # recommendations with that column set to 1: a padding slot scores -4, below any cosine.
    # Small gathers and matmuls: numpy on the CPU (half torch's cost here), whatever the device.
    V = _normalise(V.float()).cpu().numpy()
    liked_space = np.zeros((len(V) + 1, V.shape[1] + 1), np.float32)
    liked_space[:-1, :-1] = V
    liked_space[-1, -1] = -4.0
    rec_space = liked_space.copy()
    rec_space[:, -1] = 1.0

    def cosine(rec: np.ndarray, items: np.ndarray) -> np.ndarray:  # one equal-shaped matmul per user
        return np.matmul(np.take(rec_space, rec, 0), np.take(liked_space, items, 0).transpose(0, 2, 1))

    return cosine, len(V)


def serve_model(model: Recommender, inputs: ScoringInputs, rows: np.ndarray, n: int, memory_budget: int,
                explain: bool = True, progress: Callable[[int], object] | None = None) -> Ranked:
    """Model-served rows: blocked top-N over the model's items, seen items removed, and each row's
    anchor (the liked item most similar to the recommendation) from the same block. Candidates
    are the items the model was trained on, plus those it scores from content alone."""
    from_content = model.content_scored_items()
    cand, col_of = _columns(inputs.candidates if from_content is None else inputs.candidates | from_content,
                            model.n_items)
    how = explanation_similarity(model, inputs) if explain else None
    anchors = np.full((len(rows), n), -1, np.int64)

    def anchor(span: slice, block: np.ndarray, cols: np.ndarray) -> None:
        anchors[span, :cols.shape[1]] = explain_anchors(*how, _items_of(cols, cand), inputs.liked, block)

    n_cols = model.n_items if cand is None else len(cand)
    score, rescore = model_scorer(model, cand)
    cols, scores = blocked_topk(score, rows, n, n_cols, exclude=(inputs.seen,), col_of=col_of, memory_budget=memory_budget,
                                on_block=None if how is None else anchor, rescore=rescore, progress=progress)
    if model.task == "rating" and inputs.rating_scale is not None:
        np.clip(scores, *inputs.rating_scale, out=scores)
    kind = np.where(anchors >= 0, BECAUSE, MODEL).astype(np.int8)
    return Ranked(rows, _items_of(cols, cand), scores, kind, anchors, np.full_like(anchors, -1))


def _log_popularity(inputs: ScoringInputs) -> np.ndarray:
    return (np.log1p(inputs.n_ratings) / np.log1p(max(inputs.n_ratings.max(initial=0.0), 1.0))).astype(np.float32)


def _row_normalise(m: sp.csr_matrix) -> tuple[sp.csr_matrix, np.ndarray]:
    norms = np.sqrt(np.asarray(m.multiply(m).sum(1)).ravel())
    return sp.csr_matrix(sp.diags(1.0 / np.maximum(norms, 1e-12)) @ m, dtype=np.float32), norms


def serve_profile(inputs: ScoringInputs, rows: np.ndarray, n: int, memory_budget: int, device: torch.device,
                  progress: Callable[[int], object] | None = None) -> Ranked:
    """Cold start with a profile: the cosine of the user's genre and TF-IDF profiles (sums over
    the items they rated or tagged) with each item's, blended with log popularity. The reason
    names the item's genres the user weighs most (up to two), else its best shared tag term."""
    cand, col_of = _columns(inputs.candidates, len(inputs.item_ids))
    cand = np.arange(len(inputs.item_ids)) if cand is None else cand
    acts = inputs.profile[rows].astype(np.float32)
    genres, _ = _row_normalise(inputs.genres)
    genre_profile, _ = _row_normalise(acts @ genres)
    tag_profile, tag_norms = _row_normalise(acts @ inputs.tags)
    has_tags = torch.from_numpy(tag_norms > 0).to(device)
    item_genres = sp.csr_matrix(genres[cand].T)  # sparse products: every score's rounding is its own row's
    item_terms = sp.csr_matrix(inputs.tags[cand].T)
    pop = torch.from_numpy(_log_popularity(inputs)[cand]).to(device)
    position = np.empty(len(inputs.user_ids), np.int64)
    position[rows] = np.arange(len(rows))

    def score(block: np.ndarray) -> torch.Tensor:
        p = position[block]
        by_genre = torch.from_numpy((genre_profile[p] @ item_genres).toarray()).to(device)
        by_tag = torch.from_numpy((tag_profile[p] @ item_terms).toarray()).to(device)
        content = torch.where(has_tags[torch.from_numpy(p).to(device)][:, None], (by_genre + by_tag) / 2, by_genre)
        return CONTENT_WEIGHT * content + (1 - CONTENT_WEIGHT) * pop

    cols, scores = blocked_topk(score, rows, n, len(cand), exclude=(inputs.seen, inputs.profile), col_of=col_of,
                                memory_budget=memory_budget, progress=progress)
    items = _items_of(cols, cand)
    flat = np.maximum(items, 0).ravel()
    # genres: the item's genres weighted by the user's profile; the top two with weight > 0
    weight = inputs.genres[flat].toarray().reshape(*items.shape, -1) * genre_profile.toarray()[:, None, :]
    weight = np.concatenate([weight, np.zeros((*items.shape, 2), weight.dtype)], axis=2)  # at least 2 columns
    top = np.argsort(-weight, axis=2, kind="stable")[..., :2]
    top = np.where(np.take_along_axis(weight, top, 2) > 0, top, -1)
    # tag term: argmax of the item's TF-IDF times the user's tag profile
    term = np.full(items.shape, -1)
    if inputs.tags.shape[1]:
        shared = inputs.tags[flat].multiply(tag_profile[np.repeat(np.arange(len(rows)), n)]).tocsr()
        best = np.asarray(shared.argmax(axis=1)).ravel()
        term = np.where(np.asarray(shared.max(axis=1).todense()).ravel() > 0, best, -1).reshape(items.shape)
    kind = np.select([top[..., 0] >= 0, term >= 0], [GENRE, TAG], POPULAR).astype(np.int8)
    arg1 = np.select([kind == GENRE, kind == TAG], [top[..., 0], term], -1)
    return Ranked(rows, items, scores, kind, arg1, np.where(kind == GENRE, top[..., 1], -1))


def serve_popular(inputs: ScoringInputs, rows: np.ndarray, n: int, memory_budget: int, device: torch.device,
                  progress: Callable[[int], object] | None = None) -> Ranked:
    """Nothing known about the user: the model's items by popularity (snapshot pop_rank), unseen."""
    cand, col_of = _columns(inputs.candidates, len(inputs.item_ids))
    cand = np.arange(len(inputs.item_ids)) if cand is None else cand
    order = torch.from_numpy(-inputs.pop_rank[cand].astype(np.float32)).to(device)  # distinct: no ties
    cols, _ = blocked_topk(lambda block: order.expand(len(block), -1).clone(), rows, n, len(cand),
                           exclude=(inputs.seen, inputs.profile), col_of=col_of, memory_budget=memory_budget,
                           progress=progress)
    items = _items_of(cols, cand)
    scores = np.where(items >= 0, inputs.n_ratings[np.maximum(items, 0)], np.nan).astype(np.float32)
    none = np.full(items.shape, -1)
    return Ranked(rows, items, scores, np.full(items.shape, POPULAR, np.int8), none, none)


def recommend(model: Recommender, inputs: ScoringInputs, rows: np.ndarray, n: int, memory_budget: int,
              run_id: str, scored_at: datetime, explain: bool = True) -> tuple[pl.DataFrame, dict[str, int]]:
    """Top-`n` rows of `recommendations` for the given input rows, and users per source."""
    rows = np.asarray(rows, np.int64)
    served = inputs.served[rows]
    has_profile = np.diff(inputs.profile.indptr)[rows] > 0
    parts = []
    t0 = time.perf_counter()
    with progress_bar(len(rows), "scoring", unit="users") as bar:
        if served.any():
            parts.append(serve_model(model, inputs, rows[served], n, memory_budget, explain, progress=bar.update))
        if (~served & has_profile).any():
            parts.append(serve_profile(inputs, rows[~served & has_profile], n, memory_budget, model.device,
                                       progress=bar.update))
        if (~served & ~has_profile).any():
            parts.append(serve_popular(inputs, rows[~served & ~has_profile], n, memory_budget, model.device,
                                       progress=bar.update))
    counts = {"model": int(served.sum()), "profile": int((~served & has_profile).sum()),
              "popular": int((~served & ~has_profile).sum())}
    log.info("scored %d users (%s) in %.2f s", len(rows), ", ".join(f"{k} {v}" for k, v in counts.items()),
             time.perf_counter() - t0)
    return _frame(parts, inputs, n, run_id, scored_at), counts


def _frame(parts: list[Ranked], inputs: ScoringInputs, n: int, run_id: str, scored_at: datetime) -> pl.DataFrame:
    """Long format with raw ids and reason texts, built column-wise; padding dropped."""
    fields = ("items", "scores", "kind", "arg1", "arg2")
    cat = {f: np.concatenate([getattr(p, f) for p in parts]) if parts else np.zeros((0, n)) for f in fields}
    cat["rows"] = np.concatenate([p.rows for p in parts]) if parts else np.zeros(0, np.int64)
    items = cat["items"].ravel()
    keep = items >= 0
    rows = np.repeat(cat["rows"], n)[keep]
    items = items[keep]
    a1, a2 = cat["arg1"].ravel()[keep], cat["arg2"].ravel()[keep]
    kind = cat["kind"].ravel()[keep]
    genres = pl.Series(inputs.genre_names + [""], dtype=pl.Utf8)
    terms = pl.Series(inputs.tag_terms + [""], dtype=pl.Utf8)
    df = pl.DataFrame({
        "user_id": inputs.user_ids[rows],
        "rank": np.tile(np.arange(1, n + 1, dtype=np.int32), len(cat["rows"]))[keep],
        "item_id": inputs.item_ids[items],
        "score": cat["scores"].ravel()[keep].astype(np.float32),
        "kind": kind,
        "title": inputs.titles.gather(np.where(kind == BECAUSE, a1, 0)),
        "g1": genres.gather(np.where((kind == GENRE) & (a1 >= 0), a1, len(genres) - 1)),
        "g2": genres.gather(np.where((kind == GENRE) & (a2 >= 0), a2, len(genres) - 1)),
        "term": terms.gather(np.where((kind == TAG) & (a1 >= 0), a1, len(terms) - 1)),
    })
    reason = (
        pl.when(pl.col("kind") == BECAUSE).then(pl.lit("because you rated ") + pl.col("title"))
        .when(pl.col("kind") == GENRE).then(
            pl.lit("genre-match: ") + pl.col("g1") + pl.when(pl.col("g2") != "").then(", " + pl.col("g2")).otherwise(pl.lit("")))
        .when(pl.col("kind") == TAG).then(pl.lit("tag-match: ") + pl.col("term"))
        .when(pl.col("kind") == POPULAR).then(pl.lit("popular"))
        .otherwise(pl.lit(f"model:{inputs.family}"))
    )
    return df.select(
        "user_id", "rank", "item_id", "score",
        pl.lit(run_id, pl.Utf8).alias("run_id"),
        pl.lit(scored_at, pl.Datetime("us")).alias("scored_at"),
        reason.alias("reason"),
    ).sort("user_id", "rank")  # one sorted run per source: cheap


# -- sanity of a run's lists, checked before anything is published ----------------------------
SANE_MIN_LISTS = 50  # the catalogue-wide checks need this many lists to mean anything
SANE_TIED_LISTS = 0.9  # at most this share of lists may have every score equal
SANE_MISSING_LISTS = 0.01  # at most this share of the scored users may end up with no list
SANE_TOP_ITEM_SHARE = 0.9  # personalised models: at most this share of lists may start with one item
SANE_COVERAGE = 2  # personalised models: at least this many times the list length in distinct items


def list_sanity(frame: pl.DataFrame, users: int | None = None, personalised: bool = True) -> list[str]:
    """What makes a run's lists unfit to publish, one short line per failed check (empty: fine).

    `frame` holds rows in the `recommendations` layout (user_id, rank, item_id, score at least);
    `users` is how many users were scored (a user whose every score was NaN has no rows at all);
    `personalised` is False for one global ranking (popularity), whose lists overlap by design,
    so the catalogue-wide checks (one item everywhere, collapsed coverage) do not apply.
    """
    problems = []
    rows = frame.height
    bad = int(frame.select(pl.col("score").is_finite().not_().fill_null(True).sum()).item()) if rows else 0
    if bad:
        problems.append(f"scores not finite: {bad} of {rows} rows are NaN, infinite or null")
    lists = frame.group_by("user_id").agg(n=pl.len(), tied=pl.col("score").min() == pl.col("score").max())
    n_lists = lists.height
    if users is not None and users - n_lists > SANE_MISSING_LISTS * users:
        problems.append(f"no list for {users - n_lists} of {users} scored users (no finite score)")
    ranked = lists.filter(pl.col("n") >= 2)
    tied = int(ranked["tied"].sum()) if ranked.height else 0
    if ranked.height and tied > SANE_TIED_LISTS * ranked.height:
        problems.append(f"every score equal within {tied} of {ranked.height} lists")
    if personalised and n_lists >= SANE_MIN_LISTS:
        # the first place, not any place: long lists of a good model share their popular items
        first = frame.filter(pl.col("rank") == 1)["item_id"].value_counts(sort=True)
        if first.height and first["count"][0] > SANE_TOP_ITEM_SHARE * n_lists:
            problems.append(f"item {first['item_id'][0]} is first in {first['count'][0]} of {n_lists} lists")
        distinct, longest = frame["item_id"].n_unique(), int(lists["n"].max())
        if distinct < SANE_COVERAGE * longest:
            problems.append(f"only {distinct} distinct items across {n_lists} lists of up to {longest}")
    return problems


def check_lists(frame: pl.DataFrame, run: dict, users: int | None, personalised: bool) -> None:
    """Raise one line naming every failed `list_sanity` check; nothing is published then."""
    problems = list_sanity(frame, users, personalised)
    if problems:
        raise BatchrecError(f"refusing to publish run {run['run_id']} ({run['model']}): {'; '.join(problems)}; "
                            "the previous recommendations stay: check the run's parameters and data, and retrain")


# -- publishing -------------------------------------------------------------------------------
def write_parquet(frame: pl.DataFrame, path: Path, metadata: dict | None = None) -> Path:
    """Write atomically (temp file + rename): a killed writer never leaves a half file at `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    table = frame.to_arrow()
    if metadata is not None:
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), b"batchrec": json.dumps(metadata).encode()})
    pq.write_table(table, tmp)
    os.replace(tmp, path)
    return path


def _open_for_publish(wh: Warehouse, stack: ExitStack, wait_s: float = PUBLISH_WAIT_S):
    """A read-write connection; while another process has the file open (a reader's session),
    retry for up to `wait_s` before giving up as busy."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return stack.enter_context(wh.connect())
        except WarehouseBusy:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def publish(wh: Warehouse, rows: pl.DataFrame | list[Path], retention_days: int,
            scope_users: np.ndarray | None = None, gate: Gate | None = None) -> tuple[int, int, int]:
    """Swap `rows` (a frame in the `recommendations` layout, or Parquet files of them) into
    `recommendations` in ONE transaction (the caller holds the writer lock): current rows (of
    `scope_users` only, when given) move to `recommendation_history` with run_date =
    date(scored_at), history older than `retention_days` before the new run's date expires, the
    new rows go in. Returns (published, moved to history, expired).

    A frame is read by DuckDB straight from its Arrow buffers: no staging file to write and read
    back (a Parquet round trip cost a third of the publish at ML-20M shape). A `gate` checks the
    staged rows first (it raises `Gated` when it refuses) and logs the publish in its transaction."""
    cols = "user_id, rank, item_id, score, run_id, scored_at, reason"
    scope = "" if scope_users is None else "WHERE user_id IN (SELECT user_id FROM publish_scope)"
    users = np.zeros(0, np.int64) if scope_users is None else np.asarray(scope_users, np.int64)
    with ExitStack() as stack:
        con = _open_for_publish(wh, stack)
        con.register("publish_scope", pl.DataFrame({"user_id": users}).to_arrow())
        if isinstance(rows, pl.DataFrame):
            con.register("publish_rows", rows.to_arrow())
        else:
            con.read_parquet([str(f) for f in rows]).create_view("publish_rows")
        if gate is not None:
            gate.check(con)
        with transaction(con, "the new recommendations"):
            moved = con.execute(f"INSERT INTO recommendation_history SELECT {cols}, CAST(scored_at AS DATE) "
                                f"FROM recommendations {scope}").fetchall()[0][0]
            con.execute(f"DELETE FROM recommendations {scope}").fetchall()
            published = con.execute(f"INSERT INTO recommendations SELECT {cols} FROM publish_rows").fetchall()[0][0]
            newest = con.execute("SELECT CAST(max(scored_at) AS DATE) FROM publish_rows").fetchall()[0][0]
            expired = 0
            if newest is not None:
                expired = con.execute("DELETE FROM recommendation_history WHERE run_date < ?",
                                      [newest - timedelta(days=retention_days)]).fetchall()[0][0]
            if gate is not None:
                gate.record(con)
    return published, moved, expired


def shard_path(wh: Warehouse, run_id: str, shard: int) -> Path:
    return wh.shards_dir / f"run_id={run_id}" / f"shard={shard}.parquet"


# The columns of a shard file, as `write_parquet` writes a `recommend` frame
SHARD_SCHEMA = {"user_id": pl.Int64, "rank": pl.Int32, "item_id": pl.Int64, "score": pl.Float32,
                "run_id": pl.String, "scored_at": pl.Datetime("us"), "reason": pl.String}


def _shard_metadata(path: Path, run_id: str) -> dict:
    """A shard's batchrec metadata, after checking that the file is a whole shard of the
    `recommendations` layout; a one-line error naming the file and how to rewrite it."""
    def corrupt(what: str) -> BatchrecError:
        shard = re.search(r"shard=(\d+)", path.name)
        return BatchrecError(f"shard {path} is corrupt ({what}): rescore it with `batchrec score --run {run_id} "
                             f"--shard {shard.group(1) if shard else 'i'}/N` and publish again")

    try:
        schema = pq.read_schema(path)
        columns = dict(pl.read_parquet_schema(path))
    except (OSError, ValueError, pl.exceptions.PolarsError) as exc:  # pyarrow's ArrowInvalid is a ValueError
        raise corrupt(f"not a readable Parquet file: {str(exc).splitlines()[0]}") from None
    wrong = [f"column {name} is {columns[name]} (expected {kind})" if name in columns else f"no column {name}"
             for name, kind in SHARD_SCHEMA.items() if columns.get(name) != kind]
    wrong += [f"unexpected column {name}" for name in columns if name not in SHARD_SCHEMA]
    if wrong:
        raise corrupt("; ".join(wrong))
    try:
        meta = json.loads((schema.metadata or {})[b"batchrec"])
        if not {"run_id", "shard", "n_shards", "top_n", "users"} <= set(meta):
            raise KeyError("n_shards")
    except (KeyError, TypeError, ValueError):
        raise corrupt("its batchrec metadata (run, shard i/N, top-n) is missing") from None
    return meta


def shard_files(wh: Warehouse, run_id: str) -> list[Path]:
    """The complete set of a run's shard files; a one-line error when any is missing or they
    come from different shardings."""
    folder = wh.shards_dir / f"run_id={run_id}"
    found = sorted(folder.glob("shard=*.parquet")) if folder.is_dir() else []
    if not found:
        raise BatchrecError(f"no shards of run {run_id} in {folder}: run `batchrec score --run {run_id} --shard i/N` first")
    meta = [_shard_metadata(f, run_id) for f in found]
    n_shards = {m["n_shards"] for m in meta}
    top_n = {m["top_n"] for m in meta}
    if len(n_shards) > 1 or len(top_n) > 1 or {m["run_id"] for m in meta} != {run_id}:
        raise BatchrecError(f"shards in {folder} mix different settings (N {sorted(n_shards)}, top-n {sorted(top_n)}); "
                            f"delete the folder and rescore")
    n = n_shards.pop()
    missing = sorted(set(range(n)) - {m["shard"] for m in meta})
    if missing:
        raise BatchrecError(f"run {run_id}: shard {missing[0]}/{n} is missing in {folder} ({len(missing)} of {n} "
                            f"missing); run `batchrec score --run {run_id} --shard {missing[0]}/{n}`")
    return [shard_path(wh, run_id, i) for i in range(n)]


# -- pairs ------------------------------------------------------------------------------------
def _read_table(path: Path, what: str) -> pl.DataFrame:
    try:
        if path.suffix.lower() == ".parquet":
            return pl.read_parquet(path)
        return pl.read_csv(path, schema_overrides={"user_id": pl.Utf8, "item_id": pl.Utf8})
    except (pl.exceptions.PolarsError, OSError) as exc:
        raise BatchrecError(f"{what} {path}: cannot read it ({str(exc).splitlines()[0]})") from None


def _int_column(df: pl.DataFrame, column: str, path: Path, csv: bool) -> np.ndarray:
    """An integer id column; names the first bad line (CSV) or row (Parquet)."""
    if column not in df.columns:
        raise BatchrecError(f"{path}: no {column!r} column (columns: {', '.join(df.columns) or 'none'})")
    values = df[column].cast(pl.Int64, strict=False)
    bad = values.is_null()
    if bad.any():
        at = int(bad.arg_max())
        where = f"line {at + 2}" if csv else f"row {at + 1}"
        value = df[column][at]
        raise BatchrecError(f"{path}, {where}, column {column}: "
                            f"{'an empty value' if value is None else repr(value)} is not an integer id")
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


def score_pairs(model: Recommender, run: dict, con, pairs: Path, out: Path) -> str:
    """Score (user_id, item_id) pairs with the run's model; extra columns and row order kept."""
    frame = _read_table(pairs, "--pairs")
    csv = pairs.suffix.lower() != ".parquet"
    users, items = _int_column(frame, "user_id", pairs, csv), _int_column(frame, "item_id", pairs, csv)
    _check_snapshot(con, run)
    s = run["snapshot_id"]
    user_ids = _ids(con, "SELECT user_id AS id FROM user_index WHERE snapshot_id = $s ORDER BY user_idx", s)
    item_ids = _ids(con, "SELECT item_id AS id FROM item_index WHERE snapshot_id = $s ORDER BY item_idx", s)
    _check_fits_snapshot(model, run, len(user_ids), len(item_ids))
    user_train, item_train = _train_counts(con, run, len(user_ids), len(item_ids))
    lo, hi = con.sql("SELECT min(rating), max(rating) FROM interactions WHERE snapshot_id = $s", params={"s": s}).fetchall()[0]
    uidx, iidx = _lookup(user_ids, users), _lookup(item_ids, items)
    uidx = np.where((uidx >= 0) & (user_train[np.maximum(uidx, 0)] > 0), uidx, -1)  # the model learned nothing else
    iidx = np.where((iidx >= 0) & (item_train[np.maximum(iidx, 0)] > 0), iidx, -1)
    known = (uidx >= 0) & (iidx >= 0)
    scores = np.empty(len(frame), np.float32)
    step = 1 << 20
    with torch.no_grad():
        for a in range(0, len(frame), step):
            ut = torch.from_numpy(uidx[a:a + step]).to(model.device)
            it = torch.from_numpy(iidx[a:a + step]).to(model.device)
            k = torch.from_numpy(known[a:a + step]).to(model.device)
            chunk = torch.empty(len(ut), device=model.device)
            if k.any():
                chunk[k] = model.score(ut[k], it[k]).float()
            if (~k).any():
                chunk[~k] = model.score_fallback(ut[~k], it[~k]).float()
            scores[a:a + step] = chunk.cpu().numpy()
    if model.task == "rating" and lo is not None:
        np.clip(scores, lo, hi, out=scores)
    result = frame.with_columns(pl.Series("score", scores), pl.Series("fallback", ~known))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    if out.suffix.lower() == ".parquet":
        result.write_parquet(tmp)
    else:
        result.write_csv(tmp)
    os.replace(tmp, out)
    return (f"scored {len(frame)} pairs from {pairs} with run {run['run_id']} ({run['model']}): "
            f"{int((~known).sum())} by the fallback (unknown user or item) -> {out}")


# -- the command ------------------------------------------------------------------------------
def _resolve(con, run_id: str | None, model: str | None) -> dict:
    """The run named by --run, else the latest shipped run (fitted on every interaction) of
    --model or of any family: a protocol run is published only when named."""
    return resolve_run(con, run_id, model, shipped=True)


def _load_model(run: dict, device: str) -> Recommender:
    from batchrec.train import choose_device, load_run_model

    return load_run_model(run, choose_device(device))


def _check_fits_snapshot(model: Recommender, run: dict, n_users: int, n_items: int) -> None:
    """The artifact was fitted on the run's snapshot: its user and item counts are the snapshot's."""
    if (model.n_users, model.n_items) != (n_users, n_items):
        raise CorruptArtifact(run["artifact_path"], f"{model.n_users} users and {model.n_items} items, but its "
                                                    f"snapshot {run['snapshot_id']} has {n_users} and {n_items}",
                              run["model"])


def score_run(wh: Warehouse, run: dict, model: Recommender, top_n: int, memory_budget: int,
              users: np.ndarray | None = None, shard: tuple[int, int] | None = None,
              min_history: int = 1, explain: bool = True) -> tuple[pl.DataFrame, dict]:
    """Read the inputs (one short read-only session) and score the chosen users; writes nothing."""
    t0 = time.perf_counter()
    with wh.connect(read_only=True) as con:
        inputs = load_inputs(con, run, min_history)
    _check_fits_snapshot(model, run, inputs.n_model_users, len(inputs.item_ids))
    n_known = int(inputs.candidates.sum())
    if top_n > n_known:
        raise BatchrecError(f"--top-n {top_n} is larger than the catalogue: run {run['run_id']} knows {n_known} items")
    log.info("read inputs of run %s (snapshot %s): %d users, %d items in %.2f s", run["run_id"], inputs.snapshot_id,
             len(inputs.user_ids), len(inputs.item_ids), time.perf_counter() - t0)
    rows = np.arange(len(inputs.user_ids))
    info: dict = {}
    if users is not None:
        pos = _lookup(inputs.user_ids, users)
        info["unknown_users"] = int((pos < 0).sum())
        rows = np.sort(pos[pos >= 0])
    if shard is not None:
        rows = rows[shard_of(inputs.user_ids[rows], shard[1]) == shard[0]]
    frame, counts = recommend(model, inputs, rows, top_n, memory_budget, run["run_id"], utcnow(), explain=explain)
    return frame, info | counts | {"users": len(rows)}


def score_and_publish(wh: Warehouse, run: dict, model: Recommender, top_n: int = 10, memory_budget: int = 1 << 30,
                      retention_days: int = 30, users: np.ndarray | None = None, min_history: int = 1,
                      explain: bool = True, gate: GateSettings | None = None) -> dict:
    """Score, then publish: the body of `batchrec score` (the caller holds `wh.lock`). With `gate`
    settings a full publish goes through the publish gate (batchrec.gate); `info["gate"]` is it."""
    started = time.perf_counter()
    frame, info = score_run(wh, run, model, top_n, memory_budget, users=users, min_history=min_history,
                            explain=explain)
    checked = None
    if gate is not None and users is None:
        checked = Gate(gate, run, model.task, list_sanity(frame, info["users"], model.personalised), started)
    else:
        check_lists(frame, run, info["users"], model.personalised)
    pause = float(os.environ.get(PAUSE_ENV) or 0)
    if pause:
        log.info("pausing %.1f s before publishing (%s)", pause, PAUSE_ENV)
        time.sleep(pause)
    t0 = time.perf_counter()
    published, moved, expired = publish(wh, frame, retention_days, scope_users=users, gate=checked)
    log.info("published %d rows in %.2f s", published, time.perf_counter() - t0)
    return info | {"published": published, "moved": moved, "expired": expired, "gate": checked}


def score_command(wh: Warehouse, run_id: str | None = None, model: str | None = None,
                  top_n: int = options.TOP_N.default, shard: str | None = None, publish_run: str | None = None,
                  users_file: str | None = None, pairs: str | None = None, out: str | None = None,
                  memory_budget: str = options.MEMORY_BUDGET.default,
                  retention_days: int = options.RETENTION_DAYS.default, device: str = options.DEVICE.default,
                  min_history: int = 1, gate: GateSettings | None = DEFAULT_GATE) -> str:
    """`batchrec score`: see the module docstring; returns a one-line summary. Full publishes (not
    `--users`) go through the publish `gate` (None: the list sanity checks only)."""
    budget = parse_memory_budget(memory_budget)
    if top_n <= 0:
        raise BatchrecError(f"--top-n must be at least 1 (got {top_n})")
    if retention_days < 0:
        raise BatchrecError(f"--retention-days must be >= 0 (got {retention_days})")
    if pairs is not None:
        if out is None:
            raise BatchrecError("--pairs needs --out FILE for the scored pairs")
        if shard or publish_run or users_file:
            raise BatchrecError("--pairs cannot be combined with --shard, --publish or --users")
        with wh.connect(read_only=True) as con:
            run = _resolve(con, run_id, model)
            return score_pairs(_load_model(run, device), run, con, Path(pairs), Path(out))
    if out is not None:
        raise BatchrecError("--out is only for --pairs")
    if publish_run is not None:
        if shard or users_file:
            raise BatchrecError("--publish cannot be combined with --shard or --users")
        return _publish_shards(wh, publish_run, retention_days, gate)
    shard_spec = parse_shard(shard) if shard is not None else None
    if shard_spec is not None and users_file:
        raise BatchrecError("--shard cannot be combined with --users")
    users = read_users(users_file) if users_file else None
    t0 = time.perf_counter()
    if shard_spec is not None:  # no lock: shards may run anywhere, in parallel, on a read-only warehouse
        with wh.connect(read_only=True) as con:
            run = _resolve(con, run_id, model)
        frame, info = score_run(wh, run, _load_model(run, device), top_n, budget, shard=shard_spec,
                                min_history=min_history)
        i, n = shard_spec
        path = write_parquet(frame, shard_path(wh, run["run_id"], i), {
            "run_id": run["run_id"], "shard": i, "n_shards": n, "top_n": top_n, "users": info["users"]})
        return (f"shard {i}/{n} of run {run['run_id']} ({run['model']}): {info['users']} users, {len(frame)} rows "
                f"-> {path} in {time.perf_counter() - t0:.1f} s; when all {n} are written: "
                f"`batchrec score --publish {run['run_id']}`")
    with wh.lock("score"):
        with wh.connect(read_only=True) as con:
            run = _resolve(con, run_id, model)
        try:
            info = score_and_publish(wh, run, _load_model(run, device), top_n, budget, retention_days, users=users,
                                     min_history=min_history, gate=gate)
        except Gated:
            refresh_serving(wh)  # readers (`batchrec status`) see the refusal in publish_log
            raise
        refresh_serving(wh)
    summary = (f"run {run['run_id']} ({run['model']}) top-{top_n}: {info['users']} users (model {info['model']}, "
               f"genre/tag {info['profile']}, popular {info['popular']}), {info['published']} rows published to "
               f"recommendations; {info['moved']} earlier rows moved to recommendation_history, {info['expired']} "
               f"expired (retention {retention_days} days); {time.perf_counter() - t0:.1f} s")
    if info.get("unknown_users"):
        summary += f"; {info['unknown_users']} listed users are not in the warehouse and were skipped"
    if info["gate"] is not None:
        summary += f"; {info['gate'].summary()}"
    return summary


def _check_shard_lists(files: list[Path], run: dict, gate: GateSettings | None = None) -> Gate | None:
    """`check_lists` over the union of a run's shards (reading every row also finds a damaged page);
    with `gate` settings, the problems go to the returned `Gate` instead."""
    from batchrec.models import get_model_class

    users = sum(json.loads(pq.read_schema(f).metadata[b"batchrec"])["users"] for f in files)
    try:
        frame = pl.read_parquet(files, columns=["user_id", "rank", "item_id", "score"])
    except (OSError, pl.exceptions.PolarsError) as exc:
        raise BatchrecError(f"the shards of run {run['run_id']} cannot be read ({str(exc).splitlines()[0]}): "
                            f"rescore them with `batchrec score --run {run['run_id']} --shard i/N`") from None
    family = get_model_class(run["model"])
    if gate is not None:
        return Gate(gate, run, family.task, list_sanity(frame, users, family.personalised))
    check_lists(frame, run, users, family.personalised)
    return None


def _publish_shards(wh: Warehouse, run_id: str, retention_days: int, gate: GateSettings | None = None) -> str:
    t0 = time.perf_counter()
    with wh.lock("score --publish"):
        with wh.connect(read_only=True) as con:
            run = _resolve(con, run_id, None)
        files = shard_files(wh, run["run_id"])
        checked = _check_shard_lists(files, run, gate)
        try:
            published, moved, expired = publish(wh, files, retention_days, gate=checked)
        except Gated:
            refresh_serving(wh)  # readers (`batchrec status`) see the refusal in publish_log
            raise
        for f in files:
            f.unlink()
        refresh_serving(wh)
    return (f"published {len(files)} shards of run {run['run_id']}: {published} rows in recommendations; {moved} "
            f"earlier rows moved to recommendation_history, {expired} expired (retention {retention_days} days); "
            f"{time.perf_counter() - t0:.1f} s" + (f"; {checked.summary()}" if checked else ""))
