"""`eva-repro evaluate`: how close generated EVA tokens are to the real ones, against baselines.

    eva-repro evaluate --model_path RUN_OR_MODEL_DIR --embeddings_dir SHARDS --output_dir OUT

Which samples: when the model path is a training run whose split.json was made on the same shard
directory, the run's held-out keys (never trained on). Otherwise no split is known: the given
shards are split by key hash (`shards.split_indices`, --eval_fraction), baselines are fitted on
one part and everything is scored on the other, and the report says the model may have seen them.

What (all cosines after per-token L2 normalisation, see `eva_repro.evaluation.metrics`):
  cosine       per token (mean, median, p10), per image, of mean-pooled embeddings, quality bands
  baselines    mean token per position and ridge regression, fitted on training samples only
  controls     conditions shuffled across images (must fall), two samples per condition (diversity)
  retrieval    mean-pooled generated vs true targets in a pool: recall@1, @5
  distribution Frechet distance (pooled, per token) and k-NN precision / recall, for the DiT
               and both baselines: a regressor's collapsed spread shows here, not in cosine
  velocity     cos(predicted v, true v) at fixed t on held-out pairs
  sweep        cosine vs network evaluations for euler / heun / dopri5, time shift, CFG scales

`main_pass` is one loop over the held-out batches: each family above (but the sweep) is an
accumulator, `update(batch, predictions)` per batch for the DiT and both baselines alike, and
`result()` its report section. `build_report` puts the sections and the provenance in one dict;
`eva_repro.evaluation.report` writes it out (report.json, report.md, the plots). Deterministic for a given
--seed (noise per sample, seeded subsets).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import platform
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch

from eva_repro import __version__ as _version
from eva_repro.data import shards
from eva_repro.data.layout import drops_cls, has_cls, pairs_for_model, tokens_for_model
from eva_repro.evaluation import metrics
from eva_repro.evaluation.baselines import fit_baselines
from eva_repro.evaluation.generate import (
    METHODS,
    SAMPLERS,
    SamplerOptions,
    add_sampler_args,
    check_sampler,
    check_shards,
    generate_batch,
    resolve_sampler,
)
from eva_repro.evaluation.report import write_outputs
from eva_repro.flow import sampling, transport
from eva_repro.flow.transport import token_cosine
from eva_repro.model.checkpoint import load_model
from eva_repro.model.dit import score_caveat
from eva_repro.model.plugin import OVERRIDE_HELP
from eva_repro.utils.devices import autocast, pick_device
from eva_repro.utils.errors import UserError
from eva_repro.utils.flags import add_flags, option, values
from eva_repro.utils.lockfile import DirectoryLock
from eva_repro.utils.progress import progress_bar

SWEEP_SIZES = ("auto", "none", "small", "full")  # auto: full on CUDA, small on CPU


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
    plots: bool = option(True, "PNG plots beside report.md")
    progress: bool = option(True, "progress bars (the flag train, extract and sample take)",
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
# the held-out batches and what scores them


PREDICTORS = ("dit", "mean", "ridge")  # the DiT's samples and the two baselines' predictions
DISTRIBUTION_K = 3  # neighbours of the k-NN precision / recall


@dataclass(frozen=True)
class HeldOutBatch:
    """One batch of the main pass, as the model takes it: global rows `ids`, conditions [B, T, Dc],
    targets [B, T, De], and each image's shuffled condition (that of the next image)."""

    ids: list[int]
    clip: torch.Tensor
    eva: torch.Tensor
    shuffled_clip: torch.Tensor


def held_out_batches(reader: shards.ShardReader, eval_idx: list[int], batch_size: int,
                     drop_cls: bool) -> Iterator[HeldOutBatch]:
    """The held-out images `eval_idx` in batches, each with its shuffled conditions."""
    rolled = eval_idx[1:] + eval_idx[:1]  # image i gets the condition of image i+1
    for (ids, rows), (_, other) in zip(reader.batches(eval_idx, batch_size),
                                       reader.batches(rolled, batch_size), strict=True):
        clip, eva = pairs_for_model(rows["clip"], rows["eva"], drop_cls)
        yield HeldOutBatch(ids, clip, eva, tokens_for_model(other["clip"], drop_cls))


def predict(model: torch.nn.Module, baselines: tuple, batch: HeldOutBatch,
            opts: EvalOptions) -> tuple[dict[str, torch.Tensor], int]:
    """({predictor: tokens [B, T, De] on the CPU}, the sampler's network evaluations)."""
    mean_b, ridge_b = baselines
    # noise is keyed by the global row, so an image gets the same noise whatever --num_samples
    gen, nfe = generate_batch(model, batch.clip, opts.steps, opts.method, opts.cfg_scale, opts.shift,
                              opts.seed, ids=batch.ids)
    return {"dit": gen.cpu(), "mean": mean_b.predict(batch.clip),
            "ridge": ridge_b.predict(batch.clip)}, nfe


# ---------------------------------------------------------------------------------------------
# the metric accumulators: `update(batch, predictions)` once per held-out batch, then `result()`


class WeightedMean:
    """The mean of per-batch values, weighted by the batch sizes."""

    def __init__(self) -> None:
        self.total, self.count = 0.0, 0

    def update(self, value: float, n: int) -> None:
        self.total += value * n
        self.count += n

    def result(self) -> float:
        return self.total / self.count


@dataclass(frozen=True)
class CosineResult:
    """The cosine family's report sections, and the DiT's per-token cosines [N, T]."""

    cosine: dict[str, Any]
    baselines: dict[str, dict[str, Any]]
    dit_token_cosine: torch.Tensor


class CosineScores:
    """Each predictor's per-token cosines against the targets and the cosine of its mean-pooled
    embeddings with the targets' (the 'global' cosine); the DiT's gap to each baseline. `cls`:
    token 0 is CLS; `seed`: the bootstrap's; `fits`: how each baseline was fitted (recorded beside
    its scores)."""

    def __init__(self, cls: bool, seed: int, fits: dict[str, dict]) -> None:
        self.cls, self.seed, self.fits = cls, seed, fits
        self.token: dict[str, list[torch.Tensor]] = {name: [] for name in PREDICTORS}
        self.pooled_cos: dict[str, list[torch.Tensor]] = {name: [] for name in PREDICTORS}

    def update(self, batch: HeldOutBatch, preds: dict[str, torch.Tensor]) -> None:
        for name, tokens in preds.items():
            self.token[name].append(token_cosine(tokens, batch.eva))
            self.pooled_cos[name].append(metrics.pooled_cosine(tokens, batch.eva))

    def result(self) -> CosineResult:
        token = {name: torch.cat(rows) for name, rows in self.token.items()}
        summary = {name: metrics.cosine_summary(token[name], torch.cat(self.pooled_cos[name]))
                   for name in PREDICTORS}
        baselines = {name: {**summary[name], "fit": self.fits[name],
                            **self._gap(summary["dit"], summary[name], token["dit"], token[name])}
                     for name in ("mean", "ridge")}
        return CosineResult(self._dit_section(summary["dit"], token["dit"]), baselines, token["dit"])

    def _dit_section(self, summary: dict, token: torch.Tensor) -> dict[str, Any]:
        per_position = token.mean(dim=0)
        out = {**summary, "per_position": [round(x, 5) for x in per_position.tolist()]}
        if self.cls:
            out["cls_mean"] = per_position[0].item()
            out["patch_mean"] = per_position[1:].mean().item()
        return out

    def _gap(self, dit: dict, base: dict, dit_token: torch.Tensor,
             base_token: torch.Tensor) -> dict[str, Any]:
        """The DiT's gap to a baseline with a 95% interval (a paired bootstrap over the images),
        and the share of the baseline's error the DiT removes."""
        d, b = dit["token_mean"], base["token_mean"]
        gap = metrics.paired_difference(dit_token.mean(1), base_token.mean(1), seed=self.seed)
        return {"dit_minus_baseline": d - b, "dit_minus_baseline_ci": [gap["low"], gap["high"]],
                "error_reduction": 1 - (1 - d) / max(1 - b, 1e-9)}


class Retrieval:
    """Recall@1, @5 of the DiT's and ridge's mean-pooled embeddings finding their own image's
    target among the targets of a pool of `pool_size` held-out images (the mean baseline predicts
    the same embedding for every image: nothing to retrieve)."""

    def __init__(self, pool_size: int) -> None:
        self.pool_size = pool_size
        self.pooled: dict[str, list[torch.Tensor]] = {"dit": [], "ridge": [], "target": []}

    def update(self, batch: HeldOutBatch, preds: dict[str, torch.Tensor]) -> None:
        for name in ("dit", "ridge"):
            self.pooled[name].append(metrics.mean_pool(preds[name]))
        self.pooled["target"].append(metrics.mean_pool(batch.eva))

    def result(self) -> dict[str, Any]:
        pooled = {name: torch.cat(rows) for name, rows in self.pooled.items()}
        pool, n = self.pool_size, pooled["target"].shape[0]
        recall = {name: metrics.retrieval_recall(pooled[name], pooled["target"], pool_size=pool)
                  for name in ("dit", "ridge")}
        return {**recall["dit"], "pool_size": pool, "n_pools": math.ceil(n / pool),
                "chance_at_1": 1.0 / pool, "chance_at_5": min(1.0, 5.0 / pool),
                "ridge": recall["ridge"]}


class Distribution:
    """Each predictor's set of outputs against the targets' as distributions: Frechet distances
    of the mean-pooled embeddings and of the tokens, k-NN precision / recall (the report section).
    Only [N, D] pools are kept; the tokens' float64 D x D moments stream on `stats_device`."""

    def __init__(self, stats_device: torch.device, k: int = DISTRIBUTION_K) -> None:
        self.stats_device, self.k = stats_device, k
        self.pooled: dict[str, list[torch.Tensor]] = {name: [] for name in (*PREDICTORS, "target")}
        self.moments = {name: metrics.Moments() for name in (*PREDICTORS, "target")}

    def update(self, batch: HeldOutBatch, preds: dict[str, torch.Tensor]) -> None:
        for name, tokens in {**preds, "target": batch.eva}.items():
            self.pooled[name].append(metrics.mean_pool(tokens))
            self.moments[name].add(transport.normalize_target(tokens.to(self.stats_device)))

    def result(self) -> dict[str, Any]:
        pooled = {name: torch.cat(rows) for name, rows in self.pooled.items()}
        n, dim = pooled["target"].shape
        out: dict[str, Any] = {"samples": n, "k": self.k, "pooled_dim": dim,
                               "how": "Frechet distances of Gaussian fits (mean-pooled embeddings; "
                               "every token normalised to norm sqrt(D)); k-NN precision/recall of "
                               "the pooled embeddings against the targets'"}
        if n <= self.k:
            out["skipped"] = f"needs more than {self.k} images, got {n}"
            return out
        if n <= dim:
            out["note"] = (f"{n} images <= pooled dim {dim}: the pooled covariances are "
                           "rank-deficient and fd_pooled is biased upward; compare at equal N")
        for name in ("dit", "ridge", "mean"):
            out[name] = metrics.distribution_summary(pooled[name], pooled["target"],
                                                     self.moments[name], self.moments["target"],
                                                     self.k)
        return out


class Controls:
    """The DiT on the first `n` held-out images, sampled again: from the next image's condition
    (the cosine must fall) and with seed + 1 (diversity: the cosine between the two samples)."""

    def __init__(self, model: torch.nn.Module, opts: EvalOptions, n: int) -> None:
        self.model, self.opts, self.left = model, opts, n
        self.shuffled: list[torch.Tensor] = []
        self.diversity: list[torch.Tensor] = []

    def update(self, batch: HeldOutBatch, preds: dict[str, torch.Tensor]) -> None:
        k, o = max(0, min(len(batch.ids), self.left)), self.opts
        if not k:
            return
        self.left -= k
        shuffled, _ = generate_batch(self.model, batch.shuffled_clip[:k], o.steps, o.method,
                                     o.cfg_scale, o.shift, o.seed, ids=batch.ids[:k])
        self.shuffled.append(token_cosine(shuffled.cpu(), batch.eva[:k]))
        second, _ = generate_batch(self.model, batch.clip[:k], o.steps, o.method, o.cfg_scale,
                                   o.shift, o.seed + 1, ids=batch.ids[:k])
        self.diversity.append(token_cosine(preds["dit"][:k], second.cpu()))

    def result(self, dit_token_mean: float) -> dict[str, Any]:
        """The report section ({} without control images); `drop` is how far the shuffled
        cosine falls below `dit_token_mean`, the DiT's on all held-out images."""
        if not self.shuffled:
            return {}
        shuffled, seed = torch.cat(self.shuffled), self.opts.seed
        return {
            "shuffled": {**metrics.cosine_summary(shuffled), "n_samples": shuffled.shape[0],
                         "how": "image i generated from the condition of image i+1",
                         "drop": dit_token_mean - shuffled.mean().item()},
            "diversity": {"token_mean": torch.cat(self.diversity).mean().item(),
                          "n_samples": shuffled.shape[0],
                          "how": f"cosine between samples for seeds {seed} and {seed + 1}, same "
                          "condition (1.0 = deterministic)"},
        }


class VelocityCosine:
    """cos(predicted v, true v) at each of `opts.t_values` on the held-out pairs (noise keyed by
    row): the training-time quantity, without sampling."""

    def __init__(self, model: torch.nn.Module, opts: EvalOptions, device: torch.device) -> None:
        self.model, self.opts, self.device = model, opts, device
        self.by_t: dict[str, WeightedMean] = {}

    def update(self, batch: HeldOutBatch, preds: dict[str, torch.Tensor]) -> None:
        clip, eva = batch.clip, batch.eva
        velocity_fn = sampling.guided_velocity(self.model, clip.to(self.device))
        with autocast(self.device):
            v = metrics.velocity_cosine(velocity_fn, eva.to(self.device), self.opts.t_values,
                                        sampling.sample_noise(batch.ids, *eva.shape[1:], self.opts.seed))
        for t, value in v.items():
            self.by_t.setdefault(t, WeightedMean()).update(value, len(batch.ids))

    def result(self) -> dict[str, float]:
        return {t: mean.result() for t, mean in self.by_t.items()}


# ---------------------------------------------------------------------------------------------
# the main pass: one loop over the held-out batches


@dataclass(frozen=True)
class MainPass:
    """The accumulators' results: the report's sections, and what the plots and the timing need."""

    n_samples: int
    cosine: dict[str, Any]
    baselines: dict[str, dict[str, Any]]
    controls: dict[str, Any]
    retrieval: dict[str, Any]
    distribution: dict[str, Any]
    velocity_cosine: dict[str, float]
    nfe: float  # network evaluations per sample
    dit_token_cosine: torch.Tensor  # [N, T]
    images_per_s: float


def main_pass(model: torch.nn.Module, reader: shards.ShardReader, eval_idx: list[int],
              baselines: tuple, opts: EvalOptions, device: torch.device, drop_cls: bool) -> MainPass:
    """Every accumulator fed by one loop over the held-out images `eval_idx`; their results."""
    n = len(eval_idx)
    cosine = CosineScores(has_cls(model.config.token_mode), opts.seed, baseline_fits(baselines))
    stats_device = device if device.type == "cuda" else torch.device("cpu")  # float64 moments
    retrieval, distribution = Retrieval(min(opts.retrieval_pool, n)), Distribution(stats_device)
    controls = Controls(model, opts, min(opts.control_samples, n) if n > 1 else 0)
    velocity, nfe = VelocityCosine(model, opts, device), WeightedMean()
    bar = progress_bar(total=n, desc="evaluate", unit="img", disable=not opts.progress)
    start_time = time.perf_counter()
    for batch in held_out_batches(reader, eval_idx, opts.batch_size, drop_cls):
        preds, calls = predict(model, baselines, batch, opts)
        nfe.update(calls, len(batch.ids))
        for accumulator in (cosine, retrieval, distribution, controls, velocity):
            accumulator.update(batch, preds)
        bar.update(len(batch.ids))
    bar.close()
    images_per_s = n / max(time.perf_counter() - start_time, 1e-9)
    scores = cosine.result()
    return MainPass(n, scores.cosine, scores.baselines, controls.result(scores.cosine["token_mean"]),
                    retrieval.result(), distribution.result(), velocity.result(), nfe.result(),
                    scores.dit_token_cosine, images_per_s)


def baseline_fits(baselines: tuple) -> dict[str, dict]:
    """How each baseline was fitted, as the report records it."""
    _, ridge_b = baselines
    return {"mean": {"what": "mean unit target token per position",
                     "num_train_samples": ridge_b.info["num_train_samples"]},
            "ridge": ridge_b.info}


def sampler_sweep(model: torch.nn.Module, reader: shards.ShardReader, eval_idx: list[int],
                  opts: EvalOptions, device: torch.device, drop_cls: bool) -> list[dict]:
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
            cos.append(token_cosine(gen.cpu(), eva[s:s + opts.batch_size]))
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
    check_shards(loaded.model.config, manifest, model_path, targets=True)
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
    scores = main_pass(model, reader, eval_idx, baselines, opts, device, drop_cls)
    sweep = sampler_sweep(model, reader, eval_idx, opts, device, drop_cls)
    cls = has_cls(model.config.token_mode)  # token 0 of the scored tokens is CLS
    report = build_report(scores=scores, sweep=sweep, opts=opts,
                          model=model_section(loaded, model_path),
                          data=data_section(manifest, scores.dit_token_cosine.shape[1], cls),
                          split=split_info, warnings=warnings)
    report["timing"] = {"seconds": round(time.time() - start_time, 2),
                        "main_pass_images_per_s": round(scores.images_per_s, 2),
                        "device": str(device)}
    if output_dir is not None:
        write_outputs(report, scores.dit_token_cosine, Path(output_dir), opts.plots)
    return report


# ---------------------------------------------------------------------------------------------
# the report: the provenance sections, then `build_report` puts everything in one dict


def model_section(loaded: Any, model_path: str | Path) -> dict[str, Any]:
    cfg = loaded.model.config
    return {"path": str(Path(model_path).resolve()), "source": loaded.source,
            "run_dir": str(loaded.run_dir) if loaded.run_dir else None,
            "num_parameters": loaded.model.num_parameters(),
            "config": cfg.to_dict(), "caveat": score_caveat(cfg)}


def data_section(manifest: shards.Manifest, scored_tokens: int, cls: bool) -> dict[str, Any]:
    """The shards evaluated on; `cls`: the scored tokens start with CLS."""
    return {"embeddings_dir": str(manifest.root.resolve()),
            **{k: manifest.data.get(k) for k in ("num_samples", "tokens", "clip_dim", "eva_dim",
                                                  "grid", "include_cls", "encoders", "dtype")},
            "clip_tokens": manifest.clip_tokens,
            "scored_tokens": scored_tokens, "cls_scored": cls,
            "cls_dropped": manifest.include_cls and not cls}


def build_report(*, scores: MainPass, sweep: list[dict], opts: EvalOptions, model: dict,
                 data: dict, split: dict, warnings: list[str]) -> dict:
    """The report dict from finished sections (`eva_repro.evaluation.report` renders it)."""
    return {
        "n_samples": scores.n_samples,
        "n_requested": opts.num_samples,
        "cosine": scores.cosine,
        "baselines": scores.baselines,
        "controls": scores.controls,
        "retrieval": scores.retrieval,
        "distribution": scores.distribution,
        "velocity_cosine": scores.velocity_cosine,
        "sampler": {"method": opts.method, "steps": opts.steps, "nfe": scores.nfe,
                    "cfg_scale": opts.cfg_scale, "shift": opts.shift,
                    "nfe_note": "network calls per sample; with cfg_scale != 1 each call runs the "
                    "conditional and unconditional branch in one doubled batch"},
        "sweep": sweep,
        "seed": opts.seed,
        "model": model,
        "data": data,
        "split": split,
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
