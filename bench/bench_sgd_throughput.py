"""Training throughput of `mf` and `bpr` against a bare torch loop over the same batches.

    python bench/bench_sgd_throughput.py [--rows 20000000] [--batch-size N] [--threads N]

Data: a synthetic interaction set of the ml-20m shape (138,493 users x 26,744 items; item
popularity Zipf-like, ratings uniform on the half-star scale), generated in numpy, no files.
For each family an epoch is timed through `fit_model` (the shared Trainer, the family's loss,
negative sampling for bpr included) and compared with a bare loop of the same shape: sparse
embedding lookups, dot product, squared-error (mf) or BPR (bpr) loss, backward and a SparseAdam
step over the same mini-batches (for bpr, the same sampled triples, drawn outside the timing).
Prints examples (ratings; for bpr positive x negative triples) per second and the ratio ours/bare
(target >= 0.7; the median of `--repeats` alternating epochs of each loop), and the peak RSS of
the process so far (target < 8 GB). The process restarts itself without OPENBLAS_CORETYPE /
OPENBLAS_L2_SIZE (bench/_common.py) and prints its thread pools and BLAS kernel.

    python bench/bench_sgd_throughput.py --repeats 3   # a few minutes on 2 idle cores
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch
from torch import nn
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import describe, median, reexec_clean  # noqa: E402

from batchrec.data import Interactions, SnapshotData  # noqa: E402
from batchrec.models.bpr import NegativeSampler  # noqa: E402
from batchrec.train import fit_model  # noqa: E402
from batchrec.training import Trainer  # noqa: E402

N_USERS, N_ITEMS = 138_493, 26_744


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def synthetic(rows: int, seed: int = 0) -> SnapshotData:
    rng = np.random.default_rng(seed)
    users = rng.integers(0, N_USERS, rows)
    # Zipf-like item popularity, as in MovieLens (a few items take most ratings).
    weights = 1.0 / np.arange(1, N_ITEMS + 1) ** 0.9
    items = rng.choice(N_ITEMS, rows, p=weights / weights.sum())
    ratings = (rng.integers(1, 11, rows) / 2).astype(np.float32)
    train = Interactions(users.astype(np.int64), items.astype(np.int64), ratings, np.zeros(rows, np.int64))
    empty = sp.csr_matrix((N_ITEMS, 0), dtype=np.float32)
    return SnapshotData(
        snapshot_id="synthetic",
        protocol=None,
        n_users=N_USERS,
        n_items=N_ITEMS,
        train=train,
        valid=None,
        test=None,
        user_ids=np.arange(N_USERS),
        item_ids=np.arange(N_ITEMS),
        rating_scale=(0.5, 5.0),
        item_genres=empty,
        genre_names=[],
        item_tags=empty,
        tag_terms=[],
    )


def bare_epoch(tensors: tuple[torch.Tensor, ...], batch_size: int, factors: int, kind: str) -> float:
    """Seconds for one epoch of the plainest embedding training loop over the same batches."""
    torch.manual_seed(0)
    P = nn.Embedding(N_USERS, factors, sparse=True)
    Q = nn.Embedding(N_ITEMS, factors, sparse=True)
    b = nn.Embedding(N_ITEMS, 1, sparse=True)
    bu = nn.Embedding(N_USERS, 1, sparse=True)
    opt = torch.optim.SparseAdam(
        [*P.parameters(), *Q.parameters(), *b.parameters(), *bu.parameters()], lr=1e-3
    )
    gen = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    order = torch.randperm(len(tensors[0]), generator=gen)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        if kind == "mf":
            u, i, r = (t[idx] for t in tensors)
            loss = ((P(u) * Q(i)).sum(-1) + bu(u)[:, 0] + b(i)[:, 0] - r).pow(2).mean()
        else:
            u, i, j = (t[idx] for t in tensors)
            loss = -F.logsigmoid((P(u) * (Q(i) - Q(j))).sum(-1) + b(i)[:, 0] - b(j)[:, 0]).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=20_000_000)
    ap.add_argument("--batch-size", type=int, default=None, help="[default: each family's default]")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--models", default="mf,bpr")
    ap.add_argument(
        "--repeats",
        "--repeat",
        type=int,
        default=3,
        help="epochs timed per loop, alternating; the medians count",
    )
    args = ap.parse_args()
    reexec_clean(args.threads)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    data = synthetic(args.rows)
    print(
        f"synthetic ml-20m shape: {N_USERS:,} users x {N_ITEMS:,} items, {args.rows:,} rows "
        f"(generated in {time.perf_counter() - t0:.1f} s); torch threads {torch.get_num_threads()}"
    )
    print(
        f"{'model':<6}{'batch':>7}{'factors':>8}{'examples':>12}{'ours s/epoch':>14}{'ours rows/s':>13}"
        f"{'bare s/epoch':>14}"
        f"{'bare rows/s':>13}{'ratio':>7}{'peak RSS GB':>13}"
    )
    for name in args.models.split(","):
        params = {"epochs": 1}
        if args.batch_size:
            params["batch_size"] = args.batch_size
        model, trainer = fit_model(name, data, params, progress=False)
        batch, factors = model.params["batch_size"], model.params["factors"]
        u, i, r = data.train.tensors()
        if name == "mf":
            tensors = (u, i, r)
        else:  # the triples the family trains on (positives x negatives), drawn before the clock starts
            pos = r >= model.params["positive_threshold"]
            u, i = u[pos].repeat(model.params["negatives"]), i[pos].repeat(model.params["negatives"])
            j, ok = NegativeSampler(
                data.train.tensors()[0],
                data.train.tensors()[1],
                N_ITEMS,
                None,
                Trainer(seed=0).generator(offset=2),
            ).sample(u)
            tensors = (u[ok], i[ok], j[ok])
        # Alternate the two loops (A B, B A, ...) and compare medians, so a load change on a shared
        # machine does not masquerade as a difference between them.
        ours, bare = [trainer.history[0]["seconds"]], [bare_epoch(tensors, batch, factors, name)]
        for r in range(1, args.repeats):
            for side in ("bare", "ours") if r % 2 else ("ours", "bare"):
                if side == "bare":
                    bare.append(bare_epoch(tensors, batch, factors, name))
                else:
                    ours.append(fit_model(name, data, params, progress=False)[1].history[0]["seconds"])
        ours, bare = median(ours), median(bare)
        n = len(tensors[0])  # examples per epoch, the same for both loops
        print(
            f"{name:<6}{batch:>7}{factors:>8}{n:>12,}{ours:>14.1f}{n / ours:>13,.0f}{bare:>14.1f}{n / bare:>13,.0f}"
            f"{bare / ours:>7.2f}{peak_rss_gb():>13.2f}  {describe()}",
            flush=True,
        )
        del model, trainer, tensors


if __name__ == "__main__":
    main()
