"""Pieces the neural families share: item content features, the ensemble parameter, gradient
scaling and chunked all-item scoring for MLP models.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch

from batchrec.errors import BatchrecError
from batchrec.models.base import Param

# The ranking families average independently seeded fits: on ml-latest-small one seed's NDCG@10
# moves by +-0.005, and the mean of four fits ranked clearly better than any one (see their TUNING).
ENSEMBLE = Param(
    "ensemble",
    int,
    4,
    "independently seeded fits, each stopped early on its own, whose scores are "
    "averaged (K x the training time)",
    min=1,
    max=64,
)


def fixed_epochs(default: int) -> Param:
    """The epochs of a fit that has no validation part to stop on (`batchrec train` without
    --protocol: the model shipped, fitted on every interaction). Nothing can stop such a fit early,
    and running to `epochs` (a cap for early stopping) overfits and costs several times the
    validated fit, so it runs this many: about where early stopping ended on ml-latest-small
    user_temporal (each family's TUNING)."""
    return Param(
        "fixed_epochs",
        int,
        default,
        "epochs of a fit without a validation part to stop on (at most "
        "`epochs`); with one, early stopping picks the epoch",
        min=1,
        max=100000,
    )


def epochs_to_run(params: dict, validate) -> int:
    """`epochs` when `validate` can stop the fit early, else `fixed_epochs` (at most `epochs`)."""
    return params["epochs"] if validate is not None else min(params["epochs"], params["fixed_epochs"])


# Elements of one [users x items x hidden] activation block in the all-item scoring of MLP models.
PAIR_BLOCK_ELEMENTS = 1 << 25


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


def scale_grad(x: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
    """x unchanged in the forward pass; its gradient multiplied by w (rows) in the backward."""
    if w is None:
        return x
    w = w.reshape(-1, *([1] * (x.dim() - 1)))
    return w * x + (1 - w) * x.detach()


def require_ratings(data, model: str) -> tuple[float, float]:
    """Rating models need explicit ratings; returns the rating scale."""
    if data.train.implicit or data.rating_scale is None:
        raise BatchrecError(
            f"{model}: the training part has no explicit ratings (a rating model needs them; "
            f"use a ranking family such as two_tower or multvae)"
        )
    return data.rating_scale


def state_device(state: dict) -> torch.device:
    """The device the tensors of a state dict live on (`Recommender.to` moves them before the model)."""
    return next((v.device for v in state.values() if isinstance(v, torch.Tensor)), torch.device("cpu"))


def pair_blocks(n_users: int, n_items: int, hidden: int) -> int:
    """Users per chunk so one [users x items x hidden] activation stays within PAIR_BLOCK_ELEMENTS."""
    return max(1, PAIR_BLOCK_ELEMENTS // max(1, n_items * hidden))
