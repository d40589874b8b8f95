"""Content DNN rating regressor: user and item embeddings concatenated with the item's genre
multi-hot and TF-IDF tag vector, through an MLP with dropout, to a sigmoid mapped onto the
rating scale.

rating(u, i) = lo + (hi - lo) * sigmoid(MLP([p_u, q_i, x_i]) + b_u + b_i), x_i = [genres | tags]
max-abs scaled on the items with training ratings (columns no training item has are zeroed).
The first layer's product with the concatenation is computed as W_u p_u + W_i q_i + W_x x_i,
the sparse x_i read through an EmbeddingBag; all-item scoring adds a per-user and a per-item
part, so the concatenation is never materialised. Items with few ratings lean on x_i, which is
learned from every item sharing those genres and tags; `id_dropout` drops the item id embedding
of a training example now and then so the content path has to carry weight on its own.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from batchrec.data import SparseRows
from batchrec.models._nn import (
    epochs_to_run,
    fixed_epochs,
    item_content,
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
epoch; the test part never looked at). Before: factors 32, lr 1e-3, no recency: 0.8635.
User-row recency (the user's parameters learn from a rating with weight exp(-k/recency)):
25 / 50 / 100 / 200 / 400: 0.8629 / 0.8583 / 0.8553 / 0.8561 / 0.8581 (the same weights on the
whole loss instead: 0.8682 at 100). At recency 100: reg 0.02 / 0.1: 0.8551 / 0.8553; dropout 0.4:
0.8680 (at lr 1e-3); id_dropout 0.3: 0.8603; factors 64: 0.8536; lr 2e-3: 0.8520, lr 4e-3:
0.8497; lr 2e-3 + factors 64: 0.8494, + reg 0.02: 0.8509, + dropout 0.3: 0.8526; lr 4e-3 +
factors 64: 0.8495, + reg 0.1: 0.8506. From the defaults below: hidden 128: 0.8499, dropout 0.3:
0.8502, reg 0.1: 0.8501, batch 2048: 0.8522.
Defaults: recency=100, lr=2e-3, factors=64 (hidden 64, dropout 0.2, id_dropout 0.1, reg 0.05).
"""


class _ContentNet(nn.Module):
    def __init__(
        self, n_users: int, n_items: int, n_features: int, factors: int, hidden: int, dropout: float
    ):
        super().__init__()
        self.user, self.item = nn.Embedding(n_users, factors), nn.Embedding(n_items, factors)
        self.user_bias, self.item_bias = nn.Embedding(n_users, 1), nn.Embedding(n_items, 1)
        self.first_user = nn.Linear(factors, hidden, bias=False)
        self.first_item = nn.Linear(factors, hidden)
        self.first_content = nn.EmbeddingBag(max(n_features, 1), hidden, mode="sum")
        self.tail = nn.Sequential(
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, hidden // 2 or 1),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden // 2 or 1, 1),
        )
        for e in (self.user, self.item):
            nn.init.normal_(e.weight, std=0.05)
        nn.init.normal_(self.first_content.weight, std=0.01)
        for e in (self.user_bias, self.item_bias):
            nn.init.zeros_(e.weight)
        self.register_buffer("scale", torch.tensor([0.0, 1.0]))  # (lo, hi - lo)

    def item_part(
        self, content: SparseRows, i: torch.Tensor, keep_id: torch.Tensor | None = None
    ) -> torch.Tensor:
        _, cols, vals, offsets = content.entries(i)
        q = self.item(i) if keep_id is None else self.item(i) * keep_id[:, None]
        return self.first_item(q) + self.first_content(cols, offsets, per_sample_weights=vals)

    def rating(self, logit: torch.Tensor) -> torch.Tensor:
        return self.scale[0] + self.scale[1] * torch.sigmoid(logit)

    def forward(
        self,
        content: SparseRows,
        u: torch.Tensor,
        i: torch.Tensor,
        keep_id: torch.Tensor | None = None,
        user_grad: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(predicted ratings, summed squares of the embedding rows used, for L2); `user_grad` scales
        the gradient reaching each example's user rows."""
        pu, bu = scale_grad(self.user(u), user_grad), scale_grad(self.user_bias(u)[:, 0], user_grad)
        bi = self.item_bias(i)[:, 0]
        h = self.first_user(pu) + self.item_part(content, i, keep_id)
        sq = (pu**2).sum() + (self.item(i) ** 2).sum() + (bu**2).sum() + (bi**2).sum()
        return self.rating(self.tail(h)[:, 0] + bu + bi), sq

    def all_items(self, content: SparseRows, u: torch.Tensor) -> torch.Tensor:
        items = self.item_part(content, torch.arange(self.item.num_embeddings, device=u.device))
        users = self.first_user(self.user(u))
        step = pair_blocks(len(u), items.shape[0], items.shape[1])
        logit = torch.cat(
            [self.tail(users[s : s + step, None, :] + items[None])[..., 0] for s in range(0, len(u), step)]
        )
        return self.rating(logit + self.user_bias(u) + self.item_bias.weight.T)


class ContentDNN(Recommender):
    """Content DNN: MLP over user/item embeddings + genre/tag features, sigmoid to the rating scale.

    Defaults tuned once on the validation part of ml-latest-small user_temporal (valid RMSE over
    recency, factors, dropout, reg, id_dropout and lr, see TUNING; early stopping picks the epoch).
    """

    name = "content_dnn"
    task = "rating"
    params_spec = (
        Param("factors", int, 64, "user and item embedding size", min=1, max=4096),
        Param("hidden", int, 64, "width of the first MLP layer (the second is half)", min=2, max=8192),
        Param("dropout", float, 0.2, "dropout in the MLP", min=0.0, max=0.95),
        Param(
            "id_dropout",
            float,
            0.1,
            "probability of dropping the item id embedding of a training example",
            min=0.0,
            max=1.0,
        ),
        Param("reg", float, 0.05, "L2 on the embeddings and biases of each batch (per example)", min=0.0),
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
        fixed_epochs(3),  # early stopping's pick on user_temporal (seed 0): epoch 3
    )

    def _net(self, n_features: int, device: torch.device) -> _ContentNet:
        p = self.params
        return _ContentNet(
            self.n_users, self.n_items, n_features, p["factors"], p["hidden"], p["dropout"]
        ).to(device)

    def fit(self, data, trainer) -> ContentDNN:
        lo, hi = require_ratings(data, self.name)
        p = self.params
        torch.manual_seed(p["seed"])
        in_train = np.bincount(data.train.item_idx, minlength=self.n_items) > 0
        self.content = SparseRows.from_scipy(item_content(data, in_train), self.device)
        self.net = self._net(self.content.n_cols, self.device)
        u, i, r = data.train.tensors(self.device)
        w = torch.from_numpy(later_ratings_decay(data.train, p["recency"]).astype(np.float32)).to(self.device)
        with torch.no_grad():  # the output starts at the training mean
            self.net.scale.copy_(torch.tensor([lo, hi - lo]))
            mean = (float(self.priors["global_mean"]) - lo) / (hi - lo)
            self.net.tail[-1].bias.fill_(float(np.log(mean / (1 - mean))))

        def loss(u: torch.Tensor, i: torch.Tensor, r: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
            keep = torch.rand(i.shape, device=i.device) >= p["id_dropout"]
            pred, sq = self.net(self.content, u, i, keep, w)
            return torch.mean((pred - r) ** 2) + p["reg"] * sq / len(u)

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
                return self.net.all_items(self.content, user_idx)
            return self.net(self.content, user_idx, item_idx)[0]

    def state(self) -> dict:
        return dict(self.net.state_dict()) | self.content.state("content")

    def load_state(self, state: dict) -> None:
        self.content = SparseRows.from_state(state, "content")
        self.net = self._net(self.content.n_cols, state_device(state))
        self.net.load_state_dict({k: v for k, v in state.items() if not k.startswith("content_")})
        self.net.eval()
