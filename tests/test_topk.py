"""The CPU top-k kernel every scorer selects with (batchrec.topk.row_topk)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from batchrec import topk
from batchrec.topk import row_topk


@pytest.mark.parametrize("k", [1, 10, 14, 300])
def test_matches_torch_topk_on_distinct_scores(k):
    scores = torch.from_numpy(np.random.default_rng(k).standard_normal((257, 3001)).astype(np.float32))
    val, idx = row_topk(scores, k)
    want_val, want_idx = torch.topk(scores, k, dim=1)
    assert torch.equal(val, want_val) and torch.equal(idx, want_idx)


def test_ties_go_to_the_lower_column_and_masked_items_only_fill_up():
    inf = float("inf")
    scores = torch.tensor(
        [
            [1.0, 3.0, 3.0, -inf, 2.0, 3.0],
            [-inf, 0.5, -inf, -inf, 5.0, 0.5],
            [-inf, -inf, 7.0, -inf, -inf, -inf],
        ]
    )
    val, idx = row_topk(scores, 3)
    assert idx.tolist() == [[1, 2, 5], [4, 1, 5], [2, 0, 1]]
    assert val.tolist() == [[3.0, 3.0, 3.0], [5.0, 0.5, 0.5], [7.0, -inf, -inf]]


def test_nan_is_never_selected():
    scores = torch.tensor([[float("nan"), 1.0, float("nan"), 2.0]])
    val, idx = row_topk(scores, 3)
    assert idx[0, :2].tolist() == [3, 1]
    assert val[0, 2] == -float("inf")  # padding: fewer than k real scores


def test_a_rows_result_does_not_depend_on_its_block():
    rng = np.random.default_rng(0)
    scores = torch.from_numpy(rng.integers(0, 50, (64, 500)).astype(np.float32))  # many ties
    val, idx = row_topk(scores, 20)
    for rows in (slice(0, 1), slice(5, 9), slice(30, 64)):
        v, i = row_topk(scores[rows], 20)
        assert torch.equal(v, val[rows]) and torch.equal(i, idx[rows])
    # best first, and among equal scores the lower column first
    key = -val.double() * 1000 + idx.double()
    assert (key[:, 1:] > key[:, :-1]).all()


def test_one_thread_runs_the_serial_kernel_with_the_same_result():
    rng = np.random.default_rng(1)
    scores = torch.from_numpy(rng.integers(0, 30, (200, 700)).astype(np.float32))  # many ties
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        serial = row_topk(scores, 15)
        torch.set_num_threads(2)
        parallel = row_topk(scores, 15)
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(a, b) for a, b in zip(serial, parallel))
    assert torch.equal(serial[1], torch.topk(scores - torch.arange(700) * 1e-4, 15, dim=1)[1])


def test_one_thread_chooses_the_serial_kernel(monkeypatch):
    """With one torch thread row_topk runs the serial kernel and never the parallel one, whose
    OpenMP workers, once started, spin beside a neighbouring single-threaded fit (see row_topk);
    with two, the parallel one (where numba's pool has two threads). Both kernels really run:
    the wrappers only record which one was called."""
    import numba

    calls = []
    for name in ("_topk_rows_serial", "_topk_rows_parallel"):
        real = getattr(topk, name)
        monkeypatch.setattr(
            topk, name, lambda *args, _real=real, _name=name: (calls.append(_name), _real(*args))
        )
    scores = torch.from_numpy(np.random.default_rng(2).standard_normal((50, 300)).astype(np.float32))
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            assert torch.equal(row_topk(scores, 7)[1], torch.topk(scores, 7, dim=1)[1])
    finally:
        torch.set_num_threads(before)
    pool = numba.config.NUMBA_NUM_THREADS  # numba's pool: the CPU count unless set
    assert calls == ["_topk_rows_serial", "_topk_rows_parallel" if pool >= 2 else "_topk_rows_serial"]


def test_skipped_columns_are_never_chosen_as_if_their_score_were_nan():
    """`skip` (the seen items: CSR-like, unsorted, repeats allowed) gives what NaN scores in those
    places give, on the serial and the parallel kernel, with rows that keep fewer than k."""
    rng = np.random.default_rng(3)
    scores = torch.from_numpy(rng.integers(0, 40, (150, 90)).astype(np.float32))  # many ties
    counts = rng.integers(0, 95, 150)
    counts[7] = 300  # repeats: more skips than columns
    cols = np.concatenate([rng.integers(0, 90, c) for c in counts])
    ptr = np.concatenate([[0], np.cumsum(counts)])
    masked = scores.clone()
    masked[np.repeat(np.arange(150), counts), cols] = float("nan")
    for threads in (1, 2):
        before = torch.get_num_threads()
        try:
            torch.set_num_threads(threads)
            got, want = row_topk(scores, 12, skip=(ptr, cols)), row_topk(masked, 12)
        finally:
            torch.set_num_threads(before)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert (got[0][7] == -float("inf")).sum() > 0  # a row with fewer than k left is padded
