"""Accuracy and ranking metrics, vectorised over users.

Ranking metrics take the recommended lists as an int matrix [n_users, K] (item indices, -1 where
a user has fewer than K candidates) and the relevant items as a CSR matrix [n_users, n_items].
Only users with at least one relevant item count (the others are dropped, as in the protocols).
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp


def rmse(pred: np.ndarray, true: np.ndarray) -> float:
    return float(np.sqrt(np.mean((np.asarray(pred, np.float64) - true) ** 2)))


def mae(pred: np.ndarray, true: np.ndarray) -> float:
    return float(np.mean(np.abs(np.asarray(pred, np.float64) - true)))


def hit_matrix(topk: np.ndarray, relevant: sp.csr_matrix) -> np.ndarray:
    """Boolean [n_users, K]: is the item at each rank relevant for that user?"""
    relevant = relevant.tocsr()
    relevant.sum_duplicates()
    n_items = relevant.shape[1]
    rows = np.repeat(np.arange(relevant.shape[0], dtype=np.int64), np.diff(relevant.indptr))
    rel_keys = rows * n_items + relevant.indices  # sorted: CSR rows in order, columns sorted
    keys = np.arange(topk.shape[0], dtype=np.int64)[:, None] * n_items + topk
    hits = np.isin(keys, rel_keys, assume_unique=False)
    return hits & (topk >= 0)


def ranking_metrics(topk: np.ndarray, relevant: sp.csr_matrix, ks: list[int]) -> dict[str, float]:
    """Precision/Recall/NDCG/HitRate/MAP@k for each k, and MRR over the whole list.

    NDCG uses binary gain with the ideal DCG over min(k, #relevant). Recall divides by
    #relevant (not min(k, #relevant)); MAP@k divides by min(k, #relevant).
    """
    n_rel = np.diff(relevant.tocsr().indptr)
    users = n_rel > 0
    hits = hit_matrix(topk, relevant)[users].astype(np.float64)
    n_rel = n_rel[users].astype(np.float64)
    out: dict[str, float] = {"users": float(users.sum())}
    if not users.any():
        return out
    discount = 1.0 / np.log2(np.arange(2, hits.shape[1] + 2))
    ideal_cum = np.cumsum(discount)
    for k in ks:
        h = hits[:, :k]
        kk = h.shape[1]
        n_hit = h.sum(1)
        dcg = h @ discount[:kk]
        idcg = ideal_cum[np.minimum(n_rel, kk).astype(int) - 1] if kk else np.ones_like(n_rel)
        prec_at = np.cumsum(h, 1) / np.arange(1, kk + 1)
        out[f"precision@{k}"] = float(np.mean(n_hit / k))
        out[f"recall@{k}"] = float(np.mean(n_hit / n_rel))
        out[f"ndcg@{k}"] = float(np.mean(dcg / idcg))
        out[f"hit_rate@{k}"] = float(np.mean(n_hit > 0))
        out[f"map@{k}"] = float(np.mean((prec_at * h).sum(1) / np.minimum(n_rel, k)))
    first = np.where(hits.any(1), hits.argmax(1) + 1, np.inf)
    out["mrr"] = float(np.mean(1.0 / first))
    return out


def evaluate_model(model, data, ks=(10,), threshold: float = 4.0, memory_budget: int = 1 << 30) -> dict[str, float]:
    """Score `model` on `data.test` exactly as the protocols define it (see DESIGN.md):

    * rating models: RMSE/MAE (predictions clipped to the rating scale) over test pairs whose user
      and item appear in train; `rmse_unknown`/`n_unknown` for the others, scored by the model's
      fallback;
    * ranking: relevant = test rating >= threshold on items of the train catalogue; candidates =
      train catalogue minus the user's train and validation items; users with >= 1 relevant item.
    The input history of a user is their train part only (the model was fitted on it).
    """
    import torch

    from batchrec.score import topn

    train, test = data.train, data.test
    out: dict[str, float] = {}
    in_train_items = np.bincount(train.item_idx, minlength=data.n_items) > 0
    if model.task == "rating" and not test.implicit:
        known_users = np.bincount(train.user_idx, minlength=data.n_users) > 0
        known = known_users[test.user_idx] & in_train_items[test.item_idx]
        lo, hi = data.rating_scale
        with torch.no_grad():
            u = torch.from_numpy(test.user_idx).to(model.device)
            i = torch.from_numpy(test.item_idx).to(model.device)
            pred = model.score(u[known], i[known]).float().cpu().numpy()
            fb = model.score_fallback(torch.where(torch.from_numpy(known_users[test.user_idx]).to(model.device), u, -1)[~known],
                                      torch.where(torch.from_numpy(in_train_items[test.item_idx]).to(model.device), i, -1)[~known])
        pred = np.clip(pred, lo, hi)
        out |= {"rmse": rmse(pred, test.rating[known]), "mae": mae(pred, test.rating[known]), "n_known": float(known.sum())}
        if (~known).any():
            out |= {"rmse_unknown": rmse(np.clip(fb.float().cpu().numpy(), lo, hi), test.rating[~known]),
                    "n_unknown": float((~known).sum())}
    rel_mask = (test.rating >= threshold) if not test.implicit else np.ones(len(test), bool)
    rel_mask &= in_train_items[test.item_idx]
    relevant = test.select(rel_mask).csr(data.n_users, data.n_items, "ones")
    users = np.flatnonzero(np.diff(relevant.indptr) > 0)
    items, _ = topn(model, users, max(ks), exclude=data.seen_csr(include_valid=True), candidates=in_train_items,
                    memory_budget=memory_budget)
    out |= ranking_metrics(items, relevant[users], list(ks))
    return out
