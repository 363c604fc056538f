"""``conch``: CONCH image embeddings, 512-d, with our own image tower (no CONCH code).

Source: Lu et al., *A visual-language foundation model for computational pathology*, Nature
Medicine 30, 863-874 (2024); weights ``MahmoodLab/conch`` on Hugging Face (gated,
CC BY-NC-ND 4.0). CONCH's reference code (PyPI ``conch-fork``) is CC BY-NC-ND 4.0 as well;
nothing of it is copied here. The tower is assembled from MIT / Apache-2.0 libraries so that it
loads the published checkpoint, following the published model configuration
(``conch_ViT-B-16``: ViT-B/16 image encoder at 448 x 448 px, 512-d contrastive embedding,
attentional poolers with 8 heads and 1 contrastive query):

* ``trunk``: ``timm`` ``VisionTransformer`` (width 768, depth 12, 12 heads, MLP ratio 4,
  patch 16, image 448, class token, no head), all tokens after its final LayerNorm
  (``forward_features``: ``(B, 1 + 28 * 28, 768)``);
* ``attn_pool_contrast``: ``open_clip.transformer.AttentionalPooler(d_model=512,
  context_dim=768, n_head=8, n_queries=1)`` (LayerNorm on keys and on the learned query, one
  multi-head cross-attention);
* ``ln_contrast``: ``LayerNorm(512)``.

Embedding (the study's, and the model card's recipe for image features): ``encode_image(image,
proj_contrast=False, normalize=True)`` = ``ln_contrast(attn_pool_contrast(tokens)[:, 0])``,
L2-normalised; the contrastive projection ``proj_contrast`` and the captioning pooler are not
used (their checkpoint keys are ignored, as are the text tower's).

Preprocessing (the model's own ``create_model_from_pretrained`` transform): ``Resize(448,
bicubic)`` + ``CenterCrop(448)`` + ``ToTensor`` + ``Normalize(OpenAI CLIP mean/std)``.

When the optional ``conch`` package is importable, ``tests/test_foundation.py`` checks that this
tower gives the same embedding as the package's ``encode_image`` for the same weights.
"""

from __future__ import annotations

from typing import Mapping

from cbmir.core.errors import CbmirError

from cbmir.ingest.base import ExtractorSpec
from cbmir.ingest.extractors.foundation import ARCHS, OPENAI_MEAN, OPENAI_STD, Arch, _pre, with_preprocess_cfg
from cbmir.ingest.extractors.registry import register

IMAGE_SIZE = 448
_KEEP = ("trunk.", "attn_pool_contrast.", "ln_contrast.")

CONCH = register(with_preprocess_cfg(ExtractorSpec(
    name="conch",
    family="pathology vision-language",
    dim=512,
    input_policy="resize shorter side to 448 (bicubic) + center crop 448; OpenAI CLIP mean/std",
    weights_source="hf-hub:MahmoodLab/conch",
    licence="CC BY-NC-ND 4.0, gated (request access on Hugging Face, set HF_TOKEN)",
    backends=("torch",),
    builder="foundation",
    display_name="CONCH",
    paper_name="CONCH",
    options={
        "arch": "conch_vit",
        "image_size": IMAGE_SIZE,
        "hub_id": "MahmoodLab/conch",
        "hub_files": ("pytorch_model.bin",),
        "key_prefix": "visual.",
        "preprocess": _pre(IMAGE_SIZE, IMAGE_SIZE, "bicubic", OPENAI_MEAN, OPENAI_STD,
                           "CONCH create_model_from_pretrained: Resize(448, bicubic) + CenterCrop(448)"),
        "embedding": "encode_image(proj_contrast=False, normalize=True): attentional pooler "
                     "(1 query) over ViT-B/16 tokens -> LayerNorm -> L2-normalised",
        "access": ("CONCH weights are gated (CC BY-NC-ND 4.0, non-commercial research use): request "
                   "access at https://huggingface.co/MahmoodLab/conch (log in, accept the terms), "
                   "then set HF_TOKEN to a read token of the approved account."),
        "paper": "Lu et al., CONCH, Nat Med 2024",
    },
)))


def _make_conch(options: dict):
    import torch
    import torch.nn.functional as F
    from open_clip.transformer import AttentionalPooler
    from timm.models.vision_transformer import VisionTransformer

    size = int(options.get("image_size", IMAGE_SIZE))

    class ConchImageTower(torch.nn.Module):
        """CONCH image tower: ``(B, 3, 448, 448)`` normalised -> L2-normalised ``(B, 512)``."""

        def __init__(self) -> None:
            super().__init__()
            self.trunk = VisionTransformer(img_size=size, patch_size=16, embed_dim=768, depth=12,
                                           num_heads=12, mlp_ratio=4.0, num_classes=0,
                                           dynamic_img_size=True)
            self.attn_pool_contrast = AttentionalPooler(d_model=512, context_dim=768, n_head=8,
                                                        n_queries=1)
            self.ln_contrast = torch.nn.LayerNorm(512)

        def forward(self, x):
            tokens = self.trunk.forward_features(x)
            pooled = self.ln_contrast(self.attn_pool_contrast(tokens)[:, 0])
            return F.normalize(pooled, dim=-1)

    return ConchImageTower()


def convert_conch(sd: Mapping, options: dict, own: set) -> dict:
    """CONCH checkpoint (``visual.*`` + text keys) or this tower's own state dict -> the tower's
    keys. Keys outside ``trunk`` / ``attn_pool_contrast`` / ``ln_contrast`` are dropped; a
    position embedding for another grid is resampled (bicubic, timm) to 28 x 28.

    Raises:
        CbmirError: the checkpoint has no CONCH image-tower keys.
    """
    if not any(k in own for k in sd):
        sd = {k[len("visual."):]: v for k, v in sd.items() if k.startswith("visual.")}
    out = {k: v for k, v in sd.items() if k.startswith(_KEEP)}
    if not out:
        raise CbmirError("the checkpoint holds no CONCH image-tower keys (visual.trunk.*, "
                         "visual.attn_pool_contrast.*); is it MahmoodLab/conch's pytorch_model.bin?")
    pe = out.get("trunk.pos_embed")
    grid = int(options.get("image_size", IMAGE_SIZE)) // 16
    if pe is not None and pe.shape[1] != 1 + grid * grid:
        from timm.layers import resample_abs_pos_embed

        out["trunk.pos_embed"] = resample_abs_pos_embed(pe, new_size=(grid, grid), num_prefix_tokens=1)
    return out


ARCHS["conch_vit"] = Arch(
    _make_conch, convert_conch,
    lambda o: ("CONCH image tower: timm VisionTransformer B/16 @448 (all tokens after final norm) "
               "-> open_clip AttentionalPooler(512, 768, 8 heads, 1 query) -> LayerNorm(512)"),
)
