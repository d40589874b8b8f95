"""EASE (Steck 2019): a closed-form item-item model, B = I - P / diag(P) with P = (X'X + lam I)^-1.

X is the user x item matrix of positives (see `positive_matrix`); B has a zero diagonal, so an
item never recommends itself, and a user's scores are their query row times B. The inverse is
exact and dense, computed on the model's device in float32 by one of two equivalent routes:

* item route: Cholesky of the n_items x n_items Gram matrix and `cholesky_inverse`
  (~n_items^3 flops, peak ~2 n_items^2 floats);
* user route, when at most half as many users have positives as there are items (Woodbury):
  P = (I - X'(lam I + X X')^-1 X) / lam, which needs only an n_users x n_users solve (in float64)
  and one n_items x n_users x n_items product — ~10x less work on ml-latest-small.

B itself is n_items^2 floats, so the fit refuses catalogues over the `max_memory_gb` budget.

Two input choices matter on a per-user temporal split and are parameters:
* which interactions are positives and how much each weighs (`min_rating`, `weighting`):
  counting every rating as a positive ranks poorly (low ratings point away from what a user
  wants); weighting by the rating's excess over `rating_offset` works best;
* the query (the row multiplied by B at scoring time) is the user's ratings centred at
  `query_offset`: liked items push their neighbours up, disliked ones (rated below the offset,
  weighed by `dislike_weight`) push theirs down; and recent events weigh more
  (`recency_halflife`, `recency_floor`): the next items a user rates follow their latest taste.
  B is fitted on the positives only; only the query is signed and reweighted.

Defaults tuned once on the validation part of ml-latest-small / user_temporal (see TUNING).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch

from batchrec.data import csr_from_state, csr_state, csr_to_torch
from batchrec.errors import BatchrecError
from batchrec.models.base import Param, Recommender
from batchrec.models.search import Choice, LogUniform, Uniform
from batchrec.models.weights import positive_matrix, query_weights

TUNING = """
Grids on the validation part of ml-latest-small / user_temporal (NDCG@10, train part as history;
the test part never looked at). Binary, every interaction a positive: lam 50..4000 best 0.0761
(lam 300). Positives and weights, lam 200..500, no recency: ratings >= 3.5 binary 0.0920,
ratings >= 4 binary 0.0931, weight = rating 0.0847, weight max(r - 2, 0.5) 0.0969 (lam 500).
Query recency (halflife, floor) on max(r - 2, 0.5): (5, 0.1) 0.1076, (5, 0.2) 0.1020,
(10, 0.2) 0.1043, (20, 0.2) 0.1012; at lam 300: 0.1043, lam 1000: 0.1055. Also tried and not
better on valid: ratings >= 3 weighted r - 2 (0.1058 best), max(r - 3, 0.25) (0.1020), raw rating
weights (0.1002), a popularity-scaled diagonal (EDLAE-style, lam + beta * G_ii; 0.0935 at best).
float32 is enough: B differs from a float64 inverse by < 4e-8 (entries up to 0.2).
Signed query (session 3; B unchanged, query weight r - query_offset, negatives times
dislike_weight, recency 5 or 10): offset 2.25/2.5/2.75 x dislike 0.35/0.5/0.75 x halflife 5/10
gave 0.1036..0.1101, best (2.5, 0.5, 5) 0.1101 against 0.1076 for the positive-only query above;
offsets 3 and 3.25 were worse (0.097..0.108), and so was adding the negatives to the old query.
Defaults: lam=500, weighting=rating, rating_offset=2, query_offset=2.5, dislike_weight=0.5,
recency_halflife=5, recency_floor=0.1.
"""


def gram(X: sp.csr_matrix, max_block_products: int = 200_000_000) -> np.ndarray:
    """X'X as a dense float32 array, by sparse row blocks of X' on torch's threads.

    Work and memory per block are bounded by the number of products it takes (each stored
    (u, i) of a block row i meets the n_u items of user u), so blocks are cut by that count;
    each sparse block result is written straight into its rows of the dense output."""
    Xt = X.T.tocsr()
    n = X.shape[1]
    G = np.empty((n, n), np.float32)
    products = np.cumsum(Xt @ np.diff(X.indptr).astype(np.float64))
    cuts = np.searchsorted(
        products, np.arange(1, products[-1] // max_block_products + 1) * max_block_products
    )
    bounds = np.unique(np.concatenate([[0], cuts, [n]]))

    def block(a: int, b: int) -> None:
        (Xt[a:b] @ X).toarray(out=G[a:b])

    with ThreadPoolExecutor(max(1, torch.get_num_threads())) as pool:
        list(pool.map(block, bounds[:-1], bounds[1:]))
    return G


def query_scores(
    query: sp.csr_matrix, weights: torch.Tensor, user_idx: torch.Tensor, item_idx: torch.Tensor | None
) -> torch.Tensor:
    """Scores of item-item models: query[u] @ weights for all items, or for (u, i) pairs.

    For pairs, each stored (u, j, q) of the users' query rows adds q * weights[j, i]."""
    dev = weights.device
    rows = query[user_idx.cpu().numpy()]
    if item_idx is None:
        block = csr_to_torch(rows, dev)
        return (
            torch.sparse.mm(block, weights)
            if rows.nnz
            else torch.zeros(rows.shape[0], weights.shape[1], device=dev)
        )
    pair = torch.from_numpy(np.repeat(np.arange(rows.shape[0]), np.diff(rows.indptr))).to(dev)
    j = torch.from_numpy(rows.indices.astype(np.int64)).to(dev)
    q = torch.from_numpy(rows.data).to(dev)
    out = torch.zeros(len(user_idx), device=dev)
    return out.index_add_(0, pair, q * weights[j, item_idx.to(dev)[pair]])


class EASE(Recommender):
    """EASE: closed-form item-item autoencoder (Steck 2019), dense inverse on CPU/GPU."""

    name = "ease"
    task = "ranking"
    seed_param = False
    params_spec = (
        Param(
            "lam",
            float,
            500.0,
            "L2 regularisation (added to the Gram matrix diagonal)",
            min=1e-6,
            search=LogUniform(20.0, 5000.0),
        ),
        Param(
            "min_rating",
            float,
            0.0,
            "ratings below this are not positives (0: every interaction)",
            min=0.0,
            search=Choice((0.0, 3.0, 3.5, 4.0)),
        ),
        Param(
            "weighting",
            str,
            "rating",
            "weight of a positive: binary (1) or rating (max(r - rating_offset, 0.5))",
            choices=("binary", "rating"),
            search=Choice(("binary", "rating")),
        ),
        Param(
            "rating_offset",
            float,
            2.0,
            "subtracted from the rating with weighting=rating",
            search=Uniform(0.0, 3.0),
        ),
        Param(
            "query_offset",
            float,
            2.5,
            "query weight of a rated item = rating - query_offset (below: disliked)",
            search=Uniform(0.0, 3.5),
        ),
        Param(
            "dislike_weight",
            float,
            0.5,
            "factor on the (negative) query weight of disliked items (0: ignore them)",
            min=0.0,
            search=Uniform(0.0, 1.0),
        ),
        Param(
            "recency_halflife",
            float,
            5.0,
            "query weight halves every this many later events of the user (0: no recency weighting)",
            min=0.0,
            search=Choice((0.0, 2.0, 5.0, 10.0, 20.0, 50.0)),
        ),
        Param(
            "recency_floor",
            float,
            0.1,
            "query weight of a user's oldest events with recency weighting",
            min=0.0,
            max=1.0,
            search=Uniform(0.0, 1.0),
        ),
        Param(
            "max_memory_gb", float, 12.0, "refuse catalogues whose dense fit would need more memory", min=0.01
        ),
    )

    def _query(self, events) -> sp.csr_matrix:
        p = self.params
        w = query_weights(
            events, p["query_offset"], p["dislike_weight"], p["recency_halflife"], p["recency_floor"]
        )
        m = sp.csr_matrix(
            (w, (events.user_idx, events.item_idx)), shape=(self.n_users, self.n_items), dtype=np.float32
        )
        m.sum_duplicates()
        m.eliminate_zeros()  # ratings at the offset say nothing
        return m

    def fit(self, data, trainer) -> EASE:
        p = self.params
        n = data.n_items
        need_gb = 3 * n * n * 4 / 2**30
        if need_gb > p["max_memory_gb"]:
            raise BatchrecError(
                f"ease: {n} items need about {need_gb:.1f} GB for the dense fit, over "
                f"max_memory_gb={p['max_memory_gb']:g}; raise max_memory_gb or use ials/itemknn"
            )
        X = positive_matrix(data.train, self.n_users, n, p["min_rating"], p["weighting"], p["rating_offset"])
        self.B = self.closed_form(X, p["lam"], self.device)
        self.query = self._query(data.train)
        trainer.log_epoch(epoch=1, positives=int(X.nnz), items=n)
        return self

    @staticmethod
    def closed_form(X: sp.csr_matrix, lam: float, device: torch.device) -> torch.Tensor:
        """B = I - P / diag(P), P = (X'X + lam I)^-1, float32 [n_items, n_items] on `device`."""
        n_items = X.shape[1]
        active = X[np.diff(X.indptr) > 0]  # users without positives add nothing to X'X
        if 2 * active.shape[0] <= n_items:  # user route: less work, and no more memory than the item route
            Xd = torch.from_numpy(active.toarray()).to(device)
            K = torch.from_numpy((active @ active.T).toarray()).to(device, torch.float64)
            K.diagonal().add_(lam)
            P = Xd.T @ torch.linalg.solve(K, Xd.double()).float()  # X'(lam I + X X')^-1 X
            P.neg_().diagonal().add_(1.0)
            P.div_(lam)
        else:
            G = torch.from_numpy(gram(active)).to(device)
            G.diagonal().add_(lam)
            L = torch.linalg.cholesky(G)
            del G
            P = torch.cholesky_inverse(L)
            del L
        P.div_(-P.diagonal().clone())
        P.diagonal().zero_()
        return P

    def score(self, user_idx: torch.Tensor, item_idx: torch.Tensor | None = None) -> torch.Tensor:
        return query_scores(self.query, self.B, user_idx, item_idx)

    def state(self) -> dict[str, Any]:
        return {"B": self.B, "query": csr_state(self.query)}

    def load_state(self, state: dict[str, Any]) -> None:
        self.B = state["B"]
        self.query = csr_from_state(state["query"], (self.n_users, self.n_items))
