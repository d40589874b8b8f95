"""Neural families on CPU: training seconds per epoch and peak memory, against biased MF (`mf`)
trained on the same data in the same run (the ratio column).

Two datasets go through the real pipeline (ingest -> features -> load_snapshot, every
interaction as training data): ml-latest-small, and a synthetic MovieLens-format set from
`batchrec synth` (default 1M ratings, 7,000 users x 5,000 items, with genres and tags, a few
minutes in all). One epoch of every family fits in ten minutes on one thread up to about 5M
ratings (`--ratings 5000000 --users 35000 --items 13000 --epochs 1`, about 15 minutes in all); at
10M and at the ML-20M shape neumf's single epoch took longer than that. Each (dataset, family) fit runs
in its own process, so its peak RSS is its own, with the family's defaults except `--epochs`
epochs and no validation part (an epoch is training only). Seconds per epoch is the mean over
the epochs, from the trainer's log; for the families that fit an ensemble (two_tower, multvae:
`ensemble`, default 4) it is one member's epoch, and a fit costs ensemble x epochs of them. One
torch thread per fit by default: on the shared 2-core machine two threads ran every family about
3x slower (threads spinning against other jobs).

    .venv/bin/python bench/bench_neural.py [--ratings 1000000] [--users 7000] [--items 5000] [--epochs 2] [--threads 1] [--families two_tower]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import clean_env, describe, reexec_clean  # noqa: E402

FAMILIES = ("mf", "neumf", "autorec", "two_tower", "multvae", "content_dnn")  # mf first: the baseline
CLI = [str(Path(sys.executable).parent / "batchrec")]  # the console script of this environment


def build_warehouse(root: Path, name: str, args) -> Path:
    """A warehouse with one feature snapshot of ml-latest-small or of a fresh synthetic set."""
    wh = root / name / "batchrec.duckdb"
    base = CLI + ["--warehouse", str(wh)]
    if name == "ml-latest-small":
        steps = [base + ["ingest", "--dataset", "ml-latest-small"]]
    else:
        raw = root / "synth-raw"
        steps = [CLI + ["synth", str(raw), "--ratings", str(args.ratings), "--users", str(args.users),
                        "--items", str(args.items)], base + ["ingest", str(raw)]]
    for cmd in steps + [base + ["features", "--protocols", "random"]]:
        subprocess.run(cmd, check=True, capture_output=True)
    return wh


def one_fit(wh: str, family: str, epochs: int, threads: int) -> None:
    """Child process: fit one family on the snapshot, print one JSON line."""
    import torch

    from batchrec.data import load_snapshot
    from batchrec.features import latest_snapshot_id
    from batchrec.train import fit_model
    from batchrec.warehouse import Warehouse

    torch.set_num_threads(threads)
    with Warehouse(Path(wh)).connect(read_only=True) as con:
        data = load_snapshot(con, latest_snapshot_id(con), None)
    t0 = time.perf_counter()
    _, trainer = fit_model(family, data, {"epochs": epochs}, device="cpu", progress=False)
    epoch_s = [row["seconds"] for row in trainer.history]
    print(json.dumps({"family": family, "rows": len(data.train), "users": data.n_users, "items": data.n_items,
                      "epoch_s": sum(epoch_s) / len(epoch_s), "fit_s": time.perf_counter() - t0,
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ratings", type=int, default=1_000_000)
    ap.add_argument("--users", type=int, default=7_000)
    ap.add_argument("--items", type=int, default=5_000)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--families", default=",".join(FAMILIES), help="comma-separated; mf always runs (the baseline)")
    ap.add_argument("--one", nargs=2, metavar=("WAREHOUSE", "FAMILY"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        one_fit(args.one[0], args.one[1], args.epochs, args.threads)
        return
    reexec_clean()
    print(f"{describe()}; each fit's process: torch threads {args.threads}", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench_neural_") as tmp:
        print(f"{'dataset':<24}{'family':<13}{'rows':>10}{'s/epoch':>10}{'x mf':>8}{'peak RSS MB':>13}")
        for name in ("ml-latest-small", f"synth-{args.ratings // 1000}k"):
            wh = build_warehouse(Path(tmp), name, args)
            baseline = None
            for family in ["mf"] + [f for f in args.families.split(",") if f != "mf"]:
                out = subprocess.run([sys.executable, __file__, "--one", str(wh), family, "--epochs", str(args.epochs),
                                      "--threads", str(args.threads)], check=True, capture_output=True, text=True,
                                     env=clean_env())
                r = json.loads(out.stdout.strip().splitlines()[-1])
                baseline = baseline or r["epoch_s"]
                print(f"{name:<24}{family:<13}{r['rows']:>10}{r['epoch_s']:>10.2f}{r['epoch_s'] / baseline:>8.1f}"
                      f"{r['peak_rss_mb']:>13.0f}", flush=True)


if __name__ == "__main__":
    main()
