"""Feature snapshot at scale: seconds and peak RSS of a whole snapshot (all six protocols), and
the ratio against the floor, a bare DuckDB `SELECT user_id, count(*), avg(rating) FROM ratings
GROUP BY user_id` over the same ratings in the same warehouse.

    python bench/bench_features.py [--data /tmp/synth20m] [--work /tmp/bench_features]

DATA is a MovieLens-format directory (ratings.csv, movies.csv, tags.csv), e.g. the 20M-rating
synthetic set: `batchrec synth /tmp/synth20m --users 138493 --items 26744 --ratings 20000000
--tags 1000000`. Its raw tables are loaded once with DuckDB read_csv (not timed) into
WORK/raw.duckdb; every measurement starts from a fresh copy of it and runs in its own subprocess,
so the peak RSS reported is that process's own (os.wait4), without OPENBLAS_CORETYPE /
OPENBLAS_L2_SIZE (bench/_common.py); `--repeat` rounds of (floor, features), the order
alternating, and the medians compared. Targets (issue 4, 2 cores): under 60 s and under 6 GB for
20M ratings.

    python bench/bench_features.py --repeat 3      # ~4 min on 2 idle cores
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import alternate, clean_env, describe, load_line, median, reexec_clean, runtime  # noqa: E402

GROUP_BY = "SELECT user_id, count(*), avg(rating) FROM ratings GROUP BY user_id"


def load_raw(data: Path, target: Path) -> None:
    from batchrec.warehouse import Warehouse

    staging = target.with_name(target.name + ".loading")
    staging.unlink(missing_ok=True)
    with Warehouse(staging).writer("bench") as con:
        con.execute(f"""INSERT INTO ratings SELECT userId, movieId, rating, make_timestamp(timestamp * 1000000),
                        0 FROM read_csv('{data / "ratings.csv"}')""")
        con.execute(f"""INSERT INTO tags SELECT userId, movieId, tag, make_timestamp(timestamp * 1000000),
                        0 FROM read_csv('{data / "tags.csv"}', quote = '"')""")
        con.execute(f"""INSERT INTO items SELECT movieId, title,
                        try_cast(regexp_extract(title, '\\((\\d{{4}})\\)\\s*$', 1) AS INTEGER),
                        CASE WHEN genres = '(no genres listed)' THEN []::VARCHAR[] ELSE string_split(genres, '|') END,
                        0 FROM read_csv('{data / "movies.csv"}', quote = '"')""")
    staging.rename(target)
    staging.with_name(staging.name + ".lock").unlink(missing_ok=True)


def child(kind: str, path: str) -> None:
    """Runs in the measured subprocess; prints one JSON line."""
    started = time.perf_counter()
    if kind == "floor":
        import duckdb

        con = duckdb.connect(path, read_only=True)
        started = time.perf_counter()
        rows = len(con.execute(GROUP_BY).fetchall())
        summary = f"{rows} groups"
    else:
        import logging

        from batchrec.features import build_snapshot

        logging.basicConfig(level=logging.INFO, format="  %(message)s")  # the per-step breakdown, on stderr
        from batchrec.warehouse import Warehouse

        summary = build_snapshot(Warehouse(path), protocols="all")
    print(json.dumps({"seconds": time.perf_counter() - started, "summary": summary, "runtime": runtime()}))


def measure(kind: str, raw: Path, work: Path) -> dict:
    run = work / "run.duckdb"
    run.unlink(missing_ok=True)
    shutil.copyfile(raw, run)
    proc = subprocess.Popen(
        [sys.executable, __file__, "--child", kind, str(run)],
        stdout=subprocess.PIPE,
        text=True,
        env=clean_env(),
    )
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        raise SystemExit(f"{kind} run failed (status {status})")
    result = json.loads(out.strip().splitlines()[-1])
    result.update(cpu=usage.ru_utime + usage.ru_stime, rss_gb=usage.ru_maxrss * 1024 / 1e9)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("/tmp/synth20m"))
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench_features"))
    parser.add_argument("--repeat", type=int, default=3, help="rounds of (floor, features), alternating")
    parser.add_argument("--child", nargs=2, metavar=("KIND", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(*args.child)
    reexec_clean()
    if not (args.data / "ratings.csv").exists():
        raise SystemExit(
            f"no {args.data / 'ratings.csv'}: make it with "
            f"`batchrec synth {args.data} --users 138493 --items 26744 --ratings 20000000 --tags 1000000`"
        )
    args.work.mkdir(parents=True, exist_ok=True)
    raw = args.work / "raw.duckdb"
    if not raw.exists():
        started = time.perf_counter()
        load_raw(args.data, raw)
        print(
            f"loaded raw tables from {args.data} in {time.perf_counter() - started:.1f} s (not timed below)"
        )

    got = alternate(
        args.repeat,
        {
            "floor": lambda: measure("floor", raw, args.work),
            "features": lambda: measure("features", raw, args.work),
        },
    )
    for leftover in ("run.duckdb", "run.duckdb.lock"):
        (args.work / leftover).unlink(missing_ok=True)
    floor = {k: median([r[k] for r in got["floor"]]) for k in ("seconds", "cpu")}
    features = {k: median([r[k] for r in got["features"]]) for k in ("seconds", "cpu")}
    rss = max(r["rss_gb"] for r in got["features"])
    print(
        f"floor  (bare GROUP BY user_id, median of {args.repeat}): {floor['seconds']:6.2f} s  cpu {floor['cpu']:.1f} s  "
        f"({got['floor'][0]['summary']})"
    )
    print(
        f"features (whole snapshot, all protocols, median of {args.repeat}):  {features['seconds']:6.2f} s  "
        f"cpu {features['cpu']:.1f} s  peak RSS {rss:.2f} GB"
    )
    print(f"  {got['features'][0]['summary']}")
    ratios = [f["seconds"] / fl["seconds"] for f, fl in zip(got["features"], got["floor"])]
    print(
        f"ratio features / floor: {median(ratios):.1f}x wall (median of {len(ratios)} alternating rounds), "
        f"{features['cpu'] / floor['cpu']:.1f}x cpu   {describe(got['features'][0]['runtime'])}; {load_line()}"
    )
    print(
        f"targets: < 60 s {'met' if features['seconds'] < 60 else 'MISSED'}, "
        f"< 6 GB {'met' if rss < 6 else 'MISSED'}"
    )


if __name__ == "__main__":
    main()
