"""The three sources of recommendations: the model (`serve_model`), a genre/tag profile for users
the model cannot serve (`serve_profile`), popularity when nothing is known (`serve_popular`);
`recommend` routes each user to one and builds the `recommendations` rows with their reasons."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

import numpy as np
import polars as pl
import scipy.sparse as sp
import torch

from batchrec.logs import progress as progress_bar
from batchrec.models.base import Recommender
from batchrec.ranking import blocked_topk, candidate_columns, items_of, model_scorer
from batchrec.scoring.explain import explain_anchors, explanation_similarity
from batchrec.scoring.inputs import ScoringInputs

log = logging.getLogger("batchrec.score")

CONTENT_WEIGHT = 0.7  # cold-start blend: profile similarity vs log popularity

# reason kinds (the `reason` text is built from these in one vectorised pass)
MODEL, BECAUSE, GENRE, TAG, POPULAR = range(5)


@dataclass
class Ranked:
    """Top-N of some rows: item idx (-1 pad), score, and the reason kind and its arguments."""

    rows: np.ndarray
    items: np.ndarray
    scores: np.ndarray
    kind: np.ndarray
    arg1: np.ndarray  # anchor item / first genre / tag term
    arg2: np.ndarray  # second genre


def serve_model(
    model: Recommender,
    inputs: ScoringInputs,
    rows: np.ndarray,
    n: int,
    memory_budget: int,
    explain: bool = True,
    progress: Callable[[int], object] | None = None,
) -> Ranked:
    """Model-served rows: blocked top-N over the model's items, seen items removed, and each row's
    anchor (the liked item most similar to the recommendation) from the same block. Candidates
    are the items the model was trained on, plus those it scores from content alone."""
    from_content = model.content_scored_items()
    cand, col_of = candidate_columns(
        inputs.candidates if from_content is None else inputs.candidates | from_content, model.n_items
    )
    how = explanation_similarity(model, inputs) if explain else None
    anchors = np.full((len(rows), n), -1, np.int64)

    def anchor(span: slice, block: np.ndarray, cols: np.ndarray) -> None:
        anchors[span, : cols.shape[1]] = explain_anchors(*how, items_of(cols, cand), inputs.liked, block)

    n_cols = model.n_items if cand is None else len(cand)
    score, rescore = model_scorer(model, cand)
    cols, scores = blocked_topk(
        score,
        rows,
        n,
        n_cols,
        exclude=(inputs.seen,),
        col_of=col_of,
        memory_budget=memory_budget,
        on_block=None if how is None else anchor,
        rescore=rescore,
        progress=progress,
    )
    if model.task == "rating" and inputs.rating_scale is not None:
        np.clip(scores, *inputs.rating_scale, out=scores)
    kind = np.where(anchors >= 0, BECAUSE, MODEL).astype(np.int8)
    return Ranked(rows, items_of(cols, cand), scores, kind, anchors, np.full_like(anchors, -1))


def _log_popularity(inputs: ScoringInputs) -> np.ndarray:
    return (np.log1p(inputs.n_ratings) / np.log1p(max(inputs.n_ratings.max(initial=0.0), 1.0))).astype(
        np.float32
    )


def _row_normalise(m: sp.csr_matrix) -> tuple[sp.csr_matrix, np.ndarray]:
    norms = np.sqrt(np.asarray(m.multiply(m).sum(1)).ravel())
    return sp.csr_matrix(sp.diags(1.0 / np.maximum(norms, 1e-12)) @ m, dtype=np.float32), norms


def serve_profile(
    inputs: ScoringInputs,
    rows: np.ndarray,
    n: int,
    memory_budget: int,
    device: torch.device,
    progress: Callable[[int], object] | None = None,
) -> Ranked:
    """Cold start with a profile: the cosine of the user's genre and TF-IDF profiles (sums over
    the items they rated or tagged) with each item's, blended with log popularity. The reason
    names the item's genres the user weighs most (up to two), else its best shared tag term."""
    cand, col_of = candidate_columns(inputs.candidates, len(inputs.item_ids))
    cand = np.arange(len(inputs.item_ids)) if cand is None else cand
    acts = inputs.profile[rows].astype(np.float32)
    genres, _ = _row_normalise(inputs.genres)
    genre_profile, _ = _row_normalise(acts @ genres)
    tag_profile, tag_norms = _row_normalise(acts @ inputs.tags)
    has_tags = torch.from_numpy(tag_norms > 0).to(device)
    item_genres = sp.csr_matrix(genres[cand].T)  # sparse products: every score's rounding is its own row's
    item_terms = sp.csr_matrix(inputs.tags[cand].T)
    pop = torch.from_numpy(_log_popularity(inputs)[cand]).to(device)
    position = np.empty(len(inputs.user_ids), np.int64)
    position[rows] = np.arange(len(rows))

    def score(block: np.ndarray) -> torch.Tensor:
        p = position[block]
        by_genre = torch.from_numpy((genre_profile[p] @ item_genres).toarray()).to(device)
        by_tag = torch.from_numpy((tag_profile[p] @ item_terms).toarray()).to(device)
        content = torch.where(
            has_tags[torch.from_numpy(p).to(device)][:, None], (by_genre + by_tag) / 2, by_genre
        )
        return CONTENT_WEIGHT * content + (1 - CONTENT_WEIGHT) * pop

    cols, scores = blocked_topk(
        score,
        rows,
        n,
        len(cand),
        exclude=(inputs.seen, inputs.profile),
        col_of=col_of,
        memory_budget=memory_budget,
        progress=progress,
    )
    items = items_of(cols, cand)
    flat = np.maximum(items, 0).ravel()
    # genres: the item's genres weighted by the user's profile; the top two with weight > 0
    weight = inputs.genres[flat].toarray().reshape(*items.shape, -1) * genre_profile.toarray()[:, None, :]
    weight = np.concatenate([weight, np.zeros((*items.shape, 2), weight.dtype)], axis=2)  # at least 2 columns
    top = np.argsort(-weight, axis=2, kind="stable")[..., :2]
    top = np.where(np.take_along_axis(weight, top, 2) > 0, top, -1)
    # tag term: argmax of the item's TF-IDF times the user's tag profile
    term = np.full(items.shape, -1)
    if inputs.tags.shape[1]:
        shared = inputs.tags[flat].multiply(tag_profile[np.repeat(np.arange(len(rows)), n)]).tocsr()
        best = np.asarray(shared.argmax(axis=1)).ravel()
        term = np.where(np.asarray(shared.max(axis=1).todense()).ravel() > 0, best, -1).reshape(items.shape)
    kind = np.select([top[..., 0] >= 0, term >= 0], [GENRE, TAG], POPULAR).astype(np.int8)
    arg1 = np.select([kind == GENRE, kind == TAG], [top[..., 0], term], -1)
    return Ranked(rows, items, scores, kind, arg1, np.where(kind == GENRE, top[..., 1], -1))


def serve_popular(
    inputs: ScoringInputs,
    rows: np.ndarray,
    n: int,
    memory_budget: int,
    device: torch.device,
    progress: Callable[[int], object] | None = None,
) -> Ranked:
    """Nothing known about the user: the model's items by popularity (snapshot pop_rank), unseen."""
    cand, col_of = candidate_columns(inputs.candidates, len(inputs.item_ids))
    cand = np.arange(len(inputs.item_ids)) if cand is None else cand
    order = torch.from_numpy(-inputs.pop_rank[cand].astype(np.float32)).to(device)  # distinct: no ties
    cols, _ = blocked_topk(
        lambda block: order.expand(len(block), -1).clone(),
        rows,
        n,
        len(cand),
        exclude=(inputs.seen, inputs.profile),
        col_of=col_of,
        memory_budget=memory_budget,
        progress=progress,
    )
    items = items_of(cols, cand)
    scores = np.where(items >= 0, inputs.n_ratings[np.maximum(items, 0)], np.nan).astype(np.float32)
    none = np.full(items.shape, -1)
    return Ranked(rows, items, scores, np.full(items.shape, POPULAR, np.int8), none, none)


def recommend(
    model: Recommender,
    inputs: ScoringInputs,
    rows: np.ndarray,
    n: int,
    memory_budget: int,
    run_id: str,
    scored_at: datetime,
    explain: bool = True,
) -> tuple[pl.DataFrame, dict[str, int]]:
    """Top-`n` rows of `recommendations` for the given input rows, and users per source."""
    rows = np.asarray(rows, np.int64)
    served = inputs.served[rows]
    has_profile = np.diff(inputs.profile.indptr)[rows] > 0
    parts = []
    t0 = time.perf_counter()
    with progress_bar(len(rows), "scoring", unit="users") as bar:
        if served.any():
            parts.append(
                serve_model(model, inputs, rows[served], n, memory_budget, explain, progress=bar.update)
            )
        if (~served & has_profile).any():
            parts.append(
                serve_profile(
                    inputs, rows[~served & has_profile], n, memory_budget, model.device, progress=bar.update
                )
            )
        if (~served & ~has_profile).any():
            parts.append(
                serve_popular(
                    inputs, rows[~served & ~has_profile], n, memory_budget, model.device, progress=bar.update
                )
            )
    counts = {
        "model": int(served.sum()),
        "profile": int((~served & has_profile).sum()),
        "popular": int((~served & ~has_profile).sum()),
    }
    log.info(
        "scored %d users (%s) in %.2f s",
        len(rows),
        ", ".join(f"{k} {v}" for k, v in counts.items()),
        time.perf_counter() - t0,
    )
    return _frame(parts, inputs, n, run_id, scored_at), counts


def _frame(
    parts: list[Ranked], inputs: ScoringInputs, n: int, run_id: str, scored_at: datetime
) -> pl.DataFrame:
    """Long format with raw ids and reason texts, built column-wise; padding dropped."""
    fields = ("items", "scores", "kind", "arg1", "arg2")
    cat = {f: np.concatenate([getattr(p, f) for p in parts]) if parts else np.zeros((0, n)) for f in fields}
    cat["rows"] = np.concatenate([p.rows for p in parts]) if parts else np.zeros(0, np.int64)
    items = cat["items"].ravel()
    keep = items >= 0
    rows = np.repeat(cat["rows"], n)[keep]
    items = items[keep]
    a1, a2 = cat["arg1"].ravel()[keep], cat["arg2"].ravel()[keep]
    kind = cat["kind"].ravel()[keep]
    genres = pl.Series(inputs.genre_names + [""], dtype=pl.Utf8)
    terms = pl.Series(inputs.tag_terms + [""], dtype=pl.Utf8)
    df = pl.DataFrame(
        {
            "user_id": inputs.user_ids[rows],
            "rank": np.tile(np.arange(1, n + 1, dtype=np.int32), len(cat["rows"]))[keep],
            "item_id": inputs.item_ids[items],
            "score": cat["scores"].ravel()[keep].astype(np.float32),
            "kind": kind,
            "title": inputs.titles.gather(np.where(kind == BECAUSE, a1, 0)),
            "g1": genres.gather(np.where((kind == GENRE) & (a1 >= 0), a1, len(genres) - 1)),
            "g2": genres.gather(np.where((kind == GENRE) & (a2 >= 0), a2, len(genres) - 1)),
            "term": terms.gather(np.where((kind == TAG) & (a1 >= 0), a1, len(terms) - 1)),
        }
    )
    reason = (
        pl.when(pl.col("kind") == BECAUSE)
        .then(pl.lit("because you rated ") + pl.col("title"))
        .when(pl.col("kind") == GENRE)
        .then(
            pl.lit("genre-match: ")
            + pl.col("g1")
            + pl.when(pl.col("g2") != "").then(", " + pl.col("g2")).otherwise(pl.lit(""))
        )
        .when(pl.col("kind") == TAG)
        .then(pl.lit("tag-match: ") + pl.col("term"))
        .when(pl.col("kind") == POPULAR)
        .then(pl.lit("popular"))
        .otherwise(pl.lit(f"model:{inputs.family}"))
    )
    return df.select(
        "user_id",
        "rank",
        "item_id",
        "score",
        pl.lit(run_id, pl.Utf8).alias("run_id"),
        pl.lit(scored_at, pl.Datetime("us")).alias("scored_at"),
        reason.alias("reason"),
    ).sort("user_id", "rank")  # one sorted run per source: cheap
