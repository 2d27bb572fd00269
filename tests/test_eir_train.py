"""The CLI end to end with EIR on digits from a random init: what `make train METHOD=eir` runs, at the
shortened budget of experiments/seeds.py (6 epochs). It must end above its own random-init network on NMI and
above its IRaug baseline (the paper's Table 1 ablation) on the same seed, log every loss term, and checkpoint
its memory bank (later rounds and resumes continue it)."""
import torch

from experiments.reproduce import load_table, table_path
from experiments.seeds import ONE_STEP
from tests.learning import assert_finite, assert_gains, assert_logged, best_of, digits_run

# Seeds 0-4 (seed_everything and model.seed together), OMP_NUM_THREADS=1, this budget, at f5e6d45: NMI gains
# +12.6 / +13.6 / +13.5 / +20.0 / +6.2 over the random init; the margin sits under the worst seed. kNN
# top-1 is not asserted against the init: at 6 epochs the bank, written once per epoch from random unit rows,
# still holds kNN below the random-init network's on four seeds (59-72 against 70-73); the shipped 30 epochs
# pass it. The network after one training step (`--budget one_step`, measured before greedy k-means++) was
# below the random init on every seed (NMI 23.3-29.5 against 34.4-44.6), so the random init is the binding
# floor of the two.
NMI_GAIN = 5.0
# The paper's own baseline, IRaug (the relation terms off), at the same budget and seed. Seeds 0-4
# (`python -m experiments.seeds --methods eir --budget test [--extra <IRaug row's args>]`): IRaug ends below
# the random init on every seed at 6 epochs (kNN 37.5-49.7, NMI 28.4-41.0), the full method well above it:
# docs/methods/eir.md has the per-seed table. Full minus IRaug: kNN +16.1 to +34.2, NMI +14.5 to +27.2; the
# margins are half the worst seed's.
OVER_IRAUG = {"val/knn_top1": 8.0, "val/nmi": 7.0}
# IRaug's flags are the digits Table 1's IRaug row, the one owner of what that row runs
(IRAUG,) = [row.args for row in load_table(table_path("eir", "table1-digits")).rows if row.name == "IRaug"]


def test_eir_digits_config_learns_from_a_random_init(tmp_path):
    metrics = digits_run(tmp_path / "run", "eir")
    run_dir, initial, final = metrics["dir"], metrics["initial"], metrics["final"]
    assert {"val/knn_top1", "val/knn_top1@5", "val/knn_top1@20", "val/recall@1", "val/nmi"} <= set(final)
    assert_finite(final)
    # ONE_STEP is a tenth of an epoch: 4 steps at this budget's batch 32 (45 batches), as it always was here
    first_step = digits_run(tmp_path / "one_step", "eir", *ONE_STEP)["final"]
    assert_gains(final, best_of(initial, first_step), {"val/nmi": NMI_GAIN})
    iraug = digits_run(tmp_path / "iraug", "eir", *IRAUG)["final"]
    assert_gains(final, iraug, OVER_IRAUG)
    assert_logged(run_dir, ("train/loss", "train/iraug", "train/intra", "train/inter", "train/mix_ratio",
                            "train/embedding_std"))
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    assert state["bank.rows"].shape == (1437, 64)
    torch.testing.assert_close(state["bank.rows"].norm(dim=1), torch.ones(1437))
