"""Snowball's sample discovery on digits with N CPU processes (gloo), then a validation with
ClassificationEvaluator, writing rank 0's discoveries and errors to a JSON file: tests/test_sample_discovery_ddp.py
calls `run` for 1 process and launches `python -m tests.ddp_discovery --devices 2` for 2. The weights stay those of the seeded initialisation (lr 0, frozen BatchNorm), so 1
and 2 processes discover and score the same model, the second discovery from the set the first grew."""
import argparse
import json

import lightning as L
import torch

from callbacks.evaluation import ClassificationEvaluator
from callbacks.sample_discovery import ConfidentSampleDiscovery
from datamodules.digits import DigitsDataModule
from lightning_modules.base import Optim
from lightning_modules.snowball import Curriculum, Snowball


def run(devices: int, out: str) -> None:
    torch.set_num_threads(1)  # DDP gives each of the 2 processes one; the 1-process run alike
    L.seed_everything(0)
    model = Snowball(backbone="small_cnn", in_chans=1, frozen_bn=True, optim=Optim(name="sgd", lr=0.0),
                     curriculum=Curriculum(phase0_epochs=0, iteration_epochs=1, generations=1, iterations=2))
    data = DigitsDataModule(protocol="semi", labels_per_class=3, test_fraction=0.8, batch_size=64,
                            eval_batch_size=50, unlabeled_includes_labeled=True)  # 359 training images: odd
    discovery, evaluator = ConfidentSampleDiscovery(), ClassificationEvaluator()
    trainer = L.Trainer(accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto",
                        max_epochs=2, limit_train_batches=1, check_val_every_n_epoch=2, num_sanity_val_steps=0,
                        callbacks=[discovery, evaluator], logger=False, enable_progress_bar=False,
                        enable_checkpointing=False, default_root_dir=out + ".run")
    trainer.fit(model, data)
    trainer.validate(model, data)  # 1,438 test images: not divisible by 2 either
    if trainer.is_global_zero:
        with open(out, "w") as f:
            json.dump({"history": discovery.history, "labeled": data.labeled_indices.tolist(),
                       "targets": data.labeled_targets.tolist(), "errors": evaluator.latest}, f)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--devices", type=int, required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    run(args.devices, args.out)
