"""Snapshot parameters: the defaults, `--param KEY=VALUE` parsing, protocols and timestamps.

Keys are flat (`seed`, `tfidf.min_df`, `user_temporal.test_frac`, ...) so a snapshot's recorded
parameters can be passed back verbatim to rebuild it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from datetime import UTC, datetime

from batchrec.errors import BatchrecError
from batchrec.options import RELEVANCE_THRESHOLD, SEED_MAX, SEED_MIN

PROTOCOLS = ("random", "user_random", "user_temporal", "global_temporal", "leave_last_n_positive", "as_of")

# Protocols whose rule draws random numbers (and so record the seed).
SEEDED = ("random", "user_random")


def parse_timestamp(text: str, what: str) -> datetime:
    """ISO date or date-time; an aware time is converted to naive UTC (the warehouse's convention)."""
    try:
        ts = datetime.fromisoformat(text.strip())
    except ValueError:
        raise BatchrecError(
            f"{what}: cannot read {text!r} as a timestamp (expected e.g. 2018-01-31 or 2018-01-31T12:00:00)"
        ) from None
    if ts.tzinfo is not None:
        ts = ts.astimezone(UTC).replace(tzinfo=None)
    return ts


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value < 1.0:
        raise ValueError
    return value


def _int_at_least(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = int(text)
        if value < low:
            raise ValueError
        return value

    return parse


def _positive(text: str) -> float:
    value = _number(text)
    if not value > 0.0:
        raise ValueError
    return value


def _number(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # nan passes every bound check; inf is no setting
        raise ValueError
    return value


def _seed(text: str) -> int:
    value = int(text)
    if not SEED_MIN <= value <= SEED_MAX:
        raise ValueError
    return value


def _timestamp(text: str) -> str:
    return parse_timestamp(text, "as_of.cutoff").isoformat(sep=" ")


FRACTION = (_fraction, "a fraction in [0, 1)")
# key -> (default, parser, what a valid value looks like)
SPEC: dict[str, tuple[object, Callable[[str], object], str]] = {
    "seed": (0, _seed, f"an integer in [{SEED_MIN}, {SEED_MAX}]"),
    "bayes_c": (None, _positive, "a finite number > 0 (default: mean ratings per rated item)"),
    "tfidf.min_df": (2, _int_at_least(1), "an integer >= 1"),
    "tfidf.max_terms": (20000, _int_at_least(1), "an integer >= 1"),
    "random.valid_frac": (0.1, *FRACTION),
    "random.test_frac": (0.1, *FRACTION),
    "user_random.valid_frac": (0.1, *FRACTION),
    "user_random.test_frac": (0.2, *FRACTION),
    "user_temporal.valid_frac": (0.1, *FRACTION),
    "user_temporal.test_frac": (0.1, *FRACTION),
    "global_temporal.valid_frac": (0.1, *FRACTION),
    "global_temporal.test_frac": (0.2, *FRACTION),
    "leave_last_n_positive.n": (5, _int_at_least(1), "an integer >= 1"),
    "leave_last_n_positive.n_valid": (1, _int_at_least(0), "an integer >= 0"),
    "leave_last_n_positive.positive_threshold": (RELEVANCE_THRESHOLD, _number, "a finite number"),
    "as_of.cutoff": (
        None,
        _timestamp,
        "a timestamp, e.g. 2018-01-31 (default: the latest tenth of the interactions is test)",
    ),
    "as_of.valid_frac": (0.1, *FRACTION),
}


def parse_protocols(text: str) -> tuple[str, ...]:
    """'all' or a comma-separated list -> protocol names in canonical order."""
    names = {p.strip() for p in text.split(",") if p.strip()}
    if text.strip() == "all":
        return PROTOCOLS
    unknown = sorted(names - set(PROTOCOLS))
    if unknown or not names:
        what = f"unknown protocol {unknown[0]!r}" if unknown else "no protocol given"
        raise BatchrecError(f"{what} (valid: {', '.join(PROTOCOLS)}, or all)")
    return tuple(p for p in PROTOCOLS if p in names)


def parse_params(items: tuple[str, ...] | list[str]) -> dict[str, object]:
    """Defaults overridden by KEY=VALUE strings; any bad key or value is one clear error."""
    values = {key: default for key, (default, _, _) in SPEC.items()}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep:
            raise BatchrecError(f"bad parameter {item!r}: expected KEY=VALUE (valid keys: {', '.join(SPEC)})")
        if key not in SPEC:
            raise BatchrecError(f"unknown parameter {key!r} (valid keys: {', '.join(SPEC)})")
        _, parse, expected = SPEC[key]
        try:
            values[key] = parse(text.strip())
        except ValueError:
            raise BatchrecError(f"bad value for parameter {key}: {text!r} (expected {expected})") from None
    for protocol in PROTOCOLS:
        valid, test = values.get(f"{protocol}.valid_frac", 0.0), values.get(f"{protocol}.test_frac", 0.0)
        if valid + test >= 1.0:
            raise BatchrecError(
                f"bad values for parameters {protocol}.valid_frac + {protocol}.test_frac: "
                f"{valid} + {test} (expected a sum below 1)"
            )
    return values


def protocol_params(values: dict[str, object], protocol: str) -> dict[str, object]:
    """One protocol's parameters without the prefix (plus the seed where the rule is random)."""
    prefix = f"{protocol}."
    own = {key[len(prefix) :]: value for key, value in values.items() if key.startswith(prefix)}
    if protocol in SEEDED:
        own["seed"] = values["seed"]
    return own
