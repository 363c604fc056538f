"""Which labels can be scored, and how: the relevance rules of every kind of label.

* **Single-label classes** (binary and multi-class, every MedMNIST subset but ChestMNIST): a hit is
  relevant when its label equals the query's (the study, DESIGN.md §2).
* **Ordinal labels** (RetinaMNIST's diabetic-retinopathy grades 0-4, task ``ordinal-regression``):
  the same exact match -- a hit one grade away is *not* relevant. This is the study's protocol
  (its RetinaMNIST numbers are exact-grade), so ours stay comparable.
* **Unlabelled rows** (label :data:`UNLABELLED` = -1: manifest rows with an empty label, files outside
  class folders): excluded as queries (nothing to compare with) and never relevant as database hits
  (an unlabelled hit is never a match and casts no majority vote), though they stay in the database
  and take their rank. The counts are reported (:class:`cbmir.evaluation.evaluate.Evaluation`).
* **Multi-label data** (ChestMNIST: 14 binary findings per image, task ``multi-label, binary-class``):
  refused. The study's metrics need one class per image, and every multi-label relevance rule (share
  one finding, same set of findings, a Jaccard cut-off) is a different protocol with no published
  reference to check against; cbmir stores such datasets with label -1 and the findings in the payload
  (``findings``), so search works, but evaluation stops with a :class:`CbmirError` naming the dataset.
"""

from __future__ import annotations

from cbmir.core.errors import CbmirError
from cbmir.search.schema import CollectionMeta

#: Label of a row without a class.
UNLABELLED = -1
#: MedMNIST ``INFO[flag]["task"]`` of the multi-label subsets (ChestMNIST).
MULTI_LABEL_TASK_PREFIX = "multi-label"


def label_task(meta: CollectionMeta) -> str:
    """The label task of a collection: ``meta.extra["task"]`` as recorded at ingest (MedMNIST's
    ``INFO[flag]["task"]``, e.g. ``binary-class``, ``multi-class``, ``ordinal-regression``,
    ``multi-label, binary-class``), else for a MedMNIST collection ingested before that was recorded
    (no user-archive fingerprint) the task of its flag, else ``""`` (unknown: single-label assumed)."""
    task = (meta.extra or {}).get("task")
    if isinstance(task, str) and task:
        return task
    if (meta.extra or {}).get("source_fingerprint"):  # a user archive: labels are single classes
        return ""
    from cbmir.ingest.medmnist_data import INFO  # imports medmnist (and torch): only for old collections

    return str(INFO.get(meta.dataset, {}).get("task", ""))


def check_single_label(meta: CollectionMeta, name: str) -> str:
    """Refuse multi-label collections; return the label task (see :func:`label_task`).

    Raises:
        CbmirError: the collection's dataset is multi-label (ChestMNIST); names the dataset and why.
    """
    task = label_task(meta)
    if task.startswith(MULTI_LABEL_TASK_PREFIX):
        raise CbmirError(
            f"collection {name!r}: dataset {meta.dataset!r} is multi-label ({task}: several findings per "
            "image), but the study's metrics (mAP@k, mMV@k, ACC@k) need one class per image, and cbmir "
            "defines no multi-label relevance; its points carry label -1 and the findings in the payload. "
            "Search works (`cbmir search`); to evaluate, use a single-label dataset or a manifest with one "
            "class per row.")
    return task
