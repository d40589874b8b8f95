"""sql/reads: what training and scoring read back from a snapshot, checked against the same facts
computed independently from the snapshot's own tables (numpy over the raw interaction rows)."""

from __future__ import annotations

import numpy as np
import pytest

from batchrec.data import load_interactions, rating_range, snapshot_ids, snapshot_read, train_counts
from batchrec.features import latest_snapshot_id


@pytest.fixture(scope="module")
def con(ml_small_warehouse):
    with ml_small_warehouse.connect(read_only=True) as c:
        yield c


@pytest.mark.parametrize("protocol", [None, "user_temporal", "random"])
def test_train_counts_are_the_rows_of_the_train_part(con, protocol):
    s = latest_snapshot_id(con)
    users, items = snapshot_ids(con, s)
    got_users, got_items = train_counts(con, s, protocol, len(users), len(items))
    train = load_interactions(con, s, protocol, "train")
    assert np.array_equal(got_users, np.bincount(train.user_idx, minlength=len(users)))
    assert np.array_equal(got_items, np.bincount(train.item_idx, minlength=len(items)))
    if protocol:  # the holdout really was taken out
        assert got_users.sum() < len(load_interactions(con, s))


def test_liked_items_are_those_rated_at_or_above_the_users_mean(con):
    s = latest_snapshot_id(con)
    every = load_interactions(con, s)
    got = snapshot_read(con, "seen_and_liked", s=s)
    # the snapshot's (user, time, item) order, every interaction once
    assert np.array_equal(got["user_idx"], every.user_idx) and np.array_equal(got["item_idx"], every.item_idx)
    n_users = int(every.user_idx.max()) + 1
    mean = np.bincount(every.user_idx, every.rating, n_users) / np.bincount(every.user_idx, minlength=n_users)
    expected = every.rating >= mean[every.user_idx] - 1e-6
    assert np.array_equal(got["liked"], expected)
    assert 0.3 < expected.mean() < 0.8  # a real split of each history, not all or nothing


def test_rating_range_and_ids(con):
    s = latest_snapshot_id(con)
    users, items = snapshot_ids(con, s)
    assert rating_range(con, s) == (0.5, 5.0)
    assert len(users) == 610 and len(items) == 9742
    assert (np.diff(users) > 0).all() and (np.diff(items) > 0).all()  # dense ids follow raw-id order
