"""Model families, one file each, all on the `Recommender` interface (models/base.py).

The registry maps a family name to the module that defines it; modules are imported on demand
so `batchrec models` and the scorer don't pay for families they don't use.
"""

from __future__ import annotations

import importlib
import importlib.util

from batchrec.errors import BatchrecError
from batchrec.models.base import Param, Recommender

# family name -> "module:Class"
REGISTRY: dict[str, str] = {
    "popularity": "batchrec.models.popularity:Popularity",
    "mf": "batchrec.models.mf:BiasedMF",
    "svd": "batchrec.models.svd:TruncatedSVD",
    "bpr": "batchrec.models.bpr:BPRMF",
    "ease": "batchrec.models.ease:EASE",
    "ials": "batchrec.models.ials:ImplicitALS",
    "itemknn": "batchrec.models.itemknn:ItemKNN",
    "neumf": "batchrec.models.neumf:NeuMF",
    "autorec": "batchrec.models.autorec:AutoRec",
    "two_tower": "batchrec.models.two_tower:TwoTower",
    "content_dnn": "batchrec.models.content_dnn:ContentDNN",
    "multvae": "batchrec.models.multvae:MultVAE",
}


def available() -> list[str]:
    """Families whose module is present in this installation."""
    out = []
    for name, target in REGISTRY.items():
        if importlib.util.find_spec(target.split(":")[0]) is not None:
            out.append(name)
    return out


def get_model_class(name: str) -> type[Recommender]:
    if name not in REGISTRY or name not in available():
        raise BatchrecError(f"unknown model {name!r}; valid: {', '.join(available())}")
    module, cls = REGISTRY[name].split(":")
    return getattr(importlib.import_module(module), cls)


def create_model(name: str, params: dict | None = None) -> Recommender:
    return get_model_class(name)(**(params or {}))


def parse_params(name: str, pairs: tuple[str, ...] | list[str]) -> dict:
    """`("factors=64", "lr=0.01")` -> {"factors": 64, "lr": 0.01}, checked against the family."""
    spec = {p.name: p for p in get_model_class(name).all_params()}
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise BatchrecError(f"{name}: parameter {pair!r} is not KEY=VALUE")
        if key not in spec:
            raise BatchrecError(
                f"{name}: unknown parameter {key!r}; valid: " + "; ".join(p.describe() for p in spec.values())
            )
        out[key] = spec[key].parse(value, name)
    return out


def describe_models() -> str:
    lines = []
    for name in available():
        cls = get_model_class(name)
        doc = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
        lines.append(f"{name} [{cls.task}]: {doc}")
        lines += [f"    {p.describe()}" for p in cls.all_params()]
    return "\n".join(lines)


__all__ = [
    "Param",
    "Recommender",
    "REGISTRY",
    "available",
    "get_model_class",
    "create_model",
    "parse_params",
    "describe_models",
]
