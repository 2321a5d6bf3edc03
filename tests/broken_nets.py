"""Plugin factories with one interface bug each (not test modules: `check`'s broken inputs).

Each wraps the pure head (`testbed.zoo.correct`) and edits its output y (what the network
predicts) on the way out.
"""

import torch
import torch.nn.functional as F
from torch import nn

from eva_repro.testbed import zoo


class Edited(nn.Module):
    def __init__(self, edit, **kw):
        super().__init__()
        self.inner, self.edit = zoo.correct(**kw), edit
        self.prediction = self.inner.prediction
        self.register_buffer("offset", torch.randn(kw["target_dim"]) * 1e-3, persistent=False)

    def forward(self, x, t, cond, drop_cond=None):
        return self.edit(self.inner(x, t, cond, drop_cond), x, t, self)


def wrong_shape(**kw):
    return Edited(lambda y, x, t, m: y[:, :-1], **kw)


def divides_by_t(**kw):
    return Edited(lambda y, x, t, m: y / t.view(-1, 1, 1), **kw)


def dropout_in_eval(**kw):
    return Edited(lambda y, x, t, m: F.dropout(y, 0.5, training=True), **kw)


def normalised_over_the_batch(**kw):
    return Edited(lambda y, x, t, m: y - y.mean(dim=0, keepdim=True), **kw)


def unsaved_state(**kw):  # a random buffer that save_pretrained does not keep
    return Edited(lambda y, x, t, m: y + m.offset, **kw)
