"""The CLI end to end on digits: learning beats random init, W&B offline run, resume (equal to an uninterrupted
run; the command line wins; CSV and W&B history continue), NaN stop, an unwritable run directory, the
errors a misspelt key or a failed weights load end in."""
import csv
import json
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import WandbLogger

from datamodules.digits import DigitsDataModule
from experiments.train import (
    RUN_DIR_ENV,
    WANDB_ID_FILE,
    ReplayHistoryOnResume,
    SuiteCLI,
    last_checkpoint,
    logged_history,
    main,
)
from lightning_modules.isif import ISIF
from tests.wandb_records import records as wandb_records
from tests.wandb_records import summary as wandb_summary

CONFIGS = "experiments/configs"


def train(run_dir, *extra):
    args = ["fit", "--config", f"{CONFIGS}/base.yaml", "--config", f"{CONFIGS}/datasets/digits.yaml",
            "--config", f"{CONFIGS}/isif/digits.yaml", "--run.dir", str(run_dir),
            "--trainer.enable_progress_bar=false", *extra]
    main(args)
    return json.loads(Path(run_dir, "final_metrics.json").read_text())


def written(offline_run: Path, timeout: float = 60) -> Path:
    """The offline run once W&B's service process has written its exit record (it writes after finish()
    returns; on a loaded machine the last summary records can land seconds later)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        log = next(offline_run.glob("run-*.wandb"), None)
        if log and any(r.WhichOneof("record_type") == "exit" for r in wandb_records(log)):
            return offline_run
        time.sleep(0.5)
    raise AssertionError(f"{offline_run}: no exit record after {timeout} s")


def test_training_beats_random_init_and_writes_an_offline_wandb_run(isif_digits_run):
    run_dir = isif_digits_run["dir"]  # TEST_BUDGET["isif"], --run.logger=wandb (tests/conftest.py)
    initial, final = isif_digits_run["initial"], isif_digits_run["final"]
    # `python -m experiments.seeds --methods isif --budget test`, seeds 0-4 at 1 and 2 threads: worst gains
    # kNN top-1 +21.1, NMI +23.0 (R@1 starts at 77-87 and gains only +6: too little headroom to assert on)
    assert final["val/knn_top1"] > initial["val/knn_top1"] + 10
    assert final["val/nmi"] > initial["val/nmi"] + 10
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert "class_path: lightning_modules.isif.ISIF" in (run_dir / "config.yaml").read_text()
    runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    summary = wandb_summary(written(runs[0]))
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


class NaNInEpoch(ISIF):
    def __init__(self, nan_epoch: int, **kwargs):
        super().__init__(**kwargs)
        self.nan_epoch = nan_epoch

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * float("nan") if self.current_epoch == self.nan_epoch else loss


def fit_until_nan(tmp_path, nan_epoch: int) -> str:
    L.seed_everything(0)
    model = NaNInEpoch(nan_epoch, backbone="small_cnn", in_chans=1, embedding_dim=16)
    checkpoint = last_checkpoint(str(tmp_path))
    trainer = L.Trainer(max_epochs=3, limit_train_batches=2, limit_val_batches=0, num_sanity_val_steps=0,
                        callbacks=[checkpoint], logger=False, enable_progress_bar=False, accelerator="cpu")
    with pytest.raises(FloatingPointError) as stop:
        trainer.fit(model, DigitsDataModule(batch_size=32, num_workers=0))
    return str(stop.value)


def test_nan_loss_stops_with_message_and_keeps_last_good_checkpoint(tmp_path):
    message = fit_until_nan(tmp_path, nan_epoch=1)
    assert f"last good checkpoint is kept: {tmp_path / 'last.ckpt'}" in message
    assert f"--ckpt_path={tmp_path / 'last.ckpt'}" in message
    state = torch.load(tmp_path / "last.ckpt", weights_only=False)
    assert state["epoch"] == 0
    assert all(torch.isfinite(v).all() for v in state["state_dict"].values() if v.is_floating_point())


def test_nan_loss_in_the_first_epoch_promises_no_checkpoint(tmp_path):
    message = fit_until_nan(tmp_path, nan_epoch=0)
    assert "No checkpoint was written" in message and "lower the learning rate" in message
    assert "last.ckpt" not in message and "--ckpt_path" not in message
    assert not (tmp_path / "last.ckpt").exists()


def test_a_misspelt_config_key_is_rejected(tmp_path, capsys):
    with pytest.raises(SystemExit):
        train(tmp_path / "bad", "--model.optim.lrr=0.01")
    assert "lrr" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


FAST = ["--trainer.limit_train_batches=3", "--evaluation.kmeans_restarts=1", "--data.init_args.num_workers=0"]


def cli(run_dir, *extra) -> SuiteCLI:
    return SuiteCLI(args=["fit", "--config", f"{CONFIGS}/base.yaml", "--config", f"{CONFIGS}/datasets/digits.yaml",
                          "--config", f"{CONFIGS}/isif/digits.yaml", "--run.dir", str(run_dir),
                          "--trainer.enable_progress_bar=false", *FAST, *extra])


def test_resume_obeys_the_command_line_and_keeps_the_csv_history(tmp_path, monkeypatch, capsys):
    """After a divergence the user resumes with a lower lr: the optimizer must train with it (Lightning
    restores the checkpoint's param-group lr and scheduler base lrs), and metrics.csv keeps epoch 0."""
    monkeypatch.delenv(RUN_DIR_ENV, raising=False)
    run = tmp_path / "run"
    cli(run, "--trainer.max_epochs=1", "--run.logger=csv")
    capsys.readouterr()
    resumed = cli(run, "--trainer.max_epochs=2", "--run.logger=csv", "--model.optim.lr=0.003",
                  f"--ckpt_path={run / 'checkpoints' / 'last.ckpt'}")
    assert "model.optim.lr: 0.03 -> 0.003" in capsys.readouterr().out
    optimizer = resumed.trainer.optimizers[0]
    assert [g["lr"] for g in optimizer.param_groups] == [pytest.approx(0.003)]
    assert resumed.trainer.lr_scheduler_configs[0].scheduler.base_lrs == [pytest.approx(0.003)]
    rows = list(csv.DictReader((run / "csv" / "metrics.csv").open()))
    lr_by_epoch = {int(r["epoch"]): float(r["train/lr"]) for r in rows if r.get("train/lr")}
    assert lr_by_epoch == {0: pytest.approx(0.03), 1: pytest.approx(0.003)}
    assert {int(r["epoch"]) for r in rows if r.get("val/knn_top1")} == {0, 1}


def test_a_resumed_wandb_run_continues_the_same_wandb_run_and_holds_the_epochs_before_the_kill(tmp_path, monkeypatch):
    """A kill -9 can leave the first offline folder with its header only (7 bytes: what W&B had not yet
    written is lost), and syncing the resumed folder replaces the first anyway: the resumed folder holds
    epoch 0 again, from metrics.csv, before its own epoch 1."""
    monkeypatch.delenv(RUN_DIR_ENV, raising=False)
    run = tmp_path / "run"
    cli(run, "--trainer.max_epochs=1", "--run.logger=wandb")
    run_id = (run / WANDB_ID_FILE).read_text().strip()
    first = next((run / "wandb").glob("offline-run-*"))
    log = next(written(first).glob("run-*.wandb"))
    log.write_bytes(log.read_bytes()[:7])
    cli(run, "--trainer.max_epochs=2", "--run.logger=wandb", f"--ckpt_path={run / 'checkpoints' / 'last.ckpt'}")
    offline = sorted((run / "wandb").glob("offline-run-*"))
    assert len(offline) == 2
    assert [p.name.rsplit("-", 1)[-1] for p in offline] == [run_id, run_id]
    history = [{i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
               for r in wandb_records(next(written(offline[1]).glob("run-*.wandb"))) if r.HasField("history")]
    validated = [row["epoch"] for row in history if "val/knn_top1" in row]
    assert validated == [0, 1]
    assert [row["trainer/global_step"] for row in history] == sorted(row["trainer/global_step"] for row in history)


HISTORY = "step,epoch,train/loss,val/knn_top1\n2,0,1.5,\n2,0,,70.0\n5,1,1.25,\n5,1,,80.0\n8,2,1.0,\n"


def test_logged_history_keeps_the_rows_up_to_the_restored_step(tmp_path):
    (tmp_path / "metrics.csv").write_text(HISTORY)
    assert logged_history(tmp_path / "metrics.csv", 5) == [
        (2, {"epoch": 0.0, "train/loss": 1.5}), (2, {"epoch": 0.0, "val/knn_top1": 70.0}),
        (5, {"epoch": 1.0, "train/loss": 1.25}), (5, {"epoch": 1.0, "val/knn_top1": 80.0})]
    assert logged_history(tmp_path / "absent.csv", 5) == []


class RecordingWandb(WandbLogger):
    def __init__(self):
        super().__init__(offline=True)
        self.logged = []

    def log_metrics(self, metrics, step=None):
        self.logged.append((step, dict(metrics)))


def test_a_resumed_offline_wandb_run_logs_the_history_before_its_checkpoint_first(tmp_path):
    (tmp_path / "metrics.csv").write_text(HISTORY)
    wandb = RecordingWandb()
    trainer = type("Trainer", (), {"is_global_zero": True, "global_step": 5, "loggers": [wandb]})()
    ReplayHistoryOnResume(tmp_path / "metrics.csv").on_train_start(trainer, None)
    assert [step for step, _ in wandb.logged] == [2, 2, 5, 5]
    assert wandb.logged[3] == (5, {"epoch": 1.0, "val/knn_top1": 80.0})


def test_a_run_that_cannot_write_its_checkpoint_stops_before_training(tmp_path, monkeypatch):
    """checkpoints/ is a regular file (chmod does not stop root, a file where a folder goes does)."""
    monkeypatch.delenv(RUN_DIR_ENV, raising=False)
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoints").write_text("not a folder")
    with pytest.raises(OSError, match=r"cannot write the run's files to .*checkpoints.*pass a writable --run\.dir"):
        cli(run, "--trainer.max_epochs=1", "--run.logger=csv")
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints"]  # no training, no logs, no metrics


@pytest.mark.parametrize(("flag", "suggestion"), [
    ("--model.optim.lrr=0.01", "--model.optim.lrr is not a key of ISIF; did you mean --model.optim.lr?"),
    ("--model.tempreature=0.2", "did you mean --model.temperature?"),
    ("--data.batchsize=32", "--data.batchsize is not a key of DigitsDataModule; did you mean --data.batch_size"),
    ("--evaluation.knnk=3", "--evaluation.knnk: did you mean --evaluation.knn_k?"),
])
def test_a_misspelt_key_ends_with_the_closest_valid_ones(tmp_path, capsys, flag, suggestion):
    with pytest.raises(SystemExit):
        train(tmp_path / "bad", flag)
    err = capsys.readouterr().err
    assert suggestion in err.strip().splitlines()[-1]
    assert "usage:" not in err
    assert not (tmp_path / "bad").exists()


def test_a_backbone_weights_failure_is_the_error_the_user_sees(tmp_path):
    """The backbone builds inside jsonargparse's instantiation, which buried its message under "does not
    validate against any of the Union subtypes"; the error raised is now the backbone's own."""
    with pytest.raises(ValueError, match="no published pretrained weights") as failure:
        train(tmp_path / "run", "--model.pretrained=true")
    assert "--model.weights=" in str(failure.value)
    assert "Union" not in str(failure.value)
    assert not (tmp_path / "run").exists()


def test_a_missing_checkpoint_is_refused(tmp_path, monkeypatch, capsys):
    """A hostile one: tests/test_reliability.py."""
    monkeypatch.delenv(RUN_DIR_ENV, raising=False)
    with pytest.raises(SystemExit):
        train(tmp_path / "missing", f"--ckpt_path={tmp_path / 'nowhere.ckpt'}")
    assert "nowhere.ckpt: no such file" in capsys.readouterr().err
    assert not (tmp_path / "missing").exists()
