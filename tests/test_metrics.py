"""Metrics against small examples worked out by hand (ties, short lists, users without relevant
items), plus the like-for-like measurement on ml-latest-small."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from batchrec.data import Interactions, SnapshotData
from batchrec.metrics import (
    beyond_accuracy_metrics,
    canonical_order,
    evaluate_model,
    eventwise_metrics,
    mae,
    measure,
    per_user_ranking,
    ranking_metrics,
    rmse,
    rmse_by_item_count,
)
from batchrec.models.base import Recommender

L2, L3 = math.log2(3), 2.0  # log2(3), log2(4): discounts of ranks 2 and 3


def _csr(rows: list[list[int]], n_items: int) -> sp.csr_matrix:
    r = [u for u, items in enumerate(rows) for _ in items]
    c = [i for items in rows for i in items]
    return sp.csr_matrix((np.ones(len(c), np.float32), (r, c)), shape=(len(rows), n_items))


def test_rmse_mae():
    pred, true = np.array([3.0, 4.0, 1.0]), np.array([4.0, 4.0, 3.0])
    assert rmse(pred, true) == pytest.approx(math.sqrt((1 + 0 + 4) / 3))
    assert mae(pred, true) == pytest.approx(1.0)


def test_ranking_metrics_by_hand():
    topk = np.array(
        [
            [2, 0, 5],  # user 0: one hit at rank 2 of 2 relevant
            [3, -1, -1],  # user 1: only one candidate (fewer than K), a hit at rank 1
            [0, 1, 2],  # user 2: no relevant items -> not counted at all
            [1, 0, 2],  # user 3: 4 relevant (more than K), hits at ranks 1 and 3
        ]
    )
    relevant = _csr([[0, 4], [3], [], [1, 2, 3, 4]], 6)
    m = ranking_metrics(topk, relevant, [1, 3])
    assert m["users"] == 3
    assert m["precision@1"] == pytest.approx((0 + 1 + 1) / 3)
    assert m["precision@3"] == pytest.approx((1 / 3 + 1 / 3 + 2 / 3) / 3)  # empty slots count as misses
    assert m["recall@1"] == pytest.approx((0 + 1 + 1 / 4) / 3)
    assert m["recall@3"] == pytest.approx((1 / 2 + 1 + 2 / 4) / 3)
    assert m["hit_rate@1"] == pytest.approx(2 / 3)
    assert m["hit_rate@3"] == pytest.approx(1.0)
    ndcg0 = (1 / L2) / (1 + 1 / L2)  # ideal DCG over min(3, 2) = 2 relevant
    ndcg3 = (1 + 1 / L3) / (1 + 1 / L2 + 1 / L3)  # ideal DCG over min(3, 4) = 3
    assert m["ndcg@3"] == pytest.approx((ndcg0 + 1 + ndcg3) / 3)
    assert m["ndcg@1"] == pytest.approx((0 + 1 + 1) / 3)
    assert m["map@3"] == pytest.approx(((1 / 2) / 2 + 1 + (1 + 2 / 3) / 3) / 3)
    assert m["map@1"] == pytest.approx((0 + 1 + 1) / 3)
    assert m["mrr@1"] == pytest.approx((0 + 1 + 1) / 3)
    assert m["mrr@3"] == pytest.approx((1 / 2 + 1 + 1) / 3)
    assert m["mrr"] == m["mrr@3"]


def test_ranking_metrics_without_relevant_users():
    m = ranking_metrics(np.array([[0, 1]]), _csr([[]], 3), [2])
    assert m == {"users": 0.0}


def test_canonical_order_breaks_ties_by_item_and_keeps_padding_last():
    items = np.array([[4, 2, 7, 1], [5, 3, -1, -1]])
    scores = np.array([[0.9, 0.5, 0.5, 0.9], [2.0, 2.0, np.nan, np.nan]], np.float32)
    assert canonical_order(items, scores).tolist() == [[1, 4, 2, 7], [3, 5, -1, -1]]


def test_beyond_accuracy_by_hand():
    topk = np.array([[0, 1, -1], [1, 2, 3]])
    count = np.array([10, 5, 1, 2, 0])
    m = beyond_accuracy_metrics(topk, count, n_users=20, n_candidates=4, ks=[1, 3])
    assert m["coverage@1"] == pytest.approx(2 / 4)  # items {0, 1}
    assert m["coverage@3"] == pytest.approx(4 / 4)  # items {0, 1, 2, 3}; the -1 slot is nothing
    assert m["avg_popularity@1"] == pytest.approx((10 + 5) / 2)
    assert m["avg_popularity@3"] == pytest.approx((10 + 5 + 5 + 1 + 2) / 5)
    info = lambda c: -math.log2(c / 20)  # noqa: E731
    assert m["novelty@3"] == pytest.approx((info(10) + 2 * info(5) + info(1) + info(2)) / 5)


def test_eventwise_by_hand():
    # user row 0 holds out items 5 and 3: both are queries, and each one's rank counts the other
    # (still a candidate); user row 1's event item 2 is not in its (short) list.
    topk = np.array([[5, 1, 3], [0, 4, -1]])
    m = eventwise_metrics(topk, np.array([0, 0, 1]), np.array([5, 3, 2]), [1, 3])
    assert m["events"] == 3
    assert m["ndcg@3"] == pytest.approx((1 + 1 / L3 + 0) / 3)
    assert m["recall@3"] == pytest.approx(2 / 3)
    assert m["ndcg@1"] == pytest.approx(1 / 3)
    assert m["recall@1"] == pytest.approx(1 / 3)
    assert m["mrr@3"] == pytest.approx((1 + 1 / 3) / 3)


class FixedScores(Recommender):
    """A rating 'model' whose scores are a given matrix."""

    name = "fixed"
    task = "rating"
    seed_param = False

    def __init__(self, scores):
        super().__init__()
        self.S = torch.as_tensor(np.asarray(scores, np.float32))

    def score(self, user_idx, item_idx=None):
        return self.S[user_idx] if item_idx is None else self.S[user_idx, item_idx]


def _tiny() -> SnapshotData:
    def part(rows):
        u, i, r = (np.array(c) for c in zip(*rows))
        return Interactions(
            u.astype(np.int64), i.astype(np.int64), r.astype(np.float32), np.arange(len(u), dtype=np.int64)
        )

    train = part([(0, 0, 5), (0, 1, 3), (1, 0, 4), (1, 2, 2), (2, 3, 4), (2, 4, 1)])  # catalogue: items 0-4
    valid = part([(0, 2, 4)])
    test = part([(0, 3, 4.5), (0, 4, 2), (0, 5, 5), (1, 1, 4), (1, 3, 3.5), (2, 0, 1)])  # item 5 unknown
    return SnapshotData(
        "tiny",
        "hand",
        3,
        6,
        train,
        valid,
        test,
        np.arange(3),
        np.arange(6),
        (1.0, 5.0),
        sp.csr_matrix((6, 0)),
        [],
        sp.csr_matrix((6, 0)),
        [],
    )


def _fixed_model(data):
    scores = [
        [9, 9, 9, 3.0, 6.0, 0],  # user 0: candidates {3, 4} only (0, 1 train; 2 valid)
        [9, 4.0, 9, 4.0, 1.0, 0],  # user 1: items 1 and 3 tie; candidates {1, 3, 4}
        [2.0, 0, 0, 0, 0, 0],
    ]
    model = FixedScores(scores)
    model.prepare(data, torch.device("cpu"))
    return model


def test_measure_tiny_snapshot_by_hand():
    data = _tiny()
    res = measure(_fixed_model(data), data, ks=[1, 3])
    m = res.metrics
    # rating part: 5 train-known test pairs; (0, 4) predicted 6 is clipped to 5
    assert m["n_known"] == 5 and m["n_unknown"] == 1
    assert m["rmse"] == pytest.approx(math.sqrt((1.5**2 + 3**2 + 0 + 0.5**2 + 1) / 5))
    assert m["mae"] == pytest.approx((1.5 + 3 + 0 + 0.5 + 1) / 5)
    assert sorted(np.abs(res.residuals).tolist()) == pytest.approx([0, 0.5, 1, 1.5, 3])
    # every known test item has 1 or 2 training ratings: one bucket, holding every known pair
    assert [k for k in m if "_items_" in k] == ["rmse_items_1-4", "n_items_1-4"]
    assert m["rmse_items_1-4"] == pytest.approx(m["rmse"]) and m["n_items_1-4"] == 5
    # ranking part: user 0 list [4, 3] (short), relevant {3}; user 1 list [1, 3, 4] (tie -> lower
    # item first), relevant {1}; user 2 has no relevant item; item 5 is outside the catalogue.
    assert m["users"] == 2
    assert m["precision@1"] == pytest.approx(0.5)
    assert m["precision@3"] == pytest.approx(1 / 3)
    assert m["ndcg@3"] == pytest.approx((1 / L2 + 1) / 2)
    assert m["map@3"] == pytest.approx((1 / 2 + 1) / 2)
    assert m["mrr"] == pytest.approx((1 / 2 + 1) / 2)
    assert m["coverage@3"] == pytest.approx(3 / 5)  # {1, 3, 4} of the 5 catalogue items
    assert m["coverage@1"] == pytest.approx(2 / 5)  # {4, 1}
    assert evaluate_model(_fixed_model(data), data, ks=[1, 3]) == m


def test_rmse_by_item_count_by_hand():
    pred, true = np.array([3.0, 4.0, 2.0, 5.0, 1.0]), np.array([4.0, 4.0, 4.0, 3.0, 1.0])
    counts = np.array([0, 3, 7, 7, 150])
    got = rmse_by_item_count(pred, true, counts, edges=(1, 5, 100))
    assert list(got) == ["<1", "1-4", "5-99", "100+"]
    assert got["<1"] == {"n": 1, "rmse": 1.0} and got["1-4"] == {"n": 1, "rmse": 0.0}
    assert got["5-99"]["n"] == 2 and got["5-99"]["rmse"] == pytest.approx(2.0)  # errors 2 and 2
    assert got["100+"] == {"n": 1, "rmse": 0.0}
    assert "<1" not in rmse_by_item_count(pred[1:], true[1:], counts[1:], edges=(1, 5, 100))


def test_measure_eventwise_tiny_snapshot_by_hand():
    data = _tiny()
    m = measure(_fixed_model(data), data, ks=[1, 3], eventwise=True).metrics
    assert m["events"] == 2  # (0, 3) and (1, 1); (0, 5) is outside the catalogue
    assert m["ndcg@3"] == pytest.approx((1 / L2 + 1) / 2)
    assert m["recall@1"] == pytest.approx(0.5)


def test_popularity_like_for_like_on_ml_small(ml_small):
    """Most-popular through the real scorer on ml-latest-small, user_temporal (issue reference
    for most-popular: NDCG@10 0.0464 over 557 users)."""
    counts = np.bincount(ml_small.train.item_idx, minlength=ml_small.n_items).astype(np.float32)

    class MostPopular(FixedScores):
        task = "ranking"

        def score(self, user_idx, item_idx=None):
            return self.S[0].expand(len(user_idx), -1) if item_idx is None else self.S[0, item_idx]

    model = MostPopular([counts])
    model.prepare(ml_small, torch.device("cpu"))
    m = evaluate_model(model, ml_small, ks=[10])
    assert m["users"] == 557
    assert m["ndcg@10"] == pytest.approx(0.0464, abs=0.002)
    n_catalogue = (counts > 0).sum()
    assert m["coverage@10"] * n_catalogue < 200  # nearly the same 10 items for everyone
    assert m["avg_popularity@10"] > 20 * counts.sum() / n_catalogue  # and they are the most rated
    assert "rmse" not in m


def _tiny_with_cold_user() -> SnapshotData:
    """`_tiny` plus user 3, who has no training interaction and two test ratings (items 0 and 3)."""
    data = _tiny()
    test = data.test.concat(
        Interactions(np.array([3, 3]), np.array([0, 3]), np.array([5.0, 4.0], np.float32), np.array([10, 11]))
    )
    return replace(data, n_users=4, test=test, user_ids=np.arange(4))


def test_segments_by_hand():
    data = _tiny_with_cold_user()
    scores = [
        [9, 9, 9, 3.0, 6.0, 0],
        [9, 4.0, 9, 4.0, 1.0, 0],
        [2.0, 0, 0, 0, 0, 0],
        [5.0, 0, 0, 1.0, 0, 0],
    ]  # user 3 (cold): list [0, 3, 1], both relevant items first
    model = FixedScores(scores)
    model.prepare(data, torch.device("cpu"))
    res = measure(model, data, ks=[1, 3], segments=True)
    m = res.metrics
    # users 0 and 1 have 2 training interactions each (segment 1-19), user 3 none (cold)
    assert m["users"] == 3 and m["users_users_1-19"] == 2 and m["users_users_cold"] == 1
    assert m["ndcg_users_1-19@3"] == pytest.approx((1 / L2 + 1) / 2)  # the two users of test_measure_tiny
    assert m["ndcg_users_cold@3"] == pytest.approx(1.0)
    assert m["ndcg@3"] == pytest.approx((1 / L2 + 1 + 1) / 3)
    assert m["recall_users_cold@1"] == pytest.approx(1 / 2)
    # every relevant item has 1-2 training ratings: the one item bucket is the whole NDCG
    assert [k for k in m if k.startswith("ndcg_items_")] == ["ndcg_items_1-4@1", "ndcg_items_1-4@3"]
    assert m["ndcg_items_1-4@3"] == pytest.approx(m["ndcg@3"]) and m["users_items_1-4"] == 3
    # rating: the known pairs are those of users 0-2 (segment 1-19); the cold user's two pairs are
    # scored by the fallback (user unknown: the global mean plus the item offset), clipped
    assert m["rmse_users_1-19"] == pytest.approx(m["rmse"]) and m["n_users_1-19"] == 5
    fallback = model.score_fallback(torch.tensor([-1, -1]), torch.tensor([0, 3])).clamp(1.0, 5.0).numpy()
    assert m["rmse_users_cold"] == pytest.approx(
        math.sqrt(np.mean((fallback - np.array([5.0, 4.0])) ** 2)), rel=1e-6
    )
    assert m["n_users_cold"] == 2 and m["n_unknown"] == 3  # and (0, 5): item 5 is unknown
    # the bootstrap's per-user parts give back every averaged figure
    for group in res.per_user:
        for name in group.parts:
            assert group.value(name) == pytest.approx(m[name]), name
    assert not {k for k in measure(model, data, ks=[1, 3]).metrics if "_users_" in k or "ndcg_items_" in k}


def test_segments_add_up_on_ml_small(ml_small):
    counts = np.bincount(ml_small.train.item_idx, minlength=ml_small.n_items).astype(np.float32)
    model = FixedScores([counts] * ml_small.n_users)
    model.task = "ranking"
    model.prepare(ml_small, torch.device("cpu"))
    m = measure(model, ml_small, ks=[10], segments=True).metrics
    segments = [s for s in ("1-19", "20-99", "100+", "cold") if f"users_users_{s}" in m]
    assert segments == ["1-19", "20-99", "100+"]  # user_temporal: every user keeps a training part
    assert sum(m[f"users_users_{s}"] for s in segments) == m["users"] == 557
    for metric in ("ndcg@10", "recall@10"):  # the users' mean is the users-weighted mean of the segments
        name, _, k = metric.partition("@")
        weighted = sum(m[f"{name}_users_{s}@{k}"] * m[f"users_users_{s}"] for s in segments) / m["users"]
        assert weighted == pytest.approx(m[metric])
    # most-popular finds the relevant items among the most rated, never the rarely rated ones
    assert m["ndcg_items_100+@10"] > m["ndcg@10"] > m.get("ndcg_items_5-19@10", 0.0) == 0.0


@pytest.mark.slow  # ranx compiles its metrics with numba on first use: 20-80 s here
def test_ranking_metrics_match_ranx(ml_small):
    """Our P/R/NDCG/HitRate/MRR/MAP@k against ranx's on the same lists: for each user of
    ml-latest-small's user_temporal test part with a relevant item, 20 items drawn from their test
    items and random others. MAP: ours divides by min(k, #relevant), ranx's AP by #relevant."""
    ranx = pytest.importorskip("ranx", reason="ranx is a dev-only dependency (pip install -e '.[dev]')")
    test = ml_small.test
    relevant = test.select(test.rating >= 4.0).csr(ml_small.n_users, ml_small.n_items, "ones")
    rng = np.random.default_rng(0)
    users = np.flatnonzero(np.diff(relevant.indptr) > 0)
    by_user = np.split(test.item_idx, np.cumsum(np.bincount(test.user_idx, minlength=ml_small.n_users))[:-1])
    topk = np.stack(
        [
            rng.permutation(np.union1d(by_user[u], rng.choice(ml_small.n_items, 40, replace=False)))[:20]
            for u in range(ml_small.n_users)
        ]
    )
    ks = [1, 5, 10, 20]
    ours_rows, ours = per_user_ranking(topk, relevant, ks)
    assert np.array_equal(ours_rows, users) and len(users) > 500
    qrels = ranx.Qrels({f"{u:06d}": {str(i): 1 for i in relevant[u].indices} for u in users})
    run = ranx.Run({f"{u:06d}": {str(i): float(20 - r) for r, i in enumerate(topk[u])} for u in users})
    names = [f"{m}@{k}" for m in ("precision", "recall", "ndcg", "hit_rate", "mrr", "map") for k in ks]
    theirs = ranx.evaluate(qrels, run, names, return_mean=False)
    n_rel = np.diff(relevant.indptr)[users]
    for name in names:
        k = int(name.split("@")[1])
        mine = ours[name] * (np.minimum(n_rel, k) / n_rel if name.startswith("map") else 1.0)
        assert np.allclose(mine, theirs[name], atol=1e-9), name
    assert ranking_metrics(topk, relevant, ks)["ndcg@10"] == pytest.approx(float(np.mean(theirs["ndcg@10"])))
    assert (ours["map@20"] > theirs["map@20"] + 1e-9).any()  # the variants differ where #relevant > k
