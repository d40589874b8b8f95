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
def _topk_row(
    row: np.ndarray, k: int, vals: np.ndarray, idx: np.ndarray, skip: np.ndarray, mask: np.ndarray
) -> None:
    """Top-k of one row, never choosing the columns in `skip` (`mask`: an all-False scratch of
    the row's length, left all False again)."""
    for c in skip:
        mask[c] = True
    filled = 0
    for j in range(row.shape[0]):
        v = row[j]
        if filled == k:
            if not v > vals[k - 1]:  # the common case (NaN also stays out)
                continue
            if mask[j]:  # checked only for the few scores that would enter the list
                continue
            pos = k - 1
        elif v != v or mask[j]:  # NaN or skipped
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
    for c in skip:
        mask[c] = False


@numba.njit(cache=True)
def _topk_span(scores, k, out_val, out_idx, skip_ptr, skip_cols, lo, hi) -> None:
    mask = np.zeros(scores.shape[1], np.bool_)  # one scratch per span, not per row
    for r in range(lo, hi):
        _topk_row(scores[r], k, out_val[r], out_idx[r], skip_cols[skip_ptr[r] : skip_ptr[r + 1]], mask)


SPAN = 64  # rows per parallel task: equal work per row, so few large tasks; one mask each


@numba.njit(parallel=True, cache=True)
def _topk_rows_parallel(scores, k, out_val, out_idx, skip_ptr, skip_cols) -> None:
    n = scores.shape[0]
    for t in numba.prange((n + SPAN - 1) // SPAN):
        _topk_span(scores, k, out_val, out_idx, skip_ptr, skip_cols, t * SPAN, min(n, t * SPAN + SPAN))


@numba.njit(cache=True)
def _topk_rows_serial(scores, k, out_val, out_idx, skip_ptr, skip_cols) -> None:
    _topk_span(scores, k, out_val, out_idx, skip_ptr, skip_cols, 0, scores.shape[0])


def numba_threads() -> int:
    """Threads for a numba parallel kernel: as many as torch uses, within numba's pool."""
    return max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))


def row_topk(
    scores: torch.Tensor, k: int, skip: tuple[np.ndarray, np.ndarray] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, columns) of each row's k largest scores, best first (ties: lower column first).

    Like `torch.topk(scores, k, dim=1)` for float32 [rows, cols] with 0 < k <= cols, except that
    NaN scores are never selected (a row with fewer than k others is padded with -inf, column 0).
    `skip` = (indptr, columns), CSR-like with one row per row of `scores` (any order, repeats
    allowed): columns never selected, as if their score were NaN; CPU float32 only (elsewhere
    the caller masks the scores itself)."""
    if scores.device.type != "cpu" or scores.dtype != torch.float32:
        if skip is not None:
            raise ValueError("row_topk: skip is for CPU float32 scores only")
        return torch.topk(scores, k, dim=1)
    s = scores.contiguous().numpy()
    val = np.empty((s.shape[0], k), np.float32)
    idx = np.empty((s.shape[0], k), np.int64)
    if skip is None:
        skip = (np.zeros(s.shape[0] + 1, np.int64), np.zeros(0, np.int64))
    skip = (
        skip[0].astype(np.int64, copy=False),
        skip[1].astype(np.int64, copy=False),
    )  # one compiled signature
    threads = numba_threads()
    if threads == 1:
        # No OpenMP pool at all: its idle workers spin, and beside another busy process (two
        # single-threaded fits on two cores) they slowed a training loop that validates each
        # epoch about tenfold
        _topk_rows_serial(s, k, val, idx, *skip)
    else:
        numba.set_num_threads(threads)
        _topk_rows_parallel(s, k, val, idx, *skip)
    return torch.from_numpy(val), torch.from_numpy(idx)
