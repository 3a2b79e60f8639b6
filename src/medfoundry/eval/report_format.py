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
    """A table cell: integers as they are, floats to 4 significant digits, NaN as a dash."""
    if isinstance(v, (int, np.integer)) and not isinstance(v, bool):
        return str(int(v))
    f = number(v)
    if not math.isfinite(f):
        return "–" if math.isnan(f) else str(f)
    return f"{f:.0f}" if abs(f) >= 1000 else f"{f:.4g}"


def with_ci(res: dict, key: str) -> str:
    """``res[key]`` with its ``<key>_ci_low`` / ``<key>_ci_high`` interval (as HTML) when both are there."""
    text = fmt(res.get(key))
    lo, hi = number(res.get(key + "_ci_low")), number(res.get(key + "_ci_high"))
    if math.isfinite(lo) and math.isfinite(hi):
        text += f" <span class='muted'>[{lo:.3f}, {hi:.3f}]</span>"
    return text
