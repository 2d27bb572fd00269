"""Run by tests/test_multinode.py as one "node" of a 2-node torchrun launch, or alone as the 1-process
reference: score ISIF on digits (EmbeddingEvaluator: gathered embeddings) and refresh k-means pseudo labels
(KMeansPseudoLabels: gathered features, rank 0 clusters, broadcast) and draw the first training batch
(the datamodule's shard of the global batch), then write what this rank holds to <out-dir>/rank<global
rank>.json."""
import argparse
import json
import os
from pathlib import Path

import lightning as L

from callbacks.evaluation import EmbeddingEvaluator
from callbacks.pseudo_labels import KMeansPseudoLabels
from datamodules.digits import DigitsDataModule
from lightning_modules.isif import ISIF


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--nodes", type=int, required=True, help="Trainer(num_nodes=...); 1 process per node")
    parser.add_argument("--out-dir", required=True)
    args = parser.parse_args()
    run(args.nodes, args.out_dir)


def run(nodes: int, out_dir: str) -> None:
    L.seed_everything(0)
    model = ISIF(backbone="small_cnn", in_chans=1, embedding_dim=32)
    data = DigitsDataModule(batch_size=64, eval_batch_size=50)  # 1,437 reference and 360 query images
    evaluator = EmbeddingEvaluator(kmeans_restarts=3)
    trainer = L.Trainer(accelerator="cpu", devices=1, num_nodes=nodes, strategy="ddp" if nodes > 1 else "auto",
                        callbacks=[evaluator], logger=False, enable_progress_bar=False, enable_checkpointing=False)
    trainer.validate(model, data)
    pseudo = KMeansPseudoLabels(num_clusters=10, restarts=1, iterations=20)
    pseudo.refresh(trainer, model, epoch=0)
    held = {"global_rank": trainer.global_rank, "node_rank": trainer.node_rank, "local_rank": trainer.local_rank,
            "world_size": trainer.world_size, "group_rank_env": os.environ.get("GROUP_RANK"),
            "metrics": evaluator.latest, "pseudo_labels": pseudo.labels.tolist(),
            "first_batch": next(iter(data.train_dataloader()))["index"].tolist()}
    Path(out_dir, f"rank{trainer.global_rank}.json").write_text(json.dumps(held))


if __name__ == "__main__":
    main()


class RankMetrics(L.Callback):
    """Added to a CLI run (`--trainer.callbacks+=tests.multinode_run.RankMetrics`): at the end of fit each rank
    writes the validation metrics it holds, its global rank and world size to <run dir>/rank<r>_metrics.json,
    so a test compares what the ranks computed (rank 0 alone writes final_metrics.json)."""

    def on_fit_end(self, trainer, pl_module) -> None:
        held = {"global_rank": trainer.global_rank, "node_rank": trainer.node_rank, "world_size": trainer.world_size,
                "metrics": {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")},
                "steps": trainer.global_step}
        Path(trainer.default_root_dir, f"rank{trainer.global_rank}_metrics.json").write_text(json.dumps(held))
