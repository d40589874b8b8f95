"""Shared fixtures: the real ml-latest-small data as a `SnapshotData` for model tests, and the
default fits the quality tests share."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from batchrec.data import SnapshotData, load_snapshot
from batchrec.features import build_snapshot, latest_snapshot_id
from batchrec.ingest.run import ingest_path
from batchrec.warehouse import Warehouse


@pytest.fixture(scope="session")
def ml_small_warehouse(tmp_path_factory) -> Warehouse:
    """A warehouse with ml-latest-small ingested and one feature snapshot (protocols user_temporal
    and random). Read-only for tests: copy it before writing."""
    wh = Warehouse(tmp_path_factory.mktemp("store") / "batchrec.duckdb")
    ingest_path(wh, dataset="ml-latest-small")
    build_snapshot(wh, protocols="user_temporal,random")
    return wh


@pytest.fixture(scope="session")
def ml_small(ml_small_warehouse) -> SnapshotData:
    """ml-latest-small through the real pipeline (`batchrec ingest`, the feature store), protocol
    user_temporal (81,200 / 9,818 / 9,818 rows): what `batchrec evaluate` measures on, genres and
    TF-IDF tag vectors included. Model tests read the split the product builds, not a copy of it."""
    with ml_small_warehouse.connect(read_only=True) as con:
        return load_snapshot(con, latest_snapshot_id(con), "user_temporal")


@pytest.fixture(scope="session")
def fit_once(ml_small):
    """fit_once(name, params) -> (model, trainer): `fit_model` on `ml_small`, run once per session for
    each family and parameter set, so the interface tests of a family share their fits."""
    from batchrec.train import fit_model

    cache: dict[tuple[str, str], tuple] = {}

    def get(name: str, params: dict | None = None) -> tuple:
        key = (name, json.dumps(params or {}, sort_keys=True))
        if key not in cache:
            cache[key] = fit_model(name, ml_small, params)
        return cache[key]

    return get


@pytest.fixture(scope="session")
def default_metrics(ml_small):
    """default_metrics(name) -> the test metrics at K=10 of the family fitted with its default
    parameters on `ml_small`'s train part: each family fitted once per session, shared by
    the quality tests of every module (the models are not kept: EASE alone is 380 MB)."""
    from batchrec.metrics import evaluate_model
    from batchrec.train import fit_model

    cache: dict[str, dict] = {}

    def get(name: str) -> dict:
        if name not in cache:
            cache[name] = evaluate_model(fit_model(name, ml_small)[0], ml_small, ks=(10,))
        return cache[name]

    return get


@pytest.fixture(scope="session")
def copy_warehouse(ml_small_warehouse):
    """copy_warehouse(folder) -> a copy of `ml_small_warehouse` (the file and its serving copy; no
    artifacts) in `folder`, for tests that write."""

    def copy(folder: Path) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        for source in (ml_small_warehouse.path, ml_small_warehouse.serving_path):
            if source.exists():
                shutil.copy(source, folder / source.name)
        return folder / ml_small_warehouse.path.name

    return copy
