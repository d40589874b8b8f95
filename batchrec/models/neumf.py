"""NeuralMF for explicit ratings: global mean + user/item biases + GMF + a residual MLP.

rating(u, i) = mu + b_u + b_i + w . (p_u * q_i) + MLP([p'_u, q'_i]), where the MLP is a linear
layer, `blocks` residual blocks (x + dropout(relu(W x))) and a linear read-out. Variant `mlp` keeps
only mu + MLP over the concatenated embeddings (no biases, no GMF). Trained by Adam on MSE with L2
on the embeddings of each batch, early-stopped on validation RMSE.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from batchrec.models._nn import (
    epochs_to_run,
    fixed_epochs,
    pair_blocks,
    require_ratings,
    scale_grad,
    state_device,
)
from batchrec.models.base import Param, Recommender
from batchrec.models.validation import rating_validator
from batchrec.models.weights import later_ratings_decay

TUNING = """
Grid on the validation part of ml-latest-small / user_temporal (valid RMSE of the early-stopped
epoch; the test part never looked at). Before: factors 32, hidden 64, 2 blocks, dropout 0.2,
reg 0.05, lr 1e-3, no recency: 0.8637. User-row recency (the user's parameters learn from a rating
with weight exp(-k/recency)) 25 / 50 / 100 / 200 / 400: 0.8587 / 0.8578 / 0.8572 / 0.8576 /
0.8577 (the same weights on the whole loss instead: 0.8645 at 100). At recency 100: reg 0.02 /
0.1: 0.8553 / 0.8590; factors 64: 0.8575; lr 2e-3: 0.8550; dropout 0.4: 0.8545; dropout 0.4 with
lr 2e-3 / 4e-3: 0.8555 / 0.8550, with lr 2e-3 and reg 0.02: 0.8584; dropout 0.5, factors 64,
lr 2e-3: 0.8532.
Defaults: recency=100, dropout=0.5, factors=64, lr=2e-3 (hidden 64, 2 blocks, reg 0.05).
"""


class _ResBlock(nn.Module):
    def __init__(self, dim: int, dropout: float):
        super().__init__()
        self.linear, self.drop = nn.Linear(dim, dim), nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop(torch.relu(self.linear(x)))


class _NeuMFNet(nn.Module):
    def __init__(
        self, n_users: int, n_items: int, factors: int, hidden: int, blocks: int, dropout: float, gmf: bool
    ):
        super().__init__()
        self.gmf, self.factors = gmf, factors
        self.user_mlp, self.item_mlp = nn.Embedding(n_users, factors), nn.Embedding(n_items, factors)
        self.first = nn.Linear(2 * factors, hidden)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.Sequential(*(_ResBlock(hidden, dropout) for _ in range(blocks)))
        self.out = nn.Linear(hidden, 1)
        embeddings = [self.user_mlp, self.item_mlp]
        if gmf:
            self.user_gmf, self.item_gmf = nn.Embedding(n_users, factors), nn.Embedding(n_items, factors)
            self.user_bias, self.item_bias = nn.Embedding(n_users, 1), nn.Embedding(n_items, 1)
            nn.init.zeros_(self.user_bias.weight)
            nn.init.zeros_(self.item_bias.weight)
            embeddings += [self.user_gmf, self.item_gmf]
        for e in embeddings:
            nn.init.normal_(e.weight, std=0.05)
        self.register_buffer("mu", torch.zeros(()))

    def dense_sq(self) -> torch.Tensor:
        """Summed squares of the MLP weight matrices (their L2; without it they could scale up
        whatever the embedding L2 shrinks)."""
        return sum((m.weight**2).sum() for m in self.modules() if isinstance(m, nn.Linear))

    def mlp_tail(self, h: torch.Tensor) -> torch.Tensor:
        return self.out(self.blocks(self.drop(torch.relu(h)))).squeeze(-1)

    def forward(
        self, u: torch.Tensor, i: torch.Tensor, user_grad: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(predicted ratings, summed squares of the embeddings used, for L2); `user_grad` scales
        the gradient reaching each example's user rows."""
        pu, qi = scale_grad(self.user_mlp(u), user_grad), self.item_mlp(i)
        pred = self.mu + self.mlp_tail(self.first(torch.cat([pu, qi], 1)))
        sq = (pu**2).sum() + (qi**2).sum()
        if self.gmf:
            gu, gi = scale_grad(self.user_gmf(u), user_grad), self.item_gmf(i)
            bu, bi = scale_grad(self.user_bias(u).squeeze(1), user_grad), self.item_bias(i).squeeze(1)
            pred = pred + (gu * gi).sum(1) + bu + bi
            sq = sq + (gu**2).sum() + (gi**2).sum() + (bu**2).sum() + (bi**2).sum()
        return pred, sq

    def all_items(self, u: torch.Tensor) -> torch.Tensor:
        """[len(u), n_items] predictions; the first layer is split into a user part and an item part
        so the concatenation is never materialised, and users go in chunks to bound memory."""
        w_user, w_item = self.first.weight[:, : self.factors], self.first.weight[:, self.factors :]
        item_part = self.item_mlp.weight @ w_item.T + self.first.bias
        user_part = self.user_mlp(u) @ w_user.T
        n_items = item_part.shape[0]
        step = pair_blocks(len(u), n_items, item_part.shape[1])
        out = torch.cat(
            [
                self.mlp_tail(user_part[s : s + step, None, :] + item_part[None])
                for s in range(0, len(u), step)
            ]
        )
        out = out + self.mu
        if self.gmf:
            out = out + self.user_gmf(u) @ self.item_gmf.weight.T
            out = out + self.user_bias(u) + self.item_bias.weight.T
        return out


class NeuMF(Recommender):
    """NeuralMF for ratings: mean + biases + GMF + residual MLP (variant mlp: MLP only).

    Defaults tuned once on the validation part of ml-latest-small user_temporal (valid RMSE over
    recency, factors, dropout, reg and lr, see TUNING; early stopping picks the epoch).
    """

    name = "neumf"
    task = "rating"
    params_spec = (
        Param(
            "variant",
            str,
            "neumf",
            "neumf (mean + biases + GMF + MLP) or mlp (MLP over embeddings only)",
            choices=("neumf", "mlp"),
        ),
        Param("factors", int, 64, "embedding size of each path", min=1, max=4096),
        Param("hidden", int, 64, "width of the MLP", min=1, max=8192),
        Param("blocks", int, 2, "residual blocks in the MLP", min=0, max=32),
        Param("dropout", float, 0.5, "dropout in the MLP", min=0.0, max=0.95),
        Param("reg", float, 0.05, "L2 on the embeddings and biases of each batch (per example)", min=0.0),
        Param("dense_reg", float, 1e-4, "L2 on the MLP weight matrices (per batch)", min=0.0),
        Param(
            "recency",
            float,
            100.0,
            "user parameters learn from a rating with weight exp(-k/recency), k = the "
            "user's later ratings (0: all alike)",
            min=0.0,
        ),
        Param("lr", float, 2e-3, "Adam learning rate", min=1e-6, max=1.0),
        Param("batch_size", int, 1024, "ratings per batch", min=1),
        Param("epochs", int, 30, "maximum epochs", min=1, max=10000),
        Param("patience", int, 3, "epochs without validation improvement before stopping", min=1),
        fixed_epochs(6),  # early stopping's pick on user_temporal (seed 0): epoch 6
    )

    def _net(self, device: torch.device) -> _NeuMFNet:
        p = self.params
        return _NeuMFNet(
            self.n_users,
            self.n_items,
            p["factors"],
            p["hidden"],
            p["blocks"],
            p["dropout"],
            gmf=p["variant"] == "neumf",
        ).to(device)

    def fit(self, data, trainer) -> NeuMF:
        require_ratings(data, self.name)
        p = self.params
        torch.manual_seed(p["seed"])
        self.net = self._net(self.device)
        u, i, r = data.train.tensors(self.device)
        w = torch.from_numpy(later_ratings_decay(data.train, p["recency"]).astype(np.float32)).to(self.device)
        with torch.no_grad():  # start from the damped baseline predictor computed by `prepare`
            self.net.mu.fill_(float(self.priors["global_mean"]))
            if self.net.gmf:
                self.net.user_bias.weight[:, 0] = self.priors["user_offset"]
                self.net.item_bias.weight[:, 0] = self.priors["item_offset"]

        def loss(u: torch.Tensor, i: torch.Tensor, r: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
            pred, sq = self.net(u, i, w)
            return torch.mean((pred - r) ** 2) + p["reg"] * sq / len(u) + p["dense_reg"] * self.net.dense_sq()

        validate = rating_validator(self.score, data, self.device)
        trainer.fit(
            self.net,
            loss,
            (u, i, r, w),
            epochs=epochs_to_run(p, validate),
            batch_size=p["batch_size"],
            lr=p["lr"],
            validate=validate,
            patience=p["patience"],
            metric_name="valid_rmse",
            name=self.name,
        )
        return self

    def score(self, user_idx: torch.Tensor, item_idx: torch.Tensor | None = None) -> torch.Tensor:
        with torch.no_grad():
            if item_idx is None:
                return self.net.all_items(user_idx)
            return self.net(user_idx, item_idx)[0]

    def state(self) -> dict:
        return dict(self.net.state_dict())

    def load_state(self, state: dict) -> None:
        self.net = self._net(state_device(state))
        self.net.load_state_dict(state)
        self.net.eval()
