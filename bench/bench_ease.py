"""EASE fit seconds on a 20k-item subset vs a bare `torch.linalg.inv` of the same Gram matrix.

The subset: the `--items` most popular items of the ml-20m-shaped set (/tmp/synth20m/ratings.csv
when present, else a Zipf-like random matrix drawn here) and every user. `ease` fits the whole
model (positives matrix -> Gram matrix -> Cholesky inverse -> B); the baseline only inverts the
Gram matrix (X'X + lam I, computed outside its timing). Each side runs in its own process
(target < 8 GB peak RSS for ease), `--repeat` rounds alternating their order, without
OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE (bench/_common.py); prints the median ratio (target <= 1.3)
with each process's thread pools and BLAS kernel beside it.

    python bench/bench_ease.py --repeat 3 [--items 20000] [--threads 2]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import sys
import time
from pathlib import Path

import numpy as np
import scipy.sparse as sp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import alternate, describe, load_line, median, reexec_clean, runtime  # noqa: E402
from bench_ials import SYNTH, interactions  # noqa: E402  (same ml-20m-shaped matrix)


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def subset(n_items: int) -> sp.csr_matrix:
    X = interactions()
    top = np.argsort(-np.diff(X.tocsc().indptr), kind="stable")[:n_items]
    return X[:, np.sort(top)].tocsr()


def run_ease(X: sp.csr_matrix, args, out) -> None:
    import torch

    from batchrec.data import Interactions, SnapshotData
    from batchrec.models import create_model
    from batchrec.training import Trainer

    torch.set_num_threads(args.threads)
    coo = X.tocoo()
    events = Interactions(
        coo.row.astype(np.int64),
        coo.col.astype(np.int64),
        np.full(coo.nnz, np.nan, np.float32),
        np.zeros(coo.nnz, np.int64),
    )
    empty = sp.csr_matrix((X.shape[1], 0), dtype=np.float32)
    data = SnapshotData(
        "bench",
        None,
        X.shape[0],
        X.shape[1],
        events,
        None,
        None,
        np.arange(X.shape[0]),
        np.arange(X.shape[1]),
        None,
        empty,
        [],
        empty,
        [],
    )
    model = create_model("ease", {"lam": args.lam, "recency_halflife": 0.0, "max_memory_gb": 64.0})
    trainer = Trainer(device=torch.device("cpu"), seed=0, progress=False)
    model.prepare(data, trainer.device)
    t0 = time.perf_counter()
    model.fit(data, trainer)
    out.put(("ease fit", time.perf_counter() - t0, peak_rss_gb(), runtime()))


def run_inverse(X: sp.csr_matrix, args, out) -> None:
    import torch

    torch.set_num_threads(args.threads)
    G = torch.from_numpy((X.T @ X).toarray())
    G.diagonal().add_(args.lam)
    t0 = time.perf_counter()
    torch.linalg.inv(G)
    out.put(("bare inv", time.perf_counter() - t0, peak_rss_gb(), runtime()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", type=int, default=20_000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--lam", type=float, default=500.0)
    ap.add_argument("--repeat", type=int, default=3, help="rounds of (ease fit, bare inverse), alternating")
    args = ap.parse_args()
    reexec_clean(args.threads)
    X = subset(args.items)
    print(
        f"subset: {X.shape[0]:,} users x {X.shape[1]:,} items, {X.nnz:,} interactions "
        f"({SYNTH if SYNTH.exists() else 'random Zipf-like'}); threads={args.threads}",
        flush=True,
    )
    ctx = mp.get_context("fork")

    def side(fn):
        def run():
            q = ctx.Queue()
            p = ctx.Process(target=fn, args=(X, args, q))
            p.start()
            name, sec, rss, info = q.get()
            p.join()
            print(f"{name:9s} {sec:8.1f} s   peak RSS {rss:5.2f} GB", flush=True)
            return sec, rss, info

        return run

    got = alternate(args.repeat, {"ease": side(run_ease), "inverse": side(run_inverse)})
    ratios = [e[0] / i[0] for e, i in zip(got["ease"], got["inverse"])]
    print(f"ease fit {median([e[0] for e in got['ease']]):.1f} s {describe(got['ease'][0][2])}")
    print(f"bare inv {median([i[0] for i in got['inverse']]):.1f} s {describe(got['inverse'][0][2])}")
    print(
        f"ratio ease fit / bare inverse: {median(ratios):.2f} (median of {len(ratios)} alternating rounds; "
        f"target <= 1.3); ease peak RSS {max(e[1] for e in got['ease']):.2f} GB (target < 8 GB); {load_line()}"
    )


if __name__ == "__main__":
    main()
