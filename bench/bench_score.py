"""Nightly scoring at ML-20M shape vs the hardware floor, measured in the same run.

Builds (once, cached in --workdir) a minimal warehouse of the ML-20M shape: 138,493 users x
26,744 items, ~20M seen interactions with a skewed per-user count (at least 20 each) and
Zipf-like item popularity, the raw `ratings` too (the scorer scans them for users the snapshot
lacks), item features, titles and genres; plus random 128-wide user/item factors and a
`model_runs` row for them. Then, in one child process (peak RSS from its own rusage):

* floor: a bare blocked `U @ V.T` (numpy's matmul, the faster library here; torch's is timed
  too) + `torch.topk(10)` over the factors with the scorer's block size: no seen filtering, no
  reading, no writing; timed before and after the scoring run and averaged, because the machine
  is shared and its load drifts. For reference also with batchrec's own top-k kernel (what the
  scorer selects with) in place of torch.topk;
* score: `score_and_publish`, the body of `batchrec score` after it loads the model, with a bare
  factor model object: reading the snapshot (20M interactions) and raw users, blocked scoring
  with seen masking, cold start, "because you rated" explanations, and
  the one-transaction DuckDB publish, timed end to end (explanation time measured inside);
  `--repeat N` alternates N score runs with N + 1 floor runs and reports the median ratio.

`--ease`: a non-factor model (sparse user rows x a dense item-item matrix: how EASE scores) on a
smaller catalogue through the same path; users per second vs its own bare loop.

Reference (issue): implicit's recommend-all for this shape took 22.9 s on this machine; a numpy
blocked matmul + exact top-10 about 11.5 s.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

RUN_ID = "bench-mf"


def generate(n_users: int, n_items: int, nnz: int, seed: int = 0):
    """Seen (user_idx, item_idx, rating) with ML-20M-like skew; unique pairs, vectorised."""
    rng = np.random.default_rng(seed)
    counts = 20 + rng.lognormal(3.6, 1.2, n_users)
    wanted = 1.15 * nnz  # draws repeat some (user, item) pairs: over-draw, then keep exactly nnz unique
    counts = np.minimum(20 + (counts - 20) * (wanted - 20 * n_users) / (counts - 20).sum(), n_items // 4).astype(np.int64)
    users = np.repeat(np.arange(n_users, dtype=np.int64), counts)
    weights = 1.0 / (np.arange(n_items) + 20.0) ** 0.9
    cdf = np.cumsum(weights[rng.permutation(n_items)])
    items = np.searchsorted(cdf, rng.random(len(users)) * cdf[-1]).astype(np.int64)
    keys = np.unique(users * n_items + items)
    keys = np.sort(rng.choice(keys, min(nnz, len(keys)), replace=False))
    u, i = (keys // n_items).astype(np.int32), (keys % n_items).astype(np.int32)
    rating = (rng.integers(1, 11, len(u)) / 2).astype(np.float32)
    return u, i, rating


USER_FEATURES = """
    INSERT INTO user_features (snapshot_id, user_id, user_idx, n_ratings, mean_rating, first_ts, last_ts, n_tags)
    SELECT 'bench', user_idx + 1, user_idx, count(*), avg(rating), min(ts), max(ts), 0
    FROM interactions GROUP BY user_idx"""


def build_warehouse(path: Path, n_users: int, n_items: int, nnz: int, factors: int) -> None:
    import pyarrow as pa

    from batchrec.warehouse import Warehouse, utcnow

    t0 = time.perf_counter()
    u, i, r = generate(n_users, n_items, nnz)
    rng = np.random.default_rng(1)
    genres = ["Action", "Adventure", "Animation", "Comedy", "Crime", "Drama", "Horror", "Romance", "Sci-Fi", "Thriller"]
    item_genre = rng.integers(0, len(genres), (n_items, 2))
    counts = np.bincount(i, minlength=n_items)
    pop_rank = np.empty(n_items, np.int32)
    pop_rank[np.lexsort((np.arange(n_items), -counts))] = np.arange(1, n_items + 1)
    now = utcnow()
    ts = pa.array(np.full(len(u), np.datetime64("2015-01-01", "us")) + rng.integers(0, 10**14, len(u)).astype("timedelta64[us]"))
    wh = Warehouse(path)
    with wh.connect() as con:
        inter = pa.table({"user_idx": u, "item_idx": i, "rating": r, "ts": ts})
        con.register("inter", inter)
        con.execute("INSERT INTO interactions SELECT 'bench', user_idx, item_idx, rating, ts FROM inter")
        con.execute("INSERT INTO ratings SELECT user_idx + 1, item_idx + 1, rating, ts, 0 FROM inter")
        con.unregister("inter")
        con.execute("INSERT INTO feature_snapshots VALUES ('bench', ?, ?, '{}', '{}')", [now, now])
        con.execute(USER_FEATURES)
        con.execute("INSERT INTO user_index SELECT 'bench', range + 1, range FROM range(?)", [n_users])
        con.execute("INSERT INTO item_index SELECT 'bench', range + 1, range FROM range(?)", [n_items])
        con.register("feat", pa.table({"item_idx": np.arange(n_items, dtype=np.int32), "n": counts, "rank": pop_rank,
                                       "g1": item_genre[:, 0], "g2": item_genre[:, 1]}))
        con.execute("""INSERT INTO item_features (snapshot_id, item_id, item_idx, n_ratings, pop_rank)
                       SELECT 'bench', item_idx + 1, item_idx, n, rank FROM feat""")
        con.execute("INSERT INTO items SELECT item_idx + 1, 'Movie ' || (item_idx + 1) || ' (1999)', 1999, "
                    "[?[g1 + 1], ?[g2 + 1]], 0 FROM feat", [genres, genres])
        con.execute("INSERT INTO item_genres SELECT DISTINCT 'bench', item_idx, unnest(genres) FROM items "
                    "JOIN feat ON item_id = item_idx + 1")
        con.unregister("feat")
        # random factors (the bench's model is a bare factor model object, see Factors)
        g = np.random.default_rng(2)
        np.save(path.parent / "U.npy", (g.standard_normal((n_users, factors)) * 0.3).astype(np.float32))
        np.save(path.parent / "V.npy", (g.standard_normal((n_items, factors)) * 0.3).astype(np.float32))
        con.execute("INSERT INTO model_runs VALUES (?, 'mf', '{}', 'bench', NULL, '{}', ?, 'cpu', 0, ?)",
                    [RUN_ID, str(path.parent), now])
    print(f"built {path}: {n_users} users x {n_items} items, {len(u):,} interactions in {time.perf_counter() - t0:.0f} s",
          flush=True)


def run_child(args: list[str], threads: int | None = None) -> tuple[float, float, str]:
    """(wall seconds, peak RSS GB, stdout) of one child process; RSS from its own rusage."""
    env = dict(os.environ)
    if threads:  # every thread pool (OpenBLAS for numpy, OpenMP for torch) at the same size
        env |= {k: str(threads) for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(args, stdout=out, stderr=err, text=True, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        out.seek(0)
        err.seek(0)
        if os.waitstatus_to_exitcode(status) != 0:
            raise SystemExit(f"child failed: {' '.join(args)}\n{err.read()}")
        sys.stderr.write(err.read())
        return wall, usage.ru_maxrss / 1024 ** 2, out.read()


def factors(workdir: Path):
    """The bench's model: random factors behind the `Recommender` interface (user/item vectors)."""
    import torch

    from batchrec.models.base import Recommender

    class Factors(Recommender):
        name, task = "mf", "ranking"

        def __init__(self, U: torch.Tensor, V: torch.Tensor):
            super().__init__()
            self.U, self.V, self.n_users, self.n_items = U, V, len(U), len(V)

        def user_vectors(self):
            return self.U

        def item_vectors(self):
            return self.V

        def score(self, user_idx, item_idx=None):
            return self.U[user_idx] @ self.V.T if item_idx is None else (self.U[user_idx] * self.V[item_idx]).sum(1)

    return Factors(torch.from_numpy(np.load(workdir / "U.npy")), torch.from_numpy(np.load(workdir / "V.npy")))


def floor(model, budget: str, top_n: int, library: str, select: str = "torch") -> tuple[float, float]:
    """(wall, CPU) seconds of a bare blocked U @ V.T + torch.topk over the model's factors with the scorer's
    block size; the matmul by numpy (OpenBLAS) or torch (from_numpy shares memory, no copy); with
    select="batchrec" the top-k is batchrec's own kernel (what the scorer uses) instead of torch.topk."""
    import torch

    from batchrec.ranking import block_size
    from batchrec.scoring import parse_memory_budget
    from batchrec.topk import row_topk

    topk = (lambda s: torch.topk(s, top_n, dim=1)) if select == "torch" else (lambda s: row_topk(s, top_n))

    U, V = model.user_vectors(), model.item_vectors()
    U_np, Vt_np = U.numpy(), V.numpy().T
    step = block_size(len(V), parse_memory_budget(budget))
    t0, c0 = time.perf_counter(), time.process_time()
    with torch.no_grad():
        for a in range(0, len(U), step):
            s = torch.from_numpy(U_np[a:a + step] @ Vt_np) if library == "numpy" else U[a:a + step] @ V.T
            topk(s)
    return time.perf_counter() - t0, time.process_time() - c0


def implicit_recommend_all(workdir: Path, model, top_n: int) -> float | None:
    """Wall seconds of the implicit library's batched recommend for every user over the same
    factors, seen items filtered (its CSR built untimed); None when implicit is not installed."""
    try:
        from implicit.cpu.als import AlternatingLeastSquares
    except ImportError:
        return None
    import scipy.sparse as sp

    from batchrec.warehouse import Warehouse

    with Warehouse(workdir / "batchrec.duckdb").connect(read_only=True) as con:
        x = con.sql("SELECT user_idx, item_idx FROM interactions").fetchnumpy()
    seen = sp.csr_matrix((np.ones(len(x["user_idx"]), np.float32), (x["user_idx"], x["item_idx"])),
                         shape=(model.n_users, model.n_items))
    als = AlternatingLeastSquares(factors=model.U.shape[1])
    als.user_factors, als.item_factors = model.U.numpy(), model.V.numpy()
    t0 = time.perf_counter()
    als.recommend(np.arange(model.n_users), seen, N=top_n, filter_already_liked_items=True)
    return time.perf_counter() - t0


def measure(workdir: Path, budget: str, top_n: int, repeat: int) -> None:
    """Child: `repeat` times the floor, then what `batchrec score` runs after loading the model
    (`score_and_publish`: read the warehouse, score, explain, publish in DuckDB) timed end to end
    with the time in explanations measured inside it; then the floor once more (the machine is
    shared: each score run is compared with the mean of the floors either side of it), then the
    torch-matmul floor for reference."""
    import batchrec.scoring as scoring
    import batchrec.scoring.sources as sources
    from batchrec.runs import resolve_run
    from batchrec.warehouse import Warehouse, scalar

    spent = [0.0]
    inner = sources.explain_anchors  # patched where the scorer calls it

    def timed(*a, **k):
        t = time.perf_counter()
        try:
            return inner(*a, **k)
        finally:
            spent[0] += time.perf_counter() - t

    sources.explain_anchors = timed
    wh = Warehouse(workdir / "batchrec.duckdb")
    model = factors(workdir)
    floors, runs = [], []
    for _ in range(repeat):
        with wh.connect() as con:  # untimed: like a nightly run, a previous run to move and a short history
            con.execute("DELETE FROM recommendation_history")
            if not scalar(con, "SELECT count(*) FROM recommendations"):
                con.execute("""INSERT INTO recommendations SELECT u.range + 1, r.range + 1, (u.range * 7 + r.range) % ? + 1,
                                   0, 'previous', now()::TIMESTAMP - INTERVAL 1 DAY, 'popular'
                               FROM range(?) u, range(?) r""", [model.n_items, model.n_users, top_n])
        floors.append(floor(model, budget, top_n, "numpy"))
        spent[0] = 0.0
        t0, c0 = time.perf_counter(), time.process_time()
        with wh.lock("bench"):
            with wh.connect(read_only=True) as con:
                run = resolve_run(con, RUN_ID)
            info = scoring.score_and_publish(wh, run, model, top_n, scoring.parse_memory_budget(budget), 30)
        runs.append({"seconds": time.perf_counter() - t0, "cpu": time.process_time() - c0, "explain": spent[0],
                     "rows": info["published"]})
    floors.append(floor(model, budget, top_n, "numpy"))
    print(json.dumps({"runs": runs, "floors": floors, "floor_torch": floor(model, budget, top_n, "torch"),
                      "floor_own_topk": floor(model, budget, top_n, "numpy", "batchrec")}))


def ease(workdir: Path, n_users: int, n_items: int, budget: str, top_n: int) -> None:
    """In-process: a dense item-item model (EASE's scoring: X_u @ B) through the same scorer."""
    import scipy.sparse as sp
    import torch

    import batchrec.scoring as scoring
    from batchrec.data import csr_to_torch
    from batchrec.models.base import Recommender
    from batchrec.ranking import block_size
    from batchrec.warehouse import Warehouse, utcnow

    path = workdir / f"ease-{n_users}x{n_items}" / "batchrec.duckdb"
    if not (path.parent / "V.npy").exists():
        shutil.rmtree(path.parent, ignore_errors=True)
        path.parent.mkdir(parents=True)
        build_warehouse(path, n_users, n_items, n_users * 100, 8)
    wh = Warehouse(path)
    with wh.connect(read_only=True) as con:
        x = con.sql("SELECT user_idx, item_idx FROM interactions").fetchnumpy()
    X = sp.csr_matrix((np.ones(len(x["user_idx"]), np.float32), (x["user_idx"], x["item_idx"])), shape=(n_users, n_items))
    g = torch.Generator().manual_seed(0)
    B = torch.randn(n_items, n_items, generator=g) / n_items ** 0.5
    B.fill_diagonal_(0)

    class ItemItem(Recommender):
        name, task = "ease", "ranking"

        def score(self, user_idx, item_idx=None):
            return torch.sparse.mm(csr_to_torch(X[user_idx.cpu().numpy()]), B)

        def item_item(self):  # explanations: the liked item l with the largest B[l, r]
            return B

    model = ItemItem()
    model.n_users, model.n_items = n_users, n_items
    run = {"run_id": "bench-ease", "model": "ease", "snapshot_id": "bench", "protocol": None}
    budget_bytes = scoring.parse_memory_budget(budget)
    step = block_size(n_items, budget_bytes)
    t0 = time.perf_counter()
    with torch.no_grad():
        for a in range(0, n_users, step):
            torch.topk(model.score(torch.arange(a, min(a + step, n_users))), top_n, dim=1)
    bare = time.perf_counter() - t0
    t0 = time.perf_counter()
    with wh.lock("bench"):
        scoring.score_and_publish(wh, run, model, top_n, budget_bytes, 30)
    full = time.perf_counter() - t0
    print(f"EASE-like ({n_users:,} users x {n_items:,} items, dense item-item): batchrec score {n_users / full:,.0f} "
          f"users/s ({full:.1f} s incl. reading, explanations, writing); bare X @ B + topk {n_users / bare:,.0f} users/s "
          f"({bare:.1f} s); ratio {full / bare:.2f}  [{utcnow():%Y-%m-%d}]")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--users", type=int, default=138_493)
    p.add_argument("--items", type=int, default=26_744)
    p.add_argument("--nnz", type=int, default=20_000_263)
    p.add_argument("--factors", type=int, default=128)
    p.add_argument("--top-n", type=int, default=10)
    p.add_argument("--memory-budget", default="1GB")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/batchrec-bench-score"))
    p.add_argument("--ease", action="store_true", help="also the EASE-like non-factor model")
    p.add_argument("--ease-users", type=int, default=20_000)
    p.add_argument("--ease-items", type=int, default=8_000)
    p.add_argument("--threads", type=int, default=None,
                   help="threads for numpy's and torch's pools in the measured process [default: theirs]")
    p.add_argument("--repeat", type=int, default=1, help="score runs, each between two floor runs; the median "
                   "ratio is reported (the machine's speed drifts)")
    p.add_argument("--setup-only", action="store_true", help="build the cached warehouse and stop")
    p.add_argument("--child", choices=["measure", "implicit"], help=argparse.SUPPRESS)
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="  %(message)s", stream=sys.stderr)
    if a.child == "measure":
        return measure(a.workdir, a.memory_budget, a.top_n, a.repeat)
    if a.child == "implicit":  # its own process, so the scorer's peak RSS is the scorer's alone
        return print(json.dumps(implicit_recommend_all(a.workdir, factors(a.workdir), a.top_n)))

    shape = f"v2-{a.users}x{a.items}x{a.nnz}x{a.factors}"
    workdir = a.workdir / shape
    if not (workdir / "V.npy").exists():  # written last: its absence means no (complete) build
        shutil.rmtree(workdir, ignore_errors=True)
        workdir.mkdir(parents=True)
        build_warehouse(workdir / "batchrec.duckdb", a.users, a.items, a.nnz, a.factors)
    if a.setup_only:
        return
    me = [sys.executable, __file__, "--workdir", str(workdir), "--memory-budget", a.memory_budget, "--top-n", str(a.top_n),
          "--repeat", str(a.repeat)]
    _, rss, out = run_child(me + ["--child", "measure"], a.threads)
    got = json.loads(out)
    implicit_s = json.loads(run_child(me + ["--child", "implicit"], a.threads)[2])
    print(f"shape {a.users:,} users x {a.items:,} items, {a.factors} dims, top-{a.top_n}, seen filtering on, "
          f"--memory-budget {a.memory_budget}, {os.cpu_count()} CPUs, threads {a.threads or 'default'}; "
          f"{got['runs'][0]['rows']:,} rows published; load average {os.getloadavg()[0]:.1f} at the end")
    walls, cpus = [], []
    for i, run in enumerate(got["runs"]):
        floor_s, floor_cpu = ((b + f) / 2 for b, f in zip(got["floors"][i], got["floors"][i + 1]))
        walls.append(run["seconds"] / floor_s)
        cpus.append(run["cpu"] / floor_cpu)
        print(f"floor  bare blocked U @ V.T (numpy) + torch.topk           {floor_s:7.1f} s   CPU {floor_cpu:6.1f} s   "
              f"(wall before {got['floors'][i][0]:.1f} s, after {got['floors'][i + 1][0]:.1f} s)")
        print(f"score  read + score + seen mask + explain + publish        {run['seconds']:7.1f} s   CPU {run['cpu']:6.1f} s   "
              f"explanations {run['explain']:.1f} s; ratio wall {walls[-1]:.2f}, CPU {cpus[-1]:.2f}")
    print(f"floor with torch's matmul instead of numpy's: {got['floor_torch'][0]:.1f} s; with batchrec's top-k "
          f"kernel instead of torch.topk: {got['floor_own_topk'][0]:.1f} s (the scorer's own bare loop)")
    print(f"ratio  score / floor: wall {np.median(walls):.2f}, CPU time {np.median(cpus):.2f}"
          f"{f' (median of {len(walls)})' if len(walls) > 1 else ''}   (target <= 1.3); peak RSS {rss:.2f} GB")
    score_s = float(np.median([r["seconds"] for r in got["runs"]]))
    if implicit_s is None:
        print("implicit not installed (pip install -e '.[bench]'): the issue quotes 22.9 s for its recommend-all here")
    else:
        print(f"implicit recommend-all, same factors, seen filtered: {implicit_s:7.1f} s   "
              f"score / implicit {score_s / implicit_s:.2f}   (target < 1)")
    if a.ease:
        ease(a.workdir, a.ease_users, a.ease_items, a.memory_budget, a.top_n)


if __name__ == "__main__":
    main()
