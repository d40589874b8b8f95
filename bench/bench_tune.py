"""`batchrec tune` on ml-latest-small: validation and test NDCG@10 of each family's defaults against
its tuned setting, per protocol, with the trials and wall time each study took.

    python bench/bench_tune.py [--families ease,ials,mf,multvae] [--protocols user_temporal,random]
                               [--trials 16] [--timeout 900] [--seed 0] [--warehouse PATH]
                               [--param multvae:ensemble=1 ...]

Each study runs `batchrec.tune.tune` (the command's function: trial 0 the defaults, TPE, median
pruning) on the protocol's valid part; the test part is read only after the study has finished,
to report: the defaults and the tuned setting are each fitted once more on the
protocol's train part (early stopping on valid, as `batchrec evaluate` fits them) and measured on
test. `--param FAMILY:KEY=VALUE` holds a parameter fixed in the study and in both test fits (the
defaults row is then "defaults + that"). Prints one row per study and the tuned/defaults ratio of
each figure, measured in the same run (the table so far after each study).

The warehouse (ingested and split by the script when it does not exist; default a fresh temporary
one) keeps the studies: run again with the same `--warehouse` and a killed run resumes them.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from batchrec.data import load_snapshot  # noqa: E402
from batchrec.features import build_snapshot, resolve_snapshot  # noqa: E402
from batchrec.ingest import ingest_path  # noqa: E402
from batchrec.metrics import evaluate_model  # noqa: E402
from batchrec.models import parse_params  # noqa: E402
from batchrec.train import fit_model  # noqa: E402
from batchrec.tune import tune  # noqa: E402
from batchrec.warehouse import Warehouse  # noqa: E402

METRIC = "ndcg@10"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--families", default="ease,ials,mf,multvae")
    ap.add_argument("--protocols", default="user_temporal,random")
    ap.add_argument("--trials", type=int, default=16, help="trials per study")
    ap.add_argument(
        "--timeout", type=float, default=900.0, help="seconds per study after which no trial starts"
    )
    ap.add_argument("--seed", type=int, default=0, help="sampler seed")
    ap.add_argument("--warehouse", default=None, help="warehouse file [default: a fresh temporary one]")
    ap.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="FAMILY:KEY=VALUE",
        help="held fixed for that family (repeatable)",
    )
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(asctime)s %(message)s")
    logging.getLogger("batchrec.tune").setLevel(logging.INFO)  # one line per finished trial
    families, protocols = args.families.split(","), args.protocols.split(",")
    fixed: dict[str, list[str]] = {}
    for item in args.param:
        family, _, pair = item.partition(":")
        fixed.setdefault(family, []).append(pair)

    path = (
        Path(args.warehouse)
        if args.warehouse
        else Path(tempfile.mkdtemp(prefix="bench_tune_")) / "batchrec.duckdb"
    )
    wh = Warehouse(path)
    if not path.exists():
        ingest_path(wh, dataset="ml-latest-small")
        build_snapshot(wh, protocols=",".join(protocols))
    print(
        f"warehouse {path}; {args.trials} trials or {args.timeout:.0f} s per study, seed {args.seed}, "
        f"metric {METRIC}",
        flush=True,
    )

    header = (
        f"{'family':8s} {'protocol':14s} {'trials':>6s} {'pruned':>6s} {'wall s':>7s} | "
        f"{'valid def':>9s} {'tuned':>7s} {'ratio':>6s} | {'test def':>8s} {'tuned':>7s} {'ratio':>6s}"
    )
    rows = []
    for family in families:
        for protocol in protocols:
            result = tune(
                wh,
                family,
                protocol,
                args.trials,
                args.timeout,
                METRIC,
                args.seed,
                params=fixed.get(family, []),
            )
            print(f"  {result.summary()}", flush=True)
            # Only now, with this study finished, is the test part read: for the report.
            rows.append(_report(wh, result, parse_params(family, tuple(fixed.get(family, [])))))
            print(f"{header}\n" + "\n".join(rows), flush=True)
    print(
        f"(tuned setting chosen on valid {METRIC} only; test read after each study; {time.strftime('%Y-%m-%d %H:%M')})"
    )


def _report(wh: Warehouse, r, base: dict) -> str:
    """One table row: the study's figures, and the test figure of the defaults (+ fixed) and of
    the tuned setting, each fitted on the protocol's train part as `batchrec evaluate` fits it."""
    with wh.connect(read_only=True) as con:
        data = load_snapshot(con, resolve_snapshot(con, "latest"), r.protocol)
    tests = []
    for params in (base, r.best_params):
        model, _ = fit_model(r.family, data, params, progress=False)
        tests.append(evaluate_model(model, data, ks=(10,))[METRIC])
        del model
    default = r.default_value if r.default_value is not None else float("nan")  # trial 0 pruned or failed
    return (
        f"{r.family:8s} {r.protocol:14s} {r.trials:6d} {r.pruned:6d} {r.seconds:7.0f} | "
        f"{default:9.4f} {r.best_value:7.4f} {r.best_value / default:6.3f} | "
        f"{tests[0]:8.4f} {tests[1]:7.4f} {tests[1] / tests[0]:6.3f}"
    )


if __name__ == "__main__":
    main()
