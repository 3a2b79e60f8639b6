"""What a comparison (``RUN/eval/comparison.json``) records about the labelled set it ran on, for the report.

``medfoundry eval --compare-random`` and the demo add :func:`comparison_context` to each label's entry, so the
report (:mod:`medfoundry.eval.report`) can show, without re-reading the data: the split each metric is on and its
size, the majority-class baseline under the same metric names (:mod:`medfoundry.eval.majority`) and the split
warnings (:mod:`medfoundry.eval.split_warnings`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

from medfoundry.eval.majority import labelled_set_baseline, majority_metrics
from medfoundry.eval.split_warnings import labelled_set_warnings


def comparison_context(lset: Any, keys: Iterable[str], query_split: str = "test",
                       val_needed_by: Sequence[str] = ()) -> dict[str, Any]:
    """``{"query_split", "split_sizes", "majority": baseline, "majority_class": {key: value},
    "warnings": [{"rule", "split", "message"}]}`` for a labelled set ``lset`` evaluated with metrics ``keys``
    (kNN queries on ``query_split``); ``val_needed_by`` as in
    :func:`~medfoundry.eval.split_warnings.check_splits`."""
    baseline = labelled_set_baseline(lset)
    return {
        "query_split": query_split,
        "split_sizes": dict(Counter(str(s) for s in lset.splits)),
        "majority": baseline,
        "majority_class": majority_metrics(baseline, keys, query_split),
        "warnings": [w.as_dict() for w in labelled_set_warnings(lset, val_needed_by=val_needed_by)],
    }
