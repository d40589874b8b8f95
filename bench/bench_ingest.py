"""Ingest speed and memory against DuckDB's own bare read of the same ratings file.

    python bench/bench_ingest.py                       # synthetic ml-20m shape (20M ratings)
    python bench/bench_ingest.py --ratings 1000000     # smaller synthetic run
    python bench/bench_ingest.py --data path/to/ml-20m # any MovieLens-format directory

In one run, each side in its own process (so peak RSS is its own, read with wait4):
  floor:  `CREATE TABLE ratings AS SELECT * FROM read_csv('ratings.csv')` into a fresh DuckDB file
          (run with preserve_insertion_order on and off; the faster counts)
  ingest: `batchrec ingest DIR` into a fresh warehouse (ratings + movies + tags: detection,
          checksums, validation, merge, ingest_log)
Both are timed as whole processes (interpreter start, imports, close/checkpoint included) after
the files are in the page cache; with --repeat N the best of N runs of each side is compared.
CPU seconds (user + system, all threads) are printed too: on a shared machine they are steadier
than wall time. Every measured process runs without OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE
(bench/_common.py); the two sides alternate their order run by run and the medians over
`--repeat` runs (default 3) are compared. Targets: ingest / floor <= 1.5, ingest peak RSS < 4 GB.

    python bench/bench_ingest.py --repeat 3         # ~3 min on 2 idle cores (+ a one-off ~1 min to generate)
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import clean_env, describe, load_line, median, reexec_clean  # noqa: E402

FLOOR = """
import sys, duckdb
con = duckdb.connect(sys.argv[1])
con.execute("SET preserve_insertion_order = " + sys.argv[3])
con.execute("SET enable_progress_bar = false")
con.execute("CREATE TABLE ratings AS SELECT * FROM read_csv(?)", [sys.argv[2]])
print(con.execute("SELECT count(*) FROM ratings").fetchall()[0][0])
con.close()
"""


def run_measured(cmd: list[str]) -> tuple[float, float, float, str]:
    """(wall seconds, CPU seconds, peak RSS in GiB, stdout) of one child process."""
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=clean_env())
    out, err = proc.stdout.read(), proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err}")
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 2**20, out  # ru_maxrss is KiB on Linux


def synthetic(args) -> Path:
    from batchrec.synth import write_synthetic

    name = f"synth-u{args.users}-i{args.items}-r{args.ratings}-t{args.tags}-s{args.seed}"
    out = Path(args.cache) / name
    if not (out / "ratings.csv").exists():
        print(f"generating {out} ...", flush=True)
        print(
            write_synthetic(
                out,
                n_users=args.users,
                n_items=args.items,
                n_ratings=args.ratings,
                n_tags=args.tags,
                seed=args.seed,
            ),
            flush=True,
        )
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, help="MovieLens-format directory (default: synthetic data)")
    p.add_argument("--users", type=int, default=138_493)
    p.add_argument("--items", type=int, default=27_278)
    p.add_argument("--ratings", type=int, default=20_000_263)
    p.add_argument("--tags", type=int, default=465_564)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--cache",
        default=os.path.join(tempfile.gettempdir(), "batchrec-bench"),
        help="where synthetic datasets are kept between runs",
    )
    p.add_argument(
        "--repeat", type=int, default=3, help="runs of each side, alternating; the medians are compared"
    )
    args = p.parse_args()
    reexec_clean()

    data = args.data or synthetic(args)
    ratings = data / "ratings.csv"
    for f in data.iterdir():  # into the page cache, so neither side pays for the disk
        with open(f, "rb") as fh:
            while fh.read(1 << 24):
                pass
    size = sum(f.stat().st_size for f in data.iterdir()) / 2**20
    print(f"data: {data} ({size:,.0f} MiB; ratings.csv {ratings.stat().st_size / 2**20:,.0f} MiB)")

    floors, ingests, counts = [], [], {}
    with tempfile.TemporaryDirectory(
        prefix="bench-ingest-", dir=args.cache if Path(args.cache).exists() else None
    ) as tmp:

        def floor_side() -> None:
            db = Path(tmp) / "floor.duckdb"
            both = []
            for keep_order in ("true", "false"):  # the floor is the faster of DuckDB's two modes
                wall, cpu, rss, out = run_measured(
                    [sys.executable, "-c", FLOOR, str(db), str(ratings), keep_order]
                )
                both.append((wall, cpu, rss))
                counts["floor"] = int(out.strip())
                db.unlink()
            floors.append(min(both))

        def ingest_side() -> None:
            import duckdb

            wh = Path(tmp) / "wh" / "batchrec.duckdb"
            ingests.append(
                run_measured(
                    [
                        sys.executable,
                        "-c",
                        "from batchrec.cli import main; main()",
                        "-q",
                        "--warehouse",
                        str(wh),
                        "ingest",
                        str(data),
                    ]
                )[:3]
            )
            with duckdb.connect(str(wh), read_only=True) as con:
                counts["ingest"] = con.execute("SELECT count(*) FROM ratings").fetchall()[0][0]
            shutil.rmtree(wh.parent)

        for run in range(args.repeat):  # alternating order, so a drift in the machine's load hits both
            for side in (floor_side, ingest_side) if run % 2 == 0 else (ingest_side, floor_side):
                side()
            print(
                f"run {run + 1}: floor {floors[-1][0]:.2f} s ({floors[-1][1]:.2f} CPU s), "
                f"ingest {ingests[-1][0]:.2f} s ({ingests[-1][1]:.2f} CPU s)",
                flush=True,
            )
            if counts["ingest"] != counts["floor"]:
                sys.exit(f"ingest loaded {counts['ingest']:,} ratings, the bare read {counts['floor']:,}")

    floor_s, ingest_s = median([r[0] for r in floors]), median([r[0] for r in ingests])
    floor_cpu, ingest_cpu = median([r[1] for r in floors]), median([r[1] for r in ingests])
    floor_rss, ingest_rss = max(r[2] for r in floors), max(r[2] for r in ingests)
    ratio = median([i[0] / f[0] for i, f in zip(ingests, floors)])
    print(f"ratings: {counts['floor']:,}   {load_line()} at the end")
    print(
        f"bare DuckDB read_csv -> table : {floor_s:7.2f} s  {floor_cpu:7.2f} CPU s   peak RSS {floor_rss:5.2f} GiB"
    )
    print(
        f"batchrec ingest (all files)   : {ingest_s:7.2f} s  {ingest_cpu:7.2f} CPU s   peak RSS {ingest_rss:5.2f} GiB"
    )
    print(
        f"ratio ingest / bare read      : {ratio:7.2f}    (CPU {ingest_cpu / floor_cpu:.2f}; medians of {args.repeat} "
        f"alternating runs)   target <= 1.5: {'ok' if ratio <= 1.5 else 'MISSED'}   {describe()}"
    )
    print(
        f"ingest peak RSS               : {ingest_rss:7.2f} GiB   target < 4 GB: "
        f"{'ok' if ingest_rss * 2**30 < 4e9 else 'MISSED'}"
    )


if __name__ == "__main__":
    main()
