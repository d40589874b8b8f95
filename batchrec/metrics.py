"""Accuracy, ranking and beyond-accuracy metrics, vectorised over users.

Ranking metrics take the recommended lists as an int matrix [n_users, K] (item indices, -1 where
a user has fewer than K candidates) and the relevant items as a CSR matrix [n_users, n_items].
Only users with at least one relevant item count (the others are dropped, as in the protocols).
Ties in score are resolved by the scorer (`ranking.topn`); `canonical_order` then puts equal
scores inside a list in ascending item order, so metrics never depend on the order in which
the top-k kernel happens to return tied items.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import scipy.sparse as sp
import torch

from batchrec.options import RELEVANCE_THRESHOLD
from batchrec.ranking import topn
from batchrec.uncertainty import PerUser

# Every metric name (without @k), in display order, and whether higher is better (None: a count
# or a descriptive figure that is not better or worse, e.g. the popularity of what is recommended).
METRICS: dict[str, bool | None] = {
    "rmse": False,
    "mae": False,
    "rmse_unknown": False,
    "precision": True,
    "recall": True,
    "ndcg": True,
    "hit_rate": True,
    "map": True,
    "mrr": True,
    "coverage": True,
    "novelty": True,
    "avg_popularity": None,
    "users": None,
    "events": None,
    "n_known": None,
    "n_unknown": None,
    "n": None,
}


# RMSE of the pairs whose item has a given number of training ratings: `rmse_items_<lo>-<hi>` or
# `rmse_items_<lo>+`, with `n_items_...` the pairs in that bucket (see `rmse_by_item_count`); the
# same buckets of the relevant items for `ndcg_items_<bucket>@k` (measure(segments=True)).
ITEM_COUNT_BUCKETS = (1, 5, 20, 100)
# User segments by number of training interactions: 1-19, 20-99, 100+, and "cold" (none).
USER_COUNT_SEGMENTS = (1, 20, 100)
# The ranking metrics measured per user segment (RMSE is too); NDCG also per item bucket.
SEGMENTED_METRICS = ("ndcg", "recall")
_SEGMENT = re.compile(r"_(users|items)_(cold|<?\d+(?:-\d+|\+)?)$")


def split_segment(metric: str) -> tuple[str, str, str]:
    """`ndcg_users_20-99@10` -> ("ndcg@10", "users", "20-99"); ("ndcg@10", "", "") without one."""
    name, at, k = metric.partition("@")
    found = _SEGMENT.search(name)
    if not found:
        return metric, "", ""
    return name[: found.start()] + at + k, found.group(1), found.group(2)


def base_metric_name(metric: str) -> str:
    """`rmse_items_5-19` -> `rmse`; `ndcg_users_cold@10` -> `ndcg`; `ndcg@10` -> `ndcg`."""
    return split_segment(metric)[0].split("@")[0]


def higher_is_better(metric: str) -> bool | None:
    """Direction of `name` or `name@k`; None for counts and descriptive figures."""
    return METRICS.get(base_metric_name(metric))


def segment_order(label: str) -> int:
    """Lower edge of a segment label, for sorting ("cold" first)."""
    return -1 if label in ("", "cold") else int(label.lstrip("<").split("-")[0].rstrip("+"))


def metric_sort_key(metric: str) -> tuple:
    """Display order: rating metrics, then by K the ranking and beyond-accuracy ones, then counts;
    segments of a metric after it, users' segments before items' buckets."""
    plain, tag, label = split_segment(metric)
    name, _, k = plain.partition("@")
    order = list(METRICS)
    pos = order.index(name) if name in order else len(order)
    group = (
        0 if name in ("rmse", "mae", "rmse_unknown") else 2 if METRICS.get(name, 0) is None and not k else 1
    )
    return (group, int(k) if k else 0, pos, ("", "users", "items").index(tag), segment_order(label), metric)


def rmse(pred: np.ndarray, true: np.ndarray) -> float:
    return float(np.sqrt(np.mean((np.asarray(pred, np.float64) - true) ** 2)))


def mae(pred: np.ndarray, true: np.ndarray) -> float:
    return float(np.mean(np.abs(np.asarray(pred, np.float64) - true)))


def rmse_by_item_count(
    pred: np.ndarray, true: np.ndarray, item_train_count: np.ndarray, edges: tuple[int, ...] = (1, 5, 20, 100)
) -> dict[str, dict[str, float]]:
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
    labels = (
        [f"<{edges[0]}"] + [f"{lo}-{hi - 1}" for lo, hi in zip(edges[:-1], edges[1:])] + [f"{edges[-1]}+"]
    )
    return {
        label: {"n": int(n[b]), "rmse": float(np.sqrt(total[b] / n[b])) if n[b] else float("nan")}
        for b, label in enumerate(labels)
        if b > 0 or n[0]
    }


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


def per_user_ranking(
    topk: np.ndarray, relevant: sp.csr_matrix, ks: list[int]
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The rows of users with at least one relevant item, and each ranking metric's value for each
    of them (precision/recall/ndcg/hit_rate/map/mrr@k and whole-list mrr): `ranking_metrics` is
    their mean, the bootstrap resamples them.

    NDCG uses binary gain with the ideal DCG over min(k, #relevant). Recall divides by
    #relevant (not min(k, #relevant)); MAP@k is the truncated AP that divides by
    min(k, #relevant) (not by #relevant, as trec_eval's AP does). Precision divides by k even when
    a user has fewer than k candidates (the empty slots recommend nothing relevant).
    """
    n_rel = np.diff(relevant.tocsr().indptr)
    rows = np.flatnonzero(n_rel > 0)
    out: dict[str, np.ndarray] = {}
    if not len(rows):
        return rows, out
    hits = hit_matrix(topk, relevant)[rows].astype(np.float64)
    n_rel = n_rel[rows].astype(np.float64)
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
        out[f"precision@{k}"] = n_hit / k
        out[f"recall@{k}"] = n_hit / n_rel
        out[f"ndcg@{k}"] = dcg / idcg
        out[f"hit_rate@{k}"] = (n_hit > 0).astype(np.float64)
        out[f"map@{k}"] = (prec_at * h).sum(1) / np.minimum(n_rel, k)
        out[f"mrr@{k}"] = np.where(first <= k, 1.0 / first, 0.0)
    out["mrr"] = 1.0 / first
    return rows, out


def ranking_metrics(topk: np.ndarray, relevant: sp.csr_matrix, ks: list[int]) -> dict[str, float]:
    """Precision/Recall/NDCG/HitRate/MAP/MRR@k for each k, and MRR over the whole list: the mean
    over users with a relevant item of `per_user_ranking` (which defines each metric)."""
    rows, values = per_user_ranking(topk, relevant, ks)
    return {"users": float(len(rows))} | {name: float(np.mean(v)) for name, v in values.items()}


def ndcg_by_item_bucket(
    topk: np.ndarray, relevant: sp.csr_matrix, item_bucket: np.ndarray, ks: list[int]
) -> dict[tuple[int, int], tuple[np.ndarray, np.ndarray]]:
    """NDCG@k counting as relevant only the relevant items of one popularity bucket: {(bucket, k):
    (ndcg per user, 1.0 where the user has a relevant item in the bucket else 0.0)}, over every row
    of `topk`. The list is the whole ranking; the ideal DCG is over min(k, #relevant in bucket)."""
    relevant = relevant.tocsr()
    hits = hit_matrix(topk, relevant)
    rank_bucket = np.where(topk >= 0, item_bucket[np.maximum(topk, 0)], -1)
    rel_rows = np.repeat(np.arange(relevant.shape[0]), np.diff(relevant.indptr))
    discount = 1.0 / np.log2(np.arange(2, topk.shape[1] + 2))
    ideal_cum = np.concatenate([[1.0], np.cumsum(discount)])  # [0]: placeholder for users without any
    out = {}
    for b in np.unique(item_bucket[relevant.indices]):
        n_rel = np.bincount(rel_rows[item_bucket[relevant.indices] == b], minlength=relevant.shape[0])
        h = (hits & (rank_bucket == b)).astype(np.float64)
        has = (n_rel > 0).astype(np.float64)
        for k in ks:
            kk = min(k, h.shape[1])
            idcg = ideal_cum[np.minimum(n_rel, kk)]
            out[(int(b), k)] = (np.where(has > 0, (h[:, :kk] @ discount[:kk]) / idcg, 0.0), has)
    return out


def beyond_accuracy_metrics(
    topk: np.ndarray, item_count: np.ndarray, n_users: int, n_candidates: int, ks: list[int]
) -> dict[str, float]:
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


def eventwise_values(
    topk: np.ndarray, event_row: np.ndarray, event_item: np.ndarray, ks: list[int]
) -> dict[str, np.ndarray]:
    """Per event, NDCG/Recall/MRR@k of `eventwise_metrics` (which averages them)."""
    rank = _first_hit_rank(topk[event_row] == np.asarray(event_item)[:, None])
    out = {}
    for k in ks:
        hit = rank <= k
        out[f"ndcg@{k}"] = np.where(hit, 1.0 / np.log2(rank + 1), 0.0)
        out[f"recall@{k}"] = hit.astype(np.float64)
        out[f"mrr@{k}"] = np.where(hit, 1.0 / rank, 0.0)
    return out


def eventwise_metrics(
    topk: np.ndarray, event_row: np.ndarray, event_item: np.ndarray, ks: list[int]
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
    return out | {
        name: float(np.mean(v)) for name, v in eventwise_values(topk, event_row, event_item, ks).items()
    }


@dataclass
class Measurement:
    """Everything one evaluation of one model produces: the metrics, for the report the residuals
    of the rating predictions (clipped prediction - true, over train-known pairs), and for the
    bootstrap the per-user parts of each average (one `PerUser` per population of users)."""

    metrics: dict[str, float]
    residuals: np.ndarray | None = None
    per_user: list[PerUser] = field(default_factory=list)


def bucket_labels(edges: tuple[int, ...], below: str | None = None) -> list[str]:
    """Labels of the buckets `np.searchsorted(edges, count, side="right")` gives: index 0 (counts
    below edges[0]) is `below` (default "<edges[0]"), then "lo-hi" (inclusive), the last "lo+"."""
    return (
        [below or f"<{edges[0]}"]
        + [f"{lo}-{hi - 1}" for lo, hi in zip(edges[:-1], edges[1:])]
        + [f"{edges[-1]}+"]
    )


def _segmented(name: str, tag: str, label: str) -> str:
    """`ndcg@10`, "users", "20-99" -> `ndcg_users_20-99@10`."""
    base, at, k = name.partition("@")
    return f"{base}_{tag}_{label}{at}{k}"


def _by_user(rows: np.ndarray, n: int, values: np.ndarray) -> np.ndarray:
    return np.bincount(rows, weights=values, minlength=n)


def _rating_parts(
    pair_user: np.ndarray,
    sq: np.ndarray,
    ab: np.ndarray,
    item_bucket: np.ndarray | None,
    user_segment: np.ndarray | None,
) -> PerUser:
    """Per-user sums of squared and absolute errors of rating pairs (and per item bucket / user
    segment), for the bootstrap of RMSE and MAE."""
    users, rows = np.unique(pair_user, return_inverse=True)
    n = len(users)
    ones = np.ones(len(rows))
    count = _by_user(rows, n, ones)
    per = PerUser(
        users, {"rmse": (_by_user(rows, n, sq), count), "mae": (_by_user(rows, n, ab), count)}, {"rmse"}
    )
    for tag, bucket, labels in (
        ("items", item_bucket, bucket_labels(ITEM_COUNT_BUCKETS)),
        ("users", user_segment, bucket_labels(USER_COUNT_SEGMENTS, "cold")),
    ):
        if bucket is None:
            continue
        for b in np.unique(bucket):
            inside = (bucket == b).astype(np.float64)
            name = f"rmse_{tag}_{labels[b]}"
            per.parts[name] = (_by_user(rows, n, sq * inside), _by_user(rows, n, inside))
            per.sqrt.add(name)
    return per


def measure(
    model,
    data,
    ks=(10,),
    threshold: float = RELEVANCE_THRESHOLD,
    memory_budget: int = 1 << 30,
    eventwise: bool = False,
    segments: bool = False,
) -> Measurement:
    """Score `model` on `data.test` exactly as the protocols define it (see DESIGN.md):

    * rating models: RMSE/MAE (predictions clipped to the rating scale) over test pairs whose user
      and item appear in train; `rmse_unknown`/`n_unknown` for the others, scored by the model's
      fallback; RMSE by the item's training count (`rmse_items_<bucket>`);
    * ranking: relevant = test rating >= threshold on items of the train catalogue; candidates =
      train catalogue minus the user's train and validation items; users with >= 1 relevant item;
      plus coverage, popularity bias and novelty of those users' lists;
    * `eventwise`: instead of one query per user, one query per relevant test event (see
      `eventwise_metrics`), same candidates;
    * `segments`: also by user segment, the user's number of training interactions
      (USER_COUNT_SEGMENTS, "cold" for none): `<metric>_users_<segment>[@k]` for the metrics of
      SEGMENTED_METRICS and RMSE (cold users' pairs are scored by the fallback), with the users
      (`users_users_<segment>`) or pairs (`n_users_<segment>`) counted; and NDCG@k by the
      relevant items' training count (`ndcg_items_<bucket>@k`, `users_items_<bucket>`).
    The input history of a user is their train part only (the model was fitted on it).
    """
    ks = sorted(set(int(k) for k in ks))
    train, test = data.train, data.test
    out: dict[str, float] = {}
    residuals = None
    per_user: list[PerUser] = []
    item_count = np.bincount(train.item_idx, minlength=data.n_items)
    user_count = np.bincount(train.user_idx, minlength=data.n_users)
    user_segment = np.searchsorted(np.asarray(USER_COUNT_SEGMENTS), user_count, side="right")
    in_train_items = item_count > 0
    if model.task == "rating" and not test.implicit and data.rating_scale is not None:
        known_users = user_count > 0
        known = known_users[test.user_idx] & in_train_items[test.item_idx]
        lo, hi = data.rating_scale
        with torch.no_grad():
            u = torch.from_numpy(test.user_idx).to(model.device)
            i = torch.from_numpy(test.item_idx).to(model.device)
            pred = model.score(u[known], i[known]).float().cpu().numpy()
            fb = model.score_fallback(
                torch.where(torch.from_numpy(known_users[test.user_idx]).to(model.device), u, -1)[~known],
                torch.where(torch.from_numpy(in_train_items[test.item_idx]).to(model.device), i, -1)[~known],
            )
        pred = np.clip(pred, lo, hi)
        residuals = pred.astype(np.float64) - test.rating[known]
        if known.any():
            item_bucket = np.searchsorted(
                np.asarray(ITEM_COUNT_BUCKETS), item_count[test.item_idx[known]], side="right"
            )
            parts = _rating_parts(
                test.user_idx[known],
                residuals**2,
                np.abs(residuals),
                item_bucket,
                user_segment[test.user_idx[known]] if segments else None,
            )
            per_user.append(parts)
            out |= {"rmse": rmse(pred, test.rating[known]), "mae": mae(pred, test.rating[known])}
            for name, (_, den) in parts.parts.items():
                if "_" in name:
                    count = "n_" + name.split("_", 1)[1]  # rmse_items_5-19 -> n_items_5-19 (pairs)
                    out |= {name: parts.value(name), count: float(den.sum())}
        out["n_known"] = float(known.sum())
        if (~known).any():
            err = np.clip(fb.float().cpu().numpy(), lo, hi).astype(np.float64) - test.rating[~known]
            pair_user = test.user_idx[~known]
            users, rows = np.unique(pair_user, return_inverse=True)
            ones = np.ones(len(rows))
            parts = PerUser(
                users,
                {"rmse_unknown": (_by_user(rows, len(users), err**2), _by_user(rows, len(users), ones))},
                {"rmse_unknown"},
            )
            cold = (~known_users[pair_user]).astype(np.float64)
            if segments and cold.any():
                parts.parts["rmse_users_cold"] = (
                    _by_user(rows, len(users), err**2 * cold),
                    _by_user(rows, len(users), cold),
                )
                parts.sqrt.add("rmse_users_cold")
                out |= {"rmse_users_cold": parts.value("rmse_users_cold"), "n_users_cold": float(cold.sum())}
            per_user.append(parts)
            out |= {"rmse_unknown": rmse(err, 0.0), "n_unknown": float((~known).sum())}
    rel_mask = (test.rating >= threshold) if not test.implicit else np.ones(len(test), bool)
    rel_mask &= in_train_items[test.item_idx]
    relevant = test.select(rel_mask).csr(data.n_users, data.n_items, "ones")
    users = np.flatnonzero(np.diff(relevant.indptr) > 0)
    if len(users) == 0:
        return Measurement(out | {"users": 0.0}, residuals, per_user)
    items, scores = topn(
        model,
        users,
        max(ks),
        exclude=data.seen_csr(include_valid=True),
        candidates=in_train_items,
        memory_budget=memory_budget,
    )
    items = canonical_order(items, scores)
    ones = np.ones(len(users))
    ranked = PerUser(users)
    if eventwise:
        ev_user, ev_item = test.user_idx[rel_mask], test.item_idx[rel_mask]
        ev_row = np.searchsorted(users, ev_user)
        out |= eventwise_metrics(items, ev_row, ev_item, ks)
        out["users"] = float(len(users))
        events = _by_user(ev_row, len(users), np.ones(len(ev_row)))
        for name, per_event in eventwise_values(items, ev_row, ev_item, ks).items():
            ranked.parts[name] = (_by_user(ev_row, len(users), per_event), events)
    else:
        _, values = per_user_ranking(items, relevant[users], ks)
        out |= {"users": float(len(users))} | {name: float(np.mean(v)) for name, v in values.items()}
        ranked.parts |= {name: (v, ones) for name, v in values.items() if name != "mrr"}
        if segments:
            seg_labels = bucket_labels(USER_COUNT_SEGMENTS, "cold")
            seg = user_segment[users]
            for b in np.unique(seg):
                inside = (seg == b).astype(np.float64)
                out[f"users_users_{seg_labels[b]}"] = float(inside.sum())
                for name, v in values.items():
                    if base_metric_name(name) in SEGMENTED_METRICS and "@" in name:
                        ranked.parts[_segmented(name, "users", seg_labels[b])] = (v * inside, inside)
            item_labels = bucket_labels(ITEM_COUNT_BUCKETS)
            item_bucket = np.searchsorted(np.asarray(ITEM_COUNT_BUCKETS), item_count, side="right")
            for (b, k), (v, has) in ndcg_by_item_bucket(items, relevant[users], item_bucket, ks).items():
                out[f"users_items_{item_labels[b]}"] = float(has.sum())
                ranked.parts[f"ndcg_items_{item_labels[b]}@{k}"] = (v, has)
    n_train_users = int((user_count > 0).sum())
    out |= beyond_accuracy_metrics(items, item_count, n_train_users, int(in_train_items.sum()), ks)
    for k in ks:  # means over the recommended items: per user, their sum and number
        lists = items[:, :k]
        listed = (lists >= 0).astype(np.float64)
        count = np.where(lists >= 0, item_count[np.maximum(lists, 0)], 0).astype(np.float64)
        info = -np.log2(np.maximum(count, 1.0) / max(n_train_users, 1)) * listed
        if listed.any():
            ranked.parts[f"avg_popularity@{k}"] = (count.sum(1), listed.sum(1))
            ranked.parts[f"novelty@{k}"] = (info.sum(1), listed.sum(1))
    for name in ranked.parts:
        if "_users_" in name or "_items_" in name:
            out[name] = ranked.value(name)
    per_user.append(ranked)
    return Measurement(out, residuals, per_user)


def evaluate_model(
    model, data, ks=(10,), threshold: float = RELEVANCE_THRESHOLD, memory_budget: int = 1 << 30
) -> dict[str, float]:
    """The like-for-like protocol measurement of `measure`, as a plain metrics dict."""
    return measure(model, data, ks, threshold, memory_budget).metrics


def validation_metrics(model, data, ks: Sequence[int] = (10,)) -> dict[str, float]:
    """The evaluation protocol applied to the valid part, with the train part as the user's history."""
    if data.valid is None or len(data.valid) == 0:
        return {}
    # valid=None: seen items (excluded from candidates) are the train part only.
    return evaluate_model(model, replace(data, valid=None, test=data.valid), ks=ks)
