"""Feature snapshot tables on a hand-made dataset with known answers, TF-IDF by hand, and
ml-latest-small end to end."""

from __future__ import annotations

import json
import math
import statistics

import polars as pl
import pytest
from features_support import day, latest, load_ml_small, make_warehouse, query

from batchrec.features import build_snapshot
from batchrec.features.tfidf import tfidf

T = day(10)  # as_of of the hand-made snapshot

RATINGS = [
    (1, 10, 5.0, day(0)),
    (1, 20, 4.0, day(1)),
    (1, 30, 2.0, day(3)),
    (2, 10, 3.0, day(2)),
    (2, 20, 4.5, day(4)),
    (5, 40, 4.0, day(5)),  # item 40 is not in the catalogue
    (3, 10, 1.0, day(31)),  # user 3 only rates after as_of
    (1, 50, 1.0, T),  # at as_of: excluded too
]
ITEMS = [
    (10, "Ten (1995)", 1995, ["Comedy", "Drama"]),
    (20, "Twenty (2001)", 2001, ["Drama"]),
    (30, "Thirty", None, []),
    (50, "Fifty (2010)", 2010, ["Horror"]),  # never rated before as_of
]
TAGS = [
    (1, 10, "Funny", day(1)),
    (2, 10, "funny", day(2)),
    (1, 20, "dark comedy", day(4)),
    (4, 20, "gore", day(1)),  # user 4 has no ratings: counts for the item only
    (1, 10, "late", day(40)),  # after as_of
]


@pytest.fixture(scope="module")
def hand(tmp_path_factory):
    wh = make_warehouse(tmp_path_factory.mktemp("hand"), RATINGS, TAGS, ITEMS)
    build_snapshot(wh, as_of=T.isoformat(), params=("tfidf.min_df=1",))
    return wh, latest(wh)


def test_indices_are_dense_by_raw_id_and_point_in_time(hand):
    wh, sid = hand
    assert query(wh, "SELECT user_id, user_idx FROM user_index WHERE snapshot_id = ? ORDER BY 2", [sid]) == [
        (1, 0),
        (2, 1),
        (5, 2),
    ]
    # rated before as_of, plus the whole catalogue (50 is content-only)
    assert query(wh, "SELECT item_id, item_idx FROM item_index WHERE snapshot_id = ? ORDER BY 2", [sid]) == [
        (10, 0),
        (20, 1),
        (30, 2),
        (40, 3),
        (50, 4),
    ]
    assert query(
        wh, "SELECT user_idx, item_idx, rating FROM interactions WHERE snapshot_id = ? ORDER BY 1, 2", [sid]
    ) == [(0, 0, 5.0), (0, 1, 4.0), (0, 2, 2.0), (1, 0, 3.0), (1, 1, 4.5), (2, 3, 4.0)]


def test_user_features(hand):
    wh, sid = hand
    rows = {
        r[0]: r[1:]
        for r in query(
            wh,
            """SELECT user_id, n_ratings, mean_rating, std_rating, first_ts, last_ts,
        days_active, share_high, n_tags FROM user_features WHERE snapshot_id = ?""",
            [sid],
        )
    }
    assert rows.keys() == {1, 2, 5}
    n, mean, std, first, last, days, high, n_tags = rows[1]
    assert (n, first, last, days, n_tags) == (3, day(0), day(3), 3.0, 2)
    assert mean == pytest.approx(11 / 3) and std == pytest.approx(statistics.stdev([5, 4, 2]))
    assert high == pytest.approx(2 / 3)
    n, mean, std, first, last, days, high, n_tags = rows[2]
    assert (n, mean, days, high, n_tags) == (2, 3.75, 2.0, 0.5, 1)
    assert std == pytest.approx(1.5 / math.sqrt(2))
    assert rows[5] == (1, 4.0, None, day(5), day(5), 0.0, 1.0, 0)  # one rating: no std


def test_item_features_and_bayes_prior(hand):
    wh, sid = hand
    rows = {
        r[0]: r[1:]
        for r in query(
            wh,
            """SELECT item_id, n_ratings, mean_rating, std_rating, bayes_rating,
        pop_rank, first_ts, last_ts, year FROM item_features WHERE snapshot_id = ?""",
            [sid],
        )
    }
    m, c = 22.5 / 6, 6 / 4  # global mean; mean ratings per rated item
    assert rows[10][:2] == (2, 4.0) and rows[10][2] == pytest.approx(math.sqrt(2))
    assert rows[10][3] == pytest.approx((c * m + 8.0) / (c + 2))
    assert rows[20][3] == pytest.approx((c * m + 8.5) / (c + 2))
    assert rows[30][:3] == (1, 2.0, None) and rows[30][3] == pytest.approx((c * m + 2.0) / (c + 1))
    assert rows[40][3] == pytest.approx((c * m + 4.0) / (c + 1)) and rows[40][-1] is None
    assert rows[50] == (0, None, None, pytest.approx(m), 5, None, None, 2010)  # unrated: the prior
    # most rated first, ties by item id
    assert [rows[i][4] for i in (10, 20, 30, 40, 50)] == [1, 2, 3, 4, 5]
    assert (rows[10][5], rows[10][6], rows[10][7]) == (day(0), day(2), 1995)


def test_bayes_c_parameter(tmp_path):
    wh = make_warehouse(tmp_path, RATINGS, TAGS, ITEMS)
    build_snapshot(wh, as_of=T.isoformat(), protocols="random", params=("bayes_c=10",))
    bayes = query(wh, "SELECT bayes_rating FROM item_features WHERE item_id = 10")[0][0]
    assert bayes == pytest.approx((10 * 3.75 + 8.0) / 12)


def test_implicit_interactions_have_counts_but_no_rating_statistics(tmp_path):
    wh = make_warehouse(tmp_path, [(1, 10, None, day(0)), (1, 20, None, day(1)), (2, 10, None, day(2))])
    build_snapshot(wh, as_of=T.isoformat(), protocols="user_temporal")
    assert query(
        wh, "SELECT user_id, n_ratings, mean_rating, std_rating, share_high FROM user_features ORDER BY 1"
    ) == [(1, 2, None, None, None), (2, 1, None, None, None)]
    assert query(
        wh, "SELECT item_id, n_ratings, mean_rating, bayes_rating, pop_rank FROM item_features ORDER BY 1"
    ) == [(10, 2, None, None, 1), (20, 1, None, None, 2)]


def test_item_genres(hand):
    wh, sid = hand
    assert query(
        wh, "SELECT item_idx, genre FROM item_genres WHERE snapshot_id = ? ORDER BY 1, 2", [sid]
    ) == [(0, "Comedy"), (0, "Drama"), (1, "Drama"), (4, "Horror")]


def test_tfidf_table_uses_tags_before_as_of(hand):
    wh, sid = hand
    rows = query(
        wh, "SELECT item_idx, term, weight FROM item_tag_tfidf WHERE snapshot_id = ? ORDER BY 1, 2", [sid]
    )
    # item 10: "funny" twice ("late" is after as_of); item 20: dark, comedy, "dark comedy", gore,
    # all df 1 among the N = 2 tagged items, so equal weights 1/2 after L2 normalisation.
    assert [(i, t) for i, t, _ in rows] == [
        (0, "funny"),
        (1, "comedy"),
        (1, "dark"),
        (1, "dark comedy"),
        (1, "gore"),
    ]
    assert [w for *_, w in rows] == pytest.approx([1.0, 0.5, 0.5, 0.5, 0.5])


THREE_ITEMS = pl.DataFrame(
    {
        "item_idx": [0, 0, 0, 1, 1, 2, 2],
        "tag": ["Dark  Comedy", "funny", "FUNNY", "funny", "sci-fi", "dark", "the"],
    }
)


def test_tfidf_three_items_by_hand():
    got = {
        (r["item_idx"], r["term"]): r["weight"] for r in tfidf(THREE_ITEMS, min_df=1).iter_rows(named=True)
    }
    # N = 3 tagged items. df: dark 2 (items 0, 2), funny 2 (0, 1), every other term 1; "the" is
    # a stop word; two-token tags are also kept whole ("dark comedy", "sci-fi").
    idf1, idf2 = math.log(4 / 2) + 1, math.log(4 / 3) + 1
    a = {"dark": idf2, "comedy": idf1, "dark comedy": idf1, "funny": 2 * idf2}  # tf(funny) = 2
    b = {"funny": idf2, "sci": idf1, "fi": idf1, "sci-fi": idf1}
    want = {}
    for item, weights in ((0, a), (1, b), (2, {"dark": idf2})):
        norm = math.sqrt(sum(w * w for w in weights.values()))
        want.update({(item, term): w / norm for term, w in weights.items()})
    assert got.keys() == want.keys()
    for key, weight in want.items():
        assert got[key] == pytest.approx(weight, rel=1e-12), key
    assert got[(0, "funny")] == pytest.approx(0.687702, abs=1e-6)  # 2*idf2 / 3.744879
    assert got[(2, "dark")] == 1.0


def test_tfidf_min_df_and_max_terms():
    got = tfidf(THREE_ITEMS, min_df=2).sort("item_idx", "term").rows()
    # vocabulary {dark, funny}: idf cancels inside each item -> (1, 2) / sqrt(5) for item 0
    assert got == [
        (0, "dark", pytest.approx(1 / math.sqrt(5))),
        (0, "funny", pytest.approx(2 / math.sqrt(5))),
        (1, "funny", 1.0),
        (2, "dark", 1.0),
    ]
    # cap of one term: the highest df, ties by term -> "dark"; item 1 loses all its terms
    assert tfidf(THREE_ITEMS, min_df=1, max_terms=1).sort("item_idx").rows() == [
        (0, "dark", 1.0),
        (2, "dark", 1.0),
    ]


def test_tfidf_no_tags():
    assert (
        tfidf(
            pl.DataFrame({"item_idx": [], "tag": []}, schema={"item_idx": pl.Int32, "tag": pl.String})
        ).height
        == 0
    )


@pytest.fixture(scope="module")
def ml_small(tmp_path_factory):
    wh = make_warehouse(tmp_path_factory.mktemp("mls"))
    load_ml_small(wh)
    summary = build_snapshot(wh)
    return wh, latest(wh), summary


def test_ml_latest_small_snapshot(ml_small):
    wh, sid, summary = ml_small
    assert sid in summary and "100836 interactions" in summary
    counts = json.loads(
        query(wh, "SELECT row_counts FROM feature_snapshots WHERE snapshot_id = ?", [sid])[0][0]
    )
    n_users, n_items = query(wh, "SELECT count(DISTINCT user_id), count(DISTINCT item_id) FROM ratings")[0]
    n_catalogue_or_rated = query(
        wh, "SELECT count(*) FROM (SELECT item_id FROM items UNION SELECT item_id FROM ratings)"
    )[0][0]
    assert counts["user_index"] == n_users == 610
    assert counts["item_index"] == n_catalogue_or_rated == 9742
    assert counts["interactions"] == 100836
    assert counts["item_features"] == counts["item_index"] and counts["user_features"] == counts["user_index"]
    assert counts["item_tag_tfidf"] > 1000
    # the exact user_temporal rule on ml-latest-small
    assert query(
        wh,
        "SELECT n_train, n_valid, n_test FROM split_protocols WHERE snapshot_id = ? AND protocol = 'user_temporal'",
        [sid],
    ) == [(81200, 9818, 9818)]
    # the splits view labels every interaction once per protocol, consistently with the counts
    assert query(
        wh,
        """SELECT protocol, count(*) FILTER (part = 'train'), count(*) FILTER (part = 'valid'),
                               count(*) FILTER (part = 'test'), count(*)
                        FROM splits WHERE snapshot_id = ? GROUP BY protocol ORDER BY protocol""",
        [sid],
    ) == [
        (p, tr, va, te, 100836)
        for p, tr, va, te in query(
            wh,
            "SELECT protocol, n_train, n_valid, n_test FROM split_protocols WHERE snapshot_id = ? ORDER BY protocol",
            [sid],
        )
    ]


def test_ml_latest_small_tfidf_is_l2_normalised(ml_small):
    wh, sid, _ = ml_small
    norms = query(
        wh,
        "SELECT sqrt(sum(weight * weight)) FROM item_tag_tfidf WHERE snapshot_id = ? GROUP BY item_idx",
        [sid],
    )
    assert norms and all(abs(n - 1) < 1e-9 for (n,) in norms)
    terms = {t for (t,) in query(wh, "SELECT DISTINCT term FROM item_tag_tfidf WHERE snapshot_id = ?", [sid])}
    assert "dark comedy" in terms and "the" not in terms and not any(t != t.lower() for t in terms)


def test_ml_latest_small_time_cuts_are_exact(ml_small):
    wh, sid, _ = ml_small
    ts = sorted(t for (t,) in query(wh, "SELECT ts FROM interactions WHERE snapshot_id = ?", [sid]))
    n = len(ts)
    # global_temporal: test from the floor(0.2 n)-th latest timestamp on (ties included), valid
    # the floor(0.1 n) latest before that
    test_from = ts[n - math.floor(0.2 * n)]
    earlier = [t for t in ts if t < test_from]
    valid_from = earlier[len(earlier) - math.floor(0.1 * n)]
    got = dict(
        query(
            wh,
            """SELECT part, count(*) FROM split_holdout
                            WHERE snapshot_id = ? AND protocol = 'global_temporal' GROUP BY part""",
            [sid],
        )
    )
    assert got == {
        "test": sum(t >= test_from for t in ts),
        "valid": sum(valid_from <= t < test_from for t in ts),
    }
    params = json.loads(
        query(
            wh,
            "SELECT params FROM split_protocols WHERE snapshot_id = ? AND protocol = 'global_temporal'",
            [sid],
        )[0][0]
    )
    assert params["test_from"] == str(test_from) and params["valid_from"] == str(valid_from)
