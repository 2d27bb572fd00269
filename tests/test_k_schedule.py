"""The k schedule: the paper's milestones from the shipped configs, the extensions, a real fit on digits in
which the candidate shapes follow k, and a resume that continues the schedule."""
import lightning as L
import pytest
import yaml

from callbacks.k_schedule import KSchedule, num_samples_at
from datamodules.digits import DigitsDataModule
from lightning_modules import umm
from lightning_modules.umm import UMM


def shipped_schedule(dataset: str) -> KSchedule:
    with open(f"experiments/configs/umm/{dataset}.yaml") as f:
        config = yaml.safe_load(f)
    (callback,) = [c for c in config["trainer"]["callbacks"] if c["class_path"].endswith("KSchedule")]
    return KSchedule(**callback["init_args"])


@pytest.mark.parametrize(("dataset", "epochs", "expected"), [
    ("cifar10", [0, 99, 100, 120, 149, 150, 199], [5, 5, 3, 3, 3, 1, 1]),
    ("stl10", [99, 100, 150], [5, 3, 1]),
    ("cub", [29, 30, 59, 60, 89], [50, 30, 30, 10, 10]),
    ("imagenet", [99, 100], [3, 2]),
])
def test_paper_configs_follow_the_paper_milestones(dataset, epochs, expected):
    schedule = shipped_schedule(dataset)
    assert [schedule.num_samples(e, max_epochs=200) for e in epochs] == expected


def test_decays_and_constant():
    linear = [num_samples_at(e, "linear", [9, 1], max_epochs=5) for e in range(6)]
    cosine = [num_samples_at(e, "cosine", [9, 1], max_epochs=5) for e in range(5)]
    assert linear == [9, 7, 5, 3, 1, 1]
    assert cosine == [9, 8, 5, 2, 1] and cosine[1] > linear[1]
    assert num_samples_at(7, "constant", [4]) == 4


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"values": [5, 3], "milestones": [10, 20]}, "needs 3 value"),
    ({"values": [5, 0], "milestones": [10]}, "integers >= 1"),
    ({"values": [5, 3, 1], "milestones": [20, 10]}, "increasing"),
    ({"values": [4], "mode": "constant", "milestones": [10]}, "takes no milestones"),
    ({"values": [4], "mode": "exponential"}, "step, constant, linear, cosine"),
])
def test_bad_schedules_name_the_fix(kwargs, message):
    with pytest.raises(ValueError, match=message):
        KSchedule(**kwargs)


def test_an_increasing_schedule_warns():
    with pytest.warns(UserWarning, match="increase"):
        KSchedule(values=[1, 3], milestones=[5])


class Record(L.Callback):
    def __init__(self):
        self.logged = {}

    def on_train_epoch_end(self, trainer, pl_module):
        self.logged[trainer.current_epoch] = trainer.callback_metrics["train/num_samples"].item()


def fit(tmp_path, max_epochs, monkeypatch, ckpt_path=None):
    """A few steps per epoch on digits; returns {epoch: candidate counts seen by L_S} and logged k."""
    seen = {}
    original = umm.set_softmax_loss

    def spy(z1, z2, *args, **kwargs):
        seen.setdefault(model.current_epoch, set()).add(tuple(z1.shape[1:]))
        return original(z1, z2, *args, **kwargs)

    monkeypatch.setattr(umm, "set_softmax_loss", spy)
    L.seed_everything(0)
    model = UMM(backbone="small_cnn", in_chans=1, embedding_dim=8, num_samples=7)
    record = Record()
    trainer = L.Trainer(max_epochs=max_epochs, limit_train_batches=2, limit_val_batches=0, num_sanity_val_steps=0,
                        callbacks=[KSchedule(values=[4, 2, 1], milestones=[1, 2]), record],
                        default_root_dir=tmp_path, logger=False, enable_progress_bar=False, accelerator="cpu")
    trainer.fit(model, DigitsDataModule(batch_size=16), ckpt_path=ckpt_path)
    return seen, record.logged, trainer


def test_k_follows_the_milestones_in_a_real_fit_and_changes_the_loss_shapes(tmp_path, monkeypatch):
    seen, logged, _ = fit(tmp_path / "straight", 3, monkeypatch)
    assert seen == {0: {(4, 8)}, 1: {(2, 8)}, 2: {(1, 8)}}
    assert logged == {0: 4.0, 1: 2.0, 2: 1.0}


def test_a_resumed_fit_continues_the_schedule(tmp_path, monkeypatch):
    _, _, trainer = fit(tmp_path / "half", 2, monkeypatch)
    checkpoint = tmp_path / "half.ckpt"
    trainer.save_checkpoint(checkpoint)
    seen, logged, _ = fit(tmp_path / "resumed", 3, monkeypatch, ckpt_path=checkpoint)
    assert seen == {2: {(1, 8)}} and logged == {2: 1.0}


def test_a_module_without_the_hook_is_named():
    class NoHook(L.LightningModule):
        pass

    class FakeTrainer:
        current_epoch, max_epochs = 0, 1

    with pytest.raises(TypeError, match="set_num_samples"):
        KSchedule(values=[3]).on_train_epoch_start(FakeTrainer(), NoHook())
