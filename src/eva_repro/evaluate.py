"""`eva-repro evaluate`: how close generated EVA tokens are to the real ones, against baselines.

    eva-repro evaluate --model_path RUN_OR_MODEL_DIR --embeddings_dir SHARDS --output_dir OUT

Which samples: when the model path is a training run whose split.json was made on the same shard
directory, the run's held-out keys (never trained on). Otherwise no split is known: the given
shards are split by key hash (`shards.split_indices`, --eval_fraction), baselines are fitted on
one part and everything is scored on the other, and the report says the model may have seen them.

What (all cosines after per-token L2 normalisation, see `eva_repro.metrics`):
  cosine       per token (mean, median, p10), per image, of mean-pooled embeddings, quality bands
  baselines    mean token per position and ridge regression, fitted on training samples only
  controls     conditions shuffled across images (must fall), two samples per condition (diversity)
  retrieval    mean-pooled generated vs true targets in a pool: recall@1, @5
  distribution Frechet distance (pooled, per token) and k-NN precision / recall, for the DiT
               and both baselines: a regressor's collapsed spread shows here, not in cosine
  velocity     cos(predicted v, true v) at fixed t on held-out pairs
  sweep        cosine vs network evaluations for euler / heun / dopri5, time shift, CFG scales

`build_report` puts the numbers in one dict; `eva_repro.report` writes it out (report.json,
report.md, the plots). Deterministic for a given --seed (noise per sample, seeded subsets).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import platform
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from eva_repro import __version__ as _version
from eva_repro import flow, metrics, shards
from eva_repro.baselines import fit_baselines
from eva_repro.checkpoint import load_model
from eva_repro.devices import autocast, pick_device
from eva_repro.errors import UserError
from eva_repro.flags import add_flags, option, values
from eva_repro.generate import (
    METHODS,
    SAMPLERS,
    ModelDataMismatch,
    SamplerOptions,
    add_sampler_args,
    check_sampler,
    generate_batch,
    resolve_sampler,
)
from eva_repro.layout import drops_cls, has_cls, pairs_for_model, tokens_for_model
from eva_repro.lockfile import DirectoryLock
from eva_repro.model.dit import score_caveat
from eva_repro.model.plugin import OVERRIDE_HELP
from eva_repro.progress import progress_bar
from eva_repro.report import write_outputs

SWEEP_SIZES = ("auto", "none", "small", "full")  # auto: full on CUDA, small on CPU


def check_model_fits_data(model: torch.nn.Module, manifest: shards.Manifest, model_path: Any) -> None:
    """One-line error when the model's dims or token layout do not match the shards."""
    cfg, where = model.config, manifest.root / shards.MANIFEST
    problems = []
    if cfg.cond_dim != manifest.clip_dim:
        problems.append(f"clip_dim {manifest.clip_dim} vs model cond_dim {cfg.cond_dim}")
    if cfg.target_dim != manifest.eva_dim:
        problems.append(f"eva_dim {manifest.eva_dim} vs model target_dim {cfg.target_dim}")
    if has_cls(cfg.token_mode) and not manifest.include_cls:
        problems.append(f"include_cls=False vs model token_mode {cfg.token_mode!r}")
    tokens = manifest.tokens - int(drops_cls(manifest.include_cls, cfg.token_mode))
    if cfg.fixed_tokens not in (None, tokens):
        problems.append(f"tokens {tokens} vs the model's {cfg.fixed_tokens}")
    if problems:
        raise ModelDataMismatch(f"{where}: shards do not match the model at {model_path} ("
                                f"{'; '.join(problems)}); evaluate on embeddings from the same "
                                "encoders and token mode the model was trained on")


# ---------------------------------------------------------------------------------------------
# options


@dataclass
class EvalOptions(SamplerOptions):
    """How `evaluate` scores a model: the sampler's settings (their flags come from
    `generate.add_sampler_args`, shared with `sample`) and these; `eva-repro evaluate --FIELD`
    sets each."""

    num_samples: int = option(1000, "held-out images to evaluate (all if fewer)")
    backbone: str | None = option(None, OVERRIDE_HELP)
    batch_size: int = option(64, "samples per sampler batch")
    device: str | None = option(None, "default: cuda if available, else cpu")
    eval_fraction: float = option(0.1, "held-out fraction when the model path carries no split "
                                  "for this data")
    group_by: str | None = option(None, "with that key-hash split, hold out keys in groups as "
                                  "`train --group_by` does ('prefix' or a regex); default: the "
                                  "run's own grouping, else each key alone",
                                  metavar="prefix|REGEX")
    baseline_samples: int = option(2000, "training samples to fit the baselines on (at most)")
    control_samples: int = option(256, "images for the shuffled-condition control and diversity")
    retrieval_pool: int = option(1000, "images per retrieval pool")
    verify_checksums: bool = option(True, shards.VERIFY_HELP, aliases=["--no_verify"])
    t_values: tuple[float, ...] = (0.1, 0.3, 0.5, 0.7, 0.9)  # times of the velocity metric
    sweep: str = option("auto", "sampler sweep size (cosine vs NFE); auto: full on CUDA, small "
                        "on CPU", choices=SWEEP_SIZES)
    sweep_samples: int = option(0, "images in the sweep (0: 32 for small, 256 for full)")
    sweep_shift: float = option(3.0, "the shifted schedule the sweep compares to shift 1")
    plots: bool = option(True, "no PNG plots")
    progress: bool = option(True, "no progress bars (the flag train, extract and sample take)",
                            aliases=["--quiet"])


# ---------------------------------------------------------------------------------------------
# which samples


def resolve_split(
    loaded: Any, manifest: shards.Manifest, keys: list[str], eval_fraction: float,
    group_by: str | None = None,
) -> tuple[list[int], list[int], dict]:
    """(heldout rows, training rows, description) for this model and shard directory.

    The description names the grouping (`group_by`: None = every key on its own, with the
    number of groups in all and held out): the run's own when its split is used, else
    `group_by`, falling back to the run's."""
    split, root = loaded.split, manifest.root.resolve()
    run_group_by = split.get("group_by") if split else None
    if split is not None:
        split_dir = Path(split.get("data_dir", "")).resolve() if split.get("data_dir") else None
        if split_dir == root:
            wanted = set(split.get("heldout_keys", []))
            heldout = [i for i, k in enumerate(keys) if k in wanted]
            train = [i for i, k in enumerate(keys) if k not in wanted]
            if heldout:
                return heldout, train, {
                    "known": True,
                    "source": f"{loaded.run_dir}/split.json",
                    "model_trained_on": f"the training split of {root} ({len(train)} samples"
                    + (f", at most {split['max_samples']} used" if split.get("max_samples") else "")
                    + ")",
                    "evaluated_on": f"the run's held-out split ({len(heldout)} samples, never "
                    "trained on)",
                    "baselines_fit_on": "the run's training split",
                    **shards.split_grouping(keys, heldout, run_group_by),
                }
            reason = f"split.json lists no held-out key present in {root}"
        else:
            reason = f"the run was trained on {split_dir}, not on {root}"
    else:
        reason = f"{loaded.source} at the model path carries no split.json"
    fraction = float(split.get("eval_fraction", eval_fraction)) if split else eval_fraction
    salt = split.get("salt", shards.SPLIT_SALT) if split else shards.SPLIT_SALT
    group_by = group_by if group_by is not None else run_group_by
    train, heldout = shards.split_indices(keys, fraction, salt, group_by)
    if not heldout:
        raise shards.ShardError(f"{manifest.root}: none of its {len(keys)} samples falls in the "
                                f"held-out fraction {fraction}; raise --eval_fraction or use more data")
    return heldout, train, {
        "known": False,
        "source": f"key-hash split of the given shards (eval_fraction={fraction}, salt {salt!r}"
        + (f", group_by {group_by!r}" if group_by else "") + ")",
        "note": f"no training split known ({reason}): the model may have been trained on the "
        "evaluated samples",
        "model_trained_on": "unknown",
        "evaluated_on": f"the key-hash held-out part of {root} ({len(heldout)} samples)",
        "baselines_fit_on": f"the other part of {root} ({len(train)} samples)",
        **shards.split_grouping(keys, heldout, group_by),
    }


def seeded_subset(indices: list[int], n: int, seed: int) -> list[int]:
    """n of `indices` chosen by a seeded permutation, returned sorted (sequential reads)."""
    if n >= len(indices):
        return list(indices)
    perm = torch.randperm(len(indices), generator=torch.Generator().manual_seed(seed))[:n]
    return sorted(indices[i] for i in perm.tolist())


# ---------------------------------------------------------------------------------------------
# the main pass


@dataclass
class Collected:
    """Everything the report needs from the main pass, kept small: [N, T] cosines, [N, D] pools,
    and the streamed mean and covariance of the (normalised) tokens, for the distribution metrics."""

    dit: list[torch.Tensor] = field(default_factory=list)
    mean: list[torch.Tensor] = field(default_factory=list)
    ridge: list[torch.Tensor] = field(default_factory=list)
    shuffled: list[torch.Tensor] = field(default_factory=list)
    diversity: list[torch.Tensor] = field(default_factory=list)
    pooled: dict[str, list[torch.Tensor]] = field(
        default_factory=lambda: {"dit": [], "mean": [], "ridge": [], "target": []})
    tokens: dict[str, metrics.Moments] = field(
        default_factory=lambda: {k: metrics.Moments() for k in ("dit", "mean", "ridge", "target")})
    velocity: dict[str, list[tuple[float, int]]] = field(default_factory=dict)
    nfe: list[tuple[int, int]] = field(default_factory=list)

    def cat(self, name: str) -> torch.Tensor:
        return torch.cat(getattr(self, name))

    def add_set(self, name: str, tokens: torch.Tensor, stats_device: torch.device) -> None:
        """One batch [B, T, D] of a predictor's (or the targets') tokens: its pools and moments.
        The D x D float64 moments accumulate on `stats_device` (the GPU when there is one)."""
        self.pooled[name].append(metrics.mean_pool(tokens))
        self.tokens[name].add(flow.normalize_target(tokens.to(stats_device)))


def main_pass(model, reader, eval_idx, baselines, opts: EvalOptions, device, drop_cls: bool
              ) -> tuple[Collected, float]:
    mean_b, ridge_b = baselines
    c = Collected()
    rolled = eval_idx[1:] + eval_idx[:1]  # image i gets the condition of image i+1
    n_control = min(opts.control_samples, len(eval_idx)) if len(eval_idx) > 1 else 0
    bar = progress_bar(total=len(eval_idx), desc="evaluate", unit="img", disable=not opts.progress)
    stats_device = device if device.type == "cuda" else torch.device("cpu")  # float64 moments
    start_time, done = time.perf_counter(), 0
    for (batch, rows), (_, other) in zip(reader.batches(eval_idx, opts.batch_size),
                                         reader.batches(rolled, opts.batch_size), strict=True):
        clip, eva = pairs_for_model(rows["clip"], rows["eva"], drop_cls)
        # noise is keyed by the global row, so an image gets the same noise whatever --num_samples
        gen, nfe = generate_batch(model, clip, opts.steps, opts.method, opts.cfg_scale, opts.shift,
                                  opts.seed, ids=batch)
        gen = gen.cpu()
        c.nfe.append((nfe, len(batch)))
        c.dit.append(flow.token_cosine(gen, eva))
        c.add_set("dit", gen, stats_device)
        c.add_set("target", eva, stats_device)
        mean_pred = mean_b.predict(clip)
        c.mean.append(flow.token_cosine(mean_pred, eva))
        c.add_set("mean", mean_pred, stats_device)
        ridge_pred = ridge_b.predict(clip)
        c.ridge.append(flow.token_cosine(ridge_pred, eva))
        c.add_set("ridge", ridge_pred, stats_device)
        k = max(0, min(len(batch), n_control - done))
        if k:  # controls on the first n_control images: shuffled conditions, a second sample
            shuffled, _ = generate_batch(model, tokens_for_model(other["clip"][:k], drop_cls),
                                         opts.steps, opts.method, opts.cfg_scale, opts.shift,
                                         opts.seed, ids=batch[:k])
            c.shuffled.append(flow.token_cosine(shuffled.cpu(), eva[:k]))
            second, _ = generate_batch(model, clip[:k], opts.steps, opts.method, opts.cfg_scale,
                                       opts.shift, opts.seed + 1, ids=batch[:k])
            c.diversity.append(flow.token_cosine(gen[:k], second.cpu()))
        velocity_fn = flow.guided_velocity(model, clip.to(device))
        with autocast(device):
            v = metrics.velocity_cosine(velocity_fn, eva.to(device), opts.t_values,
                                        flow.sample_noise(batch, *eva.shape[1:], opts.seed))
        for t, value in v.items():
            c.velocity.setdefault(t, []).append((value, len(batch)))
        done += len(batch)
        bar.update(len(batch))
    bar.close()
    return c, done / max(time.perf_counter() - start_time, 1e-9)


def sampler_sweep(model, reader, eval_idx, opts: EvalOptions, device: torch.device,
                  drop_cls: bool) -> list[dict]:
    """Cosine vs network evaluations on a fixed subset, for the samplers, shifts and CFG scales."""
    size = opts.sweep if opts.sweep != "auto" else ("full" if device.type == "cuda" else "small")
    if size == "none":
        return []
    full = size == "full"
    n = opts.sweep_samples or (256 if full else 32)
    subset = eval_idx[:n]
    rows = reader.gather(subset)
    clip, eva = (x.float() for x in pairs_for_model(rows["clip"], rows["eva"], drop_cls))
    shifts = (1.0, opts.sweep_shift)
    configs = []
    for shift in shifts:
        for steps in ((1, 2, 4, 8, 16, 32, 64) if full else (1, 2, 4, 8, 16)):
            configs.append(dict(method="euler", steps=steps, shift=shift))
        for steps in ((1, 2, 3, 4, 6, 8, 16, 32) if full else (1, 2, 4, 8)):
            configs.append(dict(method="heun", steps=steps, shift=shift))
        for tol in ((1e-2, 1e-3, 1e-4, 1e-5) if full else (1e-2, 1e-4)):
            configs.append(dict(method="dopri5", steps=0, shift=shift, tol=tol))
    for cfg_scale in ((1.5, 2.0, 3.0, 4.0) if full else (1.5, 3.0)):
        configs.append(dict(method=opts.method, steps=opts.steps, shift=opts.shift,
                            cfg_scale=cfg_scale))
    configs += [{**settings, "named": name} for name, settings in SAMPLERS.items()]
    out = []
    for cfg in progress_bar(configs, desc="sampler sweep", unit="cfg", disable=not opts.progress):
        cos, nfe = [], []
        for s in range(0, len(subset), opts.batch_size):
            gen, k = generate_batch(model, clip[s:s + opts.batch_size], cfg["steps"],
                                    cfg["method"], cfg.get("cfg_scale", 1.0), cfg["shift"],
                                    opts.seed, ids=subset[s:s + opts.batch_size],
                                    tol=cfg.get("tol", 1e-5))
            cos.append(flow.token_cosine(gen.cpu(), eva[s:s + opts.batch_size]))
            nfe.append(k)
        out.append({"method": cfg["method"], "steps": cfg["steps"], "shift": cfg["shift"],
                    "cfg_scale": cfg.get("cfg_scale", 1.0), "tol": cfg.get("tol"),
                    **({"named": cfg["named"]} if "named" in cfg else {}),
                    "nfe": sum(nfe) / len(nfe), "token_mean": torch.cat(cos).mean().item(),
                    "n_samples": len(subset)})
    return out


# ---------------------------------------------------------------------------------------------
# the Python API


def evaluate(
    model_path: str | Path,
    embeddings_dir: str | Path,
    output_dir: str | Path | None = None,
    options: EvalOptions | None = None,
    **overrides: Any,
) -> dict:
    """Evaluate a model on shards; returns the report dict (and writes it when output_dir is set)."""
    opts = options or EvalOptions()
    opts = EvalOptions(**{**asdict(opts), **overrides})
    if opts.method not in METHODS:
        raise UserError(f"--method {opts.method!r}: choose one of {METHODS}")
    if opts.sweep not in SWEEP_SIZES:
        raise UserError(f"--sweep {opts.sweep!r}: choose one of {SWEEP_SIZES}")
    for flag in ("num_samples", "batch_size", "steps", "retrieval_pool", "baseline_samples"):
        if getattr(opts, flag) < 1:
            raise UserError(f"--{flag} must be >= 1, got {getattr(opts, flag)}")
    check_sampler(opts)
    for flag in ("control_samples", "sweep_samples"):  # sweep_samples 0: the sweep's own size
        if getattr(opts, flag) < 0:
            raise UserError(f"--{flag} must be >= 0, got {getattr(opts, flag)}")
    if not 0 < opts.sweep_shift < math.inf:
        raise UserError(f"--sweep_shift must be finite and > 0, got {opts.sweep_shift}")
    if not 0 < opts.eval_fraction < 1:
        raise UserError(f"--eval_fraction must be in (0, 1), got {opts.eval_fraction}")
    if output_dir is not None and Path(output_dir).exists() and not Path(output_dir).is_dir():
        raise UserError(f"{output_dir}: is a file, not a directory; choose another --output_dir")
    with contextlib.ExitStack() as stack:
        if output_dir is not None:  # one writer per report directory
            stack.enter_context(DirectoryLock(output_dir, "eva-repro evaluate"))
        return _evaluate(model_path, embeddings_dir, output_dir, opts)


def _evaluate(model_path: str | Path, embeddings_dir: str | Path, output_dir: str | Path | None,
              opts: EvalOptions) -> dict:
    torch.manual_seed(opts.seed)
    start_time = time.time()
    device = pick_device(opts.device)
    reader = shards.open_shards(embeddings_dir, opts.verify_checksums)
    manifest = reader.manifest
    loaded = load_model(model_path, opts.backbone)
    check_model_fits_data(loaded.model, manifest, model_path)
    model = loaded.model.to(device).eval()
    keys = reader.keys()
    heldout, train, split_info = resolve_split(loaded, manifest, keys, opts.eval_fraction,
                                                 opts.group_by)

    warnings = []
    if opts.num_samples > len(heldout):
        warnings.append(f"--num_samples {opts.num_samples} is larger than the {len(heldout)} "
                        f"held-out samples; evaluating all {len(heldout)}")
        print(f"warning: {warnings[-1]}", file=sys.stderr)
    eval_idx = seeded_subset(heldout, opts.num_samples, opts.seed)
    train_idx = seeded_subset(train, opts.baseline_samples, opts.seed + 1)
    if not train_idx:
        raise shards.ShardError(f"{manifest.root}: no training samples to fit the baselines on")
    # a patch_only model on shards with a CLS row is scored as it was trained: without the row,
    # and the baselines are fitted and scored on the same tokens
    drop_cls = drops_cls(manifest.include_cls, model.config.token_mode)
    baselines = fit_baselines(reader, train_idx, opts.batch_size, device=device,
                              progress=opts.progress, drop_cls=drop_cls)
    collected, images_per_s = main_pass(model, reader, eval_idx, baselines, opts, device, drop_cls)
    sweep = sampler_sweep(model, reader, eval_idx, opts, device, drop_cls)
    report = build_report(collected, sweep, baselines, opts, manifest, loaded, model_path,
                          split_info, len(eval_idx), warnings)
    report["timing"] = {"seconds": round(time.time() - start_time, 2),
                        "main_pass_images_per_s": round(images_per_s, 2), "device": str(device)}
    if output_dir is not None:
        write_outputs(report, collected.cat("dit"), Path(output_dir), opts.plots)
    return report


def _weighted(pairs: list[tuple[float, int]]) -> float:
    return sum(v * n for v, n in pairs) / sum(n for _, n in pairs)


DISTRIBUTION_K = 3  # neighbours of the k-NN precision / recall


def distribution_report(c: Collected, pooled: dict[str, torch.Tensor], n_samples: int) -> dict:
    """`metrics.distribution_summary` of the DiT's samples and of both baselines' predictions
    against the held-out targets, with the sizes behind the estimates."""
    k, dim = DISTRIBUTION_K, pooled["target"].shape[1]
    out: dict[str, Any] = {"samples": n_samples, "k": k, "pooled_dim": dim,
                           "how": "Frechet distances of Gaussian fits (mean-pooled embeddings; every "
                           "token normalised to norm sqrt(D)); k-NN precision/recall of the pooled "
                           "embeddings against the targets'"}
    if n_samples <= k:
        out["skipped"] = f"needs more than {k} images, got {n_samples}"
        return out
    if n_samples <= dim:
        out["note"] = (f"{n_samples} images <= pooled dim {dim}: the pooled covariances are "
                       "rank-deficient and fd_pooled is biased upward; compare at equal N")
    for name in ("dit", "ridge", "mean"):
        out[name] = metrics.distribution_summary(pooled[name], pooled["target"], c.tokens[name],
                                                 c.tokens["target"], k)
    return out


def build_report(c: Collected, sweep, baselines, opts, manifest, loaded, model_path, split_info,
                 n_samples, warnings) -> dict:
    dit_cos = c.cat("dit")
    pooled = {k: torch.cat(v) for k, v in c.pooled.items()}
    def pooled_cos(name: str) -> torch.Tensor:
        return flow.token_cosine(pooled[name], pooled["target"])

    cosine = metrics.cosine_summary(dit_cos, pooled_cos("dit"))
    per_position = dit_cos.mean(dim=0)
    cls = has_cls(loaded.model.config.token_mode)  # token 0 of the scored tokens is CLS
    cosine["per_position"] = [round(x, 5) for x in per_position.tolist()]
    if cls:
        cosine["cls_mean"] = per_position[0].item()
        cosine["patch_mean"] = per_position[1:].mean().item()
    pool = min(opts.retrieval_pool, n_samples)
    retrieval = metrics.retrieval_recall(pooled["dit"], pooled["target"], pool_size=pool)
    retrieval.update({"pool_size": pool, "n_pools": math.ceil(n_samples / pool),
                      "chance_at_1": 1.0 / pool, "chance_at_5": min(1.0, 5.0 / pool),
                      "ridge": metrics.retrieval_recall(pooled["ridge"], pooled["target"],
                                                        pool_size=pool)})
    _, ridge_b = baselines
    base = {
        "mean": {**metrics.cosine_summary(c.cat("mean"), pooled_cos("mean")),
                 "fit": {"what": "mean unit target token per position",
                         "num_train_samples": ridge_b.info["num_train_samples"]}},
        "ridge": {**metrics.cosine_summary(c.cat("ridge"), pooled_cos("ridge")),
                  "fit": ridge_b.info},
    }
    for name, b in base.items():
        b["dit_minus_baseline"] = cosine["token_mean"] - b["token_mean"]
        gap = metrics.paired_difference(dit_cos.mean(1), c.cat(name).mean(1), seed=opts.seed)
        b["dit_minus_baseline_ci"] = [gap["low"], gap["high"]]  # 95%, bootstrap over images
        b["error_reduction"] = 1 - (1 - cosine["token_mean"]) / max(1 - b["token_mean"], 1e-9)
    controls: dict[str, Any] = {}
    if c.shuffled:
        shuffled = c.cat("shuffled")
        controls["shuffled"] = {**metrics.cosine_summary(shuffled), "n_samples": shuffled.shape[0],
                                "how": "image i generated from the condition of image i+1",
                                "drop": cosine["token_mean"] - shuffled.mean().item()}
        controls["diversity"] = {"token_mean": c.cat("diversity").mean().item(),
                                 "n_samples": shuffled.shape[0],
                                 "how": f"cosine between samples for seeds {opts.seed} and "
                                 f"{opts.seed + 1}, same condition (1.0 = deterministic)"}
    cfg = loaded.model.config
    return {
        "n_samples": n_samples,
        "n_requested": opts.num_samples,
        "cosine": cosine,
        "baselines": base,
        "controls": controls,
        "retrieval": retrieval,
        "distribution": distribution_report(c, pooled, n_samples),
        "velocity_cosine": {t: _weighted(v) for t, v in c.velocity.items()},
        "sampler": {"method": opts.method, "steps": opts.steps, "nfe": _weighted(c.nfe),
                    "cfg_scale": opts.cfg_scale, "shift": opts.shift,
                    "nfe_note": "network calls per sample; with cfg_scale != 1 each call runs the "
                    "conditional and unconditional branch in one doubled batch"},
        "sweep": sweep,
        "seed": opts.seed,
        "model": {"path": str(Path(model_path).resolve()), "source": loaded.source,
                  "run_dir": str(loaded.run_dir) if loaded.run_dir else None,
                  "num_parameters": loaded.model.num_parameters(),
                  "config": cfg.to_dict(), "caveat": score_caveat(cfg)},
        "data": {"embeddings_dir": str(manifest.root.resolve()),
                 **{k: manifest.data.get(k) for k in ("num_samples", "tokens", "clip_dim", "eva_dim",
                                                       "grid", "include_cls", "encoders", "dtype")},
                 "scored_tokens": len(cosine["per_position"]), "cls_scored": cls,
                 "cls_dropped": manifest.include_cls and not cls},
        "split": split_info,
        "options": {k: v for k, v in asdict(opts).items() if k not in ("progress",)},
        "warnings": warnings,
        "versions": {"eva_repro": _version, "torch": torch.__version__,
                     "python": platform.python_version()},
    }


# ---------------------------------------------------------------------------------------------
# CLI (also used by the repository's evaluate_model.py)


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model_path", required=True, help="training run dir, model dir or checkpoint")
    p.add_argument("--embeddings_dir", required=True, help="shard directory to evaluate on")
    p.add_argument("--output_dir", required=True, help="where report.json/.md and plots go")
    add_sampler_args(p)
    add_flags(p, EvalOptions(), exclude=[f.name for f in fields(SamplerOptions)] + ["t_values"])


def run(args: argparse.Namespace) -> int:
    resolve_sampler(args)
    opts = EvalOptions(**values(args, EvalOptions))
    report = evaluate(args.model_path, args.embeddings_dir, args.output_dir, opts)
    cos = report["cosine"]
    print(f"{report['n_samples']} images: token cosine {cos['token_mean']:.4f}, image cosine "
          f"{cos['image_mean']:.4f} ({cos['band']}); mean baseline "
          f"{report['baselines']['mean']['token_mean']:.4f}, ridge "
          f"{report['baselines']['ridge']['token_mean']:.4f}; report in {args.output_dir}")
    return 0
