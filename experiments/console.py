"""What a run prints: one line per validation with the headline metrics, the random-init pass named as
such, progress bars only on a terminal, and the known third-party noise filtered out.

A SLURM log (stdout not a terminal) then holds a few short lines per epoch instead of ~3.5 KB of progress
bar redraws; on a terminal the bar stays, its sanity-check pass is labelled "Random-init evaluation" and the
epoch lines are written above it.
"""
from __future__ import annotations

import logging
import sys
import time
import warnings

import lightning as L
import torch
from lightning.pytorch.callbacks import TQDMProgressBar

RANDOM_INIT = "random-init evaluation (before the first step)"
# the metrics an epoch line shows, in this order, where the run reports them; the rest are in metrics.csv / W&B
HEADLINE = ("val/knn_top1", "val/recall@1", "val/recall@1_refined", "val/map@r", "val/nmi", "val/error",
            "val/linear_top1", "val/svm_top1")

# Messages that every run repeated and that ask nothing of the user: (logger or None for warnings, start).
_NOISE_WARNINGS = (
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",  # lightning's _pytree on torch >= 2.10
)
_NOISE_LOG_PREFIXES = ("💡 Tip: ",)  # Lightning's litlogger / litmodels advertisements
_RANK_ZERO_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")


def _not_noise(record: logging.LogRecord) -> bool:
    return not str(record.getMessage()).startswith(_NOISE_LOG_PREFIXES)


def quiet_known_noise() -> None:
    """Filter the known third-party messages (each matched by its own text, nothing else is hidden)."""
    for pattern in _NOISE_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    for name in _RANK_ZERO_LOGGERS:
        logger = logging.getLogger(name)
        if _not_noise not in logger.filters:
            logger.addFilter(_not_noise)


def show_progress_bar(requested: bool | None, stream=None) -> bool:
    """`trainer.enable_progress_bar` as given, else (null, the default) only when stdout is a terminal."""
    if requested is not None:
        return bool(requested)
    stream = sys.stdout if stream is None else stream
    return bool(getattr(stream, "isatty", lambda: False)())


class SuiteProgressBar(TQDMProgressBar):
    """Lightning's bar with the random-init pass named for what it is."""

    @property
    def sanity_check_description(self) -> str:
        return "Random-init evaluation"


def headline(scores: dict[str, float], limit: int = 4) -> dict[str, float]:
    """The HEADLINE metrics `scores` holds, in HEADLINE's order (else its first `limit` val/ metrics)."""
    shown = {name: scores[name] for name in HEADLINE if name in scores}
    return shown or dict(sorted(scores.items())[:limit])


def format_scores(scores: dict[str, float]) -> str:
    return "  ".join(f"{name.removeprefix('val/')} {value:.2f}" for name, value in scores.items())


def scoreboards(trainer) -> list:
    from callbacks.evaluation import Scoreboard
    return [c for c in trainer.callbacks if isinstance(c, Scoreboard)]


class EpochLine(L.Callback):
    """One line after every validation of a fit: the epoch, its mean training loss, the headline metrics
    and the epoch's wall time; the random-init pass gives one line named as such. Rank 0 only."""

    def __init__(self) -> None:
        self._loss_sum: torch.Tensor | None = None
        self._steps = 0
        self._start = time.monotonic()

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._loss_sum, self._steps, self._start = None, 0, time.monotonic()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if torch.is_tensor(loss):  # summed on the device: no synchronisation per step
            self._loss_sum = loss.detach().float() + (0 if self._loss_sum is None else self._loss_sum)
            self._steps += 1

    def line(self, trainer) -> str | None:
        boards = scoreboards(trainer)
        if trainer.sanity_checking:
            scores = {k: v for b in boards for k, v in b.initial.items()}
            return f"{RANDOM_INIT}: {format_scores(headline(scores))}" if scores else None
        scores = {k: v for b in boards for k, v in b.latest.items()}
        parts = [f"epoch {trainer.current_epoch + 1}/{trainer.max_epochs}"]
        if self._steps:
            parts.append(f"loss {float(self._loss_sum) / self._steps:.4g}")
        if scores:
            parts.append(format_scores(headline(scores)))
        parts.append(f"{time.monotonic() - self._start:.0f} s")
        return " | ".join(parts)

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.state.fn != "fit" or not trainer.is_global_zero:
            return
        text = self.line(trainer)
        if not text:
            return
        bar = trainer.progress_bar_callback
        if bar is not None and getattr(bar, "is_enabled", False):
            bar.print(text)
        else:
            print(text, flush=True)
