"""How sure a measured number is: bootstrap intervals over users and a paired test between runs.

Every average a measurement reports is a ratio of per-user sums: a ranking metric is
sum(value_u) / n_users, an RMSE is sqrt(sum(squared error_u) / sum(pairs_u)), a segment's metric
the same over the users (or pairs) of that segment. `PerUser` keeps those per-user numerators and
denominators; resampling users with replacement is then one product of a (B x n_users) matrix of
draw counts with them: replicate b of a metric is (C[b] @ num) / (C[b] @ den) (its square root
for RMSE), with no loop over users.

The count matrix depends only on the seed and the number of users, so every run measured on the
same users draws the same resamples: the difference of two runs' replicates is the paired
bootstrap of their difference, which `paired_p_value` turns into a two-sided p-value.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
import torch

from batchrec.options import EVALUATE_BOOTSTRAP, EVALUATE_SEED

BOOTSTRAP_SAMPLES = EVALUATE_BOOTSTRAP.default  # 1000: the 2.5% / 97.5% quantiles rest on 25 resamples each
BOOTSTRAP_SEED = EVALUATE_SEED.default
CONFIDENCE = 0.95
SIGNIFICANCE = 0.05  # a run differs from the best when the paired test's p-value is below this
# at most this many draw counts are held at once (float64: 32 MB), whatever the number of users
_BLOCK_CELLS = 1 << 22
# Products larger than this many multiply-adds go through torch: numpy's OpenBLAS threads spin and
# slow a large product tens of times on a busy machine, while torch's small-product overhead would
# dominate the many small ones (a few hundred users).
_TORCH_PRODUCT = 50_000_000


@dataclass
class PerUser:
    """Per-user parts of a measurement's averages over one population of users.

    `parts[name] = (num, den)`, both over `users`: the metric is sum(num) / sum(den), its square
    root for the names in `sqrt` (RMSE). A segment's metric has den = 0 outside the segment."""

    users: np.ndarray  # user_idx of the population (the resampling units)
    parts: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    sqrt: set[str] = field(default_factory=set)

    def value(self, name: str) -> float:
        num, den = self.parts[name]
        total = float(den.sum())
        ratio = float(num.sum()) / total if total else float("nan")
        return float(np.sqrt(ratio)) if name in self.sqrt else ratio


def count_blocks(n_users: int, samples: int, seed: int) -> Iterator[np.ndarray]:
    """The bootstrap's draw counts, B = `samples` rows of n_users counts (each row sums to n_users:
    one resample of the users with replacement), yielded in blocks of rows that fit _BLOCK_CELLS.
    The same (n_users, samples, seed) always gives the same counts: runs on the same users pair."""
    rows = max(1, _BLOCK_CELLS // max(n_users, 1))
    if samples <= rows:  # one block: drawn once for every run and group of this size
        yield _one_block(n_users, samples, seed)
        return
    rng = np.random.default_rng([seed, n_users])
    for start in range(0, samples, rows):
        yield _draw(rng, n_users, min(rows, samples - start))


def _draw(rng: np.random.Generator, n_users: int, rows: int) -> np.ndarray:
    """`rows` resamples: n_users uniform draws each, counted per user (one bincount for all rows)."""
    draws = rng.integers(0, n_users, size=(rows, n_users)) + (np.arange(rows) * n_users)[:, None]
    return np.bincount(draws.ravel(), minlength=rows * n_users).reshape(rows, n_users).astype(np.float64)


@lru_cache(maxsize=2)
def _one_block(n_users: int, samples: int, seed: int) -> np.ndarray:
    counts = _draw(np.random.default_rng([seed, n_users]), n_users, samples)
    return counts


def replicates(
    per_user: PerUser, samples: int = BOOTSTRAP_SAMPLES, seed: int = BOOTSTRAP_SEED
) -> dict[str, np.ndarray]:
    """Bootstrap replicates (B values) of every metric in `per_user.parts`; NaN where a resample has
    no user of the metric's segment."""
    names = list(per_user.parts)
    n = len(per_user.users)
    if not names or n == 0 or samples <= 0:
        return {}
    # numerators and denominators side by side: one product per block of resamples
    parts = np.stack([per_user.parts[m][0] for m in names] + [per_user.parts[m][1] for m in names], axis=1)
    parts = parts.astype(np.float64)
    big = parts.size * min(samples, max(1, _BLOCK_CELLS // n)) > _TORCH_PRODUCT
    out = []
    for counts in count_blocks(n, samples, seed):
        sums = (torch.from_numpy(counts) @ torch.from_numpy(parts)).numpy() if big else counts @ parts
        num, total = sums[:, : len(names)], sums[:, len(names) :]
        with np.errstate(invalid="ignore", divide="ignore"):
            out.append(np.where(total > 0, num / total, np.nan))
    reps = np.concatenate(out)
    roots = [j for j, m in enumerate(names) if m in per_user.sqrt]
    reps[:, roots] = np.sqrt(reps[:, roots])
    return {m: reps[:, j] for j, m in enumerate(names)}


def interval(reps: np.ndarray, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Percentile interval of the replicates (NaN resamples left out; NaNs when none is left)."""
    finite = reps[np.isfinite(reps)]
    if finite.size == 0:
        return float("nan"), float("nan")
    tail = (1.0 - confidence) / 2.0
    lo, hi = np.quantile(finite, [tail, 1.0 - tail])
    return float(lo), float(hi)


def paired_p_value(reps: np.ndarray, best_reps: np.ndarray) -> float:
    """Two-sided paired bootstrap p-value of "no difference" between two runs measured on the same
    users with the same resamples: twice the share of resamples whose difference has the other
    sign than (or equals) the typical one, (count + 1) / (B + 1) so it is never 0."""
    diff = reps - best_reps
    diff = diff[np.isfinite(diff)]
    if diff.size == 0:
        return float("nan")
    below, above = int((diff <= 0).sum()), int((diff >= 0).sum())
    return float(min(1.0, 2.0 * (min(below, above) + 1) / (diff.size + 1)))
