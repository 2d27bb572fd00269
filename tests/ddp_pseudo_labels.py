"""Run by tests/test_pseudo_labels_ddp.py in a fresh process: a TAC-CCL fit on digits with N CPU processes
(gloo) and a pseudo-label refresh before each of 2 epochs; every rank saves what it holds to
<out>/rank<r>.pt."""
import argparse
from pathlib import Path

import lightning as L
import torch

from callbacks.pseudo_labels import KMeansPseudoLabels
from datamodules.digits import DigitsDataModule
from lightning_modules.tac_ccl import TACCCL


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--devices", type=int, required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    L.seed_everything(0)
    model = TACCCL(backbone="small_cnn", in_chans=1, embedding_dim=16)
    data = DigitsDataModule(protocol="unseen", batch_size=80, eval_batch_size=100, sampler="pk",
                            samples_per_class=5)
    callback = KMeansPseudoLabels(num_clusters=8, every_n_epochs=1)
    strategy = "ddp" if args.devices > 1 else "auto"
    trainer = L.Trainer(accelerator="cpu", devices=args.devices, strategy=strategy,
                        max_epochs=2, limit_train_batches=1, limit_val_batches=0, num_sanity_val_steps=0,
                        callbacks=[callback], logger=False, enable_progress_bar=False,
                        enable_checkpointing=False, enable_model_summary=False)
    trainer.fit(model, data)
    held = {"callback": callback.labels, "centers": callback.centers, "module": model.pseudo_labels.cpu(),
            "datamodule": torch.as_tensor(data.pseudo_labels), "epoch": callback.epoch,
            "memory_embedding": model.memory_embedding.cpu(), "memory_index": model.memory_index.cpu()}
    torch.save(held, Path(args.out) / f"rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    main()
