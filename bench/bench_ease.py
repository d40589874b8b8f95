"""EASE fit seconds on a 20k-item subset vs a bare `torch.linalg.inv` of the same Gram matrix.

The subset: the `--items` most popular items of the ml-20m-shaped set (/tmp/synth20m/ratings.csv
when present, else a Zipf-like random matrix drawn here) and every user. `ease` fits the whole
model (positives matrix -> Gram matrix -> Cholesky inverse -> B); the baseline only inverts the
Gram matrix (X'X + lam I, computed outside its timing). Prints both timings, the ratio (target
<= 1.3) and the peak RSS of each (each in its own process; target < 8 GB).

    .venv/bin/python bench/bench_ease.py [--items 20000] [--threads 2]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np
import scipy.sparse as sp

sys.path.insert(0, str(Path(__file__).resolve().parent))
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
    events = Interactions(coo.row.astype(np.int64), coo.col.astype(np.int64), np.full(coo.nnz, np.nan, np.float32),
                          np.zeros(coo.nnz, np.int64))
    empty = sp.csr_matrix((X.shape[1], 0), dtype=np.float32)
    data = SnapshotData("bench", None, X.shape[0], X.shape[1], events, None, None, np.arange(X.shape[0]),
                        np.arange(X.shape[1]), None, empty, [], empty, [])
    model = create_model("ease", {"lam": args.lam, "recency_halflife": 0.0, "max_memory_gb": 64.0})
    trainer = Trainer(device=torch.device("cpu"), seed=0, progress=False)
    model.prepare(data, trainer.device)
    t0 = time.perf_counter()
    model.fit(data, trainer)
    out.put(("ease fit", time.perf_counter() - t0, peak_rss_gb()))


def run_inverse(X: sp.csr_matrix, args, out) -> None:
    import torch

    torch.set_num_threads(args.threads)
    G = torch.from_numpy((X.T @ X).toarray())
    G.diagonal().add_(args.lam)
    t0 = time.perf_counter()
    torch.linalg.inv(G)
    out.put(("bare inv", time.perf_counter() - t0, peak_rss_gb()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", type=int, default=20_000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--lam", type=float, default=500.0)
    args = ap.parse_args()
    X = subset(args.items)
    print(f"subset: {X.shape[0]:,} users x {X.shape[1]:,} items, {X.nnz:,} interactions "
          f"({SYNTH if SYNTH.exists() else 'random Zipf-like'}); threads={args.threads}", flush=True)
    ctx = mp.get_context("fork")
    results = {}
    for fn in (run_ease, run_inverse):
        q = ctx.Queue()
        p = ctx.Process(target=fn, args=(X, args, q))
        p.start()
        name, sec, rss = q.get()
        p.join()
        results[name] = (sec, rss)
        print(f"{name:9s} {sec:8.1f} s   peak RSS {rss:5.2f} GB", flush=True)
    ratio = results["ease fit"][0] / results["bare inv"][0]
    print(f"ratio ease fit / bare inverse: {ratio:.2f} (target <= 1.3); ease peak RSS "
          f"{results['ease fit'][1]:.2f} GB (target < 8 GB); load average {os.getloadavg()[0]:.1f} "
          f"on {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
