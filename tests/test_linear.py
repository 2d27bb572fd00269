import json
import subprocess
import sys

import lightning as L
import pytest
import torch

from callbacks.linear import LinearProbe, LinearSVM, linear_probe_top1, linear_svm_top1
from datamodules.digits import DigitsDataModule
from lightning_modules.isif import ISIF
from tests.ddp_linear import linear_metrics

pytestmark = pytest.mark.usefixtures("one_thread")
SHORT = {"epochs": 30, "lr": 1.0, "milestones": [20], "batch_size": 64}  # the probe's recipe, small


def separable_with_one_flipped():
    """Class 0 at x < 0, class 1 at x > 0 (train: 40 points, margin 1); test: 4 points, the last one's
    label flipped, so a linear classifier that separates the train set scores exactly 3 / 4."""
    g = torch.Generator().manual_seed(0)
    side = torch.tensor([-1.0, 1.0]).repeat(20)
    train_x = torch.stack([side * (1 + torch.rand(40, generator=g)), torch.randn(40, generator=g)], 1)
    train_y = (side > 0).long()
    test_x = torch.tensor([[-2.0, 0.5], [2.0, -0.5], [-1.5, 0.0], [1.5, 1.0]])
    test_y = torch.tensor([0, 1, 0, 0])  # the last point lies on class 1's side
    return train_x, train_y, test_x, test_y


def random_case(classes=10, dim=16, train=500, test=2000):
    g = torch.Generator().manual_seed(1)
    return (torch.randn(train, dim, generator=g), torch.randint(classes, (train,), generator=g),
            torch.randn(test, dim, generator=g), torch.randint(classes, (test,), generator=g))


def test_probe_and_svm_give_the_hand_known_accuracy_on_a_separable_case():
    case = separable_with_one_flipped()
    assert linear_probe_top1(*case, **SHORT) == 75.0
    assert linear_svm_top1(*case) == 75.0
    assert linear_svm_top1(*case, c=[0.01, 1.0, 100.0], folds=2) == 75.0  # C chosen by cross-validation


def test_probe_and_svm_on_random_labels_score_chance():
    case = random_case()  # 10 classes: chance is 10 %, the 2,000 test labels give a std of 0.7 points
    assert 6.0 < linear_probe_top1(*case, **SHORT) < 14.0
    assert 6.0 < linear_svm_top1(*case) < 14.0


def test_the_probe_is_seeded():
    case = random_case(train=200, test=100)
    assert linear_probe_top1(*case, **SHORT, seed=3) == linear_probe_top1(*case, **SHORT, seed=3)


def test_callbacks_report_initial_final_and_every_n_epochs_in_a_real_fit():
    L.seed_everything(0)
    probe = LinearProbe(features="backbone", **SHORT)  # the random-init pass and the end of training
    svm = LinearSVM(every_n_epochs=2, initial=False)   # every 2 epochs and the end, no random-init pass
    scored = []
    record = svm.record
    svm.record = lambda trainer, *a, **k: (scored.append(trainer.current_epoch), record(trainer, *a, **k))
    trainer = L.Trainer(accelerator="cpu", max_epochs=3, limit_train_batches=1, num_sanity_val_steps=-1,
                        callbacks=[probe, svm], logger=False, enable_progress_bar=False,
                        enable_checkpointing=False, enable_model_summary=False)
    trainer.fit(ISIF(backbone="small_cnn", in_chans=1, embedding_dim=32), DigitsDataModule(num_workers=0))
    assert scored == [1, 2]  # epoch 2 (every 2) and the last one
    # digits' pixels are nearly linearly separable: a random conv net's pooled features keep most of it
    assert probe.initial["val/linear_top1"] > 50 and svm.initial == {}
    assert set(probe.latest) == {"val/linear_top1"} and set(svm.latest) == {"val/svm_top1"}
    assert trainer.callback_metrics["val/svm_top1"] == pytest.approx(svm.latest["val/svm_top1"])


def test_a_protocol_without_reference_is_refused():
    with pytest.raises(ValueError, match="protocol=seen"):
        L.Trainer(accelerator="cpu", max_epochs=1, limit_train_batches=1, callbacks=[LinearSVM()], logger=False,
                  enable_progress_bar=False, enable_checkpointing=False).fit(
            ISIF(backbone="small_cnn", in_chans=1, embedding_dim=16),
            DigitsDataModule(protocol="unseen", num_workers=0))


def test_two_processes_report_what_one_reports(tmp_path):
    out = tmp_path / "ddp.json"
    subprocess.run([sys.executable, "-m", "tests.ddp_linear", "--devices", "2", "--out", str(out)], check=True,
                   capture_output=True, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    one, _ = linear_metrics(1)
    assert json.loads(out.read_text()) == one  # same gathered features, same seeded fits: equal to the bit
