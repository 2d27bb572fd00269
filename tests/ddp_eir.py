"""Run by tests/test_eir_ddp.py in a fresh process: EIR trains 2 steps on digits on 2 CPU processes (gloo);
each rank saves, per step, its own batch (indices, view-1 features) and the bank before and after the write."""
import argparse

import lightning as L
import torch

from datamodules.digits import DigitsDataModule
from lightning_modules.eir import EIR
from lightning_modules.relations import Relations


class RecordingEIR(EIR):
    """EIR that keeps what each step wrote: the test rebuilds the expected bank from both ranks' batches."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.records = []

    def write_bank(self, index, feats):
        before = self.bank.rows.clone()
        super().write_bank(index, feats)
        self.records.append({"index": index.clone(), "feats": feats.clone(), "before": before,
                             "after": self.bank.rows.clone()})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    L.seed_everything(0)
    torch.set_num_threads(1)
    model = RecordingEIR(backbone="small_cnn", in_chans=1, embedding_dim=16,
                         relations=Relations(intra_weight=15.0, inter_weight=2.0))
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=1, limit_train_batches=2,
                        limit_val_batches=0, num_sanity_val_steps=0, logger=False, enable_progress_bar=False,
                        enable_checkpointing=False)
    trainer.fit(model, DigitsDataModule(batch_size=32, num_workers=0))
    torch.save(model.records, f"{args.out}/rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    main()
