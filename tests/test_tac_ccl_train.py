"""The CLI end to end with TAC-CCL on digits: what `make train METHOD=tac_ccl` runs (6 epochs, ~20 s)."""
import json
import math
from pathlib import Path

from experiments.train import RUN_DIR_ENV, main

CONFIGS = "experiments/configs"


def test_tac_ccl_digits_config_trains_and_writes_final_metrics(tmp_path, monkeypatch):
    monkeypatch.delenv(RUN_DIR_ENV, raising=False)
    run_dir = tmp_path / "run"
    main(["fit", "--config", f"{CONFIGS}/base.yaml", "--config", f"{CONFIGS}/datasets/digits.yaml",
          "--config", f"{CONFIGS}/tac_ccl/digits.yaml", "--run.dir", str(run_dir), "--run.logger=csv",
          "--trainer.enable_progress_bar=false", "--evaluation.kmeans_restarts=1", "--data.num_workers=0"])
    metrics = json.loads(Path(run_dir, "final_metrics.json").read_text())
    assert set(metrics["final"]) == {f"val/recall@{k}" for k in (1, 2, 4, 8)} | {"val/nmi"}
    assert all(math.isfinite(v) for v in metrics["final"].values())
    assert metrics["final"] != metrics["initial"]
    assert metrics["final"]["val/recall@1"] > metrics["initial"]["val/recall@1"] + 1  # 96.0 -> 98.3: beats random init
    config = (run_dir / "config.yaml").read_text()
    assert "lightning_modules.tac_ccl.TACCCL" in config
    assert "callbacks.pseudo_labels.KMeansPseudoLabels" in config
    logged = (run_dir / "csv" / "metrics.csv").read_text().splitlines()[0]
    for term in ("train/ms", "train/ms_memory", "train/ccl", "train/tac_self", "train/tac_cross",
                 "train/feature", "train/attention_std", "pseudo_labels/nmi", "pseudo_labels/pair_precision"):
        assert term in logged, term
