"""LMCS on digits with N CPU processes (gloo): phase 0, then two generations of critical discovery with the
master training from the second epoch, then a validation; rank 0 writes the discoveries, the look-ahead set
and the errors to a JSON file. tests/test_lmcs_ddp.py calls `run` for 1 process and launches
`python -m tests.ddp_lmcs --devices 2` for 2. The learning rate is 0 and BatchNorm frozen, so 1 and 2
processes discover from, and score, the same seeded networks (and so does a fit resumed from a checkpoint:
tests/test_lmcs_ddp.py)."""
import argparse
import json

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from callbacks.evaluation import ClassificationEvaluator
from callbacks.sample_discovery import CriticalSampleDiscovery
from datamodules.digits import DigitsDataModule
from lightning_modules.base import Optim
from lightning_modules.lmcs import LMCS
from lightning_modules.snowball import Curriculum


def fit(devices: int, root: str, strategy: str = "ddp_find_unused_parameters_true", max_epochs: int = 3,
        ckpt_path: str | None = None) -> tuple:
    """(model, data, discovery, evaluator) after the fit; checkpoints (last.ckpt) under root/ckpt."""
    torch.set_num_threads(1)  # DDP gives each of the 2 processes one; the 1-process run alike
    L.seed_everything(0)
    model = LMCS(backbone="small_cnn", in_chans=1, frozen_bn=True, optim=Optim(name="adam", lr=0.0),
                 step_epochs=1, curriculum=Curriculum(phase0_epochs=1, iteration_epochs=1, generations=2,
                                                      iterations=1))
    data = DigitsDataModule(protocol="semi", labels_per_class=3, test_fraction=0.8, batch_size=16,
                            labeled_batch_size=16, steps_per_epoch=2, num_views=2, eval_batch_size=50)
    discovery, evaluator = CriticalSampleDiscovery(), ClassificationEvaluator()
    checkpoint = ModelCheckpoint(dirpath=f"{root}/ckpt", save_last=True)
    trainer = L.Trainer(accelerator="cpu", devices=devices, strategy=strategy if devices > 1 else "auto",
                        max_epochs=max_epochs, check_val_every_n_epoch=1, num_sanity_val_steps=0,
                        callbacks=[discovery, evaluator, checkpoint], logger=False, enable_progress_bar=False,
                        default_root_dir=root)
    trainer.fit(model, data, ckpt_path=ckpt_path)
    return model, data, discovery, evaluator, trainer


def run(devices: int, out: str, strategy: str = "ddp_find_unused_parameters_true") -> None:
    model, data, discovery, evaluator, trainer = fit(devices, out + ".run", strategy)
    if trainer.is_global_zero:
        with open(out, "w") as f:
            json.dump({"history": [{k: h[k] for k in ("count", "labeled", "index", "label")}
                                   for h in discovery.history],
                       "labeled": data.labeled_indices.tolist(), "lookahead": data.lookahead_indices.tolist(),
                       "master_started": bool(model.master_started), "errors": evaluator.latest}, f)

if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--devices", type=int, required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--strategy", default="ddp_find_unused_parameters_true")
    args = parser.parse_args()
    run(args.devices, args.out, args.strategy)
