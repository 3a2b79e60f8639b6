"""Hounsfield-unit window specs as a config gives them: named presets or ``"centre:width"``.

Pure parsing, so the config checks can validate ``data.hu_windows`` without importing the data package;
:mod:`medfoundry.data.transforms.hu` applies the windows.
"""

from __future__ import annotations

# Named windows as (centre, width) in HU; radiology-standard values.
WINDOW_PRESETS: dict[str, tuple[float, float]] = {
    "lung": (-600.0, 1500.0),
    "mediastinum": (50.0, 350.0),
    "soft_tissue": (50.0, 400.0),
    "bone": (400.0, 1800.0),
    "brain": (40.0, 80.0),
    "subdural": (75.0, 215.0),
    "stroke": (40.0, 40.0),
    "liver": (30.0, 150.0),
}


def parse_window(spec: str | tuple[float, float]) -> tuple[float, float]:
    """A preset name (``lung``, ``soft-tissue``...) or ``"centre:width"`` -> (centre, width)."""
    if isinstance(spec, (tuple, list)):
        center, width = float(spec[0]), float(spec[1])
    else:
        key = str(spec).strip().lower().replace("-", "_").replace(" ", "_")
        if key in WINDOW_PRESETS:
            return WINDOW_PRESETS[key]
        parts = str(spec).strip().replace(",", ":").split(":")
        try:
            if len(parts) != 2:
                raise ValueError
            center, width = float(parts[0]), float(parts[1])
        except ValueError:
            raise ValueError(
                f"window '{spec}' is neither a preset {sorted(WINDOW_PRESETS)} nor 'centre:width' (e.g. '-600:1500')"
            ) from None
    if width <= 0:
        raise ValueError(f"window '{spec}': width must be > 0")
    return center, width
