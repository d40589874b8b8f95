"""Row-wise top-k of a dense score block: the selection step of every blocked scorer.

On the CPU, `torch.topk` partially sorts each row. For the small k of a top-N list nearly every
score falls below the row's current k-th best and costs one comparison, so one scan per row
with a k-long insertion list does the same job several times faster (at ML-20M shape the
selection went from about a third of the scoring time to a few per cent; see bench_score.py).
Rows run in parallel; ties are broken by the lower column, so a row's result depends on that
row alone. On other devices `torch.topk` is used.
"""

from __future__ import annotations

import numba
import numpy as np
import torch


@numba.njit(cache=True)
def _topk_row(row: np.ndarray, k: int, vals: np.ndarray, idx: np.ndarray) -> None:
    filled = 0
    for j in range(row.shape[0]):
        v = row[j]
        if filled == k:
            if not v > vals[k - 1]:  # the common case (NaN also stays out)
                continue
            pos = k - 1
        elif v != v:  # NaN
            continue
        else:
            pos = filled
            filled += 1
        while pos > 0 and vals[pos - 1] < v:  # strict: an equal score keeps its earlier column first
            vals[pos] = vals[pos - 1]
            idx[pos] = idx[pos - 1]
            pos -= 1
        vals[pos] = v
        idx[pos] = j
    for p in range(filled, k):  # fewer than k scores that are not NaN
        vals[p] = -np.inf
        idx[p] = 0


@numba.njit(parallel=True, cache=True)
def _topk_rows_parallel(scores: np.ndarray, k: int, out_val: np.ndarray, out_idx: np.ndarray) -> None:
    for r in numba.prange(scores.shape[0]):
        _topk_row(scores[r], k, out_val[r], out_idx[r])


@numba.njit(cache=True)
def _topk_rows_serial(scores: np.ndarray, k: int, out_val: np.ndarray, out_idx: np.ndarray) -> None:
    for r in range(scores.shape[0]):
        _topk_row(scores[r], k, out_val[r], out_idx[r])


def numba_threads() -> int:
    """Threads for a numba parallel kernel: as many as torch uses, within numba's pool."""
    return max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))


def row_topk(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, columns) of each row's k largest scores, best first (ties: lower column first).

    Like `torch.topk(scores, k, dim=1)` for float32 [rows, cols] with 0 < k <= cols, except that
    NaN scores are never selected (a row with fewer than k others is padded with -inf, column 0)."""
    if scores.device.type != "cpu" or scores.dtype != torch.float32:
        return torch.topk(scores, k, dim=1)
    s = scores.contiguous().numpy()
    val = np.empty((s.shape[0], k), np.float32)
    idx = np.empty((s.shape[0], k), np.int64)
    threads = numba_threads()
    if threads == 1:
        # No OpenMP pool at all: its idle workers spin, and beside another busy process (two
        # single-threaded fits on two cores) they slowed a training loop that validates each
        # epoch about tenfold
        _topk_rows_serial(s, k, val, idx)
    else:
        numba.set_num_threads(threads)
        _topk_rows_parallel(s, k, val, idx)
    return torch.from_numpy(val), torch.from_numpy(idx)
