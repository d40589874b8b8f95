"""Each split protocol's rule on hand-made histories with known answers."""

from __future__ import annotations

import json
import math

import pytest
from features_support import day, latest, load_ml_small, make_warehouse, query

from batchrec.errors import BatchrecError
from batchrec.features import build_snapshot

AS_OF = day(1000).isoformat()


def parts(wh, protocol, snapshot_id=None) -> dict[tuple[int, int], str]:
    """(user_id, item_id) -> part, for the held-out rows of one protocol."""
    snapshot_id = snapshot_id or latest(wh)
    rows = query(
        wh,
        """SELECT u.user_id, i.item_id, h.part FROM split_holdout h
        JOIN user_index u USING (snapshot_id, user_idx) JOIN item_index i USING (snapshot_id, item_idx)
        WHERE h.snapshot_id = ? AND h.protocol = ?""",
        [snapshot_id, protocol],
    )
    return {(u, i): p for u, i, p in rows}


def counts(wh, protocol) -> tuple[int, int, int]:
    return query(
        wh,
        "SELECT n_train, n_valid, n_test FROM split_protocols WHERE snapshot_id = ? AND protocol = ?",
        [latest(wh), protocol],
    )[0]


def build(tmp_path, ratings, protocol, *params):
    wh = make_warehouse(tmp_path, ratings)
    build_snapshot(wh, as_of=AS_OF, protocols=protocol, params=params)
    return wh


# user 1: 25 ratings, items 1..25 on days 1..25, except that items 5 and 30 share day 100 and
# item 40 is the latest (day 200); users 2, 3, 4 have 1, 2 and 9 ratings.
HISTORIES = (
    [(1, i, 3.0, day(i)) for i in range(1, 25) if i != 5]
    + [(1, 5, 4.0, day(100)), (1, 30, 4.0, day(100)), (1, 40, 4.0, day(200))]
    + [(2, 7, 4.0, day(3))]
    + [(3, 7, 4.0, day(3)), (3, 8, 2.0, day(4))]
    + [(4, i, 5.0, day(i)) for i in range(1, 10)]
)


def test_user_temporal_rule(tmp_path):
    wh = build(tmp_path, HISTORIES, "user_temporal")
    got = parts(wh, "user_temporal")
    # user 1 (n = 26 -> 2 test, 2 valid): by (ts, item_id) the order ends 24, 5, 30, 40
    assert {k: v for k, v in got.items() if k[0] == 1} == {
        (1, 40): "test",
        (1, 30): "test",
        (1, 5): "valid",
        (1, 24): "valid",
    }
    assert {k: v for k, v in got.items() if k[0] != 1} == {
        (2, 7): "test",  # n = 1: the one rating is test
        (3, 8): "test",
        (3, 7): "valid",  # n = 2: nothing left for train
        (4, 9): "test",
        (4, 8): "valid",
    }  # n = 9: max(1, floor(0.9)) each
    assert counts(wh, "user_temporal") == (len(HISTORIES) - 9, 4, 5)


def test_user_temporal_fractions_and_zero_valid(tmp_path):
    wh = build(
        tmp_path, HISTORIES, "user_temporal", "user_temporal.test_frac=0.2", "user_temporal.valid_frac=0"
    )
    got = parts(wh, "user_temporal")
    assert {k for k in got if k[0] == 1} == {(1, 40), (1, 30), (1, 5), (1, 24), (1, 23)}  # floor(0.2 * 26)
    assert set(got.values()) == {"test"}


def test_user_random_rule_and_seed(tmp_path):
    ratings = HISTORIES + [(6, i, 3.0, day(i)) for i in range(1, 11)]
    wh = build(tmp_path, ratings, "user_random")
    got = parts(wh, "user_random")
    per_user = {}
    for (user, _), part in got.items():
        per_user.setdefault(user, {"valid": 0, "test": 0})[part] += 1
    # test floor(0.2 n), at least 1 when n >= 2; valid floor(0.1 n), leaving at least one train row
    assert per_user == {
        1: {"test": 5, "valid": 2},
        3: {"test": 1, "valid": 0},
        4: {"test": 1, "valid": 0},
        6: {"test": 2, "valid": 1},
    }
    # same seed -> same rows; another seed -> other rows (same sizes)
    build_snapshot(wh, as_of=AS_OF, protocols="user_random")
    assert parts(wh, "user_random") == got
    build_snapshot(wh, as_of=AS_OF, protocols="user_random", params=("seed=7",))
    other = parts(wh, "user_random")
    assert other != got and sorted(other.values()) == sorted(got.values())
    assert (
        json.loads(query(wh, "SELECT params FROM split_protocols WHERE snapshot_id = ?", [latest(wh)])[0][0])[
            "seed"
        ]
        == 7
    )


def test_random_holdout_fractions_and_determinism(tmp_path):
    wh = make_warehouse(tmp_path)
    load_ml_small(wh)
    build_snapshot(wh, protocols="random", params=("random.test_frac=0.2",))
    n_train, n_valid, n_test = counts(wh, "random")
    n = n_train + n_valid + n_test
    sd = math.sqrt(n * 0.1 * 0.9)  # binomial
    assert abs(n_valid - 0.1 * n) < 5 * sd and abs(n_test - 0.2 * n) < 5 * math.sqrt(n * 0.2 * 0.8)
    first = parts(wh, "random")
    build_snapshot(wh, protocols="random", params=("random.test_frac=0.2",))
    assert parts(wh, "random") == first
    build_snapshot(wh, protocols="random", params=("random.test_frac=0.2", "seed=1"))
    second = parts(wh, "random")
    overlap = len(first.keys() & second.keys()) / len(first)
    assert 0.2 < overlap < 0.4  # independent draws: about 30% of a 30% holdout


# ten interactions of three users on days 1..10, except that item 108 shares day 9 with item 109
TIMELINE = [(1 + i % 3, 100 + i, 4.0, day(9 if i == 8 else i)) for i in range(1, 11)]


def test_global_temporal_rule(tmp_path):
    wh = build(tmp_path, TIMELINE, "global_temporal")
    got = parts(wh, "global_temporal")
    # N = 10: test from the floor(0.2 N) = 2nd latest timestamp (day 9), which the tie extends to
    # three rows; valid: the floor(0.1 N) = 1 latest row before that (day 7)
    assert {i: p for (_, i), p in got.items()} == {107: "valid", 108: "test", 109: "test", 110: "test"}
    assert counts(wh, "global_temporal") == (6, 1, 3)
    params = json.loads(query(wh, "SELECT params FROM split_protocols")[0][0])
    assert (params["test_from"], params["valid_from"]) == (str(day(9)), str(day(7)))


def test_as_of_rule_default_and_explicit_cutoff(tmp_path):
    ratings = [(1 + i % 3, 100 + i, 4.0, day(i)) for i in range(1, 11)]
    wh = build(tmp_path, ratings, "as_of")
    # default: the latest tenth (1 row) is test, the tenth before it valid
    assert {i: p for (_, i), p in parts(wh, "as_of").items()} == {109: "valid", 110: "test"}
    build_snapshot(
        wh,
        as_of=AS_OF,
        protocols="as_of",
        params=(f"as_of.cutoff={day(8).isoformat()}", "as_of.valid_frac=0.2"),
    )
    assert {i: p for (_, i), p in parts(wh, "as_of").items()} == {
        106: "valid",
        107: "valid",
        108: "test",
        109: "test",
        110: "test",
    }
    params = json.loads(
        query(wh, "SELECT params FROM split_protocols WHERE snapshot_id = ?", [latest(wh)])[0][0]
    )
    assert (params["cutoff"], params["test_from"], params["valid_from"]) == (
        str(day(8)),
        str(day(8)),
        str(day(6)),
    )
    for bad in (day(0.5), day(1000)):
        with pytest.raises(BatchrecError, match="as_of.cutoff"):
            build_snapshot(wh, as_of=AS_OF, protocols="as_of", params=(f"as_of.cutoff={bad.isoformat()}",))


def _history(user, ratings):
    return [(user, i + 1, r, day(i)) for i, r in enumerate(ratings)]


LLNP = (
    _history(1, [2, 1, 5, 2, 4, 4, 1, 5, 4, 3, 4, 2])  # positives at 3, 5, 6, 8, 9, 11
    + _history(2, [4, 4, 4, 4, 4, 1])  # exactly five positives
    + _history(3, [5, 5, 5, 5, 1, 1])  # four positives
    + _history(4, [None] * 6)  # implicit: every interaction is positive
)


def test_leave_last_n_positive_rule(tmp_path):
    wh = build(tmp_path, LLNP, "leave_last_n_positive")
    got = parts(wh, "leave_last_n_positive")
    # user 1: 5th last positive is item 5 -> test from it on; 6th last (item 3) -> valid 3, 4
    assert {i: p for (u, i), p in got.items() if u == 1} == {
        3: "valid",
        4: "valid",
        **{i: "test" for i in range(5, 13)},
    }
    assert {i: p for (u, i), p in got.items() if u == 2} == {
        i: "test" for i in range(1, 7)
    }  # no 6th positive
    assert not any(u == 3 for u, _ in got)  # too few positives
    assert {i: p for (u, i), p in got.items() if u == 4} == {1: "valid", **{i: "test" for i in range(2, 7)}}
    wh2 = build(
        tmp_path / "n2",
        LLNP,
        "leave_last_n_positive",
        "leave_last_n_positive.n=2",
        "leave_last_n_positive.n_valid=0",
        "leave_last_n_positive.positive_threshold=5",
    )
    # positives now rating >= 5: user 1 has items 3 and 8 -> test from item 3 on
    got = parts(wh2, "leave_last_n_positive")
    assert {i for (u, i) in got if u == 1} == set(range(3, 13)) and set(got.values()) == {"test"}
    assert {i for (u, i) in got if u == 3} == {3, 4, 5, 6}
