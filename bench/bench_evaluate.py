"""Wall time of `batchrec evaluate` (3 models on ml-latest-small, user_temporal, K = 5,10,20, with
the report) with the 95% bootstrap intervals, paired tests and segments, against the same command
without resamples (`--bootstrap 0`) and, with `--baseline-src`, against another checkout's code
(e.g. main before intervals existed) on a copy of the same warehouse and runs.

    python bench/bench_evaluate.py [--baseline-src /path/to/other/checkout] [--models ease,svd,popularity]
                                   [--repeats 3]

The warehouse is built once (ingest, features, one protocol run per model) by the baseline's code
when given (its schema is the older one; this checkout migrates its copy), so both measure the
same runs. Commands alternate, each timed as a whole process (start-up included); prints the
median of each and the ratios, measured in this run.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent


def batchrec(src: Path, warehouse: Path, *args: str) -> float:
    """Run `batchrec --warehouse W ARGS` with `src`'s code; the wall seconds it took."""
    env = os.environ | {"PYTHONPATH": str(src)}
    started = time.perf_counter()
    subprocess.run(
        [shutil.which("batchrec") or "batchrec", "-q", "--warehouse", str(warehouse), *args],
        env=env,
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return time.perf_counter() - started


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--baseline-src", default=None, help="checkout whose code is the baseline (its batchrec/ is imported)"
    )
    ap.add_argument("--models", default="ease,svd,popularity")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    base_src = Path(args.baseline_src).resolve() if args.baseline_src else None
    models = args.models.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        built = tmp / "base" / "wh.duckdb"
        built.parent.mkdir()
        src = base_src or HERE
        batchrec(src, built, "ingest", "--dataset", "ml-latest-small")
        batchrec(src, built, "features", "--protocols", "user_temporal")
        for m in models:
            batchrec(src, built, "train", m, "--protocol", "user_temporal")
        ours = tmp / "ours" / "wh.duckdb"
        shutil.copytree(built.parent, ours.parent)  # the warehouse and its artifacts, same runs
        evaluate = (
            "evaluate",
            "--models",
            args.models,
            "--protocol",
            "user_temporal",
            "--k",
            "5,10,20",
            "--compare",
        )
        cases = {
            "this checkout": (HERE, ours, ("--bootstrap", "1000")),
            "this checkout, --bootstrap 0": (HERE, ours, ("--bootstrap", "0")),
        }
        if base_src:
            cases["baseline"] = (base_src, built, ())
        walls: dict[str, list[float]] = {name: [] for name in cases}
        for _ in range(args.repeats):
            for name, (code, wh, extra) in cases.items():
                walls[name].append(batchrec(code, wh, *evaluate, "--report", str(tmp / "reports"), *extra))
    median = {name: statistics.median(w) for name, w in walls.items()}
    print(
        f"batchrec evaluate --models {args.models} (ml-latest-small, user_temporal, K 5,10,20, report), "
        f"median of {args.repeats}:"
    )
    for name, w in walls.items():
        print(f"  {name:<32} {median[name]:6.2f} s   ({', '.join(f'{x:.2f}' for x in w)})")
    print(
        f"ratio with / without resamples: {median['this checkout'] / median['this checkout, --bootstrap 0']:.2f}"
    )
    if base_src:
        print(
            f"ratio this checkout / baseline ({base_src}): {median['this checkout'] / median['baseline']:.2f}"
        )


if __name__ == "__main__":
    main()
