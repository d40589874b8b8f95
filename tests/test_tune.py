"""`batchrec tune` on the real ml-latest-small warehouse: the declared search spaces, one-line errors,
the study on the validation part only (the test part is provably never read), the per-epoch
pruner feed, a real `kill -9` mid-study and the resume, and the tuned setting that `train --tuned`
and a job's `params = "tuned"` use.

Studies here hold iALS small (factors 8, 2 iterations) so that they test the machinery, not the
search; the longer ones (a killed subprocess, mf epochs, the job) are marked slow (CI's second step)."""

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
from pathlib import Path

import pytest
from click.testing import CliRunner

from batchrec.cli import main
from batchrec.errors import BatchrecError
from batchrec.jobs import load_job
from batchrec.models import available, get_model_class
from batchrec.models.base import Param, Recommender
from batchrec.models.search import Choice, IntRange, LogUniform, Uniform, check_space
from batchrec.warehouse import Warehouse

pytest.importorskip("optuna")

from batchrec.tune import tune  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = Path(sys.executable).with_name("batchrec")
SMALL_IALS = ["factors=8", "iterations=2"]  # searched: reg, alpha, weights, recency


def _argv(db: Path, *args: str) -> list[str]:
    command = (
        [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-c", "from batchrec.cli import main; main()"]
    )
    return [*command, "--log-format", "kv", "--warehouse", str(db), *args]


def _env() -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, "PYTHONWARNINGS": "ignore"}


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """ml-latest-small ingested, one snapshot with the user_temporal and random splits."""
    from batchrec.features import build_snapshot
    from batchrec.ingest.run import ingest_path

    db = tmp_path_factory.mktemp("tune") / "batchrec.duckdb"
    wh = Warehouse(db)
    ingest_path(wh, dataset="ml-latest-small")
    build_snapshot(wh, protocols="user_temporal,random")
    return db


def _copy(base: Path, dest: Path) -> Warehouse:
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy(base, dest / base.name)
    return Warehouse(dest / base.name)


def _trials(wh: Warehouse) -> list[tuple]:
    with wh.connect(read_only=True) as con:
        return con.sql(
            "SELECT trial, params, value, state, finished_at FROM tuning_trials ORDER BY trial"
        ).fetchall()


# -- search spaces ---------------------------------------------------------------------------------
def test_the_four_families_declare_search_spaces_that_hold_their_defaults():
    tunable = {f for f in available() if get_model_class(f).search_space()}
    assert {"ease", "ials", "mf", "multvae"} <= tunable
    for family in tunable:
        defaults = {p.name: p for p in get_model_class(family).all_params()}
        for name, space in get_model_class(family).search_space().items():
            assert space.contains(defaults[name].default), (family, name)
    # the recency weighting the defaults carry can be switched off by the search (the random split wants that)
    for family in ("ease", "ials", "multvae"):
        assert 0.0 in get_model_class(family).search_space()["recency_halflife"].options
    assert (
        "[tune: log-uniform [20, 5000]]"
        in Param("lam", float, 500.0, "x", search=LogUniform(20, 5000)).describe()
    )


@pytest.mark.parametrize(
    "param, space, message",
    [
        (Param("lam", float, 500.0, "x", min=1e-6), LogUniform(0.0, 10.0), "must be above 0"),
        (Param("lam", float, 500.0, "x", min=1e-6), Uniform(1.0, 100.0), "default 500.0 lies outside"),
        (Param("lam", float, 5.0, "x", min=1.0), Uniform(0.5, 10.0), "out of range"),
        (Param("k", int, 5, "x"), Uniform(1.0, 10.0), "a float range for a int parameter"),
        (Param("k", int, 5, "x"), IntRange(1, 10, step=4), "not a whole number of steps"),
        (Param("w", str, "binary", "x", choices=("binary", "rating")), Choice(("binary",)), "two or more"),
        (
            Param("w", str, "binary", "x", choices=("binary", "rating")),
            Choice(("binary", "log")),
            "must be one of",
        ),
    ],
)
def test_a_bad_search_space_is_one_line(param, space, message):
    with pytest.raises(BatchrecError, match=re.escape(message)) as caught:
        check_space(space, param)
    assert "\n" not in str(caught.value) and f"search space of {param.name}" in str(caught.value)
    with pytest.raises(BatchrecError, match=re.escape(message)):  # a family declaring it fails when defined
        type(
            "Broken",
            (Recommender,),
            {"name": "broken", "params_spec": (Param(**{**vars(param), "search": space}),)},
        )


# -- bad input -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "args, message",
    [
        (("popularity",), "popularity cannot be tuned: it declares no search space (expected one of: "),
        (("teleport",), "unknown model 'teleport'"),
        (("ease", "--metric", "rmse"), "ease ranks items and predicts no ratings"),
        (("ease", "--metric", "ndcg@zero"), "--metric 'ndcg@zero' is not a tuning metric"),
        (("ease", "--trials", "0"), "--trials"),
        (("ease", "--timeout", "nan"), "--timeout"),
        (("ease", "--protocol", "global_temporal"), "has no split for protocol 'global_temporal'"),
        (("ease", "--param", "lam=-1"), "ease: parameter lam=-1.0 is out of range"),
        (
            (
                "ials",
                "--param",
                "reg=1",
                "--param",
                "alpha=1",
                "--param",
                "min_rating=4",
                "--param",
                "weighting=binary",
                "--param",
                "recency_halflife=0",
                "--param",
                "recency_floor=1",
                "--param",
                "factors=8",
            ),
            "every searched parameter is fixed by --param",
        ),
    ],
)
def test_bad_study_input_is_one_line_and_writes_nothing(base, tmp_path, args, message):
    wh = _copy(base, tmp_path)
    done = CliRunner().invoke(main, ["-q", "--warehouse", str(wh.path), "tune", *args])
    assert done.exit_code in (1, 2), done.output
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("error: "), done.stderr
    assert message in done.stderr, done.stderr
    with wh.connect(read_only=True) as con:
        assert con.execute("SELECT count(*) FROM tuning_trials").fetchone() == (0,)


def test_trials_that_cannot_fit_are_recorded_failed_and_a_study_without_one_complete_is_one_line(
    base, tmp_path
):
    wh = _copy(base, tmp_path)
    done = CliRunner().invoke(
        main,
        ["-q", "--warehouse", str(wh.path), "tune", "ease", "--trials", "3", "--param", "max_memory_gb=0.01"],
    )
    assert done.exit_code == 1 and done.stderr.count("\n") == 1, done.stderr
    assert "no trial completed (3 failed, first: ease: 9742 items need about" in done.stderr, done.stderr
    rows = _trials(wh)
    assert [(t[0], t[2], t[3]) for t in rows] == [
        (0, None, "failed"),
        (1, None, "failed"),
        (2, None, "failed"),
    ]
    with wh.connect(read_only=True) as con:
        assert con.execute("SELECT count(*) FROM tuned_params").fetchone() == (0,)
        assert "max_memory_gb" in con.execute("SELECT min(error) FROM tuning_trials").fetchone()[0]


def test_without_optuna_the_error_names_the_extra(base, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "optuna", None)  # `import optuna` now raises ImportError
    with pytest.raises(BatchrecError, match=r"needs Optuna.*pip install 'batchrec\[tune\]'"):
        tune(_copy(base, tmp_path), "ials", "random", trials=1, params=SMALL_IALS)


# -- the study never reads the test part -----------------------------------------------------------
def test_the_study_never_reads_the_test_part(base, tmp_path):
    """The same study on a copy whose test rows are corrupted (ratings flipped, which changes what
    a test measurement says) gives the same trials, parameters and values, and the same tuned setting."""
    from batchrec.data import load_snapshot
    from batchrec.features import latest_snapshot_id
    from batchrec.metrics import evaluate_model
    from batchrec.train import fit_model

    clean, corrupt = _copy(base, tmp_path / "clean"), _copy(base, tmp_path / "corrupt")
    with corrupt.connect() as con:
        changed = con.execute(
            "UPDATE split_holdout SET rating = 5.5 - rating, ts = ts + INTERVAL 1 SECOND "
            "WHERE protocol = 'user_temporal' AND part = 'test'"
        ).fetchone()[0]
    assert changed > 9000
    with (
        clean.connect(read_only=True) as a,
        corrupt.connect(read_only=True) as b,
    ):  # test measurements do differ
        snapshot = latest_snapshot_id(a)
        data_a, data_b = (
            load_snapshot(a, snapshot, "user_temporal"),
            load_snapshot(b, snapshot, "user_temporal"),
        )
    model, _ = fit_model("ials", data_a, {"factors": 8, "iterations": 2}, progress=False)
    assert evaluate_model(model, data_a)["ndcg@10"] != evaluate_model(model, data_b)["ndcg@10"]

    results = [
        tune(wh, "ials", "user_temporal", trials=4, seed=3, params=SMALL_IALS) for wh in (clean, corrupt)
    ]
    rows = [[(t, p, v, s) for t, p, v, s, _ in _trials(wh)] for wh in (clean, corrupt)]
    assert len(rows[0]) == 4 and rows[0] == rows[1]
    assert results[0].best_params == results[1].best_params and results[0].best_value == results[1].best_value
    assert rows[0][0][1] == json.dumps(json.loads(rows[0][0][1]))  # stored as JSON
    defaults = {p.name: p.default for p in get_model_class("ials").all_params()}
    assert {k: v for k, v in json.loads(rows[0][0][1]).items() if k not in ("factors", "iterations")} == {
        k: defaults[k] for k in get_model_class("ials").search_space() if k != "factors"
    }  # trial 0: defaults
    assert results[0].best_value >= results[0].default_value  # never worse than the defaults on valid


# -- the pruner is fed the trainer's per-epoch validation ------------------------------------------
@pytest.mark.slow
def test_per_epoch_validation_feeds_the_pruner(base, tmp_path):
    wh = _copy(base, tmp_path)
    result = tune(
        wh,
        "mf",
        "user_temporal",
        trials=3,
        metric="rmse",
        seed=0,
        params=["factors=8", "epochs=4", "patience=4", "missing_weight=0", "batch_size=4096"],
    )
    with wh.connect(read_only=True) as con:
        rows = con.sql(
            "SELECT trial, state, value, intermediate FROM tuning_trials ORDER BY trial"
        ).fetchall()
        run_valid = con.execute("SELECT count(*) FROM model_runs").fetchone()[0]
    assert run_valid == 0  # a study records trials, never runs
    assert len(rows) == 3
    for trial, state, value, intermediate in rows:
        curve = json.loads(intermediate)
        assert [step for step, _ in curve] == list(range(len(curve))) and curve, trial
        if state == "complete":
            assert len(curve) == 4 and value == pytest.approx(min(v for _, v in curve), rel=1e-3)
        if state == "pruned":
            assert len(curve) < 4 and value == curve[-1][1]
    print(
        f"mf study: {result.trials} trials, {result.pruned} pruned; rmse {result.default_value:.4f} -> "
        f"{result.best_value:.4f}"
    )


# -- kill -9 mid-study, then resume ----------------------------------------------------------------
class _Logged:
    def __init__(self, argv: list[str]):
        self.proc = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env()
        )
        self.lines: list[str] = []
        self.reader = threading.Thread(target=lambda: self.lines.extend(iter(self.proc.stderr.readline, "")))
        self.reader.start()

    def finished_trials(self) -> int:
        return sum(" trial=" in line and " state=" in line for line in list(self.lines))


@pytest.mark.slow  # 5-15 s unloaded, minutes on a busy shared 2-core machine
def test_a_killed_tune_keeps_its_finished_trials_and_resumes(base, tmp_path):
    wh = _copy(base, tmp_path)
    args = [
        "tune",
        "ials",
        "--protocol",
        "random",
        "--seed",
        "1",
        *[a for p in SMALL_IALS for a in ("--param", p)],
    ]
    run = _Logged(_argv(wh.path, *args, "--trials", "40"))
    try:
        deadline = time.monotonic() + 180
        while run.finished_trials() < 3:
            assert run.proc.poll() is None and time.monotonic() < deadline, "".join(run.lines)
            time.sleep(0.1)
        run.proc.send_signal(signal.SIGKILL)
    finally:
        run.proc.kill()
        run.proc.wait(timeout=60)
        run.reader.join(timeout=60)
    assert run.proc.returncode == -signal.SIGKILL
    logged = run.finished_trials()
    before = _trials(wh)
    assert len(before) >= logged >= 3  # every trial logged as finished was committed first
    assert [t[0] for t in before] == list(range(len(before)))
    with wh.connect(read_only=True) as con:
        assert con.execute("SELECT count(*) FROM tuned_params").fetchone() == (0,)  # the study never ended

    total = len(before) + 2
    done = subprocess.run(
        _argv(wh.path, "-q", *args, "--trials", str(total)),
        capture_output=True,
        text=True,
        env=_env(),
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert f"{total} trials" in done.stdout and f"{len(before)} resumed" in done.stdout, done.stdout
    after = _trials(wh)
    assert after[: len(before)] == before  # the finished trials kept as they were
    assert [t[0] for t in after] == list(range(total)) and all(t[3] in ("complete", "pruned") for t in after)
    searched = [
        {k: v for k, v in json.loads(t[1]).items() if k not in ("factors", "iterations")} for t in after
    ]
    assert all(s not in searched[:n] for n, s in enumerate(searched))  # the resumed sampler repeats no trial
    with wh.connect(read_only=True) as con:
        family, params, value, trials = con.execute(
            "SELECT family, params, value, trials FROM tuned_params"
        ).fetchone()
    assert (family, trials) == ("ials", total)
    assert value == max(t[2] for t in after if t[3] == "complete")
    # the same command once more: the study is complete, nothing runs, no second setting is stored
    again = subprocess.run(
        _argv(wh.path, "-q", *args, "--trials", str(total)),
        capture_output=True,
        text=True,
        env=_env(),
        timeout=300,
    )
    assert again.returncode == 0 and _trials(wh) == after, again.stderr
    with wh.connect(read_only=True) as con:
        assert con.execute("SELECT count(*) FROM tuned_params").fetchone() == (1,)


# -- the tuned setting: train --tuned, params = "tuned" in a job -----------------------------------
@pytest.mark.slow  # 5-15 s unloaded, minutes on a busy shared 2-core machine
def test_train_tuned_and_the_job_step_use_the_tuned_setting(base, tmp_path):
    from batchrec.jobs import run_job
    from batchrec.runs import find_runs
    from batchrec.train import train_model

    wh = _copy(base, tmp_path / "wh")
    job = tmp_path / "t.toml"
    job.write_text('[job]\nname = "t"\n[[steps]]\nstep = "train"\nmodel = "ials"\nparams = "tuned"\n')
    # no tuned setting yet: the job falls back to the defaults and says so
    assert "params defaults (no tuned setting)" in run_job(wh, job)
    result = tune(wh, "ials", "random", trials=3, seed=2, params=SMALL_IALS)
    summary = train_model(
        wh, "ials", tuned=True, params=["iterations=3"]
    )  # --param on top of the tuned setting
    assert f"params tuned (study {result.study}" in summary
    assert "skipped" not in run_job(wh, job)  # a new tuned setting is a new input of the step
    with wh.connect(read_only=True) as con:
        runs = find_runs(con, model="ials")
    assert runs[0]["params"] == runs[0]["params"] | result.best_params  # the job's run: the tuned setting
    assert runs[1]["params"] == runs[1]["params"] | result.best_params | {"iterations": 3}
    assert (
        runs[2]["params"]["factors"] == get_model_class("ials")(**{}).params["factors"]
    )  # the fallback: defaults


def test_job_files_name_the_tuned_setting_and_the_weekly_tune():
    _, nightly = load_job(ROOT / "jobs" / "nightly.toml")
    assert [s["params"] for s in nightly if s["kind"] == "train"] == ["tuned"]
    _, weekly = load_job(ROOT / "jobs" / "weekly-tune.toml")
    tune_step = [s for s in weekly if s["kind"] == "tune"]
    assert [(s["model"], s["protocol"]) for s in tune_step] == [("ease", "user_temporal")]
    assert [s["model"] for s in nightly if s["kind"] == "train"] == [
        tune_step[0]["model"]
    ]  # the shipped family


@pytest.mark.parametrize(
    "text, message",
    [
        ('[[steps]]\nstep = "train"\nmodel = "ease"\nparams = "tunned"\n', "params = 'tunned' is not valid"),
        ('[[steps]]\nstep = "tune"\nprotocol = "random"\n', 'needs model = "..."'),
        ('[[steps]]\nstep = "tune"\nmodel = "ease"\ntrials = 0\n', "trials = 0 is not valid"),
        ('[[steps]]\nstep = "tune"\nmodel = "ease"\ntrails = 5\n', "unknown option 'trails'"),
    ],
)
def test_bad_tune_job_steps_are_one_line(tmp_path, text, message):
    bad = tmp_path / "bad.toml"
    bad.write_text(text)
    with pytest.raises(BatchrecError, match=re.escape(message)) as caught:
        load_job(bad)
    assert "\n" not in str(caught.value)


def test_a_resumed_study_does_not_draw_its_first_run_trials_again(base, tmp_path):
    """Trial 2 of a study resumed after 2 trials is still a random startup trial: drawn from the
    plain seed again, it would repeat trial 1."""
    wh = _copy(base, tmp_path)
    tune(wh, "ials", "random", trials=2, seed=5, params=SMALL_IALS)
    tune(wh, "ials", "random", trials=3, seed=5, params=SMALL_IALS)
    params = [json.loads(t[1]) for t in _trials(wh)]
    assert len(params) == 3 and params[2] != params[1] and params[2] != params[0]
