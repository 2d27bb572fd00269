"""The CLI end to end on digits: learning beats random init, W&B offline run, resume, NaN stop."""
import json
from pathlib import Path

import lightning as L
import pytest
import torch

from datamodules.digits import DigitsDataModule
from experiments.train import RUN_DIR_ENV, last_checkpoint, main
from lightning_modules.isif import ISIF
from tests.wandb_records import summary as wandb_summary

CONFIGS = "experiments/configs"


def train(run_dir, *extra):
    args = ["fit", "--config", f"{CONFIGS}/base.yaml", "--config", f"{CONFIGS}/datasets/digits.yaml",
            "--config", f"{CONFIGS}/isif/digits.yaml", "--run.dir", str(run_dir),
            "--trainer.enable_progress_bar=false", *extra]
    main(args)
    return json.loads(Path(run_dir, "final_metrics.json").read_text())


def test_training_beats_random_init_and_writes_an_offline_wandb_run(tmp_path, monkeypatch):
    monkeypatch.delenv(RUN_DIR_ENV, raising=False)
    metrics = train(tmp_path / "run", "--trainer.max_epochs=3", "--run.logger=wandb")
    initial, final = metrics["initial"], metrics["final"]
    assert final["val/knn_top1"] > initial["val/knn_top1"] + 5
    assert final["val/recall@1"] > initial["val/recall@1"] + 2
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()
    assert "class_path: lightning_modules.isif.ISIF" in (tmp_path / "run" / "config.yaml").read_text()
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    summary = wandb_summary(runs[0])
    for name, value in final.items():
        assert summary[name] == pytest.approx(value)
    assert summary["initial/knn_top1"] == pytest.approx(initial["val/knn_top1"])


def test_resume_equals_uninterrupted(tmp_path, monkeypatch):
    monkeypatch.delenv(RUN_DIR_ENV, raising=False)
    fast = ["--run.logger=csv", "--trainer.limit_train_batches=3", "--evaluation.kmeans_restarts=2"]
    straight = train(tmp_path / "straight", "--trainer.max_epochs=2", *fast)
    train(tmp_path / "half", "--trainer.max_epochs=1", *fast)
    resumed = train(tmp_path / "resumed", "--trainer.max_epochs=2", *fast,
                    f"--ckpt_path={tmp_path / 'half' / 'checkpoints' / 'last.ckpt'}")
    assert resumed["initial"] == pytest.approx(straight["initial"])
    assert resumed["final"] == pytest.approx(straight["final"], abs=1e-3)
    assert straight["final"] != straight["initial"]


class NaNInSecondEpoch(ISIF):
    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * float("nan") if self.current_epoch == 1 else loss


def test_nan_loss_stops_with_message_and_keeps_last_good_checkpoint(tmp_path):
    L.seed_everything(0)
    model = NaNInSecondEpoch(backbone="small_cnn", in_chans=1, embedding_dim=16)
    checkpoint = last_checkpoint(str(tmp_path))
    trainer = L.Trainer(max_epochs=3, limit_train_batches=2, num_sanity_val_steps=0, callbacks=[checkpoint],
                        logger=False, enable_progress_bar=False, accelerator="cpu")
    with pytest.raises(FloatingPointError, match="last good checkpoint"):
        trainer.fit(model, DigitsDataModule(batch_size=32))
    state = torch.load(tmp_path / "last.ckpt", weights_only=False)
    assert state["epoch"] == 0
    assert all(torch.isfinite(v).all() for v in state["state_dict"].values() if v.is_floating_point())


def test_a_misspelt_config_key_is_rejected(tmp_path, capsys):
    with pytest.raises(SystemExit):
        train(tmp_path / "bad", "--model.optim.lrr=0.01")
    assert "lrr" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
