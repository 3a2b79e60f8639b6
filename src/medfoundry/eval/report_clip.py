"""The image-text part of the run report (CLIP-style runs): what ``RUN/eval/clip_history.jsonl`` holds, laid out
as plot panels and tables for :func:`medfoundry.eval.report.write_report`.

* panels over steps: zero-shot AUCs (mean over findings, macro over classes), zero-shot accuracy against the
  chance rate, image-to-text and text-to-image Recall@K against chance, the validation contrastive loss;
* a table of the last evaluation: every headline value with its bootstrap interval where one was computed;
* a table of the per-finding zero-shot AUCs of the last evaluation, with intervals and positive counts.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from medfoundry.eval.report_format import fmt, with_ci

HISTORY = Path("eval") / "clip_history.jsonl"
_HEADLINE_PREFIXES = ("zeroshot/mean_auc", "zeroshot/macro_auc", "zeroshot/accuracy", "zeroshot/balanced_accuracy",
                      "zeroshot/chance_accuracy", "retrieval/i2t_recall_at_", "retrieval/t2i_recall_at_",
                      "retrieval/chance_at_", "retrieval/num_pairs", "val/contrastive_loss", "val/num_pairs")


def _recall_ks(keys: set[str]) -> list[int]:
    return sorted({int(k.rsplit("_", 1)[1]) for k in keys if k.startswith("retrieval/i2t_recall_at_")})


def clip_panels(keys: set[str]) -> list[tuple[str, list[str]]]:
    """``(panel title, metric keys)`` of the image-text evaluation present in ``keys``."""
    ks = _recall_ks(keys)
    return [
        ("zero-shot AUC (95% CI)", ["zeroshot/mean_auc", "zeroshot/macro_auc"]),
        ("zero-shot accuracy vs chance", ["zeroshot/accuracy", "zeroshot/balanced_accuracy",
                                          "zeroshot/chance_accuracy"]),
        ("image->text Recall@K vs chance", [f"retrieval/{m}_{k}" for k in ks for m in ("i2t_recall_at", "chance_at")]),
        ("text->image Recall@K", [f"retrieval/t2i_recall_at_{k}" for k in ks]),
        ("validation contrastive loss (held-out pairs)", ["val/contrastive_loss"]),
    ]


def interval_keys(record: dict) -> dict[str, Any]:
    """The record with its bootstrap intervals also under the names the report's plots and cells read
    (``<key>_ci_low`` / ``_ci_high``): CLIP records store ``zeroshot/macro_auc_low`` and, per finding,
    ``zeroshot/auc_low/<finding>``."""
    out = dict(record)
    for key, value in record.items():
        for side in ("low", "high"):
            if key.endswith(f"_{side}") and key[: -len(side) - 1] in record:
                out[f"{key[: -len(side) - 1]}_ci_{side}"] = value
            elif f"/auc_{side}/" in key:
                out[key.replace(f"/auc_{side}/", "/auc/") + f"_ci_{side}"] = value
    return out


def last_evaluation_html(history: Sequence[dict]) -> str:
    """The last evaluated step's headline values and per-finding zero-shot AUCs (bootstrap 95% intervals);
    ``history`` holds the records as :func:`interval_keys` returns them."""
    if not history:
        return ""
    last: dict = {}
    for record in history:  # the validation loss and zero-shot may run at different steps: latest of each
        last.update(record)
    keys = [k for k in last if k.startswith(_HEADLINE_PREFIXES) and not k.endswith(("_low", "_high"))]
    rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{with_ci(last, k)}</td></tr>" for k in keys)
    parts = [f"<p>Latest values (up to step {max(int(r['step']) for r in history)}).</p>"
             f"<table><tr><th>metric</th><th>value</th></tr>{rows}</table>"]
    findings = sorted(k.split("/", 2)[2] for k in last if k.startswith("zeroshot/auc/"))
    if findings:
        cells = "".join(
            f"<tr><td>{html.escape(f)}</td>"
            f"<td>{with_ci(last, f'zeroshot/auc/{f}')}</td>"
            f"<td>{fmt(last.get(f'zeroshot/n_pos/{f}'))}</td></tr>" for f in findings)
        parts.append("<h3>Zero-shot AUC per finding (prompt pairs)</h3><table><tr><th>finding</th>"
                     f"<th>AUC [95% CI]</th><th>positives</th></tr>{cells}</table>")
    return "\n".join(parts)
