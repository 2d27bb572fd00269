"""What keeps a run's checkpoint and a resume honest, without training: the atomic checkpoint write
(a failure or a kill mid-save leaves the previous file), the param groups a resume applies, the
settings diff it prints and the keys a misspelt one is matched against."""
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from experiments.train import (
    WANDB_ID_FILE,
    AtomicCheckpointIO,
    init_keys,
    resumed_param_groups,
    setting_changes,
    wandb_run_id,
)


def saved(path) -> dict:
    return torch.load(path, weights_only=True)


def test_a_save_that_fails_midway_leaves_the_previous_checkpoint(tmp_path):
    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("disk full, say")

    io, path = AtomicCheckpointIO(), tmp_path / "last.ckpt"
    io.save_checkpoint({"epoch": 0, "w": torch.ones(1000)}, path)
    with pytest.raises(RuntimeError, match="disk full"):
        io.save_checkpoint({"epoch": 1, "w": torch.zeros(1000), "bad": Unpicklable()}, path)
    assert saved(path)["epoch"] == 0 and saved(path)["w"].sum() == 1000
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # the partial temporary file is removed


KILLED_BETWEEN_WRITE_AND_RENAME = """
import os, signal, sys, torch
from experiments.train import AtomicCheckpointIO
io, path = AtomicCheckpointIO(), sys.argv[1]
io.save_checkpoint({"epoch": 0, "w": torch.ones(1000)}, path)
os.replace = lambda src, dst: os.kill(os.getpid(), signal.SIGKILL)  # the kill lands after write + fsync
io.save_checkpoint({"epoch": 1, "w": torch.zeros(1000)}, path)
"""


def test_a_save_killed_before_the_rename_leaves_the_previous_checkpoint(tmp_path):
    path = tmp_path / "last.ckpt"
    done = subprocess.run([sys.executable, "-c", KILLED_BETWEEN_WRITE_AND_RENAME, str(path)], check=False,
                          cwd=Path(__file__).parents[1], timeout=120)
    assert done.returncode == -signal.SIGKILL
    assert saved(path)["epoch"] == 0 and saved(path)["w"].sum() == 1000
    partial = [p for p in tmp_path.iterdir() if p != path]
    assert len(partial) == 1 and partial[0].parent == path.parent  # staged beside it, never elsewhere
    assert saved(partial[0])["epoch"] == 1  # fully written and synced before the rename
    AtomicCheckpointIO().save_checkpoint({"epoch": 2}, path)  # the next save clears the killed one's file
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"] and saved(path)["epoch"] == 2


def test_a_checkpoint_folder_that_is_a_file_is_an_error_naming_the_flag(tmp_path):
    (tmp_path / "checkpoints").write_text("")
    with pytest.raises(OSError, match=r"could not write checkpoint .* pass a writable --run\.dir"):
        AtomicCheckpointIO().save_checkpoint({"epoch": 0}, tmp_path / "checkpoints" / "last.ckpt")


def test_resumed_param_groups_take_this_runs_settings_at_the_schedules_position():
    # checkpoint: initial lr 0.1, now at x0.1 of it (a step schedule passed a milestone); momentum 0.9
    ckpt = [{"lr": 0.01, "initial_lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4, "params": [0]}]
    fresh = [{"lr": 0.02, "initial_lr": 0.02, "momentum": 0.8, "weight_decay": 0.0, "params": [1]}]
    assert resumed_param_groups(ckpt, fresh) == [
        {"lr": pytest.approx(0.002), "initial_lr": 0.02, "momentum": 0.8, "weight_decay": 0.0}]
    same = [{**fresh[0], "initial_lr": 0.1}]
    assert resumed_param_groups(ckpt, same)[0]["lr"] == 0.01  # unchanged lr: exactly the checkpoint's
    no_schedule = [{"lr": 0.05, "momentum": 0.9}]
    assert resumed_param_groups([{"lr": 0.3, "momentum": 0.9}], no_schedule) == no_schedule
    with pytest.raises(ValueError, match="parameter groups"):
        resumed_param_groups(ckpt, fresh * 2)


def test_setting_changes_lists_nested_differences_only():
    old = {"temperature": 0.1, "optim": {"lr": 0.03, "betas": [0.9, 0.999]}, "weights": None}
    new = {"temperature": 0.1, "optim": {"lr": 0.003, "betas": (0.9, 0.999)}, "frozen_bn": True}
    assert setting_changes(old, new) == [("frozen_bn", "<unset>", True), ("optim.lr", 0.03, 0.003),
                                         ("weights", None, "<unset>")]


def test_a_changed_evaluation_set_is_incomparable_and_a_setting_the_checkpoint_predates_is_not():
    from experiments.train import incomparable_data_changes

    saved = {"class_path": "CIFAR10DataModule", "protocol": "seen", "validation_per_class": 0, "batch_size": 64}
    assert incomparable_data_changes(saved, {**saved, "validation_per_class": 500, "batch_size": 32}) == [
        ("validation_per_class", 0, 500)]
    assert incomparable_data_changes(saved, {**saved, "train_per_class": 0}) == []  # older checkpoint
    assert incomparable_data_changes({**saved, "train_per_class": 0}, {**saved, "train_per_class": 500}) == [
        ("train_per_class", 0, 500)]


@dataclass
class Knobs:
    lr: float = 0.1
    steps: int = 3


class Base:
    def __init__(self, width: int = 1, knobs: Knobs | None = None):
        pass


class Child(Base):
    def __init__(self, depth: int = 2, **kwargs):
        super().__init__(**kwargs)


def test_init_keys_follow_kwargs_into_the_base_and_expand_dataclasses():
    assert init_keys(Child) == ["depth", "width", "knobs", "knobs.lr", "knobs.steps"]


def test_the_wandb_run_id_is_stored_and_reused_on_resume_only(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_RUN_ID", raising=False)
    first = wandb_run_id(str(tmp_path), resume=False)
    assert (tmp_path / WANDB_ID_FILE).read_text().strip() == first
    assert wandb_run_id(str(tmp_path), resume=True) == first
    fresh = wandb_run_id(str(tmp_path), resume=False)  # a new run in the same folder is a new W&B run
    assert fresh != first and (tmp_path / WANDB_ID_FILE).read_text().strip() == fresh
    monkeypatch.setenv("WANDB_RUN_ID", "sweep-trial-7")  # a sweep agent's id wins
    assert wandb_run_id(str(tmp_path), resume=True) == "sweep-trial-7"
