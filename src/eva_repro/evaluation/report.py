"""The files of a finished evaluation: `write_outputs(report, ...)` renders `evaluate`'s report dict.

    report.json         the report dict as it is (with plots, plus "plots": {plot: file name})
    report.md           the headline quality band, a table of the DiT against the mean and ridge
                        baselines (gaps with 95% intervals) and the shuffled-condition control,
                        then bands, retrieval, diversity, velocity cosine, sweep, split, warnings,
                        and a Distribution section (Frechet distances, k-NN precision / recall)
    cosine_hist.png     per-image mean token cosine, over the quality bands, with the baselines
    cosine_heatmap.png  mean cosine per patch position on the token grid (CLS value in the title)
    cosine_vs_nfe.png   the sampler sweep: cosine vs network evaluations (only when it ran)

A pure renderer: the numbers are `evaluate.build_report`'s; this module reads the report dict and
the per-token cosines, writes files and does not import `eva_repro.evaluation.evaluate` (which imports it).
Plots are optional (--no_plots); matplotlib is imported only to draw them.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from eva_repro.evaluation import metrics
from eva_repro.utils import files

PLOTS = {"histogram": "cosine_hist.png", "heatmap": "cosine_heatmap.png", "nfe": "cosine_vs_nfe.png"}


def write_outputs(report: dict, token_cosine: torch.Tensor, out: Path, plots: bool) -> None:
    """report.json, report.md and (with `plots`) the PNGs in `out`, which is created if missing.

    `token_cosine` is the DiT's [N, T] per-token cosine on the evaluated images (the histogram's
    per-image means); `report["data"]["cls_scored"]` tells whether token 0 is CLS. With plots,
    `report["plots"]` is set to {plot: file name} before report.json is written."""
    out.mkdir(parents=True, exist_ok=True)
    if plots:
        report["plots"] = write_plots(out, token_cosine.mean(dim=1), report)
    files.atomic_write_json(out / "report.json", report)
    files.atomic_write_bytes(out / "report.md", markdown(report).encode())


def write_plots(out: Path, per_image: torch.Tensor, report: dict) -> dict:
    """The three PNGs; returns {name: file name}."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    written = {}
    fig, ax = plt.subplots(figsize=(6, 3.5))
    _histogram(ax, per_image, report)
    written["histogram"] = _save(fig, out / PLOTS["histogram"])
    fig, ax = plt.subplots(figsize=(5, 4.2))
    _heatmap(fig, ax, report["cosine"]["per_position"], report["data"]["cls_scored"])
    written["heatmap"] = _save(fig, out / PLOTS["heatmap"])
    if report["sweep"]:
        fig, ax = plt.subplots(figsize=(6.5, 4))
        _nfe_curve(ax, report["sweep"], report["sampler"])
        written["nfe"] = _save(fig, out / PLOTS["nfe"])
    plt.close("all")
    return written


def _save(fig, path: Path) -> str:
    import io

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=110)
    files.atomic_write_bytes(path, buf.getvalue())
    return path.name


def _histogram(ax, per_image: torch.Tensor, report: dict) -> None:
    colors = {"poor": "#d62728", "moderate": "#ff7f0e", "high": "#bcbd22", "very high": "#2ca02c",
              "excellent": "#1f77b4"}
    values = per_image.numpy()
    xmin = min(0.0, float(values.min()))
    edges = [xmin] + [e for e, _ in metrics.BANDS[1:]] + [1.0]
    for lo, hi, (_, name) in zip(edges[:-1], edges[1:], metrics.BANDS, strict=True):
        ax.axvspan(lo, hi, color=colors[name], alpha=0.12, lw=0)
        ax.text((lo + hi) / 2, 1.0, name, transform=ax.get_xaxis_transform(), ha="center",
                va="bottom", fontsize=7, color=colors[name])
    ax.hist(values, bins=40, range=(xmin, 1.0), color="#333333")
    base = report["baselines"]
    for name, style in (("mean", ":"), ("ridge", "--")):
        ax.axvline(base[name]["image_mean"], color="k", ls=style, lw=1, label=f"{name} baseline")
    ax.axvline(report["cosine"]["image_mean"], color="#9467bd", lw=2, label="DiT mean")
    ax.set_xlim(xmin, 1.0)
    ax.set_xlabel("per-image mean token cosine")
    ax.set_ylabel("images")
    ax.legend(fontsize=7, loc="upper left")


def _heatmap(fig, ax, per_position: list[float], cls: bool) -> None:
    values = torch.tensor(per_position[1:] if cls else per_position)
    g = math.isqrt(values.numel())
    # not a square grid (should not happen with shards from extract/synth): show one row
    grid = values.view(g, g) if g * g == values.numel() else values.view(1, -1)
    im = ax.imshow(grid.numpy(), cmap="viridis", vmin=min(0.0, float(values.min())), vmax=1.0)
    fig.colorbar(im, ax=ax, label="mean token cosine")
    ax.set_xticks(range(grid.shape[1]))
    ax.set_yticks(range(grid.shape[0]))
    if grid.shape[0] <= 8 and grid.shape[0] > 1:  # small grids: print the values
        for (r, c), v in zip(torch.cartesian_prod(torch.arange(grid.shape[0]),
                                                  torch.arange(grid.shape[1])).tolist(),
                             grid.flatten().tolist(), strict=True):
            ax.text(c, r, f"{v:.2f}", ha="center", va="center", fontsize=7, color="w")
    title = f"cosine per patch position ({grid.shape[0]} x {grid.shape[1]})"
    if cls:
        title += f"\nCLS token: {per_position[0]:.3f}"
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("column")
    ax.set_ylabel("row")


def _nfe_curve(ax, sweep: list[dict], sampler: dict) -> None:
    colors = {"euler": "#1f77b4", "heun": "#d62728", "dopri5": "#2ca02c"}
    lines: dict[tuple, list[dict]] = {}
    for e in sweep:
        if e["cfg_scale"] == 1.0:
            lines.setdefault((e["method"], e["shift"]), []).append(e)
    for (method, shift), entries in sorted(lines.items()):
        entries = sorted(entries, key=lambda e: e["nfe"])
        ax.plot([e["nfe"] for e in entries], [e["token_mean"] for e in entries], marker="o",
                ms=3, ls="-" if shift == 1.0 else "--", color=colors.get(method),
                label=f"{method}, shift {shift:g}")
    guided = [e for e in sweep if e["cfg_scale"] != 1.0]
    for e in guided:
        ax.scatter(e["nfe"], e["token_mean"], marker="*", s=60, zorder=3, color="k")
        ax.annotate(f"CFG {e['cfg_scale']:g}", (e["nfe"], e["token_mean"]), fontsize=7,
                    xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("network evaluations per sample (NFE)")
    ax.set_ylabel("mean token cosine")
    ax.set_title(f"sampler sweep ({sweep[0]['n_samples']} images); CFG stars: main sampler "
                 f"({sampler['method']}, {sampler['steps']} steps, shift {sampler['shift']:g})",
                 fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def _pct(x: float) -> str:
    return f"{100 * x:.0f}%"


def markdown(r: dict) -> str:
    """report.md: the headline, the table against the baselines and controls, then one line each."""
    cos, s = r["cosine"], r["sampler"]
    caveat = r["model"].get("caveat")
    lines = [
        f"# Evaluation of `{r['model']['path']}`",
        "",
        *([f"> {caveat}", ""] if caveat else []),
        f"**Quality: {cos['band']}**: mean per-image cosine **{cos['image_mean']:.3f}** on "
        f"{r['n_samples']} held-out images ({s['method']}, {s['steps']} steps, "
        f"{s['nfe']:.0f} NFE, shift {s['shift']:g}, CFG {s['cfg_scale']:g}, seed {r['seed']}).",
        "",
        "| | token cos (mean) | median | p10 | image cos | global cos | DiT beats it by [95% CI] |",
        "|---|---|---|---|---|---|---|",
        _row("**DiT**", cos, ""),
    ]
    for name, label in (("mean", "mean-token baseline"), ("ridge", "ridge baseline")):
        b = r["baselines"][name]
        lines.append(_row(label, b, _verdict(b)))
    if r["controls"]:
        sh = r["controls"]["shuffled"]
        verdict = "falls: the condition is used" if sh["drop"] > 0.02 else \
            "does NOT fall: the model ignores its condition"
        lines.append(_row("shuffled conditions (control)", sh, f"{sh['drop']:+.3f}: {verdict}"))
    bands = cos["bands"]
    lines += [
        "",
        "Images per band: " + ", ".join(f"{k} {_pct(v)}" for k, v in bands.items())
        + " (poor < 0.4 < moderate < 0.7 < high < 0.8 < very high < 0.9 < excellent).",
        f"Retrieval among {r['retrieval']['pool_size']}: recall@1 "
        f"{r['retrieval']['recall_at_1']:.3f}, recall@5 {r['retrieval']['recall_at_5']:.3f} "
        f"(ridge {r['retrieval']['ridge']['recall_at_1']:.3f} / "
        f"{r['retrieval']['ridge']['recall_at_5']:.3f}; chance {r['retrieval']['chance_at_1']:.3f}).",
    ]
    if r["controls"]:
        lines.append(f"Diversity (cosine between two samples per condition): "
                     f"{r['controls']['diversity']['token_mean']:.3f}.")
    lines.append("Velocity cosine at t: " + ", ".join(
        f"{t}: {v:.3f}" for t, v in r["velocity_cosine"].items()) + ".")
    if r["sweep"]:
        best = max(r["sweep"], key=lambda e: e["token_mean"])
        lines.append(f"Sampler sweep ({best['n_samples']} images): best {best['token_mean']:.3f} "
                     f"with {best['method']} shift {best['shift']:g} CFG {best['cfg_scale']:g} at "
                     f"{best['nfe']:.0f} NFE; see cosine_vs_nfe.png.")
        if best["nfe"] == 1:
            lines.append("(One Euler step returns the model's estimate of the conditional mean, "
                         "which scores a higher cosine than a proper sample; it is not a sample "
                         "from the learned distribution.)")
    sp = r["split"]
    lines += ["", f"Split: {sp['source']}. Model trained on: {sp['model_trained_on']}. Evaluated on: "
              f"{sp['evaluated_on']}. Baselines fitted on: {sp['baselines_fit_on']} "
              f"({r['baselines']['ridge']['fit']['num_train_samples']} samples used)."]
    lines.append(grouping_line(sp))
    if "note" in sp:
        lines.append(f"**Note:** {sp['note']}.")
    if r["data"].get("cls_dropped"):
        lines.append(f"Scored on the {r['data']['scored_tokens']} patch tokens: the shards' CLS "
                     "token is dropped for this patch_only model, as in its training.")
    lines += [f"**Warning:** {w}." for w in r["warnings"]]
    lines += _distribution(r.get("distribution"))
    lines.append("")
    return "\n".join(lines)


def _distribution(d: dict | None) -> list[str]:
    """The Distribution section: a table for the DiT and the baselines (none without `d`)."""
    if not d:
        return []
    lines = ["", "## Distribution", ""]
    if "skipped" in d:
        return lines + [f"Not computed: {d['skipped']}."]
    lines += ["| | FD pooled | FD token | precision | recall |", "|---|---|---|---|---|"]
    for name, label in (("dit", "**DiT**"), ("ridge", "ridge baseline"), ("mean", "mean-token baseline")):
        m = d[name]
        lines.append(f"| {label} | {m['fd_pooled']:.4g} | {m['fd_token']:.4g} | {m['precision']:.3f} | "
                     f"{m['recall']:.3f} |")
    lines += ["", f"Frechet distances (lower is closer) and k-NN precision / recall (k = {d['k']}) "
              f"against the targets, on {d['samples']} images. Lower FD and higher recall than "
              "ridge is what a generator should show; a regressor collapses variance, so it has "
              "low recall."]
    if "note" in d:
        lines.append(f"({d['note']}.)")
    return lines


def _verdict(b: dict) -> str:
    """The gap to a baseline with its 95% interval; "level" when the interval holds 0."""
    delta, (low, high) = b["dit_minus_baseline"], b["dit_minus_baseline_ci"]
    gap = f"{delta:+.3f} [{low:+.3f}, {high:+.3f}]"
    if low > 0:
        return f"{gap} ({_pct(b['error_reduction'])} less error)"
    if high < 0:
        return f"{gap}: the baseline is better"
    return f"{gap}: level (within what these images resolve)"


def _row(label: str, m: dict, beat: str) -> str:
    glob = f"{m['global_mean']:.3f}" if "global_mean" in m else "-"
    return (f"| {label} | {m['token_mean']:.3f} | {m['token_median']:.3f} | {m['token_p10']:.3f} | "
            f"{m['image_mean']:.3f} | {glob} | {beat} |")


def grouping_line(split: dict) -> str:
    """report.md's line on how keys were grouped for the split ("not recorded" without `group_by`)."""
    if "group_by" not in split:
        return "Grouping: not recorded in this report."
    if split["group_by"] is None:
        return ("Grouping: none: each key held out on its own (views or frames of one source can "
                "fall on both sides; see --group_by).")
    return (f"Grouping: keys held out in groups by `--group_by {split['group_by']}`: "
            f"{split['num_heldout_groups']} of {split['num_groups']} groups held out, every key of "
            "a group on one side.")
