"""The one interface every model family implements, so train/score/evaluate never special-case.

A family subclasses `Recommender`, declares its hyper-parameters as `Param`s, and implements
`fit`, `score`, `state` and `load_state`. Saving, loading, parameter validation and the
fallback for unknown users/items live here once.

Conventions
-----------
* `score(user_idx)` returns a float32 tensor [len(user_idx), n_items] on the model's device;
  `score(user_idx, item_idx)` (equal lengths) returns [len] scores of those pairs. Higher is
  better. Rating models (`task == "rating"`) return predicted ratings on the data's scale
  (unclipped; evaluation clips).
* Factor models also return `user_vectors()` [n_users, d] and `item_vectors()` [n_items, d]
  such that `user_vectors() @ item_vectors().T == score(all users)` up to float error; biases
  and the global mean are folded in as extra columns, so the scorer can use one blocked matmul.
* `state()` holds every learned tensor (and small JSON-able values); `params` the
  hyper-parameters. Together they are the artifact: `save(dir)` / `Recommender.load(dir)`.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch

from batchrec.errors import BatchrecError, CorruptArtifact, first_line
from batchrec.models.search import SearchSpace, check_space
from batchrec.options import SEED_MAX, SEED_MIN

if TYPE_CHECKING:
    from batchrec.data import SnapshotData
    from batchrec.training import Trainer

ARTIFACT_STATE = "state.pt"
ARTIFACT_META = "model.json"


@dataclass(frozen=True)
class Param:
    """One hyper-parameter: name, type, default, bounds, a short help text and, for the
    parameters `batchrec tune` searches, its search space (`models.search`)."""

    name: str
    type: type
    default: Any
    help: str
    min: float | None = None
    max: float | None = None
    choices: tuple | None = None
    finite: bool = True  # a float must be a finite number (nan passes every bound check; inf is no setting)
    search: SearchSpace | None = None  # where `batchrec tune` looks (None: the parameter stays as given)

    def parse(self, value: Any, model: str) -> Any:
        """Convert a CLI string (or a Python value) and check bounds; one-line error if bad."""
        try:
            if self.type is bool and isinstance(value, str):
                if value.lower() not in ("1", "0", "true", "false", "yes", "no"):
                    raise ValueError
                v = value.lower() in ("1", "true", "yes")
            else:
                v = self.type(value)
                if self.type is int and isinstance(value, float) and value != int(value):
                    raise ValueError
        except (TypeError, ValueError, OverflowError):
            raise BatchrecError(
                f"{model}: parameter {self.name}={value!r} is not a valid {self.type.__name__}"
            ) from None
        if self.type is float and self.finite and not math.isfinite(v):
            raise BatchrecError(f"{model}: parameter {self.name}={value!r} is not a finite number")
        if self.choices is not None and v not in self.choices:
            raise BatchrecError(
                f"{model}: parameter {self.name}={v!r} must be one of {', '.join(map(str, self.choices))}"
            )
        if (self.min is not None and v < self.min) or (self.max is not None and v > self.max):
            lo = "-inf" if self.min is None else self.min
            hi = "inf" if self.max is None else self.max
            raise BatchrecError(f"{model}: parameter {self.name}={v} is out of range [{lo}, {hi}]")
        return v

    def describe(self) -> str:
        rng = ""
        if self.choices:
            rng = f" one of {{{', '.join(map(str, self.choices))}}}"
        elif self.min is not None or self.max is not None:
            rng = (
                f" in [{'-inf' if self.min is None else self.min}, {'inf' if self.max is None else self.max}]"
            )
        tune = f" [tune: {self.search.describe()}]" if self.search is not None else ""
        return f"{self.name} ({self.type.__name__}, default {self.default!r}{rng}): {self.help}{tune}"


def _first_sentence(exc: BaseException) -> str:
    """torch's load errors run to a paragraph of advice: their first sentence says what failed."""
    return re.split(r"(?<=[a-z)])\. ", first_line(exc))[0].rstrip(".")


class Recommender:
    """Base class of every model family. See the module docstring for the conventions."""

    name: ClassVar[str] = ""
    task: ClassVar[str] = "ranking"  # "rating" models predict ratings and are scored by RMSE too
    params_spec: ClassVar[tuple[Param, ...]] = ()
    seed_param: ClassVar[bool] = True  # families with a random step take `seed`
    personalised: ClassVar[bool] = True  # False: one global ranking (lists overlap by design)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for (
            param
        ) in cls.params_spec:  # a space that does not fit its parameter fails at import, in every test
            if param.search is not None:
                check_space(param.search, param)

    def __init__(self, **params: Any):
        spec = {p.name: p for p in self.all_params()}
        unknown = sorted(set(params) - set(spec))
        if unknown:
            raise BatchrecError(
                f"{self.name}: unknown parameter {unknown[0]!r}; valid: "
                + "; ".join(p.describe() for p in spec.values())
            )
        self.params: dict[str, Any] = {
            n: p.parse(params[n], self.name) if n in params else p.default for n, p in spec.items()
        }
        self.device = torch.device("cpu")
        self.n_users = 0
        self.n_items = 0
        self.priors: dict[str, torch.Tensor] = {}

    @classmethod
    def all_params(cls) -> tuple[Param, ...]:
        seed = (Param("seed", int, 0, "random seed", min=SEED_MIN, max=SEED_MAX),) if cls.seed_param else ()
        return tuple(cls.params_spec) + seed

    @classmethod
    def search_space(cls) -> dict[str, SearchSpace]:
        """The parameters `batchrec tune` searches, with their spaces (empty: not tunable)."""
        return {p.name: p.search for p in cls.params_spec if p.search is not None}

    # -- what each family implements --------------------------------------------------------
    def fit(self, data: SnapshotData, trainer: Trainer) -> Recommender:
        raise NotImplementedError

    def score(self, user_idx: torch.Tensor, item_idx: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    def state(self) -> dict[str, Any]:
        """Every learned tensor (and small JSON-able values) needed to score."""
        raise NotImplementedError

    def load_state(self, state: dict[str, Any]) -> None:
        raise NotImplementedError

    def user_vectors(self) -> torch.Tensor | None:
        return None

    def item_vectors(self) -> torch.Tensor | None:
        return None

    def content_scored_items(self) -> np.ndarray | None:
        """Bool [n_items]: items without training interactions that this model scores from their
        content (genres, tags), which the nightly scorer may then recommend; None: the model
        knows only the items it was trained on."""
        return None

    # -- shared machinery -------------------------------------------------------------------
    def prepare(self, data: SnapshotData, device: torch.device) -> None:
        """Called by the trainer before `fit`: sizes, device and the fallback priors."""
        self.n_users, self.n_items, self.device = data.n_users, data.n_items, device
        tr = data.train
        counts = np.bincount(tr.item_idx, minlength=data.n_items).astype(np.float32)
        priors = {"item_pop": torch.from_numpy(counts)}
        if not tr.implicit:
            # Damped baseline predictor (global mean + item and user offsets): the fallback
            # for pairs a model cannot score (unknown user or item).
            mu = float(np.nanmean(tr.rating))
            resid = tr.rating - mu
            item_sum = np.bincount(tr.item_idx, weights=resid, minlength=data.n_items)
            item_off = item_sum / (counts + 5.0)
            resid = resid - item_off[tr.item_idx]
            user_cnt = np.bincount(tr.user_idx, minlength=data.n_users)
            user_off = np.bincount(tr.user_idx, weights=resid, minlength=data.n_users) / (user_cnt + 5.0)
            priors |= {
                "global_mean": torch.tensor(mu),
                "item_offset": torch.from_numpy(item_off.astype(np.float32)),
                "user_offset": torch.from_numpy(user_off.astype(np.float32)),
            }
        self.priors = {k: v.to(device) for k, v in priors.items()}

    def score_fallback(self, user_idx: torch.Tensor, item_idx: torch.Tensor) -> torch.Tensor:
        """Scores for pairs where the user and/or item is unknown (-1): the baseline predictor
        for rating models, item popularity for ranking models."""
        known_item = item_idx >= 0
        item = item_idx.clamp(min=0)
        if "global_mean" in self.priors:
            s = self.priors["global_mean"] + torch.where(known_item, self.priors["item_offset"][item], 0.0)
            return s + torch.where(user_idx >= 0, self.priors["user_offset"][user_idx.clamp(min=0)], 0.0)
        return torch.where(known_item, self.priors["item_pop"][item], 0.0)

    def to(self, device: torch.device | str) -> Recommender:
        device = torch.device(device)
        self.load_state(
            {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in self.state().items()}
        )
        self.priors = {k: v.to(device) for k, v in self.priors.items()}
        self.device = device
        return self

    def save(self, directory: str | Path) -> Path:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu() if isinstance(v, torch.Tensor) else v for k, v in self.state().items()}
        torch.save(
            {"state": state, "priors": {k: v.cpu() for k, v in self.priors.items()}}, d / ARTIFACT_STATE
        )
        meta = {"model": self.name, "params": self.params, "n_users": self.n_users, "n_items": self.n_items}
        (d / ARTIFACT_META).write_text(json.dumps(meta, indent=2))
        return d

    @staticmethod
    def load(
        directory: str | Path, device: torch.device | str = "cpu", family: str | None = None
    ) -> Recommender:
        """The model saved in `directory`, checked: an artifact that cannot be read, that is not of
        `family` (when given), or whose state does not fit what model.json says (keys, shapes)
        raises `CorruptArtifact` saying what."""
        from batchrec.models import get_model_class

        d = Path(directory)
        if not (d / ARTIFACT_META).exists():
            raise BatchrecError(f"model artifact {d} is missing or incomplete (no {ARTIFACT_META})")
        try:
            meta = json.loads((d / ARTIFACT_META).read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CorruptArtifact(d, f"{ARTIFACT_META} is not JSON: {exc}", family) from None
        if not isinstance(meta, dict) or not {"model", "params", "n_users", "n_items"} <= set(meta):
            raise CorruptArtifact(d, f"{ARTIFACT_META} lacks model, params, n_users or n_items", family)
        sizes = meta["n_users"], meta["n_items"]
        if not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in sizes):
            raise CorruptArtifact(
                d,
                f"{ARTIFACT_META} has n_users {sizes[0]!r}, n_items {sizes[1]!r} "
                "(expected positive integers)",
                family or meta["model"],
            )
        if family is not None and meta["model"] != family:
            raise CorruptArtifact(
                d, f"{ARTIFACT_META} names model {meta['model']!r}, the run is {family}", family
            )
        try:
            model = get_model_class(meta["model"])(**meta["params"])
        except (BatchrecError, TypeError) as exc:
            raise CorruptArtifact(d, f"{ARTIFACT_META}: {str(exc).split('; valid:')[0]}", family) from None
        try:
            blob = torch.load(d / ARTIFACT_STATE, map_location=device, weights_only=True)
        except FileNotFoundError:
            raise
        except Exception as exc:  # truncated or foreign bytes: torch raises several kinds
            raise CorruptArtifact(
                d, f"{ARTIFACT_STATE} cannot be read: {_first_sentence(exc)}", model.name
            ) from None
        model.n_users, model.n_items, model.device = meta["n_users"], meta["n_items"], torch.device(device)
        try:
            model.priors = blob["priors"]
            model.load_state(blob["state"])
            with torch.no_grad():  # the first and last user against every item: the shapes agree
                probe = model.score(torch.tensor([0, model.n_users - 1], device=model.device))
        except KeyError as exc:
            raise CorruptArtifact(d, f"{ARTIFACT_STATE} has no {exc}", model.name) from None
        except Exception as exc:  # a tensor of the wrong shape fails wherever it is first used
            raise CorruptArtifact(
                d, f"{ARTIFACT_STATE} does not fit {ARTIFACT_META}: {_first_sentence(exc)}", model.name
            ) from None
        if tuple(probe.shape) != (2, model.n_items):
            raise CorruptArtifact(
                d,
                f"its scores have shape {tuple(probe.shape)}, model.json says {model.n_items} items",
                model.name,
            )
        return model

    def score_blocks(self, user_idx: torch.Tensor, block: int = 1024) -> torch.Tensor:
        """All-item scores for many users, computed in blocks (for small data and tests)."""
        return torch.cat([self.score(user_idx[i : i + block]) for i in range(0, len(user_idx), block)])


class FactorModel(Recommender):
    """A family whose fitted model is two matrices: score(u, i) = U[u] . V[i].

    `fit` sets `self.U` [n_users, d] and `self.V` [n_items, d] (biases and means folded in as
    columns); scoring, the scorer's vectors and the artifact come from here."""

    U: torch.Tensor
    V: torch.Tensor

    def score(self, user_idx: torch.Tensor, item_idx: torch.Tensor | None = None) -> torch.Tensor:
        if item_idx is None:
            return self.U[user_idx] @ self.V.T
        return (self.U[user_idx] * self.V[item_idx]).sum(1)

    def user_vectors(self) -> torch.Tensor:
        return self.U

    def item_vectors(self) -> torch.Tensor:
        return self.V

    def state(self) -> dict[str, Any]:
        return {"U": self.U, "V": self.V}

    def load_state(self, state: dict[str, Any]) -> None:
        self.U, self.V = state["U"], state["V"]
