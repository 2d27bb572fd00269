"""The CLI end to end with ROUL on digits from a random init (unseen split: train digits 0-4, test 5-9), at the
test budget `experiments.seeds.TEST_BUDGET["roul"]`: it must end above its own random-init network, and
report Recall@K both without and with the test-time refinement."""
import json
import math
from pathlib import Path

from experiments.seeds import TEST_BUDGET
from experiments.train import RUN_DIR_ENV, main

CONFIGS = "experiments/configs"
# `python -m experiments.seeds --methods roul --budget test` (the shipped 6 epochs, validated only at the start
# and the end, NMI from 10 k-means restarts), seeds 0-4: NMI +10.4 / +34.5 / +20.3 / +22.5 / +27.3 over the random
# init with OMP_NUM_THREADS=1, +9.3 / +33.6 / +16.1 / +21.5 / +18.0 with 2 threads. With one
# restart the measurement itself was noisy enough that a 2-thread CI run gained only +2.9. R@1 is not
# asserted: it starts at 92-96 on the unseen digits (worst gain +0.3).
NMI_GAIN = 4.0


def test_roul_digits_config_learns_and_reports_refined_recall(tmp_path, monkeypatch):
    monkeypatch.delenv(RUN_DIR_ENV, raising=False)
    run_dir = tmp_path / "run"
    main(["fit", "--config", f"{CONFIGS}/base.yaml", "--config", f"{CONFIGS}/datasets/digits.yaml",
          "--config", f"{CONFIGS}/roul/digits.yaml", "--run.dir", str(run_dir), "--run.logger=csv",
          "--trainer.enable_progress_bar=false", *TEST_BUDGET["roul"]])
    metrics = json.loads(Path(run_dir, "final_metrics.json").read_text())
    initial, final = metrics["initial"], metrics["final"]
    for k in (1, 2, 4, 8):
        assert {f"val/recall@{k}", f"val/recall@{k}_refined"} <= set(final) & set(initial)
    assert all(math.isfinite(v) for v in final.values())
    assert final["val/nmi"] > initial["val/nmi"] + NMI_GAIN
    config = (run_dir / "config.yaml").read_text()
    assert "lightning_modules.roul.ROUL" in config and "callbacks.pseudo_labels.KMeansPseudoLabels" in config
    logged = (run_dir / "csv" / "metrics.csv").read_text().splitlines()[0]
    for term in ("train/ms", "train/ms_memory", "train/mv", "train/roc", "train/moc", "train/order",
                 "train/order_accuracy", "train/core_literal_fraction", "train/core_fallback_clusters",
                 "train/embedding_std", "pseudo_labels/pair_precision"):
        assert term in logged, term
