"""Do two versions of batchrec give the same outputs? Capture, then compare.

A refactor must not change what ships or what is measured. `capture OUT` builds a fresh warehouse
from the embedded ml-latest-small through the real CLI, fits every model family (short schedules
for the iterative ones, so it runs in minutes; the code paths are the defaults'), scores all users
with each fit on every interaction, evaluates each family's user_temporal fit, and writes
`OUT/<family>.recommendations.parquet` and `OUT/evaluations.parquet`. `compare A B` says whether
two captures are identical, row for row.

    python tools/same_outputs.py capture /tmp/before   # on the old code
    python tools/same_outputs.py capture /tmp/after    # on the new code
    python tools/same_outputs.py compare /tmp/before /tmp/after
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import duckdb
import polars as pl

# Short schedules: every iterative family still runs its whole fit path, only fewer epochs.
QUICK = {
    "popularity": [],
    "svd": [],
    "ease": [],
    "itemknn": [],
    "mf": ["epochs=3"],
    "bpr": ["epochs=3"],
    "ials": ["iterations=3"],
    "neumf": ["epochs=2"],
    "autorec": ["epochs=5"],
    "content_dnn": ["epochs=2"],
    "two_tower": ["epochs=2", "ensemble=1"],
    "multvae": ["epochs=4", "ensemble=1"],
}


def batchrec(wh: Path, *args: str, may_refuse: bool = False) -> str | None:
    """Run one CLI command; None when `may_refuse` and the command refused (its error line is an
    output too: a short fit can give lists the publish checks refuse, and that must not change)."""
    done = subprocess.run(
        [sys.executable, "-c", "from batchrec.cli import main; main()", "--warehouse", str(wh), *args],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        if may_refuse and done.stderr.strip().splitlines()[-1].startswith("error: "):
            return None
        sys.exit(f"batchrec {' '.join(args)} failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout


def query(wh: Path, sql: str) -> pl.DataFrame:
    con = duckdb.connect(str(wh), read_only=True)
    try:
        return con.sql(sql).pl()
    finally:
        con.close()


def capture(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    wh = Path(tempfile.mkdtemp(prefix="same-outputs-")) / "w.duckdb"
    batchrec(wh, "ingest", "--dataset", "ml-latest-small")
    batchrec(wh, "features", "--protocols", "user_temporal")
    for family, params in QUICK.items():
        p = [a for kv in params for a in ("--param", kv)]
        batchrec(wh, "train", family, *p)
        batchrec(wh, "train", family, "--protocol", "user_temporal", *p)
        if batchrec(wh, "score", "--model", family, "--top-n", "10", "--force", may_refuse=True) is None:
            pl.DataFrame({"family": [family]}).write_parquet(out / f"{family}.refused.parquet")
        else:
            query(
                wh, "SELECT user_id, rank, item_id, score, reason FROM recommendations ORDER BY user_id, rank"
            ).write_parquet(out / f"{family}.recommendations.parquet")
        runs = query(
            wh, f"SELECT run_id FROM model_runs WHERE model = '{family}' AND protocol = 'user_temporal'"
        )["run_id"]
        batchrec(
            wh,
            "evaluate",
            "--runs",
            runs[-1],
            "--protocol",
            "user_temporal",
            "--report",
            str(wh.parent / "reports"),
        )
        print(f"captured {family}", flush=True)
    query(
        wh,
        "SELECT m.model, e.metric, e.k, e.value FROM evaluations e JOIN model_runs m USING (run_id) "
        "ORDER BY ALL",
    ).write_parquet(out / "evaluations.parquet")


def compare(a: Path, b: Path) -> int:
    differ = 0
    for f in sorted(p.name for p in a.glob("*.parquet")):
        left, right = pl.read_parquet(a / f), pl.read_parquet(b / f) if (b / f).exists() else None
        same = right is not None and left.equals(right)
        differ += not same
        print(f"{'same  ' if same else 'DIFFER'} {f}")
    return 1 if differ else 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "capture":
        capture(Path(sys.argv[2]))
    elif len(sys.argv) == 4 and sys.argv[1] == "compare":
        sys.exit(compare(Path(sys.argv[2]), Path(sys.argv[3])))
    else:
        sys.exit(__doc__)
