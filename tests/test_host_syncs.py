"""No host syncs in a training step: one step (forward, loss, backward, optimizer step, EMA) of every method's
digits config runs without an op that would block the host on a GPU (tests/host_syncs.py lists them), so
a `.item()`, `if tensor:` or boolean-mask gather added to a step fails here on the CPU. The batch's
augmentation on the device path is covered in tests/test_device_augment.py."""
import math

import lightning as L
import pytest
import torch
from torch import nn

from experiments.train import RUN_DIR_ENV, SuiteCLI
from lightning_modules.base import NonFiniteLoss, ema_update
from lightning_modules.losses import multi_similarity_loss
from lightning_modules.relations import first_of_repeats, momentum_update
from lightning_modules.roul import others
from tests.host_syncs import HostSyncs

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIGS = "experiments/configs"
# every method, by its digits config (the supervised, semi-supervised and unsupervised learners)
CONFIG = {"isif": "isif/digits", "umm": "umm/digits", "eir": "eir/digits", "tac_ccl": "tac_ccl/digits",
          "san": "san/digits", "roul": "roul/digits", "snowball": "snowball/digits", "lmcs": "lmcs/digits"}
STEPS = 2  # the first and a later step (some methods switch a term on after the first)
# ops a method's step may sync on in this CPU test, with the reason
ALLOWED: dict[str, dict[str, int]] = {
    # MixMatch's F.one_hot(labels, num_classes) checks the labels' range with two .item() on the CPU only;
    # on CUDA it skips the check (no sync there)
    "lmcs": {"_local_scalar_dense": 2 * STEPS},
}


class CountSyncs(L.Callback):
    """Counts host syncs from each training batch's start to the end of the module's own batch-end hook
    (EMA updates), i.e. training_step, backward, optimizer step and the base's per-step bookkeeping."""

    def __init__(self):
        self.syncs, self.steps = HostSyncs(), 0

    def on_fit_start(self, trainer, pl_module) -> None:
        batch_end = pl_module.on_train_batch_end

        def counted_batch_end(*args, **kwargs):
            try:
                return batch_end(*args, **kwargs)
            finally:
                self.syncs.stop()
                self.steps += 1

        pl_module.on_train_batch_end = counted_batch_end

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.syncs.start()


@pytest.mark.parametrize("method", sorted(CONFIG))
def test_a_training_step_of_every_method_has_no_host_sync(tmp_path, monkeypatch, method):
    monkeypatch.delenv(RUN_DIR_ENV, raising=False)
    dataset = "digits"
    cli = SuiteCLI(args=["--config", f"{CONFIGS}/base.yaml", "--config", f"{CONFIGS}/datasets/{dataset}.yaml",
                         "--config", f"{CONFIGS}/{CONFIG[method]}.yaml", "--run.dir", str(tmp_path / "run"),
                         "--run.logger=none", "--trainer.enable_progress_bar=false", "--trainer.max_epochs=1",
                         f"--trainer.limit_train_batches={STEPS}", "--trainer.limit_val_batches=0",
                         "--trainer.num_sanity_val_steps=0", "--data.num_workers=0"], run=False)
    counter = CountSyncs()
    cli.trainer.callbacks.append(counter)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert counter.steps == STEPS
    assert dict(counter.syncs.calls) == ALLOWED.get(method, {}), (
        f"{method}: host syncs in {STEPS} steps at {dict(counter.syncs.where)}")


# -- the per-step pieces made sync-free compute what their mask-based forms did -------------------------
def test_the_non_finite_loss_record_keeps_the_first_bad_step_without_a_sync():
    record = NonFiniteLoss()
    with HostSyncs() as syncs:
        for step, loss in enumerate([1.0, 2.0, float("nan"), float("inf"), 3.0]):
            record.record(torch.tensor(loss), step, epoch=1)
    assert dict(syncs.calls) == {}
    step, epoch, loss = record.first()
    assert (step, epoch) == (2, 1) and math.isnan(loss)
    clean = NonFiniteLoss()
    clean.record(torch.tensor(0.5), 0, 0)
    assert clean.first() is None and NonFiniteLoss().first() is None


def test_foreach_ema_is_the_per_tensor_lerp_and_copies_buffers():
    torch.manual_seed(0)
    source, target = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3)), nn.Sequential(nn.Linear(4, 3),
                                                                                       nn.BatchNorm1d(3))
    source.train()(torch.randn(8, 4))  # moves the running statistics
    expected = [t.detach() * 0.9 + s.detach() * 0.1 for t, s in zip(target.parameters(), source.parameters())]
    ema_update(target, source, 0.9)
    for got, want in zip(target.parameters(), expected):
        torch.testing.assert_close(got, want)
    assert all(torch.equal(t, s) for t, s in zip(target.buffers(), source.buffers()))


def test_the_bank_update_keeps_the_first_of_repeated_indices():
    """A DistributedSampler's padding repeats indices: the bank takes the first row of each, as the boolean
    deduplication did."""
    index, feats = torch.tensor([5, 3, 5, 1, 3, 3, 9]), torch.randn(7, 4)
    assert torch.equal(first_of_repeats(feats, index), feats[torch.tensor([0, 1, 0, 3, 1, 1, 6])])
    rows = torch.nn.functional.normalize(torch.randn(12, 4), dim=1)
    kept = torch.tensor([0, 1, 3, 6])  # the first of each index
    expected = rows.index_copy(0, index[kept], torch.nn.functional.normalize(
        0.5 * rows[index[kept]] + 0.5 * feats[kept], dim=1))
    torch.testing.assert_close(momentum_update(rows, index, feats, 0.5), expected)


def test_roul_s_other_positions_are_the_off_diagonal_ones():
    every = torch.arange(6).expand(6, 6)
    assert torch.equal(others(6), every[~torch.eye(6, dtype=torch.bool)].view(6, 5))


def test_the_ms_loss_equals_the_library_s_miner_and_loss():
    """multi_similarity_loss (the miner's rule and the loss on masks) equals pytorch-metric-learning's public
    MultiSimilarityMiner + MultiSimilarityLoss, value and gradient, on a batch and against a memory."""
    from pytorch_metric_learning import losses, miners

    generator = torch.Generator().manual_seed(0)
    query = torch.nn.functional.normalize(torch.randn(16, 8, generator=generator), dim=1)
    labels = torch.randint(0, 4, (16,), generator=generator)
    memory = torch.nn.functional.normalize(torch.randn(24, 8, generator=generator), dim=1)
    memory_labels = torch.randint(0, 4, (24,), generator=generator)
    for keys, key_labels in ((None, None), (memory, memory_labels)):
        ours, theirs = query.clone().requires_grad_(), query.clone().requires_grad_()
        mined = miners.MultiSimilarityMiner(epsilon=0.1)(theirs, labels, keys, key_labels)
        expected = losses.MultiSimilarityLoss(alpha=2.0, beta=40.0, base=0.5)(theirs, labels, mined, keys, key_labels)
        got = multi_similarity_loss(ours, labels, keys, key_labels, alpha=2.0, beta=40.0)
        assert len(mined[0]) > 1 and len(mined[2]) > 1
        torch.testing.assert_close(got, expected)
        got.backward()
        expected.backward()
        torch.testing.assert_close(ours.grad, theirs.grad)
