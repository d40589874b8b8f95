"""Blocked top-N of a model's scores: the core that the scorer, the metrics and the validators
share, so what is measured is what ships.

`blocked_topk` scores `block_size` rows at a time, masks excluded (seen) items, selects each
row's top-k with `batchrec.topk.row_topk` and rescores the pool one (row, column) at a time so a
row's result never depends on its block; `topn` applies it to a `Recommender`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import scipy.sparse as sp
import torch

from batchrec.topk import row_topk

if TYPE_CHECKING:
    from batchrec.models.base import Recommender

POOL_MARGIN = 4  # extra candidates per row rescored one by one before the final top-n


FASTEST_BLOCK_BYTES = 256 << 20  # larger score blocks were no faster at ML-20M shape (bench_score.py)


def block_size(n_items: int, memory_budget: int) -> int:
    """Users per block: the score block (+ a mask copy) fits in the budget, and is no larger than
    FASTEST_BLOCK_BYTES (beyond that a block only costs memory: the matmul is as fast and the
    top-k reads the block from main memory either way)."""
    per_user = max(n_items, 1) * 4
    return max(1, min(memory_budget // (per_user * 2), FASTEST_BLOCK_BYTES // per_user))


def _consecutive(rows: np.ndarray) -> bool:
    return bool(len(rows)) and rows[-1] - rows[0] == len(rows) - 1 and bool((np.diff(rows) == 1).all())


def _ragged(indptr: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray | slice]:
    """For CSR rows `rows`: (position in `rows`, offsets into indices) of every stored entry."""
    starts = indptr[rows]
    counts = indptr[rows + 1] - starts
    pos = np.repeat(np.arange(len(rows)), counts)
    if _consecutive(rows):
        return pos, slice(starts[0], starts[0] + counts.sum())  # consecutive rows: one slice, no copy
    first = np.cumsum(counts) - counts
    return pos, np.repeat(starts - first, counts) + np.arange(counts.sum())


def _excluded_pairs(
    m: sp.csr_matrix, block: np.ndarray, col_of: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """(position in `block`, column) of every stored entry of `m`'s rows `block` that is a column."""
    pos, offs = _ragged(m.indptr, block)
    cols = m.indices[offs]
    if col_of is not None:
        cols = col_of[cols]
        pos, cols = pos[cols >= 0], cols[cols >= 0]
    return pos, cols


def _excluded(exclude: tuple, block: np.ndarray, col_of: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """The columns to skip for each row of `block`, as (indptr, columns) for `row_topk`: for one
    CSR, consecutive rows and every item a column (the nightly run), views of the CSR itself."""
    if len(exclude) == 1 and col_of is None and _consecutive(block):
        m = exclude[0]
        ptr = m.indptr[block[0] : block[-1] + 2]
        return ptr - ptr[0], m.indices[ptr[0] : ptr[-1]]
    pairs = [_excluded_pairs(m, block, col_of) for m in exclude]
    pos = np.concatenate([p for p, _ in pairs]) if pairs else np.zeros(0, np.int64)
    cols = np.concatenate([c for _, c in pairs]) if pairs else np.zeros(0, np.int64)
    if len(pairs) > 1:
        order = np.argsort(pos, kind="stable")
        pos, cols = pos[order], cols[order]
    ptr = np.zeros(len(block) + 1, np.int64)
    np.cumsum(np.bincount(pos, minlength=len(block)), out=ptr[1:])
    return ptr, cols


def blocked_topk(
    score_block: Callable[[np.ndarray], torch.Tensor],
    rows: np.ndarray,
    n: int,
    n_cols: int,
    exclude: tuple = (),
    col_of: np.ndarray | None = None,
    memory_budget: int = 1 << 30,
    on_block: Callable[[slice, np.ndarray, np.ndarray], None] | None = None,
    rescore: Callable[[np.ndarray, torch.Tensor], torch.Tensor] | None = None,
    progress: Callable[[int], object] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-`n` columns per row, scoring `block_size` rows at a time.

    `score_block(rows)` returns a contiguous float32 [len(rows), n_cols] tensor, which is only
    read until the next call (a CPU scorer may reuse one buffer for every block); no stored
    (row, item) of a CSR in `exclude` is ever chosen (items mapped to columns by `col_of`, -1 =
    not a column): on the CPU the top-k kernel skips them, elsewhere they are set to -inf in the
    (then fresh) tensor. `on_block(span, rows, cols)` sees each block's top columns.
    Returns (cols int64 [len(rows), n], scores float32), padded with -1 / NaN where
    a row has fewer than `n` finite scores.

    A row's result never depends on which other rows share its block (so shards, `--users` runs
    and any memory budget agree exactly): a BLAS matmul's rounding can, so when `rescore(rows,
    cols)` is given the top n + POOL_MARGIN are scored again one (row, column) at a time, and the
    final order is by score, then column, whatever order the top-k kernel returned ties in.
    `progress(n)` (a progress bar's update) is told of each block's rows when it is done.
    """
    k = min(n, n_cols)
    pool = min(n_cols, k + POOL_MARGIN)
    out_cols = np.full((len(rows), n), -1, np.int64)
    out_vals = np.full((len(rows), n), np.nan, np.float32)
    step = block_size(n_cols, memory_budget)
    with torch.no_grad():
        for start in range(0, len(rows), step):
            block = rows[start : start + step]
            s = score_block(block)
            if s.device.type == "cpu" and s.dtype == torch.float32:  # the top-k kernel skips them: no writes
                val, ind = row_topk(s, pool, skip=_excluded(exclude, block, col_of))
            else:
                for m in exclude:
                    pos, cols = _excluded_pairs(m, block, col_of)
                    if len(pos):  # flat index_fill: about twice as fast as a 2-D index_put
                        flat = torch.from_numpy(pos * n_cols + cols).to(s.device)
                        s.view(-1).index_fill_(0, flat, -torch.inf)
                val, ind = row_topk(s, pool)
            if rescore is not None:
                val = torch.where(torch.isfinite(val), rescore(block, ind), val)
            val, ind = val.cpu().numpy(), ind.cpu().numpy()
            order = np.lexsort((ind, -val), axis=1)[:, :k]
            val, ind = np.take_along_axis(val, order, 1), np.take_along_axis(ind, order, 1)
            ok = np.isfinite(val)  # -inf: masked; fewer allowed items than k
            span = slice(start, start + len(block))
            out_cols[span, :k] = np.where(ok, ind, -1)
            out_vals[span, :k] = np.where(ok, val, np.nan)
            if on_block is not None:
                on_block(span, block, out_cols[span, :k])
            if progress is not None:
                progress(len(block))
    return out_cols, out_vals


def candidate_columns(
    candidates: np.ndarray | None, n_items: int
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(item of each column, column of each item or -1); (None, None) when every item is one."""
    if candidates is None or np.asarray(candidates, bool).all():
        return None, None
    cand = np.flatnonzero(candidates)
    col_of = np.full(n_items, -1, np.int64)
    col_of[cand] = np.arange(len(cand))
    return cand, col_of


Scorer = tuple[
    Callable[[np.ndarray], torch.Tensor], Callable[[np.ndarray, torch.Tensor], torch.Tensor] | None
]


def model_scorer(model: Recommender, cand: np.ndarray | None) -> Scorer:
    """(scores of a block of users against the candidate items, rescore for `blocked_topk`):
    one matmul per block for factor models, rescored as per-pair dot products."""
    dev = model.device
    cand_t = None if cand is None else torch.from_numpy(cand).to(dev)
    U, V = model.user_vectors(), model.item_vectors()
    if U is not None:
        U = U.float()
        Vc = (V if cand_t is None else V.index_select(0, cand_t)).float()

        if dev.type == "cpu":  # numpy's BLAS (OpenBLAS) multiplies ~1.7x faster than torch's here (DESIGN)
            U_np, V_np = U.numpy(), Vc.numpy()
            out = [np.empty((0, len(V_np)), np.float32)]

            def score(rows: np.ndarray) -> torch.Tensor:
                # One output buffer for every block: a fresh one costs a page fault per 4 KiB, and at
                # ML-20M shape that made the matmul several times slower than writing into warm pages
                if len(out[0]) < len(rows):
                    out[0] = np.empty((len(rows), len(V_np)), np.float32)
                return torch.from_numpy(np.matmul(_rows(U_np, rows), V_np.T, out=out[0][: len(rows)]))

            # einsum without `optimize` is a plain loop per (row, column): no BLAS, 3x cheaper than torch here
            return score, lambda rows, cols: torch.from_numpy(
                np.einsum("bd,bkd->bk", _rows(U_np, rows), np.take(V_np, cols.numpy(), 0))
            )

        def rescore(rows: np.ndarray, cols: torch.Tensor) -> torch.Tensor:  # equal-shaped matrices per row
            return torch.bmm(U[torch.from_numpy(rows).to(dev)][:, None, :], Vc[cols].transpose(1, 2))[:, 0]

        return (lambda rows: U[torch.from_numpy(rows).to(dev)] @ Vc.T), rescore

    def score(rows: np.ndarray) -> torch.Tensor:  # row by row for these models (a sparse row times a matrix)
        s = model.score(torch.from_numpy(rows).to(dev)).float()
        return (s if cand_t is None else s.index_select(1, cand_t)).contiguous()  # masking writes in place

    return score, None


def _rows(m: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """m[rows]: a view when the rows are consecutive (a nightly run's blocks), else a gather
    (np.take: ~1.5x faster than fancy indexing)."""
    if _consecutive(rows):
        return m[rows[0] : rows[-1] + 1]
    return np.take(m, rows, 0)


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
    `candidates`: bool [n_items] of items allowed at all (None: every item). Only candidate items
    are scored (factor models multiply by the candidates' vectors only).
    """
    cand, col_of = candidate_columns(candidates, model.n_items)
    score, rescore = model_scorer(model, cand)
    cols, vals = blocked_topk(
        score,
        np.asarray(users, np.int64),
        n,
        model.n_items if cand is None else len(cand),
        exclude=() if exclude is None else (exclude,),
        col_of=col_of,
        memory_budget=memory_budget,
        rescore=rescore,
    )
    return items_of(cols, cand), vals


def items_of(cols: np.ndarray, cand: np.ndarray | None) -> np.ndarray:
    if cand is None:
        return cols
    return np.where(cols >= 0, cand[np.maximum(cols, 0)], -1)
