"""BatchNorm modes that normalise with the batch's statistics without touching the running ones: the
semi-supervised base's label guess, LMCS's master and TAC-CCL's in-batch matching pass use them."""
from __future__ import annotations

import contextlib

from torch import nn


@contextlib.contextmanager
def untracked_batchnorm(*modules: nn.Module):
    """Every BatchNorm in training mode normalises with the batch's statistics and leaves its running ones
    (and batch count) as they were; one in eval mode keeps using its running statistics. MixMatch guesses
    labels this way: its guess pass runs in training mode and its code keeps only the BN updates of the
    training forward (see docs/methods/lmcs.md). The one owner of the rule: the base's label guess and
    LMCS's master use it."""
    norms = [m for module in modules for m in module.modules()
             if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats]
    for m in norms:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in norms:
            m.track_running_stats = True


@contextlib.contextmanager
def batch_statistics(*modules: nn.Module):
    """Every BatchNorm normalises with the batch's statistics, in training or evaluation mode, and leaves its
    running ones as they were (`untracked_batchnorm`); every other layer keeps its mode, so dropout and noise
    stay off in evaluation. LMCS's master is trained on features normalised this way, so its J_D centres and
    its evaluation use them too (see docs/methods/lmcs.md)."""
    norms = [m for module in modules for m in module.modules()
             if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    flags = [m.training for m in norms]
    for m in norms:
        m.train()
    try:
        with untracked_batchnorm(*modules):
            yield
    finally:
        for m, flag in zip(norms, flags):
            m.training = flag
