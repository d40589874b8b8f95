"""The validation figures early stopping watches, measured the way the test protocol measures:
RMSE for rating models, NDCG@k for ranking models. In DDP training each rank measures its part of
the users or pairs and the parts are combined (`distributed.my_part`, `mean_of_parts`), so every
rank gets the same figure and takes the same early-stopping decision."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from batchrec import distributed
from batchrec.metrics import ranking_metrics
from batchrec.options import RELEVANCE_THRESHOLD
from batchrec.ranking import topn


def rating_validator(predict, data, device: torch.device) -> Callable[[], float] | None:
    """A closure computing the RMSE of `predict(users, items)` over the rated valid pairs whose user
    and item are in train, predictions clipped to the rating scale (how the evaluation measures);
    None without such pairs."""
    valid = data.valid
    if valid is None or len(valid) == 0 or valid.implicit:
        return None
    tr = data.train
    known = (
        (np.bincount(tr.user_idx, minlength=data.n_users) > 0)[valid.user_idx]
        & (np.bincount(tr.item_idx, minlength=data.n_items) > 0)[valid.item_idx]
        & ~np.isnan(valid.rating)
    )
    if not known.any():
        return None
    u, i, r = (t[torch.from_numpy(known).to(device)] for t in valid.tensors(device))
    lo, hi = data.rating_scale or (-np.inf, np.inf)

    def valid_rmse() -> float:
        mu, mi, mr = distributed.my_part(u), distributed.my_part(i), distributed.my_part(r)
        mse = ((predict(mu, mi).clamp(lo, hi) - mr) ** 2).mean() if len(mu) else r.new_zeros(())
        # back to the tensor's dtype before the root: alone, exactly the figure of one process
        return float(
            torch.sqrt(torch.tensor(distributed.mean_of_parts(float(mse), len(mu)), dtype=mse.dtype))
        )

    return valid_rmse


def ranking_validator(
    model, data, k: int = 10, threshold: float = RELEVANCE_THRESHOLD
) -> Callable[[], float] | None:
    """Validation NDCG@k: relevant = valid items rated >= threshold (all, when implicit) that are in
    the train catalogue; candidates = that catalogue minus the user's train items. None without a
    validation part."""

    v = data.valid
    if v is None or len(v) == 0:
        return None
    in_train = np.bincount(data.train.item_idx, minlength=data.n_items) > 0
    rel = (np.ones(len(v), bool) if v.implicit else v.rating >= threshold) & in_train[v.item_idx]
    relevant = v.select(rel).csr(data.n_users, data.n_items, "ones")
    users = np.flatnonzero(np.diff(relevant.indptr) > 0)
    if len(users) == 0:
        return None
    seen = data.seen_csr()

    def valid_ndcg() -> float:
        mine = distributed.my_part(users)
        if len(mine) == 0:
            return distributed.mean_of_parts(0.0, 0)
        items, _ = topn(model, mine, k, exclude=seen, candidates=in_train)
        return distributed.mean_of_parts(ranking_metrics(items, relevant[mine], [k])[f"ndcg@{k}"], len(mine))

    return valid_ndcg
