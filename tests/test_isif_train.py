"""`make train METHOD=isif DATASET=digits` at the learning tests' budget must end above both floors a plain
network reaches without learning: its random init and the same run stopped after one training step."""
import json
from pathlib import Path

from experiments.seeds import TEST_BUDGET, run_once
from experiments.train import RUN_DIR_ENV, main

CONFIGS = "experiments/configs"
# One training step lifts ISIF well above its random init (`python -m experiments.seeds --methods isif --budget
# one_step`, seeds 0-4: kNN top-1 78.1-81.9 against 69.7-73.1, NMI 55.7-63.2 against 34.4-44.6). The test
# budget's gains over max(random init, one step) (`--budget test`), seeds 0-4: kNN top-1 +12.8 / +16.9 / +13.1 /
# +9.8 / +15.0, NMI +7.8 / +19.1 / +9.8 / +5.2 / +10.6
MARGINS = {"val/knn_top1": 5.0, "val/nmi": 3.0}


def test_isif_on_digits_beats_its_random_init_and_its_first_step(tmp_path, monkeypatch):
    monkeypatch.delenv(RUN_DIR_ENV, raising=False)
    run = tmp_path / "run"
    main(["fit", "--config", f"{CONFIGS}/base.yaml", "--config", f"{CONFIGS}/datasets/digits.yaml",
          "--config", f"{CONFIGS}/isif/digits.yaml", "--run.dir", str(run), "--run.logger=csv",
          "--trainer.enable_progress_bar=false", *TEST_BUDGET["isif"]])
    metrics = json.loads(Path(run, "final_metrics.json").read_text())
    first_step = run_once("isif", 0, "one_step", tmp_path, [])["final"]
    for name, margin in MARGINS.items():
        floor = max(metrics["initial"][name], first_step[name])
        assert metrics["final"][name] > floor + margin, (name, metrics["final"][name], floor)
