"""``medclip``: MedCLIP (ViT variant) image embeddings, 512-d, built without the ``medclip`` package.

Source: Wang et al., *MedCLIP: Contrastive Learning from Unpaired Medical Images and Text*,
EMNLP 2022; code and weights https://github.com/RyanWangZf/MedCLIP (PyPI ``medclip`` 0.0.3).

Why our own module: ``medclip`` fails to import with transformers 5 (``CLIPFeatureExtractor``)
and downloads BERT and Swin from the hub when its models are constructed (DESIGN.md §6).

Architecture (``MedCLIPVisionModelViT``): a Swin-T backbone
(``microsoft/swin-tiny-patch4-window7-224``: patch 4, window 7, embed 96, depths 2-2-6-2,
heads 3-6-12-24), whose ``pooler_output`` (final LayerNorm, then mean over the 7 x 7 tokens,
768-d) goes through ``projection_head`` = ``Linear(768, 512, bias=False)``;
``MedCLIPModel.encode_image`` divides by the L2 norm. We build the same network with timm's
``swin_tiny_patch4_window7_224`` (``num_classes=0``: final norm + global average pool - the
same computation as the Hugging Face ``SwinModel`` pooler) and convert the checkpoint's
Hugging Face key names to timm's (:func:`hf_swin_to_timm`; q/k/v are concatenated into timm's
``qkv``; HF's ``encoder.layers.i.downsample`` is timm's ``layers.(i+1).downsample``).

Weights: MedCLIP's weights are not on the Hugging Face hub. The release is a zip whose URL is
the content of https://github.com/RyanWangZf/MedCLIP/raw/main/medclip/medclip_vit_weight.txt ;
unzip it and pass the directory (holding ``pytorch_model.bin``, keys
``vision_model.model.*`` / ``vision_model.projection_head.weight`` / ``text_model.*``) with
``--weights DIR``. Without ``--weights``, the directories ``$CBMIR_MEDCLIP_DIR``,
``./pretrained/medclip-vit`` (where ``MedCLIPModel.from_pretrained()`` unzips it) and
``~/.cache/cbmir/medclip-vit`` are searched. Both the legacy (transformers 4: ``attention.self.
query``...) and the transformers 5 key names (``attention.q_proj``...) are accepted, as is a
state dict saved from this module's ``model`` (timm names).

Preprocessing (``MedCLIPFeatureExtractor``, the model's own): 8-bit gray, padded centred on a
black square of side ``max(224, H, W)`` - so MedMNIST images (28-224 px) are *padded* to
224 x 224, not enlarged - then resized to 224 x 224 (bicubic; no-op for MedMNIST), centre crop
224, ``(x / 255 - 0.5862785803043838) / 0.27950088968644304``, replicated to 3 channels.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Mapping

from cbmir.core.errors import CbmirError

from cbmir.ingest.base import ExtractorSpec
from cbmir.ingest.extractors.foundation import (
    ARCHS,
    Arch,
    FoundationExtractor,
    _pre,
    build_tower,
    resolve_weights_path,
    with_preprocess_cfg,
)
from cbmir.ingest.extractors.registry import (
    register,
    register_availability,
    register_builder,
    register_weights_check,
)
from cbmir.ingest.extractors.weights import file_identity

IMG_MEAN = 0.5862785803043838
IMG_STD = 0.27950088968644304
WEIGHTS_TXT = "https://github.com/RyanWangZf/MedCLIP/raw/main/medclip/medclip_vit_weight.txt"

MEDCLIP = register(with_preprocess_cfg(ExtractorSpec(
    name="medclip",
    family="radiology vision-language",
    dim=512,
    input_policy="gray; pad centred to >= 224 x 224 (no enlarging); resize 224 bicubic; mean/std 0.586/0.280",
    weights_source="MedCLIP-ViT release zip (pytorch_model.bin; --weights DIR)",
    licence="MedCLIP release (github.com/RyanWangZf/MedCLIP); not on the Hugging Face hub",
    backends=("torch",),
    builder="medclip",
    display_name="MedCLIP",
    paper_name="MedCLIP",
    options={
        "arch": "medclip_vit",
        "hub_files": ("pytorch_model.bin",),
        "preprocess": _pre(224, 224, "bicubic", (IMG_MEAN,), (IMG_STD,),
                           "MedCLIPFeatureExtractor (medclip 0.0.3 dataset.py)", pad_square=True),
        "embedding": ("MedCLIPModel.encode_image: Swin-T pooler_output -> Linear(768, 512, no bias) "
                      "-> L2-normalised"),
        "access": (f"MedCLIP weights are not on the Hugging Face hub: download the MedCLIP-ViT zip "
                   f"whose URL is the content of {WEIGHTS_TXT}, unzip it to a directory DIR (it holds "
                   f"pytorch_model.bin) and pass --weights DIR, or unzip it to $CBMIR_MEDCLIP_DIR or "
                   f"./pretrained/medclip-vit."),
        "paper": "Wang et al., MedCLIP, EMNLP 2022 (arXiv:2210.10163)",
    },
)))


def default_dirs() -> list[Path]:
    """Directories searched for ``pytorch_model.bin`` when no ``--weights`` is given."""
    dirs = []
    if os.environ.get("CBMIR_MEDCLIP_DIR"):
        dirs.append(Path(os.environ["CBMIR_MEDCLIP_DIR"]).expanduser())
    dirs += [Path("pretrained/medclip-vit"), Path.home() / ".cache" / "cbmir" / "medclip-vit"]
    return dirs


def find_local_weights() -> Path | None:
    """``pytorch_model.bin`` in the first of :func:`default_dirs` holding one, else None."""
    for d in default_dirs():
        if (d / "pytorch_model.bin").is_file():
            return d / "pytorch_model.bin"
    return None


# ---------------------------------------------------------------------------- model
def _make_medclip(options: dict):
    import timm
    import torch
    import torch.nn.functional as F

    class MedCLIPVision(torch.nn.Module):
        """MedCLIP-ViT image tower: ``(B, 3, 224, 224)`` normalised -> L2-normalised ``(B, 512)``."""

        def __init__(self) -> None:
            super().__init__()
            self.backbone = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False,
                                              num_classes=0)
            self.projection_head = torch.nn.Linear(768, 512, bias=False)

        def forward(self, x):
            return F.normalize(self.projection_head(self.backbone(x)), dim=-1)

    return MedCLIPVision()


_BLOCK = re.compile(r"^encoder\.layers\.(\d+)\.blocks\.(\d+)\.(.+)$")
_DOWN = re.compile(r"^encoder\.layers\.(\d+)\.downsample\.(.+)$")
_BLOCK_RENAMES = [  # HF Swin (transformers 4 legacy and 5) -> timm, inside one block
    ("layernorm_before.", "norm1."),
    ("layernorm_after.", "norm2."),
    ("attention.self.relative_position_bias_table", "attn.relative_position_bias_table"),
    ("attention.relative_position_bias.relative_position_bias_table", "attn.relative_position_bias_table"),
    ("attention.output.dense.", "attn.proj."),
    ("attention.o_proj.", "attn.proj."),
    ("intermediate.dense.", "mlp.fc1."),
    ("output.dense.", "mlp.fc2."),
    ("mlp.fc1.", "mlp.fc1."),
    ("mlp.fc2.", "mlp.fc2."),
]
_QKV = re.compile(r"^attention\.(?:self\.(query|key|value)|(q|k|v)_proj)\.(weight|bias)$")


def hf_swin_to_timm(sd: Mapping) -> dict:
    """Hugging Face ``SwinModel`` state dict -> timm ``swin_tiny_patch4_window7_224`` names.

    Args:
        sd: keys as in ``SwinModel.state_dict()`` (``embeddings.*``, ``encoder.layers.*``,
            ``layernorm.*``), transformers 4 or 5 naming.

    Returns:
        A timm state dict (buffers ``relative_position_index`` / ``attn_mask`` dropped: timm
        computes them). q, k and v projections are concatenated in that order into ``qkv``.

    Raises:
        CbmirError: a key the conversion does not know, or a block without all of q, k, v.
    """
    import torch

    out, qkv, unknown = {}, {}, []
    for key, v in sd.items():
        if (key.endswith(("relative_position_index", "attn_mask"))
                or key.startswith(("pooler", "embeddings.mask_token"))):
            continue
        if key.startswith("embeddings.patch_embeddings.projection."):
            out["patch_embed.proj." + key.rsplit(".", 1)[1]] = v
        elif key.startswith("embeddings.norm."):
            out["patch_embed.norm." + key.rsplit(".", 1)[1]] = v
        elif key.startswith("layernorm."):
            out["norm." + key.rsplit(".", 1)[1]] = v
        elif m := _DOWN.match(key):
            out[f"layers.{int(m[1]) + 1}.downsample.{m[2]}"] = v
        elif m := _BLOCK.match(key):
            prefix, rest = f"layers.{m[1]}.blocks.{m[2]}.", m[3]
            if q := _QKV.match(rest):
                part = "qkv".index((q[1] or q[2])[0])
                qkv.setdefault((prefix, q[3]), [None, None, None])[part] = v
                continue
            for old, new in _BLOCK_RENAMES:
                if rest.startswith(old):
                    out[prefix + new + rest[len(old):]] = v
                    break
            else:
                unknown.append(key)
        else:
            unknown.append(key)
    for (prefix, kind), parts in qkv.items():
        if any(p is None for p in parts):
            raise CbmirError(f"MedCLIP checkpoint: block {prefix} lacks one of query/key/value {kind}")
        out[f"{prefix}attn.qkv.{kind}"] = torch.cat(parts, dim=0)
    if unknown:
        raise CbmirError(f"MedCLIP checkpoint: unknown Swin keys {unknown[:5]}"
                         + (f" (+{len(unknown) - 5} more)" if len(unknown) > 5 else ""))
    return out


def convert_medclip(sd: Mapping, options: dict, own: set) -> dict:
    """MedCLIP checkpoint (full ``MedCLIPModel``, the vision model alone, or this module's own
    state dict) -> the keys of :func:`_make_medclip`'s module. Text-model keys are dropped."""
    if any(k in own for k in sd):
        return dict(sd)
    vis = {k[len("vision_model."):]: v for k, v in sd.items() if k.startswith("vision_model.")} or dict(sd)
    out = {}
    swin = {k[len("model."):]: v for k, v in vis.items() if k.startswith("model.")}
    out.update({f"backbone.{k}": v for k, v in hf_swin_to_timm(swin).items()})
    if "projection_head.weight" in vis:
        out["projection_head.weight"] = vis["projection_head.weight"]
    return out


ARCHS["medclip_vit"] = Arch(
    _make_medclip, convert_medclip,
    lambda o: "MedCLIP-ViT: Swin-T (timm swin_tiny_patch4_window7_224 = HF microsoft/swin-tiny-"
              "patch4-window7-224) pooler -> Linear(768, 512, bias=False) -> L2 norm",
)


def build_medclip(spec: ExtractorSpec, *, weights=None, random_init=False, device="auto",
                  batch_size=64, precision="auto", **_ignored) -> FoundationExtractor:
    """Builder ``medclip``: local release weights (``--weights DIR|FILE`` or a default directory)
    or random init.

    Raises:
        CbmirError: no weights given and none in :func:`default_dirs` (message: where to get
            them), unreadable / non-fitting checkpoint, bad device.
    """
    def locate_weights():
        path = medclip_weights_path(spec, weights)
        return path, file_identity(path), str(path)

    return build_tower(spec, locate_weights, random_init=random_init, device=device,
                       batch_size=batch_size, precision=precision)


def medclip_weights_path(spec: ExtractorSpec, weights=None, **_ignored) -> Path:
    """The MedCLIP checkpoint file: from ``--weights DIR|FILE``, else the first of
    :func:`default_dirs` holding ``pytorch_model.bin``. Also the registered weights check of
    builder ``medclip`` (no torch import).

    Raises:
        CbmirError: ``weights`` missing / without a checkpoint, or no weights given and none in
            :func:`default_dirs` (the message says where to get them).
    """
    from cbmir.ingest.extractors.foundation import weights_error

    path = resolve_weights_path(spec, weights) if weights is not None else find_local_weights()
    if path is None:
        raise weights_error(spec, "no --weights given and no pytorch_model.bin in "
                            + ", ".join(str(d) for d in default_dirs()))
    return path


register_builder("medclip", build_medclip, backend="torch")
register_weights_check("medclip", medclip_weights_path, backend="torch")
register_availability("medclip", lambda spec: find_local_weights() is not None)
