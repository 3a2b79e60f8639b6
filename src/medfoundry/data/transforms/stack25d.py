"""2.5D input: a slice and its neighbours at a stride, stacked as channels (z - s, z, z + s).

Edge handling when a neighbour falls outside the volume:

* ``replicate``: use the nearest slice (z = 0 gets slices 0, 0, s);
* ``reflect``: mirror at the edge without repeating it (z = 0 gets s, 0, s);
* ``skip``: never centre on an edge slice; only centres with every neighbour inside are used
  (see :func:`valid_centres`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import numpy as np

Edge = Literal["replicate", "reflect", "skip"]


def neighbour_indices(z: int, depth: int, n_slices: int = 3, stride: int = 1, edge: Edge = "replicate") -> list[int]:
    """Slice indices stacked for centre ``z`` (``n_slices`` odd): z - k*stride ... z + k*stride."""
    if n_slices < 1 or n_slices % 2 == 0:
        raise ValueError(f"n_slices={n_slices} must be odd (the centre slice plus pairs of neighbours)")
    if stride < 1:
        raise ValueError(f"slice stride={stride} must be >= 1")
    if not 0 <= z < depth:
        raise IndexError(f"slice {z} outside a volume of {depth} slices")
    half = n_slices // 2
    out = []
    for k in range(-half, half + 1):
        i = z + k * stride
        if 0 <= i < depth:
            out.append(i)
        elif edge == "replicate":
            out.append(min(max(i, 0), depth - 1))
        elif edge == "reflect":
            out.append(_reflect(i, depth))
        elif edge == "skip":
            raise IndexError(f"slice {z} has no neighbour {i} in {depth} slices (edge='skip'; use valid_centres)")
        else:
            raise ValueError(f"unknown edge handling '{edge}' (replicate, reflect, skip)")
    return out


def _reflect(i: int, depth: int) -> int:
    if depth == 1:
        return 0
    period = 2 * (depth - 1)
    i = abs(i) % period
    return period - i if i >= depth else i


def valid_centres(depth: int, n_slices: int = 3, stride: int = 1, edge: Edge = "replicate") -> range:
    """The centre slices a volume offers: all of them, or for ``skip`` those with all neighbours inside."""
    if edge != "skip":
        return range(depth)
    reach = (n_slices // 2) * stride
    return range(reach, max(reach, depth - reach))


def stack_slices(
    volume_or_reader: np.ndarray | Callable[[list[int]], np.ndarray],
    z: int,
    depth: int | None = None,
    n_slices: int = 3,
    stride: int = 1,
    edge: Edge = "replicate",
) -> np.ndarray:
    """(n_slices, Y, X) array of slices around ``z`` from a (Z, Y, X) array or a ``read(indices)`` function."""
    if callable(volume_or_reader):
        if depth is None:
            raise ValueError("depth is needed with a reader function")
        return np.asarray(volume_or_reader(neighbour_indices(z, depth, n_slices, stride, edge)))
    volume = np.asarray(volume_or_reader)
    idx = neighbour_indices(z, volume.shape[0], n_slices, stride, edge)
    return volume[idx]
