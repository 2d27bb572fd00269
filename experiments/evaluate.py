"""Evaluate a checkpoint, or export what it computes, with the configuration its run was trained with.

    python -m experiments.evaluate eval runs/<run>/checkpoints/last.ckpt                  # make eval CKPT=...
    python -m experiments.evaluate eval runs/<run>/checkpoints/last.ckpt --dataset cars   # on another dataset
    python -m experiments.evaluate export runs/<run>/checkpoints/last.ckpt                # make export CKPT=...

Both are `experiments.train validate` with the run's own `config.yaml` (beside `checkpoints/`), then the
dataset's config when `--dataset` is given, then any flags after `--`. The checkpoint loads as every checkpoint
of the suite does (`train.read_checkpoint`: torch.load(weights_only=True)). Results go to `--out` (default
`<run>/eval-<dataset>` or `<run>/export-<dataset>`):

- eval: `eval_metrics.json` (the metrics of every evaluator, the checkpoint, the data settings), printed once.
- export: `backbone.pt` (the trunk's state dict, for a downstream model), `head.pt` (the embedding head), and
  per eval split of the protocol (query, and reference or gallery) `<split>_embeddings.npy` (N x D float32,
  in dataset-index order), `<split>_labels.npy` and `<split>_index.npy`; the metrics as for eval.
"""
from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import torch

from callbacks.evaluation import gather_unique

CONFIGS = Path(__file__).with_name("configs")


class ExportEmbeddings(L.Callback):
    """Writes the embeddings of every eval split of a validation, and the network's weights, to
    `<run dir>/` (rank 0; embeddings gathered from all ranks with the sampler's padding removed)."""

    def __init__(self) -> None:
        self._parts: dict[int, list[dict]] = {}
        self.written: list[Path] = []

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self._parts = {}

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._parts.setdefault(dataloader_idx, []).append(
            {k: outputs[k].detach() for k in ("embedding", "target", "index")})

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        folder = Path(trainer.default_root_dir)
        for i, role in enumerate(trainer.datamodule.eval_roles):
            parts = self._parts.get(i, [])
            emb, target, index = gather_unique(pl_module, *(torch.cat([p[k] for p in parts])
                                                            for k in ("embedding", "target", "index")))
            if trainer.is_global_zero:
                for name, value in (("embeddings", emb.float()), ("labels", target), ("index", index)):
                    path = folder / f"{role}_{name}.npy"
                    np.save(path, value.cpu().numpy())
                    self.written.append(path)
        if trainer.is_global_zero:
            for name in ("trunk", "head"):
                module = getattr(pl_module, name, None)
                if module is not None:
                    path = folder / ("backbone.pt" if name == "trunk" else f"{name}.pt")
                    torch.save(module.state_dict(), path)
                    self.written.append(path)
            print(f"exported to {folder}: " + ", ".join(p.name for p in self.written))


def run_config(ckpt: str | Path) -> Path:
    """The config.yaml of the run a checkpoint belongs to (<run>/checkpoints/<name>.ckpt -> <run>/config.yaml)."""
    config = Path(ckpt).resolve().parent.parent / "config.yaml"
    if not Path(ckpt).is_file():
        raise SystemExit(f"error: checkpoint {ckpt}: no such file (a run's is <run dir>/checkpoints/last.ckpt)")
    if not config.is_file():
        raise SystemExit(f"error: no config.yaml beside {ckpt} (expected {config}): pass a checkpoint inside the "
                         "run directory that trained it")
    return config


def validate_args(command: str, ckpt: str | Path, dataset: str | None = None, out: str | Path | None = None,
                  extra: list[str] | tuple[str, ...] = ()) -> list[str]:
    """The `experiments.train validate` command line of `make eval` / `make export`."""
    config = run_config(ckpt)
    args = ["validate", "--config", str(config)]
    if dataset:
        dataset_config = CONFIGS / "datasets" / f"{dataset}.yaml"
        if not dataset_config.is_file():
            known = sorted(p.stem for p in (CONFIGS / "datasets").glob("*.yaml"))
            raise SystemExit(f"error: no dataset config {dataset_config}; datasets: {', '.join(known)}")
        args += ["--config", str(dataset_config)]
    out = out or config.parent / f"{command}-{dataset or 'own'}"
    args += ["--ckpt_path", str(ckpt), "--run.dir", str(out), "--run.logger", "csv", "--run.overwrite=true"]
    if command == "export":
        args.append("--trainer.callbacks+=experiments.evaluate.ExportEmbeddings")
    return [*args, *extra]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=("eval", "export"))
    parser.add_argument("ckpt", help="a checkpoint inside its run directory: <run>/checkpoints/last.ckpt")
    parser.add_argument("--dataset", help="evaluate on this dataset's config (experiments/configs/datasets/)")
    parser.add_argument("--out", help="the results folder (default <run>/<command>-<dataset>)")
    argv = list(sys.argv[1:] if argv is None else argv)
    cut = argv.index("--") if "--" in argv else len(argv)  # after --: flags for experiments.train validate
    args = parser.parse_args(argv[:cut])
    from experiments.train import main as train_main
    command = validate_args(args.command, args.ckpt, args.dataset, args.out, argv[cut + 1:])
    # the checkpoint callback's state belongs to the training run's folder, not to this evaluation's
    warnings.filterwarnings("ignore", message="The dirpath has changed from")
    sys.argv = sys.argv[:1]  # the command line is `command` now (LightningCLI warns about both)
    train_main(command)


if __name__ == "__main__":
    main()
