"""Training-step throughput of the DiT presets at real token sizes, against a measured matmul peak.

Real size: 256 target tokens of 4096-d EVA-CLIP-8B, 256 condition tokens of 1024-d CLIP, batch 8
(CPU); on CUDA every preset, eager and compiled, also at BLIP3-o's 64 x 1792 target, with
8192 tokens per batch.
Achieved FLOP/s = 3 x forward FLOPs (forward + backward) x samples/s; the peak is the best of a
few large fp32 matmuls timed in the same process (CPU) or bf16 ones (CUDA).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from eva_repro.flow import transport
from eva_repro.model import DiT, DiTConfig, estimate_flops
from eva_repro.utils.devices import autocast, pick_device


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int = 2048, repeats: int = 5) -> float:
    """Best observed GFLOP/s of an n x n x n matmul."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    best = 0.0
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        a @ b
        _sync(device)
        best = max(best, 2 * n**3 / (time.perf_counter() - start) / 1e9)
    return best


def train_step_throughput(
    preset: str, device: torch.device, batch: int = 8, tokens: int = 256, target_dim: int = 4096,
    cond_dim: int = 1024, steps: int = 5, warmup: int = 2, compile: bool = False,
) -> dict:
    cfg = DiTConfig.preset(preset, target_dim=target_dim, cond_dim=cond_dim)
    model = DiT(cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    if compile:  # fuses the norms, RoPE and modulation elementwise work around the matmuls
        model = torch.compile(model)
    target = torch.randn(batch, tokens, target_dim, device=device)
    cond = torch.randn(batch, tokens, cond_dim, device=device)
    def step() -> None:
        with autocast(device):
            loss = transport.flow_loss(model, target, cond).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(warmup):
        step()
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    seconds = (time.perf_counter() - start) / steps
    flops = 3 * estimate_flops(cfg, tokens, tokens) * batch
    return {
        "preset": preset,
        "compiled": compile,
        "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
        "batch": batch,
        "step_s": round(seconds, 4),
        "samples_per_s": round(batch / seconds, 2),
        "gflop_per_step": round(flops / 1e9, 1),
        "achieved_gflops": round(flops / seconds / 1e9, 1),
    }


# (tokens, target width, condition width): EVA-CLIP-8B's 16x16 grid, and BLIP3-o's 8x8 target
SHAPES = {"256x4096": (256, 4096, 1024), "blip3o-64x1792": (64, 1792, 1024)}
TOKENS_PER_BATCH = 8192  # CUDA batch: enough rows per matmul to fill a GPU at either shape


def run(output_dir: Path, quick: bool) -> dict:
    device = pick_device()
    cuda = device.type == "cuda"
    peak_dtype = torch.bfloat16 if cuda else torch.float32
    peak = matmul_peak(device, peak_dtype, n=8192 if cuda else 2048)
    if cuda:  # every preset at both shapes, eager and compiled
        presets = ["tiny"] if quick else ["tiny", "small", "base", "large"]
        runs = [dict(preset=p, shape=s, compile=c) for p in presets for s in SHAPES
                for c in ((False,) if quick else (False, True))]
    else:  # compiling is slow on a CPU: one compiled run, only in the full form
        runs = [dict(preset="tiny", shape="256x4096", compile=False)]
        if not quick:
            runs += [dict(preset="small", shape="256x4096", compile=False),
                     dict(preset="tiny", shape="256x4096", compile=True)]
    results = []
    for r in runs:
        tokens, target_dim, cond_dim = SHAPES[r["shape"]]
        batch = TOKENS_PER_BATCH // tokens if cuda else 8
        result = train_step_throughput(r["preset"], device, batch=batch, tokens=tokens,
                                       target_dim=target_dim, cond_dim=cond_dim,
                                       steps=2 if quick else (20 if cuda else 5),
                                       warmup=5 if cuda else 2, compile=r["compile"])
        results.append({"shape": r["shape"], **result})
        if cuda:
            torch.cuda.empty_cache()
    peak = max(peak, matmul_peak(device, peak_dtype, n=8192 if cuda else 2048))  # warm clocks
    for r in results:
        r["fraction_of_peak"] = round(r["achieved_gflops"] / peak, 3)
    return {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "threads": torch.get_num_threads(),
        "compute_dtype": "bfloat16 autocast" if cuda else "float32",
        "shapes": {k: dict(zip(("tokens", "target_dim", "cond_dim"), v, strict=True))
                   for k, v in SHAPES.items()},
        "matmul_peak_gflops": round(peak, 1),
        "presets": results,
        "goal": "tiny reaches >= 70% of the matmul peak",
    }
