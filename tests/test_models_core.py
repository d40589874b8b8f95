"""The core families (popularity, mf, svd, bpr) on real ml-latest-small data: the interface
contract, determinism, parameter checking, family-specific behaviour, and (slow) the issue's
quality targets under the like-for-like protocol."""

from __future__ import annotations

import importlib
from pathlib import Path

import numpy as np
import pytest
import torch
from model_contract import ModelContract, implicit_copy
from reference import known_test_pairs, popularity_scores, protocol_ndcg

from batchrec.errors import BatchrecError
from batchrec.metrics import evaluate_model
from batchrec.models import REGISTRY
from batchrec.models.mf import RANKING_PARAMS
from batchrec.models.sampling import NegativeSampler
from batchrec.train import fit_model
from batchrec.training import Trainer

FAMILIES = ("popularity", "mf", "svd", "bpr")
# Small settings so the interface tests stay fast; the quality tests use the defaults.
FAST = {
    "popularity": {},
    "mf": {"factors": 8, "epochs": 2, "batch_size": 4096},
    "svd": {"factors": 8},
    "bpr": {"factors": 8, "epochs": 2, "batch_size": 4096},
}


class TestPopularity(ModelContract):
    family, quick, seeded, factor_vectors = "popularity", FAST["popularity"], False, True
    bad_params = [("variant=median", "must be one of"), ("prior_weight=-1", "out of range")]


class TestMF(ModelContract):
    family, quick, factor_vectors = "mf", FAST["mf"], True
    bad_params = [
        ("factors=abc", "not a valid int"),
        ("factors=0", "out of range"),
        ("lr=-1", "out of range"),
        ("biased=maybe", "not a valid bool"),
        ("optimizer=rmsprop", "must be one of"),
    ]


class TestSVD(ModelContract):
    family, quick, seeded, factor_vectors = "svd", FAST["svd"], False, True
    bad_params = [("centering=median", "must be one of"), ("factors=2.5", "not a valid int")]


class TestBPR(ModelContract):
    family, quick, factor_vectors = "bpr", FAST["bpr"], True
    bad_params = [("negatives=0", "out of range"), ("neg_alpha=x", "not a valid float")]


def test_every_registered_family_has_a_contract_class():
    """Each family in the models registry is tested by a `ModelContract` subclass of a test module."""
    for module in sorted(Path(__file__).parent.glob("test_models_*.py")):
        importlib.import_module(module.stem)
    covered, pending = set(), list(ModelContract.__subclasses__())
    while pending:
        cls = pending.pop()
        if "family" in vars(cls):  # intermediate bases (e.g. the neural one) name no family
            covered.add(cls.family)
        pending.extend(cls.__subclasses__())
    assert covered == set(REGISTRY)


@pytest.fixture(scope="module")
def fitted(fit_once):
    return lambda name: fit_once(name, FAST[name])[0]


def test_popularity_variants(ml_small):
    tr = ml_small.train
    counts = np.bincount(tr.item_idx, minlength=ml_small.n_items)
    count_model = fit_model("popularity", ml_small)[0]
    top = count_model.score(torch.tensor([0]))[0]
    assert int(top.argmax()) == int(counts.argmax())
    np.testing.assert_array_equal(top.numpy(), counts.astype(np.float32))
    # Bayesian average without pseudo-ratings is the item's mean rating (plus a tiny tie-break).
    raw = fit_model("popularity", ml_small, {"variant": "bayes", "prior_weight": 0.0})[0].score(
        torch.tensor([0])
    )[0]
    means = np.bincount(tr.item_idx, weights=tr.rating, minlength=ml_small.n_items) / np.maximum(counts, 1)
    np.testing.assert_allclose(raw.numpy()[counts > 0], means[counts > 0], atol=2e-3)
    # Many pseudo-ratings pull every item towards the global mean.
    damped = fit_model("popularity", ml_small, {"variant": "bayes", "prior_weight": 1e6})[0].score(
        torch.tensor([0])
    )[0]
    np.testing.assert_allclose(damped.numpy(), tr.rating.mean(), atol=2e-3)


def test_popularity_bayes_needs_ratings(ml_small):
    implicit = implicit_copy(ml_small)
    with pytest.raises(BatchrecError, match="variant=count"):
        fit_model("popularity", implicit, {"variant": "bayes"})


def _held_out_auc(model, data) -> float:
    """Over (a user's test item, a random item that user never rated) pairs, the share the model
    scores in that order (ties count half): 0.5 is chance."""
    keys = np.concatenate(
        [p.user_idx * data.n_items + p.item_idx for p in (data.train, data.valid, data.test)]
    )
    test = data.test
    other = np.random.default_rng(0).integers(0, data.n_items, len(test))
    fresh = ~np.isin(test.user_idx * data.n_items + other, keys)
    users = torch.from_numpy(test.user_idx[fresh])
    with torch.no_grad():
        held = model.score(users, torch.from_numpy(test.item_idx[fresh])).numpy()
        rand = model.score(users, torch.from_numpy(other[fresh])).numpy()
    return float(np.mean(held > rand) + 0.5 * np.mean(held == rand))


@pytest.mark.parametrize("name", ["popularity", "bpr"])
def test_ranking_families_score_a_users_held_out_items_above_random_ones(name, fitted, ml_small):
    assert _held_out_auc(fitted(name), ml_small) > 0.7


def test_bpr_learns_from_implicit_data(ml_small):
    model = fit_model("bpr", implicit_copy(ml_small), FAST["bpr"])[0]
    assert _held_out_auc(model, ml_small) > 0.7


@pytest.mark.parametrize("name", ["mf", "svd"])
def test_rating_families_predict_held_out_ratings_from_the_users_history(name, fitted, ml_small):
    """Better than the training mean on the test ratings, and a user who rates high in training is
    predicted high: per user, the mean prediction follows the mean training rating."""
    train, test, model = ml_small.train, ml_small.test, fitted(name)
    with torch.no_grad():
        pred = np.clip(
            model.score(torch.from_numpy(test.user_idx), torch.from_numpy(test.item_idx)).numpy(),
            *ml_small.rating_scale,
        )
    baseline = np.sqrt(np.mean((train.rating.mean() - test.rating) ** 2))
    assert np.sqrt(np.mean((pred - test.rating) ** 2)) < baseline - 0.03

    def per_user(values, users):
        return np.bincount(users, weights=values, minlength=ml_small.n_users) / np.maximum(
            np.bincount(users, minlength=ml_small.n_users), 1
        )

    tested = np.unique(test.user_idx)
    r = np.corrcoef(per_user(pred, test.user_idx)[tested], per_user(train.rating, train.user_idx)[tested])[
        0, 1
    ]
    assert r > 0.5


def test_mf_early_stopping_keeps_the_best_epoch(ml_small):
    model, trainer = fit_model(
        "mf", ml_small, {"factors": 8, "epochs": 40, "patience": 2, "lr": 0.05, "batch_size": 4096}
    )
    curve = [row["valid_rmse"] for row in trainer.history]
    assert len(curve) < 40  # it stopped early
    best = min(curve)
    assert curve.index(best) == len(curve) - 3  # stopped `patience` epochs after the best
    valid = ml_small.valid
    known = (np.bincount(ml_small.train.item_idx, minlength=ml_small.n_items) > 0)[valid.item_idx]
    pred = model.score(torch.from_numpy(valid.user_idx[known]), torch.from_numpy(valid.item_idx[known]))
    rmse = float(np.sqrt(np.mean((np.clip(pred.numpy(), 0.5, 5.0) - valid.rating[known]) ** 2)))
    assert rmse == pytest.approx(best, abs=1e-4)  # the restored model is the best epoch's


def test_funk_svd_has_no_biases(ml_small):
    model = fit_model("mf", ml_small, {"biased": False, "factors": 8, "epochs": 1, "batch_size": 4096})[0]
    assert model.user_vectors().shape[1] == 8 and model.item_vectors().shape[1] == 8
    assert float(model.module.mu) == 0.0 and not model.module.bu.weight.any()


@pytest.mark.parametrize("recency", [0.0, 20.0])
def test_svd_user_centring_is_the_damped_recency_weighted_user_mean(ml_small, recency):
    model = fit_model(
        "svd",
        ml_small,
        {"centering": "user", "factors": 4, "alpha": 0.0, "user_shrinkage": 5.0, "recency": recency},
    )[0]
    tr = ml_small.train
    mu = tr.rating.mean()
    # Weight of each rating: exp(-(number of the same user's later ratings) / recency).
    later = np.zeros(len(tr))
    if recency:
        order = np.lexsort((tr.item_idx, tr.ts, tr.user_idx))
        ranks = np.empty(len(tr))
        ranks[order] = np.arange(len(tr))
        last = np.zeros(ml_small.n_users)
        np.maximum.at(last, tr.user_idx, ranks)
        later = last[tr.user_idx] - ranks
    w = np.exp(-later / recency) if recency else np.ones(len(tr))
    expected = mu + (
        np.bincount(tr.user_idx, weights=w * (tr.rating - mu), minlength=ml_small.n_users)
        / (np.bincount(tr.user_idx, weights=w, minlength=ml_small.n_users) + 5.0)
    )
    got = model.score(torch.arange(ml_small.n_users))[:, 0]
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5)
    if recency:  # it matters: users drift
        plain = mu + np.bincount(tr.user_idx, weights=tr.rating - mu, minlength=ml_small.n_users) / (
            np.bincount(tr.user_idx, minlength=ml_small.n_users) + 5.0
        )
        assert np.abs(plain - expected).max() > 0.3


def test_svd_rank_must_fit_the_matrix(ml_small):
    with pytest.raises(BatchrecError, match="factors=610"):
        fit_model("svd", ml_small, {"factors": 610})


def test_negative_sampler_never_returns_a_seen_item(ml_small):
    tr = ml_small.train
    users, items = torch.from_numpy(tr.user_idx), torch.from_numpy(tr.item_idx)
    sampler = NegativeSampler(users, items, ml_small.n_items, None, Trainer(seed=0).generator())
    neg, ok = sampler.sample(users)
    assert ok.float().mean() > 0.999
    seen_keys = tr.user_idx * ml_small.n_items + tr.item_idx
    drawn = tr.user_idx[ok.numpy()] * ml_small.n_items + neg[ok].numpy()
    assert not np.isin(drawn, seen_keys).any()
    # Uniform draws without rejection hit a seen item about 1% of the time: the test would notice.
    raw = torch.randint(0, ml_small.n_items, (len(users),), generator=Trainer(seed=0).generator())
    assert np.isin(tr.user_idx * ml_small.n_items + raw.numpy(), seen_keys).mean() > 0.005
    # Popularity-weighted draws favour popular items.
    weights = torch.bincount(items, minlength=ml_small.n_items).double()
    pop_neg, _ = NegativeSampler(users, items, ml_small.n_items, weights, Trainer(seed=0).generator()).sample(
        users
    )
    counts = weights.numpy()
    assert counts[pop_neg.numpy()].mean() > 5 * counts[neg.numpy()].mean()


# -- quality targets (issue 5), like for like: fit on train, early-stop on valid, measure on test ---
# The expected values are computed here from the split (tests/reference.py), not copied from output.
def test_popularity_ndcg_is_the_plain_most_popular_ranking(ml_small):
    """batchrec's popularity model, scorer and NDCG against most-popular and NDCG written in numpy
    from the protocol's definition (the issue's reference for most-popular here: 0.0464)."""
    expected = protocol_ndcg(popularity_scores(ml_small), ml_small)
    got = evaluate_model(fit_model("popularity", ml_small)[0], ml_small, ks=(10,))
    assert got["ndcg@10"] == pytest.approx(expected, abs=1e-9) and expected == pytest.approx(0.0464, abs=5e-4)


@pytest.mark.slow
def test_best_rating_model_reaches_rmse_target(default_metrics, ml_small):
    assert default_metrics("mf")["n_known"] == known_test_pairs(ml_small)
    assert min(default_metrics(n)["rmse"] for n in ("mf", "svd")) <= 0.870


MF_RANKING = pytest.mark.xfail(
    strict=True,
    reason=(
        "mf's defaults are tuned for RMSE; ranked by predicted rating it favours rare, highly rated items "
        "(mf as a ranker is mf.RANKING_PARAMS, tested below)"
    ),
)


@pytest.mark.slow
@pytest.mark.parametrize("name", (pytest.param("mf", marks=MF_RANKING), "svd", "bpr"))
def test_every_family_beats_popularity_on_ndcg(name, default_metrics):
    assert default_metrics(name)["ndcg@10"] > default_metrics("popularity")["ndcg@10"]


@pytest.mark.slow
def test_mf_as_a_ranker_beats_popularity_and_the_bpr_reference(ml_small, default_metrics):
    model, trainer = fit_model("mf", ml_small, RANKING_PARAMS)
    assert "valid_ndcg@10" in trainer.history[-1]  # it early-stopped on ranking, not on RMSE
    ndcg = evaluate_model(model, ml_small, ks=(10,))["ndcg@10"]
    assert ndcg > default_metrics("popularity")["ndcg@10"] and ndcg > 0.0519  # the issue's BPR reference
