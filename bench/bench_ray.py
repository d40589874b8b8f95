"""Scoring on the Ray executor vs plain `batchrec score`, at the ML-20M shape, measured in one run.

Builds (once, cached in --workdir) the warehouse of bench_score.py (138,493 users x 26,744 items,
~20M interactions, the raw ratings, item features) and a real `mf` artifact of 128 random factors
(what `batchrec train mf` writes, loaded the way every scoring task loads it). Then this process
starts a local Ray cluster of the machine's CPUs (`ray.init`; its start-up time is printed apart)
and times real `batchrec` child processes, alternating, `--repeat` times:

* plain: `batchrec score --run RUN` (read, score, explain, publish in one process);
* ray-1: `batchrec score --run RUN --executor ray --ray-address ADDR --shards 1 --task-cpus C`
  (one Ray task with every CPU scores every user and writes its Parquet shard, the driver
  publishes it);
* ray-2: the same with `--shards 2 --task-cpus C/2` (two tasks at once, half the CPUs each).

Printed: seconds of each (median over repeats), the overhead ratio ray-N / plain (target for
ray-1: <= 1.15), peak RSS of the plain process and of each Ray worker (its lifetime peak, from
the task's own rusage), and the driver's peak RSS. Every run publishes with --force (the gate's
checks run, its refusal does not stop the timing).

    python bench/bench_ray.py [--users N --items N --nnz N] [--repeat 2]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_score import build_warehouse  # noqa: E402  (the shared ML-20M-shaped warehouse)

RUN_ID = "bench-ray-mf"
BATCHREC = Path(sys.executable).parent / "batchrec"


def add_artifact(path: Path) -> None:
    """A real mf artifact from the cached random factors (no biases), and its shipped run."""
    import torch

    from batchrec.models import get_model_class
    from batchrec.warehouse import Warehouse, utcnow

    U, V = np.load(path.parent / "U.npy"), np.load(path.parent / "V.npy")
    model = get_model_class("mf")(factors=U.shape[1], biased=False)
    model.n_users, model.n_items = len(U), len(V)
    model.load_state(
        {
            "P.weight": torch.from_numpy(U),
            "Q.weight": torch.from_numpy(V),
            "bu.weight": torch.zeros(len(U), 1),
            "bi.weight": torch.zeros(len(V), 1),
            "mu": torch.tensor(0.0),
        }
    )
    artifact = model.save(path.parent / "artifacts" / RUN_ID)
    with Warehouse(path).connect() as con:
        con.execute("DELETE FROM model_runs WHERE run_id = ?", [RUN_ID])
        con.execute(
            "INSERT INTO model_runs VALUES (?, 'mf', ?, 'bench', NULL, '{}', ?, 'cpu', 0, ?)",
            [RUN_ID, json.dumps(model.params), str(artifact), utcnow()],
        )


def timed(args: list[str]) -> tuple[float, float, str]:
    """(wall seconds, peak RSS MB, stdout) of one `batchrec` child process."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen([str(BATCHREC), *args], stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        out.seek(0)
        err.seek(0)
        if os.waitstatus_to_exitcode(status) != 0:
            raise SystemExit(f"failed: batchrec {' '.join(args)}\n{err.read()}")
        return wall, usage.ru_maxrss / 1024, out.read()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--users", type=int, default=138_493)
    p.add_argument("--items", type=int, default=26_744)
    p.add_argument("--nnz", type=int, default=20_000_263)
    p.add_argument("--factors", type=int, default=128)
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--cpus", type=int, default=os.cpu_count(), help="CPUs of the local Ray cluster")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/batchrec-bench-ray"))
    a = p.parse_args()

    path = a.workdir / f"{a.users}x{a.items}x{a.nnz}x{a.factors}" / "batchrec.duckdb"
    if not (path.parent / "artifacts" / RUN_ID / "model.json").exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.unlink(missing_ok=True)
        build_warehouse(path, a.users, a.items, a.nnz, a.factors)
        add_artifact(path)

    import ray

    t0 = time.perf_counter()
    ray.init(num_cpus=a.cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
    start_s = time.perf_counter() - t0
    address = ray.get_runtime_context().gcs_address
    base = ["--warehouse", str(path), "-q", "score", "--run", RUN_ID, "--device", "cpu", "--force"]
    # each task gets its share of the CPUs (and that many threads): ray-1 uses the whole machine
    # as plain does; ray-2 runs two tasks at once on half each
    ray_args = [*base, "--executor", "ray", "--ray-address", address]
    configs = {
        "plain": base,
        "ray-1": [*ray_args, "--shards", "1", "--task-cpus", str(a.cpus)],
        "ray-2": [*ray_args, "--shards", "2", "--task-cpus", str(a.cpus / 2)],
    }
    seconds: dict[str, list[float]] = {k: [] for k in configs}
    rss: dict[str, float] = {}
    try:
        for r in range(a.repeat):
            for name, args in configs.items():
                wall, peak, out = timed(args)
                seconds[name].append(wall)
                worker = re.search(r"peak RSS per worker (\d+) MB", out)
                rss[name] = max(rss.get(name, 0.0), float(worker.group(1)) if worker else peak)
                rss[f"{name} driver"] = max(rss.get(f"{name} driver", 0.0), peak)
                shard = re.search(r"slowest shard ([\d.]+) s", out)
                inside = f", slowest shard task {shard.group(1)} s of it" if shard else ""
                print(
                    f"repeat {r + 1}: {name:6s} {wall:6.1f} s  (process peak RSS {peak:,.0f} MB{inside})",
                    flush=True,
                )
    finally:
        ray.shutdown()

    med = {k: statistics.median(v) for k, v in seconds.items()}
    print(
        f"\nshape {a.users:,} users x {a.items:,} items, {a.nnz:,} interactions, {a.factors} factors; "
        f"local Ray cluster of {a.cpus} CPUs started in {start_s:.1f} s (not counted below)"
    )
    print(f"plain `batchrec score`          {med['plain']:6.1f} s   peak RSS {rss['plain']:,.0f} MB")
    for n in (1, 2):
        name = f"ray-{n}"
        print(
            f"--executor ray --shards {n}      {med[name]:6.1f} s   ratio vs plain {med[name] / med['plain']:.2f}"
            f"{'  (target <= 1.15)' if n == 1 else ''}   peak RSS per worker {rss[name]:,.0f} MB, "
            f"driver {rss[name + ' driver']:,.0f} MB"
        )


if __name__ == "__main__":
    main()
