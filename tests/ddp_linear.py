"""Run by tests/test_linear.py in a fresh process: the linear probe and SVM of a random-init ISIF on digits,
validated on N CPU processes (gloo); rank 0 writes the metrics to a JSON file."""
import argparse
import json

import lightning as L

from callbacks.linear import LinearProbe, LinearSVM
from datamodules.digits import DigitsDataModule
from lightning_modules.isif import ISIF


def linear_metrics(devices: int) -> tuple[dict, bool]:
    L.seed_everything(0)
    probe = LinearProbe(epochs=20, lr=1.0, milestones=[15], batch_size=64)
    svm = LinearSVM()
    trainer = L.Trainer(accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto",
                        callbacks=[probe, svm], logger=False, enable_progress_bar=False, enable_checkpointing=False)
    # 1,437 reference and 360 query images in batches of 50: the sampler pads the last batch on 2 processes
    trainer.validate(ISIF(backbone="small_cnn", in_chans=1, embedding_dim=32),
                     DigitsDataModule(batch_size=64, eval_batch_size=50, num_workers=0))
    return {**probe.latest, **svm.latest}, trainer.is_global_zero


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--devices", type=int, required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    metrics, rank_zero = linear_metrics(args.devices)
    if rank_zero:
        with open(args.out, "w") as f:
            json.dump(metrics, f)


if __name__ == "__main__":
    main()
