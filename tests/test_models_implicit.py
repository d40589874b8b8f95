"""The implicit-feedback families (ease, ials, itemknn) on real ml-latest-small data: the interface
contract, determinism, parameter checks, each family's maths on tiny hand-checkable inputs, and
the issue's ranking targets under the like-for-like protocol.

Everything here runs on the CPU. The CUDA paths (ials' torch CG, which the CPU numba kernel is
tested against here, and every model's device placement) are for bench/gpu_check.py on a GPU
machine (issue #23), not for this suite."""

from __future__ import annotations

import numba
import numpy as np
import pytest
import scipy.sparse as sp
import torch
from model_contract import ModelContract, some_users
from reference import EASE_LAMBDAS, ease_direct, ease_scores_by_users, plain_ease_scores, protocol_ndcg

from batchrec.data import Interactions, events_from_end
from batchrec.errors import BatchrecError
from batchrec.models.ease import EASE
from batchrec.models.ials import (
    ObservedPairs,
    _cg_group,
    balanced_spans,
    conjugate_gradient,
    conjugate_gradient_fused,
    gram_matrix_fixed_order,
)
from batchrec.models.itemknn import cosine_topk
from batchrec.models.weights import positive_weights, query_weights
from batchrec.train import fit_model

FAMILIES = ("ease", "ials", "itemknn")
# Small settings keep the interface tests fast; the quality tests use the defaults.
FAST = {"ease": {}, "ials": {"factors": 16, "iterations": 3}, "itemknn": {"k": 20}}


class TestEASE(ModelContract):
    family, quick, seeded = "ease", FAST["ease"], False
    bad_params = [
        ("lam=0", "out of range"),
        ("lam=abc", "not a valid float"),
        ("weighting=log", "must be one of"),
        ("recency_floor=2", "out of range"),
        ("seed=1", "unknown parameter"),
    ]


class TestIALS(ModelContract):
    family, quick, factor_vectors = "ials", FAST["ials"], True
    bad_params = [
        ("factors=0", "out of range"),
        ("iterations=1.5", "not a valid int"),
        ("alpha=-1", "out of range"),
        ("cg_steps=0", "out of range"),
        ("cg_kernel=cuda", "must be one of"),
    ]


class TestItemKNN(ModelContract):
    family, quick, seeded = "itemknn", FAST["itemknn"], False
    bad_params = [
        ("k=0", "out of range"),
        ("shrink=-1", "out of range"),
        ("neighbours=5", "unknown parameter"),
    ]


@pytest.fixture(scope="module")
def fitted(fit_once):
    return lambda name: fit_once(name, FAST[name])[0]


def test_ease_refuses_a_catalogue_over_the_memory_budget(ml_small):
    with pytest.raises(BatchrecError, match=r"9742 items need about 1\.1 GB.*max_memory_gb=0\.5"):
        fit_model("ease", ml_small, {"max_memory_gb": 0.5})


def _numpy_ease(X: np.ndarray, lam: float) -> np.ndarray:
    P = np.linalg.inv(X.T @ X + lam * np.eye(X.shape[1]))
    B = -P / np.diag(P)[None, :]
    np.fill_diagonal(B, 0.0)
    return B


@pytest.mark.parametrize("n_users", [2, 7])  # 2 users: Woodbury (user) route; 7: Cholesky (item) route
def test_ease_closed_form_matches_the_formula(n_users):
    X = np.array(
        [[1, 1, 0, 0], [0, 1, 1, 0], [1, 0, 1, 1], [0, 0, 1, 1], [1, 1, 1, 0], [0, 1, 0, 1], [2, 0, 0, 1]],
        np.float32,
    )[:n_users]
    B = EASE.closed_form(sp.csr_matrix(X), 0.5, torch.device("cpu")).numpy()
    expected = _numpy_ease(X.astype(np.float64), 0.5)
    np.testing.assert_allclose(B, expected, rtol=1e-4, atol=1e-6)
    assert np.all(np.diag(B) == 0)
    # The defining property: column j of B is the ridge regression of item j on the other items.
    j, others = 1, [0, 2, 3]
    ridge = np.linalg.solve(X[:, others].T @ X[:, others] + 0.5 * np.eye(3), X[:, others].T @ X[:, j])
    np.testing.assert_allclose(B[others, j], ridge, rtol=1e-4, atol=1e-6)


def test_itemknn_similarity_by_hand():
    # users x items; item 0 = (1,1,0), item 1 = (1,0,1), item 2 = (1,1,1), item 3 = (0,0,1)
    X = sp.csr_matrix(np.array([[1, 1, 1, 0], [1, 0, 1, 0], [0, 1, 1, 1]], np.float32))
    S = cosine_topk(X, k=2, shrink=0.0).toarray()
    # cos(0,1) = 1/2, cos(0,2) = 2/sqrt(6), cos(1,2) = 2/sqrt(6), cos(0,3) = 0, cos(1,3) = 1/sqrt(2), cos(2,3) = 1/sqrt(3)
    c02, c13, c23 = 2 / np.sqrt(6), 1 / np.sqrt(2), 1 / np.sqrt(3)
    expected = np.array(
        [  # column j: the 2 most similar items of target j (S[i, j] = sim(i, j))
            [0, 0, c02, 0],
            [0.5, 0, c02, c13],
            [c02, c02, 0, c23],
            [0, c13, 0, 0],
        ],
        np.float32,
    )
    np.testing.assert_allclose(S, expected, rtol=1e-6)
    shrunk = cosine_topk(X, k=2, shrink=1.0).toarray()
    np.testing.assert_allclose(shrunk[2, 0], 2 / (np.sqrt(6) + 1), rtol=1e-6)


@pytest.mark.parametrize("kernel", ["torch", "numba"])
def test_ials_conjugate_gradient_solves_the_normal_equations(kernel):
    rng = np.random.default_rng(0)
    X = sp.random(40, 25, density=0.2, random_state=1, format="csr", dtype=np.float32)
    X.data[:] = rng.random(X.nnz).astype(np.float32) * 3  # e = c - 1 on observed pairs
    pairs = ObservedPairs(X, torch.device("cpu"))
    gen = torch.Generator().manual_seed(0)
    U, V = torch.randn(40, 6, generator=gen), torch.randn(25, 6, generator=gen)

    def exact(Y: np.ndarray, E: np.ndarray, reg: float) -> np.ndarray:
        rows = []
        for e in E:  # a per-row loop is fine in a reference
            A = Y.T @ (Y * (1 + e)[:, None]) + reg * np.eye(Y.shape[1])
            rows.append(np.linalg.solve(A, Y.T @ ((e > 0) * (1 + e))))
        return np.array(rows)

    x, y = torch.zeros(40, 6), torch.zeros(25, 6)
    if kernel == "torch":
        conjugate_gradient(x, V, pairs.user_layout, lambda v: pairs.dots(v, V), 0.5, 30)
        conjugate_gradient(y, U, pairs.item_layout, lambda v: pairs.dots(U, v)[pairs.item_major], 0.5, 30)
    else:
        conjugate_gradient_fused(x, V, X, 0.5, 30)
        conjugate_gradient_fused(y, U, X.T.tocsr(), 0.5, 30)
    np.testing.assert_allclose(x.numpy(), exact(V.numpy().astype(np.float64), X.toarray(), 0.5), atol=1e-4)
    np.testing.assert_allclose(y.numpy(), exact(U.numpy().astype(np.float64), X.toarray().T, 0.5), atol=1e-4)


def test_ials_fused_kernel_matches_the_torch_path(fitted, ml_small):
    # `fitted` ran the CPU default (the fused numba kernel); the torch path must land on the same
    # factors up to float rounding (3 iterations of 3 CG steps from the same random start).
    assert fitted("ials").params["cg_kernel"] == "auto"
    torch_path = fit_model("ials", ml_small, {**FAST["ials"], "cg_kernel": "torch"})[0]
    users = some_users(ml_small)
    torch.testing.assert_close(fitted("ials").score(users), torch_path.score(users), rtol=1e-3, atol=1e-4)
    assert not torch.equal(fitted("ials").user_vectors(), torch_path.user_vectors())  # really two code paths


ONE_THREAD_POOL = pytest.mark.skipif(
    numba.config.NUMBA_NUM_THREADS < 2,
    reason=(
        "numba's thread pool has a single thread on this machine (NUMBA_NUM_THREADS defaults to the CPU count): "
        "there is no second thread count to compare with"
    ),
)


def _with_threads(n: int, f):
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(n)  # the numba kernels follow torch's thread count (topk.numba_threads)
        return f()
    finally:
        torch.set_num_threads(before)


@ONE_THREAD_POOL
def test_ials_factors_are_bit_identical_on_one_and_two_threads(ml_small):
    """The CPU fit's guarantee (see conjugate_gradient_fused): the same factors to the last bit
    whatever the thread count, so a run is reproducible on any machine of the same kind."""
    single, double = (_with_threads(n, lambda: fit_model("ials", ml_small, FAST["ials"])[0]) for n in (1, 2))
    assert torch.equal(single.user_vectors(), double.user_vectors())
    assert torch.equal(single.item_vectors(), double.item_vectors())


@ONE_THREAD_POOL
def test_ials_gram_matrix_is_summed_in_a_fixed_order():
    """Y'Y of the CPU kernel: the same bits on 1 and 2 threads, and within float32 rounding of the
    exact (float64) sum, on a tall matrix where a BLAS matmul splits the sum among threads."""
    Y = torch.from_numpy(np.random.default_rng(4).standard_normal((50_000, 48)).astype(np.float32))
    single, double = (_with_threads(n, lambda: gram_matrix_fixed_order(Y, 2.5)) for n in (1, 2))
    assert np.array_equal(single, double)
    exact = Y.double().T @ Y.double() + 2.5 * torch.eye(48, dtype=torch.float64)
    np.testing.assert_allclose(single, exact.numpy(), rtol=1e-6, atol=1e-3)


def test_ials_work_is_split_into_runs_of_equal_cost():
    """The CPU kernel's tasks (numba hands each thread a fixed contiguous share of them): every
    row in exactly one run, and each run's cost (pairs + k/2 per row) within one row of the mean,
    here on item rows as skewed as a popularity curve with the popular items first."""
    pairs = np.maximum(1, (200_000 / np.arange(1, 3001) ** 0.9).astype(np.int64))
    indptr = np.concatenate([[0], np.cumsum(pairs)])
    spans = balanced_spans(indptr, 64, 2)
    assert spans[0] == 0 and spans[-1] == len(pairs) and (np.diff(spans) > 0).all()
    cost = np.diff(np.concatenate([[0], np.cumsum(pairs + 32)])[spans])
    assert len(cost) == 8 and cost.max() - cost.mean() <= (pairs + 32).max()
    half = len(cost) // 2  # each of the two threads' contiguous share: about half the work
    assert abs(cost[:half].sum() / cost.sum() - 0.5) < 0.05


def test_ials_rows_solved_side_by_side_equal_each_row_solved_alone():
    """`_cg_group` interleaves the Gram products of up to GROUP rows; each row's result must be
    the same bits as when it is solved alone (whatever rows share its group)."""
    rng = np.random.default_rng(6)
    X = sp.random(11, 30, density=0.3, random_state=2, format="csr", dtype=np.float32)
    X.data[:] = rng.random(X.nnz).astype(np.float32) * 2
    Y = rng.standard_normal((30, 16)).astype(np.float32)
    gram = gram_matrix_fixed_order(torch.from_numpy(Y), 0.5)
    x0 = rng.standard_normal((11, 16)).astype(np.float32)
    args = (Y, X.indptr.astype(np.int64), X.indices.astype(np.int32), X.data, gram, 3)
    together, alone = x0.copy(), x0.copy()
    _cg_group(together, *args, 0, 8)
    _cg_group(together, *args, 8, 11)
    for row in range(11):
        _cg_group(alone, *args, row, row + 1)
    assert np.array_equal(together, alone) and not np.array_equal(together, x0)


def test_ials_numba_kernel_refuses_a_non_cpu_device(ml_small):
    with pytest.raises(BatchrecError, match="cg_kernel=numba runs on the CPU only"):
        fit_model("ials", ml_small, {**FAST["ials"], "cg_kernel": "numba"}, device="meta")


def test_positive_weights_and_recency_order():
    ev = Interactions(
        user_idx=np.array([0, 0, 0, 1, 1]),
        item_idx=np.array([3, 1, 2, 0, 1]),
        rating=np.array([5.0, 2.0, 3.5, np.nan, np.nan], np.float32),
        ts=np.array([30, 10, 10, 5, 7]),
    )
    np.testing.assert_array_equal(positive_weights(ev, 3.0, "binary"), [1, 0, 1, 1, 1])
    np.testing.assert_array_equal(positive_weights(ev, 0.0, "rating", 2.0), [3, 0.5, 1.5, 1, 1])
    # user 0 in time order: (10, item 1), (10, item 2), (30, item 3); user 1: item 0 then item 1
    np.testing.assert_array_equal(events_from_end(ev), [0, 2, 1, 1, 0])


# -- quality targets (like-for-like protocol: fit on train, history = train, tune on valid only)
# Cheap enough (seconds each) to run in the default suite. The reference figures on this
# split (popular libraries, same protocol): EASE 0.0802, implicit-ALS library 0.0707, item-kNN
# 0.0511; every family must also beat most-popular. The 0.085 target is for the best of
# ease / ials / bpr (defaults tuned on valid only; see the families' TUNING notes).
REFERENCE = {"ease": 0.0802, "ials": 0.0707, "itemknn": 0.0511}


@pytest.mark.parametrize("name", FAMILIES)
def test_defaults_beat_the_reference_library_and_popularity(name, default_metrics):
    assert default_metrics(name)["ndcg@10"] > REFERENCE[name]
    assert default_metrics(name)["ndcg@10"] > default_metrics("popularity")["ndcg@10"]


def test_the_best_ranking_family_reaches_the_target(default_metrics):
    assert max(default_metrics(n)["ndcg@10"] for n in ("ease", "ials")) >= 0.085


def test_ease_beats_plain_ease_tuned_on_valid(default_metrics, ml_small):
    """The bar computed here: EASE in closed form on the training positives, lambda chosen on the
    validation part, measured with an NDCG written from the protocol (tests/reference.py)."""
    scores, lam = plain_ease_scores(ml_small)
    plain = protocol_ndcg(scores, ml_small)
    assert lam != EASE_LAMBDAS[0] and lam != EASE_LAMBDAS[-1]  # the grid brackets the best lambda
    assert plain > default_metrics("popularity")["ndcg@10"]  # the reference itself is a real model
    assert default_metrics("ease")["ndcg@10"] >= plain, (default_metrics("ease")["ndcg@10"], plain)


def test_the_reference_ease_is_the_formula():
    X = (np.random.default_rng(2).random((6, 11)) < 0.4).astype(np.float64)
    np.testing.assert_allclose(
        ease_scores_by_users(sp.csr_matrix(X), 0.7), X @ ease_direct(X, 0.7), atol=1e-12
    )
    np.testing.assert_allclose(ease_direct(X, 0.7), _numpy_ease(X, 0.7), atol=1e-12)


def test_ease_query_is_signed_around_the_offset():
    ev = Interactions(
        user_idx=np.array([0, 0, 0, 1]),
        item_idx=np.array([0, 1, 2, 0]),
        rating=np.array([5.0, 1.5, 2.5, np.nan], np.float32),
        ts=np.array([1, 2, 3, 4]),
    )
    np.testing.assert_allclose(query_weights(ev, 2.5, 0.5), [2.5, -0.5, 0.0, 1.0])
    model = EASE(recency_halflife=0.0)
    model.n_users, model.n_items = 2, 3
    q = model._query(ev).toarray()
    np.testing.assert_allclose(q, [[2.5, -0.5, 0.0], [1.0, 0.0, 0.0]])
    assert model._query(ev).nnz == 3  # a rating at the offset says nothing: not stored
