"""Nightly scoring on real data (ml-latest-small): seen filtering, exact row counts, cold start and
reasons, shards, atomic publishing (concurrent reader, kill -9), history, pairs, bad input."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import duckdb
import numpy as np
import polars as pl
import pytest
import scipy.sparse as sp
import torch
from click.testing import CliRunner
from faults import fault_env, go, start_batchrec, wait_until_paused

from batchrec.cli import main
from batchrec.errors import BatchrecError
from batchrec.features import build_snapshot
from batchrec.models.base import Recommender
from batchrec.ranking import topn
from batchrec.runs import resolve_run
from batchrec.scoring import load_inputs, mix64, parse_shard, publish, score_run, shard_of, write_parquet
from batchrec.train import fit_run, load_run_model
from batchrec.warehouse import Warehouse, scalar

ML_SMALL = Path(__file__).resolve().parent.parent / "batchrec" / "datasets" / "ml-latest-small"
AS_OF = "2018-06-01"  # ml-latest-small runs to 2018-09: users who start later are cold
TOY_STORY, TOY_STORY_2, BUGS_LIFE = 1, 3114, 2355
COLD_RATER, USERS_ONLY, TAG_ONLY = 900001, 900002, 900003


def _fill_raw(con) -> None:
    """ml-latest-small into the raw tables, plus three users the snapshot will not have."""
    con.execute(f"""INSERT INTO ratings SELECT userId, movieId, rating, make_timestamp(timestamp * 1000000), 0
                    FROM read_csv('{ML_SMALL}/ratings.csv')""")
    con.execute(f"""INSERT INTO items SELECT movieId, title, NULL,
                        CASE WHEN genres = '(no genres listed)' THEN []::VARCHAR[] ELSE string_split(genres, '|') END,
                        0
                    FROM read_csv('{ML_SMALL}/movies.csv')""")
    con.execute(f"""INSERT INTO tags SELECT userId, movieId, tag, make_timestamp(timestamp * 1000000), 0
                    FROM read_csv('{ML_SMALL}/tags.csv', types={{'tag': 'VARCHAR'}})""")
    late = "TIMESTAMP '2018-07-01 12:00:00'"
    con.execute(f"""INSERT INTO ratings VALUES ({COLD_RATER}, {TOY_STORY}, 5.0, {late}, 0),
                    ({COLD_RATER}, {TOY_STORY_2}, 4.5, {late}, 0), ({COLD_RATER}, {BUGS_LIFE}, 4.0, {late}, 0)""")
    con.execute(f"INSERT INTO users VALUES ({USERS_ONLY}, 'F', 25, 'writer', '02139', 0)")
    con.execute(f"INSERT INTO tags VALUES ({TAG_ONLY}, {TOY_STORY}, 'pixar', {late}, 0)")


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> dict:
    """A warehouse with one snapshot, a fitted mf run and a popularity run, scored once."""
    wh = Warehouse(tmp_path_factory.mktemp("score") / "wh" / "batchrec.duckdb")
    with wh.writer("test") as con:
        _fill_raw(con)
    build_snapshot(wh, as_of=AS_OF, protocols="user_temporal")
    popularity = fit_run(wh, "popularity", device="cpu")
    mf = fit_run(wh, "mf", params={"factors": 16, "epochs": 2, "batch_size": 8192}, device="cpu")
    result = CliRunner().invoke(main, ["--warehouse", str(wh.path), "score", "--run", mf, "--device", "cpu"])
    assert result.exit_code == 0, result.output
    return {"wh": wh, "mf": mf, "popularity": popularity}


def _copy(base: dict, tmp_path: Path) -> Warehouse:
    """A private copy of the scored warehouse and its artifacts (the runs find them relative to it)."""
    dst = tmp_path / "wh"
    dst.mkdir()
    shutil.copy(base["wh"].path, dst / base["wh"].path.name)
    copy = Warehouse(dst / base["wh"].path.name)
    shutil.copytree(base["wh"].artifacts_dir, copy.artifacts_dir)
    return copy


def _recs(wh: Warehouse, order: str = "user_id, rank") -> pl.DataFrame:
    with wh.connect(read_only=True) as con:
        return con.sql(f"SELECT * FROM recommendations ORDER BY {order}").pl()


def _cli(wh: Warehouse, *args: str):
    return CliRunner().invoke(main, ["--warehouse", str(wh.path), "score", "--device", "cpu", *args])


# -- the full run ---------------------------------------------------------------------------
def test_no_seen_item_and_exactly_min_n_unseen_rows_per_user(base):
    with base["wh"].connect(read_only=True) as con:
        snapshot = scalar(con, "SELECT snapshot_id FROM model_runs WHERE run_id = ?", [base["mf"]])
        p = {"s": snapshot}
        # seen: the snapshot's interactions; for users the model does not serve also every raw rating/tag
        seen_hits = scalar(
            con,
            """
            SELECT count(*) FROM recommendations r
            JOIN user_index u ON u.snapshot_id = $s AND u.user_id = r.user_id
            JOIN item_index i ON i.snapshot_id = $s AND i.item_id = r.item_id
            JOIN interactions x ON x.snapshot_id = $s AND x.user_idx = u.user_idx AND x.item_idx = i.item_idx""",
            p,
        )
        cold_hits = scalar(
            con,
            """
            SELECT count(*) FROM recommendations r
            JOIN (SELECT user_id, item_id FROM ratings UNION SELECT user_id, item_id FROM tags) a USING (user_id, item_id)
            WHERE r.user_id NOT IN (SELECT user_id FROM user_index WHERE snapshot_id = $s)""",
            p,
        )
        # expected rows: min(10, items the model knows that the user has not seen), for EVERY user
        expected = con.sql(
            """
            WITH known AS (SELECT DISTINCT item_idx FROM interactions WHERE snapshot_id = $s),
            everyone AS (SELECT user_id FROM ratings UNION SELECT user_id FROM users UNION SELECT user_id FROM tags),
            seen AS (
                SELECT DISTINCT u.user_id, x.item_idx FROM interactions x
                JOIN user_index u ON u.snapshot_id = $s AND u.user_idx = x.user_idx WHERE x.snapshot_id = $s
                UNION
                SELECT a.user_id, i.item_idx FROM (SELECT user_id, item_id FROM ratings UNION SELECT user_id, item_id FROM tags) a
                JOIN item_index i ON i.snapshot_id = $s AND i.item_id = a.item_id
                WHERE a.user_id NOT IN (SELECT user_id FROM user_index WHERE snapshot_id = $s))
            SELECT e.user_id, least(10, (SELECT count(*) FROM known) - count(k.item_idx)) AS expected
            FROM everyone e LEFT JOIN seen s USING (user_id) LEFT JOIN known k ON k.item_idx = s.item_idx
            GROUP BY e.user_id""",
            params=p,
        ).pl()
        got = con.sql("""SELECT user_id, count(*) AS n, count(DISTINCT item_id) AS distinct_items,
                                min(rank) AS lo, max(rank) AS hi FROM recommendations GROUP BY user_id""").pl()
        unknown_items = scalar(
            con,
            """
            SELECT count(*) FROM recommendations r
            WHERE r.item_id NOT IN (SELECT i.item_id FROM interactions x JOIN item_index i
                                    ON i.snapshot_id = x.snapshot_id AND i.item_idx = x.item_idx WHERE x.snapshot_id = $s)""",
            p,
        )
    assert seen_hits == 0 and cold_hits == 0
    assert unknown_items == 0  # items the model never saw (content-only catalogue items) never appear
    both = expected.join(got, on="user_id", how="left").with_columns(pl.col("n").fill_null(0))
    assert {COLD_RATER, USERS_ONLY, TAG_ONLY} <= set(both["user_id"].to_list())
    assert (both["n"] == both["expected"]).all() and len(got) == len(expected)
    assert (
        (both["distinct_items"] == both["n"]).all()
        and (both["lo"] == 1).all()
        and (both["hi"] == both["n"]).all()
    )


def test_model_rows_explain_with_an_item_the_user_liked(base):
    with base["wh"].connect(read_only=True) as con:
        rows = con.sql(
            """
            WITH liked AS (
                SELECT u.user_id, coalesce(t.title, 'item ' || i.item_id) AS title FROM interactions x
                JOIN user_index u ON u.snapshot_id = x.snapshot_id AND u.user_idx = x.user_idx
                JOIN item_index i ON i.snapshot_id = x.snapshot_id AND i.item_idx = x.item_idx
                LEFT JOIN items t ON t.item_id = i.item_id  -- an item missing from the catalogue is "item <id>"
                WHERE x.snapshot_id = (SELECT snapshot_id FROM model_runs WHERE run_id = $run)
                QUALIFY x.rating >= avg(x.rating) OVER (PARTITION BY x.user_idx) - 1e-6)
            SELECT r.user_id, r.reason, EXISTS (SELECT 1 FROM liked l WHERE l.user_id = r.user_id
                                                AND r.reason = 'because you rated ' || l.title) AS ok
            FROM recommendations r WHERE r.reason LIKE 'because you rated %'""",
            params={"run": base["mf"]},
        ).pl()
        by_model, of_snapshot_users = con.sql("""
            SELECT count(*) FILTER (WHERE reason = 'model:mf' OR reason LIKE 'because you rated %'),
                   count(*) FILTER (WHERE user_id IN (SELECT user_id FROM user_index))
            FROM recommendations""").fetchall()[0]
    assert len(rows) > 5000 and rows["ok"].all()
    assert (
        by_model == of_snapshot_users
    )  # every snapshot user has training rows, so the model serves them all


def test_cold_start_users_are_served_with_the_right_reason(base):
    recs = _recs(base["wh"])
    with base["wh"].connect(read_only=True) as con:
        genres = dict(con.sql("SELECT item_id, genres FROM items").fetchall())
        snapshot = scalar(con, "SELECT snapshot_id FROM model_runs WHERE run_id = ?", [base["mf"]])
        by_pop = [
            r[0]
            for r in con.sql(
                """
            SELECT f.item_id FROM item_features f WHERE f.snapshot_id = $s AND f.n_ratings > 0
            ORDER BY f.pop_rank LIMIT 10""",
                params={"s": snapshot},
            ).fetchall()
        ]
    # a user the snapshot never saw who rated three animated films: their genres, named
    cold = recs.filter(pl.col("user_id") == COLD_RATER)
    assert len(cold) == 10 and cold["reason"].str.starts_with("genre-match: ").all()
    profile = {"Adventure", "Animation", "Children", "Comedy", "Fantasy"}
    for item, reason in zip(cold["item_id"], cold["reason"]):
        named = set(reason.removeprefix("genre-match: ").split(", "))
        assert named <= profile & set(genres[item]) and named
    assert {TOY_STORY, TOY_STORY_2, BUGS_LIFE}.isdisjoint(cold["item_id"].to_list())
    # nothing known about the user: the most popular items, said so
    plain = recs.filter(pl.col("user_id") == USERS_ONLY)
    assert plain["item_id"].to_list() == by_pop and (plain["reason"] == "popular").all()
    # only a tag: the tagged film's genres drive it, and the tagged film itself is not recommended
    tagged = recs.filter(pl.col("user_id") == TAG_ONLY)
    assert len(tagged) == 10 and TOY_STORY not in tagged["item_id"].to_list()
    assert tagged["reason"].str.starts_with("genre-match: ").all()
    # every user in the snapshot with training rows is served by the model
    served = recs.filter(pl.col("user_id") < 900000).filter(pl.col("user_id").is_in(_snapshot_users(base)))[
        "reason"
    ]
    assert (served.str.starts_with("because you rated ") | (served == "model:mf")).all()


def _snapshot_users(base: dict) -> list[int]:
    with base["wh"].connect(read_only=True) as con:
        return [r[0] for r in con.sql("SELECT user_id FROM user_index").fetchall()]


def test_min_history_sends_short_histories_to_the_fallback(base):
    wh = base["wh"]
    with wh.connect(read_only=True) as con:
        run = resolve_run(con, base["mf"])
    model = load_run_model(run, "cpu")
    frame, info = score_run(wh, run, model, 10, 1 << 26, min_history=30)
    with wh.connect(read_only=True) as con:
        short = {
            r[0]
            for r in con.sql(
                """SELECT u.user_id FROM interactions x JOIN user_index u
                    USING (snapshot_id, user_idx) WHERE snapshot_id = $s GROUP BY ALL HAVING count(*) < 30""",
                params={"s": run["snapshot_id"]},
            ).fetchall()
        }
    fallback_users = set(
        frame.filter(~pl.col("reason").str.starts_with("because") & (pl.col("reason") != "model:mf"))[
            "user_id"
        ].to_list()
    )
    assert short and short <= fallback_users
    assert info["model"] == len(_snapshot_users(base)) - len(short)


def test_model_option_and_a_protocol_run_use_only_what_that_model_was_trained_on(base, tmp_path):
    wh = _copy(base, tmp_path)
    result = _cli(wh, "--model", "popularity")
    assert result.exit_code == 0, result.output
    with wh.connect(read_only=True) as con:
        runs = con.sql("SELECT DISTINCT run_id FROM recommendations").fetchall()
        reasons = {
            r[0]
            for r in con.sql(
                "SELECT DISTINCT reason FROM recommendations WHERE user_id IN "
                "(SELECT user_id FROM user_index)"
            ).fetchall()
        }
    assert runs == [(base["popularity"],)] and reasons == {"model:popularity"}
    # trained on user_temporal's train part: items seen only in valid/test are unknown to the model
    run_id = fit_run(wh, "popularity", protocol="user_temporal", device="cpu")
    with wh.connect(read_only=True) as con:
        run = resolve_run(con, run_id)
        train_items = {
            r[0]
            for r in con.sql(
                """
            SELECT DISTINCT i.item_id FROM interactions x JOIN item_index i USING (snapshot_id, item_idx)
            ANTI JOIN (SELECT * FROM split_holdout WHERE protocol = 'user_temporal') h
                 USING (snapshot_id, user_idx, item_idx)
            WHERE x.snapshot_id = $s""",
                params={"s": run["snapshot_id"]},
            ).fetchall()
        }
        inputs = load_inputs(con, run)
        all_items = scalar(con, "SELECT count(DISTINCT item_idx) FROM interactions")
    assert set(inputs.item_ids[inputs.candidates].tolist()) == train_items and len(train_items) < all_items


# -- the blocked core -------------------------------------------------------------------------
class _Factors(Recommender):
    name = "factors-test"

    def __init__(self, U: torch.Tensor, V: torch.Tensor):
        super().__init__()
        self.U, self.V, self.n_users, self.n_items = U, V, len(U), len(V)

    def user_vectors(self):
        return self.U

    def item_vectors(self):
        return self.V

    def score(self, user_idx, item_idx=None):
        return self.U[user_idx] @ self.V.T


def test_topn_equals_brute_force_across_block_sizes():
    g = torch.Generator().manual_seed(3)
    U, V = torch.randn(300, 8, generator=g), torch.randn(500, 8, generator=g)
    rng = np.random.default_rng(3)
    seen = sp.random(300, 500, density=0.3, format="lil", random_state=rng)
    seen[7] = 1.0  # user 7 has seen everything
    seen = seen.tocsr()
    cand = rng.random(500) > 0.2
    dense = (U @ V.T).numpy()
    dense[seen.toarray() > 0] = -np.inf
    dense[:, ~cand] = -np.inf
    order = np.argsort(-dense, axis=1, kind="stable")[:, :10]
    for budget in (1 << 20, 1 << 30):  # 131 users per block, then one block
        items, scores = topn(
            _Factors(U, V), np.arange(300), 10, exclude=seen, candidates=cand, memory_budget=budget
        )
        ok = np.isfinite(np.take_along_axis(dense, order, 1))
        assert (items == np.where(ok, order, -1)).all()
        assert np.allclose(scores[ok], np.take_along_axis(dense, order, 1)[ok], atol=1e-5)
    assert (items[7] == -1).all() and np.isnan(scores[7]).all()
    # a row's result never depends on the rows blocked with it (shards, --users): bit for bit
    for users in (np.arange(0, 300, 3), np.array([5, 299]), np.array([42])):
        part, part_scores = topn(
            _Factors(U, V), users, 10, exclude=seen, candidates=cand, memory_budget=1 << 20
        )
        assert (part == items[users]).all() and np.array_equal(part_scores, scores[users], equal_nan=True)


@pytest.mark.parametrize("kind", ["vectors", "item_item"])
def test_explanation_anchor_is_the_most_similar_liked_item(kind):
    from batchrec.scoring import explain_anchors, explanation_similarity

    rng = np.random.default_rng(5)
    vecs = rng.standard_normal((400, 6)).astype(np.float32)
    W = rng.standard_normal((400, 400)).astype(np.float32)
    model = _Factors(torch.zeros(50, 6), torch.from_numpy(vecs))
    if kind == "item_item":
        model.item_item = lambda: torch.from_numpy(W)
    counts = rng.integers(0, 60, 50)  # histories of very different lengths, some empty
    liked = sp.csr_matrix(
        (
            np.ones(counts.sum()),
            np.concatenate([rng.choice(400, c, replace=False) for c in counts]),
            np.concatenate([[0], np.cumsum(counts)]),
        ),
        shape=(50, 400),
    )
    recs = rng.integers(0, 400, (50, 10))
    recs[3, 7:] = -1  # a short list
    rows = np.arange(50)[::-1].copy()  # not in index order
    how = explanation_similarity(model, None)
    got = explain_anchors(*how, recs, liked, rows)
    assert (explain_anchors(*how, recs[::4], liked, rows[::4]) == got[::4]).all()  # whoever shares the batch
    centred = vecs - vecs.mean(0)
    unit = centred / np.linalg.norm(centred, axis=1, keepdims=True)
    for b, r in enumerate(rows):
        mine = liked.indices[liked.indptr[r] : liked.indptr[r + 1]]
        for k, item in enumerate(recs[b].tolist()):
            closeness = W[mine, item] if kind == "item_item" else unit[mine] @ unit[item]
            assert got[b, k] == (-1 if item < 0 or not len(mine) else mine[np.argmax(closeness)])


def test_anchor_sample_keeps_short_histories_whole_and_caps_long_ones():
    from batchrec.scoring.inputs import _sample_rows

    rng = np.random.default_rng(8)
    counts = np.r_[np.arange(0, 33), np.full(200, 300)]
    m = sp.csr_matrix(
        (
            np.ones(counts.sum(), bool),
            np.concatenate([rng.choice(5000, c, replace=False) for c in counts]),
            np.r_[0, np.cumsum(counts)],
        ),
        shape=(len(counts), 5000),
    )
    a, b = _sample_rows(m, 32), _sample_rows(m.copy(), 32)
    kept = np.diff(a.indptr)
    assert (kept[:33] == counts[:33]).all()  # up to the cap: every liked item
    assert 28 < kept[33:].mean() < 36 and kept[33:].max() < 60  # beyond it: about 32
    assert (a.indices == b.indices).all() and (a.indptr == b.indptr).all()  # fixed, not random per run
    assert all(
        set(a.indices[a.indptr[r] : a.indptr[r + 1]]) <= set(m.indices[m.indptr[r] : m.indptr[r + 1]])
        for r in range(len(counts))
    )


def test_shard_partition_is_fixed_and_covers_everyone():
    # splitmix64's published first two outputs from seed 0 are the finaliser of 1 and 2 times its
    # increment 0x9E3779B97F4A7C15 (Vigna's reference implementation)
    assert mix64(np.array([0x9E3779B97F4A7C15, 0x3C6EF372FE94F82A], np.uint64)).tolist() == [
        0xE220A8397B1DCDAF,
        0x6E789E6AA1B965F4,
    ]
    # by hand (Python integers, the same three xor-shift-multiply rounds): the shards of a few ids
    assert shard_of(np.array([1, 2, 3, 123456789]), 1000).tolist() == [789, 730, 856, 584]
    assert shard_of(np.array([1, 2, 3, 610]), 7).tolist() == [6, 1, 4, 2]
    parts = shard_of(np.arange(1, 20001), 7)
    assert set(np.unique(parts)) == set(range(7)) and np.bincount(parts).min() > 2500
    with pytest.raises(BatchrecError, match="i/N"):
        parse_shard("3/3")


# -- shards -----------------------------------------------------------------------------------
def test_union_of_three_shards_equals_the_full_run_and_publishes(base, tmp_path):
    wh = _copy(base, tmp_path)
    full = _recs(wh)
    for i in range(3):
        result = _cli(wh, "--run", base["mf"], "--shard", f"{i}/3")
        assert result.exit_code == 0, result.output
    folder = wh.shards_dir / f"run_id={base['mf']}"
    parts = [pl.read_parquet(folder / f"shard={i}.parquet") for i in range(3)]
    assert sum(len(p) for p in parts) == len(full)
    assert set.isdisjoint(*[set(p["user_id"].to_list()) for p in parts[:2]])
    union = pl.concat(parts).sort("user_id", "rank")
    assert union["user_id"].to_list() == full["user_id"].to_list()
    assert union["item_id"].to_list() == full["item_id"].to_list()
    assert union["reason"].to_list() == full["reason"].to_list()
    assert np.allclose(union["score"].to_numpy(), full["score"].to_numpy(), atol=1e-5)
    # a missing shard blocks publishing; the complete set is published as one run
    (folder / "shard=1.parquet").rename(folder / "hidden.bak")
    result = _cli(wh, "--publish", base["mf"])
    assert result.exit_code != 0 and "shard 1/3 is missing" in result.output
    (folder / "hidden.bak").rename(folder / "shard=1.parquet")
    result = _cli(wh, "--publish", base["mf"])
    assert result.exit_code == 0, result.output
    after = _recs(wh)
    assert after["item_id"].to_list() == full["item_id"].to_list()
    assert after["scored_at"].min() > full["scored_at"].max()
    assert not list(folder.glob("shard=*.parquet"))


# -- publishing -------------------------------------------------------------------------------
def test_history_moves_and_retention(base, tmp_path):
    wh = _copy(base, tmp_path)
    with wh.connect() as con:
        previous = scalar(con, "SELECT count(*) FROM recommendations")
        con.execute("UPDATE recommendations SET scored_at = scored_at - INTERVAL 3 DAY")
        con.execute("""INSERT INTO recommendation_history
                       SELECT *, CAST(scored_at - INTERVAL 40 DAY AS DATE) FROM recommendations WHERE user_id < 50""")
        expired = scalar(con, "SELECT count(*) FROM recommendation_history")
        old_day = scalar(con, "SELECT CAST(max(scored_at) AS DATE) FROM recommendations")
    result = _cli(wh, "--run", base["mf"], "--retention-days", "30")
    assert result.exit_code == 0, result.output
    assert f"{previous} earlier rows moved" in result.output and f"{expired} expired" in result.output
    with wh.connect(read_only=True) as con:
        history = con.sql("SELECT run_date, count(*) FROM recommendation_history GROUP BY 1").fetchall()
        assert scalar(con, "SELECT count(DISTINCT scored_at) FROM recommendations") == 1
    assert history == [(old_day, previous)]


def test_users_file_replaces_only_those_users(base, tmp_path):
    wh = _copy(base, tmp_path)
    before = _recs(wh)
    listed = tmp_path / "users.txt"
    listed.write_text("user_id\n1\n414\n900002\n424242\n")
    result = _cli(wh, "--run", base["mf"], "--users", str(listed))
    assert result.exit_code == 0, result.output
    assert "1 listed users are not in the warehouse" in result.output
    after = _recs(wh)
    chosen = pl.col("user_id").is_in([1, 414, 900002])
    assert after.filter(~chosen).equals(before.filter(~chosen))
    assert after.filter(chosen)["scored_at"].min() > before["scored_at"].max()
    assert after.filter(chosen)["item_id"].to_list() == before.filter(chosen)["item_id"].to_list()
    with wh.connect(read_only=True) as con:
        assert sorted(
            r[0] for r in con.sql("SELECT DISTINCT user_id FROM recommendation_history").fetchall()
        ) == [1, 414, 900002]


def test_reader_sees_the_old_run_or_the_new_one_never_a_mix(base, tmp_path):
    wh = _copy(base, tmp_path)
    old = _recs(wh)
    new = old.with_columns(pl.lit("next-run").alias("run_id"), pl.col("scored_at") + pl.duration(days=1))
    staged = write_parquet(
        pl.concat([new] * 20), tmp_path / "staged.parquet"
    )  # a big swap: more to interleave
    seen_states, stop = set(), threading.Event()
    reader = duckdb.connect(str(wh.path))  # same process: shares the database with the publisher (MVCC)

    def poll():
        cur = reader.cursor()
        while not stop.is_set():
            seen_states.add(
                tuple(
                    cur.sql("""
                SELECT (SELECT count(*) FROM recommendations), (SELECT string_agg(DISTINCT run_id, ',') FROM recommendations),
                       (SELECT count(*) FROM recommendation_history)""").fetchall()[0]
                )
            )

    thread = threading.Thread(target=poll)
    thread.start()
    time.sleep(0.2)
    published, moved, _ = publish(wh, [staged], retention_days=30)
    time.sleep(0.2)
    stop.set()
    thread.join()
    reader.close()
    before, after = (len(old), base["mf"], 0), (20 * len(old), "next-run", len(old))
    assert (published, moved) == (20 * len(old), len(old))
    assert seen_states == {before, after}


def _start_scoring(wh: Warehouse, run: str, fault: Path, code: str) -> subprocess.Popen:
    """`batchrec score --run RUN` as a real process, paused where `code` says (see faults.py)."""
    return start_batchrec(
        ["--warehouse", str(wh.path), "score", "--run", run, "--device", "cpu"], env=fault_env(fault, code)
    )


PAUSE_BEFORE_PUBLISH = "import batchrec.scoring.run as m\nm.publish = pause_before(m.publish)\n"


def test_kill_9_before_the_swap_leaves_the_previous_run_intact(base, tmp_path):
    wh = _copy(base, tmp_path)
    before = _recs(wh)
    fault = tmp_path / "fault"
    proc = _start_scoring(wh, base["mf"], fault, PAUSE_BEFORE_PUBLISH)
    try:
        wait_until_paused(proc, fault)  # everyone scored, nothing published yet
        # meanwhile the warehouse is readable and shows the previous run; the writer lock is held
        assert _recs(wh).equals(before)
        with pytest.raises(BatchrecError, match="busy"), wh.lock("probe"):
            pass
    finally:
        proc.kill()
        proc.communicate()
    assert proc.returncode == -signal.SIGKILL and _recs(wh).equals(before)
    with wh.lock("probe"):  # the kernel released the lock with the process
        pass
    result = _cli(wh, "--run", base["mf"])  # the next run publishes normally
    assert result.exit_code == 0, result.output
    assert _recs(wh)["scored_at"].min() > before["scored_at"].max()


def _history_rows(wh: Warehouse) -> int:
    with wh.connect(read_only=True) as con:
        return scalar(con, "SELECT count(*) FROM recommendation_history")


def test_kill_9_inside_the_publish_transaction_leaves_the_previous_run_intact(base, tmp_path):
    wh = _copy(base, tmp_path)
    before, history = _recs(wh), _history_rows(wh)
    fault = tmp_path / "fault"
    # paused with the old rows moved to history, deleted and the new ones inserted, before COMMIT
    proc = _start_scoring(
        wh,
        base["mf"],
        fault,
        "import batchrec.scoring.publishing as m\nm.transaction = pause_in(m.transaction)\n",
    )
    try:
        wait_until_paused(proc, fault)
        with pytest.raises(BatchrecError, match="busy"):  # it holds the DuckDB file open for writing
            with wh.connect(read_only=True):
                pass
    finally:
        proc.kill()
        proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    assert _recs(wh).equals(before) and _history_rows(wh) == history
    result = _cli(wh, "--run", base["mf"])
    assert result.exit_code == 0, result.output
    after = _recs(wh)
    assert after["scored_at"].min() > before["scored_at"].max() and len(after) == len(before)
    assert _history_rows(wh) == history + len(before)


# An analyst's DuckDB session in its own process: it opens the warehouse read-only, says "open",
# reads the live run until `hold` seconds have passed or the file `release` exists, then closes
# and prints when it closed and every state it saw.
READER = """
import duckdb, json, os, sys, time
db, hold, release = sys.argv[1], float(sys.argv[2]), sys.argv[3]
con = duckdb.connect(db, read_only=True)
print("open", flush=True)
states, end = set(), time.monotonic() + hold
while time.monotonic() < end and not os.path.exists(release):
    states.add(con.sql("SELECT count(*), strftime(max(scored_at), '%Y-%m-%d %H:%M:%S.%f') FROM recommendations").fetchall()[0])
    time.sleep(0.1)
con.close()
print(json.dumps({"closed": time.time(), "states": sorted(states)}), flush=True)
"""


def _start_reader(wh: Warehouse, hold: float, release: Path) -> subprocess.Popen:
    reader = subprocess.Popen(
        [sys.executable, "-c", READER, str(wh.path), str(hold), str(release)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert reader.stdout.readline() == "open\n"
    return reader


def _live(frame: pl.DataFrame) -> list:
    # the same text as the reader's strftime: str() and a VARCHAR cast differ on trailing zeros
    return [len(frame), frame["scored_at"].max().strftime("%Y-%m-%d %H:%M:%S.%f")]


def test_a_reader_in_another_process_sees_the_old_run_and_the_publish_waits_for_it(base, tmp_path):
    wh = _copy(base, tmp_path)
    before = _recs(wh)
    fault = tmp_path / "fault"
    proc = _start_scoring(
        wh,
        base["mf"],
        fault,
        PAUSE_BEFORE_PUBLISH
        + "import batchrec.scoring.publishing as p\np._open_for_publish = mark_after(p._open_for_publish, 'OPENED')\n",
    )
    try:
        wait_until_paused(proc, fault)
        reader = _start_reader(wh, 3.0, tmp_path / "never")  # open across the publish moment
        go(fault)
        seen = json.loads(reader.communicate(timeout=60)[0])
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert seen["states"] == [_live(before)]  # the old run, whole, all the time
    assert float((fault / "OPENED").read_text()) >= seen["closed"]  # the publish waited for the reader
    after = _recs(wh)
    assert after["scored_at"].min() > before["scored_at"].max() and len(after) == len(before)


def test_a_reader_holding_the_file_past_the_publish_wait_leaves_the_old_run_and_exit_75(base, tmp_path):
    wh = _copy(base, tmp_path)
    before = _recs(wh)
    fault, release = tmp_path / "fault", tmp_path / "release"
    proc = _start_scoring(
        wh,
        base["mf"],
        fault,
        PAUSE_BEFORE_PUBLISH
        + "import batchrec.scoring.publishing as p\np._open_for_publish = functools.partial(p._open_for_publish, wait_s=1.0)\n",
    )
    try:
        wait_until_paused(proc, fault)
        reader = _start_reader(wh, 600, release)
        go(fault)
        _, err = proc.communicate(timeout=120)  # gives up after its (shortened) wait
        release.touch()
        seen = json.loads(reader.communicate(timeout=60)[0])
    finally:
        proc.kill()
        release.touch()
    assert proc.returncode == 75 and "warehouse is busy" in err.strip().splitlines()[-1], err
    assert seen["states"] == [_live(before)] and _recs(wh).equals(before)
    result = _cli(wh, "--run", base["mf"])  # once the reader has gone, the next run publishes
    assert result.exit_code == 0, result.output
    assert _recs(wh)["scored_at"].min() > before["scored_at"].max()


# -- pairs ------------------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_pairs_keep_rows_order_and_columns_and_flag_unknowns(base, tmp_path, suffix):
    pairs = pl.DataFrame(
        {
            "user_id": [1, 1, 424242, 1, 424242, 610],
            "item_id": [1, 999999999, 1, 50, 999999999, 1],
            "note": ["a", "b", "c", "d", "e", "f"],
        }
    )
    src, out = tmp_path / f"pairs{suffix}", tmp_path / f"scored{suffix}"
    pairs.write_csv(src) if suffix == ".csv" else pairs.write_parquet(src)
    result = _cli(base["wh"], "--run", base["mf"], "--pairs", str(src), "--out", str(out))
    assert result.exit_code == 0, result.output
    scored = pl.read_csv(out) if suffix == ".csv" else pl.read_parquet(out)
    assert scored.columns == ["user_id", "item_id", "note", "score", "fallback"]
    assert scored["note"].to_list() == list("abcdef")
    assert scored["fallback"].to_list() == [False, True, True, False, True, False]
    with base["wh"].connect(read_only=True) as con:
        run = resolve_run(con, base["mf"])
        uidx = dict(
            con.execute(
                "SELECT user_id, user_idx FROM user_index WHERE snapshot_id = ?", [run["snapshot_id"]]
            ).fetchall()
        )
        iidx = dict(
            con.execute(
                "SELECT item_id, item_idx FROM item_index WHERE snapshot_id = ?", [run["snapshot_id"]]
            ).fetchall()
        )
    model = load_run_model(run, "cpu")
    u, i = torch.tensor([uidx[1], uidx[1], uidx[610]]), torch.tensor([iidx[1], iidx[50], iidx[1]])
    expected_known = model.score(u, i).clamp(0.5, 5.0).numpy()
    expected_fb = model.score_fallback(
        torch.tensor([uidx[1], -1, -1]), torch.tensor([-1, iidx[1], -1])
    ).numpy()
    got = scored["score"].to_numpy()
    assert np.allclose(got[[0, 3, 5]], expected_known, atol=1e-5)
    assert np.allclose(got[[1, 2, 4]], np.clip(expected_fb, 0.5, 5.0), atol=1e-5)
    assert ((got >= 0.5) & (got <= 5.0)).all()


def test_pairs_with_a_bad_id_name_the_line(base, tmp_path):
    src = tmp_path / "pairs.csv"
    src.write_text("user_id,item_id\n1,1\n2,x7\n")
    result = _cli(base["wh"], "--run", base["mf"], "--pairs", str(src), "--out", str(tmp_path / "o.csv"))
    assert result.exit_code == 1
    assert "line 3, column item_id: 'x7' is not an integer id" in result.output


# -- bad input --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "args, message",
    [
        (["--run", "no-such-run"], "unknown run 'no-such-run'"),
        (["--model", "ease"], "no runs of model 'ease'"),
        (["--top-n", "0"], "Invalid value for '--top-n': 0 is not in the range x>=1"),
        (["--top-n", "100000"], "larger than the catalogue"),
        (["--shard", "3/2"], "--shard expects i/N with 0 <= i < N"),
        (["--shard", "one/two"], "--shard expects i/N with 0 <= i < N"),
        (["--pairs", __file__], "--pairs needs --out"),
        (["--memory-budget", "lots"], "not a size like 512MB"),
        (["--publish", "latest"], "no shards of run"),
    ],
)
def test_bad_input_is_one_line_and_leaves_recommendations_untouched(base, tmp_path, args, message):
    wh = _copy(base, tmp_path)
    before = _recs(wh)
    result = _cli(wh, *args)
    assert result.exit_code != 0
    assert result.output.startswith("error: ") and result.output.count("\n") == 1 and message in result.output
    assert _recs(wh).equals(before)


def test_pruned_snapshot_and_missing_runs_and_busy_warehouse(base, tmp_path):
    wh = _copy(base, tmp_path)
    before = _recs(wh)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            (  # another process holds the writer lock
                "import sys, time; from batchrec.warehouse import Warehouse\n"
                "with Warehouse(sys.argv[1]).lock('train'):\n    print('held', flush=True); time.sleep(120)"
            ),
            str(wh.path),
        ],
        stdout=subprocess.PIPE,
    )
    try:
        assert holder.stdout.readline() == b"held\n"
        result = _cli(wh, "--run", base["mf"])
    finally:
        holder.kill()
        holder.wait()
    assert (
        result.exit_code == 75 and "warehouse is busy" in result.output and "batchrec train" in result.output
    )
    with wh.connect() as con:
        con.execute("DELETE FROM feature_snapshots")
    result = _cli(wh, "--run", base["mf"])
    assert result.exit_code == 1 and "has been pruned" in result.output
    with wh.connect() as con:
        con.execute("DELETE FROM model_runs")
    result = _cli(wh)
    assert result.exit_code == 1 and "no model runs" in result.output
    assert _recs(wh).equals(before)
