"""iALS seconds per iteration at 128 factors: batchrec `ials` vs the `implicit` library, same matrix.

The matrix has the ml-20m shape (138,493 users x 26,744 items, 20M interactions): read from
/tmp/synth20m/ratings.csv when present (`batchrec synth` output), otherwise drawn here with
Zipf-like item popularity. Both models get the same binary user x item matrix, the same factors,
confidence (alpha), regularisation, 3 CG steps per half-step and the same number of threads.
batchrec runs its CPU default, the fused numba CG kernel (`--cg-kernel torch`: the torch path); its
one-off JIT compile (cached in __pycache__ after the first run) falls in the dropped first iteration.
Each fit runs in its own process (so one does not count the other's memory), `--repeat` rounds
of (batchrec, implicit), the order alternating round by round, without OPENBLAS_CORETYPE /
OPENBLAS_L2_SIZE (bench/_common.py). Prints each fit's wall and CPU seconds per iteration (the
first iteration dropped), the median ratios over the rounds (target issue 22: <= 0.8 wall) with
each process's thread pools and BLAS kernel beside them, and the peak RSS (target < 8 GB).

    python bench/bench_ials.py --repeat 3 [--iterations 3] [--threads 2] [--sample 1.0] [--cg-kernel auto]
    # ~2 min on 2 idle cores at the full shape, after a one-off ~1 min to draw the matrix
Needs the bench extra: pip install 'batchrec[bench]' (implicit, psutil).
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

SYNTH = Path("/tmp/synth20m/ratings.csv")
N_USERS, N_ITEMS, N_EVENTS = 138_493, 26_744, 20_000_263


def interactions(seed: int = 0, sample: float = 1.0) -> sp.csr_matrix:
    """The binary user x item matrix (ml-20m shape)."""
    if SYNTH.exists():
        # Parsing 20M CSV rows takes a minute; the dense ids are cached beside it in /tmp.
        stat = SYNTH.stat()
        cache = Path(f"/tmp/bench_ials_{stat.st_size}_{int(stat.st_mtime)}.npz")
        if not cache.exists():
            import polars as pl

            df = pl.read_csv(
                SYNTH,
                columns=["userId", "movieId"],
                schema_overrides={"userId": pl.Int64, "movieId": pl.Int64},
            )
            np.savez(
                cache,
                users=np.unique(df["userId"].to_numpy(), return_inverse=True)[1].astype(np.int32),
                items=np.unique(df["movieId"].to_numpy(), return_inverse=True)[1].astype(np.int32),
            )
        z = np.load(cache)
        users, items = z["users"], z["items"]
        n_users, n_items = users.max() + 1, items.max() + 1
    else:
        rng = np.random.default_rng(seed)
        # Zipf-like item popularity, users with a long-tailed activity; duplicates merged below.
        pop = 1.0 / np.arange(1, N_ITEMS + 1) ** 0.9
        items = rng.choice(N_ITEMS, size=int(N_EVENTS * 1.15), p=pop / pop.sum())
        act = rng.lognormal(0, 1.0, N_USERS)
        users = rng.choice(N_USERS, size=len(items), p=act / act.sum())
        n_users, n_items = N_USERS, N_ITEMS
    if sample < 1.0:
        keep = np.random.default_rng(seed).random(len(users)) < sample
        users, items = users[keep], items[keep]
    m = sp.csr_matrix((np.ones(len(users), np.float32), (users, items)), shape=(n_users, n_items))
    m.sum_duplicates()
    m.data[:] = 1.0
    return m


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def per_iteration(stamps: list[tuple[float, float]]) -> tuple[float, float]:
    """Median wall and CPU seconds per iteration from (wall, cpu) clock stamps; the first
    iteration (which includes setup) is dropped when there are more."""
    d = np.diff(np.asarray(stamps), axis=0)
    d = d[1:] if len(d) > 1 else d
    return float(np.median(d[:, 0])), float(np.median(d[:, 1]))


def run_batchrec(X: sp.csr_matrix, args, out) -> None:
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
    del coo
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
    model = create_model(
        "ials",
        {
            "factors": args.factors,
            "iterations": args.iterations,
            "reg": args.reg,
            "alpha": args.alpha,
            "cg_steps": 3,
            "min_rating": 0.0,
            "recency_halflife": 0.0,
            "cg_kernel": args.cg_kernel,
        },
    )

    class Clocked(Trainer):  # stamps wall and CPU clocks at the end of each iteration
        def log_epoch(self, **fields):
            super().log_epoch(**fields, wall=time.perf_counter(), cpu=time.process_time())

    trainer = Clocked(device=torch.device("cpu"), seed=0, progress=False)
    model.prepare(data, trainer.device)
    stamps = [(time.perf_counter(), time.process_time())]
    model.fit(data, trainer)
    stamps += [(h["wall"], h["cpu"]) for h in trainer.history]
    out.put(("batchrec", *per_iteration(stamps), peak_rss_gb(), runtime()))


def run_implicit(X: sp.csr_matrix, args, out) -> None:
    from implicit.cpu.als import AlternatingLeastSquares
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1, "blas"):  # implicit parallelises itself; BLAS threads would oversubscribe
        model = AlternatingLeastSquares(
            factors=args.factors,
            regularization=args.reg,
            alpha=args.alpha,
            use_cg=True,
            iterations=args.iterations,
            num_threads=args.threads,
            random_state=0,
        )
        stamps = [(time.perf_counter(), time.process_time())]
        model.fit(
            X,
            show_progress=False,
            callback=lambda *_: stamps.append((time.perf_counter(), time.process_time())),
        )
        info = runtime()
    out.put(("implicit", *per_iteration(stamps), peak_rss_gb(), info))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iterations", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--factors", type=int, default=128)
    ap.add_argument("--reg", type=float, default=10.0)
    ap.add_argument("--alpha", type=float, default=1.0)
    ap.add_argument("--sample", type=float, default=1.0, help="fraction of interactions (quick runs)")
    ap.add_argument(
        "--cg-kernel",
        default="auto",
        choices=("auto", "numba", "torch"),
        help="batchrec's CG implementation (auto: the fused numba kernel on CPU)",
    )
    ap.add_argument(
        "--repeat",
        type=int,
        default=3,
        help="rounds of (batchrec, implicit) fits, alternating; median ratios are reported",
    )
    args = ap.parse_args()
    reexec_clean(args.threads)  # every pool at --threads, OpenBLAS at its own kernel choice

    t0 = time.perf_counter()
    X = interactions(sample=args.sample)
    src = SYNTH if SYNTH.exists() else "random Zipf-like"
    print(
        f"matrix: {X.shape[0]:,} users x {X.shape[1]:,} items, {X.nnz:,} interactions ({src}, "
        f"{time.perf_counter() - t0:.1f} s to load); factors={args.factors} threads={args.threads} "
        f"iterations={args.iterations} cg_kernel={args.cg_kernel}",
        flush=True,
    )
    ctx = mp.get_context("fork")

    def fit(fn):
        def run():
            q = ctx.Queue()
            p = ctx.Process(target=fn, args=(X, args, q))
            p.start()
            name, wall, cpu, rss, info = q.get()
            p.join()
            print(
                f"{name:9s} {wall:7.2f} s/iteration (CPU {cpu:7.2f} s)   peak RSS {rss:5.2f} GB", flush=True
            )
            return wall, cpu, rss, info

        return run

    got = alternate(args.repeat, {"batchrec": fit(run_batchrec), "implicit": fit(run_implicit)})
    ours, ref = got["batchrec"], got["implicit"]
    walls = [o[0] / r[0] for o, r in zip(ours, ref)]
    cpus = [o[1] / r[1] for o, r in zip(ours, ref)]
    print(
        f"batchrec {median([o[0] for o in ours]):.2f} s/iteration (CPU {median([o[1] for o in ours]):.2f} s) "
        f"{describe(ours[0][3])}"
    )
    print(
        f"implicit {median([r[0] for r in ref]):.2f} s/iteration (CPU {median([r[1] for r in ref]):.2f} s) "
        f"{describe(ref[0][3])}"
    )
    print(
        f"ratio batchrec/implicit seconds per iteration: {median(walls):.2f} wall, {median(cpus):.2f} CPU "
        f"(medians of {len(walls)} alternating rounds; per round wall {', '.join(f'{w:.2f}' for w in walls)}; "
        f"target <= 0.8 wall); batchrec peak RSS {max(o[2] for o in ours):.2f} GB (target < 8 GB)"
    )
    print(
        f"{load_line()} at the end (wall ratios are only meaningful on an otherwise idle machine; CPU ratios are "
        "less sensitive)"
    )
    sys.exit(0)


if __name__ == "__main__":
    main()
