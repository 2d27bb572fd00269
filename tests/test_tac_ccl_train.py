"""The CLI end to end with TAC-CCL on digits from a random init: what `make train METHOD=tac_ccl` runs
(seen split, 6 epochs). It must end above the same network after one training step (which already moves
BatchNorm statistics and the embedding layer, so a random-init reference flatters any run), on the same
seed."""
from tests.learning import assert_finite, assert_gains, assert_logged, digits_run, one_step_run

# Seeds 0-4 (seed_everything, model.seed and the k-means seed together), OMP_NUM_THREADS=1; per-seed gains
# of the last epoch over the one-step network: docs/methods/tac_ccl.md. The margins sit under the worst seed.
R1_GAIN, NMI_GAIN = 1.0, 3.0


def test_tac_ccl_digits_config_learns_beyond_one_training_step(tmp_path):
    full, one_step = digits_run(tmp_path / "full", "tac_ccl"), one_step_run(tmp_path / "one_step", "tac_ccl")
    final, reference = full["final"], one_step["final"]
    assert {"val/recall@1", "val/nmi"} <= set(final) and set(final) == set(reference)
    assert_finite(final)
    assert_gains(final, reference, {"val/recall@1": R1_GAIN, "val/nmi": NMI_GAIN})
    config = (full["dir"] / "config.yaml").read_text()
    assert "lightning_modules.tac_ccl.TACCCL" in config
    assert "callbacks.pseudo_labels.KMeansPseudoLabels" in config
    assert_logged(full["dir"], ("train/ms", "train/ms_memory", "train/ccl", "train/tac_self", "train/tac_cross",
                                "train/feature", "train/attention_std", "train/embedding_std", "pseudo_labels/nmi",
                                "pseudo_labels/pair_precision", "train/grad_share/ms", "train/grad_share/ms_memory",
                                "train/grad_share/ccl", "train/grad_share/tac", "train/grad_share/feature"))
