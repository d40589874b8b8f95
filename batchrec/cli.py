"""The `batchrec` command line: a thin click layer.

Each command parses its options and calls one function of the module that owns the step; heavy
imports (torch, the models) happen inside the command so `batchrec --help` stays instant.
Every `BatchrecError` becomes one `error: ...` line on stderr and a non-zero exit.
"""

from __future__ import annotations

import click

from batchrec import logs
from batchrec.cli_help import HelpCommand, HelpDetails
from batchrec.errors import BatchrecError
from batchrec.ingest.sources import ZIP_MAX_RATIO, ZIP_MAX_SIZE
from batchrec.ingest.spec import HALF_STARS, MAX_FUTURE
from batchrec.warehouse import Warehouse


_VERBOSE_HELP, _QUIET_HELP = "More log output (repeatable).", "Less log output (repeatable)."
_FORMAT_HELP = "Log lines: text, kv (key=value) or json [default: text on a terminal, else kv]."


def _log_options() -> list[click.Option]:
    """-v/-q/--log-format after a subcommand too: added to every subcommand, on top of the group's."""
    return [
        click.Option(["-v", "--verbose"], count=True, expose_value=False, help=_VERBOSE_HELP,
                     callback=lambda ctx, param, n: n and logs.adjust(verbose=n)),
        click.Option(["-q", "--quiet"], count=True, expose_value=False, help=_QUIET_HELP,
                     callback=lambda ctx, param, n: n and logs.adjust(quiet=n)),
        click.Option(["--log-format"], type=click.Choice(logs.LOG_FORMATS), default=None, expose_value=False,
                     help=_FORMAT_HELP, callback=lambda ctx, param, fmt: fmt and logs.adjust(fmt=fmt)),
    ]


class _Group(HelpDetails, click.Group):
    """Turns BatchrecError into one line and an exit code instead of a traceback; every command
    it holds takes the log options and shows its details and example in --help."""

    command_class = HelpCommand
    group_class = type  # subgroups (features) are _Group too

    def add_command(self, cmd: click.Command, name: str | None = None) -> None:
        cmd.params.extend(_log_options())
        super().add_command(cmd, name)

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except BatchrecError as exc:
            click.echo(f"error: {exc}", err=True)
            ctx.exit(exc.exit_code)


@click.group(cls=_Group)
@click.option("--warehouse", "warehouse_path", type=click.Path(dir_okay=False), default=None,
              help="DuckDB warehouse file [default: $BATCHREC_WAREHOUSE or warehouse/batchrec.duckdb].")
@click.option("--artifacts", default=None, metavar="URI",
              help="Where model artifacts are written [default: <warehouse stem>.artifacts/ beside the warehouse].")
@click.option("-v", "--verbose", count=True, help=_VERBOSE_HELP)
@click.option("-q", "--quiet", count=True, help=_QUIET_HELP)
@click.option("--log-format", type=click.Choice(logs.LOG_FORMATS), default=logs.DEFAULT_FORMAT, help=_FORMAT_HELP)
@click.version_option(package_name="batchrec")
@click.pass_context
def main(ctx: click.Context, warehouse_path: str | None, artifacts: str | None, verbose: int, quiet: int,
         log_format: str) -> None:
    """Batch recommendations: ingest -> features -> train -> score -> evaluate."""
    logs.configure(verbose, quiet, log_format)
    ctx.obj = Warehouse(warehouse_path, artifacts=artifacts)


pass_wh = click.make_pass_decorator(Warehouse)


# -- ingest ------------------------------------------------------------------------------------
@main.command()
@click.argument("path", required=False, type=click.Path())
@click.option("--dataset", type=click.Choice(["ml-latest-small"]), default=None,
              help="Ingest a dataset embedded in the package instead of PATH.")
@click.option("--format", "fmt", default="auto", show_default=True,
              help="auto, ml-100k, ml-1m, ml-10m, ml-csv or generic.")
@click.option("--quarantine", is_flag=True,
              help="Load the good rows and keep every bad row in the `quarantine` table instead of failing.")
@click.option("--columns", default=None,
              help="Generic reader column mapping, e.g. 'user_id=UserID,item_id=MovieID,rating=Rating,ts=Timestamp'.")
@click.option("--rating-scale", default=None, metavar="MIN..MAX[:STEP]",
              help=f"Scale of generic ratings, e.g. 1..10 or 0.5..5:0.5 [default: the warehouse's, set by its first "
                   f"load; {HALF_STARS} in a new warehouse].")
@click.option("--max-future", default=MAX_FUTURE, show_default=True, metavar="DURATION",
              help="Timestamps later than the ingest time plus this are bad rows (e.g. 0s, 12h, 2d).")
@click.option("--zip-max-size", default=ZIP_MAX_SIZE, show_default=True, metavar="SIZE",
              help="Largest size a zip member may unzip to.")
@click.option("--zip-max-ratio", default=ZIP_MAX_RATIO, show_default=True, type=str, metavar="N",
              help="Most a zip member may expand, in times its compressed size (members under 1 MiB excepted).")
@pass_wh
def ingest(wh: Warehouse, path, dataset, fmt, quarantine, columns, rating_scale, max_future, zip_max_size,
           zip_max_ratio) -> None:
    """Load raw MovieLens (any release) or generic CSV/Parquet files into the warehouse."""
    from batchrec.ingest import ingest_path

    if (path is None) == (dataset is None):
        raise BatchrecError("give exactly one of PATH or --dataset")
    summary = ingest_path(wh, path=path, dataset=dataset, fmt=fmt, quarantine=quarantine, columns=columns,
                          rating_scale=rating_scale, max_future=max_future, zip_max_size=zip_max_size,
                          zip_max_ratio=zip_max_ratio)
    click.echo(summary)


# -- synth -------------------------------------------------------------------------------------
@main.command()
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--users", type=click.IntRange(min=1), default=1000, show_default=True)
@click.option("--items", type=click.IntRange(min=1), default=2000, show_default=True)
@click.option("--ratings", type=click.IntRange(min=1), default=100_000, show_default=True)
@click.option("--tags", type=click.IntRange(min=0), default=None, help="Tag applications [default: ratings/40].")
@click.option("--seed", type=int, default=0, show_default=True)
def synth(out, users, items, ratings, tags, seed) -> None:
    """Write a synthetic MovieLens-format dataset (ratings/movies/tags CSV) to OUT."""
    from batchrec.synth import write_synthetic

    click.echo(write_synthetic(out, n_users=users, n_items=items, n_ratings=ratings, n_tags=tags, seed=seed))


# -- features ----------------------------------------------------------------------------------
@main.group(invoke_without_command=True)
@click.option("--as-of", "as_of", default=None, help="Cutoff timestamp (UTC); nothing at or after it is used [default: now].")
@click.option("--protocols", default="all", show_default=True, help="Comma-separated split protocols, or 'all'.")
@click.option("--param", "params", multiple=True, metavar="KEY=VALUE", help="Snapshot parameter override (repeatable).")
@click.option("--keep", type=click.IntRange(min=1), default=5, show_default=True, help="Snapshots to retain; older ones are pruned.")
@click.pass_context
def features(ctx: click.Context, as_of, protocols, params, keep) -> None:
    """Build a point-in-time feature snapshot (or `features list`)."""
    if ctx.invoked_subcommand is not None:
        return
    from batchrec.features import build_snapshot

    click.echo(build_snapshot(ctx.find_object(Warehouse), as_of=as_of, protocols=protocols, params=params, keep=keep))


@features.command("list")
@pass_wh
def features_list(wh: Warehouse) -> None:
    """List feature snapshots, newest first."""
    from batchrec.features import list_snapshots

    click.echo(list_snapshots(wh))


# -- train -------------------------------------------------------------------------------------
@main.command()
@click.argument("model")
@click.option("--snapshot", default="latest", show_default=True, help="Feature snapshot id.")
@click.option("--protocol", default=None, help="Fit on this protocol's train part, early-stop on its valid part.")
@click.option("--param", "params", multiple=True, metavar="KEY=VALUE", help="Model parameter (repeatable); see `batchrec models`.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@pass_wh
def train(wh: Warehouse, model, snapshot, protocol, params, device) -> None:
    """Fit MODEL on a feature snapshot and record a model run."""
    from batchrec.train import train_model

    click.echo(train_model(wh, model, snapshot=snapshot, protocol=protocol, params=params, device=device))


@main.command()
def models() -> None:
    """List model families and their parameters with defaults."""
    from batchrec.models import describe_models

    click.echo(describe_models())


# -- score -------------------------------------------------------------------------------------
@main.command()
@click.option("--run", "run_id", default=None, help="Run id, or 'latest' [default: latest run of --model, else latest run].")
@click.option("--model", default=None, help="Use the latest run of this model family.")
@click.option("--top-n", type=int, default=10, show_default=True)
@click.option("--shard", default=None, metavar="i/N", help="Score one deterministic partition of users to Parquet.")
@click.option("--publish", "publish_run", default=None, metavar="RUN", help="Publish the union of RUN's shards.")
@click.option("--users", "users_file", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Score only the user ids listed in this file (one per line / a user_id column).")
@click.option("--pairs", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Score the (user_id, item_id) pairs in this CSV/Parquet file instead.")
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="Output file for --pairs.")
@click.option("--memory-budget", default="1GB", show_default=True, help="Scores held at once per block, e.g. 512MB, 2GB.")
@click.option("--retention-days", type=click.IntRange(min=0), default=30, show_default=True,
              help="Days of earlier runs kept in recommendation_history.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@pass_wh
def score(wh: Warehouse, run_id, model, top_n, shard, publish_run, users_file, pairs, out, memory_budget,
          retention_days, device) -> None:
    """Write every user's top-N (seen items removed, cold start served) to `recommendations`."""
    from batchrec import score as scoring

    click.echo(scoring.score_command(
        wh, run_id=run_id, model=model, top_n=top_n, shard=shard, publish_run=publish_run, users_file=users_file,
        pairs=pairs, out=out, memory_budget=memory_budget, retention_days=retention_days, device=device))


# -- evaluate ----------------------------------------------------------------------------------
@main.command()
@click.option("--runs", default=None, help="Comma-separated run ids.")
@click.option("--models", "model_names", default=None, help="Comma-separated model families (trains them if needed).")
@click.option("--protocol", default="user_temporal", show_default=True, help="Split protocol or preset.")
@click.option("--k", "ks", default="5,10,20", show_default=True, help="Comma-separated cut-offs.")
@click.option("--report", "report_dir", type=click.Path(file_okay=False), default="reports", show_default=True)
@click.option("--compare", is_flag=True, help="Highlight the best run per metric.")
@click.option("--threshold", type=float, default=4.0, show_default=True, help="Relevant = test rating >= threshold.")
@click.option("--metrics", default=None, help="Comma-separated metrics to keep, e.g. rmse,ndcg,recall@10 [default: all].")
@pass_wh
def evaluate(wh: Warehouse, runs, model_names, protocol, ks, report_dir, compare, threshold, metrics) -> None:
    """Evaluate runs on a protocol's test part; write `evaluations` and an HTML report."""
    from batchrec.evaluate import evaluate_command

    click.echo(evaluate_command(wh, runs=runs, models=model_names, protocol=protocol, ks=ks,
                                report_dir=report_dir, compare=compare, threshold=threshold, metrics=metrics))


# -- operations --------------------------------------------------------------------------------
@main.command()
@click.argument("job_file", type=click.Path(exists=True, dir_okay=False))
@pass_wh
def run(wh: Warehouse, job_file) -> None:
    """Run the steps of a job file (e.g. jobs/nightly.toml), recording each in `job_runs`."""
    from batchrec.jobs import run_job

    click.echo(run_job(wh, job_file))


@main.command()
@click.argument("user_id", type=int)
@click.option("--history", type=int, default=10, show_default=True, help="Recent ratings to show.")
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
@click.option("--to", "to", required=True, type=click.Path(dir_okay=False), help="Output file: PATH.parquet or PATH.csv.")
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
