"""What a new model takes from its training rows before step 1 (never from the held-out ones):
the condition whitening (`cond_whiten`), the mean and shrunk inverse square root of the
covariance of the RMS-normalised condition tokens (`data.condition_whitening`). A resumed run
loads it from its checkpoint instead.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from eva_repro.data import loader as data
from eva_repro.data.shards import ShardReader


def fit_to_training_data(model: nn.Module, reader: ShardReader, rows: list[int], drop_cls: bool,
                         say: Callable[[str], None]) -> None:
    """Fit the model's data-dependent parts on `rows` (nothing for a model without any)."""
    shrink = getattr(model.config, "cond_whiten", None)
    if shrink is None:
        return
    model.init_whitening(*data.condition_whitening(reader, rows, shrink, drop_cls))
    say(f"aligned condition whitened with the statistics of up to {data.WHITEN_SAMPLES} "
        f"training samples (shrinkage {shrink:g})")
