"""Options that the command line and job files share: each default, bound and help text written once.

A command's click option and the same key in a job file's `[[steps]]` table are built from one
`Option` here (`Option.click` for the CLI, `Option.field` for the pydantic job schema in
`batchrec.jobs`), so a default changes in one place and the job file checks what the CLI checks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal, Optional, Union

import click

# Seeds are at most 32 bits: what numpy's RandomState and every torch generator accept, and
# small enough that derived seeds (seed * 1_000_003 + offset) stay inside torch's 64 bits.
SEED_MIN, SEED_MAX = 0, 2**32 - 1

DEVICES = ("auto", "cpu", "cuda")
EXECUTORS = ("local", "ray")  # where independent tasks run: batchrec.executors

# An explicit rating at or above this marks an item the user liked: relevant when evaluating, and
# a positive where the protocols and validators need one.
RELEVANCE_THRESHOLD = 4.0


class FiniteFloat(click.ParamType):
    """A float option that refuses nan and +-inf (which pass every `<`/`>` bound check)."""

    name = "float"

    def __init__(self, minimum: float | None = None):
        self.minimum = minimum

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        try:
            number = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number", param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        if self.minimum is not None and number < self.minimum:
            self.fail(f"{value!r} is below the minimum {self.minimum}", param, ctx)
        return number


@dataclass(frozen=True)
class Option:
    """One option: its type, default, bounds and help, for click and for a job file's schema."""

    type: type
    default: Any
    help: str
    min: int | float | None = None
    choices: tuple[str, ...] | None = None
    multiple: bool = False  # repeatable on the command line, a list of strings in a job file
    required: bool = False  # job files only (on the command line it is an argument)
    keywords: tuple[str, ...] = ()  # job files only: words accepted instead of a list (params = "tuned")

    def click(self, *flags: str, **extra: Any):
        """The click option decorator for `flags` (extra keywords go to `click.option`)."""
        if self.choices is not None:
            kind: Any = click.Choice(self.choices)
        elif self.type is float:
            kind = FiniteFloat(self.min)
        elif self.min is not None:
            kind = click.IntRange(min=self.min)
        else:
            kind = self.type
        if self.type is bool:
            return click.option(*flags, is_flag=True, default=self.default, help=self.help, **extra)
        if self.multiple:
            return click.option(*flags, type=kind, multiple=True, help=self.help, **extra)
        return click.option(
            *flags,
            type=kind,
            default=self.default,
            show_default=self.default is not None,
            help=self.help,
            **extra,
        )

    def field(self) -> tuple[Any, Any]:
        """(annotation, pydantic Field) of this option as a job file key."""
        from pydantic import Field

        kind: Any = list[str] if self.multiple else Literal[self.choices] if self.choices else self.type
        if self.keywords:
            kind = Union[kind, Literal[self.keywords]]  # noqa: UP007 (built at run time from type objects)
        if self.default is None and not self.required:
            kind = Optional[kind]  # noqa: UP045 (built at run time from a type object)
        default = ... if self.required else list(self.default or ()) if self.multiple else self.default
        finite = {"allow_inf_nan": False} if self.type is float else {}
        return kind, Field(default, ge=self.min, description=self.help, **finite)


# -- ingest -----------------------------------------------------------------------------------
INGEST_DATASET = Option(
    str, None, "Ingest a dataset embedded in the package instead of PATH.", choices=("ml-latest-small",)
)
INGEST_PATH = Option(str, None, "A file, folder or zip of raw files.")
INGEST_FORMAT = Option(str, "auto", "auto, ml-100k, ml-1m, ml-10m, ml-csv or generic.")
INGEST_QUARANTINE = Option(
    bool, False, "Load the good rows and keep every bad row in the `quarantine` table instead of failing."
)
INGEST_COLUMNS = Option(
    str,
    None,
    "Generic reader column mapping, e.g. 'user_id=UserID,item_id=MovieID,rating=Rating,ts=Timestamp'.",
)

# -- features ---------------------------------------------------------------------------------
FEATURES_AS_OF = Option(str, None, "Cutoff timestamp (UTC); nothing at or after it is used [default: now].")
FEATURES_PROTOCOLS = Option(str, "all", "Comma-separated split protocols, or 'all'.")
FEATURES_PARAMS = Option(str, (), "Snapshot parameter override KEY=VALUE (repeatable).", multiple=True)
FEATURES_KEEP = Option(int, 5, "Snapshots to retain; older ones are pruned.", min=1)

# -- train ------------------------------------------------------------------------------------
MODEL = Option(str, None, "Model family (see `batchrec models`).")
TRAIN_MODEL = Option(str, None, "Model family (see `batchrec models`).", required=True)
TRAIN_SNAPSHOT = Option(str, "latest", "Feature snapshot id.")
TRAIN_PROTOCOL = Option(str, None, "Fit on this protocol's train part, early-stop on its valid part.")
TRAIN_PARAMS = Option(
    str,
    (),
    "Model parameter KEY=VALUE (repeatable); see `batchrec models`.",
    multiple=True,
    keywords=("tuned",),
)
TRAIN_TUNED = Option(
    bool,
    False,
    "Start from the family's tuned setting (`batchrec tune`; its defaults, logged, when "
    'it has none); --param overrides it. In a job file: params = "tuned".',
)
DEVICE = Option(str, "auto", "Where to fit or score.", choices=DEVICES)
MLFLOW = Option(
    bool,
    False,
    "Log to MLflow (needs the extra batchrec[mlflow]; also on whenever MLFLOW_TRACKING_URI is set).",
)
TRAIN_NPROC = Option(
    int,
    1,
    "Train data-parallel in this many processes on this machine (torch DDP: gloo on CPU, "
    "nccl with one GPU each on CUDA; neural families). Under torchrun leave it out: the "
    "launcher decides.",
    min=1,
)

# -- score ------------------------------------------------------------------------------------
SCORE_MODEL = Option(str, None, "Use the latest run of this model family.")
TOP_N = Option(int, 10, "List length per user.", min=1)
MEMORY_BUDGET = Option(str, "1GB", "Scores held at once per block, e.g. 512MB, 2GB.")
RETENTION_DAYS = Option(int, 30, "Days of earlier runs kept in recommendation_history.", min=0)

# -- executors: where shards and evaluation runs run (batchrec.executors) -------------------------
EXECUTOR = Option(
    str,
    "local",
    "Where tasks run: local (this process) or ray (a Ray cluster; pip install 'batchrec[ray]').",
    choices=EXECUTORS,
)
RAY_ADDRESS = Option(
    str,
    None,
    "Address of a running Ray cluster, e.g. 10.0.0.5:6379 or auto "
    "[default: $RAY_ADDRESS, else a local cluster for this command].",
)
TASK_CPUS = Option(float, 1.0, "CPUs per task on the executor (also each task's thread limit).", min=0.0)
TASK_GPUS = Option(float, 0.0, "GPUs per task on the executor (score with --device cuda then).", min=0.0)
SHARDS = Option(int, None, "Score in N shards, one task each, then publish once when all are in.", min=1)
SHARDS_URI = Option(
    str,
    None,
    "Where shard files go: a path, file:// or s3://bucket/prefix "
    "[default: <warehouse stem>.shards/ beside the warehouse].",
)

# -- the publish gate (batchrec.gate) ---------------------------------------------------------
GATE_METRIC = Option(
    str,
    None,
    "Headline metric the gate compares, e.g. ndcg@10, recall@20, rmse "
    "[default: ndcg@10 for rankers, rmse for rating models].",
)
GATE_TOLERANCE = Option(
    float,
    0.05,
    "How much worse than the live run's measurement the candidate may be, relative (0.05: 5%).",
    min=0.0,
)
FORCE = Option(bool, False, "Publish even when the gate refuses (recorded as 'forced' in publish_log).")

# -- evaluate ---------------------------------------------------------------------------------
EVALUATE_MODELS = Option(str, None, "Comma-separated model families (trains them if needed).")
EVALUATE_PROTOCOL = Option(str, "user_temporal", "Split protocol or preset.")
EVALUATE_KS = Option(str, "5,10,20", "Comma-separated cut-offs.")
EVALUATE_REPORT = Option(str, "reports", "Folder of the HTML report.")
EVALUATE_THRESHOLD = Option(float, RELEVANCE_THRESHOLD, "Relevant = test rating >= threshold.")
EVALUATE_BOOTSTRAP = Option(
    int, 1000, "Bootstrap resamples of the users for the 95% intervals and the paired tests (0: none).", min=0
)
EVALUATE_SEED = Option(int, 0, "Seed of the bootstrap resamples.", min=0)

# The protocol the gate reads the candidate's measurement on: the one `evaluate` measures by default.
GATE_PROTOCOL = Option(
    str,
    EVALUATE_PROTOCOL.default,
    "Protocol (or preset) of the measurements the gate compares; the job's evaluate step must measure it.",
)

# -- tune -------------------------------------------------------------------------------------
TUNE_MODEL = Option(
    str, None, "Model family to tune (one with a search space: see `batchrec models`).", required=True
)
TUNE_PROTOCOL = Option(
    str,
    EVALUATE_PROTOCOL.default,
    "Split protocol whose valid part measures each trial (its test part is never read).",
)
TUNE_TRIALS = Option(int, 20, "Trials of the study in all (a resumed study counts its finished ones).", min=1)
TUNE_TIMEOUT = Option(float, None, "Seconds after which no new trial starts [default: no limit].", min=1.0)
TUNE_METRIC = Option(
    str,
    None,
    "Validation metric to optimise: ndcg@10 (or precision/recall/hit_rate/map/mrr@K) "
    "or rmse [default: ndcg@10 for rankers, rmse for rating models].",
)
TUNE_SEED = Option(int, 0, "Seed of the TPE sampler.", min=SEED_MIN)
TUNE_PARAMS = Option(
    str,
    (),
    "Parameter KEY=VALUE held fixed in every trial (repeatable; a searched one is then not searched).",
    multiple=True,
)

# -- recommend --------------------------------------------------------------------------------
HISTORY = Option(int, 10, "Recent ratings to show.", min=0)
