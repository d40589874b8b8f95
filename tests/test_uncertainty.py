"""Bootstrap intervals over users and the paired test: the vectorised replicates against resamples
materialised one by one, determinism by seed, coverage of the true mean on simulated data, and the
paired p-value on identical, shifted and noisy runs."""

from __future__ import annotations

import numpy as np
import pytest

from batchrec.uncertainty import PerUser, count_blocks, interval, paired_p_value, replicates


def _population(seed: int = 0, n: int = 300) -> PerUser:
    """Per-user parts of a ranking-like metric (one value per user) and of an RMSE over 1-9 pairs
    per user, plus a segment holding a third of the users."""
    rng = np.random.default_rng(seed)
    value = rng.beta(0.5, 4.0, n)
    pairs = rng.integers(1, 10, n).astype(np.float64)
    sq = rng.gamma(2.0, 0.4, n) * pairs
    seg = (rng.random(n) < 1 / 3).astype(np.float64)
    return PerUser(
        np.arange(n) * 7,
        {"ndcg@10": (value, np.ones(n)), "rmse": (sq, pairs), "ndcg_users_1-19@10": (value * seg, seg)},
        {"rmse"},
    )


def test_replicates_equal_resampling_the_users_one_by_one():
    per = _population()
    reps = replicates(per, samples=50, seed=3)
    counts = np.concatenate(list(count_blocks(len(per.users), 50, 3)))
    assert counts.shape == (50, 300) and (counts.sum(1) == 300).all()
    value, _ = per.parts["ndcg@10"]
    sq, pairs = per.parts["rmse"]
    seg_value, seg = per.parts["ndcg_users_1-19@10"]
    for b in range(50):  # the resampled users as a list, each drawn user once per draw
        drawn = np.repeat(np.arange(300), counts[b].astype(int))
        assert reps["ndcg@10"][b] == pytest.approx(value[drawn].mean())
        assert reps["rmse"][b] == pytest.approx(np.sqrt(sq[drawn].sum() / pairs[drawn].sum()))
        in_seg = drawn[seg[drawn] > 0]
        assert reps["ndcg_users_1-19@10"][b] == pytest.approx(seg_value[in_seg].mean())


def test_same_seed_same_resamples_and_blocks_do_not_change_them(monkeypatch):
    per = _population()
    a, b, c = (replicates(per, 200, seed) for seed in (0, 0, 1))
    assert all(np.array_equal(a[m], b[m]) for m in a) and not np.array_equal(a["rmse"], c["rmse"])
    import batchrec.uncertainty as uncertainty

    monkeypatch.setattr(uncertainty, "_BLOCK_CELLS", 1000)  # 3 resamples per block instead of all at once
    small_blocks = replicates(per, 200, 0)
    assert all(np.allclose(a[m], small_blocks[m]) for m in a)


def test_interval_covers_the_true_mean_about_95_percent_of_the_time():
    rng = np.random.default_rng(11)
    covered, trials = 0, 400
    for trial in range(trials):
        values = rng.exponential(0.1, 150)  # skewed, like per-user NDCG; true mean 0.1
        reps = replicates(PerUser(np.arange(150), {"m": (values, np.ones(150))}), 400, trial)["m"]
        lo, hi = interval(reps)
        assert lo <= values.mean() <= hi
        covered += lo <= 0.1 <= hi
    assert 0.92 <= covered / trials <= 0.97, (
        covered
    )  # percentile intervals of a skewed mean: a little under 95%


def test_interval_narrows_with_more_users():
    widths = []
    for n in (100, 1600):
        values = np.random.default_rng(n).beta(0.5, 4.0, n)
        lo, hi = interval(replicates(PerUser(np.arange(n), {"m": (values, np.ones(n))}), 500, 0)["m"])
        widths.append(hi - lo)
    assert widths[1] < widths[0] / 3  # ~ 1 / sqrt(n): a quarter


def test_paired_p_value():
    n = 400
    rng = np.random.default_rng(1)
    base = rng.beta(0.5, 4.0, n)
    ones = np.ones(n)

    def reps(values):
        return replicates(PerUser(np.arange(n), {"m": (values, ones)}), 1000, 0)["m"]

    assert paired_p_value(reps(base), reps(base)) == 1.0
    # better on every user by a little: the paired test sees it although the intervals overlap
    shifted = base + 0.01
    lo, hi = interval(reps(base))
    assert lo < shifted.mean() < hi
    assert paired_p_value(reps(base), reps(shifted)) < 0.01
    # the same users with noise that averages out: no difference
    noisy = base + rng.normal(0, 0.05, n) - 0.0
    noisy += base.mean() - noisy.mean()
    assert paired_p_value(reps(noisy), reps(base)) > 0.5
    assert np.isnan(paired_p_value(np.full(5, np.nan), np.zeros(5)))


def test_no_users_or_no_resamples_give_nothing():
    assert replicates(PerUser(np.arange(0), {"m": (np.zeros(0), np.zeros(0))})) == {}
    assert replicates(_population(), samples=0) == {}
    assert all(np.isnan(interval(np.full(10, np.nan))))
