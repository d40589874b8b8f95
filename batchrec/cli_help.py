"""What `batchrec COMMAND --help` shows after the options: the lists a user needs at that point
(model families, split protocols and presets, the job file's keys) and one example.

The lists come from where they are defined (the model registry, the feature store's protocols,
the job runner's options) and are computed only when help is printed: the model registry
imports torch, which plain `batchrec --help` should not pay for.
"""

from __future__ import annotations

import json
import textwrap
from collections.abc import Callable

import click

# One example per command, keyed by the command's path below `batchrec`.
EXAMPLES: dict[str, str] = {
    "ingest": "batchrec ingest --dataset ml-latest-small",
    "synth": "batchrec synth /tmp/ml20m --users 138493 --items 26744 --ratings 20000263 --seed 0",
    "features": "batchrec features --as-of 2018-01-01 --protocols user_temporal,random",
    "features list": "batchrec features list",
    "train": "batchrec train mf --protocol user_temporal --param factors=128",
    "models": "batchrec models",
    "tune": "batchrec tune ease --protocol random --trials 20 --timeout 1800",
    "score": "batchrec score --model ease --top-n 10",
    "evaluate": "batchrec evaluate --models ease,popularity --protocol user_temporal --k 5,10,20",
    "run": "batchrec run jobs/nightly.toml",
    "recommend": "batchrec recommend 42 --history 5",
    "status": "batchrec status",
    "sql": 'batchrec sql "SELECT rank, title, reason FROM recommendations_with_titles WHERE user_id = 42"',
    "export": "batchrec export --table recommendations --to /srv/out/recommendations.parquet",
}


def _families() -> str:
    from batchrec.models import available

    return "Model families (parameters: `batchrec models`): " + ", ".join(available())


def _protocols() -> str:
    from batchrec.features.params import PROTOCOLS

    return "Split protocols: " + ", ".join(PROTOCOLS)


def _evaluate() -> str:
    from batchrec.evaluate import PRESETS

    return f"{_families()}\n\n{_protocols()}; presets: {', '.join(PRESETS)}"


def _job_keys() -> str:
    from batchrec.jobs import STEP_OPTIONS

    def toml(value) -> str:
        if value is None:
            return "(unset)"
        return str(value).lower() if isinstance(value, bool) else json.dumps(value)

    lines = [
        'A job file is TOML: [job] name = "...", then one [[steps]] table per step, run in order, each '
        "with step = KIND, an optional name = \"...\", and that step's options (the CLI's, with their defaults):"
    ]
    for kind, options in STEP_OPTIONS.items():  # key -> batchrec.options.Option
        lines.append(
            f"  {kind}: "
            + ", ".join(
                f"{key} = {'(required)' if o.required else toml(list(o.default or ()) if o.multiple else o.default)}"
                for key, o in options.items()
            )
        )
    return "\n".join(lines)


def _tunable() -> str:
    from batchrec.models import available, get_model_class

    return "Families with a search space (its ranges: `batchrec models`, marked [tune: ...]): " + ", ".join(
        f for f in available() if get_model_class(f).search_space()
    )


DETAILS: dict[str, Callable[[], str]] = {
    "train": _families,
    "score": _families,
    "evaluate": _evaluate,
    "features": _protocols,
    "run": _job_keys,
    "tune": _tunable,
}


class HelpDetails:
    """Mixin for click commands and groups: the details and the example of EXAMPLES/DETAILS
    after the options, lines kept as written."""

    def format_epilog(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        key = " ".join(ctx.command_path.split()[1:])
        for title, text in (
            ("Details", DETAILS[key]() if key in DETAILS else None),
            ("Example", EXAMPLES.get(key)),
        ):
            if text:
                with formatter.section(title):
                    indent = " " * formatter.current_indent
                    for line in text.splitlines():  # examples and indented lines as written, the rest wrapped
                        if title == "Example" or line.startswith(" "):
                            formatter.write(indent + line + "\n")
                        else:  # names (leave-last-5-positive-events) never broken at their hyphens
                            formatter.write(
                                "".join(
                                    f"{indent}{part}\n"
                                    for part in textwrap.wrap(
                                        line,
                                        max(formatter.width - len(indent), 40),
                                        break_on_hyphens=False,
                                        break_long_words=False,
                                    )
                                )
                                or "\n"
                            )
        super().format_epilog(ctx, formatter)


class HelpCommand(HelpDetails, click.Command):
    pass
