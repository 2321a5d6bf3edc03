"""What a new model takes from its training rows before step 1 (never from the held-out ones).

- the condition whitening (`cond_whiten`): mean and shrunk inverse square root of the covariance
  of the RMS-normalised condition tokens (`data.condition_whitening`);
- whether the 3 x 3 neighbour mix (`cond_local`) is trained: only where ridge that also reads
  each token's 4-neighbour mean removes at least `local_min_gain` of same-token ridge's held-in
  error (`baselines.neighbour_gain`); off, the kernel stays exactly zero;
- with linear_init "ridge", the ridge map on the linear path (`baselines.ridge_linear_path`).

A resumed run loads all three from its checkpoint instead.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from eva_repro import data
from eva_repro.baselines import neighbour_gain, ridge_linear_path
from eva_repro.shards import ShardReader


def fit_to_training_data(model: nn.Module, reader: ShardReader, rows: list[int], drop_cls: bool,
                         local_min_gain: float, linear_init: str, say: Callable[[str], None]
                         ) -> dict[str, Any]:
    """Fit the model's data-dependent parts on `rows`; returns the decisions for summary.json
    ({"neighbour_mix": {...}} when the mix was tested)."""
    fitted: dict[str, Any] = {}
    config = model.config
    shrink = getattr(config, "cond_whiten", None)
    if shrink is not None:
        model.init_whitening(*data.condition_whitening(reader, rows, shrink, drop_cls))
        say(f"aligned condition whitened with the statistics of up to {data.WHITEN_SAMPLES} "
            f"training samples (shrinkage {shrink:g})")
    if getattr(config, "cond_local", False) and local_min_gain > 0:
        fitted.update(_gate_neighbour_mix(model, reader, rows, local_min_gain, say))
    if linear_init == "ridge" and getattr(config, "cond_linear", False):
        weight, bias, ridge, n = ridge_linear_path(reader, rows, drop_cls)
        model.init_linear_path(weight, bias)
        say(f"linear path initialised by ridge on {n} training samples (alpha {ridge.alpha:g})")
    return fitted


def _gate_neighbour_mix(model: nn.Module, reader: ShardReader, rows: list[int], min_gain: float,
                        say: Callable[[str], None]) -> dict[str, Any]:
    gain = neighbour_gain(reader, rows)
    if gain is None:
        say("neighbour mix on: too few training samples to test whether it helps")
        return {}
    on = gain.gain >= min_gain
    model.enable_local_mix(on)
    say(f"neighbour mix {'on' if on else 'off'}: ridge that reads each token's neighbours has "
        f"{100 * gain.gain:.1f}% less held-in error on {gain.samples} training samples (on from "
        f"{100 * min_gain:g}%, --local_min_gain)")
    return {"neighbour_mix": {"trained": on, "ridge_error_cut": round(gain.gain, 4),
                              "min_gain": min_gain, "samples": gain.samples}}
