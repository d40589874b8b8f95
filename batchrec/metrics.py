"""Accuracy, ranking and beyond-accuracy metrics, vectorised over users.

Ranking metrics take the recommended lists as an int matrix [n_users, K] (item indices, -1 where
a user has fewer than K candidates) and the relevant items as a CSR matrix [n_users, n_items].
Only users with at least one relevant item count (the others are dropped, as in the protocols).
Ties in score are resolved by the scorer (`ranking.topn`); `canonical_order` then puts equal
scores inside a list in ascending item order, so metrics never depend on the order in which
the top-k kernel happens to return tied items.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np
import scipy.sparse as sp
import torch

from batchrec.options import RELEVANCE_THRESHOLD
from batchrec.ranking import topn

# Every metric name (without @k), in display order, and whether higher is better (None: a count
# or a descriptive figure that is not better or worse, e.g. the popularity of what is recommended).
METRICS: dict[str, bool | None] = {
    "rmse": False, "mae": False, "rmse_unknown": False,
    "precision": True, "recall": True, "ndcg": True, "hit_rate": True, "map": True, "mrr": True,
    "coverage": True, "novelty": True, "avg_popularity": None,
    "users": None, "events": None, "n_known": None, "n_unknown": None, "n": None,
}


# RMSE of the pairs whose item has a given number of training ratings: `rmse_items_<lo>-<hi>` or
# `rmse_items_<lo>+`, with `n_items_...` the pairs in that bucket (see `rmse_by_item_count`).
ITEM_COUNT_BUCKETS = (1, 5, 20, 100)


def base_metric_name(metric: str) -> str:
    """`rmse_items_5-19` -> `rmse`; `ndcg@10` -> `ndcg`."""
    return metric.split("@")[0].split("_items_")[0]


def higher_is_better(metric: str) -> bool | None:
    """Direction of `name` or `name@k`; None for counts and descriptive figures."""
    return METRICS.get(base_metric_name(metric))


def metric_sort_key(metric: str) -> tuple:
    """Display order: rating metrics, then by K the ranking and beyond-accuracy ones, then counts."""
    name, _, k = metric.partition("@")
    base, _, bucket = name.partition("_items_")
    order = list(METRICS)
    pos = order.index(base) if base in order else len(order)
    group = (0 if base in ("rmse", "mae", "rmse_unknown") else 2 if METRICS.get(base, 0) is None and not k
             else 1)
    lower_edge = int(bucket.split("-")[0].rstrip("+")) if bucket[:1].isdigit() else -1
    return (group, int(k) if k else 0, pos, lower_edge, name)


def rmse(pred: np.ndarray, true: np.ndarray) -> float:
    return float(np.sqrt(np.mean((np.asarray(pred, np.float64) - true) ** 2)))


def mae(pred: np.ndarray, true: np.ndarray) -> float:
    return float(np.mean(np.abs(np.asarray(pred, np.float64) - true)))


def rmse_by_item_count(pred: np.ndarray, true: np.ndarray, item_train_count: np.ndarray,
                       edges: tuple[int, ...] = (1, 5, 20, 100)) -> dict[str, dict[str, float]]:
    """RMSE of rating predictions bucketed by how many training ratings the pair's item has.

    `item_train_count[k]` is the training count of pair k's item. Buckets are [edges[j],
    edges[j+1]) labelled "lo-hi" (inclusive), the last "lo+", and "<edges[0]" for counts below the
    first edge (only present when such pairs exist). Returns {label: {"n", "rmse"}} in bucket order;
    an empty bucket has rmse NaN.
    """
    edges = np.asarray(edges, np.int64)
    bucket = np.searchsorted(edges, np.asarray(item_train_count), side="right")  # 0: below edges[0]
    sq = (np.asarray(pred, np.float64) - true) ** 2
    n = np.bincount(bucket, minlength=len(edges) + 1)
    total = np.bincount(bucket, weights=sq, minlength=len(edges) + 1)
    labels = [f"<{edges[0]}"] + [f"{lo}-{hi - 1}" for lo, hi in zip(edges[:-1], edges[1:])] + [f"{edges[-1]}+"]
    return {label: {"n": int(n[b]), "rmse": float(np.sqrt(total[b] / n[b])) if n[b] else float("nan")}
            for b, label in enumerate(labels) if b > 0 or n[0]}


def canonical_order(items: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Re-order each row by (score descending, item ascending); padding (-1, NaN) stays last."""
    key_score = np.where(np.isnan(scores), np.inf, -scores.astype(np.float64))
    key_item = np.where(items < 0, np.iinfo(np.int64).max, items)
    order = np.lexsort((key_item, key_score), axis=-1)
    return np.take_along_axis(items, order, axis=1)


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


def _first_hit_rank(hits: np.ndarray) -> np.ndarray:
    """1-based rank of the first True per row; inf where a row has none."""
    return np.where(hits.any(1), hits.argmax(1) + 1, np.inf)


def ranking_metrics(topk: np.ndarray, relevant: sp.csr_matrix, ks: list[int]) -> dict[str, float]:
    """Precision/Recall/NDCG/HitRate/MAP/MRR@k for each k, and MRR over the whole list.

    NDCG uses binary gain with the ideal DCG over min(k, #relevant). Recall divides by
    #relevant (not min(k, #relevant)); MAP@k divides by min(k, #relevant). Precision divides by
    k even when a user has fewer than k candidates (the empty slots recommend nothing relevant).
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
    first = _first_hit_rank(hits > 0)
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
        out[f"mrr@{k}"] = float(np.mean(np.where(first <= k, 1.0 / first, 0.0)))
    out["mrr"] = float(np.mean(1.0 / first))
    return out


def beyond_accuracy_metrics(topk: np.ndarray, item_count: np.ndarray, n_users: int, n_candidates: int,
                            ks: list[int]) -> dict[str, float]:
    """Catalogue coverage, popularity bias and novelty of the top-k lists, for each k.

    * coverage@k: distinct recommended items / `n_candidates` (the candidate catalogue);
    * avg_popularity@k: mean training count of the recommended items (higher = more biased
      towards popular items);
    * novelty@k: mean self-information -log2(p) of the recommended items, p = training count /
      `n_users` (the share of users who interacted with the item).
    Empty slots (-1) are ignored; a user with no list contributes nothing.
    """
    out: dict[str, float] = {}
    count = np.asarray(item_count, np.float64)
    for k in ks:
        lists = topk[:, :k]
        items = lists[lists >= 0]
        if items.size == 0:
            continue
        c = count[items]
        out[f"coverage@{k}"] = float(len(np.unique(items)) / max(n_candidates, 1))
        out[f"avg_popularity@{k}"] = float(c.mean())
        out[f"novelty@{k}"] = float(np.mean(-np.log2(np.maximum(c, 1.0) / max(n_users, 1))))
    return out


def eventwise_metrics(topk: np.ndarray, event_row: np.ndarray, event_item: np.ndarray, ks: list[int]
                      ) -> dict[str, float]:
    """One query per held-out positive event: the event's item is the single relevant item.

    `topk[event_row[e]]` is the ranked list of the user of event e (computed once per user; the
    user's other held-out items stay candidates). NDCG@k = 1/log2(rank+1) when the item is at
    rank <= k, else 0 (the ideal DCG of one relevant item is 1); Recall@k = HitRate@k = share of
    events whose item is in the top k; MRR@k likewise. All averaged over events.
    """
    out: dict[str, float] = {"events": float(len(event_item))}
    if len(event_item) == 0:
        return out
    rank = _first_hit_rank(topk[event_row] == np.asarray(event_item)[:, None])
    for k in ks:
        hit = rank <= k
        out[f"ndcg@{k}"] = float(np.mean(np.where(hit, 1.0 / np.log2(rank + 1), 0.0)))
        out[f"recall@{k}"] = float(np.mean(hit))
        out[f"mrr@{k}"] = float(np.mean(np.where(hit, 1.0 / rank, 0.0)))
    return out


@dataclass
class Measurement:
    """Everything one evaluation of one model produces: the metrics and, for the report, the
    residuals of the rating predictions (clipped prediction - true, over train-known pairs)."""

    metrics: dict[str, float]
    residuals: np.ndarray | None = None


def measure(model, data, ks=(10,), threshold: float = RELEVANCE_THRESHOLD, memory_budget: int = 1 << 30,
            eventwise: bool = False) -> Measurement:
    """Score `model` on `data.test` exactly as the protocols define it (see DESIGN.md):

    * rating models: RMSE/MAE (predictions clipped to the rating scale) over test pairs whose user
      and item appear in train; `rmse_unknown`/`n_unknown` for the others, scored by the model's
      fallback;
    * ranking: relevant = test rating >= threshold on items of the train catalogue; candidates =
      train catalogue minus the user's train and validation items; users with >= 1 relevant item;
      plus coverage, popularity bias and novelty of those users' lists;
    * `eventwise`: instead of one query per user, one query per relevant test event (see
      `eventwise_metrics`), same candidates.
    The input history of a user is their train part only (the model was fitted on it).
    """
    ks = sorted(set(int(k) for k in ks))
    train, test = data.train, data.test
    out: dict[str, float] = {}
    residuals = None
    item_count = np.bincount(train.item_idx, minlength=data.n_items)
    in_train_items = item_count > 0
    if model.task == "rating" and not test.implicit and data.rating_scale is not None:
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
        residuals = pred.astype(np.float64) - test.rating[known]
        if known.any():
            out |= {"rmse": rmse(pred, test.rating[known]), "mae": mae(pred, test.rating[known])}
            by_count = rmse_by_item_count(pred, test.rating[known], item_count[test.item_idx[known]],
                                          ITEM_COUNT_BUCKETS)
            for label, bucket in by_count.items():
                if bucket["n"]:
                    out |= {f"rmse_items_{label}": bucket["rmse"], f"n_items_{label}": float(bucket["n"])}
        out["n_known"] = float(known.sum())
        if (~known).any():
            out |= {"rmse_unknown": rmse(np.clip(fb.float().cpu().numpy(), lo, hi), test.rating[~known]),
                    "n_unknown": float((~known).sum())}
    rel_mask = (test.rating >= threshold) if not test.implicit else np.ones(len(test), bool)
    rel_mask &= in_train_items[test.item_idx]
    relevant = test.select(rel_mask).csr(data.n_users, data.n_items, "ones")
    users = np.flatnonzero(np.diff(relevant.indptr) > 0)
    if len(users) == 0:
        return Measurement(out | {"users": 0.0}, residuals)
    items, scores = topn(model, users, max(ks), exclude=data.seen_csr(include_valid=True), candidates=in_train_items,
                         memory_budget=memory_budget)
    items = canonical_order(items, scores)
    if eventwise:
        ev_user, ev_item = test.user_idx[rel_mask], test.item_idx[rel_mask]
        out |= eventwise_metrics(items, np.searchsorted(users, ev_user), ev_item, ks)
        out["users"] = float(len(users))
    else:
        out |= ranking_metrics(items, relevant[users], ks)
    n_train_users = int((np.bincount(train.user_idx, minlength=data.n_users) > 0).sum())
    out |= beyond_accuracy_metrics(items, item_count, n_train_users, int(in_train_items.sum()), ks)
    return Measurement(out, residuals)


def evaluate_model(model, data, ks=(10,), threshold: float = RELEVANCE_THRESHOLD, memory_budget: int = 1 << 30) -> dict[str, float]:
    """The like-for-like protocol measurement of `measure`, as a plain metrics dict."""
    return measure(model, data, ks, threshold, memory_budget).metrics


def validation_metrics(model, data, ks: Sequence[int] = (10,)) -> dict[str, float]:
    """The evaluation protocol applied to the valid part, with the train part as the user's history."""
    if data.valid is None or len(data.valid) == 0:
        return {}
    # valid=None: seen items (excluded from candidates) are the train part only.
    return evaluate_model(model, replace(data, valid=None, test=data.valid), ks=ks)
