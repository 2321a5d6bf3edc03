"""Encoder registry, weights loading, preprocessing and grid pooling (random-init, depth 1)."""

from __future__ import annotations

import json
import textwrap

import numpy as np
import open_clip
import pytest
import timm
import torch
import torch.nn.functional as F
from open_clip.model import _build_vision_tower
from PIL import Image
from safetensors.torch import save_file

from eva_repro.data.encoders import (
    REGISTRY,
    EncoderError,
    RandomInitWarning,
    get_spec,
    load_encoder,
    pool_grid,
)
from eva_repro.data.images import resize_center_crop
from eva_repro.data.layout import select_tokens

# name -> (width, native grid); every registry entry except the 8B HF model (own test below)
EXPECTED = {
    "EVA02-L-14": (1024, 16), "EVA02-L-14-336": (1024, 24), "EVA02-E-14": (1792, 16),
    "EVA02-E-14-plus": (1792, 16), "EVA01-g-14": (1408, 16), "EVA02-B-16": (768, 14),
    "ViT-L-14": (1024, 16), "ViT-L-14-336": (1024, 24), "ViT-B-16": (768, 14),
    "DINOv2-L-14": (1024, 16), "SigLIP-SO400M-14": (1152, 16),
}


def photo(seed: int = 0, size=(300, 200)) -> Image.Image:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size[1], 0:size[0]]
    base = np.stack([np.sin(xx / (7 + c) + yy / 11 + seed) for c in range(3)], -1) * 90 + 128
    return Image.fromarray((base + rng.normal(0, 15, base.shape)).clip(0, 255).astype(np.uint8))


def test_registry_agrees_with_open_clip():
    assert set(EXPECTED) | {"EVA-CLIP-8B"} == set(REGISTRY)
    for name, spec in REGISTRY.items():
        if spec.backend == "hf" or name.startswith(("DINOv2", "SigLIP")):
            continue
        cfg = open_clip.get_model_config(spec.arch if spec.backend == "open_clip" else name)
        vision = cfg["vision_cfg"]
        assert vision["image_size"] == spec.image_size, name
        if spec.backend == "timm":
            assert vision["timm_model_name"] == spec.arch, name
        else:
            assert cfg["quick_gelu"] is True  # OpenAI weights were trained with QuickGELU
        tag = open_clip.list_pretrained_tags_by_model(name.replace("-quickgelu", ""))[0]
        pcfg = open_clip.get_pretrained_cfg(name, tag)
        assert tuple(pcfg["mean"]) == spec.mean and tuple(pcfg["std"]) == spec.std, name
        assert pcfg["hf_hub"].rstrip("/") in spec.hf_repos, name
    with pytest.raises(EncoderError, match="unknown encoder 'EVA03'.*EVA02-L-14"):
        get_spec("EVA03")
    assert get_spec("DINOv2").name == "DINOv2-L-14"


# real forwards for the defaults and the small ones (DINOv2 / SigLIP in the next test); the
# large ones run the same code on the meta device: shapes without 2-core CPU minutes
REAL_FORWARD = {"EVA02-L-14", "ViT-L-14", "EVA02-B-16", "ViT-B-16"}


@pytest.mark.parametrize("name", list(EXPECTED))
def test_shapes_per_encoder(name):
    width, grid = EXPECTED[name]
    device = "cpu" if name in REAL_FORWARD else "meta"
    with torch.device(device):
        enc = load_encoder(name, "random", depth=1, device=device)
        x = torch.randint(0, 256, (1, 3, enc.image_size, enc.image_size), dtype=torch.uint8)
        with torch.inference_mode():
            tokens = enc(enc.normalize(x))
    assert tokens.shape == (1, 1 + grid * grid, width) and tokens.dtype == torch.float32
    assert enc.native_grid == grid
    if device == "cpu":
        assert torch.isfinite(tokens).all() and tokens.std() > 0.1
    p = enc.provenance
    assert p["weights"] == "random-init, seed 0" and p["depth"] == 1 and p["truncated"]
    assert p["full_depth"] > 1 and p["image_size"] == enc.image_size
    assert p["mean"] == list(REGISTRY[name].mean)
    pooled = pool_grid(tokens, 8)  # the BLIP3-o grid, from 14, 16 or 24 native
    assert select_tokens(pooled, "patch_only").shape == (1, 64, width)
    assert select_tokens(pooled, "cls_patch").shape == (1, 65, width)


def test_summary_token_is_cls_or_attention_pool():
    torch.manual_seed(0)
    x = torch.randn(1, 3, 224, 224)
    enc = load_encoder("DINOv2-L-14", "random", depth=1)
    with torch.inference_mode():
        feats = enc.tokens.model.forward_features(x)
        assert torch.equal(enc(x), feats)  # CLS first, then the patches, no other prefix
    sig = load_encoder("SigLIP-SO400M-14", "random", depth=1)
    with torch.inference_mode():
        feats = sig.tokens.model.forward_features(x)
        out = sig(x)
        assert torch.equal(out[:, 1:], feats)
        assert torch.allclose(out[:, 0], sig.tokens.model.forward_head(feats, pre_logits=True))
    assert "attention-pool" in sig.provenance["token_convention"]


def test_preprocessing_matches_open_clip_transform():
    enc = load_encoder("ViT-L-14", "random", depth=1)
    spec = REGISTRY["ViT-L-14"]
    ref = open_clip.image_transform(224, is_train=False, mean=spec.mean, std=spec.std)
    for img in (photo(0, (300, 200)), photo(1, (180, 400)), photo(2, (224, 224))):
        ours = enc.normalize(resize_center_crop(img, 224)[None])[0]
        torch.testing.assert_close(ours, ref(img), atol=1e-5, rtol=0)


def test_pool_grid():
    torch.manual_seed(0)
    t = torch.randn(2, 1 + 16 * 16, 5)
    p = pool_grid(t, 8)
    assert p.shape == (2, 65, 5) and torch.equal(p[:, 0], t[:, 0])
    grid = t[:, 1:].reshape(2, 16, 16, 5)
    manual = grid.reshape(2, 8, 2, 8, 2, 5).mean(dim=(2, 4)).reshape(2, 64, 5)
    torch.testing.assert_close(p[:, 1:], manual)
    assert pool_grid(t, 16) is t
    t24 = torch.randn(1, 1 + 24 * 24, 3)  # 336 px models: area pooling to 16x16
    area = F.interpolate(t24[:, 1:].transpose(1, 2).reshape(1, 3, 24, 24), size=(16, 16),
                         mode="area").flatten(2).transpose(1, 2)
    torch.testing.assert_close(pool_grid(t24, 16)[:, 1:], area)
    with pytest.raises(EncoderError, match="finer than the encoder's native 16x16"):
        pool_grid(t, 20)
    with pytest.raises(ValueError, match="training_mode"):
        select_tokens(t, "cls_only")


# ---------------------------------------------------------------------------------------------
# weights


def test_weights_file_round_trip_timm_and_open_clip(tmp_path):
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(123)  # not the extractor's seed: equality proves the file was loaded
    trunk = timm.create_model("eva02_large_patch14_clip_224", num_classes=768, depth=1).eval()
    # an open_clip-style checkpoint: visual.trunk.* (with its projection head) + text tower
    sd = {f"visual.trunk.{k}": v for k, v in trunk.state_dict().items()}
    sd["text.token_embedding.weight"] = torch.zeros(10, 4)
    save_file(sd, tmp_path / "eva.safetensors")
    enc = load_encoder("EVA02-L-14", str(tmp_path / "eva.safetensors"), depth=1)
    with torch.inference_mode():
        torch.testing.assert_close(enc(x), trunk.forward_features(x), atol=0, rtol=0)
    assert enc.provenance["weights"] == "file" and len(enc.provenance["weights_sha256"]) == 64

    cfg = open_clip.get_model_config("ViT-L-14-quickgelu")
    visual = _build_vision_tower(cfg["embed_dim"], {**cfg["vision_cfg"], "layers": 1},
                                 quick_gelu=True).eval()
    torch.save({"state_dict": {f"module.visual.{k}": v for k, v in visual.state_dict().items()}},
               tmp_path / "clip.pt")
    enc = load_encoder("ViT-L-14", str(tmp_path / "clip.pt"), depth=1, flag="--clip")
    visual.output_tokens, visual.proj = True, None
    with torch.inference_mode():
        pooled, patches = visual(x)
        ours = enc(x)
    torch.testing.assert_close(ours[:, 1:], patches, atol=0, rtol=0)
    torch.testing.assert_close(ours[:, 0], pooled, atol=0, rtol=0)


def test_full_depth_file_loads_into_truncated_encoder(tmp_path):
    torch.manual_seed(5)
    deep = timm.create_model("eva02_base_patch16_clip_224", num_classes=0, depth=2).eval()
    save_file(deep.state_dict(), tmp_path / "w.safetensors")
    enc = load_encoder("EVA02-B-16", str(tmp_path / "w.safetensors"), depth=1)
    deep.blocks = deep.blocks[:1]
    x = torch.randn(1, 3, 224, 224)
    with torch.inference_mode():
        torch.testing.assert_close(enc(x), deep.forward_features(x), atol=0, rtol=0)


def test_mismatched_or_unreadable_weights_fail_in_one_line(tmp_path):
    save_file(timm.create_model("eva02_base_patch16_clip_224", num_classes=0, depth=1)
              .state_dict(), tmp_path / "base.safetensors")
    with pytest.raises(EncoderError) as e:
        load_encoder("EVA02-L-14", str(tmp_path / "base.safetensors"), depth=1)
    msg = str(e.value)
    assert "\n" not in msg and "base.safetensors" in msg and "do not match EVA02-L-14" in msg
    assert "shape mismatches" in msg and "--eva model" in msg
    with pytest.raises(EncoderError, match="missing.*blocks.1"):  # depth-1 file, depth-2 model
        load_encoder("EVA02-B-16", str(tmp_path / "base.safetensors"), depth=2)
    with pytest.raises(EncoderError, match="missing"):  # EVA weights for OpenAI CLIP
        load_encoder("ViT-B-16", str(tmp_path / "base.safetensors"), depth=1, flag="--clip")
    (tmp_path / "junk.pt").write_text("not a checkpoint")
    with pytest.raises(EncoderError, match="junk.pt: cannot read weights"):
        load_encoder("EVA02-B-16", str(tmp_path / "junk.pt"), depth=1)
    with pytest.raises(EncoderError, match="no such file"):
        load_encoder("EVA02-B-16", str(tmp_path / "absent.safetensors"))
    with pytest.raises(EncoderError, match="exceeds ViT-B-16's 12 blocks"):
        load_encoder("ViT-B-16", "random", depth=13)


def test_auto_uses_hf_cache_else_warns_random(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.warns(RandomInitWarning, match="RANDOM initialisation"):
        enc = load_encoder("EVA02-B-16", "auto", depth=1, seed=3)
    assert enc.provenance["weights"] == "random-init, seed 3"

    repo = tmp_path / "hub" / "models--timm--eva02_base_patch16_clip_224.merged2b_s8b_b131k"
    snap = repo / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    torch.manual_seed(9)
    trunk = timm.create_model("eva02_base_patch16_clip_224", num_classes=512, depth=1).eval()
    save_file({f"visual.trunk.{k}": v for k, v in trunk.state_dict().items()},
              snap / "open_clip_model.safetensors")
    enc = load_encoder("EVA02-B-16", "auto", depth=1)
    assert enc.provenance["weights"] == "hf-cache"
    x = torch.randn(1, 3, 224, 224)
    with torch.inference_mode():
        torch.testing.assert_close(enc(x), trunk.forward_features(x), atol=0, rtol=0)


# ---------------------------------------------------------------------------------------------
# EVA-CLIP-8B: transformers remote code from a local snapshot (a tiny stand-in with its layout)

CONFIG_PY = """
from transformers import PretrainedConfig

class TinyEvaConfig(PretrainedConfig):
    model_type = "tiny_evaclip"

    def __init__(self, hidden_size=32, patch_size=14, image_size=224, num_layers=2, **kw):
        super().__init__(**kw)
        self.hidden_size, self.patch_size = hidden_size, patch_size
        self.image_size, self.num_layers = image_size, num_layers
"""

MODELING_PY = """
import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPooling
from .configuration_tiny import TinyEvaConfig

class Encoder(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(c.hidden_size, c.hidden_size)
                                    for _ in range(c.num_layers))

class Vision(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.config = c
        self.patch = nn.Conv2d(3, c.hidden_size, c.patch_size, c.patch_size)
        self.cls = nn.Parameter(torch.randn(c.hidden_size))
        self.encoder = Encoder(c)
        self.post_layernorm = nn.LayerNorm(c.hidden_size)

    def forward(self, pixel_values, return_dict=True):
        x = self.patch(pixel_values).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], 1, -1), x], 1)
        for layer in self.encoder.layers:
            x = x + torch.tanh(layer(x))
        return BaseModelOutputWithPooling(last_hidden_state=x,
                                          pooler_output=self.post_layernorm(x[:, 0]))

class TinyEvaModel(PreTrainedModel):
    config_class = TinyEvaConfig
    base_model_prefix = "tiny"

    def __init__(self, config):
        super().__init__(config)
        self.vision_model = Vision(config)
        self.text_projection = nn.Linear(4, 4)
        self.post_init()

    def _init_weights(self, module):
        pass
"""


def test_eva_clip_8b_path_loads_remote_code_snapshot(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    import transformers.dynamic_module_utils as dmu

    monkeypatch.setattr(dmu, "HF_MODULES_CACHE", str(tmp_path / "modules"))
    snap = tmp_path / "EVA-CLIP-8B"
    snap.mkdir()
    (snap / "configuration_tiny.py").write_text(textwrap.dedent(CONFIG_PY))
    (snap / "modeling_tiny.py").write_text(textwrap.dedent(MODELING_PY))
    (snap / "config.json").write_text(json.dumps({
        "model_type": "tiny_evaclip", "architectures": ["TinyEvaModel"], "hidden_size": 32,
        "patch_size": 14, "num_layers": 2,
        "auto_map": {"AutoConfig": "configuration_tiny.TinyEvaConfig",
                     "AutoModel": "modeling_tiny.TinyEvaModel"}}))
    torch.manual_seed(0)
    sd = {"vision_model.patch.weight": torch.randn(32, 3, 14, 14) * 0.02,
          "vision_model.patch.bias": torch.zeros(32), "vision_model.cls": torch.randn(32),
          "vision_model.post_layernorm.weight": torch.ones(32) * 2,
          "vision_model.post_layernorm.bias": torch.zeros(32),
          "text_projection.weight": torch.zeros(4, 4), "text_projection.bias": torch.zeros(4)}
    for i in range(2):
        sd[f"vision_model.encoder.layers.{i}.weight"] = torch.randn(32, 32) * 0.1
        sd[f"vision_model.encoder.layers.{i}.bias"] = torch.zeros(32)
    save_file(sd, snap / "model.safetensors")

    with pytest.raises(EncoderError, match="needs its model code"):
        load_encoder("EVA-CLIP-8B", "random")
    enc = load_encoder("EVA-CLIP-8B", str(snap), depth=1)
    x = torch.randn(2, 3, 224, 224)
    with torch.inference_mode():
        out = enc(x)
    assert out.shape == (2, 257, 32) and enc.native_grid == 16
    # every token after the final norm: per-token mean 0, std = the norm's weight (2)
    torch.testing.assert_close(out.mean(-1), torch.zeros(2, 257), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.std(-1, unbiased=False), torch.full((2, 257), 2.0),
                               atol=1e-3, rtol=0)
    p = enc.provenance
    assert p["weights"] == "file" and p["depth"] == 1 and p["full_depth"] == 2
    assert len(p["weights_sha256"]) == 64


def test_blip3o_target_layer_and_resolution_eva02_e_at_448():
    """EVA02-E-14-plus at 448 px: a 32 x 32 grid of 1792-d tokens; last_block = the tokens the
    final norm would normalise (depth-2 random tower)."""
    x = torch.randn(1, 3, 448, 448, generator=torch.Generator().manual_seed(0))
    last = load_encoder("EVA02-E-14-plus", "random", depth=2, image_size=448,
                        token_source="last_block")
    final = load_encoder("EVA02-E-14-plus", "random", depth=2, image_size=448)
    assert (last.image_size, last.native_grid, last.width) == (448, 32, 1792)
    assert last.provenance["token_source"] == "last_block"
    assert last.provenance["image_size"] == 448 and last.provenance["native_image_size"] == 224
    with torch.inference_mode():
        raw, normed = last(x), final(x)
        assert raw.shape == (1, 1 + 32 * 32, 1792)
        torch.testing.assert_close(final.tokens.model.norm(raw), normed, atol=1e-5, rtol=1e-5)
    # not normalised: a LayerNorm output has per-token mean 0 and std 1, these do not
    assert normed[0, 1:].std(dim=-1).mean() == pytest.approx(1.0, abs=0.01)
    assert abs(raw[0, 1:].std(dim=-1).mean().item() - 1.0) > 0.1
    # 32 -> 8 pooling is an exact 4 x 4 mean per cell
    pooled = pool_grid(raw, 8)[:, 1:]
    blocks = raw[:, 1:].reshape(1, 8, 4, 8, 4, 1792).mean(dim=(2, 4)).reshape(1, 64, 1792)
    torch.testing.assert_close(pooled, blocks, atol=1e-5, rtol=1e-5)


def test_resolution_and_token_source_for_open_clip_with_weights(tmp_path):
    cfg = open_clip.get_model_config("ViT-B-16-quickgelu")
    visual = _build_vision_tower(cfg["embed_dim"], {**cfg["vision_cfg"], "layers": 1},
                                 quick_gelu=True)
    save_file({f"visual.{k}": v.contiguous() for k, v in visual.state_dict().items()},
              tmp_path / "clip.safetensors")
    enc = load_encoder("ViT-B-16", str(tmp_path / "clip.safetensors"), depth=1, image_size=320,
                       token_source="last_block", flag="--clip")  # 224-px positions resampled
    assert enc.native_grid == 20 and enc.image_size == 320
    with torch.inference_mode():
        assert enc(torch.randn(1, 3, 320, 320)).shape == (1, 1 + 400, 768)
    with pytest.raises(EncoderError, match="not a multiple of ViT-B-16's 16-px patches"):
        load_encoder("ViT-B-16", "random", depth=1, image_size=300, flag="--clip")
    with pytest.raises(EncoderError, match="token_source"):
        load_encoder("ViT-B-16", "random", depth=1, token_source="penultimate")
