"""Keras / TensorFlow backend of the four ImageNet CNNs, as the study computed them.

``--backend keras`` for ``vgg19``, ``resnet50``, ``densenet121``, ``efficientnetv2m`` (the
entries of :mod:`cbmir.ingest.extractors.timm_cnn`, whose ``options["keras_app"]`` names the
application). Source: ``tf.keras.applications`` (Keras 3, TensorFlow 2.21) and the study's
method (Mahbod et al. 2025, §2.2): ``Application(include_top=False, weights="imagenet",
pooling="avg")`` - the last convolutional block, global average pooled: 512 / 2048 / 1024 /
1280 dims - with each model's own ``preprocess_input``:

* VGG19, ResNet50: ``caffe`` mode - RGB -> BGR, minus the ImageNet mean pixel, on 0-255;
* DenseNet121: ``torch`` mode - /255, ImageNet mean / std;
* EfficientNetV2M: identity (raw 0-255 pixels; the model rescales inside with its own
  ``Rescaling`` layer, ``include_preprocessing=True``).

Input: the image at its own size; sides < 32 px (MedMNIST 28) are upsampled to 32 x 32 with the
same bicubic resize as the torch backend (:func:`cbmir.ingest.transforms.resize_batch`); grayscale
replicated to RGB. The network is built once with ``input_shape=(None, None, 3)`` and serves
every size.

Weights: ``weights=None`` -> Keras' ``imagenet`` weights (``*_notop.h5``), from the Keras cache
(``$KERAS_HOME/models`` or ``~/.keras/models``) or downloaded from
``storage.googleapis.com``; when that host is unreachable and nothing is cached, a
:class:`~cbmir.core.errors.CbmirError` names the model, the file and ``--weights PATH`` (a Keras
``.weights.h5`` file saved with ``model.save_weights``, or the ``*_notop.h5`` file itself),
within ~2 s. ``random_init=True`` -> ``weights=None`` after ``keras.utils.set_random_seed(0)``
(identical random weights in every process).

TensorFlow is optional (``pip install 'cbmir[keras]'``); it is imported lazily, with
``TF_CPP_MIN_LOG_LEVEL=2`` (no INFO / WARNING logs) and ``KERAS_BACKEND=tensorflow`` unless
set, and with at most ``$CBMIR_TF_THREADS`` intra-op threads (default: all cores) and one
inter-op thread.
"""

from __future__ import annotations

import contextlib
import os
import random
import sys
import threading
import urllib.parse
from pathlib import Path

import numpy as np

from cbmir.core.errors import CbmirError

from cbmir.ingest.base import ExtractorSpec, uint8_image_batch
from cbmir.ingest.extractors.registry import register_availability, register_builder, register_weights_check
from cbmir.ingest.extractors.weights import RANDOM_INIT, file_identity, http_reachable, model_identity

MIN_SIDE = 32
KERAS_WEIGHTS_HOST = "https://storage.googleapis.com/tensorflow/keras-applications/"

# keras_app -> (module under keras.applications, constructor, notop weights file, preprocessing)
KERAS_APPS: dict[str, tuple[str, str, str, str]] = {
    "VGG19": ("vgg19", "VGG19", "vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5",
              "keras.applications.vgg19.preprocess_input (caffe: RGB->BGR, minus ImageNet mean pixel)"),
    "ResNet50": ("resnet50", "ResNet50", "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5",
                 "keras.applications.resnet50.preprocess_input (caffe: RGB->BGR, minus ImageNet mean pixel)"),
    "DenseNet121": ("densenet", "DenseNet121", "densenet121_weights_tf_dim_ordering_tf_kernels_notop.h5",
                    "keras.applications.densenet.preprocess_input (torch: /255, ImageNet mean/std)"),
    "EfficientNetV2M": ("efficientnet_v2", "EfficientNetV2M", "efficientnetv2-m_notop.h5",
                        "keras.applications.efficientnet_v2.preprocess_input (identity: raw 0-255; "
                        "the model's Rescaling layer maps to [-1, 1])"),
}

_TF_LOCK = threading.Lock()
_TF_READY = False


def import_tf():
    """``(tensorflow, keras)``, imported once, quietly, with bounded CPU threads.

    Raises:
        CbmirError: TensorFlow is not installed (says how to install it).
    """
    global _TF_READY
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    # torchvision (and the triton it pulls in) must be imported before TensorFlow: the other order
    # segfaults with torch 2.14 + TF 2.21 in one process.
    import torchvision.ops  # noqa: F401

    try:
        with _quiet_stderr():  # XLA / CUDA-stub lines printed before absl logging is set up
            import tensorflow as tf
            import keras

            tf.config.list_physical_devices()
    except ImportError as exc:
        raise CbmirError(
            f"the keras backend needs TensorFlow, which is not installed ({exc}). Install it with "
            f"pip install 'cbmir[keras]' (tensorflow==2.21.0), or use --backend torch."
        ) from exc
    with _TF_LOCK:
        if not _TF_READY:
            try:
                threads = int(os.environ.get("CBMIR_TF_THREADS", "0"))
                if threads > 0:
                    tf.config.threading.set_intra_op_parallelism_threads(threads)
                tf.config.threading.set_inter_op_parallelism_threads(1)
            except RuntimeError:  # TF runtime already initialised by someone else
                pass
            try:
                tf.get_logger().setLevel("ERROR")
            except Exception:  # noqa: BLE001 - logging only
                pass
            _TF_READY = True
    return tf, keras


@contextlib.contextmanager
def _quiet_stderr():
    """Silence file descriptor 2 (C++ log lines TensorFlow prints at import and device setup,
    which ``TF_CPP_MIN_LOG_LEVEL`` does not reach); ``CBMIR_TF_VERBOSE=1`` keeps them."""
    if os.environ.get("CBMIR_TF_VERBOSE") or _TF_READY:
        yield
        return
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no real fd 2 (embedded interpreters)
        yield
        return
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def keras_cache_file(keras_app: str) -> Path:
    """Where Keras caches the ``imagenet`` notop weights of ``keras_app`` (may not exist):
    ``$KERAS_HOME/models/<file>`` (default ``~/.keras``; ``/tmp/.keras`` when that is not
    writable, as Keras does)."""
    home = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    if os.path.isdir(home) and not os.access(home, os.W_OK):
        home = os.path.join("/tmp", ".keras")
    return Path(home) / "models" / KERAS_APPS[keras_app][2]


def check_keras_weights(spec: ExtractorSpec, *, weights=None, **_ignored) -> None:
    """Weights check of builder ``imagenet_cnn`` on keras (no TensorFlow import): the
    ``--weights`` file exists, or Keras' ``imagenet`` notop file is in the Keras cache, or its
    download host answers (:func:`~cbmir.ingest.extractors.weights.http_reachable`, ~2 s at most).

    Raises:
        CbmirError: no Keras application for ``spec``, no such ``--weights`` file, or the
            ImageNet weights neither cached nor downloadable (names the model, the file and
            ``--weights PATH``).
    """
    app = spec.options.get("keras_app")
    if app not in KERAS_APPS:
        raise CbmirError(f"model {spec.name!r} has no Keras application")
    weights_file = KERAS_APPS[app][2]
    if weights is not None:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise CbmirError(f"--weights {path} for model {spec.name!r} (keras backend): no such file; "
                             f"expected a Keras weights file (.weights.h5 or {weights_file})")
        return
    cached = keras_cache_file(app)
    if not cached.is_file() and not http_reachable(KERAS_WEIGHTS_HOST):
        raise CbmirError(
            f"no pretrained weights for model {spec.name!r} (keras backend): Keras' ImageNet "
            f"weights {weights_file} are not in the Keras cache ({cached.parent}) and "
            f"{urllib.parse.urlsplit(KERAS_WEIGHTS_HOST).hostname} is not reachable from here. "
            f"Fix: pass a local Keras weights file with --weights PATH ({weights_file} or a "
            f".weights.h5 saved with model.save_weights), copy {weights_file} into "
            f"{cached.parent}, or run once with network access. For smoke tests only: --random-init."
        )


class KerasCNNExtractor:
    """Keras application (``include_top=False, pooling='avg'``) features (an ``Extractor``).

    Args:
        spec: registry entry with ``options["keras_app"]`` (``VGG19`` ...).
        weights: local Keras weights file (``.weights.h5`` / ``.h5``) or None (``imagenet``).
        random_init: seeded random weights (tests / smoke runs only).
        device: ``auto`` (TensorFlow's default placement), ``cpu``, ``cuda`` / ``cuda:N`` (GPU N).
        batch_size: images per forward pass.
        input_size: None (``native``: own size, sides < 32 px upsampled to 32) or a side ``N``: every
            image resized to ``N x N`` (bicubic) before ``preprocess_input`` (:mod:`cbmir.core.input_size`).

    Raises:
        CbmirError: TensorFlow missing; weights file missing / unreadable / not fitting;
            ``imagenet`` weights not cached and the download host unreachable, or the
            download failed.
    """

    def __init__(self, spec: ExtractorSpec, *, weights=None, random_init=False, device="auto",
                 batch_size=64, input_size: int | None = None) -> None:
        self.input_size = None if input_size is None else int(input_size)
        self.min_side = MIN_SIDE if self.input_size is None else 1  # volumes: 28 -> 32^3 only for native
        app = spec.options.get("keras_app")
        if app not in KERAS_APPS:
            raise CbmirError(f"model {spec.name!r} has no Keras application")
        module, ctor, weights_file, self._pre_desc = KERAS_APPS[app]
        self.spec = spec
        self.app = app
        self.batch_size = int(batch_size)
        self.device_name = _tf_device(device)
        keras_weights: str | None = None
        if weights is not None:
            check_keras_weights(spec, weights=weights)
            self.weights_id = file_identity(Path(weights).expanduser())
        elif random_init:
            self.weights_id = RANDOM_INIT
        else:
            check_keras_weights(spec)
            keras_weights = "imagenet"
            self.weights_id = f"keras-applications:imagenet:{weights_file}"

        tf, keras = import_tf()
        self._tf = tf
        constructor = getattr(getattr(keras.applications, module), ctor)
        self._preprocess_input = getattr(keras.applications, module).preprocess_input
        kwargs = dict(include_top=False, pooling="avg", input_shape=(None, None, 3))
        with tf.device(self.device_name) if self.device_name else _null():
            if random_init:
                state = (random.getstate(), np.random.get_state())
                keras.utils.set_random_seed(0)
                try:
                    self.model = constructor(weights=None, **kwargs)
                finally:
                    random.setstate(state[0])
                    np.random.set_state(state[1])
            elif weights is not None:
                self.model = constructor(weights=None, **kwargs)
                try:
                    self.model.load_weights(str(Path(weights).expanduser()))
                except Exception as exc:  # noqa: BLE001 - h5py / keras raise many kinds
                    raise CbmirError(
                        f"cannot load --weights {weights} into Keras {ctor}(include_top=False) for "
                        f"model {spec.name!r}: {type(exc).__name__}: {str(exc)[:300]}"
                    ) from exc
            else:
                try:
                    self.model = constructor(weights=keras_weights, **kwargs)
                except Exception as exc:  # noqa: BLE001 - download / hash errors
                    raise CbmirError(
                        f"could not obtain Keras ImageNet weights {weights_file} for model "
                        f"{spec.name!r} ({type(exc).__name__}: {str(exc)[:200]}). Fix: pass a local "
                        f"weights file with --weights PATH, or copy {weights_file} into "
                        f"{keras_cache_file(app).parent}."
                    ) from exc
        self._fn = None
        out_dim = int(self.model.output_shape[-1])
        if out_dim != spec.dim:  # pragma: no cover - guards a Keras API change
            raise CbmirError(f"Keras {ctor} gives {out_dim} dims, expected {spec.dim}")

    def dim_for(self, size: int) -> int:
        """Embedding dim for ``size`` px input: ``spec.dim`` at every size (global pooling)."""
        return int(self.spec.dim)

    def preprocess(self, images: np.ndarray) -> np.ndarray:
        """uint8 ``(B, H, W, 1|3)`` -> float32 ``(B, H', W', 3)`` model input: gray -> RGB, sides
        < 32 upsampled to 32 (bicubic; or every image to ``input_size``), then the application's
        ``preprocess_input``."""
        from cbmir.ingest.transforms import resize_batch, to_rgb

        x = np.array(to_rgb(np.asarray(images)), dtype=np.float32)  # fresh copy: preprocess_input
        h, w = x.shape[1:3]                                          # works in place
        n = self.input_size
        target = (n, n) if n is not None else (max(h, MIN_SIDE), max(w, MIN_SIDE))
        if target != (h, w):  # as the torch backend: float bicubic, clipped to 0..255
            x = np.clip(resize_batch(x, target, "bicubic"), 0.0, 255.0)
        return np.asarray(self._preprocess_input(x), dtype=np.float32)

    def extract(self, images: np.ndarray) -> np.ndarray:
        """Embed a batch: uint8 ``(B, H, W, 3)`` (or 1-channel) -> float32 ``(B, spec.dim)``.

        Raises:
            ValueError: not a uint8 ``(B, H, W, 1|3)`` batch.
        """
        images = uint8_image_batch(images, self.spec.name)
        out = np.empty((len(images), self.spec.dim), dtype=np.float32)
        with self._tf.device(self.device_name) if self.device_name else _null():
            for lo in range(0, len(images), self.batch_size):
                x = self.preprocess(images[lo: lo + self.batch_size])
                # full batches (the bulk of an ingest): one graph traced once for every input
                # shape; a smaller remainder runs eagerly (tracing costs more than it saves)
                fn = self._graph() if len(x) == self.batch_size else self._eager
                out[lo: lo + len(x)] = np.asarray(fn(self._tf.constant(x)), dtype=np.float32)
        return out

    def _eager(self, x):
        return self.model(x, training=False).numpy()

    def _graph(self):
        """``model(x, training=False)`` as a ``tf.function`` with a fully dynamic input signature
        (batch, height, width), traced once (Keras' ``predict_on_batch`` retraces per shape)."""
        if self._fn is None:
            tf = self._tf
            model = self.model
            self._fn = tf.function(lambda x: model(x, training=False),
                                   input_signature=[tf.TensorSpec((None, None, None, 3), tf.float32)])
        fn = self._fn
        return lambda x: fn(x).numpy()

    def identity(self, size: int | None = None) -> dict:
        """Identity recorded in collection metadata; ``backend`` is ``keras``."""
        return {
            **model_identity(self.spec, backend="keras", weights_id=self.weights_id,
                             architecture=f"keras.applications.{self.app}(include_top=False, pooling='avg')"),
            "preprocessing": (f"own size; sides < {MIN_SIDE} px upsampled to {MIN_SIDE} (bicubic); "
                              f"gray -> RGB; {self._pre_desc}; last conv block + global average pooling"
                              + (f"; --input-size {self.input_size}: every image resized to {self.input_size}x"
                                 f"{self.input_size} bicubic" if self.input_size is not None else "")),
            "input_size": self.input_size,
        }


class _null:  # noqa: N801 - a no-op context manager, named like contextlib.nullcontext
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _tf_device(device: str | None) -> str | None:
    """TensorFlow device string for cbmir's ``device`` (None: TensorFlow's default placement).

    Raises:
        CbmirError: unknown device string.
    """
    if device in (None, "auto"):
        return None
    if device == "cpu":
        return "/CPU:0"
    if device == "cuda":
        return "/GPU:0"
    if isinstance(device, str) and device.startswith("cuda:") and device[5:].isdigit():
        return f"/GPU:{device[5:]}"
    raise CbmirError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N")


def build_keras_cnn(spec: ExtractorSpec, *, weights=None, random_init=False, device="auto",
                    batch_size=64, input_size=None, **_ignored) -> KerasCNNExtractor:
    """Builder ``imagenet_cnn`` for the keras backend (see :class:`KerasCNNExtractor`)."""
    return KerasCNNExtractor(spec, weights=weights, random_init=random_init, device=device,
                             batch_size=batch_size, input_size=input_size)


def keras_weights_cached(spec: ExtractorSpec) -> bool:
    """Whether the entry's Keras application weights (``*_notop.h5``) are in the Keras cache."""
    app = spec.options.get("keras_app")
    return app in KERAS_APPS and keras_cache_file(app).is_file()


register_builder("imagenet_cnn", build_keras_cnn, backend="keras")
register_weights_check("imagenet_cnn", check_keras_weights, backend="keras")
register_availability("imagenet_cnn", keras_weights_cached, backend="keras")
