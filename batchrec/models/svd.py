"""Truncated SVD of the centred rating matrix (scipy.sparse.linalg.svds), centring added back.

    r_hat(u, i) = c(u, i) + alpha * U_k S_k V_k^T [u, i]

The residuals r - c(u, i) of the known ratings form a sparse matrix whose missing entries count
as 0 (= "predict the centring"); its rank-`factors` SVD is computed by ARPACK from a seeded start
vector (deterministic). Centring `c`:

* `user`: the user's mean rating (offset from the global mean damped by `user_shrinkage`);
* `baseline`: mu + b_u + b_i, item offsets damped by `item_shrinkage` pseudo-ratings, then user
  offsets of the remainder damped by `user_shrinkage`.

With `recency` > 0 a user's offset weights their ratings by exp(-k / recency), k the number of
that user's later ratings: users drift, and the per-user temporal protocol asks for their next
ratings. `alpha` scales the low-rank part.

Defaults tuned once on the validation part of ml-latest-small / user_temporal (see TUNING).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import scipy.sparse as sp
import scipy.sparse.linalg as spla
import torch

from batchrec.errors import BatchrecError
from batchrec.models.base import Param, Recommender
from batchrec.models.validation import rating_validator
from batchrec.models.weights import later_ratings_decay

TUNING = """Tuned once on the validation part of ml-latest-small / user_temporal (train part only; valid
RMSE / valid NDCG@10; most-popular scores NDCG 0.055 there):
  user centring, factors 5 / 20 / 50                         0.921 / 0.924 / 0.931, NDCG 0.058-0.064
  baseline centring (shrinkage 10), factors 5 / 20 / 50      0.874 / 0.874 / 0.875, NDCG 0.046-0.053
  alpha 2 / 4 / 8 (factors 10)                               0.877 / 0.897 / 0.967
  + recency 25 / 50 / 100 (both shrinkages 10)               0.865 / 0.860 / 0.860
  recency 50, item_shrinkage 5 / 10 / 25 / 50 / 100          0.852 / 0.856 / 0.865 / 0.873 / 0.881
                                        NDCG@10              0.036 / 0.048 / 0.057 / 0.062 / 0.064
  user_shrinkage 1 / 3 / 6 (item 25)                         0.8647 / 0.8650 / 0.8662
  factors 5 / 20 / 50 / 100 (item 25, user 3)                0.866 / 0.865 / 0.868 / 0.871; alpha 0: 0.874
Item shrinkage trades RMSE for ranking: damped item offsets stop rare, highly rated items from
topping every list. `mf` carries the rating target, so the defaults keep svd above most-popular
on ranking: baseline centring, item_shrinkage 25, user_shrinkage 3, recency 50, factors 20,
alpha 1 (valid 0.865 / 0.057). For the lowest RMSE use item_shrinkage=5 (valid 0.852).
"""


class TruncatedSVD(Recommender):
    """Truncated SVD (scipy svds) of the mean-centred rating matrix, centring added back."""

    name = "svd"
    task = "rating"
    params_spec = (
        Param("factors", int, 20, "rank of the decomposition", min=1, max=2048),
        Param(
            "centering",
            str,
            "baseline",
            "user: user mean; baseline: mu + b_u + b_i (both damped)",
            choices=("user", "baseline"),
        ),
        Param(
            "item_shrinkage", float, 25.0, "baseline: pseudo-ratings damping item offsets towards 0", min=0.0
        ),
        Param("user_shrinkage", float, 3.0, "pseudo-ratings damping user means/offsets towards 0", min=0.0),
        Param("alpha", float, 1.0, "scale of the low-rank correction", min=0.0, max=100.0),
        Param(
            "recency",
            float,
            50.0,
            "weight a user's ratings by exp(-k/recency), k = the user's later ratings (0: all equal)",
            min=0.0,
        ),
    )

    def fit(self, data, trainer) -> TruncatedSVD:
        tr = data.train
        if tr.implicit:
            raise BatchrecError(
                "svd: needs explicit ratings; this snapshot is implicit (use ease, ials or bpr)"
            )
        p = self.params
        k = p["factors"]
        if k >= min(self.n_users, self.n_items):
            raise BatchrecError(
                f"svd: parameter factors={k} must be below min(users, items) = "
                f"{min(self.n_users, self.n_items)} for this snapshot"
            )
        keep = ~np.isnan(tr.rating)
        u, i, r = tr.user_idx[keep], tr.item_idx[keep], tr.rating[keep].astype(np.float64)
        w = later_ratings_decay(tr.select(keep), p["recency"])
        user_base, item_base = self._centring(u, i, r, w)
        resid = r - user_base[u] - item_base[i]
        m = sp.csr_matrix((resid, (u, i)), shape=(self.n_users, self.n_items))
        v0 = np.random.default_rng(p["seed"]).standard_normal(min(m.shape))
        U, s, Vt = spla.svds(m, k=k, v0=v0)
        order = np.argsort(-s)
        U, s, Vt = U[:, order], s[order], Vt[order]
        dev = self.device
        self.user_factors = torch.from_numpy((U * (s * p["alpha"])).astype(np.float32)).to(dev)
        self.item_factors = torch.from_numpy(np.ascontiguousarray(Vt.T, dtype=np.float32)).to(dev)
        self.user_base = torch.from_numpy(user_base.astype(np.float32)).to(dev)
        self.item_base = torch.from_numpy(item_base.astype(np.float32)).to(dev)
        check = rating_validator(self.score, data, dev)
        row = {"epoch": 1, "singular_max": float(s[0]), "singular_min": float(s[-1])}
        trainer.log_epoch(**row, **({"valid_rmse": check()} if check else {}))
        return self

    def _centring(
        self, u: np.ndarray, i: np.ndarray, r: np.ndarray, w: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """(per-user part, per-item part) of the centring, damped by the shrinkages; the user
        part averages with weights `w` (recency)."""
        mu = r.mean()
        b_i = np.zeros(self.n_items)
        if self.params["centering"] == "baseline":
            n_i = np.bincount(i, minlength=self.n_items) + self.params["item_shrinkage"]
            b_i = np.bincount(i, weights=r - mu, minlength=self.n_items) / np.maximum(n_i, 1e-12)
        n_u = np.bincount(u, weights=w, minlength=self.n_users) + self.params["user_shrinkage"]
        b_u = np.bincount(u, weights=w * (r - mu - b_i[i]), minlength=self.n_users) / np.maximum(n_u, 1e-12)
        return mu + b_u, b_i

    def score(self, user_idx: torch.Tensor, item_idx: torch.Tensor | None = None) -> torch.Tensor:
        if item_idx is None:
            return (
                self.user_base[user_idx, None]
                + self.item_base[None, :]
                + self.user_factors[user_idx] @ self.item_factors.T
            )
        return (
            self.user_base[user_idx]
            + self.item_base[item_idx]
            + (self.user_factors[user_idx] * self.item_factors[item_idx]).sum(-1)
        )

    def user_vectors(self) -> torch.Tensor:
        return torch.cat(
            [self.user_factors, self.user_base[:, None], torch.ones_like(self.user_base)[:, None]], 1
        )

    def item_vectors(self) -> torch.Tensor:
        return torch.cat(
            [self.item_factors, torch.ones_like(self.item_base)[:, None], self.item_base[:, None]], 1
        )

    def state(self) -> dict[str, Any]:
        return {
            "user_factors": self.user_factors,
            "item_factors": self.item_factors,
            "user_base": self.user_base,
            "item_base": self.item_base,
        }

    def load_state(self, state: dict[str, Any]) -> None:
        for key in ("user_factors", "item_factors", "user_base", "item_base"):
            setattr(self, key, state[key])
