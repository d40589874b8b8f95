"""Pieces the neural families share: sparse rows as dense batches, item content features, the
validation metrics their early stopping watches, and chunked all-item scoring for MLP models.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import scipy.sparse as sp
import torch

from batchrec.data import events_from_end, time_order
from batchrec.errors import BatchrecError
from batchrec.metrics import ranking_metrics
from batchrec.models.base import Param
from batchrec.models.ease import positive_weights, recency_weights
from batchrec.ranking import topn

# The ranking families average independently seeded fits: on ml-latest-small one seed's NDCG@10
# moves by +-0.005, and the mean of four fits ranked clearly better than any one (see their TUNING).
ENSEMBLE = Param("ensemble", int, 4, "independently seeded fits, each stopped early on its own, whose scores are "
                 "averaged (K x the training time)", min=1, max=64)

# Elements of one [users x items x hidden] activation block in the all-item scoring of MLP models.
PAIR_BLOCK_ELEMENTS = 1 << 25


class SparseRows:
    """A CSR matrix kept on the device as three tensors; batches of rows come out dense."""

    def __init__(self, indptr: torch.Tensor, indices: torch.Tensor, values: torch.Tensor, n_cols: int):
        self.indptr, self.indices, self.values, self.n_cols = indptr, indices, values, int(n_cols)

    @classmethod
    def from_scipy(cls, m: sp.spmatrix, device: torch.device | str) -> "SparseRows":
        m = m.tocsr()
        m.sum_duplicates()
        return cls(torch.from_numpy(m.indptr.astype(np.int64)).to(device),
                   torch.from_numpy(m.indices.astype(np.int64)).to(device),
                   torch.from_numpy(m.data.astype(np.float32)).to(device), m.shape[1])

    @classmethod
    def from_events(cls, events, values: np.ndarray, keep: np.ndarray, n_users: int, n_items: int,
                    device: torch.device | str) -> "SparseRows":
        """The user x item rows of the `keep` events, valued by `values` (repeated pairs summed)."""
        return cls.from_scipy(sp.csr_matrix((values[keep], (events.user_idx[keep], events.item_idx[keep])),
                                            shape=(n_users, n_items)), device)

    @classmethod
    def in_time_order(cls, events, values: np.ndarray, keep: np.ndarray, n_users: int, n_items: int,
                      device: torch.device | str) -> "SparseRows":
        """The user x item rows of the `keep` events, each row's entries in time order (by ts, then
        item), valued by `values`; repeated pairs stay separate entries."""
        idx = time_order(events)
        idx = idx[keep[idx]]
        indptr = np.concatenate([[0], np.cumsum(np.bincount(events.user_idx[idx], minlength=n_users))])
        return cls(torch.from_numpy(indptr.astype(np.int64)).to(device),
                   torch.from_numpy(events.item_idx[idx].astype(np.int64)).to(device),
                   torch.from_numpy(values[idx].astype(np.float32)).to(device), n_items)

    @property
    def n_rows(self) -> int:
        return len(self.indptr) - 1

    def state(self, prefix: str) -> dict:
        return {f"{prefix}_indptr": self.indptr, f"{prefix}_indices": self.indices, f"{prefix}_values": self.values,
                f"{prefix}_cols": self.n_cols}

    @classmethod
    def from_state(cls, state: dict, prefix: str) -> "SparseRows":
        return cls(state[f"{prefix}_indptr"], state[f"{prefix}_indices"], state[f"{prefix}_values"],
                   state[f"{prefix}_cols"])

    def entries(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The stored entries of rows `rows`: (position in `rows`, column, value) per entry, ordered by
        position, and the offset of each row's first entry (EmbeddingBag layout)."""
        start = self.indptr[rows]
        lens = self.indptr[rows + 1] - start
        row_of = torch.repeat_interleave(torch.arange(len(rows), device=rows.device), lens)
        first = torch.cumsum(lens, 0) - lens
        pos = start[row_of] + torch.arange(len(row_of), device=rows.device) - first[row_of]
        return row_of, self.indices[pos], self.values[pos], first

    def cut_at_random(self, rows: torch.Tensor, cut_min: float, halflife: float, floor: float
                      ) -> tuple[torch.Tensor, ...]:
        """For rows built `in_time_order`: each row cut at a random point, uniform over the
        fractions [cut_min, 1) of its length, at least one entry on each side. Returns the rows'
        entries (position in `rows`, column, value, row offsets) and, per entry, whether it lies
        before the cut and its recency factor floor + (1 - floor) * 0.5 ** (k / halflife), k = the
        entries between it and the cut (1 at halflife 0): the prefix weighted as a scoring-time
        query is, at a point in the user's past."""
        row_of, cols, vals, offsets = self.entries(rows)
        lens = torch.diff(offsets, append=offsets.new_tensor([len(cols)]))
        fraction = cut_min + (1.0 - cut_min) * torch.rand(len(rows), device=vals.device)
        cut = torch.minimum((fraction * lens).long(), lens - 1).clamp(min=1)[row_of]
        k = cut - 1 - (torch.arange(len(cols), device=vals.device) - offsets[row_of])
        before = k >= 0
        recency = floor + (1.0 - floor) * 0.5 ** (k.clamp(min=0) / halflife) if halflife > 0 \
            else torch.ones_like(vals)
        return row_of, cols, vals, offsets, before, recency

    def dense(self, rows: torch.Tensor) -> torch.Tensor:
        """Rows `rows` as a dense float32 [len(rows), n_cols] tensor (one scatter, no Python loop)."""
        row_of, cols, vals, _ = self.entries(rows)
        out = torch.zeros(len(rows), self.n_cols, device=self.values.device)
        out[row_of, cols] = vals
        return out

    def torch_sparse(self) -> torch.Tensor:
        """The whole matrix as a torch sparse COO tensor (for `torch.sparse.mm`)."""
        rows = torch.repeat_interleave(torch.arange(self.n_rows, device=self.indptr.device), torch.diff(self.indptr))
        return torch.sparse_coo_tensor(torch.stack([rows, self.indices]), self.values,
                                       (self.n_rows, self.n_cols)).coalesce()


def item_content(data, train_items: np.ndarray) -> sp.csr_matrix:
    """[genre multi-hot | TF-IDF tags] per item, each column max-abs scaled over the items that
    have training interactions (sparsity kept). Columns no training item has are dropped: nothing
    could be learned about them, and so what only non-training items carry never changes the
    model. Either block may be zero-width."""
    x = sp.hstack([data.item_genres.astype(np.float32), data.item_tags.astype(np.float32)], format="csr")
    x.sum_duplicates()
    if x.shape[1] == 0:
        return x
    scale = np.asarray(abs(x[np.flatnonzero(train_items)]).max(axis=0).todense()).ravel()
    used = np.flatnonzero(scale > 0)
    x = (x[:, used] @ sp.diags((1.0 / scale[used]).astype(np.float32))).tocsr()
    x.eliminate_zeros()
    return x


def history_weights(events, min_rating: float = 0.0, weighting: str = "binary", rating_offset: float = 2.0,
                    recency_halflife: float = 0.0, recency_floor: float = 0.1) -> np.ndarray:
    """Weight of each event in a user's history (0: left out), float32.

    Explicit ratings below `min_rating` weigh 0; the others 1 (`binary`) or
    max(rating - rating_offset, 0.5) (`rating`: a 5 says more than a 3); implicit events weigh 1.
    Times a recency factor floor + (1 - floor) * 0.5 ** (k / halflife), k = the user's later
    events: the next items a user picks follow their latest taste (halflife 0: off)."""
    w = positive_weights(events, min_rating, weighting, rating_offset).astype(np.float64)
    recency = recency_weights(events, recency_halflife, recency_floor)
    return (w if recency is None else w * recency).astype(np.float32)


def recency_user_weights(events, recency: float) -> np.ndarray:
    """Per training rating, exp(-k / recency) with k = the same user's later ratings (all 1 when
    recency is 0): the weight with which the user's own parameters learn from it. Tastes drift,
    and what is predicted is each user's next ratings; item parameters learn from every rating."""
    if recency <= 0:
        return np.ones(len(events), np.float32)
    return np.exp(-events_from_end(events) / recency).astype(np.float32)


def scale_grad(x: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
    """x unchanged in the forward pass; its gradient multiplied by w (rows) in the backward."""
    if w is None:
        return x
    w = w.reshape(-1, *([1] * (x.dim() - 1)))
    return w * x + (1 - w) * x.detach()


def require_ratings(data, model: str) -> tuple[float, float]:
    """Rating models need explicit ratings; returns the rating scale."""
    if data.train.implicit or data.rating_scale is None:
        raise BatchrecError(f"{model}: the training part has no explicit ratings (a rating model needs them; "
                            f"use a ranking family such as two_tower or multvae)")
    return data.rating_scale


def rating_validator(model, data) -> Callable[[], float] | None:
    """Validation RMSE (clipped to the scale) over valid pairs whose user and item are in train,
    the rule the test protocol uses; None when there is no validation part."""
    v = data.valid
    if v is None or len(v) == 0 or v.implicit:
        return None
    known = (np.bincount(data.train.user_idx, minlength=data.n_users) > 0)[v.user_idx] & \
            (np.bincount(data.train.item_idx, minlength=data.n_items) > 0)[v.item_idx]
    u, i, r = (t[torch.from_numpy(known).to(model.device)] for t in v.tensors(model.device))
    lo, hi = data.rating_scale

    def valid_rmse() -> float:
        pred = model.score(u, i).clamp(lo, hi)
        return float(torch.sqrt(torch.mean((pred - r) ** 2)))

    return valid_rmse


def ranking_validator(model, data, k: int = 10, threshold: float = 4.0) -> Callable[[], float] | None:
    """Validation NDCG@k: relevant = valid items rated >= threshold (all, when implicit) that are in
    the train catalogue; candidates = that catalogue minus the user's train items. None without a
    validation part."""
    v = data.valid
    if v is None or len(v) == 0:
        return None
    in_train = np.bincount(data.train.item_idx, minlength=data.n_items) > 0
    rel = (np.ones(len(v), bool) if v.implicit else v.rating >= threshold) & in_train[v.item_idx]
    relevant = v.select(rel).csr(data.n_users, data.n_items, "ones")
    users = np.flatnonzero(np.diff(relevant.indptr) > 0)
    if len(users) == 0:
        return None
    seen = data.seen_csr()

    def valid_ndcg() -> float:
        items, _ = topn(model, users, k, exclude=seen, candidates=in_train)
        return ranking_metrics(items, relevant[users], [k])[f"ndcg@{k}"]

    return valid_ndcg


def state_device(state: dict) -> torch.device:
    """The device the tensors of a state dict live on (`Recommender.to` moves them before the model)."""
    return next((v.device for v in state.values() if isinstance(v, torch.Tensor)), torch.device("cpu"))


def pair_blocks(n_users: int, n_items: int, hidden: int) -> int:
    """Users per chunk so one [users x items x hidden] activation stays within PAIR_BLOCK_ELEMENTS."""
    return max(1, PAIR_BLOCK_ELEMENTS // max(1, n_items * hidden))
