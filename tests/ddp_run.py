"""Run by tests/test_ddp.py in a fresh process: evaluate (and optionally train) ISIF on digits with N
CPU processes (gloo) and write rank 0's metrics to a JSON file; or, with --weights, train a few steps
without per-batch BatchNorm statistics and save rank 0's weights."""
import argparse
import json

import lightning as L
import torch

from callbacks.evaluation import EmbeddingEvaluator
from datamodules.digits import DigitsDataModule
from lightning_modules.base import Optim
from lightning_modules.isif import ISIF


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--devices", type=int, required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--fit", action="store_true")
    parser.add_argument("--weights", action="store_true",
                        help="train 3 steps of global batch 64 with frozen BN statistics; save the state dict")
    args = parser.parse_args()
    L.seed_everything(0)
    if args.weights:
        return train_weights(args.devices, args.out)
    model = ISIF(backbone="small_cnn", in_chans=1, embedding_dim=32)
    data = DigitsDataModule(batch_size=64, eval_batch_size=50)  # 1,437 reference and 360 query images
    evaluator = EmbeddingEvaluator(kmeans_restarts=3)
    trainer = L.Trainer(accelerator="cpu", devices=args.devices, strategy="ddp" if args.devices > 1 else "auto",
                        max_epochs=1, limit_train_batches=2, num_sanity_val_steps=0, callbacks=[evaluator],
                        logger=False, enable_progress_bar=False, enable_checkpointing=False)
    trainer.validate(model, data)
    result = {"validate": dict(evaluator.latest)}
    if args.fit:
        trainer.fit(model, data)
        result["fit"] = dict(evaluator.latest)
    if trainer.is_global_zero:
        with open(args.out, "w") as f:
            json.dump(result, f)


def train_weights(devices: int, out: str) -> None:
    """The global batch is 64 on any number of processes (the datamodule shards it) and augmentations are
    seeded per image, so with batch statistics out of the way N processes must take 1 process's steps."""
    model = ISIF(backbone="small_cnn", in_chans=1, embedding_dim=32, frozen_bn=True,
                 optim=Optim(lr=0.5))  # steps large enough to tell apart from rounding
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = L.Trainer(accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto",
                        max_epochs=1, limit_train_batches=3, limit_val_batches=0, num_sanity_val_steps=0,
                        logger=False, enable_progress_bar=False, enable_checkpointing=False)
    trainer.fit(model, DigitsDataModule(batch_size=64, num_workers=0))
    if trainer.is_global_zero:
        torch.save({"initial": initial, "trained": model.state_dict()}, out)


if __name__ == "__main__":
    main()
