"""Module modes around inference: prediction must not depend on whether the caller left a module in
train mode (BatchNorm would normalise with the batch's own statistics)."""
from __future__ import annotations

import contextlib
import functools

import torch.nn as nn


@contextlib.contextmanager
def eval_mode(module: nn.Module):
    """Every submodule in eval mode inside the block; each one's own previous mode afterwards (a
    training loop that validates in between keeps training as it was)."""
    before = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield module
    finally:
        for m, training in before:
            m.training = training  # set the flag only: Module.train() may be overridden (frozen backbones)


def in_eval_mode(method):
    """Decorator for a method of an object whose `eval_module` (or itself, an nn.Module) must be in
    eval mode while it runs."""
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        module = self if isinstance(self, nn.Module) else self.eval_module
        with eval_mode(module):
            return method(self, *args, **kwargs)
    return wrapper
