"""The "because you rated <title>" reasons: for each recommended item, the liked item of the
user closest to it, found in the same blocked pass as the top-N (see `explanation_similarity`)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import scipy.sparse as sp
import torch

from batchrec.models.base import Recommender
from batchrec.scoring.inputs import ScoringInputs

EXPLAIN_ENTRIES = 1 << 17  # padded (user, liked item) pairs per explanation batch
EXPLAIN_DIMS = 32  # item vectors for explanations are reduced to this many dimensions

Similarity = Callable[[np.ndarray, np.ndarray], np.ndarray]


def explain_anchors(
    similarity: Similarity, pad: int, recs: np.ndarray, liked: sp.csr_matrix, rows: np.ndarray
) -> np.ndarray:
    """For each recommended item recs[b, k] (-1: none), the item of liked[rows[b]] most similar to
    it by `similarity(recs [g, k], liked items [g, w]) -> [g, k, w]`; -1 when the user liked
    nothing. Short histories are padded with item `pad`, which `similarity` scores lowest.

    Each user's history is padded to the next power of two of its own length (so at most twice
    the work, and a user's similarities are computed the same way whoever shares the batch:
    shards agree exactly), and users of equal padded width are batched: per batch one gather of
    their liked items and one batched similarity against their recommendations.
    """
    anchors = np.full_like(recs, -1)
    starts = liked.indptr[rows]
    counts = liked.indptr[rows + 1] - starts
    widths = 1 << np.ceil(np.log2(np.maximum(counts, 1))).astype(np.int64)
    for width in np.unique(widths[counts > 0]):
        same = np.flatnonzero((widths == width) & (counts > 0))
        for group in np.array_split(same, -(-len(same) * width // EXPLAIN_ENTRIES)):
            offs = np.minimum(starts[group][:, None] + np.arange(width), len(liked.indices) - 1)
            items = np.where(np.arange(width) < counts[group][:, None], liked.indices[offs], pad)
            rec = recs[group]
            best = np.take_along_axis(items, similarity(np.maximum(rec, 0), items).argmax(2), 1)
            anchors[group] = np.where(rec >= 0, best, -1)
    return anchors


def _normalise(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=1, keepdim=True).clamp(min=1e-12)


def explanation_similarity(model: Recommender, inputs: ScoringInputs) -> tuple[Similarity, int] | None:
    """How "because you rated" measures how close a liked item is to a recommended one, and the
    padding item for `explain_anchors`:

    * a model exposing `item_item()` (an [n_items, n_items] tensor W where W[l, r] is how much
      having item l raises item r's score, as EASE's B or item-kNN's weights): the liked item
      contributing most to the recommendation, W[l, r];
    * factor models: the cosine of the item vectors, centred (constant columns such as folded-in
      biases vanish) and reduced to their top EXPLAIN_DIMS principal directions (exact at or below
      that width; gathering every liked item's vector is what explanations cost);
    * other models: the cosine of the items' genre + TF-IDF vectors (randomly projected when
      wide). None for one-dimensional item vectors (popularity): nothing item-specific to say.
    """
    item_item = getattr(model, "item_item", None)
    if callable(item_item):
        W, n = item_item(), model.n_items

        def weight(rec: np.ndarray, items: np.ndarray) -> np.ndarray:
            liked_t, rec_t = (torch.from_numpy(a).to(W.device) for a in (np.minimum(items, n - 1), rec))
            w = W[liked_t[:, None, :], rec_t[:, :, None]].float().cpu().numpy()
            return np.where(items[:, None, :] == n, -np.inf, w)

        return weight, n
    V = model.item_vectors()
    if V is not None:
        if V.shape[1] < 2:
            return None
        V = V.float() - V.float().mean(0)
        if (
            V.shape[1] > EXPLAIN_DIMS
        ):  # d x d eigenproblem, in float64 on the CPU (tiny; float32 LAPACK is slow)
            _, vecs = np.linalg.eigh((V.T @ V).double().cpu().numpy())  # ascending eigenvalues
            V = V @ torch.from_numpy(vecs[:, -EXPLAIN_DIMS:].astype(np.float32)).to(V.device)
    else:
        content = sp.hstack([inputs.genres, inputs.tags], format="csr", dtype=np.float32)
        if content.shape[1] == 0:
            return None
        if content.shape[1] > EXPLAIN_DIMS:  # Johnson-Lindenstrauss: cosines survive a random projection
            g = np.random.default_rng(0).standard_normal((content.shape[1], EXPLAIN_DIMS)).astype(np.float32)
            content = content @ g
        V = torch.from_numpy(np.asarray(content.todense() if sp.issparse(content) else content)).to(
            model.device
        )
    # Liked items are looked up with an extra 0 column and a padding row (0, ..., 0, -4);
    # recommendations with that column set to 1: a padding slot scores -4, below any cosine.
    # Small gathers and matmuls: numpy on the CPU (half torch's cost here), whatever the device.
    V = _normalise(V.float()).cpu().numpy()
    liked_space = np.zeros((len(V) + 1, V.shape[1] + 1), np.float32)
    liked_space[:-1, :-1] = V
    liked_space[-1, -1] = -4.0
    rec_space = liked_space.copy()
    rec_space[:, -1] = 1.0

    def cosine(rec: np.ndarray, items: np.ndarray) -> np.ndarray:  # one equal-shaped matmul per user
        return np.matmul(np.take(rec_space, rec, 0), np.take(liked_space, items, 0).transpose(0, 2, 1))

    return cosine, len(V)
