"""The input-size policy of the ImageNet CNNs: ``native`` (the study's) or a fixed side ``N``.

* ``native`` (the study's rule, DESIGN.md §1): each image at its own size; sides under 32 px
  (MedMNIST 28) upsampled to 32 px; 3D volumes of side 28 resized to 32^3 before slicing.
* ``N`` (e.g. 224, the side ImageNet weights were trained at): every image, or every slice of a
  volume, resized to ``N x N`` (bicubic) inside the extractor; volumes keep their own ``s`` slices.

In code the policy is an ``int | None``: ``None`` is ``native``. Collections built at a fixed side are
named with an ``_in<N>`` suffix (:func:`input_size_suffix`), so they never share a collection with the
native one.
"""

from __future__ import annotations

from cbmir.core.errors import CbmirError

NATIVE = "native"
#: Largest accepted side (a 2,048 px input of a CNN is already ~80x the study's 224 px compute).
MAX_INPUT_SIZE = 2048


def parse_input_size(value, *, option: str = "--input-size") -> int | None:
    """``native`` / None / ``""`` -> None; ``"224"`` / ``224`` -> 224.

    Args:
        value: what the user gave (CLI text, grid-file value).
        option: the option named in the error message.

    Raises:
        CbmirError: neither ``native`` nor an integer in 1..:data:`MAX_INPUT_SIZE`.
    """
    if value is None:
        return None
    text = str(value).strip().lower()
    if text in ("", NATIVE):
        return None
    n = int(text) if text.isdigit() and not isinstance(value, bool) else 0
    if not 1 <= n <= MAX_INPUT_SIZE:
        raise CbmirError(f"{option} {value!r}: give `native` (the study's policy: each image at its own size, "
                         f"28 -> 32 px) or a side in pixels between 1 and {MAX_INPUT_SIZE}, e.g. 224")
    return n


def input_size_label(input_size: int | None) -> str:
    """``native`` for None, else the side as text (``"224"``): the results table's value."""
    return NATIVE if input_size is None else str(int(input_size))


def input_size_suffix(input_size: int | None) -> str:
    """Collection-name suffix: ``""`` for native, ``in224`` for 224."""
    return "" if input_size is None else f"in{int(input_size)}"
