"""Blocked top-N scoring: the one code path production scoring and evaluation share.

`topn` scores users in blocks sized by a memory budget (one matmul per block for factor models,
`model.score` for the rest), masks excluded (seen) items and non-candidates with -inf, and takes
`torch.topk` on the device. Nothing of size n_users x n_items is ever held at once.
"""

from __future__ import annotations

import re

import numpy as np
import scipy.sparse as sp
import torch

from batchrec.errors import BatchrecError
from batchrec.models.base import Recommender

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)B?\s*$", re.I)


def parse_memory_budget(text: str) -> int:
    """'512MB', '2GB', '1.5G', '100000' -> bytes."""
    m = _SIZE.match(str(text))
    if not m:
        raise BatchrecError(f"--memory-budget {text!r} is not a size like 512MB or 2GB")
    value = float(m.group(1)) * 1024 ** " KMGT".index(m.group(2).upper() or " ")
    if value < 1024 * 1024:
        raise BatchrecError(f"--memory-budget {text!r} is too small (at least 1MB)")
    return int(value)


def block_size(n_items: int, memory_budget: int) -> int:
    """Users per block so that the score block (+ a mask copy) fits in the budget."""
    return max(1, memory_budget // (n_items * 4 * 2))


def mask_rows(scores: torch.Tensor, exclude: sp.csr_matrix, rows: np.ndarray) -> None:
    """Set scores[i, j] = -inf for every stored (rows[i], j) of `exclude`, in place."""
    sub = exclude[rows]
    if sub.nnz == 0:
        return
    r = np.repeat(np.arange(len(rows)), np.diff(sub.indptr))
    scores[torch.from_numpy(r).to(scores.device), torch.from_numpy(sub.indices.astype(np.int64)).to(scores.device)] = -torch.inf


def topn(
    model: Recommender,
    users: np.ndarray,
    n: int,
    exclude: sp.csr_matrix | None = None,
    candidates: np.ndarray | None = None,
    memory_budget: int = 1 << 30,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-`n` items for each user in `users` (dense idx).

    Returns (items [len(users), n] int64, scores [len(users), n] float32); where a user has fewer
    than `n` allowed items the row is padded with item -1 and score NaN.
    `exclude`: CSR [n_users, n_items] of items never to recommend (seen items);
    `candidates`: bool [n_items] of items allowed at all (None: every item).
    """
    n_items = model.n_items
    k = min(n, n_items)
    U, V = model.user_vectors(), model.item_vectors()
    dev = model.device
    blocked = None if candidates is None else torch.from_numpy(~np.asarray(candidates, bool)).to(dev)
    out_items = np.full((len(users), n), -1, np.int64)
    out_scores = np.full((len(users), n), np.nan, np.float32)
    step = block_size(n_items, memory_budget)
    with torch.no_grad():
        for start in range(0, len(users), step):
            rows = np.asarray(users[start:start + step], np.int64)
            idx = torch.from_numpy(rows).to(dev)
            s = U[idx] @ V.T if U is not None else model.score(idx)
            s = s.float().contiguous()  # masking writes in place: never into an expanded view
            if blocked is not None:
                s[:, blocked] = -torch.inf
            if exclude is not None:
                mask_rows(s, exclude, rows)
            val, ind = torch.topk(s, k, dim=1)
            val, ind = val.cpu().numpy(), ind.cpu().numpy()
            ok = np.isfinite(val)
            out_items[start:start + len(rows), :k] = np.where(ok, ind, -1)
            out_scores[start:start + len(rows), :k] = np.where(ok, val, np.nan)
    return out_items, out_scores
