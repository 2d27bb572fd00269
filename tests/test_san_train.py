"""The CLI end to end with SAN on digits from a random init (`make train METHOD=san [VARIANT=unsupervised]`,
seen split), at the shortened budget of `experiments.seeds.TEST_BUDGET`: each run must end above its own
random-init network, and log every SAN term."""
import json
import math
from pathlib import Path

import pytest

from experiments.seeds import TEST_BUDGET
from experiments.train import RUN_DIR_ENV, main

CONFIGS = "experiments/configs"
# `python -m experiments.seeds --methods san san_unsupervised --budget test`, seeds 0-4, OMP_NUM_THREADS=1:
# supervised (1 epoch): kNN top-1 +13.8 / +12.8 / +13.9 / +16.1 / +11.4, NMI +31.5 / +29.2 / +28.5 / +23.5 / +28.3;
# unsupervised (2 epochs): NMI +25.5 / +19.7 / +14.1 / +13.1 / +20.2. The unsupervised kNN top-1 is not
# asserted: after 2 epochs it moves -5.6 .. +6.9 (k-means labels of a random init start far from the classes).
MARGINS = {"san": {"val/knn_top1": 5.0, "val/nmi": 10.0}, "san_unsupervised": {"val/nmi": 8.0}}
VARIANTS = {"san": "digits", "san_unsupervised": "digits-unsupervised"}
SAN_TERMS = ("train/san_entropy", "train/san_correlation", "train/san_coherence", "train/san_loss",
             "train/san_diagonal", "train/san_moved", "train/san_beta", "train/ms", "train/memory",
             "train/embedding_std")


@pytest.mark.parametrize("method", sorted(VARIANTS))
def test_san_digits_config_learns_from_a_random_init(tmp_path, monkeypatch, method):
    monkeypatch.delenv(RUN_DIR_ENV, raising=False)
    run_dir = tmp_path / "run"
    main(["fit", "--config", f"{CONFIGS}/base.yaml", "--config", f"{CONFIGS}/datasets/digits.yaml",
          "--config", f"{CONFIGS}/san/{VARIANTS[method]}.yaml", "--run.dir", str(run_dir), "--run.logger=csv",
          "--trainer.enable_progress_bar=false", *TEST_BUDGET[method]])
    metrics = json.loads(Path(run_dir, "final_metrics.json").read_text())
    initial, final = metrics["initial"], metrics["final"]
    assert all(math.isfinite(v) for v in final.values())
    for metric, margin in MARGINS[method].items():
        assert final[metric] > initial[metric] + margin, metric
    logged = (run_dir / "csv" / "metrics.csv").read_text().splitlines()[0]
    for term in SAN_TERMS:
        assert term in logged, term
    if method == "san_unsupervised":
        assert "pseudo_labels/nmi" in logged
