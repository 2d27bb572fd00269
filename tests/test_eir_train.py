"""The CLI end to end with EIR on digits from a random init: what `make train METHOD=eir` runs, at the
shortened budget of experiments/seeds.py (6 epochs). It must end above its own random-init network on NMI,
log every loss term, and checkpoint its memory bank (later rounds and resumes continue it)."""
import json
import math
from pathlib import Path

import torch

from experiments.seeds import TEST_BUDGET, run_once
from experiments.train import RUN_DIR_ENV, main

CONFIGS = "experiments/configs"
# Seeds 0-4 (seed_everything and model.seed together), OMP_NUM_THREADS=1, this budget: NMI gains +16.1 /
# +24.7 / +18.8 / +14.9 / +8.5 over the random init; the margin sits well under the worst seed. kNN top-1 is
# not asserted: at 6 epochs the bank, written once per epoch from random unit rows, still holds kNN below the
# random-init network's (59-69 against 70-73); the shipped 30 epochs pass it. NMI has the headroom. The network
# after one training step (`--budget one_step`) is below the random init on every seed (NMI 23.3-29.5 against
# 34.4-44.6), so the random init stays the binding floor of max(random init, one step).
NMI_GAIN = 5.0


def test_eir_digits_config_learns_from_a_random_init(tmp_path, monkeypatch):
    monkeypatch.delenv(RUN_DIR_ENV, raising=False)
    run_dir = tmp_path / "run"
    main(["fit", "--config", f"{CONFIGS}/base.yaml", "--config", f"{CONFIGS}/datasets/digits.yaml",
          "--config", f"{CONFIGS}/eir/digits.yaml", "--run.dir", str(run_dir), "--run.logger=csv",
          "--trainer.enable_progress_bar=false", *TEST_BUDGET["eir"]])
    metrics = json.loads(Path(run_dir, "final_metrics.json").read_text())
    initial, final = metrics["initial"], metrics["final"]
    assert {"val/knn_top1", "val/knn_top1@5", "val/knn_top1@20", "val/recall@1", "val/nmi"} <= set(final)
    assert all(math.isfinite(v) for v in final.values())
    first_step = run_once("eir", 0, "one_step", tmp_path, [])["final"]
    assert final["val/nmi"] > max(initial["val/nmi"], first_step["val/nmi"]) + NMI_GAIN
    logged = (run_dir / "csv" / "metrics.csv").read_text().splitlines()[0]
    for term in ("train/loss", "train/iraug", "train/intra", "train/inter", "train/mix_ratio",
                 "train/embedding_std"):
        assert term in logged, term
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    assert state["bank.rows"].shape == (1437, 64)
    torch.testing.assert_close(state["bank.rows"].norm(dim=1), torch.ones(1437))
