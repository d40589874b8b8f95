"""Shared fixtures: the real ml-latest-small data as a `SnapshotData` for model tests, and the
default fits the quality tests share."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import scipy.sparse as sp

from batchrec.data import Interactions, SnapshotData

ML_SMALL = Path(__file__).resolve().parent.parent / "batchrec" / "datasets" / "ml-latest-small"


def _user_temporal_parts(ratings: pl.DataFrame) -> pl.DataFrame:
    """Protocol user_temporal: per user, sorted by (ts, item), last max(1, floor(10%)) -> test,
    the max(1, floor(10%)) before them -> valid, the rest train."""
    return (
        ratings.sort("user_idx", "ts", "item_idx")
        .with_columns(
            pos=pl.int_range(pl.len()).over("user_idx"),
            n=pl.len().over("user_idx"),
        )
        .with_columns(h=pl.max_horizontal((pl.col("n") * 0.1).floor().cast(pl.Int64), pl.lit(1)))
        .with_columns(
            part=pl.when(pl.col("pos") >= pl.col("n") - pl.col("h")).then(pl.lit("test"))
            .when(pl.col("pos") >= pl.col("n") - 2 * pl.col("h")).then(pl.lit("valid"))
            .otherwise(pl.lit("train"))
        )
    )


def load_ml_small(protocol: str | None = "user_temporal") -> SnapshotData:
    """ml-latest-small in dense ids (by raw id), with genres, without TF-IDF tags.

    Interim stand-in for the feature store in model tests; same rules as sql/features."""
    ratings = pl.read_csv(ML_SMALL / "ratings.csv")
    movies = pl.read_csv(ML_SMALL / "movies.csv")
    user_ids = np.sort(ratings["userId"].unique().to_numpy())
    # The catalogue plus items that are only rated (none in ml-latest-small, but the rule is the
    # feature store's).
    item_ids = np.union1d(movies["movieId"].to_numpy(), ratings["movieId"].to_numpy())
    df = ratings.select(
        user_idx=pl.Series(np.searchsorted(user_ids, ratings["userId"].to_numpy())),
        item_idx=pl.Series(np.searchsorted(item_ids, ratings["movieId"].to_numpy())),
        rating=pl.col("rating").cast(pl.Float32),
        ts=pl.col("timestamp").cast(pl.Int64),
    )

    def part(frame: pl.DataFrame) -> Interactions:
        return Interactions(frame["user_idx"].to_numpy().astype(np.int64), frame["item_idx"].to_numpy().astype(np.int64),
                            frame["rating"].to_numpy(), frame["ts"].to_numpy())

    if protocol is None:
        train, valid, test = part(df.sort("user_idx", "ts", "item_idx")), None, None
    else:
        assert protocol == "user_temporal"
        parts = _user_temporal_parts(df)
        train, valid, test = (part(parts.filter(pl.col("part") == p)) for p in ("train", "valid", "test"))
    g = movies.select(pl.col("movieId"), pl.col("genres").str.split("|")).explode("genres").filter(
        pl.col("genres") != "(no genres listed)")
    genre_names = sorted(g["genres"].unique().to_list())
    genres = sp.csr_matrix((np.ones(len(g), np.float32),
                            (np.searchsorted(item_ids, g["movieId"].to_numpy()),
                             np.searchsorted(genre_names, g["genres"].to_numpy()))),
                           shape=(len(item_ids), len(genre_names)))
    return SnapshotData(
        snapshot_id="ml-small-test", protocol=protocol, n_users=len(user_ids), n_items=len(item_ids),
        train=train, valid=valid, test=test, user_ids=user_ids, item_ids=item_ids, rating_scale=(0.5, 5.0),
        item_genres=genres, genre_names=genre_names,
        item_tags=sp.csr_matrix((len(item_ids), 0), dtype=np.float32), tag_terms=[],
    )


@pytest.fixture(scope="session")
def ml_small() -> SnapshotData:
    """ml-latest-small, protocol user_temporal (81,200 / 9,818 / 9,819 rows)."""
    return load_ml_small("user_temporal")


@pytest.fixture(scope="session")
def ml_small_store(tmp_path_factory) -> SnapshotData:
    """ml-latest-small through the real pipeline (`batchrec ingest`, the feature store), protocol
    user_temporal: what `batchrec evaluate` measures on, TF-IDF tag vectors included."""
    from batchrec.data import load_snapshot
    from batchrec.features import build_snapshot, latest_snapshot_id
    from batchrec.ingest.run import ingest_path
    from batchrec.warehouse import Warehouse

    wh = Warehouse(tmp_path_factory.mktemp("store") / "batchrec.duckdb")
    ingest_path(wh, dataset="ml-latest-small")
    build_snapshot(wh, protocols="user_temporal")
    with wh.connect(read_only=True) as con:
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
def default_metrics(ml_small_store):
    """default_metrics(name) -> the test metrics at K=10 of the family fitted with its default
    parameters on `ml_small_store`'s train part: each family fitted once per session, shared by
    the quality tests of every module (the models are not kept: EASE alone is 380 MB)."""
    from batchrec.metrics import evaluate_model
    from batchrec.train import fit_model

    cache: dict[str, dict] = {}

    def get(name: str) -> dict:
        if name not in cache:
            cache[name] = evaluate_model(fit_model(name, ml_small_store)[0], ml_small_store, ks=(10,))
        return cache[name]

    return get
