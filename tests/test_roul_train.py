"""The CLI end to end with ROUL on digits from a random init (unseen split: train digits 0-4, test 5-9), at the
test budget `experiments.seeds.TEST_BUDGET["roul"]`: it must end above the network after one training step, and
report Recall@K both without and with the test-time refinement."""
from tests.learning import assert_finite, assert_gains, assert_logged, digits_run, one_step_run

# The floor is the network after one training step (issue 22: one step of metric learning already lifts NMI
# far above the random init), not the random init. `python -m experiments.seeds --methods roul --budget test`
# (final) and the same with `--extra --trainer.max_epochs=1 --trainer.limit_train_batches=0.1
# --trainer.check_val_every_n_epoch=1` (one step), seeds 0-4, OMP_NUM_THREADS=1: NMI after one step 43.5 / 27.2 /
# 33.8 / 33.3 / 26.9 (random init 49.0 / 28.0 / 42.1 / 32.4 / 38.5), at the end 68.5 / 64.9 / 66.0 / 55.3 / 58.8:
# gains over one step +25.0 / +37.7 / +32.2 / +22.0 / +31.9.
# R@1 is not asserted: it starts at 92-96 on the unseen digits. The full method is not asserted above its own
# Baseline: per seed its NMI differs by +0.1 / -0.5 / -0.5 / -2.1 / +6.0 (docs/methods/roul.md).
NMI_GAIN = 10.0


def test_roul_digits_config_learns_and_reports_refined_recall(tmp_path):
    metrics = digits_run(tmp_path / "run", "roul")
    one_step = one_step_run(tmp_path / "one_step", "roul")
    run_dir, initial, final = metrics["dir"], metrics["initial"], metrics["final"]
    for k in (1, 2, 4, 8):
        assert {f"val/recall@{k}", f"val/recall@{k}_refined"} <= set(final) & set(initial)
    assert_finite(final)
    assert_gains(final, one_step["final"], {"val/nmi": NMI_GAIN})
    config = (run_dir / "config.yaml").read_text()
    assert "lightning_modules.roul.ROUL" in config and "callbacks.pseudo_labels.KMeansPseudoLabels" in config
    assert_logged(run_dir, ("train/ms_memory", "train/mv", "train/roc", "train/moc", "train/order",
                            "train/grad_share/roc", "train/grad_share/moc", "train/grad_share/ms_memory",
                            "train/grad_share/mv", "train/order_accuracy", "train/core_literal_fraction",
                            "train/core_fallback_clusters", "train/embedding_std", "pseudo_labels/pair_precision"))
