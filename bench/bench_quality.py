"""Quality of every available family with its defaults on ml-latest-small, protocol user_temporal,
measured like for like (fit on the train part, early stopping on valid, test history = train)
with `batchrec.metrics.evaluate_model`, next to the issue's reference numbers.

    python bench/bench_quality.py [--models mf,svd] [--warehouse PATH] [--threads N]
                                  [--shifted] [--seeds 0,1,2] [--param two_tower:dim=256 ...]

`--shifted` measures on the protocol moved back one window (`batchrec.data.shifted_back`), the
split the neural families' parameters are chosen on: it never reads the test part. `--seeds`
averages the metrics over seeds (families without a seed fit once).

Data: the latest snapshot of `--warehouse` when given (built by `batchrec features`), else the
test fixture's loader (same rules as the feature store). Prints one row per family and the
NDCG@10 ratio to our most-popular, measured in the same run.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import describe, reexec_clean  # noqa: E402

from batchrec.data import shifted_back  # noqa: E402
from batchrec.metrics import evaluate_model  # noqa: E402
from batchrec.models import available, get_model_class, parse_params  # noqa: E402
from batchrec.train import fit_model  # noqa: E402

# The references on exactly this split (RMSE over the 8,886 known pairs; NDCG@10).
REFERENCE_RMSE = {"svd": ("tuned SVD", 0.879), "mf": ("tuned SVD", 0.879)}
REFERENCE_NDCG = {
    "ease": ("EASE", 0.0802),
    "ials": ("implicit ALS", 0.0707),
    "bpr": ("BPR", 0.0519),
    "itemknn": ("item-kNN", 0.0511),
    "popularity": ("most-popular", 0.0464),
}
OTHER_REFERENCES = "other references: SVD++ RMSE 0.880, kNN-baseline 0.888, baseline-only 0.899"


def load_data(warehouse: str | None):
    if warehouse is None:
        from tests.conftest import load_ml_small

        return load_ml_small("user_temporal"), "tests.conftest.load_ml_small"
    from batchrec.data import load_snapshot
    from batchrec.features import resolve_snapshot
    from batchrec.warehouse import Warehouse

    with Warehouse(warehouse).connect(read_only=True) as con:
        snapshot_id = resolve_snapshot(con, "latest")
        return load_snapshot(con, snapshot_id, "user_temporal"), f"snapshot {snapshot_id} of {warehouse}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=None, help="comma-separated families [default: every available one]")
    ap.add_argument("--warehouse", default=None, help="read the latest snapshot of this warehouse")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument(
        "--shifted", action="store_true", help="the protocol moved back one window (no test part)"
    )
    ap.add_argument("--seeds", default="0", help="comma-separated seeds to average over [default: 0]")
    ap.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="FAMILY:KEY=VALUE",
        help="a parameter of one family (repeatable)",
    )
    args = ap.parse_args()
    reexec_clean(args.threads)
    if args.threads:
        torch.set_num_threads(args.threads)
    names = args.models.split(",") if args.models else [n for n in available()]
    data, source = load_data(args.warehouse)
    if args.shifted:
        data, source = shifted_back(data), f"{source}, shifted back one window"
    params: dict[str, list[str]] = {}
    for item in args.param:
        family, _, pair = item.partition(":")
        params.setdefault(family, []).append(pair)
    seeds = [int(s) for s in args.seeds.split(",")]
    print(f"data: {source}; {len(data.train)}/{len(data.valid)}/{len(data.test)} rows; {describe()}")
    rows = []
    for name in names:
        given = parse_params(name, params.get(name, []))
        seeded = get_model_class(name).seed_param
        runs = []
        t0 = time.perf_counter()
        for seed in seeds if seeded else seeds[:1]:
            model, _ = fit_model(name, data, given | ({"seed": seed} if seeded else {}))
            runs.append(evaluate_model(model, data, ks=(10,)))
        fit_s = (time.perf_counter() - t0) / len(runs)
        rows.append((name, {k: sum(r[k] for r in runs) / len(runs) for k in runs[0]}, fit_s))
        print(f"  fitted {name} {len(runs)}x, {fit_s:.1f} s each", flush=True)
    pop = next((m["ndcg@10"] for n, m, _ in rows if n == "popularity"), None)
    head = (
        f"{'model':<12}{'RMSE':>8}{'n_known':>9}{'NDCG@10':>9}{'Recall@10':>10}{'P@10':>8}{'fit s':>8}"
        f"{'NDCG/pop':>10}  reference"
    )
    print(head)
    print("-" * len(head))
    for name, m, fit_s in rows:
        rmse = f"{m['rmse']:.4f}" if "rmse" in m else "-"
        known = f"{int(m['n_known'])}" if "n_known" in m else "-"
        ratio = f"{m['ndcg@10'] / pop:.2f}" if pop else "-"
        refs = []  # the references are test figures: none beside the shifted protocol's
        if name in REFERENCE_RMSE and "rmse" in m and not args.shifted:
            refs.append(f"RMSE {REFERENCE_RMSE[name][0]} {REFERENCE_RMSE[name][1]}")
        if name in REFERENCE_NDCG and not args.shifted:
            refs.append(f"NDCG {REFERENCE_NDCG[name][0]} {REFERENCE_NDCG[name][1]}")
        print(
            f"{name:<12}{rmse:>8}{known:>9}{m['ndcg@10']:>9.4f}{m['recall@10']:>10.4f}{m['precision@10']:>8.4f}"
            f"{fit_s:>8.1f}{ratio:>10}  {'; '.join(refs)}"
        )
    if args.shifted:
        return
    print(OTHER_REFERENCES)
    print(
        "targets: best mf/svd RMSE <= 0.870; best of ease/ials/bpr NDCG@10 >= 0.085; every family > popularity"
    )


if __name__ == "__main__":
    main()
