"""LMCS: the composed master against hand-combined features, a master update that leaves the students
alone, critical discovery on a hand-built 2-D case, and the look-ahead order (master before student) over
two generations of a real fit."""
from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import lightning as L
import pytest
import torch
from torch import nn

from callbacks.sample_discovery import (
    CriticalSampleDiscovery,
    critical_select,
    entropy_bits,
    rank_weighted_vote,
)
from datamodules.digits import DigitsDataModule
from lightning_modules.batchnorm import untracked_batchnorm
from lightning_modules.lmcs import LMCS, VERSIONS, compose
from lightning_modules.losses.clustering import discriminative_power
from lightning_modules.semi import Curriculum, SemiSupervised
from tests.learning import assert_gains, digits_run, one_step_run

# one intra-op thread for speed only (two spinning OpenMP threads on the 2-core CI machine are ~10x slower);
# it changes the floating-point summation order, not what the checks assert (docs/methods/lmcs.md)
pytestmark = pytest.mark.usefixtures("one_thread")


def small_lmcs(**kwargs) -> LMCS:
    return LMCS(backbone="small_cnn", in_chans=1, learner="mixmatch", num_classes=3, **kwargs)


def test_compose_sums_the_converted_features_by_hand():
    converters = nn.ModuleList(nn.Linear(2, 2) for _ in range(3))
    with torch.no_grad():
        for convert, (w, b) in zip(converters, [([[1.0, 0.0], [0.0, 2.0]], [1.0, 0.0]),
                                                ([[0.0, 1.0], [1.0, 0.0]], [0.0, 0.0]),
                                                ([[0.5, 0.0], [0.0, 0.5]], [0.0, -1.0])]):
            convert.weight.copy_(torch.tensor(w))
            convert.bias.copy_(torch.tensor(b))
    h = [torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0, 4.0]]), torch.tensor([[2.0, 2.0]])]
    # (1 + 1, 4) + (4, 3) + (1, 1 - 1) = (7, 7)
    assert compose(h, converters).tolist() == [[7.0, 7.0]]


@pytest.mark.parametrize("master_bn", ["batch", "running"])
def test_composed_master_equals_the_hand_combined_weighted_features(master_bn):
    """The evaluated master normalises as it trains (master_bn): batch statistics or the running ones."""
    torch.manual_seed(0)
    model = small_lmcs(master_bn=master_bn)
    with torch.no_grad():  # three different students and a non-trivial composition
        for p in [*model.previous.parameters(), *model.teacher.parameters(), *model.lmc_ema.parameters()]:
            p.add_(0.1 * torch.randn_like(p))
    model.eval()  # as in validation
    x = torch.randn(5, 1, 8, 8)
    logits, _ = model.master(x)
    assert not model.trunk.training  # every mode as it was
    with torch.no_grad():
        expected = model.lmc_ema.decision.bias.clone()
        for version, convert in zip(VERSIONS, model.lmc_ema.converters):
            # batch: training-mode BN of a copy (the batch's statistics); running: eval-mode BN
            trunk = copy.deepcopy(getattr(model, version).trunk).train(master_bn == "batch")
            expected = expected + (trunk(x) @ convert.weight.T + convert.bias) @ model.lmc_ema.decision.weight.T
    assert torch.allclose(logits, expected, atol=1e-5)
    # at initialisation the converters are I / 3 with no bias: z is the mean of the three features
    fresh = small_lmcs()
    features = fresh.composed_trunk().student_features(x)
    assert torch.allclose(fresh.composed_trunk()(x), sum(features) / 3, atol=1e-6)


@pytest.mark.parametrize("master_bn", ["batch", "running"])
def test_a_master_update_leaves_every_student_parameter_and_bn_statistic_unchanged(master_bn):
    torch.manual_seed(0)
    model = small_lmcs(master_bn=master_bn)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("lmc")}
    lmc_before = [p.clone() for p in model.lmc.parameters()]
    x, y = torch.randn(8, 1, 8, 8), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.01)
    for _ in range(2):
        features = model.composed_trunk().student_features(x)
        terms = model.master_terms(features, {"views": [x], "target": y})
        optimizer.zero_grad()
        terms["loss"].backward()
        optimizer.step()
    assert all(p.grad is None for name, p in model.named_parameters() if not name.startswith("lmc"))
    after = model.state_dict()
    changed = [k for k, v in before.items() if not torch.equal(v, after[k])]
    assert changed == []  # parameters, running means / variances and batch counts of all three students
    assert any(not torch.equal(a, b) for a, b in zip(lmc_before, model.lmc.parameters()))


def test_the_jd_centres_cluster_the_features_jd_trains_on():
    """The k-means feature pass runs with the module in eval mode (extract_features); with master_bn batch it
    must still see the batch-statistic features that J_D is computed on in training, and move no BN
    statistic (before: the running statistics, another feature space)."""
    torch.manual_seed(0)
    model = small_lmcs(master_bn="batch")
    with torch.no_grad():
        for p in [*model.previous.parameters(), *model.teacher.parameters()]:
            p.add_(0.1 * torch.randn_like(p))
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.add_(0.5)  # running statistics far from any batch's
    x = torch.randn(16, 1, 8, 8)
    model.train()
    trained_on = compose(model.composed_trunk(ema=False).student_features(x), model.lmc.converters)
    buffers = {k: v.clone() for k, v in model.state_dict().items()}
    model.eval()
    with torch.no_grad():
        clustered = model.composed_trunk(ema=False)(x)
    assert torch.allclose(clustered, trained_on, atol=1e-5)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in buffers.items())
    assert not any(m.training for m in model.modules())  # modes restored


def test_discriminative_power_modes_by_hand():
    centers = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    features = torch.tensor([[2.0, 0.0]])  # normalised (1, 0): d0 = 0, d1 = sqrt(2)
    assert discriminative_power(features, centers, "ratio").item() == pytest.approx(0.0, abs=1e-5)
    assert discriminative_power(features, centers, "literal").item() == pytest.approx(2.0, abs=1e-5)
    assert discriminative_power(features, centers, "neg_gap").item() == pytest.approx(-math.sqrt(2), abs=1e-5)


# class 0 at (0, 0), (0, 4) (centre (0, 2)); class 1 at (4, 0), (4, 4) (centre (4, 2)); beta = 1 / C = 1/2:
# rank weights 2/3, 1/2, 2/5, 1/3 for ranks 1-4 of 4
REFERENCE = torch.tensor([[0.0, 0.0], [0.0, 4.0], [4.0, 0.0], [4.0, 4.0]])
REFERENCE_LABELS = torch.tensor([0, 0, 1, 1])
CANDIDATES = torch.tensor([[0.5, 2.0],    # 0: d 0.5, two class-0 neighbours first: p0 = (2/3 + 1/2) / 1.9
                           [1.0, 0.2],    # 1: d 2.06, ranks 0,1,0,1: p0 = (2/3 + 2/5) / 1.9 = 32/57
                           [3.0, 3.8],    # 2: the mirror image: p1 = 32/57
                           [2.0, 30.0],   # 3: as ambiguous as 1 and 2 (ranks 0,1,0,1) but far from any centre
                           [3.5, 2.0]])   # 4: d 0.5, p1 = (2/3 + 1/2) / 1.9


def test_rank_weighted_vote_and_entropy_by_hand():
    distances = torch.cdist(CANDIDATES, REFERENCE)
    votes = rank_weighted_vote(distances, REFERENCE_LABELS, 2, beta=0.5)
    assert votes[0].tolist() == pytest.approx([(2 / 3 + 1 / 2) / 1.9, (2 / 5 + 1 / 3) / 1.9])
    assert votes[1].tolist() == pytest.approx([32 / 57, 25 / 57])
    assert votes[2].tolist() == pytest.approx([25 / 57, 32 / 57])
    h = -(32 / 57) * math.log2(32 / 57) - (25 / 57) * math.log2(25 / 57)
    assert entropy_bits(votes[1:2]).item() == pytest.approx(h)
    assert entropy_bits(torch.tensor([[1.0, 0.0]])).item() == 0.0


def test_critical_discovery_picks_the_highest_entropy_inside_the_confinement_with_the_voted_label():
    found = critical_select(CANDIDATES, REFERENCE, REFERENCE_LABELS, 2, count=2, pool_factor=2)
    # confined set: the 4 nearest to a centre (0, 4, 1, 2); candidate 3 is as ambiguous but outside it
    assert found["picked"].tolist() == [1, 2] and found["label"].tolist() == [0, 1]
    h = -(32 / 57) * math.log2(32 / 57) - (25 / 57) * math.log2(25 / 57)
    assert found["entropy"].tolist() == pytest.approx([h, h])
    unconfined = critical_select(CANDIDATES, REFERENCE, REFERENCE_LABELS, 2, count=3, mode="unconfined_max_entropy")
    assert sorted(unconfined["picked"].tolist()) == [1, 2, 3]
    low = critical_select(CANDIDATES, REFERENCE, REFERENCE_LABELS, 2, count=2, pool_factor=2,
                          mode="confined_min_entropy")
    assert low["picked"].tolist() == [0, 4] and low["label"].tolist() == [0, 1]
    nearest = critical_select(CANDIDATES, REFERENCE, REFERENCE_LABELS, 2, count=1, mode="min_distance")
    assert nearest["picked"].tolist() == [0]
    with pytest.raises(ValueError, match="mode"):
        critical_select(CANDIDATES, REFERENCE, REFERENCE_LABELS, 2, count=1, mode="max_entropy")


class SeenIndices(L.Callback):
    """The training images each part of the batch carried, per epoch."""

    def __init__(self):
        self.seen: dict[int, dict[str, set[int]]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        epoch = self.seen.setdefault(trainer.current_epoch, {"labeled": set(), "lookahead": set()})
        for part in epoch:
            epoch[part].update(batch[part]["index"].tolist())


def test_lookahead_the_master_sees_each_generation_one_generation_before_the_student(tmp_path):
    """Two generations: U_1 reaches the master's batches in generation 1 and the student's in generation 2,
    U_2 the master's only; the master trains from the second step (epoch 1) on."""
    torch.manual_seed(0)
    dm = DigitsDataModule(protocol="semi", labels_per_class=2, batch_size=16, labeled_batch_size=16,
                          steps_per_epoch=6, num_views=2, train_transform="digits", split_seed=0)
    model = LMCS(backbone="small_cnn", in_chans=1, learner="mixmatch", step_epochs=1, consistency_weight=1.0,
                 curriculum=Curriculum(phase0_epochs=1, iteration_epochs=1, generations=2, iterations=1))
    recorder = SeenIndices()
    discovery = CriticalSampleDiscovery(num_discovered=40)
    trainer = L.Trainer(max_epochs=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        callbacks=[discovery, recorder], default_root_dir=tmp_path)
    trainer.fit(model, datamodule=dm)
    first, second = (set(h["index"]) for h in discovery.history)
    seen = recorder.seen
    assert [h["count"] for h in discovery.history] == [40, 40] and not first & second
    original = set(dm.labeled_indices.tolist()) - first
    assert seen[0]["labeled"] <= original and seen[0]["lookahead"] <= original  # phase 0: labels only
    assert not seen[1]["labeled"] & first and seen[1]["lookahead"] & first  # generation 1: master only
    assert seen[2]["labeled"] & first and seen[2]["lookahead"] & first
    assert not seen[2]["labeled"] & second and seen[2]["lookahead"] & second  # generation 2
    assert set(dm.lookahead_indices.tolist()) == original | first | second
    assert bool(model.master_started)
    assert json.loads(Path(tmp_path, "discovery.json").read_text())[1]["labeled"] == 20 + 40 + 40


def test_lmcs_digits_cli_lowers_the_error_and_reports_discovery_errors(tmp_path):
    """Against the network after one training step (its BN statistics and head already moved: the EMA
    student's error is 44-59 % there, not the random init's 90-94 %), on the same seed."""
    run = tmp_path / "run"
    final = digits_run(run, "lmcs")["final"]
    one_step = one_step_run(tmp_path / "one_step", "lmcs")["final"]
    assert set(final) == {"val/error", "val/error_student", "val/error_teacher", "val/error_master"}
    # `python -m experiments.seeds --methods lmcs --budget test [--extra <ONE_STEP>]`, seeds 0-4 (labels and
    # init): after one step the EMA student errs 43.6-59.2 % and the master 83.3-96.9 %; at the end 15.3-30.6 %
    # and 8.9-14.2 %; worst gain over one step on the same seed 25.3 and 70.5 points
    assert_gains(final, one_step, {"val/error": 15, "val/error_master": 50})
    history = json.loads(Path(run, "discovery.json").read_text())
    assert len(history) == 2 and all(h["error"] is not None for h in history)
    assert 0 < history[0]["count"] <= 50 and 0 < history[1]["count"] <= 100  # N doubles; <= N / C per class


def test_per_class_quota_keeps_the_picks_balanced():
    # candidates 1 and 5 (class 0) and 2 (class 1) are equally ambiguous; 2 is the farthest from its centre
    candidates = torch.tensor([[0.5, 2.0], [1.0, 0.2], [2.7, 3.9], [3.5, 2.0], [1.2, 0.1]])
    plain = critical_select(candidates, REFERENCE, REFERENCE_LABELS, 2, count=2, pool_factor=3)
    assert plain["picked"].tolist() == [1, 4] and plain["label"].tolist() == [0, 0]
    quota = critical_select(candidates, REFERENCE, REFERENCE_LABELS, 2, count=2, pool_factor=3, per_class_quota=True)
    assert quota["picked"].tolist() == [1, 2] and quota["label"].tolist() == [0, 1]


def fit_student(model, tmp_path, callbacks=()) -> dict[str, torch.Tensor]:
    """Three epochs on 2 labels per class; the EMA student's and the student's weights after them."""
    dm = DigitsDataModule(protocol="semi", labels_per_class=2, batch_size=16, labeled_batch_size=16,
                          steps_per_epoch=4, num_views=2, train_transform="digits", split_seed=0)
    trainer = L.Trainer(max_epochs=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=1,
                        num_sanity_val_steps=0, default_root_dir=tmp_path, callbacks=list(callbacks))
    trainer.fit(model, datamodule=dm)
    return {f"{name}.{k}": v.clone() for name in ("student", "teacher")
            for k, v in getattr(model, name).state_dict().items()}


def test_lmcs_without_guidance_or_discovery_trains_the_student_exactly_as_mixmatch(tmp_path):
    """The paired comparison behind the digits study: with the master's guidance off and discovery off (its
    feature passes still run), the master trains beside the student (from epoch 1) without touching it or the
    random stream, so the student and EMA student end bit-identical to MixMatch alone on the same seed."""
    common = {"backbone": "small_cnn", "in_chans": 1, "learner": "mixmatch", "consistency_weight": 10.0}
    torch.manual_seed(0)
    mixmatch = fit_student(SemiSupervised(**common), tmp_path / "mixmatch")
    torch.manual_seed(0)
    lmcs = LMCS(step_epochs=1, guidance="none", **common,
                curriculum=Curriculum(phase0_epochs=1, iteration_epochs=1, generations=2, iterations=1))
    composed = fit_student(lmcs, tmp_path / "lmcs", [CriticalSampleDiscovery(mode="none")])
    identity = torch.eye(lmcs.trunk.out_dim) / len(VERSIONS)
    assert lmcs.master_started and not torch.equal(lmcs.lmc.converters[0].weight, identity)  # it trained
    assert mixmatch.keys() == composed.keys()
    assert [k for k in mixmatch if not torch.equal(mixmatch[k], composed[k])] == []


def test_untracked_batchnorm_normalises_with_the_batch_and_keeps_the_running_statistics():
    """Training-mode BN inside: the batch's mean and (biased) variance, running ones untouched; eval-mode BN
    inside keeps its running statistics; flags restored after."""
    live, frozen = nn.BatchNorm1d(1, affine=False), nn.BatchNorm1d(1, affine=False).eval()
    for bn in (live, frozen):
        bn.running_mean.fill_(10.0)
    x = torch.tensor([[1.0], [3.0]])  # mean 2, biased variance 1
    with untracked_batchnorm(live, frozen):
        batch, running = live(x), frozen(x)
    assert torch.allclose(batch, torch.tensor([[-1.0], [1.0]]), atol=1e-4)
    assert torch.allclose(running, (x - 10.0) / math.sqrt(1.0 + frozen.eps))
    assert live.running_mean.item() == 10.0 and live.num_batches_tracked.item() == 0
    assert live.training and live.track_running_stats and not frozen.training
    live(x)  # outside: a normal training step moves the running mean again
    assert live.running_mean.item() == pytest.approx(0.9 * 10.0 + 0.1 * 2.0)


def effective_value(table, row, flag: str, config_value):
    """A row's value of `--<flag>`: the last of the table's then the row's arguments (reproduce's order),
    else the config's."""
    given = [a.split("=", 1)[1] for a in [*table.args, *row.args] if a.startswith(f"--{flag}=")]
    return given[-1] if given else config_value


def lmcs_table_rows():
    import yaml

    from experiments.reproduce import CONFIGS, TABLES, load_table, row_config

    for path in sorted(TABLES.glob("lmcs-table3.*.yaml")):
        if path.stem.endswith(("-digits", "-cpu")):
            continue  # the digits and CPU effect tables pair MixMatch and LMCS on one budget: no paper length
        table = load_table(path)
        for row in table.rows:
            config = yaml.safe_load((CONFIGS / row_config(table, row)).read_text())
            discovery = next(c["init_args"] for c in config["trainer"]["callbacks"]
                             if c["class_path"].endswith("CriticalSampleDiscovery"))
            values = {"max_epochs": config["trainer"]["max_epochs"], "guidance": config["model"]["init_args"]["guidance"],
                      "mode": discovery["mode"], "lookahead": discovery["lookahead"],
                      "generations": config["model"]["init_args"]["curriculum"]["generations"]}
            flags = {"max_epochs": "trainer.max_epochs", "guidance": "model.init_args.guidance",
                     "mode": "trainer.callbacks.init_args.mode", "lookahead": "trainer.callbacks.init_args.lookahead",
                     "generations": "model.init_args.curriculum.generations"}
            yield path.stem, row.name, {k: str(effective_value(table, row, flags[k], v)).lower()
                                        for k, v in values.items()}


def test_the_mixmatch_baseline_rows_run_mixmatchs_own_length():
    """MixMatch's numbers (and the chapter's "w/o LMC") are 1,024-epoch (2^20-step) runs: a row with neither
    guidance nor discovery runs 1,024 epochs, not LMCS's 1,024 + 4 x 200."""
    baselines = [(table, name, v["max_epochs"]) for table, name, v in lmcs_table_rows()
                 if v["guidance"] == "none" and v["mode"] == "none"]
    assert len(baselines) == 16
    assert [b for b in baselines if b[2] != "1024"] == []


def test_a_single_generation_gives_its_discoveries_to_the_student():
    """With look-ahead the student receives a generation's discoveries one generation later; a one-generation
    table (3.8) must turn it off, or its student never trains on the discovered images."""
    single = [(table, name, v["lookahead"]) for table, name, v in lmcs_table_rows()
              if v["generations"] == "1" and v["mode"] != "none"]
    assert {table for table, _, _ in single} == {"lmcs-table3.8"} and len(single) == 5
    assert [s for s in single if s[2] != "false"] == []
