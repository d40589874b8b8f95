"""Negative sampling: items a user has not interacted with, drawn without Python loops."""

from __future__ import annotations

import torch

# Redraw rounds for negatives that hit a seen item; the few still seen after them are dropped.
_REJECT_ROUNDS = 8


class NegativeSampler:
    """Draws items a user has not interacted with, vectorised (sorted keys + binary search)."""

    def __init__(
        self,
        seen_users: torch.Tensor,
        seen_items: torch.Tensor,
        n_items: int,
        weights: torch.Tensor | None,
        generator: torch.Generator,
    ):
        self.n_items = n_items
        self.keys = torch.sort(seen_users * n_items + seen_items).values
        self.weights = weights
        self.gen = generator

    def _draw(self, n: int) -> torch.Tensor:
        if self.weights is None:
            return torch.randint(0, self.n_items, (n,), generator=self.gen, device=self.keys.device)
        return torch.multinomial(self.weights, n, replacement=True, generator=self.gen)

    def seen(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        keys = users * self.n_items + items
        pos = torch.searchsorted(self.keys, keys).clamp(max=len(self.keys) - 1)
        return self.keys[pos] == keys

    def sample(self, users: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(negatives, ok): one negative per user entry; ok is False where every redraw was seen."""
        neg = self._draw(len(users))
        bad = self.seen(users, neg)
        for _ in range(_REJECT_ROUNDS):
            idx = bad.nonzero()[:, 0]
            if len(idx) == 0:
                break
            neg[idx] = self._draw(len(idx))
            bad[idx] = self.seen(users[idx], neg[idx])
        return neg, ~bad
