"""The `batchrec` command line: a thin click layer.

Each command parses its options and calls one function of the module that owns the step; heavy
imports (torch, the models) happen inside the command so `batchrec --help` stays instant.
Every `BatchrecError` becomes one `error: ...` line on stderr and a non-zero exit.
"""

from __future__ import annotations

import sys
import traceback

import click

from batchrec import logs, options
from batchrec.cli_help import HelpCommand, HelpDetails
from batchrec.errors import BatchrecError, Interrupted, as_fault
from batchrec.ingest.sources import ZIP_MAX_RATIO, ZIP_MAX_SIZE
from batchrec.ingest.spec import HALF_STARS, MAX_FUTURE
from batchrec.warehouse import Warehouse

_VERBOSE_HELP, _QUIET_HELP = "More log output (repeatable).", "Less log output (repeatable)."
_FORMAT_HELP = "Log lines: text, kv (key=value) or json [default: text on a terminal, else kv]."


def _log_options() -> list[click.Option]:
    """-v/-q/--log-format after a subcommand too: added to every subcommand, on top of the group's."""
    return [
        click.Option(
            ["-v", "--verbose"],
            count=True,
            expose_value=False,
            help=_VERBOSE_HELP,
            callback=lambda ctx, param, n: n and logs.adjust(verbose=n),
        ),
        click.Option(
            ["-q", "--quiet"],
            count=True,
            expose_value=False,
            help=_QUIET_HELP,
            callback=lambda ctx, param, n: n and logs.adjust(quiet=n),
        ),
        click.Option(
            ["--log-format"],
            type=click.Choice(logs.LOG_FORMATS),
            default=None,
            expose_value=False,
            help=_FORMAT_HELP,
            callback=lambda ctx, param, fmt: fmt and logs.adjust(fmt=fmt),
        ),
    ]


def _one_line(text: str) -> str:
    """Line breaks joined into one line; spaces inside a line kept (a quoted value may be blanks)."""
    return " ".join(part.strip() for part in str(text).splitlines() if part.strip())


class _Group(HelpDetails, click.Group):
    """Every failure ends in ONE `error: ...` line on stderr and a non-zero exit, never a traceback:
    BatchrecError (its exit code), usage errors (2), machine faults such as a full disk or a
    read-only file system (`errors.as_fault`, 74), SIGINT (130, saying what had been committed by
    then), anything unexpected (1; `-v` adds the traceback). Every command it holds takes the log
    options and shows its details and example in --help."""

    command_class = HelpCommand
    group_class = type  # subgroups (features) are _Group too

    def add_command(self, cmd: click.Command, name: str | None = None) -> None:
        cmd.params.extend(_log_options())
        super().add_command(cmd, name)

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except BaseException as exc:
            if isinstance(exc, SystemExit):
                raise
            error = exc if isinstance(exc, BatchrecError) else as_fault(exc)
            if isinstance(exc, KeyboardInterrupt) or isinstance(error, Interrupted):
                error = _interrupted()
            if error is None:
                if ctx.params.get("verbose"):
                    traceback.print_exc()
                error = BatchrecError(
                    f"unexpected {type(exc).__name__}: {_one_line(exc) or 'no message'} "
                    "(run with -v for the traceback)"
                )
            click.echo(f"error: {_one_line(error)}", err=True)
            ctx.exit(error.exit_code)

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        """Click's main, with usage errors (bad option, unknown command, ...) as one line, exit 2."""
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.ClickException as exc:
            where = exc.ctx.command_path if getattr(exc, "ctx", None) else "batchrec"
            click.echo(
                f"error: {_one_line(exc.format_message()).rstrip('.')} (see `{where} --help`)", err=True
            )
            sys.exit(exc.exit_code)
        except click.Abort:  # SIGINT while click itself was parsing
            click.echo(f"error: {_one_line(_interrupted())}", err=True)
            sys.exit(Interrupted.exit_code)
        sys.exit(code if isinstance(code, int) else 0)


def _interrupted() -> Interrupted:
    """What a SIGINT stopped, from what this process had committed to the warehouse by then."""
    from batchrec.warehouse import committed

    done = committed()
    if not done:
        return Interrupted("interrupted (SIGINT) before anything was committed: the warehouse is unchanged")
    return Interrupted(
        f"interrupted (SIGINT) after committing {'; '.join(done)}: that is in the warehouse, "
        "the rest of the command did not run"
    )


@click.group(cls=_Group)
@click.option(
    "--warehouse",
    "warehouse_path",
    type=click.Path(dir_okay=False),
    default=None,
    help="DuckDB warehouse file [default: $BATCHREC_WAREHOUSE or warehouse/batchrec.duckdb].",
)
@click.option(
    "--artifacts",
    default=None,
    metavar="URI",
    help="Where model artifacts are written [default: <warehouse stem>.artifacts/ beside the warehouse].",
)
@click.option("-v", "--verbose", count=True, help=_VERBOSE_HELP)
@click.option("-q", "--quiet", count=True, help=_QUIET_HELP)
@click.option(
    "--log-format", type=click.Choice(logs.LOG_FORMATS), default=logs.DEFAULT_FORMAT, help=_FORMAT_HELP
)
@click.version_option(package_name="batchrec")
@click.pass_context
def main(
    ctx: click.Context,
    warehouse_path: str | None,
    artifacts: str | None,
    verbose: int,
    quiet: int,
    log_format: str,
) -> None:
    """Batch recommendations: ingest -> features -> train -> score -> evaluate."""
    logs.configure(verbose, quiet, log_format)
    ctx.obj = Warehouse(warehouse_path, artifacts=artifacts)


pass_wh = click.make_pass_decorator(Warehouse)


# -- ingest ------------------------------------------------------------------------------------
@main.command()
@click.argument("path", required=False, type=click.Path())
@options.INGEST_DATASET.click("--dataset")
@options.INGEST_FORMAT.click("--format", "fmt")
@options.INGEST_QUARANTINE.click("--quarantine")
@options.INGEST_COLUMNS.click("--columns")
@click.option(
    "--rating-scale",
    default=None,
    metavar="MIN..MAX[:STEP]",
    help=f"Scale of generic ratings, e.g. 1..10 or 0.5..5:0.5 [default: the warehouse's, set by its first "
    f"load; {HALF_STARS} in a new warehouse].",
)
@click.option(
    "--max-future",
    default=MAX_FUTURE,
    show_default=True,
    metavar="DURATION",
    help="Timestamps later than the ingest time plus this are bad rows (e.g. 0s, 12h, 2d).",
)
@click.option(
    "--zip-max-size",
    default=ZIP_MAX_SIZE,
    show_default=True,
    metavar="SIZE",
    help="Largest size a zip member may unzip to.",
)
@click.option(
    "--zip-max-ratio",
    default=ZIP_MAX_RATIO,
    show_default=True,
    type=str,
    metavar="N",
    help="Most a zip member may expand, in times its compressed size (members under 1 MiB excepted).",
)
@pass_wh
def ingest(
    wh: Warehouse,
    path,
    dataset,
    fmt,
    quarantine,
    columns,
    rating_scale,
    max_future,
    zip_max_size,
    zip_max_ratio,
) -> None:
    """Load raw MovieLens (any release) or generic CSV/Parquet files into the warehouse."""
    from batchrec import api

    click.echo(
        api.ingest(
            path,
            dataset=dataset,
            format=fmt,
            quarantine=quarantine,
            columns=columns,
            rating_scale=rating_scale,
            max_future=max_future,
            zip_max_size=zip_max_size,
            zip_max_ratio=zip_max_ratio,
            warehouse=wh,
        )
    )


# -- synth -------------------------------------------------------------------------------------
@main.command()
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--users", type=click.IntRange(min=1), default=1000, show_default=True)
@click.option("--items", type=click.IntRange(min=1), default=2000, show_default=True)
@click.option("--ratings", type=click.IntRange(min=1), default=100_000, show_default=True)
@click.option(
    "--tags", type=click.IntRange(min=0), default=None, help="Tag applications [default: ratings/40]."
)
@click.option("--seed", type=int, default=0, show_default=True)
def synth(out, users, items, ratings, tags, seed) -> None:
    """Write a synthetic MovieLens-format dataset (ratings/movies/tags CSV) to OUT."""
    from batchrec.synth import write_synthetic

    click.echo(write_synthetic(out, n_users=users, n_items=items, n_ratings=ratings, n_tags=tags, seed=seed))


# -- features ----------------------------------------------------------------------------------
@main.group(invoke_without_command=True)
@options.FEATURES_AS_OF.click("--as-of", "as_of")
@options.FEATURES_PROTOCOLS.click("--protocols")
@options.FEATURES_PARAMS.click("--param", "params", metavar="KEY=VALUE")
@options.FEATURES_KEEP.click("--keep")
@click.pass_context
def features(ctx: click.Context, as_of, protocols, params, keep) -> None:
    """Build a point-in-time feature snapshot (or `features list`)."""
    if ctx.invoked_subcommand is not None:
        return
    from batchrec import api

    click.echo(
        api.build_features(
            as_of, protocols=protocols, params=params, keep=keep, warehouse=ctx.find_object(Warehouse)
        )
    )


@features.command("list")
@pass_wh
def features_list(wh: Warehouse) -> None:
    """List feature snapshots, newest first."""
    from batchrec.features import list_snapshots

    click.echo(list_snapshots(wh))


# -- train -------------------------------------------------------------------------------------
@main.command()
@click.argument("model")
@options.TRAIN_SNAPSHOT.click("--snapshot")
@options.TRAIN_PROTOCOL.click("--protocol")
@options.TRAIN_PARAMS.click("--param", "params", metavar="KEY=VALUE")
@options.TRAIN_TUNED.click("--tuned")
@options.DEVICE.click("--device")
@options.MLFLOW.click("--mlflow")
@options.TRAIN_NPROC.click("--nproc")
@pass_wh
def train(wh: Warehouse, model, snapshot, protocol, params, tuned, device, mlflow, nproc) -> None:
    """Fit MODEL on a feature snapshot and record a model run."""
    from batchrec import api

    # no --mlflow: tracking only when MLFLOW_TRACKING_URI is set (None), never switched off here
    run = api.train(
        model,
        params,
        protocol,
        snapshot,
        device=device,
        mlflow=mlflow or None,
        nproc=nproc,
        tuned=tuned,
        warehouse=wh,
    )
    click.echo(run if run is not None else "this rank is done (rank 0 records the run)")


@main.command()
@click.argument("model")
@options.TUNE_PROTOCOL.click("--protocol")
@options.TUNE_TRIALS.click("--trials")
@options.TUNE_TIMEOUT.click("--timeout")
@options.TUNE_METRIC.click("--metric")
@options.TUNE_SEED.click("--seed")
@options.TUNE_PARAMS.click("--param", "params", metavar="KEY=VALUE")
@options.TRAIN_SNAPSHOT.click("--snapshot")
@options.DEVICE.click("--device")
@pass_wh
def tune(wh: Warehouse, model, protocol, trials, timeout, metric, seed, params, snapshot, device) -> None:
    """Search MODEL's parameters on a protocol's validation part (Optuna); store the best as its tuned setting."""
    from batchrec.tune import tune as run_study

    click.echo(
        run_study(
            wh,
            model,
            protocol,
            trials,
            timeout,
            metric,
            seed,
            params=params,
            snapshot=snapshot,
            device=device,
        ).summary()
    )


@main.command()
def models() -> None:
    """List model families and their parameters with defaults."""
    from batchrec.models import describe_models

    click.echo(describe_models())


# -- score -------------------------------------------------------------------------------------
@main.command()
@click.option(
    "--run",
    "run_id",
    default=None,
    help="Run id, or 'latest' [default: latest run of --model, else latest run].",
)
@options.SCORE_MODEL.click("--model")
@options.TOP_N.click("--top-n")
@click.option(
    "--shard", default=None, metavar="i/N", help="Score one deterministic partition of users to Parquet."
)
@click.option(
    "--publish", "publish_run", default=None, metavar="RUN", help="Publish the union of RUN's shards."
)
@click.option(
    "--users",
    "users_file",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="Score only the user ids listed in this file (one per line / a user_id column).",
)
@click.option(
    "--pairs",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="Score the (user_id, item_id) pairs in this CSV/Parquet file instead.",
)
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="Output file for --pairs.")
@options.MEMORY_BUDGET.click("--memory-budget")
@options.RETENTION_DAYS.click("--retention-days")
@options.DEVICE.click("--device")
@options.GATE_METRIC.click("--gate-metric")
@options.GATE_TOLERANCE.click("--gate-tolerance")
@options.GATE_PROTOCOL.click("--gate-protocol")
@options.FORCE.click("--force")
@options.EXECUTOR.click("--executor")
@options.RAY_ADDRESS.click("--ray-address")
@options.SHARDS.click("--shards")
@options.SHARDS_URI.click("--shards-uri")
@options.TASK_CPUS.click("--task-cpus")
@options.TASK_GPUS.click("--task-gpus")
@pass_wh
def score(
    wh: Warehouse,
    run_id,
    model,
    top_n,
    shard,
    publish_run,
    users_file,
    pairs,
    out,
    memory_budget,
    retention_days,
    device,
    gate_metric,
    gate_tolerance,
    gate_protocol,
    force,
    executor,
    ray_address,
    shards,
    shards_uri,
    task_cpus,
    task_gpus,
) -> None:
    """Write every user's top-N (seen items removed, cold start served) to `recommendations`.

    A full publish passes the publish gate first (exit code 3 when it refuses; see the README)."""
    from batchrec import scoring
    from batchrec.gate import GateSettings

    gate = GateSettings(metric=gate_metric, tolerance=gate_tolerance, protocol=gate_protocol, force=force)
    click.echo(
        scoring.score_command(
            wh,
            run_id=run_id,
            model=model,
            top_n=top_n,
            shard=shard,
            publish_run=publish_run,
            users_file=users_file,
            pairs=pairs,
            out=out,
            memory_budget=memory_budget,
            retention_days=retention_days,
            device=device,
            gate=gate,
            executor=executor,
            ray_address=ray_address,
            shards=shards,
            shards_uri=shards_uri,
            task_cpus=task_cpus,
            task_gpus=task_gpus,
        )
    )


# -- evaluate ----------------------------------------------------------------------------------
@main.command()
@click.option("--runs", default=None, help="Comma-separated run ids.")
@options.EVALUATE_MODELS.click("--models", "model_names")
@options.EVALUATE_PROTOCOL.click("--protocol")
@options.EVALUATE_KS.click("--k", "ks")
@options.EVALUATE_REPORT.click("--report", "report_dir")
@click.option("--compare", is_flag=True, help="Highlight the best run per metric.")
@options.EVALUATE_THRESHOLD.click("--threshold")
@click.option(
    "--metrics",
    default=None,
    help="Comma-separated metrics to keep, e.g. rmse,ndcg,recall@10 [default: all].",
)
@options.EVALUATE_BOOTSTRAP.click("--bootstrap")
@options.EVALUATE_SEED.click("--seed")
@options.EXECUTOR.click("--executor")
@options.RAY_ADDRESS.click("--ray-address")
@options.TASK_CPUS.click("--task-cpus")
@options.TASK_GPUS.click("--task-gpus")
@options.MLFLOW.click("--mlflow")
@pass_wh
def evaluate(
    wh: Warehouse,
    runs,
    model_names,
    protocol,
    ks,
    report_dir,
    compare,
    threshold,
    metrics,
    bootstrap,
    seed,
    executor,
    ray_address,
    task_cpus,
    task_gpus,
    mlflow,
) -> None:
    """Evaluate runs on a protocol's test part; write `evaluations` (with 95% intervals) and an HTML report."""
    from batchrec.evaluate import evaluate_command  # the text form of what `batchrec.api.evaluate` returns

    click.echo(
        evaluate_command(
            wh,
            runs=runs,
            models=model_names,
            protocol=protocol,
            ks=ks,
            report_dir=report_dir,
            compare=compare,
            threshold=threshold,
            metrics=metrics,
            bootstrap=bootstrap,
            seed=seed,
            executor=executor,
            ray_address=ray_address,
            task_cpus=task_cpus,
            task_gpus=task_gpus,
            mlflow=mlflow or None,
        )
    )


# -- operations --------------------------------------------------------------------------------
@main.command()
@click.argument("job_file", type=click.Path(exists=True, dir_okay=False))
@options.FORCE.click("--force")
@pass_wh
def run(wh: Warehouse, job_file, force) -> None:
    """Run the steps of a job file (e.g. jobs/nightly.toml), recording each in `job_runs`."""
    from batchrec.jobs import run_job

    click.echo(run_job(wh, job_file, force=force))


@main.command()
@click.argument("user_id", type=int)
@options.HISTORY.click("--history")
@pass_wh
def recommend(wh: Warehouse, user_id, history) -> None:
    """Print USER_ID's current recommendations with titles, scores and reasons."""
    from batchrec.ops import recommend_text

    click.echo(recommend_text(wh, user_id, history=history))


@main.command()
@pass_wh
def status(wh: Warehouse) -> None:
    """The warehouse at a glance."""
    from batchrec.ops import status_text

    click.echo(status_text(wh))


@main.command()
@click.option("--table", default="recommendations", show_default=True, help="Serving table or view to write.")
@click.option(
    "--to",
    "to",
    required=True,
    type=click.Path(dir_okay=False),
    help="Output file: PATH.parquet or PATH.csv.",
)
@pass_wh
def export(wh: Warehouse, table, to) -> None:
    """Write a table of the serving database to Parquet or CSV for downstream systems (atomically)."""
    from batchrec.serving import export as export_table

    click.echo(export_table(wh, table, to))


@main.command()
@click.argument("query")
@click.option("--format", "fmt", type=click.Choice(["table", "csv"]), default="table", show_default=True)
@pass_wh
def sql(wh: Warehouse, query, fmt) -> None:
    """Run read-only SQL against the serving database (the warehouse as of its last publish)."""
    from batchrec.ops import sql_text

    click.echo(sql_text(wh, query, fmt=fmt))
