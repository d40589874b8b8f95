"""The package's import graph: every module imports in any order, there is no cycle, and
module-level imports point one way, from commands down to the warehouse (STYLE.md)."""

from __future__ import annotations

import ast
import pkgutil
import random
import subprocess
import sys
from pathlib import Path

import pytest

import batchrec

ROOT = Path(batchrec.__file__).parent

# Top to bottom; a module may import its own layer or any layer below, never one above.
# `ops` (the status / recommend / sql texts) is command glue: it reads job_runs through jobs'
# process check. `metrics` and `training` sit below the models because the models' validators
# measure with the metrics and fit with the trainer; `ranking` below `metrics` (what is measured
# is the scorer's top-N); `ranking` names `models.base.Recommender` only under TYPE_CHECKING.
LAYERS = [
    ("commands", {"api", "__main__", "cli", "cli_help", "jobs", "ops"}),
    (
        "steps",
        {
            "ingest",
            "features",
            "train",
            "scoring",
            "evaluate",
            "report",
            "report_nights",
            "report_trend",
            "plots",
            "gate",
            "serving",
            "synth",
            "tune",
        },
    ),
    ("models", {"models"}),
    (
        "ranking and data",
        {"metrics", "uncertainty", "ranking", "topk", "data", "training", "distributed", "runs", "tuned"},
    ),
    (
        "warehouse",
        {"warehouse", "errors", "options", "logs", "processes", "storage", "executors", "tracking"},
    ),
]
LAYER_OF = {name: i for i, (_, names) in enumerate(LAYERS) for name in names}


def all_modules() -> list[str]:
    return ["batchrec"] + sorted(m.name for m in pkgutil.walk_packages([str(ROOT)], "batchrec."))


def module_path(name: str) -> Path:
    parts = name.split(".")[1:]
    package = ROOT.joinpath(*parts, "__init__.py")
    return package if package.exists() else ROOT.joinpath(*parts[:-1], parts[-1] + ".py")


def top_level_imports(name: str) -> set[str]:
    """The batchrec modules that `name` imports when it is executed: statements of the module body
    only (function-local imports and `if TYPE_CHECKING:` blocks do not run at import)."""
    path = module_path(name)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
            found.add(base)
            # `from batchrec import options` / `from batchrec.scoring import run`: a submodule
            found |= {f"{base}.{a.name}" for a in node.names}
    modules = set(all_modules())
    return {m for m in found if m in modules and m != name}


def graph() -> dict[str, set[str]]:
    return {m: top_level_imports(m) for m in all_modules()}


def layer(module: str) -> int | None:
    parts = module.split(".")
    return LAYER_OF.get(parts[1]) if len(parts) > 1 else None


def test_every_module_is_in_a_layer():
    modules = {m.split(".")[1] for m in all_modules() if "." in m}
    assert modules - {"datasets"} <= set(LAYER_OF), (
        f"modules with no layer: {sorted(modules - set(LAYER_OF))}"
    )


def test_no_import_cycle():
    edges = graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(edges[module]):
            if state.get(target) == 1:
                cycle = path[path.index(target) :] + [target] if target in path else [module, target]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target, path + [target])
        state[module] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])


def upward_edges(edges: dict[str, set[str]]) -> list[str]:
    return [
        f"{a} ({LAYERS[layer(a)][0]}) imports {b} ({LAYERS[layer(b)][0]})"
        for a, targets in edges.items()
        for b in sorted(targets)
        if layer(a) is not None and layer(b) is not None and layer(b) < layer(a)
    ]


def test_imports_point_down_the_layers():
    upward = upward_edges(graph())
    assert not upward, "imports pointing up the layers:\n" + "\n".join(upward)


def test_the_graph_sees_real_edges():
    """The AST reading finds known edges (a reader that found none would pass the tests above)."""
    edges = graph()
    assert "batchrec.ranking" in edges["batchrec.metrics"]
    assert "batchrec.training" in edges["batchrec.train"]
    assert "batchrec.scoring.publishing" in edges["batchrec.scoring.run"]
    assert "batchrec.options" in edges["batchrec.cli"]  # `from batchrec import logs, options`
    planted = edges | {"batchrec.ranking": edges["batchrec.ranking"] | {"batchrec.scoring.run"}}
    assert upward_edges(planted) == [
        "batchrec.ranking (ranking and data) imports batchrec.scoring.run (steps)"
    ]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_every_module_imports_in_any_order(seed):
    """Each order in a fresh interpreter: a hidden cycle shows as an ImportError for some order."""
    order = all_modules()
    random.Random(seed).shuffle(order)
    code = "import importlib, sys\nfor name in sys.argv[1:]:\n    importlib.import_module(name)\n"
    done = subprocess.run([sys.executable, "-c", code, *order], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"importing in the order {order} failed:\n{done.stderr[-3000:]}"
