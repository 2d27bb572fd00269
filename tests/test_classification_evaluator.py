"""ClassificationEvaluator's MixMatch report (val/error_median20: the median of the last 20 evaluations) on
hand-computed values and in a real fit, and its refusal of a run whose last epoch is not evaluated."""
from __future__ import annotations

import statistics

import lightning as L
import pytest

from callbacks.evaluation import ClassificationEvaluator, median_of_last
from datamodules.digits import DigitsDataModule
from lightning_modules.semi import SemiSupervised

pytestmark = pytest.mark.usefixtures("one_thread")


def test_median_of_the_last_window_hand_computed():
    assert median_of_last(list(range(1, 26)), 20) == 15.5  # 6..25: (15 + 16) / 2
    assert median_of_last([5.0, 1.0, 9.0, 4.0], 3) == 4.0  # 1, 9, 4
    assert median_of_last([5.0, 1.0], 3) is None  # not yet 3 evaluations


class ErrorLog(L.Callback):
    """val/error after every validation of the fit (the evaluator runs before it in the callback list)."""

    def __init__(self, evaluator: ClassificationEvaluator):
        self.evaluator, self.errors, self.medians = evaluator, [], []

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self.errors.append(self.evaluator.latest["val/error"])
            self.medians.append(self.evaluator.latest.get("val/error_median3"))


def fit(max_epochs: int, every: int = 1, window: int = 3) -> tuple[ClassificationEvaluator, ErrorLog]:
    L.seed_everything(0)
    model = SemiSupervised(backbone="small_cnn", in_chans=1, learner="supervised")
    data = DigitsDataModule(protocol="semi", labels_per_class=3, num_views=1, batch_size=64, eval_batch_size=64)
    evaluator = ClassificationEvaluator(median_window=window)
    log = ErrorLog(evaluator)
    trainer = L.Trainer(accelerator="cpu", max_epochs=max_epochs, limit_train_batches=2, limit_val_batches=1,
                        check_val_every_n_epoch=every, num_sanity_val_steps=0, callbacks=[evaluator, log],
                        logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.fit(model, data)
    return evaluator, log


def test_the_median_of_the_last_evaluations_is_reported_with_val_error():
    evaluator, log = fit(max_epochs=5)
    assert len(log.errors) == 5 and len(set(log.errors)) > 1  # the model changes: errors differ
    # absent until 3 evaluations exist, then the median of the last 3
    assert log.medians[:2] == [None, None]
    assert log.medians[2:] == [statistics.median(log.errors[i - 2: i + 1]) for i in (2, 3, 4)]
    assert evaluator.latest["val/error_median3"] == sorted(log.errors[-3:])[1]
    assert evaluator.best["val/error_median3"] == min(log.medians[2:])
    resumed = ClassificationEvaluator(median_window=3)
    resumed.load_state_dict(evaluator.state_dict())  # a resume continues the window
    assert resumed.errors == log.errors[-3:]


def test_a_run_whose_last_epoch_is_not_evaluated_is_refused():
    with pytest.raises(ValueError, match="--trainer.max_epochs 4 or --trainer.check_val_every_n_epoch 1"):
        fit(max_epochs=5, every=2)
