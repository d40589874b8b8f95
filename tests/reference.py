"""Reference numbers computed here, from the definitions, with plain numpy: what the quality tests
hold batchrec's models and metrics against (instead of figures copied from batchrec's own output).

* `protocol_ndcg`: the like-for-like protocol's NDCG@k, written from its definition;
* `popularity_scores`: most-popular, the training count of each item;
* `plain_ease_scores`: EASE (Steck 2019) in closed form on the binary matrix of training
  positives, lambda chosen on the validation part;
* `known_test_pairs`: the test rows whose user and item both appear in the training part (the
  pairs a rating model's RMSE is measured on).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import scipy.sparse as sp

Scores = Callable[[np.ndarray], np.ndarray]  # users (dense ids) -> scores [len(users), n_items]


def protocol_ndcg(scores_of: Scores, data, part: str = "test", k: int = 10, threshold: float = 4.0) -> float:
    """NDCG@k of `scores_of` on `data`'s `part` with the training part as each user's history:

    relevant = rows of `part` rated >= `threshold` on an item with a training interaction;
    candidates = items with a training interaction, minus the user's training items (and, when
    measuring the test part, validation items); users with >= 1 relevant item count; binary gain,
    ideal DCG over min(k, #relevant); equal scores rank the lower item index first.
    """
    train, held = data.train, getattr(data, part)
    in_train = np.bincount(train.item_idx, minlength=data.n_items) > 0
    rel = (held.rating >= threshold) & in_train[held.item_idx]
    users = protocol_users(data, part, threshold)
    row = np.full(data.n_users, -1)
    row[users] = np.arange(len(users))
    relevant = np.zeros((len(users), data.n_items), bool)
    relevant[row[held.user_idx[rel]], held.item_idx[rel]] = True
    s = np.array(scores_of(users), dtype=np.float64)
    s[:, ~in_train] = -np.inf
    for seen in [train] + ([data.valid] if part == "test" and data.valid is not None else []):
        mine = row[seen.user_idx] >= 0
        s[row[seen.user_idx[mine]], seen.item_idx[mine]] = -np.inf
    top = np.argsort(-s, axis=1, kind="stable")[:, :k]
    gain = np.take_along_axis(relevant, top, 1) & np.isfinite(np.take_along_axis(s, top, 1))
    discount = 1.0 / np.log2(np.arange(2, k + 2))
    ideal = np.cumsum(discount)[np.minimum(relevant.sum(1), k) - 1]
    return float(np.mean(gain @ discount / ideal))


def protocol_users(data, part: str = "test", threshold: float = 4.0) -> np.ndarray:
    """The users the protocol ranks for: a row of `part` rated >= `threshold` on an item with a
    training interaction."""
    held = getattr(data, part)
    in_train = np.bincount(data.train.item_idx, minlength=data.n_items) > 0
    return np.unique(held.user_idx[(held.rating >= threshold) & in_train[held.item_idx]])


def popularity_scores(data) -> Scores:
    counts = np.bincount(data.train.item_idx, minlength=data.n_items).astype(np.float64)
    return lambda users: np.broadcast_to(counts, (len(users), data.n_items))


def ease_direct(X: np.ndarray, lam: float) -> np.ndarray:
    """B = I - P / diag(P) with P = (X'X + lam I)^-1 (B's diagonal is then 0): the formula as written."""
    P = np.linalg.inv(X.T @ X + lam * np.eye(X.shape[1]))
    return np.eye(X.shape[1]) - P / np.diag(P)[None, :]


def ease_scores_by_users(X: sp.csr_matrix, lam: float) -> np.ndarray:
    """X @ B of `ease_direct` through the users x users system, for far fewer users than items:
    by the push-through identity X P = (XX' + lam I)^-1 X, and diag(P) = (1 - colsum(X * XP)) / lam."""
    XP = (X.T @ np.linalg.inv((X @ X.T).toarray() + lam * np.eye(X.shape[0]))).T
    return X.toarray() - XP / ((1.0 - np.asarray(X.multiply(XP).sum(0)).ravel()) / lam)[None, :]


EASE_LAMBDAS = (50.0, 100.0, 200.0, 500.0)


def plain_ease_scores(data, threshold: float = 4.0) -> tuple[Scores, float]:
    """Plain EASE on the binary matrix of the training positives (rated >= `threshold`, the
    protocol's relevance), lambda the best of EASE_LAMBDAS by validation NDCG@10; returns (scores,
    lambda). On ml-latest-small / user_temporal it gives the issue's library figure (0.080)."""
    tr = data.train
    pos = tr.rating >= threshold
    X = sp.csr_matrix(
        (np.ones(int(pos.sum())), (tr.user_idx[pos], tr.item_idx[pos])), shape=(data.n_users, data.n_items)
    )
    X.data[:] = 1.0  # a pair rated twice is still one 1
    fits = {lam: ease_scores_by_users(X, lam) for lam in EASE_LAMBDAS}
    best = max(EASE_LAMBDAS, key=lambda lam: protocol_ndcg(lambda u: fits[lam][u], data, part="valid"))
    return (lambda users: fits[best][users]), best


def known_test_pairs(data) -> int:
    """Test rows whose user and item both have a training interaction."""
    train, test = data.train, data.test
    return int((np.isin(test.user_idx, train.user_idx) & np.isin(test.item_idx, train.item_idx)).sum())


def model_scores(model) -> Scores:
    """A batchrec model's full score rows, as a reference `Scores`."""
    import torch

    def scores(users: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return model.score(torch.from_numpy(users).to(model.device)).float().cpu().numpy()

    return scores
