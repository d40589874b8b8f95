"""Per-event weights the model families share: how much an interaction counts as a positive,
as a scoring-time query, and how fast a user's older events fade.

Two recency curves, named by what they do:
* `query_recency_factor`: floor + (1 - floor) * 0.5 ** (k / halflife), the weight of an event in
  a user's query or history (item-item models, history encoders);
* `later_ratings_decay`: exp(-k / tau), the weight with which a user's own parameters learn from
  an event (factor models, rating networks);
k = how many of the same user's events come after the event (`events_from_end`).
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from batchrec.data import events_from_end


def query_recency_factor(events, halflife: float, floor: float) -> np.ndarray | None:
    """floor + (1 - floor) * 0.5 ** (k / halflife), k = the user's events after this one (None if halflife 0)."""
    if halflife <= 0:
        return None
    return floor + (1.0 - floor) * 0.5 ** (events_from_end(events) / halflife)


def later_ratings_decay(events, tau: float) -> np.ndarray:
    """exp(-k / tau) for each event (float64), k = how many of the same user's events come after it;
    all 1 when tau is 0.

    Users drift: their latest ratings predict their next ones better than their first ones, and
    a per-user temporal split asks exactly for the next ones."""
    if tau <= 0:
        return np.ones(len(events))
    return np.exp(-events_from_end(events) / tau)


def positive_weights(events, min_rating: float, weighting: str, rating_offset: float = 0.0) -> np.ndarray:
    """Weight of each event as a positive (0 = not a positive).

    Implicit events (NaN rating) always weigh 1. Explicit ones below `min_rating` weigh 0; the
    others 1 (`binary`) or max(rating - rating_offset, 0.5) (`rating`)."""
    r = events.rating
    implicit = np.isnan(r)
    if weighting == "binary":
        w = np.ones(len(r), np.float32)
    else:
        w = np.maximum(np.nan_to_num(r, nan=1.0) - rating_offset, 0.5).astype(np.float32)
    w[implicit] = 1.0
    w[~implicit & (np.nan_to_num(r) < min_rating)] = 0.0
    return w


def query_weights(
    events,
    query_offset: float,
    dislike_weight: float,
    recency_halflife: float = 0.0,
    recency_floor: float = 0.1,
) -> np.ndarray:
    """Signed query weight of each event (float32): rating - query_offset, times `dislike_weight`
    where negative (a disliked item); implicit events (NaN rating) weigh 1; times the recency
    factor of `query_recency_factor` (halflife 0: none)."""
    w = np.nan_to_num(events.rating, nan=query_offset + 1.0).astype(np.float32) - np.float32(query_offset)
    w = np.where(w < 0, w * np.float32(dislike_weight), w)
    recency = query_recency_factor(events, recency_halflife, recency_floor)
    return w if recency is None else w * recency.astype(np.float32)


def history_weights(
    events,
    min_rating: float = 0.0,
    weighting: str = "binary",
    rating_offset: float = 2.0,
    recency_halflife: float = 0.0,
    recency_floor: float = 0.1,
) -> np.ndarray:
    """Weight of each event in a user's history (0: left out), float32.

    Explicit ratings below `min_rating` weigh 0; the others 1 (`binary`) or
    max(rating - rating_offset, 0.5) (`rating`: a 5 says more than a 3); implicit events weigh 1.
    Times `query_recency_factor`: the next items a user picks follow their latest taste
    (halflife 0: off)."""
    w = positive_weights(events, min_rating, weighting, rating_offset).astype(np.float64)
    recency = query_recency_factor(events, recency_halflife, recency_floor)
    return (w if recency is None else w * recency).astype(np.float32)


def positive_matrix(
    events,
    n_users: int,
    n_items: int,
    min_rating: float = 0.0,
    weighting: str = "binary",
    rating_offset: float = 0.0,
    extra: np.ndarray | None = None,
) -> sp.csr_matrix:
    """User x item CSR (float32) of positive weights, optionally times a per-event factor."""
    w = positive_weights(events, min_rating, weighting, rating_offset)
    if extra is not None:
        w = w * extra.astype(np.float32)
    keep = w > 0
    m = sp.csr_matrix(
        (w[keep], (events.user_idx[keep], events.item_idx[keep])), shape=(n_users, n_items), dtype=np.float32
    )
    m.sum_duplicates()
    return m
