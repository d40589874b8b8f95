"""Search spaces for `batchrec tune`, declared beside each family's parameters
(`Param(..., search=LogUniform(10, 5000))`).

A space is plain data (ranges, log scale, choices); `batchrec.tune` turns it into Optuna
distributions, so the model layer never imports Optuna. Every space is checked against its
parameter when the family is defined: it must lie within the parameter's bounds, hold only values
the parameter accepts, and contain the default (the first trial of a study is the defaults, so a
tuned setting is never worse on validation than the defaults it replaces).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from batchrec.errors import BatchrecError


@dataclass(frozen=True)
class Uniform:
    """A float drawn uniformly from [low, high] (on a log scale with `log`)."""

    low: float
    high: float
    log: bool = False

    def problems(self) -> str | None:
        if not (math.isfinite(self.low) and math.isfinite(self.high) and self.low < self.high):
            return f"range [{self.low}, {self.high}] is not a finite range with low < high"
        if self.log and self.low <= 0:
            return f"log range [{self.low}, {self.high}] must be above 0"
        return None

    def values(self) -> tuple[Any, ...]:
        return (self.low, self.high)

    def contains(self, value: Any) -> bool:
        return (
            isinstance(value, (int, float)) and not isinstance(value, bool) and self.low <= value <= self.high
        )

    def describe(self) -> str:
        return f"{'log-' if self.log else ''}uniform [{self.low:g}, {self.high:g}]"


def LogUniform(low: float, high: float) -> Uniform:  # noqa: N802 (reads as a type in a Param declaration)
    """A float drawn log-uniformly from [low, high] (regularisation strengths, learning rates)."""
    return Uniform(low, high, log=True)


@dataclass(frozen=True)
class IntRange:
    """An integer in [low, high], every `step`-th one (on a log scale with `log`, step 1)."""

    low: int
    high: int
    log: bool = False
    step: int = 1

    def problems(self) -> str | None:
        if self.low >= self.high or self.step < 1:
            return f"integer range [{self.low}, {self.high}] step {self.step} needs low < high and step >= 1"
        if self.log and (self.low < 1 or self.step != 1):
            return f"log integer range [{self.low}, {self.high}] must start at 1 or above, step 1"
        if (self.high - self.low) % self.step:
            return f"integer range [{self.low}, {self.high}] is not a whole number of steps of {self.step}"
        return None

    def values(self) -> tuple[Any, ...]:
        return (self.low, self.high)

    def contains(self, value: Any) -> bool:
        return (
            isinstance(value, int)
            and not isinstance(value, bool)
            and self.low <= value <= self.high
            and (value - self.low) % self.step == 0
        )

    def describe(self) -> str:
        step = f" step {self.step}" if self.step != 1 else ""
        return f"{'log-' if self.log else ''}integer [{self.low}, {self.high}]{step}"


@dataclass(frozen=True)
class Choice:
    """One of a few values (a categorical: TPE keeps a weight per value)."""

    options: tuple

    def problems(self) -> str | None:
        if len(self.options) < 2 or len(set(self.options)) != len(self.options):
            return f"choices {list(self.options)} need two or more distinct values"
        return None

    def values(self) -> tuple[Any, ...]:
        return tuple(self.options)

    def contains(self, value: Any) -> bool:
        return value in self.options

    def describe(self) -> str:
        return "one of {" + ", ".join(map(str, self.options)) + "}"


SearchSpace = Uniform | IntRange | Choice


def check_space(space: SearchSpace, param) -> None:
    """A one-line error when `space` does not fit `param` (a `models.base.Param`): a malformed
    range, values the parameter refuses, a default outside the space, a type mismatch."""
    where = f"search space of {param.name} ({space.describe()})"
    problem = space.problems()
    if problem is None and isinstance(space, Uniform) and param.type is not float:
        problem = f"a float range for a {param.type.__name__} parameter"
    if problem is None and isinstance(space, IntRange) and param.type is not int:
        problem = f"an integer range for a {param.type.__name__} parameter"
    if problem is None:
        for value in space.values():
            try:
                if param.parse(value, "search") != value:
                    problem = f"{value!r} would be read as {param.parse(value, 'search')!r}"
            except BatchrecError as exc:
                problem = str(exc).removeprefix("search: ")
            if problem:
                break
    if problem is None and not space.contains(param.default):
        problem = f"the default {param.default!r} lies outside it"
    if problem is not None:
        raise BatchrecError(
            f"{where}: {problem} (expected a space inside the parameter's bounds that holds its default)"
        )
