"""batchrec: a nightly batch recommender on a DuckDB feature store and PyTorch models.

The Python API (docs/api.md, defined in `batchrec.api`): `Warehouse`, `ingest`, `build_features`,
`train` -> `Run` (`Run.recommend`, `Run.predict`), `score`, `evaluate`, `tune`. They are loaded on
first use (module `__getattr__`), so `import batchrec` and `batchrec --help` do not pay for torch.
"""

import importlib
import sys
import types

__version__ = "0.1.0"

_API = (
    "BatchrecError",
    "Run",
    "Snapshot",
    "Warehouse",
    "build_features",
    "evaluate",
    "ingest",
    "score",
    "train",
    "tune",
)
# API functions named like the step module that implements them (batchrec/train.py, ...)
_STEP_MODULES = ("evaluate", "ingest", "train", "tune")
__all__ = [*_API, "__version__"]


class _StepModule(types.ModuleType):
    """A step module that is also the API function of its name: `batchrec.train(...)` calls
    `batchrec.api.train`, `batchrec.train.fit_model` is the module's. Python binds an imported
    submodule as an attribute of its package, which would otherwise hide the function (the first
    `batchrec.train(...)` would work, and once anything imported the module, the next would not)."""

    def _function(self):
        return getattr(importlib.import_module("batchrec.api"), self.__name__.rpartition(".")[2])

    def __call__(self, *args, **kwargs):
        return self._function()(*args, **kwargs)

    @property
    def __signature__(self):  # what help() and IDEs show for the call; inspect loaded only when asked
        return importlib.import_module("inspect").signature(self._function())


class _Package(types.ModuleType):
    def __setattr__(self, name: str, value) -> None:
        if name in _STEP_MODULES and type(value) is types.ModuleType:
            value.__class__ = _StepModule
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __getattr__(name: str):
    """The API's names, imported on first use."""
    if name in _STEP_MODULES:
        try:
            return importlib.import_module(f"{__name__}.{name}")  # bound here as a _StepModule
        except (
            ModuleNotFoundError
        ) as exc:  # batchrec.tune comes with the tuning work; until then the function
            if exc.name != f"{__name__}.{name}":
                raise
    if name in _API:
        return getattr(importlib.import_module("batchrec.api"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
