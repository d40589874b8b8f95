"""Item-item k-nearest neighbours: cosine similarity of item columns of the positives matrix.

sim(i, j) = x_i . x_j / (|x_i| |x_j| + shrink), x_i the column of item i in the user x item
matrix of positives (`min_rating`, `weighting` as in EASE); `shrink` damps similarities resting
on few co-occurrences. Each target item keeps its `k` most similar items, so the model is a
sparse n_items x n_items matrix S with at most k entries per column, and a user's scores are
their query row times S (the query weighs recent positives more, as in EASE).

S is built in blocks of target items: a block of rows of X'X (sparse product), normalised,
diagonal removed, `torch.topk` per row. Nothing of size n_items^2 is held at once.

Defaults tuned once on the validation part of ml-latest-small / user_temporal (see TUNING).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import scipy.sparse as sp
import torch

from batchrec.data import csr_from_state, csr_state
from batchrec.models.base import Param, Recommender
from batchrec.models.weights import positive_matrix, query_recency_factor

TUNING = """
Grid on the validation part of ml-latest-small / user_temporal (NDCG@10 with the train part as
history; the test part never looked at), min_rating=4:
  k=50  shrink=0  : 0.0811, recency_halflife=5: 0.0868     k=50  shrink=20: 0.0818, with recency: 0.0870
  k=200 shrink=0  : 0.0853, recency_halflife=5: 0.0879     k=200 shrink=20: 0.0855, with recency: 0.0915
  every interaction a positive (min_rating=0, k=200, shrink=10): 0.0656
Defaults: k=200, shrink=20, min_rating=4, recency_halflife=5 (floor 0.1).
"""


def cosine_topk(X: sp.csr_matrix, k: int, shrink: float, block_items: int = 1024) -> sp.csr_matrix:
    """S [n_items, n_items]: S[i, j] = cosine(i, j) (shrunk) for the k most similar i of each j."""
    Xt = X.T.tocsr()
    n = X.shape[1]
    norms = np.sqrt(np.asarray(Xt.multiply(Xt).sum(1)).ravel()).astype(np.float32)
    k = min(k, n - 1)
    rows, vals = [], []
    for a in range(0, n, block_items):
        b = min(a + block_items, n)
        sims = torch.from_numpy((Xt[a:b] @ X).toarray())  # targets a..b x all items
        sims /= torch.from_numpy(np.outer(norms[a:b], norms) + shrink + 1e-12)
        sims[torch.arange(b - a), torch.arange(a, b)] = 0.0  # an item is not its own neighbour
        v, i = torch.topk(sims, k, dim=1)
        rows.append(i.numpy())
        vals.append(v.numpy())
    nbr, sim = np.concatenate(rows), np.concatenate(vals)
    targets = np.repeat(np.arange(n), k)
    keep = sim.ravel() > 0
    S = sp.csr_matrix((sim.ravel()[keep], (nbr.ravel()[keep], targets[keep])), shape=(n, n), dtype=np.float32)
    S.sum_duplicates()
    return S


class ItemKNN(Recommender):
    """Item-item kNN: shrunk cosine similarity of item interaction vectors, top-k neighbours."""

    name = "itemknn"
    task = "ranking"
    seed_param = False
    params_spec = (
        Param("k", int, 200, "neighbours kept per target item", min=1),
        Param("shrink", float, 20.0, "added to the cosine denominator (damps rare co-occurrences)", min=0.0),
        Param(
            "min_rating", float, 4.0, "ratings below this are not positives (0: every interaction)", min=0.0
        ),
        Param(
            "weighting",
            str,
            "binary",
            "weight of a positive: binary (1) or rating (max(r - rating_offset, 0.5))",
            choices=("binary", "rating"),
        ),
        Param("rating_offset", float, 2.0, "subtracted from the rating with weighting=rating"),
        Param(
            "recency_halflife",
            float,
            5.0,
            "query weight halves every this many later events of the user (0: no recency weighting)",
            min=0.0,
        ),
        Param(
            "recency_floor",
            float,
            0.1,
            "query weight of a user's oldest events with recency weighting",
            min=0.0,
            max=1.0,
        ),
    )

    def fit(self, data, trainer) -> ItemKNN:
        p = self.params
        X = positive_matrix(
            data.train, self.n_users, self.n_items, p["min_rating"], p["weighting"], p["rating_offset"]
        )
        self.S = cosine_topk(X, p["k"], p["shrink"])
        self.query = positive_matrix(
            data.train,
            self.n_users,
            self.n_items,
            p["min_rating"],
            p["weighting"],
            p["rating_offset"],
            query_recency_factor(data.train, p["recency_halflife"], p["recency_floor"]),
        )
        trainer.log_epoch(epoch=1, positives=int(X.nnz), neighbours=int(self.S.nnz))
        return self

    def score(self, user_idx: torch.Tensor, item_idx: torch.Tensor | None = None) -> torch.Tensor:
        rows = self.query[user_idx.cpu().numpy()]
        if item_idx is None:
            return torch.from_numpy((rows @ self.S).toarray()).to(self.device)
        # Pairs: the product of each query row with its target's column of S.
        cols = self.S[:, item_idx.cpu().numpy()].T.tocsr()
        return torch.from_numpy(np.asarray(rows.multiply(cols).sum(1), np.float32).ravel()).to(self.device)

    def state(self) -> dict[str, Any]:
        return {"S": csr_state(self.S), "query": csr_state(self.query)}

    def load_state(self, state: dict[str, Any]) -> None:
        self.S = csr_from_state(state["S"], (self.n_items, self.n_items))
        self.query = csr_from_state(state["query"], (self.n_users, self.n_items))
