"""Number formatting of the run report's tables (shared by :mod:`medfoundry.eval.report` and
:mod:`medfoundry.eval.report_clip`)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np


def number(v: Any) -> float:
    """``v`` as a float, NaN when it is not a number."""
    try:
        return float(v)
    except (TypeError, ValueError):
        return float("nan")


def fmt(v: Any) -> str:
    """A table cell: integers as they are, floats to 4 significant digits, a missing value (None, not a number)
    as a dash and a computed NaN as ``nan`` (an undefined metric, e.g. the AUC of a one-class split, must show
    as undefined rather than as an empty cell)."""
    if isinstance(v, (int, np.integer)) and not isinstance(v, bool):
        return str(int(v))
    f = number(v)
    if not math.isfinite(f):
        if not math.isnan(f):
            return str(f)
        return "nan" if isinstance(v, (float, np.floating)) else "–"
    return f"{f:.0f}" if abs(f) >= 1000 else f"{f:.4g}"


def with_ci(res: dict, key: str) -> str:
    """``res[key]`` with its ``<key>_ci_low`` / ``<key>_ci_high`` interval (as HTML) when both are there."""
    text = fmt(res.get(key))
    lo, hi = number(res.get(key + "_ci_low")), number(res.get(key + "_ci_high"))
    if math.isfinite(lo) and math.isfinite(hi):
        text += f" <span class='muted'>[{lo:.3f}, {hi:.3f}]</span>"
    return text


def interval_winner(a: dict, b: dict, key: str, direction: str = "max") -> int:
    """Which of two results is better on ``key`` with 95% intervals that do not overlap: 1 for ``a``, 2 for ``b``,
    0 when the intervals overlap or either value lacks a finite ``<key>_ci_low`` / ``<key>_ci_high`` (then no
    difference is claimed). ``direction`` ``"min"`` means smaller is better."""
    lo_a, hi_a = number(a.get(key + "_ci_low")), number(a.get(key + "_ci_high"))
    lo_b, hi_b = number(b.get(key + "_ci_low")), number(b.get(key + "_ci_high"))
    if not all(math.isfinite(v) for v in (lo_a, hi_a, lo_b, hi_b)):
        return 0
    if lo_a > hi_b:
        return 2 if direction == "min" else 1
    if lo_b > hi_a:
        return 1 if direction == "min" else 2
    return 0
