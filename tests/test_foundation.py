"""Foundation-model extractors (ingest/extractors/foundation.py, medclip.py, conch.py).

* the registry / ``cbmir models`` list the study's nine models with the study's dims and the newer ones;
* each model's preprocessing equals its published transform (open_clip ``image_transform``,
  torchvision pipelines of the model cards, timm ``create_transform``, MedCLIP's pad-to-square
  feature extractor re-implemented independently here) on real MedMNIST images and on
  non-square images that are up- and down-scaled;
* every architecture is built offline with random weights and gives its dim on real
  BreastMNIST images; random init is deterministic;
* a state dict saved in the original checkpoint layout (MedCLIP / open_clip / CONCH key names)
  or the tower's own layout, loaded through ``weights=``, reproduces the features;
* missing weights fail fast with one clear error (model, access step, ``--weights``).

Optional cross-checks against the reference implementations run when they are importable:
Hugging Face ``transformers`` (``SwinModel``, MedCLIP's backbone) and the ``conch`` package.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cbmir.core.errors import CbmirError
from cbmir.ingest.extractors import create_extractor, get_spec, list_specs, weights_available
from cbmir.ingest.extractors.foundation import IMAGENET_MEAN, IMAGENET_STD, OPENAI_MEAN, OPENAI_STD, preprocess_of

REPO = Path(__file__).resolve().parents[1]
STUDY_DIMS = {"vgg19": 512, "resnet50": 2048, "densenet121": 1024, "efficientnetv2m": 1280,
              "medclip": 512, "biomedclip": 512, "openclip": 1024, "conch": 512, "uni": 1024}
NEWER_DIMS = {"dinov2_vitl14": 1024, "uni2-h": 1536}
FOUNDATION = ["medclip", "biomedclip", "openclip", "conch", "uni", "dinov2_vitl14", "uni2-h"]
GATED = {"uni": "MahmoodLab/UNI", "conch": "MahmoodLab/conch", "uni2-h": "MahmoodLab/UNI2-h"}


@pytest.fixture(scope="module")
def breast(data_dir) -> np.ndarray:
    """Three real BreastMNIST test images, uint8 (3, 28, 28, 3)."""
    x = np.load(data_dir / "breastmnist.npz")["test_images"][:3]
    return np.repeat(x[..., None], 3, axis=-1)


@pytest.fixture(scope="module")
def known_images(data_dir) -> list[np.ndarray]:
    """Real RGB RetinaMNIST images at 28 px, and non-square versions that are smaller and larger
    than every model's input (so resize goes up and down, and the centre crop is exercised)."""
    retina = np.load(data_dir / "retinamnist.npz")["test_images"][:2]
    wide = np.asarray(Image.fromarray(retina[0]).resize((61, 40), Image.BICUBIC))
    big = np.asarray(Image.fromarray(retina[1]).resize((300, 520), Image.BICUBIC))
    return [retina[0], retina[1], wide, big]


# ----------------------------------------------------------------------------- registry / CLI
def test_registry_has_study_and_newer_models_with_their_dims():
    names = {s.name for s in list_specs()}
    for name, dim in {**STUDY_DIMS, **NEWER_DIMS}.items():
        assert name in names and get_spec(name).dim == dim
    for name in FOUNDATION:
        spec = get_spec(name)
        assert spec.backends == ("torch",) and spec.weights_source and spec.licence
        assert spec.options["embedding"] and spec.input_policy
    for name in GATED:
        assert "gated" in get_spec(name).licence and "CC BY-NC-ND" in get_spec(name).licence


def test_cli_models_json_lists_study_dims():
    from typer.testing import CliRunner

    from cbmir.cli import app

    res = CliRunner().invoke(app, ["models", "--json"])
    assert res.exit_code == 0, res.output
    rows = {r["name"]: r for r in json.loads(res.output)}
    assert [rows[n]["dim"] for n in STUDY_DIMS] == [512, 2048, 1024, 1280, 512, 512, 1024, 512, 1024]
    for n in NEWER_DIMS:
        assert rows[n]["dim"] == NEWER_DIMS[n]
    for r in rows.values():
        assert {"family", "backends", "input_policy", "weights_source", "licence",
                "weights_available_locally"} <= set(r)
        assert isinstance(r["weights_available_locally"], bool)
    assert rows["resnet50"]["backends"] == ["torch", "keras"]
    assert set(rows["resnet50"]["weights_available_by_backend"]) == {"torch", "keras"}


def test_weights_available_sees_the_hf_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants as hfc

    monkeypatch.setattr(hfc, "HF_HUB_CACHE", str(tmp_path))
    spec = get_spec("uni")
    assert weights_available(spec) is False
    snap = tmp_path / "models--MahmoodLab--UNI" / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    (snap / "pytorch_model.bin").write_bytes(b"x")
    (tmp_path / "models--MahmoodLab--UNI" / "refs").mkdir()
    (tmp_path / "models--MahmoodLab--UNI" / "refs" / "main").write_text("0" * 40)
    assert weights_available(spec) is True
    assert weights_available(get_spec("hog")) is True


# ----------------------------------------------------------------------------- preprocessing
def _ours(name: str, img: np.ndarray) -> torch.Tensor:
    return preprocess_of(get_spec(name))(img[None])[0]


def _reference(name: str):
    """The published transform of each model, built from the libraries the model cards use."""
    import open_clip
    from torchvision import transforms as T

    if name in ("biomedclip", "openclip"):
        return open_clip.image_transform(224, is_train=False, mean=OPENAI_MEAN, std=OPENAI_STD,
                                         interpolation="bicubic", resize_mode="shortest")
    if name == "conch":  # CONCH: open_clip-style eval transform at its 448 px image size
        return open_clip.image_transform(448, is_train=False, mean=OPENAI_MEAN, std=OPENAI_STD,
                                         interpolation="bicubic", resize_mode="shortest")
    if name in ("uni", "uni2-h"):  # UNI model card
        return T.Compose([T.Resize(224), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    if name == "dinov2_vitl14":  # timm eval transform = DINOv2's Resize(256) + CenterCrop(224)
        from timm.data import create_transform

        return create_transform(input_size=(3, 224, 224), crop_pct=224 / 256, interpolation="bicubic",
                                mean=IMAGENET_MEAN, std=IMAGENET_STD)
    if name == "medclip":
        return _medclip_reference
    raise KeyError(name)


def _medclip_reference(im: Image.Image) -> torch.Tensor:
    """MedCLIPFeatureExtractor written out: gray, zero canvas of side max(224, w, h) with the image
    at offset ((S - w) // 2, (S - h) // 2), resize to 224 x 224 bicubic, /255, (x - m) / s, x3."""
    gray = np.asarray(im.convert("L"))
    h, w = gray.shape
    side = max(224, w, h)
    canvas = np.zeros((side, side), np.uint8)
    top, left = (side - h) // 2, (side - w) // 2
    canvas[top: top + h, left: left + w] = gray
    if side != 224:
        canvas = np.asarray(Image.fromarray(canvas).resize((224, 224), Image.BICUBIC))
    x = (canvas.astype(np.float32) / 255.0 - 0.5862785803043838) / 0.27950088968644304
    return torch.from_numpy(x)[None].expand(3, -1, -1)


@pytest.mark.parametrize("name", FOUNDATION)
def test_preprocessing_matches_published_transform(name, known_images):
    ref = _reference(name)
    for img in known_images:
        expect = ref(Image.fromarray(img))
        got = _ours(name, img)
        assert got.shape == expect.shape, (img.shape, got.shape, expect.shape)
        assert torch.allclose(got, expect.float(), atol=1e-5), float((got - expect).abs().max())


def test_medclip_pads_small_images_instead_of_enlarging(known_images):
    x = _ours("medclip", known_images[0])  # a 28 px image: centred in a black 224 canvas
    black = (0 - 0.5862785803043838) / 0.27950088968644304
    assert x.shape == (3, 224, 224)
    assert torch.allclose(x[:, :98], torch.tensor(black)) and torch.allclose(x[:, 126:], torch.tensor(black))
    assert not torch.allclose(x[:, 98:126, 98:126], torch.tensor(black))


# ----------------------------------------------------------------------------- random init
_SMALL = ("medclip", "biomedclip")  # 28 M / 86 M params at 224 px: a few images are cheap
_SHARED: dict = {}  # random-init extractors reused by the round-trip tests (building is costly)


def _random(name: str):
    ext = _SHARED.pop(name, None) or create_extractor(name, random_init=True, device="cpu", batch_size=2)
    if name in ("medclip", "biomedclip", "conch", "uni"):
        _SHARED[name] = ext
    return ext


@pytest.mark.parametrize("name", FOUNDATION)
def test_random_init_builds_offline_and_gives_its_dim(name, breast):
    n = len(breast) if name in _SMALL else 1  # ViT-L/H/g (0.3-1 B params) on 2 CPUs: one image
    ext = _random(name)
    feats = ext.extract(breast[:n])
    assert feats.shape == (n, get_spec(name).dim) and feats.dtype == np.float32
    assert np.isfinite(feats).all() and np.abs(feats).sum() > 0
    ident = ext.identity()
    assert ident["model"] == name and ident["backend"] == "torch" and ident["dim"] == get_spec(name).dim
    assert ident["random_init"] is True and ident["weights"] == "random-init"
    assert ident["preprocessing"] and ident["embedding"] and ident["architecture"]
    if name in ("medclip", "conch"):  # the recipes that L2-normalise
        assert np.allclose(np.linalg.norm(feats, axis=1), 1.0, atol=1e-5)


def test_random_init_is_deterministic_and_leaves_the_rng_alone(breast):
    a = _random("medclip").extract(breast[:2])
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    b = create_extractor("medclip", random_init=True, device="cpu").extract(breast[:2])
    after = torch.rand(1)
    assert np.array_equal(a, b)
    assert torch.equal(before, after)  # seeding happened in a forked RNG


# ----------------------------------------------------------------------------- weights round trips
def _perturbed(ext) -> dict:
    """The tower's state dict moved away from the seeded init, so that a load that silently did
    nothing would show (every tensor up to 1 M values: norms, biases, embeddings, small
    matrices; cheap even for ViT-L)."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for v in ext.model.state_dict().values():
            if v.is_floating_point() and v.numel() <= 1_000_000:
                v.add_(torch.randn(v.shape, generator=g) * 0.01)
    return dict(ext.model.state_dict())


def _timm_swin_to_hf_legacy(sd: dict) -> dict:
    """timm Swin-T names -> the transformers-4 names of MedCLIP's released checkpoint."""
    import re

    out = {}
    for k, v in sd.items():
        if m := re.match(r"layers\.(\d+)\.downsample\.(.+)", k):
            out[f"encoder.layers.{int(m[1]) - 1}.downsample.{m[2]}"] = v
            continue
        if m := re.match(r"layers\.(\d+)\.blocks\.(\d+)\.(.+)", k):
            p, rest = f"encoder.layers.{m[1]}.blocks.{m[2]}.", m[3]
            if rest.startswith("attn.qkv."):
                kind = rest.rsplit(".", 1)[1]
                for name, part in zip(("query", "key", "value"), v.chunk(3, dim=0)):
                    out[f"{p}attention.self.{name}.{kind}"] = part
                continue
            for a, b in (("norm1.", "layernorm_before."), ("norm2.", "layernorm_after."),
                         ("attn.relative_position_bias_table", "attention.self.relative_position_bias_table"),
                         ("attn.proj.", "attention.output.dense."), ("mlp.fc1.", "intermediate.dense."),
                         ("mlp.fc2.", "output.dense.")):
                if rest.startswith(a):
                    out[p + b + rest[len(a):]] = v
                    break
            else:
                raise AssertionError(k)
            continue
        k = k.replace("patch_embed.proj.", "embeddings.patch_embeddings.projection.")
        k = k.replace("patch_embed.norm.", "embeddings.norm.")
        out["layernorm." + k[5:] if k.startswith("norm.") else k] = v
    return out


def _checkpoint(name: str, sd: dict) -> tuple[str, dict]:
    """(file name, state dict) in the layout of the model's released checkpoint."""
    if name == "medclip":  # full MedCLIPModel: vision_model.model.<HF Swin> + text model
        swin = {k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}
        out = {f"vision_model.model.{k}": v for k, v in _timm_swin_to_hf_legacy(swin).items()}
        out["vision_model.projection_head.weight"] = sd["projection_head.weight"]
        key = "vision_model.model.encoder.layers.0.blocks.0.attention.self.relative_position_index"
        out[key] = torch.zeros(2401, dtype=torch.long)
        out["text_model.model.embeddings.word_embeddings.weight"] = torch.zeros(4, 8)
        out["logit_scale"] = torch.tensor(3.0)
        return "pytorch_model.bin", out
    if name == "biomedclip":  # open_clip CLIP: visual.* + text.* + logit_scale
        out = {f"visual.{k}": v for k, v in sd.items()}
        out["text.proj.0.weight"] = torch.zeros(4, 4)
        out["logit_scale"] = torch.tensor(4.6)
        return "open_clip_pytorch_model.bin", out
    if name == "conch":  # CoCa: visual.{trunk,attn_pool_*,ln_*,proj_contrast} + text + decoder
        out = {f"visual.{k}": v for k, v in sd.items()}
        out["visual.proj_contrast"] = torch.zeros(512, 512)
        out["visual.attn_pool_caption.query"] = torch.zeros(256, 768)
        out["text.token_embedding.weight"] = torch.zeros(4, 8)
        return "pytorch_model.bin", out
    return "model.safetensors", dict(sd)  # UNI & co: timm layout


@pytest.mark.parametrize("name", ["medclip", "biomedclip", "conch", "uni"])
def test_state_dict_round_trip_reproduces_features(name, breast, tmp_path):
    ext = _random(name)
    _SHARED.pop(name, None)  # perturbed below: not reusable
    sd = _perturbed(ext)
    x = breast[:2] if name in _SMALL else breast[:1]
    want = ext.extract(x)
    del ext
    fname, ckpt = _checkpoint(name, sd)
    path = tmp_path / fname
    if fname.endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in ckpt.items()}, str(path))
    else:
        torch.save(ckpt, path)
    # the released layout in a directory (as unzipped / downloaded), found by its file name
    loaded = create_extractor(name, weights=str(tmp_path), device="cpu")
    got = loaded.extract(x)
    assert np.allclose(got, want, atol=1e-5), float(np.abs(got - want).max())
    ident = loaded.identity()
    assert ident["weights"].startswith("sha256:") and ident["random_init"] is False
    del loaded
    if name in ("uni", "conch"):  # uni: timm layout = own layout; conch: same prefix logic as biomedclip
        return
    own = tmp_path / "sub" / "own.pt"  # the tower's own layout (a state dict saved from .model), as a file
    own.parent.mkdir()
    torch.save(sd, own)
    assert np.allclose(create_extractor(name, weights=str(own), device="cpu").extract(x), want, atol=1e-5)


def test_wrong_checkpoint_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.pt"
    torch.save({"visual.something.weight": torch.zeros(3)}, bad)
    for name in ("conch", "biomedclip", "medclip"):
        with pytest.raises(CbmirError) as info:
            create_extractor(name, weights=str(bad), device="cpu")
        assert "bad.pt" in str(info.value) or "CONCH" in str(info.value) or "MedCLIP" in str(info.value)
    with pytest.raises(CbmirError, match="no such file"):
        create_extractor("uni", weights=str(tmp_path / "missing.bin"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CbmirError, match="no checkpoint files"):
        create_extractor("uni", weights=str(tmp_path / "empty"))


# ----------------------------------------------------------------------------- errors
@pytest.fixture
def empty_hf_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants as hfc

    monkeypatch.setattr(hfc, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hfc, "HF_HUB_OFFLINE", True)
    return tmp_path


@pytest.mark.parametrize("name", [n for n in FOUNDATION if n != "medclip"])
def test_offline_error_is_fast_and_names_access_and_weights(name, empty_hf_cache):
    t0 = time.perf_counter()
    with pytest.raises(CbmirError) as info:
        create_extractor(name)
    assert time.perf_counter() - t0 < 5
    msg = str(info.value)
    assert repr(name) in msg and "--weights" in msg and "not reachable" in msg
    if name in GATED:
        assert f"https://huggingface.co/{GATED[name]}" in msg and "HF_TOKEN" in msg and "request access" in msg


def test_gated_denied_error_names_the_access_step(monkeypatch):
    import httpx
    import huggingface_hub
    from huggingface_hub.errors import GatedRepoError

    from cbmir.ingest.extractors import foundation

    def denied(*a, **k):
        raise GatedRepoError("gated", response=httpx.Response(401, request=httpx.Request("GET", "https://x")))

    monkeypatch.setattr(foundation, "hub_reachable", lambda *a, **k: True)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", denied)
    with pytest.raises(CbmirError) as info:
        create_extractor("uni")
    msg = str(info.value)
    assert "denied" in msg and "401" in msg and "request access at https://huggingface.co/MahmoodLab/UNI" in msg


def test_medclip_without_weights_says_where_to_get_them(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("CBMIR_MEDCLIP_DIR", raising=False)
    with pytest.raises(CbmirError) as info:
        create_extractor("medclip")
    msg = str(info.value)
    assert "medclip_vit_weight.txt" in msg and "--weights DIR" in msg and "pytorch_model.bin" in msg
    assert weights_available(get_spec("medclip")) is False


@pytest.mark.parametrize("name", ["uni", "conch", "medclip", "resnet50"])
def test_cli_run_offline_exits_cleanly(name, tmp_path, data_dir):
    """``cbmir run`` without obtainable weights: exit 2, one ``error:`` line naming the model, the
    access step (gated) and ``--weights``, no traceback. The weights are checked before torch and
    the dataset reader are imported (about 1.5 s here instead of 10-19 s; not asserted)."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "CBMIR_MEDCLIP_DIR")}
    env.update({"CBMIR_DATA_DIR": str(data_dir), "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
                "HOME": str(tmp_path)})  # empty HF cache, no ~/.cache/cbmir/medclip-vit
    res = subprocess.run([sys.executable, "-m", "cbmir.cli", "run", "--dataset", "breastmnist", "--size", "28",
                          "--model", name, "--store-path", str(tmp_path / "store")],
                         capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr + res.stdout
    assert res.stderr.startswith(f"error: no pretrained weights for model '{name}'"), res.stderr
    assert res.stderr.strip().count("\n") == 0, res.stderr  # one line
    assert "--weights" in res.stderr
    if name in GATED:
        assert f"request access at https://huggingface.co/{GATED[name]}" in res.stderr and "HF_TOKEN" in res.stderr


# ----------------------------------------------------------------------------- reference implementations
def test_medclip_backbone_equals_hf_swin():
    """MedCLIP's backbone is HF SwinModel; our timm Swin-T + key conversion gives the same
    pooler_output -> projection -> L2 norm for the same weights (legacy and v5 key names)."""
    transformers = pytest.importorskip("transformers")
    from cbmir.ingest.extractors.foundation import materialize
    from cbmir.ingest.extractors.medclip import _make_medclip, convert_medclip

    torch.manual_seed(1)
    hf = transformers.SwinModel(transformers.SwinConfig()).eval()  # defaults = swin-tiny-patch4-window7-224
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    proj = torch.nn.Linear(768, 512, bias=False)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        ref = torch.nn.functional.normalize(proj(hf(x).pooler_output), dim=-1)
    sd = {f"vision_model.model.{k}": v for k, v in hf.state_dict().items()}
    sd["vision_model.projection_head.weight"] = proj.weight.detach()
    make = lambda: _make_medclip({})  # noqa: E731
    own = set(make().state_dict())
    model = materialize(make, convert_medclip(sd, {}, own), "hf").eval()
    with torch.no_grad():
        assert torch.allclose(model(x), ref, atol=1e-5)


def test_conch_tower_equals_conch_package():
    """With the optional (CC BY-NC-ND) ``conch`` package installed: same weights, same
    ``encode_image(proj_contrast=False, normalize=True)``."""
    pytest.importorskip("conch.open_clip_custom")
    from conch.open_clip_custom import CoCa
    from conch.open_clip_custom.factory import CFG_DIR

    from cbmir.ingest.extractors.conch import _make_conch, convert_conch
    from cbmir.ingest.extractors.foundation import materialize

    cfg = json.loads((CFG_DIR / "conch_ViT-B-16.json").read_text())
    cfg.pop("custom_text", None)
    assert cfg["vision_cfg"]["image_size"] == 448 and cfg["embed_dim"] == 512
    torch.manual_seed(0)
    coca = CoCa(**cfg).eval()
    x = torch.randn(1, 3, 448, 448)
    with torch.no_grad():
        ref = coca.encode_image(x, proj_contrast=False, normalize=True)
    make = lambda: _make_conch({"image_size": 448})  # noqa: E731
    model = materialize(make, convert_conch(coca.state_dict(), {"image_size": 448}, set(make().state_dict())), "coca")
    with torch.no_grad():
        assert torch.allclose(model.eval()(x), ref, atol=1e-5)
