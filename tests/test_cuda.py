"""The CUDA path: bf16 autocast training per preset, GQA attention, fused AdamW, torch.compile,
GPU -> CPU checkpoints, torchrun with NCCL, FSDP2 on one GPU, autocast extraction, the sampler
and CFG.

Every test here is marked `cuda`: skipped cleanly without a GPU (conftest.py), run by
`make test-gpu`. bf16 results are compared with fp32 CPU ones by cosine or a bf16-sized
tolerance, never bit for bit.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from eva_repro.data import shards
from eva_repro.data.extract import extract
from eva_repro.evaluation.generate import generate_batch
from eva_repro.flow import transport
from eva_repro.flow.transport import token_cosine
from eva_repro.model import PRESETS, DiT, DiTConfig
from eva_repro.model import checkpoint as ckpt
from eva_repro.model.dit import Attention
from eva_repro.training import optim
from eva_repro.training import train as train_mod
from eva_repro.utils import rng

pytestmark = pytest.mark.cuda
ROOT = Path(__file__).resolve().parents[1]
CUDA = torch.device("cuda")


@pytest.fixture(scope="module")
def data(synth_shards):
    """16 tokens of 64-d condition -> 128-d target: small enough for every preset."""
    return synth_shards(256, grid=4, clip_dim=64, eva_dim=128, seed=0, shard_size=128)


def _cfg(data_dir, out, **kw):
    base = dict(data_dir=str(data_dir), output_dir=str(out), model_size="tiny", batch_size=16,
                max_steps=4, log_every=1, save_every=1000, eval_every=1000, eval_samples=8,
                eval_sampler_steps=4, num_workers=2, progress=False, tensorboard=False, seed=0,
                device="cuda")
    base.update(kw)
    return base


def _losses(run_dir):
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [r["loss"] for r in map(json.loads, lines) if "loss" in r]


def _cosine(a, b):
    return token_cosine(a.float().cpu(), b.float().cpu()).mean().item()


def _perturbed(model: DiT, seed: int = 0) -> DiT:
    """Zero-init layers made non-zero, so outputs depend on every part of the network."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    return model


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_bf16_training_per_preset(tmp_path, data, preset):
    """Every preset trains under bf16 autocast with fp32 master weights; tiny learns in 60 steps."""
    steps = 60 if preset == "tiny" else 3
    summary = train_mod.train(_cfg(data, tmp_path / preset, model_size=preset, max_steps=steps,
                                   learning_rate=3e-3 if preset == "tiny" else None,
                                   eval_every=steps))
    losses = _losses(tmp_path / preset)
    assert summary["steps"] == steps and all(map(lambda x: x == x and abs(x) < 1e3, losses))
    state = ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path / preset))
    assert all(t.dtype == torch.float32 for t in state.model.values())
    if preset == "tiny":
        assert summary["final_loss"] < 0.7 * losses[0]
        assert summary["heldout_cosine"] > 0.5


def test_gqa_attention_on_cuda_equals_the_expanded_kv_cpu_path():
    cfg = DiTConfig(target_dim=8, cond_dim=8, hidden=256, depth=1, n_heads=8, n_kv_heads=2)
    torch.manual_seed(0)
    attn = Attention(cfg)
    with torch.no_grad():
        attn.cond_gate.fill_(0.5)  # the cross-attention contributes too
    x, c = torch.randn(2, 64, 256), torch.randn(2, 16, 256)
    ones = (torch.ones(64, cfg.head_dim // 2), torch.zeros(64, cfg.head_dim // 2))
    ones_c = (torch.ones(16, cfg.head_dim // 2), torch.zeros(16, cfg.head_dim // 2))
    with torch.no_grad():
        ref = attn(x, c, ones, ones_c)  # CPU: K/V expanded with repeat_interleave
        gpu = attn.to(CUDA)
        args = (x.to(CUDA), c.to(CUDA), tuple(t.to(CUDA) for t in ones),
                tuple(t.to(CUDA) for t in ones_c))
        fp32 = gpu(*args)  # CUDA: scaled_dot_product_attention(enable_gqa=True)
        with torch.autocast("cuda", torch.bfloat16):
            bf16 = gpu(*args)
    torch.testing.assert_close(fp32.cpu(), ref, atol=1e-4, rtol=1e-3)
    torch.testing.assert_close(bf16.float().cpu(), ref, atol=5e-2, rtol=5e-2)
    assert _cosine(bf16.unsqueeze(0), ref.unsqueeze(0)) > 0.999


def test_the_trainer_uses_fused_adamw_and_it_matches_foreach(tmp_path, data, monkeypatch):
    seen = []

    class Recording(torch.optim.AdamW):
        def __init__(self, *args, **kwargs):
            seen.append(kwargs.get("fused"))
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(torch.optim, "AdamW", Recording)
    train_mod.train(_cfg(data, tmp_path / "run", max_steps=2))
    assert seen == [True]
    monkeypatch.undo()

    def three_steps(fused):
        torch.manual_seed(0)
        model = _perturbed(DiT(DiTConfig(target_dim=128, cond_dim=64, hidden=128, depth=2,
                                         n_heads=4, n_kv_heads=2))).to(CUDA)
        groups = optim.param_groups(model, weight_decay=0.01)
        opt = torch.optim.AdamW(groups, lr=1e-3, fused=fused, foreach=None if fused else True)
        g = torch.Generator(device=CUDA).manual_seed(1)
        for _ in range(3):
            x1 = torch.randn(4, 16, 128, device=CUDA, generator=g)
            c = torch.randn(4, 16, 64, device=CUDA, generator=g)
            loss = transport.flow_loss(model, x1, c, generator=g).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
        return model.state_dict()

    fused, foreach = three_steps(True), three_steps(False)
    for k in fused:
        torch.testing.assert_close(fused[k], foreach[k], atol=1e-5, rtol=1e-4)


def test_compiled_training_follows_the_eager_losses(tmp_path, data):
    eager = train_mod.train(_cfg(data, tmp_path / "eager", max_steps=8))
    compiled = train_mod.train(_cfg(data, tmp_path / "compiled", max_steps=8, compile=True))
    a, b = _losses(tmp_path / "eager"), _losses(tmp_path / "compiled")
    assert compiled["steps"] == eager["steps"] == 8
    # same data and initial weights; bf16 kernels fused differently drift only slightly
    assert b == pytest.approx(a, rel=5e-2)
    assert ckpt.load_model(tmp_path / "compiled").model.config.hidden == 384  # plain state dict


def test_saved_on_gpu_loads_and_samples_on_cpu(tmp_path, data):
    train_mod.train(_cfg(data, tmp_path / "run", max_steps=30, learning_rate=3e-3))
    model = ckpt.load_model(tmp_path / "run").model  # CPU, whatever device it was saved from
    assert next(model.parameters()).device.type == "cpu"
    cond = shards.ShardReader(data).read_rows(0, 0, 8)["clip"].float()
    on_cpu, _ = generate_batch(model, cond, steps=10)
    on_gpu, _ = generate_batch(model.to(CUDA), cond, steps=10)  # bf16 autocast on CUDA
    assert on_gpu.device.type == "cuda"
    assert _cosine(on_gpu, on_cpu) > 0.99


@pytest.mark.parametrize("cfg_scale", [1.0, 3.0])
@pytest.mark.parametrize("method", ["euler", "heun", "dopri5"])
def test_sampler_and_cfg_on_cuda_match_cpu(method, cfg_scale):
    torch.manual_seed(0)
    model = _perturbed(DiT(DiTConfig(target_dim=128, cond_dim=64, hidden=128, depth=2, n_heads=4,
                                     n_kv_heads=2, tokens=16))).eval()
    cond = torch.randn(4, 16, 64)
    cpu, nfe_cpu = generate_batch(model, cond, steps=8, method=method, cfg_scale=cfg_scale,
                                  tol=1e-3)
    gpu, nfe_gpu = generate_batch(model.to(CUDA), cond, steps=8, method=method,
                                  cfg_scale=cfg_scale, tol=1e-3)
    assert torch.isfinite(gpu).all() and _cosine(gpu, cpu) > 0.99
    if method != "dopri5":  # adaptive steps may differ by a step or two under bf16
        assert nfe_gpu == nfe_cpu


def _torchrun(args, tmp_path, nproc):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--standalone", "-m", "eva_repro", "train", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _cli_args(data_dir, out, steps=3):
    return ["--data_dir", str(data_dir), "--output_dir", str(out), "--model_size", "tiny",
            "--batch_size", "8", "--max_steps", str(steps), "--eval_samples", "4",
            "--eval_sampler_steps", "2", "--no_progress", "--no_tensorboard", "--device", "cuda"]


def test_torchrun_on_the_gpus(tmp_path, data):
    """One process per GPU (up to 2): NCCL DDP with two or more GPUs, a plain GPU run with one."""
    nproc = min(2, torch.cuda.device_count())
    out = tmp_path / "run"
    _torchrun(_cli_args(data, out), tmp_path, nproc)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["world_size"] == nproc
    assert ckpt.load_model(out).model.config.hidden == 384


def test_fsdp2_on_one_gpu_under_torchrun(tmp_path, data):
    """FSDP2 makes a one-rank NCCL group; the checkpoint holds full, unsharded fp32 tensors."""
    out = tmp_path / "fsdp"
    _torchrun([*_cli_args(data, out), "--fsdp"], tmp_path, 1)
    state = ckpt.load_checkpoint(ckpt.latest_checkpoint(out))
    ref = DiT(DiTConfig.preset("tiny", target_dim=128, cond_dim=64, tokens=16)).state_dict()
    for k, v in ref.items():
        assert state.model[k].shape == v.shape and state.model[k].dtype == torch.float32
    # and resumes in this process without FSDP
    resumed = train_mod.train(_cfg(data, out, batch_size=8, max_steps=4, resume="auto"))
    assert resumed["steps"] == 4 and resumed["resumed_from"].endswith("step-00000003")


def test_autocast_extraction_matches_fp32(tmp_path):
    sys.path.insert(0, str(Path(__file__).parent))
    from test_extract import SMALL, write_images

    images = write_images(tmp_path / "images", 8)
    small = {**SMALL, "encoder_depth": 2, "num_workers": 2, "device": "cuda"}
    extract(images, tmp_path / "bf16", autocast="bf16", **small)
    extract(images, tmp_path / "fp32", autocast="none", **small)
    a, b = shards.ShardReader(tmp_path / "bf16"), shards.ShardReader(tmp_path / "fp32")
    assert a.keys() == b.keys() and len(a.keys()) == 8
    ra, rb = a.read_rows(0, 0, 8), b.read_rows(0, 0, 8)
    for name in ("eva", "clip"):
        assert _cosine(ra[name], rb[name]) > 0.99, name


def test_lumina_next_backbone_trains_in_bf16_and_samples_like_on_cpu(tmp_path, data):
    """diffusers' LuminaNextDiT2DModel (complex 2D RoPE table) under bf16 autocast: finite
    losses, and the exported model samples on CUDA as on CPU."""
    out = tmp_path / "lumina"
    summary = train_mod.train(_cfg(data, out, backbone="lumina-next", max_steps=4))
    assert summary["nonfinite_steps"] == 0 and torch.isfinite(torch.tensor(_losses(out))).all()
    model = ckpt.load_model(out).model
    clip = shards.ShardReader(data).read_rows(0, 0, 4)["clip"].float()
    cpu, _ = generate_batch(model, clip, steps=4)
    gpu, _ = generate_batch(model.to(CUDA), clip, steps=4)
    assert _cosine(cpu, gpu) > 0.99


def test_counter_based_noise_on_cuda_is_the_cpus():
    """The trainer's noise is integer hashing: the same uniforms on both devices, bit for bit."""
    keys = torch.arange(8, dtype=torch.int64) ^ rng.mix_seed("noise", 0, 0)
    torch.testing.assert_close(rng.uniform(keys.to(CUDA), 1000).cpu(), rng.uniform(keys, 1000),
                               rtol=0, atol=0)
    torch.testing.assert_close(rng.normal(keys.to(CUDA), (10, 100)).cpu(), rng.normal(keys, (10, 100)),
                               rtol=0, atol=1e-5)
