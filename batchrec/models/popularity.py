"""Most-popular items, the same list for everyone: the floor every other family must beat.

Two variants:

* `count`: the number of training interactions of each item (the usual most-popular baseline;
  on ml-latest-small / user_temporal NDCG@10 = 0.046, the reference most-popular scores 0.0464);
* `bayes`: the Bayesian-average rating (C * m + sum of ratings) / (C + n), m the global mean and
  C = `prior_weight` pseudo-ratings, so an item needs many good ratings to rank high. It favours
  acclaimed over merely watched items and ranks worse: NDCG@10 on the validation part of
  ml-latest-small / user_temporal is 0.041 at C=10 against 0.055 for `count`, the default.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from batchrec.errors import BatchrecError
from batchrec.models.base import Param, Recommender


class Popularity(Recommender):
    """Most popular items (interaction count, or Bayesian-average rating): the baseline floor."""

    name = "popularity"
    task = "ranking"
    seed_param = False
    personalised = False
    params_spec = (
        Param(
            "variant",
            str,
            "count",
            "count: number of interactions; bayes: Bayesian-average rating",
            choices=("count", "bayes"),
        ),
        Param(
            "prior_weight",
            float,
            10.0,
            "bayes: pseudo-ratings at the global mean added to every item",
            min=0.0,
        ),
    )

    def fit(self, data, trainer) -> Popularity:
        tr = data.train
        counts = np.bincount(tr.item_idx, minlength=self.n_items).astype(np.float64)
        if self.params["variant"] == "count":
            pop = counts
        else:
            if tr.implicit:
                raise BatchrecError(
                    "popularity: variant=bayes needs explicit ratings; this snapshot is implicit "
                    "(use variant=count)"
                )
            explicit = ~np.isnan(tr.rating)
            sums = np.bincount(tr.item_idx[explicit], weights=tr.rating[explicit], minlength=self.n_items)
            n = np.bincount(tr.item_idx[explicit], minlength=self.n_items)
            c, m = self.params["prior_weight"], float(tr.rating[explicit].mean())
            # Items never rated get the prior mean only when C > 0; with C = 0 they sink to 0.
            pop = np.where(n + c > 0, (c * m + sums) / np.maximum(n + c, 1e-12), 0.0)
            # Ties (e.g. all unrated items at m) are broken by count, so the order is well defined.
            pop = pop + counts / (counts.max() + 1.0) * 1e-3
        self.popularity = torch.from_numpy(pop.astype(np.float32)).to(self.device)
        trainer.log_epoch(epoch=1, items_scored=int((counts > 0).sum()))
        return self

    def score(self, user_idx: torch.Tensor, item_idx: torch.Tensor | None = None) -> torch.Tensor:
        if item_idx is None:
            return self.popularity.expand(len(user_idx), -1)
        return self.popularity[item_idx]

    def user_vectors(self) -> torch.Tensor:
        return torch.ones(self.n_users, 1, device=self.device)

    def item_vectors(self) -> torch.Tensor:
        return self.popularity[:, None]

    def state(self) -> dict[str, Any]:
        return {"popularity": self.popularity}

    def load_state(self, state: dict[str, Any]) -> None:
        self.popularity = state["popularity"]
