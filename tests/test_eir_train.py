"""The CLI end to end with EIR on digits from a random init: what `make train METHOD=eir` runs, at the
shortened budget of experiments/seeds.py (6 epochs). It must end above its own random-init network on NMI,
log every loss term, and checkpoint its memory bank (later rounds and resumes continue it)."""
import torch

from experiments.seeds import ONE_STEP
from tests.learning import assert_finite, assert_gains, assert_logged, best_of, digits_run

# Seeds 0-4 (seed_everything and model.seed together), OMP_NUM_THREADS=1, this budget: NMI gains +16.1 /
# +24.7 / +18.8 / +14.9 / +8.5 over the random init; the margin sits well under the worst seed. kNN top-1 is
# not asserted: at 6 epochs the bank, written once per epoch from random unit rows, still holds kNN below the
# random-init network's (59-69 against 70-73); the shipped 30 epochs pass it. NMI has the headroom. The network
# after one training step (`--budget one_step`) is below the random init on every seed (NMI 23.3-29.5 against
# 34.4-44.6), so the random init stays the binding floor of max(random init, one step).
NMI_GAIN = 5.0


def test_eir_digits_config_learns_from_a_random_init(tmp_path):
    metrics = digits_run(tmp_path / "run", "eir")
    run_dir, initial, final = metrics["dir"], metrics["initial"], metrics["final"]
    assert {"val/knn_top1", "val/knn_top1@5", "val/knn_top1@20", "val/recall@1", "val/nmi"} <= set(final)
    assert_finite(final)
    # ONE_STEP is a tenth of an epoch: 4 steps at this budget's batch 32 (45 batches), as it always was here
    first_step = digits_run(tmp_path / "one_step", "eir", *ONE_STEP)["final"]
    assert_gains(final, best_of(initial, first_step), {"val/nmi": NMI_GAIN})
    assert_logged(run_dir, ("train/loss", "train/iraug", "train/intra", "train/inter", "train/mix_ratio",
                            "train/embedding_std"))
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    assert state["bank.rows"].shape == (1437, 64)
    torch.testing.assert_close(state["bank.rows"].norm(dim=1), torch.ones(1437))
