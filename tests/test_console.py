"""What a run prints and leaves behind, as a SLURM job sees it (stdout not a terminal): one line per epoch with
the headline metrics, the random-init pass named as such, no progress bars, no known third-party noise;
W&B and the CSV history together; the precision used in config.yaml; a missing data root stops before
anything is written; `make eval` / `make export` on the run's checkpoint."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from embedding_core import metrics
from experiments import evaluate
from experiments.console import headline, show_progress_bar
from experiments.train import RUN_DIR_ENV, main

CONFIGS = "experiments/configs"
ROOT = Path(__file__).parents[1]
EPOCHS = 2


@pytest.fixture(scope="module")
def piped_run(tmp_path_factory):
    """A 2-epoch digits run with the default logger (W&B offline + CSV) and pictures, its output piped."""
    run = tmp_path_factory.mktemp("piped") / "run"
    env = {k: v for k, v in os.environ.items() if k not in (RUN_DIR_ENV, "WANDB_API_KEY", "SUITE_PICTURES")}
    env.update(WANDB_MODE="offline", OMP_NUM_THREADS="1")
    done = subprocess.run(
        [sys.executable, "-m", "experiments.train", "fit", "--config", f"{CONFIGS}/base.yaml", "--config",
         f"{CONFIGS}/datasets/digits.yaml", "--config", f"{CONFIGS}/isif/digits.yaml", "--run.dir", str(run),
         f"--trainer.max_epochs={EPOCHS}", "--trainer.limit_train_batches=3", "--evaluation.kmeans_restarts=1",
         "--data.init_args.num_workers=0"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=300, check=False)
    log = done.stdout.decode()
    assert done.returncode == 0, log
    return run, log


def test_a_piped_log_has_one_line_per_epoch_and_no_bars_or_noise(piped_run):
    _, log = piped_run
    lines = log.splitlines()
    epoch_lines = [line for line in lines if line.startswith("epoch ")]
    assert [line.split(" |")[0] for line in epoch_lines] == [f"epoch {e}/{EPOCHS}" for e in range(1, EPOCHS + 1)]
    assert all("knn_top1" in line and "recall@1" in line and "nmi" in line and "loss" in line for line in epoch_lines)
    assert sum(line.startswith("random-init evaluation (before the first step): knn_top1") for line in lines) == 1
    for noise in ("Sanity Checking", "it/s", "LeafSpec", "Tip:", "anonymous setting", "Run history"):
        assert noise not in log
    # before: ~3.5 KB of progress-bar redraws per epoch; the whole log is now under 2 KB per epoch
    assert len(log.encode()) < 2048 * EPOCHS, log


def test_the_default_logger_keeps_csv_history_and_an_offline_wandb_run(piped_run):
    run, log = piped_run
    history = (run / "csv" / "metrics.csv").read_text().splitlines()
    assert "val/knn_top1" in history[0] and len(history) > EPOCHS
    offline = list((run / "wandb").glob("offline-run-*"))
    assert len(offline) == 1 and f"wandb sync {offline[0]}" in log
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["trainer"]["precision"] == "32-true"  # base.yaml's null, resolved on a CPU run


def test_pictures_are_drawn_by_default_and_reach_wandb(piped_run):
    run, _ = piped_run
    last = EPOCHS - 1
    assert sorted(p.name for p in (run / "pictures").iterdir()) == [f"map-epoch{last:03d}.png",
                                                                     f"retrieval-epoch{last:03d}.png"]
    media = list((run / "wandb").glob("offline-run-*/files/media/images/pictures/*.png"))
    assert len(media) == 2


def test_a_missing_data_root_stops_first_and_leaves_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv(RUN_DIR_ENV, raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    run = tmp_path / "run"
    with pytest.raises(SystemExit):
        main(["fit", "--config", f"{CONFIGS}/base.yaml", "--config", f"{CONFIGS}/datasets/cifar10.yaml",
              "--config", f"{CONFIGS}/isif/cifar10.yaml", f"--data.init_args.root={tmp_path / 'nowhere'}",
              "--run.dir", str(run), "--run.logger=wandb"])
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "does not exist" in err and "Traceback" not in err
    assert not run.exists()


def test_progress_bars_only_on_a_terminal():
    class Stream:
        def __init__(self, tty):
            self.isatty = lambda: tty
    assert show_progress_bar(None, Stream(True)) and not show_progress_bar(None, Stream(False))
    assert show_progress_bar(True, Stream(False)) and not show_progress_bar(False, Stream(True))
    assert list(headline({"val/nmi": 1.0, "val/recall@2": 2.0, "val/knn_top1": 3.0})) == ["val/knn_top1", "val/nmi"]


def test_eval_and_export_of_the_runs_checkpoint(piped_run, tmp_path, capsys, monkeypatch):
    run, _ = piped_run
    monkeypatch.delenv(RUN_DIR_ENV, raising=False)
    ckpt = run / "checkpoints" / "last.ckpt"
    final = json.loads((run / "final_metrics.json").read_text())["final"]
    evaluate.main(["eval", str(ckpt), "--out", str(tmp_path / "eval"), "--", "--data.init_args.num_workers=0"])
    out = capsys.readouterr().out
    assert out.count("val/knn_top1") == 1  # printed once (Lightning's table showed each metric per loader)
    scores = json.loads((tmp_path / "eval" / "eval_metrics.json").read_text())["metrics"]
    assert scores == pytest.approx(final, abs=1e-4)
    monkeypatch.delenv(RUN_DIR_ENV, raising=False)
    evaluate.main(["export", str(ckpt), "--out", str(tmp_path / "export"), "--", "--data.init_args.num_workers=0"])
    folder = tmp_path / "export"
    query, labels = np.load(folder / "query_embeddings.npy"), np.load(folder / "query_labels.npy")
    assert query.shape == (360, 64) and labels.shape == (360,) and np.load(folder / "reference_labels.npy").size == 1437
    recall = metrics.recall_at_k(torch.from_numpy(query), torch.from_numpy(labels), [1])[1]
    assert recall == pytest.approx(final["val/recall@1"])  # the exported embeddings are the evaluated ones
    trunk = torch.load(folder / "backbone.pt", weights_only=True)
    saved = torch.load(ckpt, weights_only=True)["state_dict"]
    assert all(torch.equal(v, saved[f"trunk.{k}"]) for k, v in trunk.items())
