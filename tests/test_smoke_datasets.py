"""`make train METHOD=isif DATASET=<each>` on a tiny fixture in the dataset's on-disk format: the whole
CLI path (configs, reader, protocol, loaders, model, evaluator, run directory) runs two training steps."""
import json
from pathlib import Path

import pytest

from datamodules import DATAMODULES
from datamodules.imagenet import CMC_IMAGENET100
from experiments.train import RUN_DIR_ENV, main
from tests.test_datamodules import WRITERS

CONFIGS = Path("experiments/configs")


@pytest.mark.parametrize("name", [n for n in DATAMODULES if n != "digits"])
def test_isif_trains_on_the_fixture(tmp_path, monkeypatch, name):
    monkeypatch.delenv(RUN_DIR_ENV, raising=False)
    root = WRITERS[name](tmp_path / "data")
    extra = ["--data.classes", json.dumps(list(CMC_IMAGENET100[:3]))] if name == "imagenet100" else []
    main(["fit", "--config", str(CONFIGS / "base.yaml"), "--config", str(CONFIGS / "datasets" / f"{name}.yaml"),
          "--config", str(CONFIGS / "isif" / f"{name}.yaml"), "--data.root", str(root), *extra,
          "--run.dir", str(tmp_path / "run"), "--run.logger", "csv", "--model.pretrained=false",
          "--data.allow_partial=true",  # the fixtures are tiny: every published count differs
          "--data.num_workers=0", "--data.batch_size=2", "--data.eval_batch_size=8", "--trainer.max_epochs=1",
          "--trainer.limit_train_batches=2", "--trainer.precision=32-true", "--trainer.accelerator=cpu",
          "--trainer.check_val_every_n_epoch=1", "--trainer.enable_progress_bar=false",
          "--evaluation.kmeans_restarts=1",
          # a cheap network at 64 px: this test is about the data path; backbones have their own tests
          "--model.backbone=resnet18", "--data.image_size=64"])
    metrics = json.loads((tmp_path / "run" / "final_metrics.json").read_text())
    assert metrics["final"] and set(metrics["final"]) == set(metrics["initial"])
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()
