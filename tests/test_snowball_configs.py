"""Every Snowball config parses against the classes it names (keys, types, callbacks), without a dataset:
one CLI parser (built from the digits baseline) checks them all."""
from pathlib import Path

import pytest

from experiments.train import RUN_DIR_ENV, SuiteCLI

CONFIGS = Path("experiments/configs")


def files(config: Path) -> list[str]:
    dataset = config.stem.split("-")[0]
    return ["--config", str(CONFIGS / "base.yaml"), "--config", str(CONFIGS / "datasets" / f"{dataset}.yaml"),
            "--config", str(config)]


def test_every_snowball_config_parses(tmp_path, monkeypatch):
    monkeypatch.delenv(RUN_DIR_ENV, raising=False)
    cli = SuiteCLI(args=[*files(CONFIGS / "snowball" / "digits-supervised.yaml"), "--run.dir", str(tmp_path),
                         "--run.logger", "none"], run=False)
    configs = sorted((CONFIGS / "snowball").glob("*.yaml"))
    assert len(configs) >= 15
    for config in configs:
        cfg = cli.parser.parse_args(files(config))
        callbacks = [c.class_path for c in cfg.trainer.callbacks]
        assert callbacks[0] == "callbacks.evaluation.ClassificationEvaluator", config
        if config.stem != "digits-supervised":
            assert cfg.model.class_path == "lightning_modules.snowball.Snowball", config
            assert callbacks[1] == "callbacks.sample_discovery.ConfidentSampleDiscovery", config
            c = cfg.model.init_args.curriculum
            assert cfg.trainer.max_epochs == c.phase0_epochs + c.generations * c.iterations * c.iteration_epochs


def test_a_misspelt_curriculum_key_is_rejected(tmp_path, monkeypatch):
    monkeypatch.delenv(RUN_DIR_ENV, raising=False)
    with pytest.raises(SystemExit):
        SuiteCLI(args=[*files(CONFIGS / "snowball" / "digits.yaml"),
                       "--model.init_args.curriculum.generation=2"], run=False)
