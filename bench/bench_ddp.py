"""`batchrec train --nproc 2` (torch DDP, gloo, CPU) against one process, in the same run: seconds
per epoch and their ratio, peak RSS of the largest process; with `--quality`, the test NDCG@10 /
RMSE of the 2-process fit against the 1-process fit on the user_temporal protocol.

Every fit is a real `batchrec train` command on a warehouse built by the real pipeline
(ml-latest-small, or `--ratings N` for a synthetic MovieLens-format set from `batchrec synth`).
Speed: fits on every interaction (no validation part: an epoch is training only), `--epochs`
epochs, seconds per epoch the mean of rank 0's epochs after the first (the trainer's log in
`model_runs`). Threads matter more than anything on a shared 2-core machine, so the baseline
runs twice: one process with all the cores' threads and with one thread; the two DDP ranks get
cores / 2 threads each (what `--nproc` sets). Peak RSS: the largest process of the command
(RUSAGE_CHILDREN), i.e. one rank (each holds the data and a model replica).
Quality: protocol runs with the same parameters, each rank's random streams derived from the
run's seed, measured by `batchrec evaluate` on the test part; target |delta NDCG@10| <= 0.002
(ranking families), |delta RMSE| <= 0.005 (rating families).

    .venv/bin/python bench/bench_ddp.py [--families multvae,neumf] [--epochs 3] [--ratings 1000000]
    .venv/bin/python bench/bench_ddp.py --quality [--spread] [--param multvae:ensemble=1 ...]
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

CLI = [str(Path(sys.executable).parent / "batchrec")]  # the console script of this environment
RANKING, RATING = ("multvae", "two_tower"), ("neumf", "autorec", "content_dnn")


def build_warehouse(root: Path, args) -> Path:
    wh = root / "batchrec.duckdb"
    base = CLI + ["--warehouse", str(wh)]
    if args.ratings:
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
    else:
        steps = [base + ["ingest", "--dataset", "ml-latest-small"]]
    for cmd in steps + [base + ["features", "--protocols", "user_temporal"]]:
        subprocess.run(cmd, check=True, capture_output=True)
    return wh


def train(wh: Path, family: str, nproc: int, threads: int, params: list[str], protocol: str | None) -> dict:
    """One `batchrec train` in a child that reports the command's peak RSS; returns the run row."""
    argv = CLI + [
        "-q",
        "--warehouse",
        str(wh),
        "train",
        family,
        "--nproc",
        str(nproc),
        "--device",
        "cpu",
        *(["--protocol", protocol] if protocol else []),
        *(f"--param={p}" for p in params),
    ]
    env = os.environ | {"OMP_NUM_THREADS": str(threads)}
    out = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(argv)],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    peak_mb = float(out.stdout.strip().splitlines()[-1])
    run_id = out.stdout.split("run ", 1)[1].split(":", 1)[0]
    query = f"SELECT metrics, fit_seconds FROM model_runs WHERE run_id = '{run_id}'"
    shown = subprocess.run(
        CLI + ["--warehouse", str(wh), "sql", query, "--format", "csv"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    row = next(csv.DictReader(io.StringIO(shown)))
    history = [h for h in json.loads(row["metrics"])["history"] if not h.get("member")]
    later = [h["seconds"] for h in history[1:]] or [history[0]["seconds"]]
    return {
        "run_id": run_id,
        "epoch_s": sum(later) / len(later),
        "epochs": len(history),
        "fit_s": float(row["fit_seconds"]),
        "peak_mb": peak_mb,
    }


def child(argv: list[str]) -> None:
    """Run the command (its output through), then print the peak RSS of its largest process."""
    done = subprocess.run(argv, text=True, capture_output=True)
    sys.stderr.write(done.stderr)
    if done.returncode:
        sys.exit(done.returncode)
    print(done.stdout.strip())
    print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)


def speed(wh: Path, args, extra: dict[str, list[str]]) -> None:
    cores = os.cpu_count() or 1
    configs = [
        (f"1 process, {cores} threads", 1, cores),
        ("1 process, 1 thread", 1, 1),
        (f"2 processes, {max(1, cores // 2)} thread(s) each", 2, max(1, cores // 2)),
    ]
    print(f"{'family':<10}{'configuration':<32}{'s/epoch':>9}{'fit s':>8}{'peak RSS MB':>13}")
    for family in args.families.split(","):
        params = [f"epochs={args.epochs}", *extra.get(family, [])]
        results = []
        for label, nproc, threads in configs:
            r = train(wh, family, nproc, threads, params, None)
            results.append(r)
            print(
                f"{family:<10}{label:<32}{r['epoch_s']:>9.2f}{r['fit_s']:>8.1f}{r['peak_mb']:>13.0f}",
                flush=True,
            )
        ddp = results[-1]["epoch_s"]
        print(
            f"{family:<10}DDP 2 / 1 process s/epoch: {ddp / results[0]['epoch_s']:.2f} (vs {cores} threads), "
            f"{ddp / results[1]['epoch_s']:.2f} (vs 1 thread)",
            flush=True,
        )


def _test_metric(wh: Path, family: str, run_ids: list[str]) -> tuple[str, float, list[float]]:
    """(metric name, target, test values of the runs) from `batchrec evaluate` on user_temporal."""
    subprocess.run(
        CLI
        + [
            "-q",
            "--warehouse",
            str(wh),
            "evaluate",
            "--runs",
            ",".join(run_ids),
            "--protocol",
            "user_temporal",
            "--k",
            "10",
            "--report",
            str(wh.parent / "report"),
        ],
        check=True,
        capture_output=True,
    )
    metric, k, target = ("ndcg", 10, 0.002) if family in RANKING else ("rmse", 0, 0.005)
    quoted = ", ".join(f"'{r}'" for r in run_ids)
    query = (
        f"SELECT run_id, value FROM evaluations WHERE metric = '{metric}' AND coalesce(k, 0) = {k} "
        f"AND run_id IN ({quoted})"
    )
    out = (
        subprocess.run(
            CLI + ["--warehouse", str(wh), "sql", query, "--format", "csv"],
            check=True,
            capture_output=True,
            text=True,
        )
        .stdout.strip()
        .splitlines()[1:]
    )
    value = {line.split(",")[0]: float(line.split(",")[1]) for line in out}
    return (f"{metric}@{k}" if k else metric), target, [value[r] for r in run_ids]


def quality(wh: Path, args, extra: dict[str, list[str]]) -> None:
    """1 process against 2 on the test part; with --spread, also 1 process with seed=1: how far
    two seeds of one process land apart, the noise any change of random streams brings."""
    cores = os.cpu_count() or 1
    print(
        f"{'family':<10}{'metric':<9}{'1 process':>11}{'2 processes':>13}{'delta':>9}{'target':>8}"
        f"{'seed-1 delta':>14}  epochs (1 / 2)"
    )
    for family in args.families.split(","):
        params = extra.get(family, [])
        fits = [
            train(wh, family, 1, 1, params, "user_temporal"),
            train(wh, family, 2, max(1, cores // 2), params, "user_temporal"),
        ]
        if args.spread:
            fits.append(train(wh, family, 1, 1, [*params, "seed=1"], "user_temporal"))
        print(f"{family:<10}runs: {', '.join(f['run_id'] for f in fits)}", flush=True)
        name, target, values = _test_metric(wh, family, [f["run_id"] for f in fits])
        a, b = values[0], values[1]
        spread = f"{values[2] - a:>+14.4f}" if args.spread else f"{'':>14}"
        print(
            f"{family:<10}{name:<9}{a:>11.4f}{b:>13.4f}{b - a:>+9.4f}{target:>8.3f}{spread}  "
            f"{fits[0]['epochs']} / {fits[1]['epochs']} {'ok' if abs(b - a) <= target else 'MISSED'}",
            flush=True,
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--families", default="multvae,neumf")
    ap.add_argument("--epochs", type=int, default=3, help="speed: epochs per fit")
    ap.add_argument(
        "--ratings",
        type=int,
        default=0,
        help="a synthetic set of this many ratings instead of ml-latest-small",
    )
    ap.add_argument("--users", type=int, default=7_000)
    ap.add_argument("--items", type=int, default=5_000)
    ap.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="FAMILY:KEY=VALUE",
        help="a model parameter for one family (repeatable), e.g. multvae:ensemble=1",
    )
    ap.add_argument(
        "--quality", action="store_true", help="compare test metrics of 1 and 2 processes instead"
    )
    ap.add_argument(
        "--spread", action="store_true", help="quality: also fit one process with seed=1 (the noise floor)"
    )
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(json.loads(args.child))
        return
    extra: dict[str, list[str]] = {}
    for item in args.param:
        family, _, kv = item.partition(":")
        extra.setdefault(family, []).append(kv)
    with tempfile.TemporaryDirectory(prefix="bench_ddp_") as tmp:
        wh = build_warehouse(Path(tmp), args)
        (quality if args.quality else speed)(wh, args, extra)


if __name__ == "__main__":
    main()
