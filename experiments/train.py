"""LightningCLI entry point: `python -m experiments.train fit --config ...` (what `make train` runs).

Adds to Lightning's CLI: the evaluator as the `evaluation:` config group, a `run:` group (run directory,
logger), a last.ckpt every epoch, the resolved config and `final_metrics.json` in the run directory,
and the initial-vs-final metrics table printed at the end.
"""
from __future__ import annotations

import json
import netrc
import os
import time
from pathlib import Path
from urllib.parse import urlparse

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only

from callbacks.evaluation import ClassificationEvaluator, EmbeddingEvaluator
from datamodules.base import EmbeddingDataModule
from lightning_modules.base import EmbeddingModule

RUN_DIR_ENV = "SUITE_RUN_DIR"  # shared with the processes a DDP launch starts, so all ranks agree


def wandb_logged_in() -> bool:
    """True when W&B has credentials (WANDB_API_KEY or a netrc entry for its host)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def default_run_dir(model: str, data: str) -> str:
    return f"runs/{model.lower()}-{data.lower().removesuffix('datamodule')}-{time.strftime('%Y%m%d-%H%M%S')}"


def build_logger(kind: str, run_dir: str, project: str, name: str):
    if kind == "wandb":
        # Offline unless the user is logged in (or set WANDB_MODE): `wandb sync <run_dir>/wandb/...` uploads.
        offline = os.environ.get("WANDB_MODE", "online" if wandb_logged_in() else "offline") == "offline"
        return WandbLogger(project=project, name=name, save_dir=run_dir, offline=offline)
    if kind == "csv":
        return CSVLogger(save_dir=run_dir, name="csv", version="")
    if kind == "none":
        return False
    raise ValueError(f"run.logger {kind!r}: use wandb, csv or none")


def last_checkpoint(dirpath: str) -> ModelCheckpoint:
    """`last.ckpt`, overwritten at the end of every epoch (no monitor: never selected on the test split)."""
    return ModelCheckpoint(dirpath=dirpath, filename="last", save_top_k=1, every_n_epochs=1,
                           enable_version_counter=False)


def metrics_table(initial: dict, final: dict, best: dict) -> str:
    names = sorted(set(initial) | set(final))
    width = max(len(n) for n in names) if names else 10
    lines = [f"{'metric':<{width}}  {'initial':>9}  {'final':>9}  {'best':>9}"]
    for n in names:
        cells = [f"{d[n]:9.2f}" if n in d else f"{'-':>9}" for d in (initial, final, best)]
        lines.append(f"{n:<{width}}  " + "  ".join(cells))
    return "\n".join(lines)


class SuiteCLI(LightningCLI):
    def __init__(self, **kwargs):
        super().__init__(EmbeddingModule, EmbeddingDataModule, subclass_mode_model=True, subclass_mode_data=True,
                         save_config_callback=None, auto_configure_optimizers=False, **kwargs)

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(EmbeddingEvaluator, "evaluation")
        parser.add_argument("--run.dir", type=str | None, default=None,
                            help="run directory (default runs/<method>-<dataset>-<time>)")
        parser.add_argument("--run.logger", type=str, default="wandb", help="wandb | csv | none")
        parser.add_argument("--run.project", type=str, default="embedding-suite", help="W&B project")
        parser.add_argument("--run.name", type=str | None, default=None, help="W&B run name")
        parser.add_argument("--run.method", type=str, default="", help="METHOD name, for comparison tables")
        parser.add_argument("--run.dataset", type=str, default="", help="DATASET name, for comparison tables")
        parser.add_argument("--run.variant", type=str, default="", help="protocol variant, e.g. resnet18")

    @property
    def run_dir(self) -> str:
        cfg = self.config[self.subcommand] if self.subcommand else self.config
        if cfg.run.dir:
            os.environ[RUN_DIR_ENV] = cfg.run.dir
        elif RUN_DIR_ENV not in os.environ:
            os.environ[RUN_DIR_ENV] = default_run_dir(cfg.model.class_path.rsplit(".", 1)[-1],
                                                      cfg.data.class_path.rsplit(".", 1)[-1])
        return os.environ[RUN_DIR_ENV]

    def instantiate_trainer(self, **kwargs):
        cfg = self.config[self.subcommand] if self.subcommand else self.config
        run_dir = self.run_dir
        name = cfg.run.name or Path(run_dir).name
        callbacks = list(self._get(self.config_init, "trainer").get("callbacks") or [])
        callbacks.append(last_checkpoint(f"{run_dir}/checkpoints"))
        return super().instantiate_trainer(default_root_dir=run_dir, callbacks=callbacks,
                                           logger=build_logger(cfg.run.logger, run_dir, cfg.run.project, name),
                                           **kwargs)

    @rank_zero_only
    def before_fit(self) -> None:
        Path(self.run_dir).mkdir(parents=True, exist_ok=True)
        config = self._parser(self.subcommand).dump(self.config[self.subcommand], skip_none=False)
        Path(self.run_dir, "config.yaml").write_text(config)

    def after_fit(self) -> None:
        # every evaluator's initial / latest / best, merged (semi runs add ClassificationEvaluator's val/error)
        kinds = (EmbeddingEvaluator, ClassificationEvaluator)
        evaluators = [c for c in self.trainer.callbacks if isinstance(c, kinds)]
        initial, final, best = ({k: v for e in evaluators for k, v in getattr(e, part).items()}
                                for part in ("initial", "latest", "best"))
        if self.trainer.is_global_zero:
            run = self.config[self.subcommand].run
            summary = {"run": {"method": run.method, "dataset": run.dataset, "variant": run.variant},
                       "initial": initial, "final": final, "best": best}
            Path(self.run_dir, "final_metrics.json").write_text(json.dumps(summary, indent=2))
            print(f"\nrun directory: {self.run_dir}\n"
                  f"{metrics_table(initial, final, best)}\n"
                  "(final = last epoch, the number to report; best = best over epochs, for comparison only)")
            for logger in self.trainer.loggers:
                if isinstance(logger, WandbLogger):
                    logger.experiment.summary.update(
                        {**{f"initial/{k[4:]}": v for k, v in initial.items()}, **final})
                    logger.experiment.finish()


def main(args=None) -> None:
    SuiteCLI(args=args)


if __name__ == "__main__":
    main()
