"""What scoring reads from the warehouse: a run's snapshot (users, items, seen and liked items,
training counts, content features) and the raw tables' users the snapshot lacks (cold rows)."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import polars as pl
import scipy.sparse as sp

from batchrec.data import (
    content_matrices,
    query_columns,
    rating_range,
    snapshot_ids,
    snapshot_read,
    train_counts,
)
from batchrec.errors import BatchrecError, CorruptArtifact
from batchrec.models.base import Recommender
from batchrec.warehouse import scalar

EXPLAIN_ANCHORS = 32  # liked items per user that explanations consider (a fixed sample beyond that)


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


def check_snapshot_kept(con, run: dict) -> None:
    if not scalar(con, "SELECT count(*) FROM feature_snapshots WHERE snapshot_id = ?", [run["snapshot_id"]]):
        raise BatchrecError(
            f"run {run['run_id']} was trained on feature snapshot {run['snapshot_id']}, which has been pruned; "
            f"train a new run (`batchrec train {run['model']}`) or keep more snapshots (`batchrec features --keep`)"
        )


def load_inputs(con, run: dict, min_history: int = 1) -> ScoringInputs:
    """Read what scoring needs for `run` (a model_runs row) from its snapshot and the raw tables."""
    check_snapshot_kept(con, run)
    s = run["snapshot_id"]
    user_ids, _ = snapshot_ids(con, s)
    # every indexed item has an item_features row (sql/features/040), so pop_rank is never NULL
    items = con.sql(
        """
        SELECT ii.item_id, f.n_ratings, f.pop_rank, coalesce(t.title, 'item ' || ii.item_id) AS title
        FROM item_index ii
        JOIN item_features f ON f.snapshot_id = ii.snapshot_id AND f.item_idx = ii.item_idx
        LEFT JOIN (SELECT item_id, min(title) AS title FROM items GROUP BY item_id) t ON t.item_id = ii.item_id
        WHERE ii.snapshot_id = $s ORDER BY ii.item_idx""",
        params={"s": s},
    ).pl()
    n_users, n_items = len(user_ids), len(items)
    # users of the raw tables that the snapshot does not have: cold rows after the snapshot's
    cold = query_columns(
        con,
        """
        SELECT DISTINCT user_id AS id FROM (
            SELECT user_id FROM ratings UNION ALL SELECT user_id FROM users UNION ALL SELECT user_id FROM tags)
        ANTI JOIN (SELECT user_id FROM user_index WHERE snapshot_id = $s) USING (user_id) ORDER BY 1""",
        {"s": s},
    )["id"]
    all_ids = np.concatenate([user_ids, cold.astype(np.int64)])
    n_rows = len(all_ids)

    user_train, item_train = train_counts(con, s, run.get("protocol"), n_users, n_items)
    user_train = np.concatenate([user_train, np.zeros(len(cold), user_train.dtype)])
    served = user_train >= max(min_history, 1)
    # seen = every interaction of the snapshot; liked (the "because you rated" anchors, see
    # sql/reads/seen_and_liked.sql) at most ~EXPLAIN_ANCHORS per user
    x = snapshot_read(con, "seen_and_liked", s=s)
    seen = _pattern(x["user_idx"], x["item_idx"], (n_rows, n_items))
    like = x["liked"]
    liked = _sample_rows(
        _pattern(x["user_idx"][like], x["item_idx"][like], (n_rows, n_items)), EXPLAIN_ANCHORS
    )
    del x, like

    fallback = pl.DataFrame({"user_id": all_ids[~served], "row": np.flatnonzero(~served)})
    acts = {"row": np.zeros(0, np.int64), "item_idx": np.zeros(0, np.int64)}
    if len(fallback):
        con.register("scoring_fallback", fallback.to_arrow())
        acts = query_columns(
            con,
            """
            WITH acts AS (
                SELECT user_id, item_id FROM ratings WHERE user_id IN (SELECT user_id FROM scoring_fallback)
                UNION SELECT user_id, item_id FROM tags WHERE user_id IN (SELECT user_id FROM scoring_fallback))
            SELECT f.row, ii.item_idx FROM acts
            JOIN scoring_fallback f USING (user_id)
            JOIN item_index ii ON ii.snapshot_id = $s AND ii.item_id = acts.item_id""",
            {"s": s},
        )
        con.unregister("scoring_fallback")
    profile = _pattern(acts["row"], acts["item_idx"], (n_rows, n_items))

    genres, genre_names, tags, tag_terms = content_matrices(con, s, n_items)
    return ScoringInputs(
        run_id=run["run_id"],
        family=run["model"],
        snapshot_id=s,
        user_ids=all_ids,
        n_model_users=n_users,
        item_ids=items["item_id"].to_numpy().astype(np.int64),
        titles=items["title"],
        n_ratings=items["n_ratings"].to_numpy().astype(np.float32),
        pop_rank=items["pop_rank"].to_numpy().astype(np.int64),
        seen=seen,
        liked=liked,
        user_train=user_train,
        item_train=item_train,
        served=served,
        profile=profile,
        genres=genres,
        genre_names=genre_names,
        tags=tags,
        tag_terms=tag_terms,
        rating_scale=rating_range(con, s),
    )


def with_unknown_users(inputs: ScoringInputs, user_ids: np.ndarray) -> ScoringInputs:
    """`inputs` with rows appended for user ids the warehouse has never seen: nothing known about
    them, so they are served what `batchrec score` serves a user it knows nothing about (the most
    popular items). Ids already present are not added again."""
    new = np.setdiff1d(np.asarray(user_ids, np.int64), inputs.user_ids)
    if not len(new):
        return inputs

    def grow(m: sp.csr_matrix) -> sp.csr_matrix:
        return sp.vstack([m, sp.csr_matrix((len(new), m.shape[1]), dtype=m.dtype)], format="csr")

    return replace(
        inputs,
        user_ids=np.concatenate([inputs.user_ids, new]),
        seen=grow(inputs.seen),
        liked=grow(inputs.liked),
        profile=grow(inputs.profile),
        user_train=np.concatenate([inputs.user_train, np.zeros(len(new), inputs.user_train.dtype)]),
        served=np.concatenate([inputs.served, np.zeros(len(new), bool)]),
    )


def check_fits_snapshot(model: Recommender, run: dict, n_users: int, n_items: int) -> None:
    """The artifact was fitted on the run's snapshot: its user and item counts are the snapshot's."""
    if (model.n_users, model.n_items) != (n_users, n_items):
        raise CorruptArtifact(
            run["artifact_path"],
            f"{model.n_users} users and {model.n_items} items, but its "
            f"snapshot {run['snapshot_id']} has {n_users} and {n_items}",
            run["model"],
        )
