"""The number of positive candidates k per epoch: UMM's dynamic sampling-from-distribution (SFD).

Uncertainty is large early and shrinks (UMM Fig. 10), so more candidates are drawn early and fewer later;
the paper uses non-increasing step schedules (UMM paper §4). Linear and cosine decay are ours. k is a
pure function of the epoch, so the callback holds no state and a resumed run continues exactly.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from itertools import pairwise

import lightning as L

MODES = ("step", "constant", "linear", "cosine")


def num_samples_at(epoch: int, mode: str, values: Sequence[int], milestones: Sequence[int] = (),
                   max_epochs: int = 1) -> int:
    """k at `epoch` (0-based, set at the epoch's start).

    step: values[i] from milestones[i - 1] on (values[0] before the first milestone); constant: values[0];
    linear / cosine: from values[0] at epoch 0 to values[1] at epoch max_epochs - 1, rounded half up.
    """
    if mode == "constant":
        return values[0]
    if mode == "step":
        return values[sum(epoch >= m for m in milestones)]
    progress = min(epoch / max(max_epochs - 1, 1), 1.0)
    if mode == "cosine":
        progress = 0.5 * (1.0 - math.cos(math.pi * progress))
    elif mode != "linear":
        raise ValueError(f"k schedule mode {mode!r}: use one of {', '.join(MODES)}")
    return max(1, math.floor(values[0] + (values[1] - values[0]) * progress + 0.5))


def _check(mode: str, values: Sequence[int], milestones: Sequence[int]) -> None:
    """Reject schedules that cannot be read, naming the fix."""
    if mode not in MODES:
        raise ValueError(f"k schedule mode {mode!r}: use one of {', '.join(MODES)}")
    if not values or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values):
        raise ValueError(f"k schedule values {list(values)}: give integers >= 1")
    expected = {"step": len(milestones) + 1, "constant": 1, "linear": 2, "cosine": 2}[mode]
    if len(values) != expected:
        raise ValueError(f"k schedule {mode!r} with milestones {list(milestones)} needs {expected} value(s), "
                         f"got {list(values)}" + (" (one more than milestones)" if mode == "step" else ""))
    if mode != "step" and milestones:
        raise ValueError(f"k schedule {mode!r} takes no milestones; remove {list(milestones)} or use mode: step")
    if any(b <= a for a, b in pairwise(milestones)) or any(m < 0 for m in milestones):
        raise ValueError(f"k schedule milestones {list(milestones)}: give increasing epochs >= 0")
    if any(b > a for a, b in pairwise(values)):
        warnings.warn(f"k schedule values {list(values)} increase somewhere; the paper only decreases k")


class KSchedule(L.Callback):
    """Sets k with `pl_module.set_num_samples(k)` at every epoch start and logs it as train/num_samples.

    Args:
      values: step: k per phase (len(milestones) + 1); constant: [k]; linear / cosine: [k_start, k_end].
      mode: "step" (the paper), "constant" (ablations), "linear" or "cosine" (extensions, over max_epochs).
      milestones: step only: the epochs (0-based) at which the next value starts.
    """

    def __init__(self, values: Sequence[int], mode: str = "step", milestones: Sequence[int] = ()):
        values, milestones = list(values), list(milestones)
        _check(mode, values, milestones)
        self.mode, self.values, self.milestones = mode, values, milestones

    def num_samples(self, epoch: int, max_epochs: int) -> int:
        return num_samples_at(epoch, self.mode, self.values, self.milestones, max_epochs)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not callable(getattr(pl_module, "set_num_samples", None)):
            raise TypeError(f"KSchedule sets k through set_num_samples(k), which {type(pl_module).__name__} "
                            "lacks: use it with UMM, or drop the callback from trainer.callbacks")
        if self.mode in ("linear", "cosine") and (trainer.max_epochs or -1) < 1:
            raise ValueError(f"k schedule {self.mode!r} decays over trainer.max_epochs; set max_epochs >= 1")
        k = self.num_samples(trainer.current_epoch, trainer.max_epochs or 1)
        pl_module.set_num_samples(k)
        pl_module.log("train/num_samples", float(k), on_step=False, on_epoch=True)
