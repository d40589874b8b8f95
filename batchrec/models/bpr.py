"""Matrix factorisation with the BPR pairwise loss on implicit positives.

For each positive (u, i) and a sampled negative j the loss is -log sigmoid(x_ui - x_uj) plus L2
on the rows of the batch, with x_ui = p_u . q_i (+ b_i). Positives are the training interactions
with rating >= `positive_threshold` (every interaction of implicit data, or with threshold 0).
Negatives are drawn afresh every epoch, uniformly or in proportion to item popularity^`neg_alpha`,
and a user's own training items are rejected without Python loops: the keys user*n_items+item of
the training set are sorted once and every draw is tested with a binary search; rejected draws are
redrawn for a few rounds (the few left after that are dropped). With `recency` > 0 the user's
row learns from an interaction with weight exp(-k / recency), k the number of that user's later
interactions (tastes drift; the per-user temporal protocol asks for what comes next). With a
valid part the trainer early-stops on valid NDCG@10 (the evaluation protocol on the valid part).

Defaults tuned once on the validation part of ml-latest-small / user_temporal (see TUNING).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from batchrec.errors import BatchrecError
from batchrec.metrics import validation_metrics
from batchrec.models.base import Param, Recommender
from batchrec.models.sampling import NegativeSampler
from batchrec.models.weights import later_ratings_decay

TUNING = """Tuned once on the validation part of ml-latest-small / user_temporal (fit on train, early stop
and choose on valid NDCG@10; most-popular scores 0.055 there, test never looked at):
  every interaction positive, 1 negative, reg 1e-3 / 1e-2 / 3e-2     0.059 / 0.052 / 0.059
  every interaction positive, 4 negatives, reg 1e-2 (recency 50)     0.067 (0.068)
  positives rating >= 3.5: 1 negative reg 1e-3; 4 / 8 negatives reg 1e-2   0.066; 0.073 / 0.072
  positives >= 4.0 / >= 4.5, 4 negatives                     0.080 / 0.070
  >= 4.0, 4 negatives, reg 3e-3 / 2e-2                       0.067 / 0.069 (recency 50)
  >= 4.0, 4 negatives, recency 50 / 100 / 200                0.082 / 0.083 / 0.081
  ... recency 100, reg 5e-3 / lr 1e-2                        0.078 / 0.077
  ... recency 50, factors 128 / neg_alpha 0.25               0.070 / 0.081
  -> defaults positive_threshold 4, negatives 4, recency 100, reg 1e-2, factors 64, lr 5e-3.
"""


class _BPRModule(nn.Module):
    def __init__(self, n_users: int, n_items: int, factors: int, init_std: float, generator: torch.Generator):
        super().__init__()
        self.P = nn.Embedding(n_users, factors, sparse=True)
        self.Q = nn.Embedding(n_items, factors, sparse=True)
        self.b = nn.Embedding(n_items, 1, sparse=True)
        with torch.no_grad():
            self.P.weight.copy_(torch.randn(n_users, factors, generator=generator) * init_std)
            self.Q.weight.copy_(torch.randn(n_items, factors, generator=generator) * init_std)
            self.b.weight.zero_()

    def loss(self, u, i, j, uw, reg: float, bias_reg: float) -> torch.Tensor:
        p, qi, qj = self.P(u), self.Q(i), self.Q(j)
        # Same values, the user-row gradient scaled by uw (recency): users follow recent tastes.
        p = uw[:, None] * p + (1 - uw[:, None]) * p.detach()
        bi, bj = self.b(i)[:, 0], self.b(j)[:, 0]
        x = (p * (qi - qj)).sum(-1) + bi - bj
        penalty = reg * ((p * p).sum(-1) + (qi * qi).sum(-1) + (qj * qj).sum(-1))
        if self.b.weight.requires_grad:
            penalty = penalty + bias_reg * (bi * bi + bj * bj)
        return (-F.logsigmoid(x) + penalty).mean()


class BPRMF(Recommender):
    """Matrix factorisation with the BPR pairwise ranking loss and sampled negatives."""

    name = "bpr"
    task = "ranking"
    params_spec = (
        Param("factors", int, 64, "latent dimensions", min=1, max=4096),
        Param(
            "positive_threshold", float, 4.0, "ratings >= this are positives (0: every interaction)", min=0.0
        ),
        Param("item_bias", bool, True, "learn an item bias"),
        Param("negatives", int, 4, "negatives sampled per positive and epoch", min=1, max=100),
        Param(
            "neg_alpha",
            float,
            0.0,
            "negatives drawn in proportion to item count^neg_alpha (0: uniform)",
            min=0.0,
            max=2.0,
        ),
        Param(
            "recency",
            float,
            100.0,
            "user rows learn from an interaction with weight exp(-k/recency), k = the "
            "user's later interactions (0: all alike)",
            min=0.0,
        ),
        Param("lr", float, 5e-3, "learning rate (Adam)", min=1e-7, max=10.0),
        Param("reg", float, 1e-2, "L2 on the factor rows of each batch", min=0.0),
        Param("bias_reg", float, 1e-3, "L2 on the item bias entries of each batch", min=0.0),
        Param("init_std", float, 0.1, "standard deviation of the initial factors", min=0.0, max=1.0),
        Param(
            "epochs",
            int,
            30,
            "maximum epochs (all of them when there is no validation part)",
            min=1,
            max=10_000,
        ),
        Param("batch_size", int, 1024, "triples per mini-batch", min=1),
        Param("patience", int, 4, "epochs without validation improvement before stopping", min=1),
    )

    def fit(self, data, trainer) -> BPRMF:
        p = self.params
        tr = data.train
        dev = self.device
        positive = (
            np.ones(len(tr), bool)
            if tr.implicit or p["positive_threshold"] <= 0
            else (~np.isnan(tr.rating) & (tr.rating >= p["positive_threshold"]))
        )
        if not positive.any():
            raise BatchrecError(
                f"bpr: no training interaction has rating >= positive_threshold={p['positive_threshold']}"
            )
        users, items, _ = tr.tensors(dev)
        keep = torch.from_numpy(positive).to(dev)
        pos_u, pos_i = users[keep], items[keep]
        pos_w = torch.ones(len(pos_u), device=dev)
        if p["recency"] > 0:
            pos_w = torch.from_numpy(later_ratings_decay(tr, p["recency"]).astype(np.float32)).to(dev)[keep]
        weights = None
        if p["neg_alpha"] > 0:
            weights = torch.bincount(items, minlength=self.n_items).double().pow(p["neg_alpha"])
        sampler = NegativeSampler(users, items, self.n_items, weights, trainer.generator(offset=2))
        self.module = _BPRModule(
            self.n_users, self.n_items, p["factors"], p["init_std"], trainer.generator(offset=1)
        ).to(dev)
        self.module.b.weight.requires_grad_(p["item_bias"])
        u_rep, i_rep, w_rep = (t.repeat(p["negatives"]) for t in (pos_u, pos_i, pos_w))

        def epoch_data(epoch: int):
            neg, ok = sampler.sample(u_rep)
            return u_rep[ok], i_rep[ok], neg[ok], w_rep[ok]

        def loss_fn(u, i, j, uw):
            return self.module.loss(u, i, j, uw, p["reg"], p["bias_reg"])

        validate = None
        if data.valid is not None and len(data.valid):

            def validate() -> float:
                return validation_metrics(self, data)["ndcg@10"]

        trainer.fit(
            self.module,
            loss_fn,
            epoch_data,
            epochs=p["epochs"],
            batch_size=p["batch_size"],
            lr=p["lr"],
            optimizer="sparse_adam",
            validate=validate,
            higher_is_better=True,
            patience=p["patience"],
            metric_name="valid_ndcg@10",
            name=self.name,
        )
        return self

    def score(self, user_idx: torch.Tensor, item_idx: torch.Tensor | None = None) -> torch.Tensor:
        m = self.module
        with torch.no_grad():
            if item_idx is None:
                return m.P.weight[user_idx] @ m.Q.weight.T + m.b.weight[:, 0]
            return (m.P.weight[user_idx] * m.Q.weight[item_idx]).sum(-1) + m.b.weight[item_idx, 0]

    def user_vectors(self) -> torch.Tensor:
        w = self.module.P.weight.detach()
        return torch.cat([w, torch.ones(len(w), 1, device=w.device)], 1)

    def item_vectors(self) -> torch.Tensor:
        return torch.cat([self.module.Q.weight, self.module.b.weight], 1).detach()

    def state(self) -> dict[str, Any]:
        return {k: v.detach() for k, v in self.module.state_dict().items()}

    def load_state(self, state: dict[str, Any]) -> None:
        n_users, factors = state["P.weight"].shape
        self.module = _BPRModule(n_users, state["Q.weight"].shape[0], factors, 0.0, torch.Generator())
        self.module.load_state_dict(state)
        self.module.to(state["P.weight"].device).eval()
