"""Biased matrix factorisation on explicit ratings (and plain Funk-SVD with `biased=false`).

    r_hat(u, i) = mu + b_u + b_i + p_u . q_i          (biased)
    r_hat(u, i) = p_u . q_i                           (biased=false: Funk-SVD)

trained by mini-batch Adam (sparse, lazy: a step touches only the rows of its batch) or SGD with
the shared `Trainer`, on the squared error plus an L2 penalty on the embedding rows of each batch.
A row seen n times in training is penalised reg / n^reg_exponent per occurrence (0: the classic
per-rating SGD penalty; 1: one prior per row whatever its count); biases get `bias_reg` times
the factors' weight. Global weight decay would also shrink rows a batch does not touch.

Users drift, and the per-user temporal protocol asks for each user's *next* ratings: with
`recency` > 0 the user's rows (p_u, b_u) learn from a rating with weight exp(-k / recency), k the
number of that user's later training ratings, while the item rows learn from every rating alike.

`missing_weight` > 0 also pulls a fresh sample of unrated (user, item) pairs towards
`missing_rating` each epoch (ratings are missing not at random; Steck 2010). It trades rating
accuracy for top-N ranking and is off by default (see TUNING); `RANKING_PARAMS` is mf set up as a
top-N ranker (it beats most-popular by far, at an RMSE no one should use).

With `data.valid` present the trainer early-stops on the validation RMSE (pairs whose user and
item are in train, predictions clipped to the rating scale, as the evaluation measures), or on
the validation NDCG@10 when `missing_weight` > 0, and keeps the best epoch.

Defaults tuned once on the validation part of ml-latest-small / user_temporal (see TUNING).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from batchrec.errors import BatchrecError
from batchrec.models.base import Param, Recommender
from batchrec.models.sampling import NegativeSampler
from batchrec.models.search import Choice, IntRange, LogUniform, Uniform
from batchrec.models.validation import ranking_validator, rating_validator
from batchrec.models.weights import later_ratings_decay

TUNING = """Tuned once on the validation part of ml-latest-small / user_temporal (fit on train, early stop
and choose on valid RMSE; test never looked at while choosing). Valid RMSE / valid NDCG@10:
  reg=0.05 (per rating), no recency                          0.8583 / 0.023
  reg=0.1                                                    0.8550 / 0.020
  reg=0.2, 0.4                                               0.8591, 0.8705
  reg=0.1, factors=128 / init_std=0.1 / lr=0.002             0.8556 / 0.8539 / 0.8542
  reg=0.1, missing_weight=0.02, missing_rating=2             0.8525 / 0.021
  reg=1, reg_exponent=0.5                                    0.8527 / 0.038
  reg=3 or 10, reg_exponent=1                                0.8639 / 0.8547
  reg=1, reg_exponent=0.5, recency=25 / 50 / 100 / 200 / 400  0.8553 / 0.8443 / 0.8406 / 0.8414 / 0.8446
  ... recency=100 with factors=128                           0.8401 (twice the time)
  ... recency=100 with bias_reg=0.05 / 1.0                   0.8414 / 0.8418
  -> defaults reg=1, reg_exponent=0.5, recency=100, bias_reg=0.2, factors=64, lr=5e-3, batch 1024.
Ranking: every RMSE-tuned setting ranks below most-popular (valid NDCG@10 0.055). Sampled unrated
pairs raise NDCG but cost RMSE: missing_weight=0.3, missing_rating=2 gives 0.909 / 0.054,
missing_weight=1 gives 1.012 / 0.058 (without recency).
As a ranker (early stopping on valid NDCG@10, recency 100): missing_weight / missing_rating
1/0: 0.058 at patience 3, 0.0838 at patience 10 (best epoch 15); 1/1 0.0778; 1/0.5 0.0826;
0.5/0 0.0738; 0.3/0 0.054 -> RANKING_PARAMS (valid RMSE about 2: ranking only).
"""

# mf as a top-N ranker (Steck's unrated-pairs imputation), chosen on valid NDCG@10 (see TUNING).
RANKING_PARAMS = {"missing_weight": 1.0, "missing_rating": 0.0, "patience": 10, "epochs": 40}


class _MFModule(nn.Module):
    """Sparse embedding tables, so an optimiser step touches only the rows of its batch."""

    def __init__(
        self,
        n_users: int,
        n_items: int,
        factors: int,
        mu: float,
        biased: bool,
        init_std: float,
        generator: torch.Generator,
    ):
        super().__init__()
        self.P = nn.Embedding(n_users, factors, sparse=True)
        self.Q = nn.Embedding(n_items, factors, sparse=True)
        self.bu = nn.Embedding(n_users, 1, sparse=True)
        self.bi = nn.Embedding(n_items, 1, sparse=True)
        with torch.no_grad():
            self.P.weight.copy_(torch.randn(n_users, factors, generator=generator) * init_std)
            self.Q.weight.copy_(torch.randn(n_items, factors, generator=generator) * init_std)
            self.bu.weight.zero_()
            self.bi.weight.zero_()
        self.bu.weight.requires_grad_(biased)
        self.bi.weight.requires_grad_(biased)
        self.register_buffer("mu", torch.tensor(mu if biased else 0.0))

    def forward(self, u: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
        return self.mu + self.bu(u)[:, 0] + self.bi(i)[:, 0] + (self.P(u) * self.Q(i)).sum(-1)

    def loss(
        self,
        u: torch.Tensor,
        i: torch.Tensor,
        r: torch.Tensor,
        w: torch.Tensor,
        uw: torch.Tensor,
        ru: torch.Tensor,
        ri: torch.Tensor,
        bias_reg: float,
    ) -> torch.Tensor:
        """Weighted squared error plus L2 on the embedding rows of this batch. w: weight of each
        sample; uw: weight of its gradient on the user's row only (recency); ru, ri: the L2 weight
        of its user and item row (biases get `bias_reg` times as much)."""
        p, q, bu, bi = self.P(u), self.Q(i), self.bu(u)[:, 0], self.bi(i)[:, 0]
        # Same values, user-side gradients scaled by uw: the user's rows follow their recent
        # ratings while the item rows learn from all ratings alike.
        p = uw[:, None] * p + (1 - uw[:, None]) * p.detach()
        bu = uw * bu + (1 - uw) * bu.detach()
        err = self.mu + bu + bi + (p * q).sum(-1) - r
        penalty = ru * (p * p).sum(-1) + ri * (q * q).sum(-1)
        if bias_reg and self.bu.weight.requires_grad:
            penalty = penalty + bias_reg * (ru * bu * bu + ri * bi * bi)
        return (w * err * err + penalty).mean()

    def scores_all(self, u: torch.Tensor) -> torch.Tensor:
        return self.mu + self.bu.weight[u] + self.bi.weight[:, 0] + self.P.weight[u] @ self.Q.weight.T


class BiasedMF(Recommender):
    """Biased matrix factorisation (global mean + user/item biases + factors, L2), by Adam/SGD."""

    name = "mf"
    task = "rating"
    params_spec = (
        Param("factors", int, 64, "latent dimensions", min=1, max=4096, search=IntRange(16, 128, log=True)),
        Param("biased", bool, True, "learn global mean and user/item biases (false: plain Funk-SVD)"),
        Param("lr", float, 5e-3, "learning rate", min=1e-7, max=10.0, search=LogUniform(1e-3, 2e-2)),
        Param(
            "reg",
            float,
            1.0,
            "L2 on the factor rows of each batch (see reg_exponent)",
            min=0.0,
            search=LogUniform(0.05, 10.0),
        ),
        Param(
            "bias_reg", float, 0.2, "L2 on the biases, relative to reg", min=0.0, search=LogUniform(0.02, 2.0)
        ),
        Param(
            "reg_exponent",
            float,
            0.5,
            "a row seen n times is penalised reg/n^reg_exponent per occurrence: "
            "0 = per rating (SGD style), 1 = once per row",
            min=0.0,
            max=1.0,
            search=Uniform(0.0, 1.0),
        ),
        Param("init_std", float, 0.01, "standard deviation of the initial factors", min=0.0, max=1.0),
        Param(
            "recency",
            float,
            100.0,
            "user rows learn from a rating with weight exp(-k/recency), k = the "
            "user's later ratings (0: all alike)",
            min=0.0,
            search=Choice((0.0, 25.0, 50.0, 100.0, 200.0, 400.0)),
        ),
        Param(
            "missing_weight",
            float,
            0.0,
            "weight of sampled unrated pairs pulled towards missing_rating (0: off)",
            min=0.0,
            max=1.0,
            search=Uniform(0.0, 1.0),
        ),
        Param(
            "missing_rating",
            float,
            1.0,
            "target rating of the sampled unrated pairs",
            search=Uniform(0.0, 3.0),
        ),
        Param(
            "epochs",
            int,
            30,
            "maximum epochs (all of them when there is no validation part)",
            min=1,
            max=10_000,
        ),
        Param("batch_size", int, 1024, "interactions per mini-batch", min=1),
        Param("optimizer", str, "adam", "adam or sgd (momentum 0.9)", choices=("adam", "sgd")),
        Param(
            "patience",
            int,
            3,
            "epochs without validation improvement before stopping",
            min=1,
            search=IntRange(3, 10),
        ),
    )

    def fit(self, data, trainer) -> BiasedMF:
        tr = data.train
        if tr.implicit:
            raise BatchrecError(
                "mf: needs explicit ratings; this snapshot is implicit (use bpr, ials or ease)"
            )
        p = self.params
        explicit = ~np.isnan(tr.rating)
        mu = float(tr.rating[explicit].mean())
        self.module = _MFModule(
            self.n_users,
            self.n_items,
            p["factors"],
            mu,
            p["biased"],
            p["init_std"],
            trainer.generator(offset=1),
        ).to(self.device)
        u, i, r = (t[torch.from_numpy(explicit).to(self.device)] for t in tr.tensors(self.device))
        w = torch.ones_like(r)
        uw = torch.ones_like(r)
        if p["recency"] > 0:
            uw = torch.from_numpy(
                later_ratings_decay(tr.select(explicit), p["recency"]).astype(np.float32)
            ).to(self.device)
        data_fn = (u, i, r, w, uw)
        if p["missing_weight"] > 0:
            # Ratings are missing not at random: users rate what they chose to watch. Pulling a
            # sample of unrated pairs towards a low rating, with a small weight, teaches the
            # factors which items a user would pick at all, which top-N ranking needs (Steck 2010).
            sampler = NegativeSampler(
                *tr.tensors(self.device)[:2], self.n_items, None, trainer.generator(offset=2)
            )
            r_miss = torch.full_like(r, p["missing_rating"])
            w_miss = torch.full_like(r, p["missing_weight"])

            def data_fn(epoch: int):
                j, ok = sampler.sample(u)
                return (
                    torch.cat([u, u[ok]]),
                    torch.cat([i, j[ok]]),
                    torch.cat([r, r_miss[ok]]),
                    torch.cat([w, w_miss[ok]]),
                    torch.cat([uw, w[ok]]),
                )

        # Per-occurrence L2 weight of each row: reg / n^reg_exponent (n = its training ratings).
        n_u = torch.bincount(u, minlength=self.n_users).clamp(min=1).float()
        n_i = torch.bincount(i, minlength=self.n_items).clamp(min=1).float()
        reg_u = p["reg"] * n_u.pow(-p["reg_exponent"])
        reg_i = p["reg"] * n_i.pow(-p["reg_exponent"])

        def loss_fn(u, i, r, w, uw):
            return self.module.loss(u, i, r, w, uw, reg_u[u], reg_i[i], p["bias_reg"])

        # Trained for ranking (unrated pairs sampled), the model keeps its best epoch by valid NDCG@10.
        ranking = p["missing_weight"] > 0
        validate = (
            ranking_validator(self, data) if ranking else rating_validator(self.module, data, self.device)
        )
        trainer.fit(
            self.module,
            loss_fn,
            data_fn,
            epochs=p["epochs"],
            batch_size=p["batch_size"],
            lr=p["lr"],
            optimizer="sparse_adam" if p["optimizer"] == "adam" else "sgd",
            validate=validate,
            higher_is_better=ranking,
            patience=p["patience"],
            metric_name="valid_ndcg@10" if ranking else "valid_rmse",
            name=self.name,
        )
        return self

    def score(self, user_idx: torch.Tensor, item_idx: torch.Tensor | None = None) -> torch.Tensor:
        with torch.no_grad():
            if item_idx is None:
                return self.module.scores_all(user_idx)
            return self.module(user_idx, item_idx)

    def user_vectors(self) -> torch.Tensor:
        m = self.module
        if not self.params["biased"]:
            return m.P.weight.detach()
        return torch.cat([m.P.weight, m.bu.weight + m.mu, torch.ones_like(m.bu.weight)], 1).detach()

    def item_vectors(self) -> torch.Tensor:
        m = self.module
        if not self.params["biased"]:
            return m.Q.weight.detach()
        return torch.cat([m.Q.weight, torch.ones_like(m.bi.weight), m.bi.weight], 1).detach()

    def state(self) -> dict[str, Any]:
        return {k: v.detach() for k, v in self.module.state_dict().items()}

    def load_state(self, state: dict[str, Any]) -> None:
        p = self.params
        n_users, n_items = state["P.weight"].shape[0], state["Q.weight"].shape[0]
        self.module = _MFModule(n_users, n_items, p["factors"], 0.0, p["biased"], 0.0, torch.Generator())
        self.module.load_state_dict(state)
        self.module.to(state["P.weight"].device).eval()
