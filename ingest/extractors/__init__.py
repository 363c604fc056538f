"""Feature extractors: a registry of model entries and the one factory ``create_extractor``.

Each public module of this package registers its entries and builders at import time
(``hog``: handcrafted baseline; ``timm_cnn``: ImageNet CNNs on PyTorch via timm; ``keras_cnn``:
the same CNNs on Keras/TensorFlow; ``foundation``, ``medclip``, ``conch``: foundation models;
``weights``: shared weights-loading helpers; ``availability``: :func:`weights_available`).
See :mod:`cbmir.ingest.extractors.registry`.
"""

from cbmir.ingest.extractors.availability import weights_available
from cbmir.ingest.extractors.registry import (
    check_weights,
    create_extractor,
    get_spec,
    list_specs,
    register,
    register_builder,
    register_weights_check,
)

__all__ = ["check_weights", "create_extractor", "get_spec", "list_specs", "register", "register_builder",
           "register_weights_check", "weights_available"]
