"""Implicit ALS (Hu, Koren & Volinsky 2008) with batched conjugate-gradient solves (Takacs et al. 2011).

Each observed (user, item) gets preference 1 and confidence c = 1 + alpha * w (w = 1, or the
rating with `weighting=rating`); every unobserved pair has preference 0 and confidence 1. One
iteration solves, for every user at once, (Y'Y + Y'(C_u - I)Y + reg I) x_u = Y'C_u p_u, then the
same for items. Instead of forming the d x d systems, a few conjugate-gradient steps warm-started
from the previous factors run for all users together: the product A_u v_u is
v_u Y'Y + sum_i (c_ui - 1)(y_i . v_u) y_i, i.e. one sampled dense-dense product on the
interaction pattern (`torch.sparse.sampled_addmm`) and one sparse @ dense product, so a
half-step is a handful of multithreaded sparse kernels and no Python loop over users or items.

On CPU the same CG runs instead as one fused numba kernel (`cg_kernel=numba`, the default there):
each row's k-vectors stay in L1 while one pass over its pairs does both y_i . p and the weighted
sum of the y_i (y_i read once per step, prefetched a few pairs ahead), half the memory traffic of
the two torch sparse ops. The torch path serves CUDA and is the reference the kernel is tested
against.

Defaults tuned once on the validation part of ml-latest-small / user_temporal (see TUNING).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numba
import numpy as np
import scipy.sparse as sp
import torch
from llvmlite import ir
from numba.core import cgutils
from numba.extending import intrinsic
from torch.nn import functional as F

from batchrec.data import csr_to_torch
from batchrec.errors import BatchrecError
from batchrec.models.base import FactorModel, Param
from batchrec.models.search import Choice, IntRange, LogUniform, Uniform
from batchrec.models.weights import positive_matrix, query_recency_factor
from batchrec.topk import numba_threads

TUNING = """
Grids on the validation part of ml-latest-small / user_temporal (NDCG@10, train part as history;
the test part never looked at), 15 iterations, 3 CG steps:
  every interaction a positive (min_rating=0), factors=64: best 0.0660 (reg 0.1, alpha 1);
  rating-weighted (min_rating 0 or 3): best 0.0812;
  positives = ratings >= 4 (min_rating=4), factors=64: reg 10 alpha 1: 0.0844; reg 30 alpha 3: 0.0911;
  reg 3/100/300 worse at every alpha tried (0.3..30);
  + recency_halflife 5/10/20 at reg 10: 0.094..0.097 for alpha 0.5..2 (0.0747..0.088 at reg 5/20);
  factors=128, reg 10, alpha 1, recency 10: 0.0973 (alpha 2 recency 5: 0.0987, a lone peak).
Defaults: factors=128, reg=10, alpha=1, min_rating=4, recency_halflife=10 (floor 0.1), 15 iterations.
"""


class ObservedPairs:
    """The observed (user, item) pairs with e = c - 1 on each, in user-major and item-major order.

    Products y_i . v_u on every pair always run on the user-major CSR: the item factors it reads
    at random are the small table (they stay in cache), which makes the item half-step ~2x
    faster than running it on the item-major CSR; the values are then permuted to item-major."""

    def __init__(self, X: sp.csr_matrix, device: torch.device):
        self.by_user = csr_to_torch(X, device)
        pos = sp.csr_matrix((np.arange(X.nnz, dtype=np.int64), X.indices, X.indptr), shape=X.shape).T.tocsr()
        self.item_major = torch.from_numpy(pos.data).to(device)  # user-major position of each item-major pair
        self.user_layout = (
            self.by_user.crow_indices()[:-1],
            self.by_user.col_indices(),
            self.by_user.values(),
        )
        self.item_layout = (
            torch.from_numpy(pos.indptr[:-1].astype(np.int64)).to(device),
            torch.from_numpy(pos.indices.astype(np.int64)).to(device),
            self.by_user.values()[self.item_major],
        )

    def dots(self, U: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
        """U[u] . V[i] on every pair, user-major order."""
        return torch.sparse.sampled_addmm(self.by_user, U, V.T, beta=0.0).values()


def conjugate_gradient(
    x: torch.Tensor,
    Y: torch.Tensor,
    layout: tuple,
    dots: Callable[[torch.Tensor], torch.Tensor],
    reg: float,
    steps: int,
) -> torch.Tensor:
    """A few CG steps on every row's system A_u x_u = b_u at once, from `x` (updated in place).

    `layout` = (offsets, col, e): the observed pairs of each row of x (CSR order) and their
    e = c - 1, so A_u = Y'Y + reg I + Y' diag(e_u) Y and b_u = Y'(1 + e_u) (preference 1 on
    observed pairs); `dots(v)` gives y_i . v_u on the pairs in that order. Sums of weighted rows
    of Y go through `embedding_bag`, several times faster on CPU than `torch.sparse.mm`.
    """
    offsets, col, e = layout
    gram = gram_matrix(Y, reg)

    def sparse_rows(weights: torch.Tensor) -> torch.Tensor:  # sum_i weights_ui y_i for every row u
        return F.embedding_bag(col, Y, offsets, mode="sum", per_sample_weights=weights)

    r = sparse_rows(1.0 + e - e * dots(x)).sub_(x @ gram)  # b - A x in one pass over the pairs
    p = r.clone()
    rs = torch.linalg.vecdot(r, r).unsqueeze(1)
    tiny = torch.finfo(x.dtype).tiny
    for _ in range(steps):  # in-place updates: at 20M pairs these vectors are ~70 MB each
        Ap = sparse_rows(e * dots(p)).addmm_(p, gram)
        step = rs / torch.linalg.vecdot(p, Ap).unsqueeze(1).clamp_min(tiny)
        x.addcmul_(step, p)
        r.addcmul_(step, Ap, value=-1.0)
        rs_new = torch.linalg.vecdot(r, r).unsqueeze(1)
        p.mul_(rs_new / rs.clamp_min(tiny)).add_(r)
        rs = rs_new
    return x


def gram_matrix(Y: torch.Tensor, reg: float) -> torch.Tensor:
    """Y'Y + reg I, the part of every row's A shared by all rows (a BLAS matmul: the torch path's,
    whose last digits depend on the thread count; the CPU kernel uses `gram_matrix_fixed_order`)."""
    gram = Y.T @ Y
    gram.diagonal().add_(reg)
    return gram


def conjugate_gradient_fused(
    x: torch.Tensor, Y: torch.Tensor, pairs: sp.csr_matrix, reg: float, steps: int
) -> torch.Tensor:
    """`conjugate_gradient` on CPU as one fused numba kernel, from `x` (updated in place).

    `pairs` is the CSR of e = c - 1 with one row per row of x (user-major for the user half-step,
    item-major for the item one): rows are split among numba's threads (as many as torch's) in
    runs of equal work (`balanced_spans`), each row solved whole by one thread, and the Gram
    matrix is summed in a fixed order (`gram_matrix_fixed_order`), so the factors are
    bit-identical whatever the thread count."""
    threads = numba_threads()
    numba.set_num_threads(threads)
    gram = gram_matrix_fixed_order(Y, reg)
    indptr = pairs.indptr.astype(np.int64, copy=False)  # one compiled signature
    _cg_rows(
        x.numpy(),
        Y.numpy(),
        indptr,
        pairs.indices.astype(np.int32, copy=False),
        pairs.data.astype(np.float32, copy=False),
        gram,
        steps,
        balanced_spans(indptr, x.shape[1], threads),
    )
    return x


SPANS_PER_THREAD = 4


def balanced_spans(indptr: np.ndarray, k: int, threads: int) -> np.ndarray:
    """Bounds of SPANS_PER_THREAD * threads runs of consecutive rows of about equal work (a row
    costs its pairs plus k/2 for its Gram products), one task each for `_cg_rows`.

    numba's OpenMP layer hands each thread one contiguous share of a prange's tasks, decided
    before the loop starts (a `parallel_chunksize` does not make it dynamic); with equal rows per
    task, the item half-step's thread that got the popular items ran long after the other
    finished. Which thread solves a row does not change its result."""
    cost = np.diff(indptr) + k // 2
    total = np.concatenate([[0], np.cumsum(cost)])
    n_spans = max(1, SPANS_PER_THREAD * threads)
    return np.unique(np.searchsorted(total, np.linspace(0, total[-1], n_spans + 1), side="left")).astype(
        np.int64
    )


GRAM_BLOCK = 64  # rows of Y summed in float32 before each addition to the float64 total


def gram_matrix_fixed_order(Y: torch.Tensor, reg: float) -> np.ndarray:
    """`gram_matrix` (Y'Y + reg I) as float32, the same bits on any number of threads.

    A BLAS matmul splits the sum over Y's rows in a thread-dependent way (the 6th digit of the
    factors differed between 1 and 2 threads), so each output row's sum runs in one thread in
    row order: blocks of GRAM_BLOCK rows in float32, blocks added in float64. At the ml-20m shape
    (138,493 x 128) about 0.13 s against 0.07 s for torch's matmul on 2 cores, a few per cent of
    an iteration, and closer to the exact sum than the float32 matmul.
    """
    Y = Y.contiguous().numpy()
    out = np.empty((Y.shape[1], Y.shape[1]), np.float32)
    _gram_rows(Y, np.float64(reg), GRAM_BLOCK, out)
    return out


@numba.njit(parallel=True, cache=True)
def _gram_rows(Y, reg, block, out):
    n, k = Y.shape
    width = 8  # output rows per task: their partial sums (8 x k) stay in L1
    for task in numba.prange((k + width - 1) // width):
        lo, hi = task * width, min(k, task * width + width)
        total = np.zeros((hi - lo, k), np.float64)
        part = np.empty((hi - lo, k), np.float32)
        for start in range(0, n, block):
            part[:] = 0.0
            for i in range(start, min(n, start + block)):
                y = Y[i]
                for j in range(hi - lo):
                    a = y[lo + j]
                    for m in range(k):
                        part[j, m] += a * y[m]
            for j in range(hi - lo):
                for m in range(k):
                    total[j, m] += part[j, m]
        for j in range(hi - lo):
            for m in range(k):
                out[lo + j, m] = total[j, m] + (reg if lo + j == m else 0.0)


@intrinsic
def _prefetch(typingctx, array, row, col):
    """Ask the CPU to start loading the cache line of array[row, col] (no wait, no fault)."""

    def codegen(context, builder, sig, args):
        ary = context.make_array(sig.args[0])(context, builder, args[0])
        idx = [context.cast(builder, v, t, numba.types.intp) for v, t in zip(args[1:], sig.args[1:])]
        ptr = cgutils.get_item_pointer(context, builder, sig.args[0], ary, idx, wraparound=False)
        i8p, i32 = ir.IntType(8).as_pointer(), ir.IntType(32)
        fn = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]), "llvm.prefetch"
        )
        builder.call(
            fn, [builder.bitcast(ptr, i8p), i32(0), i32(3), i32(1)]
        )  # read, keep in all levels, data
        return context.get_dummy_value()

    return numba.types.void(array, row, col), codegen


@numba.njit(fastmath={"reassoc"}, cache=True)
def _dot(a, b):
    # Reassociation lets LLVM vectorise the sum (2-3x faster); the order is fixed in the compiled
    # code, so results stay identical run to run. Kept out of the kernel, which stays IEEE-strict.
    s = np.float32(0.0)
    for j in range(a.shape[0]):
        s += a[j] * b[j]
    return s


@numba.njit(inline="always")
def _add_pairs(out, Y, cols, e, v, sign, b):
    """out += sum_i w_i y_i over one row's pairs, w_i = b (1 + e_i) + sign e_i (y_i . v) (b = 1
    adds the residual's b_u part, b = 0 adds nothing): each y_i is read once, in cache for both uses."""
    k = v.shape[0]
    ahead = 4  # pairs to prefetch ahead: hides most of the latency of a random row of Y
    for q in range(cols.shape[0]):
        if q + ahead < cols.shape[0]:
            for c in range(0, k, 16):  # one prefetch per 64-byte line
                _prefetch(Y, cols[q + ahead], c)
        y = Y[cols[q]]
        w = b * (np.float32(1.0) + e[q]) + sign * e[q] * _dot(y, v)
        for j in range(k):
            out[j] += w * y[j]


@numba.njit(inline="always")
def _gram_times_rows(out, gram, v, sign, n):
    """out[i] = sign * gram @ v[i] for i < n (gram symmetric: summed by rows, which vectorises),
    each row's sum in the same order as for a row alone, but every row of gram read once for all
    n rows: at 128 factors gram (64 KiB) does not fit in L1, and one pass per row made these
    products about a third of the user half-step."""
    for i in range(n):
        out[i, :] = 0.0
    for j in range(gram.shape[0]):
        g = gram[j]
        for i in range(n):
            c = sign * v[i, j]
            for m in range(gram.shape[0]):
                out[i, m] += c * g[m]


GROUP = 8  # rows solved side by side by one thread (their r, p, Ap: 3 x 8 x k floats, in L1 at k = 128)


@numba.njit(fastmath=False, cache=True)
def _cg_group(x, Y, indptr, indices, e, gram, steps, lo, hi):
    """`steps` CG steps on the systems of rows lo..hi-1 (at most GROUP), as in
    `conjugate_gradient`: row by row the same arithmetic in the same order as solving each row
    alone, only the Gram products are interleaved (`_gram_times_rows`)."""
    n, k = hi - lo, x.shape[1]
    tiny = np.float32(np.finfo(np.float32).tiny)
    r, p, Ap = np.empty((n, k), np.float32), np.empty((n, k), np.float32), np.empty((n, k), np.float32)
    rs = np.empty(n, np.float32)
    xs = x[lo:hi]
    _gram_times_rows(r, gram, xs, np.float32(-1.0), n)
    for i in range(n):
        a, b = indptr[lo + i], indptr[lo + i + 1]
        _add_pairs(r[i], Y, indices[a:b], e[a:b], xs[i], np.float32(-1.0), np.float32(1.0))  # r = b - A x
        p[i] = r[i]
        rs[i] = _dot(r[i], r[i])
    for _ in range(steps):
        _gram_times_rows(Ap, gram, p, np.float32(1.0), n)
        for i in range(n):
            a, b = indptr[lo + i], indptr[lo + i + 1]
            _add_pairs(
                Ap[i], Y, indices[a:b], e[a:b], p[i], np.float32(1.0), np.float32(0.0)
            )  # Ap = gram p + sum_i e_i (y_i . p) y_i
            step = rs[i] / max(_dot(p[i], Ap[i]), tiny)
            for j in range(k):
                xs[i, j] += step * p[i, j]
                r[i, j] -= step * Ap[i, j]
            rs_new = _dot(r[i], r[i])
            beta = rs_new / max(rs[i], tiny)
            for j in range(k):
                p[i, j] = r[i, j] + beta * p[i, j]
            rs[i] = rs_new


@numba.njit(parallel=True, fastmath=False, cache=True)
def _cg_rows(x, Y, indptr, indices, e, gram, steps, spans):
    """CG for every row of x (`_cg_group`, GROUP rows at a time), one task per run of rows
    between consecutive `spans`."""
    for t in numba.prange(spans.shape[0] - 1):
        for lo in range(spans[t], spans[t + 1], GROUP):
            _cg_group(x, Y, indptr, indices, e, gram, steps, lo, min(lo + GROUP, spans[t + 1]))


class ImplicitALS(FactorModel):
    """Implicit-feedback ALS: confidence-weighted factors, batched conjugate-gradient solves."""

    name = "ials"
    task = "ranking"
    params_spec = (
        Param("factors", int, 128, "latent dimensions", min=1, max=4096, search=IntRange(64, 256, log=True)),
        Param(
            "reg",
            float,
            10.0,
            "L2 regularisation of user and item factors",
            min=0.0,
            search=LogUniform(2.0, 50.0),
        ),
        Param(
            "alpha",
            float,
            1.0,
            "confidence c = 1 + alpha * w of an observed pair",
            min=0.0,
            search=LogUniform(0.3, 10.0),
        ),
        Param("iterations", int, 15, "alternating user/item half-steps pairs", min=1, max=1000),
        Param("cg_steps", int, 3, "conjugate-gradient steps per half-step", min=1, max=256),
        Param(
            "min_rating",
            float,
            4.0,
            "ratings below this are not positives (0: every interaction)",
            min=0.0,
            search=Choice((0.0, 3.0, 3.5, 4.0)),
        ),
        Param(
            "weighting",
            str,
            "binary",
            "w of a positive: binary (1) or rating (max(r - rating_offset, 0.5))",
            choices=("binary", "rating"),
            search=Choice(("binary", "rating")),
        ),
        Param("rating_offset", float, 2.0, "subtracted from the rating with weighting=rating"),
        Param(
            "recency_halflife",
            float,
            10.0,
            "confidence weight halves every this many later events of the user (0: no recency weighting)",
            min=0.0,
            search=Choice((0.0, 2.0, 5.0, 10.0, 20.0, 50.0)),
        ),
        Param(
            "recency_floor",
            float,
            0.1,
            "weight of a user's oldest events with recency weighting",
            min=0.0,
            max=1.0,
            search=Uniform(0.0, 1.0),
        ),
        Param("init_std", float, 0.01, "standard deviation of the random initial factors", min=0.0),
        Param(
            "cg_kernel",
            str,
            "auto",
            "conjugate-gradient implementation: numba (fused per row, CPU only), "
            "torch (batched sparse ops, any device) or auto (numba on CPU)",
            choices=("auto", "numba", "torch"),
        ),
    )

    def fit(self, data, trainer) -> ImplicitALS:
        p = self.params
        X = positive_matrix(
            data.train,
            data.n_users,
            data.n_items,
            p["min_rating"],
            p["weighting"],
            p["rating_offset"],
            query_recency_factor(data.train, p["recency_halflife"], p["recency_floor"]),
        )
        X.data *= p["alpha"]  # e = c - 1 = alpha * w
        kernel = (
            p["cg_kernel"] if p["cg_kernel"] != "auto" else "numba" if self.device.type == "cpu" else "torch"
        )
        if kernel == "numba" and self.device.type != "cpu":
            raise BatchrecError(
                f"ials: parameter cg_kernel=numba runs on the CPU only (device is {self.device})"
            )
        g = trainer.generator()
        d = p["factors"]
        self.U = torch.randn(data.n_users, d, generator=g, device=self.device) * p["init_std"]
        self.V = torch.randn(data.n_items, d, generator=g, device=self.device) * p["init_std"]
        reg, steps = p["reg"], p["cg_steps"]
        if kernel == "numba":
            by_user, by_item = X, X.T.tocsr()

            def iterate():
                conjugate_gradient_fused(self.U, self.V, by_user, reg, steps)
                conjugate_gradient_fused(self.V, self.U, by_item, reg, steps)
        else:
            pairs = ObservedPairs(X, self.device)

            def iterate():
                conjugate_gradient(
                    self.U, self.V, pairs.user_layout, lambda v: pairs.dots(v, self.V), reg, steps
                )
                conjugate_gradient(
                    self.V,
                    self.U,
                    pairs.item_layout,
                    lambda v: pairs.dots(self.U, v).index_select(0, pairs.item_major),
                    reg,
                    steps,
                )

        for it in range(1, p["iterations"] + 1):
            t0 = time.perf_counter()
            iterate()
            trainer.log_epoch(epoch=it, seconds=time.perf_counter() - t0)
        return self
