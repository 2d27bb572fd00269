"""Every shipped config parses against the classes it names (keys, types, callbacks) without a dataset on
disk, and the ablation rows the configs' headers advertise parse from the command line."""
from pathlib import Path

import pytest

from experiments.train import RUN_DIR_ENV, SuiteCLI

CONFIGS = Path("experiments/configs")
METHODS = {"isif": "lightning_modules.isif.ISIF", "umm": "lightning_modules.umm.UMM",
           "tac_ccl": "lightning_modules.tac_ccl.TACCCL", "snowball": "lightning_modules.snowball.Snowball"}


def files(config: Path) -> list[str]:
    dataset = config.stem.split("-")[0]
    return ["--config", str(CONFIGS / "base.yaml"), "--config", str(CONFIGS / "datasets" / f"{dataset}.yaml"),
            "--config", str(config)]


@pytest.fixture(scope="module")
def parser(tmp_path_factory):
    """One CLI parser (built from the digits ISIF config) checks every file."""
    import os

    os.environ.pop(RUN_DIR_ENV, None)
    cli = SuiteCLI(args=[*files(CONFIGS / "isif" / "digits.yaml"), "--run.dir", str(tmp_path_factory.mktemp("r")),
                         "--run.logger", "none"], run=False)
    return cli.parser


def callbacks(cfg) -> list[str]:
    return [c.class_path for c in cfg.trainer.callbacks or []]


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_config_of_a_method_parses_to_its_module(parser, method):
    configs = sorted((CONFIGS / method).glob("*.yaml"))
    assert len(configs) >= 5
    for config in configs:
        cfg = parser.parse_args(files(config))
        expected = METHODS[method]
        if config.stem == "digits-supervised":  # the Snowball baseline: the semi base, labels only
            expected = "lightning_modules.semi.SemiSupervised"
        assert cfg.model.class_path == expected, config
        if method == "umm":
            assert "callbacks.k_schedule.KSchedule" in callbacks(cfg), config
        if method == "tac_ccl":
            assert "callbacks.pseudo_labels.KMeansPseudoLabels" in callbacks(cfg), config
            assert cfg.data.init_args.protocol == "unseen" and cfg.data.init_args.sampler == "pk", config
        if method == "snowball":
            assert callbacks(cfg)[0] == "callbacks.evaluation.ClassificationEvaluator", config
            if config.stem != "digits-supervised":
                assert callbacks(cfg)[1] == "callbacks.sample_discovery.ConfidentSampleDiscovery", config
                c = cfg.model.init_args.curriculum
                assert cfg.trainer.max_epochs == c.phase0_epochs + c.generations * c.iterations * c.iteration_epochs


@pytest.mark.parametrize(("flags", "expected"), [
    (["--model.ccl_weight=0", "--model.tac_weight=0", "--model.feature_weight=0"],  # Table 4.4 Baseline
     {"ccl_weight": 0.0, "tac_weight": 0.0, "feature_weight": 0.0}),
    (["--model.tac_weight=0", "--model.feature_weight=0"], {"ccl_weight": 1.0, "tac_weight": 0.0}),  # +CCL
    (["--model.cross.probability=0"], {"tac_weight": 1.0}),  # self-TAC only
    (["--model.cross.mode=literal"], {}),                     # Eq. 4.6 as printed
    (["--model.memory_weight=0"], {"memory_weight": 0.0}),
])
def test_tac_ccl_ablation_rows_parse_from_the_command_line(parser, flags, expected):
    args = parser.parse_args([*files(CONFIGS / "tac_ccl" / "cub.yaml"), *flags]).model.init_args
    for key, value in expected.items():
        assert args[key] == value, key
    if "--model.cross.probability=0" in flags:
        assert args.cross["probability"] == 0
    if "--model.cross.mode=literal" in flags:
        assert args.cross["mode"] == "literal"


def test_a_misspelt_key_is_rejected(parser):
    with pytest.raises(SystemExit):
        parser.parse_args([*files(CONFIGS / "snowball" / "digits.yaml"), "--model.init_args.curriculum.generation=2"])


def sweep_trial(sweep: dict, end: int) -> tuple[list[str], dict]:
    """The command line W&B's agent builds for one trial: every parameter at its first value or min
    (end 0) or its last value or max (end -1)."""
    values = {name: spec["values"][end] if "values" in spec else spec["min" if end == 0 else "max"]
              for name, spec in sweep["parameters"].items()}
    command = sweep["command"]
    start = command.index("fit") + 1
    args = [a for a in command[start:] if a != "${args}"] + [f"--{k}={v}" for k, v in values.items()]
    return args, values


@pytest.mark.parametrize("path", sorted(Path("experiments/sweeps").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_sweep_trial_parses_and_sets_its_values(parser, path):
    import yaml

    sweep = yaml.safe_load(path.read_text())
    assert sweep["metric"]["name"].startswith("val/")
    for end in (0, -1):  # two trials: no value can pass by being the config's default in both
        check_trial(parser, *sweep_trial(sweep, end))


def check_trial(parser, args: list[str], values: dict) -> None:
    cfg = parser.parse_args(args)
    for name, value in values.items():
        node = cfg
        for part in name.split("."):
            if part == "callbacks":
                node = node[part][-1]  # jsonargparse's `trainer.callbacks.init_args.x` edits the last callback
            elif part != "init_args" and "init_args" in node and part not in node:
                node = node["init_args"][part]
            else:
                node = node[part]
        assert node == pytest.approx(value), name
