"""The CLI end to end with SAN on digits from a random init (`make train METHOD=san [VARIANT=unsupervised]`,
seen split), at the shortened budget of `experiments.seeds.TEST_BUDGET`: each run must end above the same
network after one training step, log every SAN term and report the assembly's share of moved points."""
import pytest

from tests.learning import assert_finite, assert_gains, assert_logged, digits_run, one_step_run

# The floor is the network after one training step, not the random init (issue 22): `python -m experiments.seeds
# --methods san san_unsupervised --budget test` (final) and the same with `--extra --trainer.max_epochs=1
# --trainer.limit_train_batches=0.1 --trainer.check_val_every_n_epoch=1` (one step), seeds 0-4, OMP_NUM_THREADS=1:
# supervised (1 epoch): kNN top-1 +16.4 / +11.4 / +17.2 / +11.4 / +17.3, NMI +30.7 / +14.3 / +33.1 / +22.1 / +37.3
# over one step; unsupervised (2 epochs): NMI +30.6 / +10.7 / +15.1 / +14.3 / +19.9. The unsupervised kNN top-1
# is not asserted (-5.6 .. +11.7 over one step: k-means labels of a random init start far from the classes).
# Against the Baseline without SAN: not asserted; on digits the assembly stays at its identity start
# (val/san_moved 0 on every seed; docs/methods/san.md), so the two rows are the same network up to noise.
MARGINS = {"san": {"val/knn_top1": 5.0, "val/nmi": 8.0}, "san_unsupervised": {"val/nmi": 5.0}}
VARIANTS = {"san": "san/digits", "san_unsupervised": "san/digits-unsupervised"}
SAN_TERMS = ("train/san_entropy", "train/san_correlation", "train/san_coherence", "train/san_loss",
             "train/san_diagonal", "train/san_moved", "train/san_beta", "train/ms", "train/memory",
             "train/embedding_std", "train/grad_share/memory", "train/grad_share_assembly/entropy",
             "train/grad_share_assembly/ms")


@pytest.mark.parametrize("method", sorted(VARIANTS))
def test_san_digits_config_learns_beyond_one_step(tmp_path, method):
    metrics = digits_run(tmp_path / "run", method, config=VARIANTS[method])
    one_step = one_step_run(tmp_path / "one_step", method, config=VARIANTS[method])
    run_dir, final = metrics["dir"], metrics["final"]
    assert_finite(final)
    assert_gains(final, one_step["final"], MARGINS[method])
    assert 0.0 <= final["val/san_moved"] <= 1.0 and metrics["initial"]["val/san_moved"] == 0.0
    assert_logged(run_dir, SAN_TERMS)
    if method == "san_unsupervised":
        assert_logged(run_dir, ("pseudo_labels/nmi",))
