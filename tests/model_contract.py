"""The contract every model family keeps, written once (as lkpy's `ScorerTests` and implicit's
`RecommenderBaseTestMixin`): a family's test module subclasses `ModelContract` with a few
attributes and inherits these tests, fitted on the real ml-latest-small (`ml_small`) with the
family's quick settings. `test_models_core.py` checks that every registered family has one."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import numpy as np
import pytest
import torch

from batchrec.errors import BatchrecError
from batchrec.models import create_model, get_model_class, parse_params
from batchrec.models.base import Recommender
from batchrec.ranking import topn
from batchrec.train import fit_model


def some_users(data, n: int = 40) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(7).choice(data.n_users, n, replace=False))


def implicit_copy(data):
    """The same snapshot with every rating removed (implicit feedback)."""

    def strip(part):
        return (
            None if part is None else dataclasses.replace(part, rating=np.full(len(part), np.nan, np.float32))
        )

    return dataclasses.replace(
        data, train=strip(data.train), valid=strip(data.valid), test=strip(data.test), rating_scale=None
    )


class ModelContract:
    """Subclass as `TestXxx(ModelContract)` and set the attributes below."""

    family: ClassVar[str]
    # Small settings that keep the contract fast (the quality tests use the defaults).
    quick: ClassVar[dict] = {}
    # Named parameter sets run through the fit-dependent tests besides the default ("").
    variants: ClassVar[dict[str, dict]] = {"": {}}
    # Whether another seed gives other scores (not only other signs or rounding).
    seeded: ClassVar[bool] = True
    # Whether user_vectors() @ item_vectors().T reproduces the scores (factor families).
    factor_vectors: ClassVar[bool] = False
    # Whether fitting has a learning rate that could drive the scores non-finite.
    gradient_trained: ClassVar[bool] = False
    # (key=value, part of the one-line error it must raise)
    bad_params: ClassVar[list[tuple[str, str]]] = []
    pair_tolerance: ClassVar[float] = 1e-5

    def pytest_generate_tests(self, metafunc):
        if "variant" in metafunc.fixturenames:
            metafunc.parametrize("variant", list(self.variants), ids=[v or "default" for v in self.variants])
        if "bad" in metafunc.fixturenames:
            metafunc.parametrize("bad, expected", self.bad_params, ids=[b for b, _ in self.bad_params])

    def params(self, variant: str = "", **extra) -> dict:
        return {**self.quick, **self.variants[variant], **extra}

    @pytest.fixture
    def fitted(self, fit_once, variant):
        """The quick fit of this variant, shared across the session: (model, trainer)."""
        return fit_once(self.family, self.params(variant))

    # -- fit, save, load ---------------------------------------------------------------------------
    def test_save_load_gives_identical_scores(self, fitted, variant, ml_small, tmp_path):
        model = fitted[0]
        loaded = Recommender.load(model.save(tmp_path / self.family))
        users = some_users(ml_small)
        assert type(loaded) is type(model) and loaded.params == model.params
        assert torch.equal(loaded.score(users), model.score(users))
        items = torch.arange(len(users)) * 97
        assert torch.equal(loaded.score(users, items), model.score(users, items))
        if self.factor_vectors:
            assert torch.equal(loaded.user_vectors(), model.user_vectors())
            assert torch.equal(loaded.item_vectors(), model.item_vectors())

    def test_same_seed_same_scores(self, fitted, variant, ml_small):
        again = fit_model(self.family, ml_small, self.params(variant))[0]
        users = some_users(ml_small)
        assert torch.equal(again.score(users), fitted[0].score(users))

    def test_other_seed_other_scores(self, fit_once, ml_small):
        if not self.seeded:
            pytest.skip(f"{self.family}: the seed changes no score")
        other = fit_model(self.family, ml_small, self.params(seed=1))[0]
        users = some_users(ml_small)
        assert not torch.allclose(other.score(users), fit_once(self.family, self.params())[0].score(users))

    # -- scores --------------------------------------------------------------------------------------
    def test_score_shapes_pairs_and_vectors_agree(self, fitted, variant, ml_small):
        model = fitted[0]
        users = some_users(ml_small)
        full = model.score(users)
        assert full.shape == (len(users), ml_small.n_items) and full.dtype == torch.float32
        assert bool(torch.isfinite(full).all()) and float(full.std()) > 0
        # Half the pairs on items the user has (where item-item scores are non-zero), half at random.
        rng = np.random.default_rng(3)
        seen = ml_small.train_csr()[users.numpy()]
        seen_rows = np.repeat(np.arange(len(users)), np.diff(seen.indptr))
        pick = rng.integers(0, seen.nnz, 200)
        rows = torch.from_numpy(np.concatenate([seen_rows[pick], rng.integers(0, len(users), 200)]))
        cols = torch.from_numpy(
            np.concatenate([seen.indices[pick], rng.integers(0, ml_small.n_items, 200)]).astype(np.int64)
        )
        pairs = model.score(users[rows], cols)
        assert pairs.shape == (400,)
        tol = self.pair_tolerance
        torch.testing.assert_close(pairs, full[rows, cols], rtol=1e-4, atol=tol)
        U, V = model.user_vectors(), model.item_vectors()
        assert (U is None) == (V is None) == (not self.factor_vectors)
        if U is not None:  # factor families: the scorer's one matmul gives the same scores
            assert U.shape[0] == ml_small.n_users and V.shape[0] == ml_small.n_items
            torch.testing.assert_close(U[users] @ V.T, full, rtol=1e-4, atol=1e-4)

    def test_scorer_top_n_never_recommends_a_seen_item(self, fitted, variant, ml_small):
        users = some_users(ml_small, 30).numpy()
        seen = ml_small.seen_csr()
        items, scores = topn(fitted[0], users, 10, exclude=seen)
        assert items.shape == (30, 10) and (items >= 0).all() and np.isfinite(scores).all()
        assert not seen[np.repeat(users, 10), items.ravel()].any()
        assert all(len(set(row)) == 10 for row in items.tolist())
        assert (np.diff(scores, axis=1) <= 0).all()

    # -- parameters ----------------------------------------------------------------------------------
    def test_unknown_parameter_lists_the_valid_ones(self):
        with pytest.raises(BatchrecError) as err:
            parse_params(self.family, ["no_such_param=1"])
        msg = str(err.value)
        assert msg.startswith(f"{self.family}: ") and "no_such_param" in msg and "\n" not in msg
        for p in create_model(self.family).all_params():
            assert p.name in msg
        with pytest.raises(BatchrecError, match="unknown parameter"):
            create_model(self.family, {"no_such_param": 1})

    def test_bad_parameter_is_a_one_line_error_naming_it(self, bad, expected):
        with pytest.raises(BatchrecError, match=expected) as err:
            create_model(self.family, parse_params(self.family, [bad]))
        msg = str(err.value)
        assert msg.startswith(f"{self.family}: ") and bad.split("=")[0] in msg and "\n" not in msg

    # -- data it cannot use, and the NaN guard -------------------------------------------------------
    def test_a_rating_family_rejects_implicit_data(self, ml_small):
        if get_model_class(self.family).task != "rating":
            pytest.skip(f"{self.family} ranks; it takes implicit data")
        with pytest.raises(BatchrecError, match=f"^{self.family}: .*explicit ratings"):
            fit_model(self.family, implicit_copy(ml_small), self.params())

    def test_the_largest_learning_rate_never_leaves_non_finite_scores(self, ml_small):
        """Adam moves each weight by at most about lr per step, so lr=1 (the bound) wrecks the model
        but need not overflow; whatever happens, no non-finite score may come out of a fit."""
        if not self.gradient_trained:
            pytest.skip(f"{self.family} has no learning rate")
        try:
            model = fit_model(self.family, ml_small, self.params(lr=1.0))[0]
        except BatchrecError as err:
            assert str(err).startswith(f"{self.family}: training diverged")
            return
        assert bool(torch.isfinite(model.score_blocks(torch.arange(ml_small.n_users))).all())
