"""Display names of the report: the paper's model names, dataset names, row labels and their order.

Rows of random-weight runs are labelled ``RANDOM-INIT``; a registry entry with ``baseline`` (``hog``) is a
"handcrafted baseline" (DESIGN.md §3); names come from the registry's ``display_name`` / ``paper_name``.
Naming a dataset does not import medmnist (and torch) for the study's datasets.
"""

from __future__ import annotations

from cbmir.evaluation.reference import DATASETS_2D, DATASETS_3D

__all__ = ["PAPER_MODEL_ORDER", "is_baseline", "paper_model_name", "dataset_display_name",
           "row_label", "model_order", "dataset_order", "dataset_class_names", "dataset_task", "class_legend_names"]


#: The paper's models in the order of its tables.
PAPER_MODEL_ORDER = ("VGG19", "ResNet50", "DenseNet121", "EfficientNetV2M", "MedCLIP", "BiomedCLIP",
                     "OpenCLIP", "CONCH", "UNI")


def _spec(model: str):
    """The registry entry of ``model`` (None for a name the registry does not know)."""
    from cbmir.core.errors import CbmirError
    from cbmir.ingest.extractors import get_spec

    try:
        return get_spec(str(model))
    except CbmirError:
        return None


def is_baseline(model: str) -> bool:
    """Whether ``model`` is a weights-free baseline (its registry entry's ``baseline``, e.g. ``hog``)."""
    spec = _spec(model)
    return bool(spec is not None and spec.baseline)


def paper_model_name(model: str) -> str | None:
    """The paper's name of cbmir model ``model`` (its entry's ``paper_name``: ``resnet50`` -> ``ResNet50``, or
    the paper's own spelling); None if not in the study."""
    key = str(model).strip().lower()
    spec = _spec(key)
    if spec is not None:
        return spec.paper_name or None
    for name in PAPER_MODEL_ORDER:
        if key == name.lower():
            return name
    return None


#: MedMNIST v2 flags -> display names (medmnist 3.0.2 ``INFO[flag]["python_class"]``), so that naming a
#: dataset does not import medmnist (and torch).
_DATASET_NAMES = {
    **{n.lower(): n for n in ("PathMNIST", "ChestMNIST", "DermaMNIST", "OCTMNIST", "PneumoniaMNIST", "RetinaMNIST",
                              "BreastMNIST", "BloodMNIST", "TissueMNIST", "OrganAMNIST", "OrganCMNIST", "OrganSMNIST",
                              "OrganMNIST3D", "NoduleMNIST3D", "AdrenalMNIST3D", "FractureMNIST3D", "VesselMNIST3D",
                              "SynapseMNIST3D")},
    **{d.lower(): d for d in (*DATASETS_2D, *DATASETS_3D)},
}


def dataset_display_name(flag: str) -> str:
    """Display name of a MedMNIST flag: the paper's spelling, else medmnist's class name
    (``vesselmnist3d`` -> ``VesselMNIST3D``), else the flag."""
    key = str(flag).lower()
    if key in _DATASET_NAMES:
        return _DATASET_NAMES[key]
    try:
        from medmnist import INFO

        return str(INFO[key]["python_class"])
    except Exception:  # noqa: BLE001 - display only
        return str(flag)


def row_label(model: str, random_init: bool = False, family: str | None = None, backend: str | None = None,
              input_size: str | None = None) -> str:
    """Row label of a model: its display name (the paper's for the study's models), ``(handcrafted baseline)``
    after a weights-free baseline (``HOG (handcrafted baseline)``), ``[keras]`` for a non-default backend,
    ``[input 224]`` for a CNN input size other than ``native`` and a ``RANDOM-INIT`` suffix for random weights."""
    spec = _spec(model)
    if (spec is not None and spec.baseline) or family in ("handcrafted", "handcrafted baseline"):
        name = f"{spec.display_name if spec is not None else model} (handcrafted baseline)"
    else:
        name = (spec.display_name if spec is not None else None) or paper_model_name(model) or str(model)
    if backend and backend not in ("torch", "numpy", "nan"):
        name += f" [{backend}]"
    if input_size not in (None, "", "native", "nan"):
        name += f" [input {input_size}]"
    if random_init:
        name += " RANDOM-INIT"
    return name


def model_order(label: str) -> tuple:
    """Sort key of a row label: baselines first, then the paper's models in its order, then the others."""
    base = label.replace(" RANDOM-INIT", "")
    if "(handcrafted baseline)" in base:
        return (0, 0, label)
    for i, name in enumerate(PAPER_MODEL_ORDER):
        if base.startswith(name):
            return (1, i, label)
    return (2, 0, label)


def dataset_order(flag: str) -> tuple:
    """Sort key of a dataset flag: the paper's 2D then 3D datasets in its order, then the others."""
    order = [d.lower() for d in (*DATASETS_2D, *DATASETS_3D)]
    f = str(flag).lower()
    return (order.index(f), f) if f in order else (len(order), f)


def dataset_class_names(dataset: str) -> list[str] | None:
    """MedMNIST class names of ``dataset`` by label index (medmnist ``INFO``); None when unknown."""
    try:
        from medmnist import INFO

        lab = INFO[str(dataset).lower()]["label"]
        return [lab[k] for k in sorted(lab, key=int)]
    except Exception:  # noqa: BLE001 - legend only
        return None


def dataset_task(dataset: str) -> str:
    """MedMNIST label task of ``dataset`` (``binary-class``, ``ordinal-regression`` ...; medmnist ``INFO``);
    ``""`` when unknown."""
    try:
        from medmnist import INFO

        return str(INFO[str(dataset).lower()]["task"])
    except Exception:  # noqa: BLE001 - legend only
        return ""


def class_legend_names(labels, class_names=None, task: str = "") -> list[str]:
    """Legend entry of each label in ``labels``: its class name (``class_names[label]``: the collection metadata's
    ``extra["class_names"]`` or :func:`dataset_class_names`), e.g. ``malignant``. A name that is missing, empty or
    only the label's number (RetinaMNIST's INFO names its grades ``"0"`` ... ``"4"``) becomes ``grade N`` for an
    ordinal task (``task`` containing ``ordinal``) and ``class N`` otherwise; unlabelled (-1) is ``unlabelled``.
    Names are cut to 40 characters.

    Args:
        labels: int labels, in legend order.
        class_names: names by label index, or None.
        task: the label task (``ordinal-regression`` for graded labels).

    Returns:
        One str per label.
    """
    names = list(class_names or [])
    out = []
    for lab in (int(x) for x in labels):
        if lab < 0:
            out.append("unlabelled")
            continue
        name = str(names[lab]).strip() if lab < len(names) else ""
        if not name or name == str(lab):
            name = f"{'grade' if 'ordinal' in str(task) else 'class'} {lab}"
        out.append(name[:40])
    return out
