"""`make train METHOD=snowball DATASET=digits`, shortened: the CLI runs Snowball on 5 labels per class,
lowers the test error, and writes val/error of every model and the discoveries."""
import json
from pathlib import Path

import pytest

from experiments.train import RUN_DIR_ENV, main

CONFIGS = "experiments/configs"


pytestmark = pytest.mark.usefixtures("one_thread")


def test_snowball_digits_cli_lowers_the_error(tmp_path, monkeypatch):
    monkeypatch.delenv(RUN_DIR_ENV, raising=False)
    run = tmp_path / "run"
    main(["fit", "--config", f"{CONFIGS}/base.yaml", "--config", f"{CONFIGS}/datasets/digits.yaml",
          "--config", f"{CONFIGS}/snowball/digits.yaml", "--run.dir", str(run), "--run.logger=csv",
          "--trainer.enable_progress_bar=false", "--trainer.max_epochs=2",
          "--model.init_args.curriculum.phase0_epochs=1", "--model.init_args.curriculum.iteration_epochs=1",
          "--model.init_args.curriculum.generations=1", "--model.init_args.curriculum.iterations=1"])
    metrics = json.loads((run / "final_metrics.json").read_text())
    initial, final = metrics["initial"], metrics["final"]
    assert set(final) == {"val/error", "val/error_student", "val/error_teacher", "val/error_master"}
    assert final["val/error"] == final["val/error_teacher"]
    assert final["val/error"] < initial["val/error"] / 2
    (discovery,) = json.loads(Path(run, "discovery.json").read_text())
    assert (discovery["generation"], discovery["iteration"], discovery["count"]) == (1, 1, 50)
