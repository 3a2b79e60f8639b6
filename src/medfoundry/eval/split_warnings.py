"""Rules that flag an evaluation split whose numbers cannot be read at face value.

An evaluation can run and still mean nothing: a test split holding one class prints accuracy 1 (or 0) and an
undefined AUC (``nan``); a split of three patients gives bootstrap intervals over images that hide the
patient-to-patient spread; a labelled set without a val split cannot choose the best checkpoint. These rules are
checked by ``medfoundry eval`` (stderr, the ``--json`` output and ``comparison.json``), the demo and the run
report (a warning box), so every place says the same thing:

* ``single_class``: a split holds images of one class only;
* ``few_patients``: patient ids are known and a split holds fewer than ``min_patients`` (10) patients;
* ``missing_val``: there is no val split while something needs one (``val_needed_by``: best-checkpoint selection,
  the linear probe's choice of C, the report's validation curves);
* ``single_class_label``: in a multi-label set, a label is 0 (or 1) on every image of a split
  (:func:`check_label_splits`; the ``multilabel`` probe reports ``nan`` for what that makes undefined).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from medfoundry.eval.labelled_set import SPLITS

#: Fewer patients than this in a split draws a ``few_patients`` warning.
MIN_PATIENTS = 10

_SINGLE_CLASS_EFFECT = {
    "train": "the kNN memory bank and the linear probe see one class, so every prediction is that class",
    "val": "val metrics (and a best checkpoint chosen on them) are meaningless and the linear probe chooses C on "
           "20 % of train instead",
    "test": "accuracy only says how often that class is predicted (always answering it scores 1.0) and AUC is "
            "undefined (reported as nan)",
}


@dataclass(frozen=True)
class SplitWarning:
    """One warning: the rule that fired, the split it is about (``""`` for the whole set) and the sentence."""

    rule: str
    split: str
    message: str

    def as_dict(self) -> dict[str, str]:
        """The warning as a JSON-ready dict (``rule``, ``split``, ``message``)."""
        return asdict(self)


def check_splits(labels: Sequence[str], splits: Sequence[str], patients: Sequence[str] | None = None, *,
                 val_needed_by: Sequence[str] = (), min_patients: int = MIN_PATIENTS) -> list[SplitWarning]:
    """The warnings for images with class names ``labels``, split names ``splits`` and (optionally) patient ids
    ``patients`` (``""`` = unknown; the patient rule runs only on a split where some ids are known).

    ``val_needed_by`` names what needs a val split (e.g. ``"best-checkpoint selection
    (eval.best_metric=val_knn_top1_k20)"``); without one nothing is said about a missing val split.
    """
    if len(labels) != len(splits) or (patients is not None and len(patients) != len(labels)):
        raise ValueError("labels, splits and patients must have one entry per image")
    out: list[SplitWarning] = []
    present = [s for s in SPLITS if s in set(splits)]
    for split in present:
        idx = [i for i, s in enumerate(splits) if s == split]
        counts = Counter(labels[i] for i in idx)
        if len(counts) == 1:
            (name, n), = counts.items()
            out.append(SplitWarning("single_class", split, f"the {split} split holds a single class ('{name}', "
                                                           f"{n} images): {_SINGLE_CLASS_EFFECT[split]}"))
        if patients is not None:
            known = {patients[i] for i in idx if patients[i]}
            if known and len(known) < min_patients:
                out.append(SplitWarning(
                    "few_patients", split,
                    f"the {split} split holds images of {len(known)} patient(s) (fewer than {min_patients}): its "
                    "bootstrap intervals resample images, not patients, so they understate the spread between "
                    "patients; read its numbers as anecdotal"))
    if "val" not in present and val_needed_by:
        out.append(SplitWarning("missing_val", "val", "there is no val split, but " + " and ".join(val_needed_by)
                                + (" needs" if len(val_needed_by) == 1 else " need") + " one; add a split column "
                                "with val rows (or drop it so that eval.split_fractions draws one)"))
    return out


_SINGLE_LABEL_EFFECT = {
    "train": "the multi-label probe cannot fit it, so its AUC is nan",
    "val": "it takes no part in the multi-label probe's choice of C",
    "test": "its test AUC is undefined (reported as nan) and the mean AUC averages the other labels",
}


def check_label_splits(targets: Any, splits: Sequence[str], names: Sequence[str]) -> list[SplitWarning]:
    """The ``single_class_label`` warnings of a multi-label set: per split, the labels (columns of the ``(N, L)``
    0/1 ``targets``, called ``names``) that have one value on every image of that split."""
    import numpy as np

    y = np.asarray(targets).reshape(len(splits), -1)
    split_arr = np.asarray(splits)
    if y.shape[1] != len(names):
        raise ValueError(f"{y.shape[1]} label columns but {len(names)} label names")
    out: list[SplitWarning] = []
    for split in [s for s in SPLITS if s in set(splits)]:
        rows = y[split_arr == split]
        constant = [(str(names[j]), int(rows[0, j])) for j in range(y.shape[1]) if np.unique(rows[:, j]).size < 2]
        if constant:
            what = ", ".join(f"'{n}' (always {v})" for n, v in constant)
            out.append(SplitWarning("single_class_label", split,
                                    f"in the {split} split ({len(rows)} images) label(s) {what} take a single value: "
                                    f"{_SINGLE_LABEL_EFFECT[split]}"))
    return out


def labelled_set_warnings(lset: Any, *, val_needed_by: Sequence[str] = (),
                          min_patients: int = MIN_PATIENTS) -> list[SplitWarning]:
    """:func:`check_splits` on a :class:`~medfoundry.eval.labelled_set.LabelledSet`'s items, plus
    :func:`check_label_splits` when the set is multi-label."""
    items = lset.items
    out = check_splits([it.label for it in items], [it.split for it in items], [it.patient for it in items],
                       val_needed_by=val_needed_by, min_patients=min_patients)
    targets = getattr(lset, "targets", None)
    if targets is not None:
        out += check_label_splits(targets, [it.split for it in items], lset.target_names)
    return out


def val_needs(tasks: Sequence[str] = (), best_metric: str = "") -> list[str]:
    """What needs a val split among ``tasks`` (the linear and multi-label probes choose C there) and ``best_metric`` (a
    ``val_*`` metric selects ``best.pt``), as phrases for the ``missing_val`` warning."""
    out = []
    if best_metric:
        out.append(f"best-checkpoint selection (eval.best_metric={best_metric})")
    if "linear" in tasks:
        out.append("the linear probe's choice of C (without val it is chosen on 20 % of train)")
    if "multilabel" in tasks:
        out.append("the multi-label probe's choice of C (without val it is chosen on 20 % of train)")
    return out
