"""Neural families on CPU: the default fit's seconds against biased MF (`mf`) fitted the same way in
the same run (the ratio columns), beside the family's quality on the protocol its bar uses.

Default mode, issue #22's figures on ml-latest-small (the real pipeline: ingest -> features):
* s/fit: `batchrec train FAMILY` with its defaults, as the nightly job's ship step runs it (no
  --protocol: every interaction, so no validation part; each family then runs its
  `fixed_epochs`). Each fit is its own `batchrec` process: wall seconds of the process (torch
  import and artifact save included), its CPU seconds (all threads), and the fit alone as
  recorded in `model_runs.fit_seconds`. Ratios are of medians, to mf's in the same run.
* quality: the defaults fitted on user_temporal's train part, early-stopped on its valid part,
  measured on test (NDCG@10 for ranking families, RMSE for rating ones) as the quality tests in
  tests/test_models_neural.py measure them; deterministic, so measured once.
Runs alternate (mf, neumf, ..., then backwards) `--repeat` times; the table shows medians. On a
shared machine the wall column follows the other jobs' load (printed before and after); the CPU
column is what the fit itself cost.

`--per-epoch`: the older figure, seconds per training epoch and peak RSS with `--epochs` epochs
and no validation, on ml-latest-small and a synthetic MovieLens-format set from `batchrec synth`
(default 1M ratings, 7,000 users x 5,000 items): one member's epoch for ensemble families.

    .venv/bin/python bench/bench_neural.py [--repeat 3] [--families two_tower,multvae]
    .venv/bin/python bench/bench_neural.py --per-epoch [--ratings 1000000] [--users 7000] [--items 5000] [--epochs 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FAMILIES = ("mf", "neumf", "autorec", "two_tower", "multvae", "content_dnn")  # mf first: the baseline
CLI = [str(Path(sys.executable).parent / "batchrec")]  # the console script of this environment
# Some machines set these; they make OpenBLAS pick an older kernel (issue #22): never in a measured child.
SLOWING = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")


def child_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in SLOWING}


def machine() -> str:
    """CPU model, torch threads (as a fit sets them while training and as the process starts) and
    the BLAS kernel threadpoolctl reports, in one line."""
    import numpy  # noqa: F401  (loads OpenBLAS, so threadpoolctl sees it)
    import torch
    from threadpoolctl import threadpool_info

    from batchrec.training import CPU_TRAIN_THREADS

    lines = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []
    cpu = next(
        (line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")),
        platform.processor(),
    )
    blas = (
        ", ".join(
            f"{p.get('internal_api')} {p.get('version')} {p.get('architecture')} x{p.get('num_threads')}"
            for p in threadpool_info()
            if p.get("user_api") == "blas"
        )
        or "none"
    )
    env = " ".join(f"{k}={os.environ[k]}" for k in SLOWING if k in os.environ)
    return (
        f"[{cpu}, {os.cpu_count()} CPUs; torch threads {torch.get_num_threads()} at start, "
        f"{CPU_TRAIN_THREADS} while fitting on CPU; BLAS: {blas}{'; set here, cleared in the measured children: ' + env if env else ''}]"
    )


def load() -> str:
    return f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"


def run_child(args: list[str]) -> tuple[float, float, str]:
    """(wall s, CPU s of the child and all its threads, stdout) of one child process."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(args, stdout=out, stderr=err, text=True, env=child_env())
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        out.seek(0)
        err.seek(0)
        if os.waitstatus_to_exitcode(status) != 0:
            raise SystemExit(f"child failed: {' '.join(args)}\n{err.read()}")
        return wall, usage.ru_utime + usage.ru_stime, out.read()


def build_warehouse(root: Path, name: str, args, protocols: str = "random") -> Path:
    """A warehouse with one feature snapshot of ml-latest-small or of a fresh synthetic set."""
    wh = root / name / "batchrec.duckdb"
    base = CLI + ["--warehouse", str(wh)]
    if name == "ml-latest-small":
        steps = [base + ["ingest", "--dataset", "ml-latest-small"]]
    else:
        raw = root / "synth-raw"
        steps = [
            CLI
            + [
                "synth",
                str(raw),
                "--ratings",
                str(args.ratings),
                "--users",
                str(args.users),
                "--items",
                str(args.items),
            ],
            base + ["ingest", str(raw)],
        ]
    for cmd in steps + [base + ["features", "--protocols", protocols]]:
        subprocess.run(cmd, check=True, capture_output=True, env=child_env())
    return wh


def last_fit_seconds(wh: Path, family: str) -> float:
    import duckdb

    with duckdb.connect(str(wh), read_only=True) as con:
        return con.execute(
            "SELECT fit_seconds FROM model_runs WHERE model = ? ORDER BY created_at DESC LIMIT 1", [family]
        ).fetchone()[0]


def quality(wh: str, family: str) -> None:
    """Child process: the defaults on user_temporal (early-stopped on valid), test metric; one JSON line."""
    from batchrec.data import load_snapshot
    from batchrec.features import latest_snapshot_id
    from batchrec.metrics import evaluate_model
    from batchrec.train import fit_model
    from batchrec.warehouse import Warehouse

    with Warehouse(Path(wh)).connect(read_only=True) as con:
        data = load_snapshot(con, latest_snapshot_id(con), "user_temporal")
    t0 = time.perf_counter()
    model, trainer = fit_model(family, data, device="cpu", progress=False)
    fit_s = time.perf_counter() - t0
    metrics = evaluate_model(model, data, ks=(10,))
    key = "rmse" if model.task == "rating" else "ndcg@10"
    print(
        json.dumps(
            {
                "metric": key,
                "value": metrics[key],
                "epochs": len(trainer.history),
                "fit_s": fit_s,
                "machine": machine(),
            }
        )
    )


def default_fits(args) -> None:
    families = ["mf"] + [f for f in args.families.split(",") if f != "mf"]
    print(machine())
    print(f"before: {load()}", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench_neural_") as tmp:
        wh = build_warehouse(Path(tmp), "ml-latest-small", args, protocols="user_temporal")
        runs: dict[str, list[tuple[float, float, float]]] = {f: [] for f in families}
        for r in range(args.repeat):
            for family in families if r % 2 == 0 else families[::-1]:
                wall, cpu, _ = run_child(
                    CLI + ["-q", "--warehouse", str(wh), "train", family, "--device", "cpu"]
                )
                runs[family].append((wall, cpu, last_fit_seconds(wh, family)))
        med = {f: [statistics.median(x[k] for x in runs[f]) for k in range(3)] for f in families}
        print(f"after the fits: {load()}", flush=True)
        print(
            f"\nml-latest-small, `batchrec train FAMILY` (every interaction, defaults), median of {args.repeat}; "
            f"quality: defaults on user_temporal, test part"
        )
        print(
            f"{'family':<13}{'wall s':>8}{'CPU s':>8}{'fit s':>8}{'x mf wall':>10}{'x mf CPU':>10}"
            f"{'  quality':<20}{'epochs':>7}{'fit s':>7}"
        )
        for family in families:
            wall, cpu, fit = med[family]
            q = ""
            if not args.no_quality:
                _, _, out = run_child([sys.executable, __file__, "--quality", str(wh), family])
                res = json.loads(out.strip().splitlines()[-1])
                q = f"  {res['metric']} {res['value']:.4f}", res["epochs"], res["fit_s"]
            quality_cols = f"{q[0]:<20}{q[1]:>7}{q[2]:>7.1f}" if q else ""
            print(
                f"{family:<13}{wall:>8.1f}{cpu:>8.1f}{fit:>8.1f}{wall / med['mf'][0]:>10.1f}{cpu / med['mf'][1]:>10.1f}"
                f"{quality_cols}",
                flush=True,
            )
        print(f"after: {load()}")


def one_epoch_fit(wh: str, family: str, epochs: int) -> None:
    """Child process (--per-epoch): fit one family on the snapshot, print one JSON line."""
    from batchrec.data import load_snapshot
    from batchrec.features import latest_snapshot_id
    from batchrec.train import fit_model
    from batchrec.warehouse import Warehouse

    with Warehouse(Path(wh)).connect(read_only=True) as con:
        data = load_snapshot(con, latest_snapshot_id(con), None)
    t0 = time.perf_counter()
    _, trainer = fit_model(
        family,
        data,
        {"epochs": epochs, "fixed_epochs": epochs} if family != "mf" else {"epochs": epochs},
        device="cpu",
        progress=False,
    )
    epoch_s = [row["seconds"] for row in trainer.history]
    print(
        json.dumps(
            {
                "family": family,
                "rows": len(data.train),
                "users": data.n_users,
                "items": data.n_items,
                "epoch_s": sum(epoch_s) / len(epoch_s),
                "fit_s": time.perf_counter() - t0,
                "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            }
        )
    )


def per_epoch(args) -> None:
    print(machine())
    with tempfile.TemporaryDirectory(prefix="bench_neural_") as tmp:
        print(f"{'dataset':<24}{'family':<13}{'rows':>10}{'s/epoch':>10}{'x mf':>8}{'peak RSS MB':>13}")
        for name in ("ml-latest-small", f"synth-{args.ratings // 1000}k"):
            wh = build_warehouse(Path(tmp), name, args)
            baseline = None
            for family in ["mf"] + [f for f in args.families.split(",") if f != "mf"]:
                _, _, out = run_child(
                    [sys.executable, __file__, "--one", str(wh), family, "--epochs", str(args.epochs)]
                )
                r = json.loads(out.strip().splitlines()[-1])
                baseline = baseline or r["epoch_s"]
                print(
                    f"{name:<24}{family:<13}{r['rows']:>10}{r['epoch_s']:>10.2f}{r['epoch_s'] / baseline:>8.1f}"
                    f"{r['peak_rss_mb']:>13.0f}",
                    flush=True,
                )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--families", default=",".join(FAMILIES), help="comma-separated; mf always runs (the baseline)"
    )
    ap.add_argument(
        "--repeat", type=int, default=3, help="alternating runs of every default fit (medians shown)"
    )
    ap.add_argument("--no-quality", action="store_true", help="skip the user_temporal quality fits")
    ap.add_argument(
        "--per-epoch", action="store_true", help="seconds per epoch on ml-latest-small and a synthetic set"
    )
    ap.add_argument("--ratings", type=int, default=1_000_000)
    ap.add_argument("--users", type=int, default=7_000)
    ap.add_argument("--items", type=int, default=5_000)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--one", nargs=2, metavar=("WAREHOUSE", "FAMILY"), help=argparse.SUPPRESS)
    ap.add_argument("--quality", nargs=2, metavar=("WAREHOUSE", "FAMILY"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        one_epoch_fit(args.one[0], args.one[1], args.epochs)
    elif args.quality:
        quality(*args.quality)
    elif args.per_epoch:
        per_epoch(args)
    else:
        default_fits(args)


if __name__ == "__main__":
    main()
