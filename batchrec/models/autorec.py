"""AutoRec (Sedhain et al. 2015) for explicit ratings, item-based (I-AutoRec) or user-based.

I-AutoRec encodes each item's column of mean-centred training ratings over users,
h_i = act(W x_i + b), and reconstructs it, x_hat_i[u] = V_u . h_i + c_u; U-AutoRec does the same
for each user's row over items. The loss is masked: only observed ratings count, so only the
outputs at observed entries are computed (nnz x hidden work per epoch instead of
rows x cols x hidden), and the encoder reads the sparse input through an EmbeddingBag. Dropout
drops observed input entries; L2 (`reg`) is on both weight matrices.

A fitted AutoRec is a factor model: rating(u, i) = mu + c_u + V_u . h_i (item-based) or
mu + c_i + V_i . h_u (user-based), with h computed once from the TRAINING ratings only, so no
validation/test rating ever enters an input. Users (item-based) or items (user-based) without
training ratings get zero vectors: their score is mu, and the scorer's fallback serves them.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch
from torch import nn

from batchrec.data import SparseRows
from batchrec.models._nn import epochs_to_run, fixed_epochs, require_ratings
from batchrec.models.base import FactorModel, Param
from batchrec.models.validation import rating_validator

ACTIVATIONS = {"sigmoid": torch.sigmoid, "relu": torch.relu, "identity": lambda x: x}


class _AutoRecNet(nn.Module):
    def __init__(self, n_cols: int, hidden: int, activation: str, dropout: float):
        super().__init__()
        self.encoder = nn.EmbeddingBag(n_cols, hidden, mode="sum")  # W^T: one row per input column
        self.enc_bias = nn.Parameter(torch.zeros(hidden))
        self.decoder = nn.Embedding(n_cols, hidden)  # V: one row per output column
        self.dec_bias = nn.Embedding(n_cols, 1)
        for w in (self.encoder.weight, self.decoder.weight):
            nn.init.normal_(w, std=1.0 / hidden**0.5)
        nn.init.zeros_(self.dec_bias.weight)
        self.act, self.dropout = ACTIVATIONS[activation], dropout

    def encode(self, rows: SparseRows, batch: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Codes [len(batch), hidden] of the given rows, and their entries (row position, column, value)."""
        row_of, cols, vals, offsets = rows.entries(batch)
        x = vals
        if self.training and self.dropout > 0:
            x = vals * (torch.rand_like(vals) >= self.dropout) / (1.0 - self.dropout)
        return self.act(self.encoder(cols, offsets, per_sample_weights=x) + self.enc_bias), row_of, cols, vals

    def loss(self, rows: SparseRows, batch: torch.Tensor, reg_scale: float) -> torch.Tensor:
        h, row_of, cols, target = self.encode(rows, batch)
        # index_select, not h[row_of]: the backward of advanced indexing accumulates with atomic
        # adds on CPU (run-to-run noise); index_select's index_add is deterministic.
        pred = (self.decoder(cols) * h.index_select(0, row_of)).sum(1) + self.dec_bias(cols)[:, 0]
        l2 = (self.encoder.weight**2).sum() + (self.decoder.weight**2).sum()
        return (torch.sum((pred - target) ** 2) + reg_scale * l2) / max(len(target), 1)


class AutoRec(FactorModel):
    """AutoRec: masked-MSE autoencoder of item (I-AutoRec) or user rating vectors.

    Defaults tuned once on the validation part of ml-latest-small user_temporal (valid RMSE over
    hidden, reg, dropout, activation and lr; early stopping picks the epoch).
    """

    name = "autorec"
    task = "rating"
    params_spec = (
        Param(
            "variant",
            str,
            "item",
            "item (I-AutoRec: encode each item's ratings) or user (U-AutoRec)",
            choices=("item", "user"),
        ),
        Param("hidden", int, 100, "code size", min=1, max=8192),
        Param(
            "activation",
            str,
            "sigmoid",
            "encoder activation (the decoder is linear)",
            choices=tuple(ACTIVATIONS),
        ),
        Param("dropout", float, 0.2, "dropout on observed input ratings", min=0.0, max=0.95),
        Param(
            "reg", float, 30.0, "L2 on both weight matrices (lambda of the paper, whole-data scale)", min=0.0
        ),
        Param("lr", float, 1e-2, "Adam learning rate", min=1e-6, max=1.0),
        Param(
            "lr_schedule",
            str,
            "plateau",
            "learning-rate schedule (plateau: halve when validation stalls)",
            choices=("none", "cosine", "plateau"),
        ),
        Param("batch_size", int, 256, "rows (items or users) per batch", min=1),
        Param("epochs", int, 200, "maximum epochs", min=1, max=100000),
        Param("patience", int, 5, "epochs without validation improvement before stopping", min=1),
        fixed_epochs(30),  # early stopping's pick on user_temporal (seed 0): epoch 30
    )

    def fit(self, data, trainer) -> AutoRec:
        require_ratings(data, self.name)
        p = self.params
        torch.manual_seed(p["seed"])
        # Inputs and targets are centred on the damped baseline predictor (mean + user and item
        # offsets, from `prepare`): the autoencoder learns what the baseline misses.
        mu, b_user, b_item = (
            self.priors[k].cpu().numpy() for k in ("global_mean", "user_offset", "item_offset")
        )
        tr = data.train
        m = sp.csr_matrix(
            (tr.rating - (mu + b_user[tr.user_idx] + b_item[tr.item_idx]), (tr.user_idx, tr.item_idx)),
            shape=(self.n_users, self.n_items),
            dtype=np.float32,
        )
        item_based = p["variant"] == "item"
        rows = SparseRows.from_scipy(m.T.tocsr() if item_based else m, self.device)
        net = _AutoRecNet(rows.n_cols, p["hidden"], p["activation"], p["dropout"]).to(self.device)
        present = torch.nonzero(torch.diff(rows.indptr) > 0)[:, 0]
        reg_scale = p["reg"] * p["batch_size"] / len(present)  # each batch carries its share of the L2

        validate = rating_validator(self.score, data, self.device)

        def export_and_validate() -> float:
            self._export(net, rows, item_based)
            return validate()

        trainer.fit(
            net,
            lambda batch: net.loss(rows, batch, reg_scale),
            (present,),
            epochs=epochs_to_run(p, validate),
            batch_size=p["batch_size"],
            lr=p["lr"],
            validate=validate and export_and_validate,
            patience=p["patience"],
            lr_schedule=p["lr_schedule"],
            metric_name="valid_rmse",
            name=self.name,
        )
        self._export(net, rows, item_based)
        return self

    def _export(self, net: _AutoRecNet, rows: SparseRows, item_based: bool) -> None:
        """Fold the network into user and item vectors (codes from the training ratings)."""
        with torch.no_grad():
            net.eval()
            codes = net.encode(rows, torch.arange(rows.n_rows, device=rows.indptr.device))[0]
            seen = (torch.bincount(rows.indices, minlength=rows.n_cols) > 0)[:, None]
            dec = torch.where(seen, net.decoder.weight, 0.0)
            dec_bias = torch.where(seen, net.dec_bias.weight, 0.0)
            mu, b_user, b_item = (
                self.priors["global_mean"],
                self.priors["user_offset"][:, None],
                self.priors["item_offset"][:, None],
            )
            if item_based:  # mu + b_u + c_u + V_u . h_i + b_i
                self.U = torch.cat([dec, mu + b_user + dec_bias, torch.ones_like(b_user)], 1)
                self.V = torch.cat([codes, torch.ones_like(b_item), b_item], 1)
            else:  # mu + b_u + h_u . V_i + c_i + b_i
                self.U = torch.cat([codes, mu + b_user, torch.ones_like(b_user)], 1)
                self.V = torch.cat([dec, torch.ones_like(b_item), b_item + dec_bias], 1)
