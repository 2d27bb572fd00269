"""The CLI end to end with SAN on digits from a random init (`make train METHOD=san [VARIANT=unsupervised]`,
seen split), at the shortened budget of `experiments.seeds.TEST_BUDGET`: each run must end above the same
network after one training step, log every SAN term and report the assembly's share of moved points."""
import json
import math
from pathlib import Path

import pytest

from experiments.seeds import ONE_STEP, TEST_BUDGET, steps_run
from experiments.train import RUN_DIR_ENV, main

CONFIGS = "experiments/configs"
# The floor is the network after one training step, not the random init (issue 22): `python -m experiments.seeds
# --methods san san_unsupervised --budget test` (final) and the same with `--extra --trainer.max_epochs=1
# --trainer.limit_train_batches=0.1 --trainer.check_val_every_n_epoch=1` (one step), seeds 0-4, OMP_NUM_THREADS=1:
# supervised (1 epoch): kNN top-1 +16.4 / +11.4 / +17.2 / +11.4 / +17.3, NMI +30.7 / +14.3 / +33.1 / +22.1 / +37.3
# over one step; unsupervised (2 epochs): NMI +30.6 / +10.7 / +15.1 / +14.3 / +19.9. The unsupervised kNN top-1
# is not asserted (-5.6 .. +11.7 over one step: k-means labels of a random init start far from the classes).
# Against the Baseline without SAN: not asserted; on digits the assembly stays at its identity start
# (val/san_moved 0 on every seed; docs/methods/san.md), so the two rows are the same network up to noise.
MARGINS = {"san": {"val/knn_top1": 5.0, "val/nmi": 8.0}, "san_unsupervised": {"val/nmi": 5.0}}
VARIANTS = {"san": "digits", "san_unsupervised": "digits-unsupervised"}
SAN_TERMS = ("train/san_entropy", "train/san_correlation", "train/san_coherence", "train/san_loss",
             "train/san_diagonal", "train/san_moved", "train/san_beta", "train/ms", "train/memory",
             "train/embedding_std")


def run(tmp_path, method: str, name: str, *extra: str) -> tuple[Path, dict]:
    run_dir = tmp_path / name
    main(["fit", "--config", f"{CONFIGS}/base.yaml", "--config", f"{CONFIGS}/datasets/digits.yaml",
          "--config", f"{CONFIGS}/san/{VARIANTS[method]}.yaml", "--run.dir", str(run_dir), "--run.logger=csv",
          "--trainer.enable_progress_bar=false", *TEST_BUDGET[method], *extra])
    return run_dir, json.loads(Path(run_dir, "final_metrics.json").read_text())


@pytest.mark.parametrize("method", sorted(VARIANTS))
def test_san_digits_config_learns_beyond_one_step(tmp_path, monkeypatch, method):
    monkeypatch.delenv(RUN_DIR_ENV, raising=False)
    run_dir, metrics = run(tmp_path, method, "run")
    one_step_dir, one_step = run(tmp_path, method, "one_step", *ONE_STEP)
    assert steps_run(one_step_dir) == 1
    final = metrics["final"]
    assert all(math.isfinite(v) for v in final.values())
    for metric, margin in MARGINS[method].items():
        assert final[metric] > one_step["final"][metric] + margin, metric
    assert 0.0 <= final["val/san_moved"] <= 1.0 and metrics["initial"]["val/san_moved"] == 0.0
    logged = (run_dir / "csv" / "metrics.csv").read_text().splitlines()[0]
    for term in SAN_TERMS:
        assert term in logged, term
    if method == "san_unsupervised":
        assert "pseudo_labels/nmi" in logged
