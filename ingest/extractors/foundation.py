"""Foundation-model feature extractors (PyTorch): BiomedCLIP, OpenCLIP ViT-g-14, UNI, and the
newer DINOv2 ViT-L/14 and UNI2-h. MedCLIP and CONCH have their own modules
(:mod:`cbmir.ingest.extractors.medclip`, :mod:`cbmir.ingest.extractors.conch`) built on the pieces here.

Every model is one :class:`~cbmir.ingest.base.ExtractorSpec` entry (builder ``foundation``). Its
``options`` hold the data that make it paper-faithful:

* ``arch`` - how to build the image tower (a key of :data:`ARCHS`): ``timm_vit`` (a timm ViT
  whose ``forward`` gives the embedding) or ``open_clip_visual`` (an open_clip vision tower,
  i.e. ``CLIP.encode_image`` without the text tower);
* ``preprocess`` - the model's own published eval transform (:class:`ImagePreprocess`);
* ``hub_id`` / ``hub_files`` / ``key_prefix`` - where the pretrained weights are and which
  checkpoint keys belong to the image tower;
* ``access`` - the licence / access step printed when weights cannot be obtained;
* ``embedding`` - what the vector is (recorded in the collection identity).

Only the image towers are built, so nothing needs the text towers' Hugging Face tokenizers or
configs, and every architecture can be built offline with random weights (tests, smoke runs).

Weights: ``weights=None`` -> the hub (``HF_TOKEN`` is used for gated repos; files come from the
local HF cache when the hub is unreachable); ``weights=PATH`` -> a local state-dict file
(``.safetensors``, ``.bin``, ``.pth``, ``.pt``) or a directory holding one of ``hub_files``,
with either the original checkpoint's key names or the tower's own (a state dict saved from a
cbmir extractor's ``model``). Any failure is one :class:`~cbmir.core.errors.CbmirError` naming the
model, the access step and ``--weights``, raised before the model is built (seconds).

Speed: ``torch.inference_mode``, bf16 autocast on CUDA (fp16 where bf16 is unsupported), fp32
on CPU, ``batch_size`` images per forward pass; the geometric preprocessing (PIL, exactly the
library calls of the published torchvision / open_clip transforms) runs in a thread pool.
"""

from __future__ import annotations

import dataclasses
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Mapping

import numpy as np

from cbmir.core.errors import CbmirError

from cbmir.ingest.base import ExtractorSpec, PreprocessCfg, uint8_image_batch
from cbmir.ingest.extractors.precision import autocast, autocast_dtype, precision_label
from cbmir.ingest.extractors.registry import register, register_builder, register_weights_check
from cbmir.ingest.extractors.weights import (
    RANDOM_INIT,
    SEED,  # noqa: F401 - re-exported (documented here before it moved to weights)
    check_state_dict,
    file_identity,
    hub_identity,
    hub_endpoint,
    hub_offline_requested,
    hub_reachable,
    load_state_dict_file,
    model_identity,
    seeded,
    set_hub_offline,
)

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()


# ============================================================================ preprocessing
@dataclass(frozen=True)
class ImagePreprocess:
    """A model's published eval transform, applied to a batch of uint8 images.

    Two recipes (``pad_square``):

    * ``False`` - torchvision / open_clip eval: ``Resize(size)`` (shorter side to ``size``,
      longer side ``int(size * long / short)``, PIL with ``interpolation``), then
      ``CenterCrop(crop)`` when ``crop`` is set, ``ToTensor`` (/255), ``Normalize(mean, std)``.
    * ``True`` - MedCLIP's ``MedCLIPFeatureExtractor``: convert to 8-bit gray (PIL ``L``), paste
      centred on a black square canvas of side ``max(size, H, W)`` (so images smaller than
      ``size`` are padded, not enlarged), resize the canvas to ``size x size`` (PIL,
      ``interpolation``), centre-crop ``crop``, /255, ``(x - mean) / std`` with one gray
      mean/std, replicated to 3 channels (MedCLIP's vision model does the replication).

    The resize runs on PIL images, as the published transforms do (uint8 output rounded and
    clipped by PIL after each separable pass), so features match the official pipelines.

    Attributes:
        size: resize target in pixels.
        crop: centre-crop side in pixels, or None (no crop).
        interpolation: ``bicubic`` or ``bilinear``.
        mean, std: per-channel normalisation on the [0, 1] scale (1 value for gray input).
        pad_square: MedCLIP recipe (see above).
        source: where the recipe is published.
    """

    size: int
    crop: int | None
    interpolation: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    pad_square: bool = False
    source: str = ""

    @property
    def out_side(self) -> int:
        """Side of the model input in pixels."""
        return int(self.crop or self.size)

    @property
    def channels(self) -> int:
        """Channels after the geometric step: 1 (gray) for the MedCLIP recipe, else 3."""
        return 1 if self.pad_square else 3

    def describe(self) -> str:
        """One-line description recorded in the collection identity."""
        if self.pad_square:
            geo = (f"gray (PIL L); pad centred to a black square of side max({self.size}, H, W); "
                   f"resize to {self.size}x{self.size} ({self.interpolation}, PIL)")
        else:
            geo = f"resize shorter side to {self.size} ({self.interpolation}, PIL)"
        if self.crop:
            geo += f"; center crop {self.crop}"
        return (f"{geo}; /255; mean={list(self.mean)} std={list(self.std)}"
                + (" -> 3 channels" if self.pad_square else "")
                + (f" [{self.source}]" if self.source else ""))

    # ------------------------------------------------------------------ geometric (PIL)
    def _resample(self):
        from PIL import Image

        try:
            return {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR}[self.interpolation]
        except KeyError:
            raise ValueError(f"unknown interpolation {self.interpolation!r}") from None

    def geometric_one(self, image: np.ndarray) -> np.ndarray:
        """Resize / pad / crop one uint8 ``(H, W, 3)`` (or ``(H, W)``) image.

        Returns:
            uint8 ``(S, S, 3)`` (``(S, S, 1)`` for the MedCLIP recipe), S = :attr:`out_side`.
        """
        from PIL import Image

        img = np.asarray(image)
        if img.ndim == 3 and img.shape[-1] == 1:
            img = img[..., 0]
        im = Image.fromarray(np.ascontiguousarray(img))
        if self.pad_square:
            w, h = im.size
            side = max(self.size, w, h)
            canvas = Image.new("L", (side, side), 0)
            canvas.paste(im, (int((side - w) / 2), int((side - h) / 2)))  # converts RGB -> L
            im = canvas
            if im.size != (self.size, self.size):
                im = im.resize((self.size, self.size), self._resample())
        else:
            if im.mode != "RGB":
                im = im.convert("RGB")
            w, h = im.size
            short, long = (w, h) if w <= h else (h, w)
            new_short, new_long = self.size, int(self.size * long / short)
            new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
            if (new_w, new_h) != (w, h):
                im = im.resize((new_w, new_h), self._resample())
        if self.crop:
            im = _center_crop(im, self.crop)
        out = np.array(im, dtype=np.uint8)  # a writable copy
        return out[..., None] if out.ndim == 2 else out

    def geometric(self, images: np.ndarray) -> np.ndarray:
        """:meth:`geometric_one` over a batch (thread pool: PIL releases the GIL).

        Args:
            images: uint8 ``(B, H, W, 3)`` / ``(B, H, W, 1)`` / ``(B, H, W)``.

        Returns:
            uint8 ``(B, S, S, C)``, C = :attr:`channels`.
        """
        images = np.asarray(images)
        if len(images) == 0:
            return np.zeros((0, self.out_side, self.out_side, self.channels), np.uint8)
        if len(images) == 1:
            return self.geometric_one(images[0])[None]
        return np.stack(list(_pool().map(self.geometric_one, images)))

    def __call__(self, images: np.ndarray, device=None):
        """Full transform: uint8 ``(B, H, W, 3)`` -> float32 torch ``(B, 3, S, S)`` on ``device``."""
        import torch

        x = torch.from_numpy(self.geometric(images)).to(device)
        x = x.float().div_(255.0)
        mean = torch.tensor(self.mean, dtype=torch.float32, device=x.device)
        std = torch.tensor(self.std, dtype=torch.float32, device=x.device)
        x = (x - mean) / std
        x = x.permute(0, 3, 1, 2)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        return x.contiguous()


def _center_crop(im, crop: int):
    """torchvision ``CenterCrop(crop)`` on a PIL image (zero padding when it is smaller)."""
    from PIL import Image

    w, h = im.size
    if w < crop or h < crop:  # torchvision pads symmetrically with zeros first
        pw, ph = max(crop - w, 0), max(crop - h, 0)
        padded = Image.new(im.mode, (w + pw, h + ph), 0)
        padded.paste(im, (pw // 2, ph // 2))
        im, (w, h) = padded, padded.size
    top = int(round((h - crop) / 2.0))
    left = int(round((w - crop) / 2.0))
    return im.crop((left, top, left + crop, top + crop))


def _pool() -> ThreadPoolExecutor:
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            n = int(os.environ.get("CBMIR_PREPROCESS_THREADS", "0")) or min(8, os.cpu_count() or 1)
            _POOL = ThreadPoolExecutor(max_workers=n, thread_name_prefix="cbmir-preprocess")
        return _POOL


def preprocess_of(spec: ExtractorSpec) -> ImagePreprocess:
    """The :class:`ImagePreprocess` of a registry entry (``spec.options["preprocess"]``)."""
    p = dict(spec.options["preprocess"])
    p["mean"], p["std"] = tuple(p["mean"]), tuple(p["std"])
    return ImagePreprocess(**p)


# ============================================================================ weights
def weights_error(spec: ExtractorSpec, reason: str) -> CbmirError:
    """The one error raised when ``spec``'s pretrained weights cannot be obtained.

    Names the model, the reason, the licence / access step (``options["access"]``), the
    ``--weights`` alternative and ``--random-init`` for smoke tests.
    """
    access = spec.options.get("access", "")
    files = " / ".join(spec.options.get("hub_files", ())) or "a state-dict file"
    return CbmirError(
        f"no pretrained weights for model {spec.name!r} ({spec.weights_source}): {reason}. "
        + (f"{access} " if access else "")
        + f"Alternative: pass a local copy with --weights PATH (a file or a directory holding "
        f"{files}; weights=PATH in Python). For smoke tests only: --random-init."
    )


def _status(exc: BaseException) -> int | None:
    resp = getattr(exc, "response", None)
    return getattr(resp, "status_code", None)


def fetch_pretrained(spec: ExtractorSpec) -> tuple[Path, str]:
    """Local path of ``spec``'s pretrained checkpoint (downloaded when the hub is reachable,
    else from the local HF cache) and its identity ``hf-hub:<repo>@<revision>``.

    ``HF_TOKEN`` (or a ``huggingface-cli login`` token) is used for gated repositories.

    Raises:
        CbmirError: (from :func:`weights_error`) hub unreachable and nothing cached, access
            denied (gated repo: 401/403), or no candidate file in the repo. Offline it is raised
            within ~3 s (an HTTP probe of the hub, :func:`~cbmir.ingest.extractors.weights.hub_reachable`,
            then ``huggingface_hub`` offline mode: no retries).
    """
    from huggingface_hub import hf_hub_download

    hub_id = spec.options["hub_id"]
    files = tuple(spec.options.get("hub_files", ("model.safetensors", "pytorch_model.bin")))
    online = hub_reachable()
    if not online and not hub_offline_requested():
        set_hub_offline()
    denied, other = None, []
    for name in files:
        try:
            path = Path(hf_hub_download(hub_id, name, local_files_only=not online))
            return path, hub_identity(hub_id, path)
        except Exception as exc:  # noqa: BLE001 - huggingface_hub raises many kinds
            kind = type(exc).__name__
            if kind in ("GatedRepoError", "RepositoryNotFoundError") or _status(exc) in (401, 403):
                denied = exc
                break
            other.append(f"{name}: {kind}")
    if denied is not None:
        token = "HF_TOKEN is set" if os.environ.get("HF_TOKEN") else "HF_TOKEN is not set"
        reason = (f"access to {hub_endpoint()}/{hub_id} was denied "
                  f"({type(denied).__name__}, HTTP {_status(denied) or '401/403'}; {token})")
    elif not online:
        reason = (f"the Hugging Face hub ({hub_endpoint()}) is not reachable from here and the "
                  f"files are not in the local HF cache ({', '.join(other)})")
    else:
        reason = f"none of {', '.join(files)} could be downloaded ({', '.join(other)})"
    raise weights_error(spec, reason)


def resolve_weights_path(spec: ExtractorSpec, weights: str | os.PathLike) -> Path:
    """The checkpoint file for ``--weights PATH``: PATH itself, or the first of
    ``options["hub_files"]`` (then any ``*.safetensors`` / ``*.bin`` / ``*.pth`` / ``*.pt``)
    found in directory PATH.

    Raises:
        CbmirError: PATH missing, or a directory without a checkpoint file.
    """
    p = Path(weights).expanduser()
    if p.is_file():
        return p
    if p.is_dir():
        for name in spec.options.get("hub_files", ()):
            if (p / name).is_file():
                return p / name
        found = sorted(q for ext in ("safetensors", "bin", "pth", "pt") for q in p.glob(f"*.{ext}"))
        if len(found) == 1:
            return found[0]
        raise CbmirError(
            f"--weights {p} for model {spec.name!r}: the directory holds "
            f"{'no' if not found else 'several'} checkpoint files; expected one of "
            f"{', '.join(spec.options.get('hub_files', ())) or '*.safetensors / *.bin'}"
        )
    raise CbmirError(f"--weights {p} for model {spec.name!r}: no such file or directory")


def select_keys(sd: Mapping, prefix: str, own_keys) -> dict:
    """The image tower's entries of a checkpoint: keys under ``prefix`` (prefix removed) when
    the checkpoint uses it, else the state dict unchanged (already the tower's own names).

    Keys outside the prefix (text tower, logit scale, ...) are dropped.
    """
    if prefix and any(k.startswith(prefix) for k in sd) and not any(k in own_keys for k in sd):
        return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    return dict(sd)


def materialize(make: Callable[[], object], sd: Mapping, source: str):
    """Build a module with ``make()`` and load ``sd`` into it strictly.

    The module is first built on the ``meta`` device and the checkpoint tensors are assigned
    (no random initialisation of hundreds of millions of weights that are overwritten at once);
    modules with non-persistent buffers (computed at construction) are built normally instead.
    Floating tensors are cast to float32.

    Raises:
        CbmirError: keys or shapes of ``sd`` do not fit (see :func:`check_state_dict`).
    """
    import torch

    sd = {k: (v.float() if v.is_floating_point() else v) for k, v in sd.items()}
    try:
        with torch.device("meta"):
            meta = make()
    except Exception:  # noqa: BLE001 - a constructor that cannot run on meta: build normally
        model = seeded(make)
        check_state_dict(model, sd, source)
        model.load_state_dict(sd, strict=True)
        return model
    check_state_dict(meta, sd, source)
    meta.load_state_dict(sd, strict=True, assign=True)
    if not any(t.is_meta for t in list(meta.parameters()) + list(meta.buffers())):
        return meta
    del meta
    model = seeded(make)
    model.load_state_dict(sd, strict=True)
    return model


# ============================================================================ extractor
class FoundationExtractor:
    """An image tower + its published preprocessing (an :class:`~cbmir.ingest.base.Extractor`).

    Args:
        spec: the registry entry.
        model: ``torch.nn.Module`` mapping a normalised float ``(B, 3, S, S)`` batch to the
            embedding ``(B, spec.dim)`` (already L2-normalised where the recipe says so).
        preprocess: the model's eval transform.
        weights_id: ``hf-hub:<repo>``, ``sha256:<hex>`` of a local file, or ``random-init``.
        device: ``auto`` | ``cpu`` | ``cuda[:N]``.
        batch_size: images per forward pass.
        architecture: description recorded in the identity.

    Attributes:
        precision: the forward pass's precision label (:mod:`cbmir.ingest.extractors.precision`): with
            ``precision="auto"`` ``bf16-autocast`` / ``fp16-autocast`` on CUDA, ``fp32`` on CPU.
    """

    def __init__(self, spec: ExtractorSpec, model, preprocess: ImagePreprocess, weights_id: str,
                 *, device="auto", batch_size: int = 64, architecture: str = "", precision: str = "auto") -> None:
        from cbmir.ingest.extractors.timm_cnn import resolve_device

        self.spec = spec
        self.preprocess = preprocess
        self.weights_id = weights_id
        self.batch_size = int(batch_size)
        self.device = resolve_device(device)
        self.architecture = architecture
        self.model = model.eval().to(self.device)
        for p in self.model.parameters():
            p.requires_grad_(False)
        self._amp = autocast_dtype(self.device, precision)
        self.precision = precision_label(self._amp)

    def dim_for(self, size: int) -> int:
        """Embedding dim for ``size`` px input: ``spec.dim`` at every size (input resized)."""
        return int(self.spec.dim)

    def _autocast(self):
        return autocast(self.device, self._amp)

    def extract(self, images: np.ndarray) -> np.ndarray:
        """Embed a batch: uint8 ``(B, H, W, 3)`` (or 1-channel / ``(B, H, W)``) -> float32
        ``(B, spec.dim)``, in mini-batches of ``batch_size`` under ``torch.inference_mode()``.

        Raises:
            ValueError: not a uint8 ``(B, H, W[, 1|3])`` batch.
        """
        import torch

        images = uint8_image_batch(images, self.spec.name)
        if images.shape[-1] == 1:
            images = np.repeat(images, 3, axis=-1)
        out = np.empty((len(images), self.spec.dim), dtype=np.float32)
        with torch.inference_mode():
            for lo in range(0, len(images), self.batch_size):
                x = self.preprocess(images[lo: lo + self.batch_size], self.device)
                with self._autocast():
                    y = self.model(x)
                out[lo: lo + len(y)] = y.float().cpu().numpy()
        return out

    def identity(self, size: int | None = None) -> dict:
        """Identity recorded in collection metadata (stable across devices and precisions)."""
        return {
            **model_identity(self.spec, backend="torch", architecture=self.architecture,
                             weights_id=self.weights_id),
            "preprocessing": self.preprocess.describe(),
            "embedding": self.spec.options.get("embedding", ""),
        }


# ============================================================================ architectures
@dataclass(frozen=True)
class Arch:
    """How to build one kind of image tower.

    Attributes:
        make: ``options -> nn.Module`` (random init; no downloads).
        convert: ``(checkpoint state dict, options, module keys) -> state dict with the
            module's key names`` (drops text towers / heads, renames).
        describe: ``options -> str`` architecture description for the identity.
    """

    make: Callable[[dict], object]
    convert: Callable[[Mapping, dict, set], dict]
    describe: Callable[[dict], str]


def _timm_kwargs(options: dict) -> dict:
    import torch
    import timm.layers

    kw = dict(options.get("timm_kwargs", {}))
    if "mlp_layer" in kw:
        kw["mlp_layer"] = getattr(timm.layers, kw["mlp_layer"])
    if "act_layer" in kw:
        kw["act_layer"] = getattr(torch.nn, kw["act_layer"])
    return kw


def _make_timm_vit(options: dict):
    import timm

    return timm.create_model(options["timm_name"], pretrained=False, **_timm_kwargs(options))


def _make_open_clip_visual(options: dict):
    try:
        from open_clip.model import _build_vision_tower
    except ImportError as exc:  # pragma: no cover - open_clip API change
        raise CbmirError(f"this open_clip version has no _build_vision_tower ({exc}); "
                         "install open-clip-torch>=3,<4") from exc
    cfg = options.get("vision_cfg")
    embed_dim = options.get("embed_dim")
    if cfg is None:
        import open_clip

        full = open_clip.get_model_config(options["open_clip_model"])
        if full is None:
            raise CbmirError(f"open_clip has no model config {options['open_clip_model']!r}")
        cfg, embed_dim = full["vision_cfg"], full["embed_dim"]
    return _build_vision_tower(int(embed_dim), dict(cfg))


def _convert_prefixed(sd: Mapping, options: dict, own: set) -> dict:
    return select_keys(sd, options.get("key_prefix", ""), own)


def _describe_timm(options: dict) -> str:
    kw = options.get("timm_kwargs", {})
    return f"timm:{options['timm_name']}({', '.join(f'{k}={v}' for k, v in kw.items())})"


def _describe_open_clip(options: dict) -> str:
    if options.get("vision_cfg"):
        return f"open_clip vision tower embed_dim={options['embed_dim']} {options['vision_cfg']}"
    return f"open_clip:{options['open_clip_model']} vision tower"


ARCHS: dict[str, Arch] = {
    "timm_vit": Arch(_make_timm_vit, _convert_prefixed, _describe_timm),
    "open_clip_visual": Arch(_make_open_clip_visual, _convert_prefixed, _describe_open_clip),
}
"""Kinds of image tower the ``foundation`` builder knows; other modules add theirs."""


def build_foundation(spec: ExtractorSpec, *, weights=None, random_init=False, device="auto",
                     batch_size=64, precision="auto", **_ignored) -> FoundationExtractor:
    """Builder ``foundation``: the image tower of ``spec`` with pretrained, local or random weights.

    Order: device check, then weights (hub / file: fails fast, before any model is built), then
    the model (random init: seeded; with weights: built on ``meta`` and assigned).

    Raises:
        CbmirError: bad device, weights unobtainable / unreadable / not fitting.
    """
    def locate_weights():
        if weights is not None:
            path = resolve_weights_path(spec, weights)
            return path, file_identity(path), str(path)
        path, wid = fetch_pretrained(spec)
        return path, wid, wid

    return build_tower(spec, locate_weights, random_init=random_init, device=device,
                       batch_size=batch_size, precision=precision)


def build_tower(spec: ExtractorSpec, locate_weights: Callable[[], tuple], *, random_init=False,
                device="auto", batch_size=64, precision="auto") -> FoundationExtractor:
    """The body of the image-tower builders (``foundation``, ``medclip``): the device check, then
    the checkpoint from ``locate_weights() -> (path, weights id, source for messages)`` (not
    called for random init), then the tower (random init: :func:`seeded`; else the checkpoint
    converted and loaded by :func:`_load`) with its published preprocessing.

    Raises:
        CbmirError: bad device, or as ``locate_weights`` / :func:`_load`.
    """
    from cbmir.ingest.extractors.timm_cnn import resolve_device

    resolve_device(device)
    arch = ARCHS[spec.options["arch"]]
    opts = spec.options
    make = lambda: arch.make(opts)  # noqa: E731
    if random_init:
        model, wid = seeded(make), RANDOM_INIT
    else:
        path, wid, source = locate_weights()
        model = _load(make, arch, opts, load_state_dict_file(path), source)
    return FoundationExtractor(spec, model, preprocess_of(spec), wid, device=device,
                               batch_size=batch_size, architecture=arch.describe(opts), precision=precision)


def _load(make, arch: Arch, opts: dict, sd: Mapping, source: str):
    """Convert checkpoint ``sd`` to the tower's key names and load it (see :func:`materialize`)."""
    import torch

    try:
        with torch.device("meta"):
            own = set(make().state_dict())
    except Exception:  # noqa: BLE001
        own = set(seeded(make).state_dict())
    return materialize(make, arch.convert(sd, opts, own), source)


def check_foundation_weights(spec: ExtractorSpec, *, weights=None, **_ignored) -> None:
    """Weights check of builder ``foundation`` (:func:`~cbmir.ingest.extractors.registry.check_weights`):
    ``--weights`` resolves to a checkpoint file, or :func:`fetch_pretrained` obtains the hub
    checkpoint (download, HF cache; fast offline). No torch / timm / open_clip import.

    Raises:
        CbmirError: as :func:`resolve_weights_path` / :func:`fetch_pretrained`.
    """
    if weights is not None:
        resolve_weights_path(spec, weights)
    else:
        fetch_pretrained(spec)


register_builder("foundation", build_foundation, backend="torch")
register_weights_check("foundation", check_foundation_weights, backend="torch")


# ============================================================================ registry entries
def _pre(size, crop, interpolation, mean, std, source, pad_square=False) -> dict:
    return asdict(ImagePreprocess(size, crop, interpolation, tuple(mean), tuple(std), pad_square, source))


def with_preprocess_cfg(spec: ExtractorSpec) -> ExtractorSpec:
    """``spec`` with its typed :class:`~cbmir.ingest.base.PreprocessCfg` taken from ``options["preprocess"]``
    (the model's published eval transform: input side after the crop, interpolation, mean / std, crop
    fraction); a fixed preprocessing, so ``--input-size`` does not apply (``resizable`` False)."""
    pre = ImagePreprocess(**spec.options["preprocess"])
    cfg = PreprocessCfg(policy=spec.input_policy, input_size=pre.out_side, interpolation=pre.interpolation,
                        mean=tuple(pre.mean), std=tuple(pre.std),
                        crop_pct=round(pre.crop / pre.size, 4) if pre.crop else None)
    return dataclasses.replace(spec, preprocess_cfg=cfg)


def _gated(repo: str, model: str) -> str:
    return (f"{model} weights are gated (CC BY-NC-ND 4.0, non-commercial research use): request "
            f"access at https://huggingface.co/{repo} (log in, accept the terms), then set HF_TOKEN "
            f"to a read token of the approved account.")


_OPENAI_EVAL = "open_clip image_transform(224, is_train=False): Resize(224, bicubic) + CenterCrop(224)"

BIOMEDCLIP = register(with_preprocess_cfg(ExtractorSpec(
    name="biomedclip",
    family="biomedical vision-language",
    dim=512,
    input_policy="resize shorter side to 224 (bicubic) + center crop 224; OpenAI CLIP mean/std",
    weights_source="hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224",
    licence="MIT (open; no token needed)",
    backends=("torch",),
    builder="foundation",
    display_name="BiomedCLIP",
    paper_name="BiomedCLIP",
    options={
        "arch": "open_clip_visual",
        # open_clip_config.json of the hub repo (model_cfg.vision_cfg); only the image tower.
        "embed_dim": 512,
        "vision_cfg": {"timm_model_name": "vit_base_patch16_224", "timm_model_pretrained": False,
                       "timm_pool": "", "timm_proj": "linear", "image_size": 224},
        "hub_id": "microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224",
        "hub_files": ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"),
        "key_prefix": "visual.",
        "preprocess": _pre(224, 224, "bicubic", OPENAI_MEAN, OPENAI_STD,
                           _OPENAI_EVAL + ", preprocess_cfg OpenAI mean/std (open_clip_config.json)"),
        "embedding": "model.encode_image(image) (ViT-B/16 CLS -> linear 768->512), not normalised",
        "access": "",
        "paper": "Zhang et al., BiomedCLIP, NEJM AI 2024 (arXiv:2303.00915)",
    },
)))

OPENCLIP = register(with_preprocess_cfg(ExtractorSpec(
    name="openclip",
    family="natural vision-language",
    dim=1024,
    input_policy="resize shorter side to 224 (bicubic) + center crop 224; OpenAI CLIP mean/std",
    weights_source="hf-hub:laion/CLIP-ViT-g-14-laion2B-s34B-b88K",
    licence="MIT (open_clip; LAION-2B weights, open)",
    backends=("torch",),
    builder="foundation",
    display_name="OpenCLIP ViT-g-14",
    paper_name="OpenCLIP",
    options={
        "arch": "open_clip_visual",
        "open_clip_model": "ViT-g-14",
        "pretrained_tag": "laion2b_s34b_b88k",
        "hub_id": "laion/CLIP-ViT-g-14-laion2B-s34B-b88K",
        "hub_files": ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"),
        "key_prefix": "visual.",
        "preprocess": _pre(224, 224, "bicubic", OPENAI_MEAN, OPENAI_STD,
                           _OPENAI_EVAL + ", pretrained cfg laion2b_s34b_b88k"),
        "embedding": "model.encode_image(image) (ViT-g/14 CLS -> proj 1408->1024), not normalised",
        "access": "",
        "paper": ("Cherti et al., Reproducible scaling laws for contrastive language-image learning, "
                  "CVPR 2023"),
    },
)))

_UNI_PRE = _pre(224, None, "bilinear", IMAGENET_MEAN, IMAGENET_STD,
                "UNI model card: transforms.Resize(224), ToTensor, Normalize(ImageNet)")

UNI = register(with_preprocess_cfg(ExtractorSpec(
    name="uni",
    family="pathology self-supervised",
    dim=1024,
    input_policy="resize shorter side to 224 (bilinear), no crop; ImageNet mean/std",
    weights_source="hf-hub:MahmoodLab/UNI",
    licence="CC BY-NC-ND 4.0, gated (request access on Hugging Face, set HF_TOKEN)",
    backends=("torch",),
    builder="foundation",
    display_name="UNI",
    paper_name="UNI",
    options={
        "arch": "timm_vit",
        "timm_name": "vit_large_patch16_224",
        "timm_kwargs": {"img_size": 224, "patch_size": 16, "init_values": 1e-5, "num_classes": 0,
                        "dynamic_img_size": True},
        "hub_id": "MahmoodLab/UNI",
        "hub_files": ("model.safetensors", "pytorch_model.bin"),
        "key_prefix": "",
        "preprocess": _UNI_PRE,
        "embedding": "ViT-L/16 CLS token after the final norm (timm forward, num_classes=0)",
        "access": _gated("MahmoodLab/UNI", "UNI"),
        "paper": ("Chen et al., Towards a general-purpose foundation model for computational pathology, "
                  "Nat Med 2024"),
    },
)))

DINOV2 = register(with_preprocess_cfg(ExtractorSpec(
    name="dinov2_vitl14",
    family="natural self-supervised",
    dim=1024,
    input_policy="resize shorter side to 256 (bicubic) + center crop 224; ImageNet mean/std",
    weights_source="hf-hub:timm/vit_large_patch14_dinov2.lvd142m",
    licence="Apache-2.0 (open)",
    backends=("torch",),
    builder="foundation",
    display_name="DINOv2 ViT-L/14",
    options={
        "arch": "timm_vit",
        "timm_name": "vit_large_patch14_dinov2",
        # 518 px position embeddings of the checkpoint, interpolated to the 16x16 grid of a 224
        # px input at run time (dynamic_img_size), as timm and DINOv2's own hub code do.
        "timm_kwargs": {"num_classes": 0, "dynamic_img_size": True},
        "hub_id": "timm/vit_large_patch14_dinov2.lvd142m",
        "hub_files": ("model.safetensors", "pytorch_model.bin"),
        "key_prefix": "",
        "preprocess": _pre(256, 224, "bicubic", IMAGENET_MEAN, IMAGENET_STD,
                           "DINOv2 make_classification_eval_transform: Resize(256, bicubic) "
                           "+ CenterCrop(224)"),
        "embedding": "ViT-L/14 CLS token after the final norm (x_norm_clstoken; kNN/linear-eval feature)",
        "access": "",
        "paper": "Oquab et al., DINOv2: Learning Robust Visual Features without Supervision, TMLR 2024",
    },
)))

UNI2H = register(with_preprocess_cfg(ExtractorSpec(
    name="uni2-h",
    family="pathology self-supervised",
    dim=1536,
    input_policy="resize shorter side to 224 (bilinear), no crop; ImageNet mean/std",
    weights_source="hf-hub:MahmoodLab/UNI2-h",
    licence="CC BY-NC-ND 4.0, gated (request access on Hugging Face, set HF_TOKEN)",
    backends=("torch",),
    builder="foundation",
    display_name="UNI2-h",
    options={
        "arch": "timm_vit",
        "timm_name": "vit_giant_patch14_224",
        # timm_kwargs of the UNI2-h model card (ViT-H/14, 8 register tokens, SwiGLU MLP)
        "timm_kwargs": {"img_size": 224, "patch_size": 14, "depth": 24, "num_heads": 24,
                        "init_values": 1e-5, "embed_dim": 1536, "mlp_ratio": 2.66667 * 2,
                        "num_classes": 0, "no_embed_class": True, "mlp_layer": "SwiGLUPacked",
                        "act_layer": "SiLU", "reg_tokens": 8, "dynamic_img_size": True},
        "hub_id": "MahmoodLab/UNI2-h",
        "hub_files": ("model.safetensors", "pytorch_model.bin"),
        "key_prefix": "",
        "preprocess": _pre(224, None, "bilinear", IMAGENET_MEAN, IMAGENET_STD,
                           "UNI model card: transforms.Resize(224), ToTensor, Normalize(ImageNet)"),
        "embedding": "ViT-H/14 CLS token after the final norm (timm forward, num_classes=0)",
        "access": _gated("MahmoodLab/UNI2-h", "UNI2-h"),
        "paper": "UNI2-h model card, MahmoodLab (2025); architecture of Chen et al., Nat Med 2024",
    },
)))
