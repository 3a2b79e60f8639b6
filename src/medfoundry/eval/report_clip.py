"""The image-text part of the run report (CLIP-style runs): what ``RUN/eval/clip_history.jsonl`` holds, laid out
as plot panels and tables for :func:`medfoundry.eval.report.write_report`.

* panels over steps: zero-shot AUCs (mean over findings, macro over classes), zero-shot accuracy against the
  chance rate, image-to-text and text-to-image Recall@K against chance, the validation contrastive loss;
* a table of the last evaluation: every headline value with its bootstrap interval where one was computed;
* a table of the per-finding zero-shot AUCs of the last evaluation, with intervals and positive counts.

Every panel title and table row names the images it is measured on (:func:`clip_split`, from the run's config):
the zero-shot set as ``clip.eval.zeroshot.split`` declares it, the retrieval pairs (the training pairs, or a set
as ``clip.eval.retrieval.split`` declares it) and the held-out pairs of the validation loss.
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


def clip_split(key: str, cfg: dict | None = None) -> str:
    """The images a CLIP metric is measured on, from the run's resolved config (a dict; defaults as the schema's):
    ``zeroshot/*`` the zero-shot set (its declared split), ``retrieval/*`` the training pairs or the declared
    split of ``clip.eval.retrieval.data``, ``val/*`` the held-out pairs of ``clip.eval.val_loss``."""
    ev = ((cfg or {}).get("clip") or {}).get("eval") or {}
    if key.startswith("zeroshot/"):
        return f"{(ev.get('zeroshot') or {}).get('split', 'test')} (clip.eval.zeroshot)"
    if key.startswith("retrieval/"):
        retrieval = ev.get("retrieval") or {}
        if retrieval.get("source", "none") == "data":
            return f"{retrieval.get('split', 'test')} (clip.eval.retrieval.data)"
        return "training pairs (clip.data)"
    if key.startswith("val/"):
        return "held-out val pairs (clip.eval.val_loss)"
    return ""


def clip_panels(keys: set[str], cfg: dict | None = None) -> list[tuple[str, list[str], str]]:
    """``(panel title, metric keys, y-axis label)`` of the image-text evaluation present in ``keys``; each title
    names its split (:func:`clip_split` under the run's config ``cfg``)."""
    ks = _recall_ks(keys)

    def on(prefix: str) -> str:
        return f" [{clip_split(prefix, cfg)}]"

    return [
        ("zero-shot AUC (95% CI)" + on("zeroshot/"), ["zeroshot/mean_auc", "zeroshot/macro_auc"], "AUC-ROC"),
        ("zero-shot accuracy vs chance" + on("zeroshot/"), ["zeroshot/accuracy", "zeroshot/balanced_accuracy",
                                                            "zeroshot/chance_accuracy"], "accuracy (fraction)"),
        ("image->text Recall@K vs chance" + on("retrieval/"),
         [f"retrieval/{m}_{k}" for k in ks for m in ("i2t_recall_at", "chance_at")], "recall@K (fraction)"),
        ("text->image Recall@K" + on("retrieval/"), [f"retrieval/t2i_recall_at_{k}" for k in ks],
         "recall@K (fraction)"),
        ("validation contrastive loss" + on("val/"), ["val/contrastive_loss"], "contrastive loss"),
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


def last_evaluation_html(history: Sequence[dict], cfg: dict | None = None) -> str:
    """The last evaluated step's headline values (with the split each is on, :func:`clip_split`) and per-finding
    zero-shot AUCs (bootstrap 95% intervals); ``history`` holds the records as :func:`interval_keys` returns them."""
    if not history:
        return ""
    last: dict = {}
    for record in history:  # the validation loss and zero-shot may run at different steps: latest of each
        last.update(record)
    keys = [k for k in last if k.startswith(_HEADLINE_PREFIXES) and not k.endswith(("_low", "_high"))]
    rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{html.escape(clip_split(k, cfg))}</td>"
                   f"<td>{with_ci(last, k)}</td></tr>" for k in keys)
    parts = [f"<p>Latest values (up to step {max(int(r['step']) for r in history)}).</p>"
             f"<table><tr><th>metric</th><th>split</th><th>value</th></tr>{rows}</table>"]
    findings = sorted(k.split("/", 2)[2] for k in last if k.startswith("zeroshot/auc/"))
    if findings:
        cells = "".join(
            f"<tr><td>{html.escape(f)}</td>"
            f"<td>{with_ci(last, f'zeroshot/auc/{f}')}</td>"
            f"<td>{fmt(last.get(f'zeroshot/n_pos/{f}'))}</td></tr>" for f in findings)
        parts.append(f"<h3>Zero-shot AUC per finding (prompt pairs; split "
                     f"{html.escape(clip_split('zeroshot/', cfg))})</h3><table><tr><th>finding</th>"
                     f"<th>AUC [95% CI]</th><th>positives</th></tr>{cells}</table>")
    return "\n".join(parts)
