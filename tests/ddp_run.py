"""Run by tests/test_ddp.py in a fresh process: evaluate (and optionally train) ISIF on digits with N
CPU processes (gloo) and write rank 0's metrics to a JSON file."""
import argparse
import json

import lightning as L

from callbacks.evaluation import EmbeddingEvaluator
from datamodules.digits import DigitsDataModule
from lightning_modules.isif import ISIF


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--devices", type=int, required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--fit", action="store_true")
    args = parser.parse_args()
    L.seed_everything(0)
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


if __name__ == "__main__":
    main()
