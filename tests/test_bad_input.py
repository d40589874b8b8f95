"""Bad input, faults and misuse (issue #17): every case runs the real `batchrec` command in a
subprocess on a private copy of one shared warehouse (ml-latest-small ingested, a snapshot,
popularity and EASE runs, EASE's lists published, two popularity shards written) and asserts the
exit code, the ONE line on stderr, and that every warehouse table is byte-identical afterwards.

Faults are real: a full or read-only file system is a small tmpfs (mounted here; skipped where
mounting is not permitted), interrupts are SIGINT / SIGKILL sent to the running process.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from warehouse_checks import table_checksums

from batchrec.warehouse import Warehouse

ROOT = Path(__file__).resolve().parent.parent
DB = "batchrec.duckdb"
ARTIFACTS, SHARDS = "batchrec.artifacts", "batchrec.shards"  # the warehouse's own folders, beside it
SCRIPT = Path(sys.executable).with_name("batchrec")


def batchrec(wh: Path, *args: str, timeout: float = 120, **popen) -> subprocess.CompletedProcess:
    """The installed `batchrec` command (this checkout's code) on warehouse `wh`, logging off."""
    return subprocess.run(
        _argv(wh, args), capture_output=True, text=True, timeout=timeout, env=_env(), **popen
    )


def _argv(wh: Path, args) -> list[str]:
    command = (
        [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-c", "from batchrec.cli import main; main()"]
    )
    return [*command, "-qqq", "--warehouse", str(wh), *map(str, args)]


def _env() -> dict[str, str]:
    # this checkout's code; Python's own warnings (torch's beta notices) are not what is tested
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, "PYTHONWARNINGS": "ignore"}


# -- the shared warehouse -----------------------------------------------------------------------
@pytest.fixture(scope="session")
def base(tmp_path_factory) -> dict:
    """ml-latest-small -> snapshot (user_temporal) -> popularity and EASE runs -> EASE's lists
    published -> the popularity run's two shards, built once (in-process, the same functions the
    commands call)."""
    from batchrec.features import build_snapshot
    from batchrec.ingest.run import ingest_path
    from batchrec.scoring import score_command
    from batchrec.train import fit_run
    from batchrec.warehouse import Warehouse

    folder = tmp_path_factory.mktemp("bad_input")
    wh = Warehouse(folder / DB)
    ingest_path(wh, dataset="ml-latest-small")
    build_snapshot(wh, protocols="user_temporal")
    popularity = fit_run(wh, "popularity", device="cpu")
    ease = fit_run(wh, "ease", device="cpu")
    score_command(wh, run_id=ease, device="cpu")
    for shard in ("0/2", "1/2"):
        score_command(wh, run_id=popularity, shard=shard, device="cpu")
    return {"folder": folder, "popularity": popularity, "ease": ease}


def copy_warehouse(base: dict, dest: Path, artifacts: bool = True) -> Path:
    """A private copy of the shared warehouse in `dest`: the DuckDB file copied, the artifact and
    shard files hard-linked (a case that damages one replaces the file, never writes into it;
    artifact paths are stored relative to the warehouse, so the copy reads its own). Returns the
    copy's DuckDB file."""
    src = base["folder"]
    dest.mkdir(parents=True, exist_ok=True)
    for entry in src.iterdir():
        if entry.is_dir() and (artifacts or entry.name != ARTIFACTS):
            shutil.copytree(entry, dest / entry.name, copy_function=_link_or_copy)
        elif entry.is_file() and not entry.name.endswith(".lock"):
            shutil.copy(entry, dest / entry.name)
    return dest / DB


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another file system (a tmpfs)
        shutil.copy2(src, dst)


def replace_file(path: Path, data: bytes) -> None:
    """Give `path` new contents through a new file (its hard-linked original stays intact)."""
    tmp = path.with_name(path.name + ".new")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def artifact(db: Path, run_id: str) -> Path:
    return db.parent / ARTIFACTS / run_id


def shard(db: Path, run_id: str, i: int) -> Path:
    return db.parent / SHARDS / f"run_id={run_id}" / f"shard={i}.parquet"


# -- what a case changes in its copy before the command runs -----------------------------------
def _tamper_state(db: Path, run_id: str, change: Callable[[dict], None]) -> None:
    path = artifact(db, run_id) / "state.pt"
    blob = torch.load(path, weights_only=True)
    change(blob)
    tmp = path.with_name("state.pt.new")
    torch.save(blob, tmp)
    os.replace(tmp, path)


def _tamper_meta(db: Path, run_id: str, change: Callable[[dict], None]) -> None:
    path = artifact(db, run_id) / "model.json"
    meta = json.loads(path.read_text())
    change(meta)
    replace_file(path, json.dumps(meta).encode())


def _tamper_shard(db: Path, run_id: str, change: Callable[[pa.Table], pa.Table]) -> None:
    path = shard(db, run_id, 1)
    tmp = path.with_name("new.parquet")
    pq.write_table(change(pq.read_table(path)), tmp)
    os.replace(tmp, path)


def _write_job(db: Path, text: str) -> None:
    (db.parent / "job.toml").write_text(text)


@contextmanager
def _reader_holds(db: Path):
    """Another process (an analyst's session) holds the DuckDB file open read-only."""
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import duckdb, sys, time\n"
            "con = duckdb.connect(sys.argv[1], read_only=True)\n"
            "print('open', flush=True)\ntime.sleep(120)",
            str(db),
        ],
        stdout=subprocess.PIPE,
    )
    try:
        assert holder.stdout.readline() == b"open\n"
        yield
    finally:
        holder.kill()
        holder.wait()


@dataclass
class Case:
    """One command on a fresh copy: `args` after `batchrec --warehouse W` ("{dir}" is the copy's
    folder, "{popularity}"/"{ease}" the runs), the exit code, and the one stderr line (regex)."""

    args: list[str]
    code: int
    line: str
    setup: Callable[[Path, dict], None] | None = None  # prepares the copy before the baseline checksum
    during: Callable[[Path], object] | None = None  # a context manager around the command
    absent: list[str] = field(default_factory=list)  # paths ("{dir}"...) that must not exist afterwards
    gated: bool = False  # the publish gate refused: publish_log records it, nothing else changes


PARAM = r"error: {model}: parameter {name}='{value}' is not a finite number"
SANDBOX = (
    r"error: query failed: Permission Error: Cannot access (file|directory) .* - file system operations are "
    r"disabled by configuration \(expected a read-only query of the warehouse's own tables\)"
)
LOCKED = (
    r"error: query failed: Invalid Input Error: Cannot change configuration option .* - the configuration "
    r"has been locked \(expected a read-only query of the warehouse's own tables\)"
)
CORRUPT = r"error: artifact \S+/batchrec\.artifacts/{run} is corrupt \({what}\): retrain with batchrec train {model}"
SHARD = (
    r"error: shard \S+/shard=1\.parquet is corrupt \({what}\): rescore it with `batchrec score --run {run} "
    r"--shard 1/N` and publish again"
)
# The publish gate (batchrec/gate.py) refuses such lists with exit code 3, naming each failed check
# (here also the coverage collapse against EASE's live lists)
REFUSED = (
    r"error: gated: run {run} \(popularity\) was not published: {what}(; [^;]+)*; the previous lists stay"
    r"( \(even with --force: scores must be finite\))? \(publish anyway with --force\)"
)

CASES: dict[str, Case] = {
    # 5. parameters: nan and inf are not numbers a model can use; seeds fit numpy and torch
    "ease rating_offset=nan": Case(
        ["train", "ease", "--param", "rating_offset=nan"],
        1,
        PARAM.format(model="ease", name="rating_offset", value="nan"),
    ),
    "ease max_memory_gb=nan": Case(
        ["train", "ease", "--param", "max_memory_gb=nan"],
        1,
        PARAM.format(model="ease", name="max_memory_gb", value="nan"),
    ),
    "mf lr=nan": Case(
        ["train", "mf", "--param", "lr=nan"], 1, PARAM.format(model="mf", name="lr", value="nan")
    ),
    "mf seed too big": Case(
        ["train", "mf", "--param", "seed=99999999999999999999999"],
        1,
        r"error: mf: parameter seed=99999999999999999999999 is out of range \[0, 4294967295\]",
    ),
    "features seed too big": Case(
        ["features", "--param", "seed=99999999999999999999999"],
        1,
        r"error: bad value for parameter seed: '99999999999999999999999' "
        r"\(expected an integer in \[0, 4294967295\]\)",
    ),
    "features bayes_c=inf": Case(
        ["features", "--param", "bayes_c=inf"],
        1,
        r"error: bad value for parameter bayes_c: 'inf' \(expected a finite number > 0 .*\)",
    ),
    "evaluate --threshold nan": Case(
        ["evaluate", "--threshold", "nan"],
        2,
        r"error: Invalid value for '--threshold': 'nan' is not a finite number "
        r"\(see `batchrec evaluate --help`\)",
    ),
    # 6. the scorer refuses lists that are nonsense, and the previous lists stay
    "score: every score equal": Case(
        ["score", "--run", "{popularity}"],
        3,
        REFUSED.format(run="{popularity}", what="every score equal within 610 of 610 lists"),
        setup=lambda db, r: _tamper_state(db, r["popularity"], lambda b: b["state"]["popularity"].zero_()),
        gated=True,
    ),
    "score: NaN scores": Case(
        ["score", "--run", "{popularity}"],
        3,
        REFUSED.format(
            run="{popularity}",
            what="no list for 610 of 610 scored users "
            r"\(no finite score\)",
        ),
        setup=lambda db, r: _tamper_state(
            db, r["popularity"], lambda b: b["state"]["popularity"].fill_(float("nan"))
        ),
        gated=True,
    ),
    "publish shards with NaN scores": Case(
        ["score", "--publish", "{popularity}"],
        3,
        REFUSED.format(
            run="{popularity}",
            what=r"scores not finite: \d+ of 6100 "
            "rows are NaN, infinite or null",
        ),
        setup=lambda db, r: _tamper_shard(
            db,
            r["popularity"],
            lambda t: t.set_column(3, "score", pa.array([float("nan")] * len(t), pa.float32())),
        ),
        gated=True,
    ),
    # 8. `batchrec sql` reads the warehouse and nothing else
    "sql COPY TO": Case(
        ["sql", "COPY ratings TO '{dir}/stolen.csv'"], 1, SANDBOX, absent=["{dir}/stolen.csv"]
    ),
    "sql EXPORT DATABASE": Case(["sql", "EXPORT DATABASE '{dir}/dump'"], 1, SANDBOX, absent=["{dir}/dump"]),
    "sql read_text environ": Case(["sql", "SELECT * FROM read_text('/proc/self/environ')"], 1, SANDBOX),
    "sql read_csv system file": Case(["sql", "SELECT * FROM read_csv('/etc/passwd')"], 1, SANDBOX),
    "sql glob home": Case(["sql", "SELECT * FROM glob('~/*')"], 1, SANDBOX),
    "sql ATTACH": Case(
        ["sql", "ATTACH '{dir}/other.duckdb' AS other"], 1, SANDBOX, absent=["{dir}/other.duckdb"]
    ),
    "sql INSTALL": Case(["sql", "INSTALL httpfs"], 1, SANDBOX),
    "sql SET": Case(["sql", "SET enable_external_access = true"], 1, LOCKED),
    "sql PRAGMA": Case(["sql", "PRAGMA threads = 1"], 1, LOCKED),
    "sql RESET lock": Case(["sql", "RESET lock_configuration"], 1, LOCKED),
    # 9. corrupt artifacts: one line naming the artifact and the fix
    "artifact: truncated state.pt": Case(
        ["score", "--run", "{popularity}"],
        1,
        CORRUPT.format(
            run="{popularity}",
            model="popularity",
            what="state.pt cannot be read: PytorchStreamReader "
            "failed reading zip archive: failed finding central directory",
        ),
        setup=lambda db, r: replace_file(
            artifact(db, r["popularity"]) / "state.pt",
            (artifact(db, r["popularity"]) / "state.pt").read_bytes()[:500],
        ),
    ),
    "artifact: random state.pt": Case(
        ["score", "--run", "{popularity}"],
        1,
        CORRUPT.format(run="{popularity}", model="popularity", what="state.pt cannot be read: .*"),
        setup=lambda db, r: replace_file(artifact(db, r["popularity"]) / "state.pt", os.urandom(4096)),
    ),
    "artifact: model.json not JSON": Case(
        ["score", "--run", "{ease}"],
        1,
        CORRUPT.format(run="{ease}", model="ease", what="model.json is not JSON: .*"),
        setup=lambda db, r: replace_file(artifact(db, r["ease"]) / "model.json", b'{"model": "ease", "par'),
    ),
    "artifact: wrong n_items": Case(
        ["score", "--run", "{popularity}"],
        1,
        CORRUPT.format(
            run="{popularity}",
            model="popularity",
            what=r"its scores have shape \(2, 9742\), model.json says 9000 items",
        ),
        setup=lambda db, r: _tamper_meta(db, r["popularity"], lambda m: m.update(n_items=9000)),
    ),
    "artifact: wrong state keys": Case(
        ["score", "--run", "{popularity}"],
        1,
        CORRUPT.format(run="{popularity}", model="popularity", what="state.pt has no 'popularity'"),
        setup=lambda db, r: _tamper_state(
            db, r["popularity"], lambda b: b.update(state={"counts": torch.zeros(3)})
        ),
    ),
    "artifact: another model's": Case(
        ["score", "--run", "{popularity}"],
        1,
        CORRUPT.format(
            run="{popularity}",
            model="popularity",
            what="model.json names model 'ease', the run is popularity",
        ),
        setup=lambda db, r: _tamper_meta(db, r["popularity"], lambda m: m.update(model="ease")),
    ),
    # 9. corrupt shards at `score --publish`
    "shard: truncated": Case(
        ["score", "--publish", "{popularity}"],
        1,
        SHARD.format(run="{popularity}", what="not a readable Parquet file: .*"),
        setup=lambda db, r: replace_file(
            shard(db, r["popularity"], 1), shard(db, r["popularity"], 1).read_bytes()[:2000]
        ),
    ),
    "shard: wrong column type": Case(
        ["score", "--publish", "{popularity}"],
        1,
        SHARD.format(run="{popularity}", what=r"column score is String \(expected Float32\)"),
        setup=lambda db, r: _tamper_shard(
            db, r["popularity"], lambda t: t.set_column(3, "score", t.column("score").cast(pa.string()))
        ),
    ),
    "shard: metadata removed": Case(
        ["score", "--publish", "{popularity}"],
        1,
        SHARD.format(run="{popularity}", what=r"its batchrec metadata \(run, shard i/N, top-n\) is missing"),
        setup=lambda db, r: _tamper_shard(db, r["popularity"], lambda t: t.replace_schema_metadata(None)),
    ),
    # 9. usage errors and the busy line
    "recommend --history -1": Case(
        ["recommend", "1", "--history", "-1"],
        2,
        r"error: Invalid value for '--history': -1 is not in the range x>=0 "
        r"\(see `batchrec recommend --help`\)",
    ),
    "score --top-n x": Case(
        ["score", "--top-n", "x"],
        2,
        r"error: Invalid value for '--top-n': 'x' is not a valid integer range "
        r"\(see `batchrec score --help`\)",
    ),
    "unknown command": Case(
        ["teleport"],
        2,
        r"error: No such command 'teleport'\. Did you mean 'export'\? \(see `batchrec --help`\)",
    ),
    "missing argument": Case(
        ["train"], 2, r"error: Missing argument 'MODEL' \(see `batchrec train --help`\)"
    ),
    "busy: a reader holds the file": Case(
        ["train", "popularity"],
        75,
        r"error: warehouse is busy \(held by \S+ \(PID \d+\)\): \S+: retry when it has finished",
        during=_reader_holds,
    ),
    # 14. job files: every key checked, one line naming file, line, step and key
    "job: top_n = 'ten'": Case(
        ["run", "{dir}/job.toml"],
        1,
        r"error: \S+/job.toml:6: step 2 \(score\): top_n = 'ten' is not valid \(expected a valid integer\)",
        setup=lambda db, r: _write_job(
            db, '[[steps]]\nstep = "features"\n\n[[steps]]\nstep = "score"\ntop_n = "ten"\n'
        ),
    ),
    "job: top_n = 0": Case(
        ["run", "{dir}/job.toml"],
        1,
        r"error: \S+/job.toml:3: step 1 \(score\): top_n = 0 is not valid "
        r"\(expected greater than or equal to 1\)",
        setup=lambda db, r: _write_job(db, '[[steps]]\nstep = "score"\ntop_n = 0\n'),
    ),
    "job: device = 'gpu'": Case(
        ["run", "{dir}/job.toml"],
        1,
        r"error: \S+/job.toml:4: step 1 \(train\): device = 'gpu' is not valid \(expected 'auto', 'cpu' or 'cuda'\)",
        setup=lambda db, r: _write_job(db, '[[steps]]\nstep = "train"\nmodel = "mf"\ndevice = "gpu"\n'),
    ),
    "job: keep = 1.5": Case(
        ["run", "{dir}/job.toml"],
        1,
        r"error: \S+/job.toml:3: step 1 \(features\): keep = 1.5 is not valid \(expected a valid integer\)",
        setup=lambda db, r: _write_job(db, '[[steps]]\nstep = "features"\nkeep = 1.5\n'),
    ),
    "job: quarantine = 'yes'": Case(
        ["run", "{dir}/job.toml"],
        1,
        r"error: \S+/job.toml:4: step 1 \(ingest\): quarantine = 'yes' is not valid \(expected a valid boolean\)",
        setup=lambda db, r: _write_job(
            db, '[[steps]]\nstep = "ingest"\ndataset = "ml-latest-small"\nquarantine = "yes"\n'
        ),
    ),
    "job: threshold = nan": Case(
        ["run", "{dir}/job.toml"],
        1,
        r"error: \S+/job.toml:3: step 1 \(evaluate\): threshold = nan is not valid \(expected a finite number\)",
        setup=lambda db, r: _write_job(db, '[[steps]]\nstep = "evaluate"\nthreshold = nan\n'),
    ),
    "job: unknown key": Case(
        ["run", "{dir}/job.toml"],
        1,
        r"error: \S+/job.toml:4: step 1 \(train\) has unknown option 'epochz' "
        r"\(expected one of: model, protocol, params, device, nproc\)",
        setup=lambda db, r: _write_job(db, '[[steps]]\nstep = "train"\nmodel = "mf"\nepochz = 3\n'),
    ),
    "job: train without a model": Case(
        ["run", "{dir}/job.toml"],
        1,
        r'error: \S+/job.toml:1: step 1 \(train\) needs model = "..." \(.*\)',
        setup=lambda db, r: _write_job(db, '[[steps]]\nstep = "train"\n'),
    ),
    "job: params not a list": Case(
        ["run", "{dir}/job.toml"],
        1,
        r"error: \S+/job.toml:4: step 1 \(train\): params = 'factors=8' is not valid \(expected a valid list\)",
        setup=lambda db, r: _write_job(db, '[[steps]]\nstep = "train"\nmodel = "mf"\nparams = "factors=8"\n'),
    ),
}


def _fill(text: str, db: Path, runs: dict) -> str:
    return (
        text.replace("{dir}", str(db.parent))
        .replace("{popularity}", runs["popularity"])
        .replace("{ease}", runs["ease"])
    )


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_line_and_changes_nothing(base, tmp_path, name):
    case = CASES[name]
    db = copy_warehouse(base, tmp_path / "wh")
    if case.setup is not None:
        case.setup(db, base)
    before = table_checksums(db)
    with case.during(db) if case.during else nullcontext():
        result = batchrec(db, *(_fill(a, db, base) for a in case.args))
    assert result.stderr.splitlines() == result.stderr.splitlines()[:1], result.stderr  # one line
    assert re.fullmatch(_fill(case.line, db, base), result.stderr.strip()), result.stderr
    assert result.returncode == case.code, result.stderr
    assert "-readonly" not in result.stderr and "Traceback" not in result.stderr
    after = table_checksums(db)
    if case.gated:
        assert after.pop("publish_log") != before.pop("publish_log")
        con = duckdb.connect(str(db), read_only=True)
        assert con.execute("SELECT status FROM publish_log ORDER BY logged_at DESC LIMIT 1").fetchall() == [
            ("gated",)
        ]
        con.close()
    assert after == before
    for path in case.absent:
        assert not Path(_fill(path, db, base)).exists()


# -- 5. every float parameter of every family, in-process (the CLI cases above show the line) ---
def test_every_float_parameter_refuses_nan_and_inf():
    from batchrec.errors import BatchrecError
    from batchrec.models import available, get_model_class

    checked = 0
    for family in available():
        for param in get_model_class(family).all_params():
            if param.type is float:
                for value in ("nan", "inf", "-inf", float("nan")):
                    with pytest.raises(
                        BatchrecError, match=f"{family}: parameter {param.name}=.* is not a finite"
                    ):
                        param.parse(value, family)
                checked += 1
            if param.name == "seed":
                for value in ("-1", str(2**32), "99999999999999999999999"):
                    with pytest.raises(BatchrecError, match="out of range"):
                        param.parse(value, family)
                assert param.parse(str(2**32 - 1), family) == 2**32 - 1
    assert checked >= 40  # every family has some


def test_snapshot_parameters_refuse_nan_inf_and_unbounded_seeds():
    from batchrec.errors import BatchrecError
    from batchrec.features.params import parse_params

    for item in (
        "bayes_c=inf",
        "bayes_c=nan",
        "leave_last_n_positive.positive_threshold=-inf",
        "random.test_frac=nan",
        "seed=-1",
        f"seed={2**32}",
    ):
        with pytest.raises(BatchrecError, match=f"bad value for parameter {item.split('=')[0]}"):
            parse_params([item])
    assert parse_params([f"seed={2**32 - 1}"])["seed"] == 2**32 - 1


# -- 9. a full or read-only file system -----------------------------------------------------------
@pytest.fixture()
def tmpfs(tmp_path):
    """A 48 MiB tmpfs at tmp_path/fs: a file system this test can fill or make read-only."""
    mount = tmp_path / "fs"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", str(mount)], capture_output=True
    )
    if done.returncode:
        pytest.skip(
            f"cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN): {done.stderr.decode().strip()}"
        )
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)


def _fill_up(folder: Path) -> None:
    """Write zeros into `folder` until its file system has no space left."""
    fd = os.open(folder / "filler", os.O_WRONLY | os.O_CREAT)
    try:
        for size in (1 << 20, 4096):  # big writes, then the last pages
            try:
                while True:
                    os.write(fd, bytes(size))
            except OSError:
                pass
    finally:
        os.close(fd)


DISK_FULL = (
    r"error: no space left on device writing \S+/batchrec\.duckdb(\.wal)?: free space there and rerun \(the warehouse keeps its "
    r"previous contents\)"
)
ARTIFACT_FULL = (
    r"error: writing the model artifact to \S+/batchrec\.artifacts failed part-way \(disk full\? torch says: .*"
    r"\): free space there and rerun \(no run was recorded\)"
)


@pytest.mark.parametrize(
    "args, line",
    [
        (["features", "--protocols", "user_temporal"], DISK_FULL),
        (["score", "--run", "{popularity}"], DISK_FULL),
        (["train", "popularity"], ARTIFACT_FULL),
        (["train", "ease"], ARTIFACT_FULL),  # EASE's 380 MB artifact meets a tmpfs with room left
    ],
    ids=["features", "score", "train popularity", "train ease"],
)
def test_disk_full_is_one_line_and_changes_nothing(base, tmpfs, args, line):
    db = copy_warehouse(base, tmpfs, artifacts=False)
    shutil.copytree(artifact(base["folder"] / DB, base["popularity"]), artifact(db, base["popularity"]))
    with Warehouse(db).lock("an earlier command"):  # a warehouse written before has its lock file
        pass
    if args[-1] != "ease":
        _fill_up(tmpfs)
    before = table_checksums(db)
    result = batchrec(db, *(_fill(a, db, base) for a in args))
    assert result.returncode == 74 and re.fullmatch(line, result.stderr.strip()), result.stderr
    (tmpfs / "filler").unlink(missing_ok=True)
    assert table_checksums(db) == before
    assert not list((tmpfs / ARTIFACTS).glob(".*.partial"))  # no half artifact left behind


def test_read_only_file_system_is_one_line_and_reads_still_work(base, tmpfs):
    db = copy_warehouse(base, tmpfs, artifacts=False)
    before = table_checksums(db)
    subprocess.run(["mount", "-o", "remount,ro", str(tmpfs)], check=True)
    for args in (["train", "popularity"], ["score", "--run", base["popularity"]], ["features"]):
        result = batchrec(db, *args)
        assert result.returncode == 74, result.stderr
        assert re.fullmatch(
            rf"error: read-only file system writing {re.escape(str(db))}\.lock: run this command "
            r"where the warehouse folder is writable \(the warehouse keeps its previous contents\)",
            result.stderr.strip(),
        ), result.stderr
    for args in (["status"], ["sql", "SELECT count(*) AS n FROM ratings", "--format", "csv"]):
        result = batchrec(db, *args)
        assert result.returncode == 0 and result.stderr == "", result.stderr
    assert table_checksums(db) == before


# -- 9. SIGINT, 11. kill -9 ------------------------------------------------------------------------
# Waits are generous: they only cost time when something is wrong, and a loaded 2-core machine
# can take a minute to start a job and fit one epoch.
WAIT_S = 300


def _wait_for(condition: Callable[[], bool], what: str, timeout: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


class Logged:
    """A `batchrec` command started with its log on stderr, read line by line as it runs (the
    test never opens the DuckDB file meanwhile: a reader would make the job's own writes busy)."""

    def __init__(self, db: Path, args: list):
        self.proc = subprocess.Popen(
            [a for a in _argv(db, args) if a != "-qqq"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=_env(),
        )
        self.lines: list[str] = []
        self.reader = threading.Thread(target=lambda: self.lines.extend(iter(self.proc.stderr.readline, "")))
        self.reader.start()

    def wait_for(self, pattern: str) -> None:
        """Until a log line matches `pattern` (the command must still be running then)."""
        try:
            _wait_for(
                lambda: any(re.search(pattern, line) for line in self.lines) or self.proc.poll() is not None,
                pattern,
            )
            assert self.proc.poll() is None, "".join(self.lines)
        except AssertionError:
            self.proc.kill()  # never leave a long job running past a failed test
            raise

    def finish(self) -> list[str]:
        self.proc.wait(timeout=WAIT_S)
        self.reader.join(timeout=WAIT_S)
        return [line.rstrip("\n") for line in self.lines]


SLOW_TRAIN = '[[steps]]\nstep = "train"\nmodel = "mf"\nparams = ["epochs=10000", "patience=10000"]\n'


def test_sigint_during_a_query_is_one_line(base, tmp_path):
    db = copy_warehouse(base, tmp_path / "wh", artifacts=False)
    before = table_checksums(db)
    proc = subprocess.Popen(
        _argv(db, ["sql", "SELECT count(*) FROM ratings a, ratings b WHERE a.rating > b.rating"]),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
    )
    # DuckDB's worker threads exist once the warehouse is open: the query is about to run
    _wait_for(lambda: len(os.listdir(f"/proc/{proc.pid}/task")) > 2, "the query to start")
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=WAIT_S)
    assert proc.returncode == 130, err
    assert (
        err.strip() == "error: interrupted (SIGINT) before anything was committed: the warehouse is unchanged"
    )
    assert table_checksums(db) == before


def test_sigint_after_a_commit_says_what_was_committed(base, tmp_path):
    db = copy_warehouse(base, tmp_path / "wh", artifacts=False)
    (tmp_path / "job.toml").write_text('[[steps]]\nstep = "train"\nmodel = "popularity"\n\n' + SLOW_TRAIN)
    before = table_checksums(db)
    job = Logged(db, ["run", tmp_path / "job.toml"])
    job.wait_for(r"\bepoch=1 loss=")  # step 1 committed its run; step 2 (mf) is training
    job.proc.send_signal(signal.SIGINT)
    lines = job.finish()
    con = duckdb.connect(str(db), read_only=True)
    new_run = con.execute("SELECT run_id FROM model_runs ORDER BY created_at DESC LIMIT 1").fetchall()[0][0]
    steps = con.execute("SELECT step, status, error FROM job_runs ORDER BY step").fetchall()
    con.close()
    assert job.proc.returncode == 130, lines
    assert lines[-1] == (
        f"error: interrupted (SIGINT) after committing model run {new_run}: that is in the "
        "warehouse, the rest of the command did not run"
    )
    assert not [line for line in lines[:-1] if line.startswith(("error:", "Traceback"))]
    assert new_run.startswith("popularity-") and new_run != base["popularity"]
    assert steps == [("1:train", "ok", None), ("2:train", "failed", "interrupted (SIGINT)")]
    after = table_checksums(db)
    assert {t for t in before if after[t] != before[t]} == {"model_runs", "job_runs"}


def test_a_killed_job_step_is_marked_failed_killed(base, tmp_path):
    db = copy_warehouse(base, tmp_path / "wh", artifacts=False)
    (tmp_path / "slow.toml").write_text('[job]\nname = "slow"\n\n' + SLOW_TRAIN)
    (tmp_path / "quick.toml").write_text(
        '[job]\nname = "quick"\n\n[[steps]]\nstep = "features"\nprotocols = "user_temporal"\n'
    )
    job = Logged(db, ["run", tmp_path / "slow.toml"])
    job.wait_for(r"\bepoch=1 loss=")  # the step is recorded as running and training
    job.proc.kill()
    job.finish()
    pid = job.proc.pid
    before = table_checksums(db)
    status = batchrec(db, "status")  # read-only: shows the step as killed, writes nothing
    assert status.returncode == 0, status.stderr
    assert re.search(
        rf"slow .* 1:train .* failed \(killed\) .* killed: process {pid} on \S+ ended while the step "
        "was running",
        status.stdout,
    ), status.stdout
    assert table_checksums(db) == before
    again = batchrec(db, "run", tmp_path / "quick.toml")  # the next job records it
    assert again.returncode == 0, again.stderr
    assert again.stdout.startswith("marked 1 step(s) of killed job runs as failed: slow-")
    con = duckdb.connect(str(db), read_only=True)
    rows = con.execute("SELECT job, status, pid, error FROM job_runs ORDER BY started").fetchall()
    con.close()
    assert rows[0][:3] == ("slow", "failed", pid) and rows[0][3].startswith(f"killed: process {pid} on ")
    assert rows[1][:2] == ("quick", "ok") and rows[1][2] not in (None, pid)  # the quick job's own process


# -- 9. anything unexpected: one line, and -v for the traceback --------------------------------------
UNEXPECTED = (
    "import sys\nfrom batchrec.cli import main\n"
    "@main.command()\ndef explode():\n    raise ValueError('a bug\\nsecond line')\n"
    "sys.argv[0] = 'batchrec'\nmain()"
)


def test_an_unexpected_exception_is_one_line_and_v_shows_the_traceback(tmp_path):
    quiet = subprocess.run(
        [sys.executable, "-c", UNEXPECTED, "--warehouse", str(tmp_path / DB), "explode"],
        capture_output=True,
        text=True,
        env=_env(),
    )
    assert quiet.returncode == 1
    assert quiet.stderr.splitlines() == [
        "error: unexpected ValueError: a bug second line (run with -v for the traceback)"
    ]
    loud = subprocess.run(
        [sys.executable, "-c", UNEXPECTED, "-v", "--warehouse", str(tmp_path / DB), "explode"],
        capture_output=True,
        text=True,
        env=_env(),
    )
    assert loud.returncode == 1
    assert loud.stderr.startswith("Traceback (most recent call last):") and "ValueError: a bug" in loud.stderr
    assert loud.stderr.splitlines()[-1] == quiet.stderr.strip()


def test_permission_and_quota_errors_are_faults_too():
    """As root no chmod denies a write here, so the mapping itself: errno -> one fault line, exit 74."""
    import errno

    from batchrec.errors import Fault, as_fault

    denied = as_fault(OSError(errno.EACCES, "Permission denied", "/data/ratings.csv"))
    assert isinstance(denied, Fault) and denied.exit_code == 74
    assert str(denied).startswith("permission denied on /data/ratings.csv: give this user access to it")
    assert str(as_fault(OSError(errno.EDQUOT, "Disk quota exceeded"))).startswith(
        "disk quota exceeded: free space"
    )
    assert as_fault(OSError(errno.ENOENT, "No such file", "/x")) is None  # not a fault of the machine


# -- 6. each sanity check on its own: real lists pass, each way of breaking them is named -----------
def test_list_sanity_passes_real_lists_and_names_each_degenerate_case(base):
    import polars as pl

    from batchrec.scoring import list_sanity

    con = duckdb.connect(str(base["folder"] / DB), read_only=True)
    ease = con.sql("SELECT user_id, rank, item_id, score FROM recommendations").pl()  # EASE's published lists
    con.close()
    popularity = pl.read_parquet(sorted(base["folder"].rglob("shard=*.parquet")))
    assert list_sanity(ease, users=610) == []
    assert list_sanity(popularity, users=610, personalised=False) == []

    one_first = ease.with_columns(
        item_id=pl.when(pl.col("rank") == 1).then(pl.lit(1)).otherwise(pl.col("item_id"))
    )
    assert list_sanity(one_first, 610) == ["item 1 is first in 610 of 610 lists"]
    assert list_sanity(one_first, 610, personalised=False) == []  # one global ranking: by design
    two_lists = ease.with_columns(item_id=pl.col("rank") + pl.col("user_id") % 2 * 5)  # items 1-10 or 6-15
    assert list_sanity(two_lists, 610) == ["only 15 distinct items across 610 lists of up to 10"]
    tied = ease.with_columns(score=pl.lit(0.5, pl.Float32))
    assert list_sanity(tied, 610) == ["every score equal within 610 of 610 lists"]
    holes = ease.with_columns(
        score=pl.when(pl.col("user_id") < 5).then(float("inf")).otherwise(pl.col("score"))
    )
    assert list_sanity(holes, 610) == ["scores not finite: 40 of 6100 rows are NaN, infinite or null"]
    assert list_sanity(ease.filter(pl.col("user_id") > 10), 610) == [
        "no list for 10 of 610 scored users (no finite score)"
    ]
    assert (
        list_sanity(ease.filter(pl.col("user_id") > 6), 610) == []
    )  # 6 of 610 (under 1%): a user may have seen it all
