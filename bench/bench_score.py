"""Nightly scoring at ML-20M shape vs the hardware floor, measured in the same run.

Builds (once, cached in --workdir) a minimal warehouse of the ML-20M shape: 138,493 users x
26,744 items, ~20M seen interactions with a skewed per-user count (at least 20 each) and
Zipf-like item popularity, the raw `ratings` too (the scorer scans them for users the snapshot
lacks), item features, titles and genres; plus random 128-wide user/item factors and a
`model_runs` row for them. Then, in one child process (peak RSS from its own rusage):

* floor: a bare blocked `U @ V.T` (numpy's matmul into one reused output block, as the scorer
  does) + batchrec's own top-k kernel over the factors at the scorer's block size
  (`batchrec.ranking.block_size`, the fastest it chooses under the budget): no seen filtering,
  no reading, no writing; timed right before and right after each scoring run, and the two
  averaged, because the machine is shared and its load drifts;
* score: `score_and_publish`, the body of `batchrec score` after it loads the model, with a bare
  factor model object: reading the snapshot (20M interactions) and raw users, blocked scoring
  with seen filtering, cold start, "because you rated" explanations, and
  the one-transaction DuckDB publish, timed end to end (explanation time measured inside);
* implicit: the implicit library's batched recommend-all over the same factors, seen items
  filtered, in its own process.

`--repeat N` runs N rounds, each a (floor, score, floor) process and an implicit process, their
order alternating round by round; the ratios are medians over the rounds. Every measured process
runs without OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE (bench/_common.py) and reports its own thread
pools and BLAS kernel, printed beside the ratios.

    python bench/bench_score.py --repeat 3      # ~1 min per round on 2 idle cores (+ a one-off build)

`--ease`: a non-factor model (sparse user rows x a dense item-item matrix: how EASE scores) on a
smaller catalogue through the same path; users per second vs its own bare loop.

Targets (issue 22): score / floor <= 1.15 and score / implicit <= 0.6, medians of 3.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import alternate, clean_env, describe, load_line, median, reexec_clean, run_child, runtime  # noqa: E402

RUN_ID = "bench-mf"


def generate(n_users: int, n_items: int, nnz: int, seed: int = 0):
    """Seen (user_idx, item_idx, rating) with ML-20M-like skew; unique pairs, vectorised."""
    rng = np.random.default_rng(seed)
    counts = 20 + rng.lognormal(3.6, 1.2, n_users)
    wanted = 1.15 * nnz  # draws repeat some (user, item) pairs: over-draw, then keep exactly nnz unique
    counts = np.minimum(
        20 + (counts - 20) * (wanted - 20 * n_users) / (counts - 20).sum(), n_items // 4
    ).astype(np.int64)
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
    genres = [
        "Action",
        "Adventure",
        "Animation",
        "Comedy",
        "Crime",
        "Drama",
        "Horror",
        "Romance",
        "Sci-Fi",
        "Thriller",
    ]
    item_genre = rng.integers(0, len(genres), (n_items, 2))
    counts = np.bincount(i, minlength=n_items)
    pop_rank = np.empty(n_items, np.int32)
    pop_rank[np.lexsort((np.arange(n_items), -counts))] = np.arange(1, n_items + 1)
    now = utcnow()
    ts = pa.array(
        np.full(len(u), np.datetime64("2015-01-01", "us"))
        + rng.integers(0, 10**14, len(u)).astype("timedelta64[us]")
    )
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
        con.register(
            "feat",
            pa.table(
                {
                    "item_idx": np.arange(n_items, dtype=np.int32),
                    "n": counts,
                    "rank": pop_rank,
                    "g1": item_genre[:, 0],
                    "g2": item_genre[:, 1],
                }
            ),
        )
        con.execute("""INSERT INTO item_features (snapshot_id, item_id, item_idx, n_ratings, pop_rank)
                       SELECT 'bench', item_idx + 1, item_idx, n, rank FROM feat""")
        con.execute(
            "INSERT INTO items SELECT item_idx + 1, 'Movie ' || (item_idx + 1) || ' (1999)', 1999, "
            "[?[g1 + 1], ?[g2 + 1]], 0 FROM feat",
            [genres, genres],
        )
        con.execute(
            "INSERT INTO item_genres SELECT DISTINCT 'bench', item_idx, unnest(genres) FROM items "
            "JOIN feat ON item_id = item_idx + 1"
        )
        con.unregister("feat")
        # random factors (the bench's model is a bare factor model object, see Factors)
        g = np.random.default_rng(2)
        np.save(path.parent / "U.npy", (g.standard_normal((n_users, factors)) * 0.3).astype(np.float32))
        np.save(path.parent / "V.npy", (g.standard_normal((n_items, factors)) * 0.3).astype(np.float32))
        con.execute(
            "INSERT INTO model_runs VALUES (?, 'mf', '{}', 'bench', NULL, '{}', ?, 'cpu', 0, ?)",
            [RUN_ID, str(path.parent), now],
        )
    print(
        f"built {path}: {n_users} users x {n_items} items, {len(u):,} interactions in {time.perf_counter() - t0:.0f} s",
        flush=True,
    )


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
            return (
                self.U[user_idx] @ self.V.T
                if item_idx is None
                else (self.U[user_idx] * self.V[item_idx]).sum(1)
            )

    return Factors(torch.from_numpy(np.load(workdir / "U.npy")), torch.from_numpy(np.load(workdir / "V.npy")))


def floor(model, budget: str, top_n: int) -> tuple[float, float]:
    """(wall, CPU) seconds of a bare blocked U @ V.T (numpy, into one reused output block) +
    batchrec's top-k kernel over the model's factors, at the scorer's block size."""
    import torch

    from batchrec.ranking import block_size
    from batchrec.scoring import parse_memory_budget
    from batchrec.topk import row_topk

    U_np, Vt_np = model.user_vectors().numpy(), model.item_vectors().numpy().T
    step = block_size(Vt_np.shape[1], parse_memory_budget(budget))
    out = np.empty((min(step, len(U_np)), Vt_np.shape[1]), np.float32)
    t0, c0 = time.perf_counter(), time.process_time()
    for a in range(0, len(U_np), step):
        s = np.matmul(U_np[a : a + step], Vt_np, out=out[: len(U_np[a : a + step])])
        row_topk(torch.from_numpy(s), top_n)
    return time.perf_counter() - t0, time.process_time() - c0


def implicit_recommend_all(workdir: Path, model, top_n: int) -> tuple[float, float] | None:
    """(wall, CPU) seconds of the implicit library's batched recommend for every user over the same
    factors, seen items filtered (its CSR built untimed); None when implicit is not installed."""
    try:
        from implicit.cpu.als import AlternatingLeastSquares
    except ImportError:
        return None
    import scipy.sparse as sp

    from batchrec.warehouse import Warehouse

    with Warehouse(workdir / "batchrec.duckdb").connect(read_only=True) as con:
        x = con.sql("SELECT user_idx, item_idx FROM interactions").fetchnumpy()
    seen = sp.csr_matrix(
        (np.ones(len(x["user_idx"]), np.float32), (x["user_idx"], x["item_idx"])),
        shape=(model.n_users, model.n_items),
    )
    als = AlternatingLeastSquares(factors=model.U.shape[1])
    als.user_factors, als.item_factors = model.U.numpy(), model.V.numpy()
    t0, c0 = time.perf_counter(), time.process_time()
    als.recommend(np.arange(model.n_users), seen, N=top_n, filter_already_liked_items=True)
    return time.perf_counter() - t0, time.process_time() - c0


def measure(workdir: Path, budget: str, top_n: int) -> None:
    """Child: the floor, what `batchrec score` runs after loading the model (`score_and_publish`:
    read the warehouse, score, explain, publish in DuckDB) timed end to end with the time in
    explanations measured inside it, then the floor again (the machine is shared: the score run
    is compared with the mean of the floors either side of it)."""
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
    with wh.connect() as con:  # untimed: like a nightly run, a previous run to move and a short history
        con.execute("DELETE FROM recommendation_history")
        if not scalar(con, "SELECT count(*) FROM recommendations"):
            con.execute(
                """INSERT INTO recommendations SELECT u.range + 1, r.range + 1, (u.range * 7 + r.range) % ? + 1,
                               0, 'previous', now()::TIMESTAMP - INTERVAL 1 DAY, 'popular'
                           FROM range(?) u, range(?) r""",
                [model.n_items, model.n_users, top_n],
            )
    floors = [floor(model, budget, top_n)]
    t0, c0 = time.perf_counter(), time.process_time()
    with wh.lock("bench"):
        with wh.connect(read_only=True) as con:
            run = resolve_run(con, RUN_ID)
        info = scoring.score_and_publish(wh, run, model, top_n, scoring.parse_memory_budget(budget), 30)
    score = {
        "seconds": time.perf_counter() - t0,
        "cpu": time.process_time() - c0,
        "explain": spent[0],
        "rows": info["published"],
    }
    floors.append(floor(model, budget, top_n))
    print(json.dumps({"score": score, "floors": floors, "runtime": runtime()}))


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
    X = sp.csr_matrix(
        (np.ones(len(x["user_idx"]), np.float32), (x["user_idx"], x["item_idx"])), shape=(n_users, n_items)
    )
    g = torch.Generator().manual_seed(0)
    B = torch.randn(n_items, n_items, generator=g) / n_items**0.5
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
    print(
        f"EASE-like ({n_users:,} users x {n_items:,} items, dense item-item; in this process {describe()}): batchrec score {n_users / full:,.0f} "
        f"users/s ({full:.1f} s incl. reading, explanations, writing); bare X @ B + topk {n_users / bare:,.0f} users/s "
        f"({bare:.1f} s); ratio {full / bare:.2f}  [{utcnow():%Y-%m-%d}]"
    )


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
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="threads for numpy's and torch's pools in the measured process [default: theirs]",
    )
    p.add_argument(
        "--repeat",
        type=int,
        default=3,
        help="rounds of (floor, score, floor) and implicit, alternating; "
        "median ratios are reported (the machine's speed drifts)",
    )
    p.add_argument("--setup-only", action="store_true", help="build the cached warehouse and stop")
    p.add_argument("--child", choices=["measure", "implicit"], help=argparse.SUPPRESS)
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="  %(message)s", stream=sys.stderr)
    if a.child == "measure":
        return measure(a.workdir, a.memory_budget, a.top_n)
    if a.child == "implicit":  # its own process, so the scorer's peak RSS is the scorer's alone
        return print(
            json.dumps(
                {
                    "implicit": implicit_recommend_all(a.workdir, factors(a.workdir), a.top_n),
                    "runtime": runtime(),
                }
            )
        )

    reexec_clean()  # the --ease part runs in this process
    shape = f"v2-{a.users}x{a.items}x{a.nnz}x{a.factors}"
    workdir = a.workdir / shape
    if not (workdir / "V.npy").exists():  # written last: its absence means no (complete) build
        shutil.rmtree(workdir, ignore_errors=True)
        workdir.mkdir(parents=True)
        build_warehouse(workdir / "batchrec.duckdb", a.users, a.items, a.nnz, a.factors)
    if a.setup_only:
        return
    me = [
        sys.executable,
        __file__,
        "--workdir",
        str(workdir),
        "--memory-budget",
        a.memory_budget,
        "--top-n",
        str(a.top_n),
    ]
    env = clean_env(a.threads)

    def ours() -> dict:
        _, _, rss, out = run_child(me + ["--child", "measure"], env)
        return json.loads(out) | {"rss": rss}

    def peer() -> dict:
        return json.loads(run_child(me + ["--child", "implicit"], env)[3])

    got = alternate(a.repeat, {"batchrec": ours, "implicit": peer})
    runs = got["batchrec"]
    print(
        f"shape {a.users:,} users x {a.items:,} items, {a.factors} dims, top-{a.top_n}, seen filtering on, "
        f"--memory-budget {a.memory_budget}, threads {a.threads or 'default'}; "
        f"{runs[0]['score']['rows']:,} rows published; this shell {describe()}"
    )
    walls, cpus = [], []
    for i, r in enumerate(runs):
        (fw0, fc0), (fw1, fc1) = r["floors"]
        floor_s, floor_cpu = (fw0 + fw1) / 2, (fc0 + fc1) / 2
        s = r["score"]
        walls.append(s["seconds"] / floor_s)
        cpus.append(s["cpu"] / floor_cpu)
        imp = got["implicit"][i]["implicit"]
        print(
            f"round {i + 1}: floor (blocked numpy U @ V.T + batchrec top-k) {floor_s:6.1f} s CPU {floor_cpu:6.1f} s "
            f"(before {fw0:.1f} s, after {fw1:.1f} s); score {s['seconds']:6.1f} s CPU {s['cpu']:6.1f} s "
            f"(explanations {s['explain']:.1f} s); ratio wall {walls[-1]:.2f} CPU {cpus[-1]:.2f}"
            + ("" if imp is None else f"; implicit {imp[0]:6.1f} s CPU {imp[1]:6.1f} s")
        )
    print(f"batchrec process {describe(runs[0]['runtime'])}; peak RSS {max(r['rss'] for r in runs):.2f} GB")
    print(
        f"ratio  score / floor: wall {median(walls):.2f}, CPU {median(cpus):.2f} (median of {len(walls)}; "
        f"target <= 1.15)"
    )
    score_s = median([r["score"]["seconds"] for r in runs])
    score_cpu = median([r["score"]["cpu"] for r in runs])
    if got["implicit"][0]["implicit"] is None:
        print("implicit not installed (pip install -e '.[bench]'): no peer ratio")
    else:
        imp_s = median([g["implicit"][0] for g in got["implicit"]])
        imp_cpu = median([g["implicit"][1] for g in got["implicit"]])
        print(f"implicit process {describe(got['implicit'][0]['runtime'])}")
        print(
            f"ratio  score / implicit recommend-all (same factors, seen filtered): wall {score_s / imp_s:.2f} "
            f"({score_s:.1f} s vs {imp_s:.1f} s), CPU {score_cpu / imp_cpu:.2f} (medians of {len(walls)}; "
            f"target <= 0.6)"
        )
    print(load_line() + " at the end (wall ratios need an otherwise idle machine; CPU ratios are steadier)")
    if a.ease:
        ease(a.workdir, a.ease_users, a.ease_items, a.memory_budget, a.top_n)


if __name__ == "__main__":
    main()
