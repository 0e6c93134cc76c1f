"""Ensemble weights (`--weights 1,0.5`): one parser and one check for every command that takes them.

`kseg submit` / `kseg predict`, `kseg tune --experiment A --experiment B` and `kseg kernel build`
all accept the same option; checking it in one place means a kernel is never built with weights
that its own `kseg submit` would refuse on Kaggle, hours later.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from kaggle_seg.errors import KsegError


def parse_weights(text: str | None) -> list[float] | None:
    """`"1,0.5"` -> `[1.0, 0.5]`; None stays None (equal weights)."""
    if text is None:
        return None
    try:
        return [float(w) for w in text.split(",")]
    except ValueError:
        raise KsegError(f"--weights {text!r}: expected numbers like 1,0.5") from None


def check_weights(weights: Sequence[float] | None, count: int, member: str) -> list[float]:
    """One weight per member (`member` names one, e.g. "experiment"): finite, non-negative,
    summing to more than 0. None gives equal weights. Returned as given, not normalised."""
    if weights is None:
        return [1.0] * count
    if len(weights) != count:
        raise KsegError(
            f"--weights: {len(weights)} weight(s) for {count} {member}(s); give one per {member}"
        )
    values = [float(w) for w in weights]
    if any(not math.isfinite(w) or w < 0 for w in values) or sum(values) <= 0:
        raise KsegError(f"--weights {values}: need non-negative weights with a positive sum")
    return values
