"""Synthetic MovieLens-format data: exact layout, exact sizes, determinism, realistic shape, learnable signal."""

from __future__ import annotations

import re
from pathlib import Path

import duckdb
import numpy as np
import pytest
import scipy.sparse as sp
from click.testing import CliRunner
from scipy.sparse.linalg import svds

from batchrec import synth
from batchrec.cli import main
from batchrec.errors import BatchrecError

SIZES = {"n_users": 1_000, "n_items": 1_500, "n_ratings": 40_000, "n_tags": 2_000}
FILES = ("ratings.csv", "movies.csv", "tags.csv", "README.txt")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "ml"
    synth.write_synthetic(out, seed=3, **SIZES)
    return out


def _rows(path: Path, sql: str) -> list[tuple]:
    """Run `sql` with views r, m, t over the dataset's three CSV files (DuckDB's own CSV sniffer)."""
    con = duckdb.connect()
    for view, name in (("r", "ratings"), ("m", "movies"), ("t", "tags")):
        con.execute(f"CREATE VIEW {view} AS SELECT * FROM read_csv('{path / name}.csv')")
    return con.execute(sql).fetchall()


def _arrays(path: Path) -> dict[str, np.ndarray]:
    con = duckdb.connect()
    return con.execute(f"SELECT * FROM read_csv('{path / 'ratings.csv'}')").fetchnumpy()


def test_same_seed_same_bytes_other_seed_other_data(tmp_path, data):
    synth.write_synthetic(tmp_path / "again", seed=3, **SIZES)
    synth.write_synthetic(tmp_path / "other", seed=4, **SIZES)
    for name in FILES:
        assert (tmp_path / "again" / name).read_bytes() == (data / name).read_bytes(), name
    for name in ("ratings.csv", "movies.csv", "tags.csv"):
        assert (tmp_path / "other" / name).read_bytes() != (data / name).read_bytes(), name


def test_headers_are_exactly_movielens(data):
    heads = {name: (data / name).read_text(encoding="utf-8").split("\n", 1)[0] for name in FILES[:3]}
    assert heads == {
        "ratings.csv": "userId,movieId,rating,timestamp",
        "movies.csv": "movieId,title,genres",
        "tags.csv": "userId,movieId,tag,timestamp",
    }
    assert "SYNTHETIC" in (data / "README.txt").read_text(encoding="utf-8")


def test_exact_counts_and_every_user_rates(data):
    [(n_ratings, n_users, min_user, max_user, n_movies, n_movie_ids, n_tags, unknown_movies)] = _rows(
        data,
        """
        SELECT (SELECT count(*) FROM r), (SELECT count(DISTINCT userId) FROM r), (SELECT min(userId) FROM r),
               (SELECT max(userId) FROM r), (SELECT count(*) FROM m), (SELECT count(DISTINCT movieId) FROM m),
               (SELECT count(*) FROM t),
               (SELECT count(*) FROM r WHERE movieId NOT IN (SELECT movieId FROM m))""",
    )
    assert (n_ratings, n_users, min_user, max_user) == (
        SIZES["n_ratings"],
        SIZES["n_users"],
        1,
        SIZES["n_users"],
    )
    assert n_movies == n_movie_ids == SIZES["n_items"]
    assert n_tags == SIZES["n_tags"]
    assert unknown_movies == 0


def test_no_duplicate_pairs_and_movielens_order(data):
    r = _arrays(data)
    pair = r["userId"].astype(np.int64) * 10**9 + r["movieId"]
    assert len(np.unique(pair)) == len(pair)
    assert np.all(np.diff(pair) > 0)  # sorted by userId, then movieId, as ratings.csv is


def test_ratings_are_half_stars_in_range_and_timestamps_span_years(data):
    r = _arrays(data)
    assert set(np.unique(r["rating"])) <= {k / 2 for k in range(1, 11)}
    assert {0.5, 1.0, 3.5, 4.0, 5.0} <= set(np.unique(r["rating"]))
    assert 3.0 < r["rating"].mean() < 4.0 and 0.8 < r["rating"].std() < 1.3
    before_half_stars = r["timestamp"] < synth.HALF_STARS_FROM
    assert before_half_stars.any() and np.all(r["rating"][before_half_stars] % 1 == 0)
    years = r["timestamp"].astype("datetime64[s]").astype("datetime64[Y]").astype(int) + 1970
    assert years.min() >= 1996 and years.max() <= 2024 and years.max() - years.min() >= 20


def test_popularity_and_user_activity_are_heavy_tailed(data):
    r = _arrays(data)
    per_item = np.sort(np.bincount(r["movieId"]))[::-1]
    assert per_item[: SIZES["n_items"] // 10].sum() > 0.4 * len(r["movieId"])
    per_user = np.bincount(r["userId"])[1:]
    assert per_user.min() >= 20  # MovieLens' floor, affordable at 40 ratings per user
    assert per_user.max() > 5 * np.median(per_user)


def test_item_means_replicate_across_halves_of_the_users(data):
    [(corr, items)] = _rows(
        data,
        """
        SELECT corr(a, b), count(*) FROM (
            SELECT avg(rating) FILTER (userId % 2 = 0) a, avg(rating) FILTER (userId % 2 = 1) b,
                   count(*) FILTER (userId % 2 = 0) na, count(*) FILTER (userId % 2 = 1) nb
            FROM r GROUP BY movieId) WHERE na >= 5 AND nb >= 5""",
    )
    assert items >= 100 and corr > 0.5


def test_taste_structure_lets_a_factor_model_beat_popularity(tmp_path):
    """Which items a user rates follows their taste: PureSVD ranks held-out items better than popularity."""
    synth.write_synthetic(tmp_path, n_users=1500, n_items=1000, n_ratings=90_000, n_tags=0, seed=11)
    r = _arrays(tmp_path)
    user = r["userId"] - 1
    _, item = np.unique(r["movieId"], return_inverse=True)
    test = np.random.default_rng(0).random(len(user)) < 0.2
    shape = (user.max() + 1, item.max() + 1)
    train = sp.csr_matrix((np.ones((~test).sum()), (user[~test], item[~test])), shape=shape)
    held = sp.csr_matrix((np.ones(test.sum()), (user[test], item[test])), shape=shape).toarray()

    def recall_at_10(scores: np.ndarray) -> float:
        scores = np.where(train.toarray() > 0, -np.inf, scores)
        top = np.argpartition(-scores, 10, axis=1)[:, :10]
        hits = np.take_along_axis(held, top, axis=1).sum(1)
        relevant = np.minimum(held.sum(1), 10)
        return float((hits[relevant > 0] / relevant[relevant > 0]).mean())

    popularity = recall_at_10(np.broadcast_to(np.asarray(train.sum(0)), shape).astype(np.float64))
    _, _, vt = svds(train, k=16, random_state=0)
    factor = recall_at_10(train @ vt.T @ vt)
    assert factor > 1.25 * popularity, (factor, popularity)  # ~1.45x measured; ~1.03x with TASTE_WEIGHT=0


def test_movies_have_movielens_titles_and_genres(data):
    raw = (data / "movies.csv").read_text(encoding="utf-8")
    assert re.search(r'^\d+,"Synthetic Movie \d+, The \(\d{4}\)",', raw, re.M)  # commas are quoted
    rows = _rows(data, "SELECT title, genres FROM m")
    assert all(re.fullmatch(r"Synthetic Movie \d+.* \((19|20)\d\d\)", title) for title, _ in rows)
    assert any("," in title for title, _ in rows) and any('"' in title for title, _ in rows)
    genres = [g for _, gs in rows for g in gs.split("|")]
    assert set(genres) <= set(synth.GENRES) | {synth.NO_GENRES}
    assert {"Drama", "Comedy", synth.NO_GENRES} <= set(genres)
    assert all(gs == synth.NO_GENRES or gs.split("|") == sorted(gs.split("|")) for _, gs in rows)
    assert np.mean([len(gs.split("|")) for _, gs in rows]) > 1.3


def test_tags_follow_ratings_and_genres(data):
    [(unrated, not_after, repeats, phrases)] = _rows(
        data,
        """
        SELECT count(*) FILTER (r.timestamp IS NULL), count(*) FILTER (t.timestamp <= r.timestamp),
               count(*) - count(DISTINCT (t.userId, t.movieId, t.tag)), count(*) FILTER (t.tag LIKE '% %')
        FROM t LEFT JOIN r USING (userId, movieId)""",
    )
    assert (unrated, not_after, repeats) == (0, 0, 0)
    t = duckdb.connect().execute(f"SELECT * FROM read_csv('{data / 'tags.csv'}')").fetchnumpy()
    assert np.all(np.diff(t["userId"].astype(np.int64) * 10**9 + t["movieId"]) >= 0)  # MovieLens order
    assert phrases > 0
    # A tag that belongs to one genre's vocabulary lands on movies of that genre.
    own = {
        t: g
        for g, ts in synth.GENRE_TAGS.items()
        for t in ts
        if sum(t in other for other in synth.GENRE_TAGS.values()) == 1
    }
    tagged = _rows(data, "SELECT t.tag, m.genres FROM t JOIN m USING (movieId)")
    genre_tags = [(t, gs) for t, gs in tagged if t in own]
    assert len(genre_tags) > 300
    assert np.mean([own[t] in gs.split("|") for t, gs in genre_tags]) > 0.95


def test_many_blocks_keep_one_header_and_exact_counts(tmp_path, monkeypatch):
    monkeypatch.setattr(synth, "BLOCK_RATINGS", 2_000)
    synth.write_synthetic(tmp_path, n_users=300, n_items=200, n_ratings=20_000, n_tags=500, seed=1)
    for name in ("ratings.csv", "tags.csv"):
        assert (tmp_path / name).read_text().count("userId") == 1
    [(n, pairs, users, tags)] = _rows(
        tmp_path,
        """
        SELECT count(*), count(DISTINCT (userId, movieId)), count(DISTINCT userId), (SELECT count(*) FROM t) FROM r""",
    )
    assert (n, pairs, users, tags) == (20_000, 20_000, 300, 500)


@pytest.mark.parametrize("users, items, ratings", [(1, 1, 1), (5, 4, 20), (50, 30, 1_400)])
def test_tiny_and_dense_sizes_are_exact(tmp_path, users, items, ratings):
    synth.write_synthetic(tmp_path, n_users=users, n_items=items, n_ratings=ratings, seed=0)
    [(n, pairs, n_users, max_per_user)] = _rows(
        tmp_path,
        """
        SELECT count(*), count(DISTINCT (userId, movieId)), count(DISTINCT userId),
               (SELECT max(c) FROM (SELECT count(*) c FROM r GROUP BY userId)) FROM r""",
    )
    assert (n, pairs, n_users) == (ratings, ratings, users)
    assert max_per_user <= items


def test_cli_writes_dataset_and_rejects_impossible_sizes(tmp_path):
    runner = CliRunner()
    ok = runner.invoke(
        main,
        ["synth", str(tmp_path / "d"), "--users", "30", "--items", "50", "--ratings", "900", "--seed", "2"],
    )
    assert ok.exit_code == 0, ok.output
    assert "900 ratings" in ok.output and all((tmp_path / "d" / f).exists() for f in FILES)
    assert not list((tmp_path / "d").glob(".*partial"))
    bad = runner.invoke(
        main, ["synth", str(tmp_path / "e"), "--users", "10", "--items", "5", "--ratings", "51"]
    )
    assert bad.exit_code != 0 and "error: --ratings 51 exceeds" in bad.output
    with pytest.raises(BatchrecError, match="--ratings must be >= --users"):
        synth.write_synthetic(tmp_path / "f", n_users=10, n_items=5, n_ratings=9)
