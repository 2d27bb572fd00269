"""SAN's module and regularisers against hand-built cases, its insertion at named stages, and
the supervised / pseudo-label glue of `MetricLearning`."""
import copy
import math
from types import SimpleNamespace

import pytest
import torch

from lightning_modules.backbones import build_backbone
from lightning_modules.base import ema_update
from lightning_modules.losses import cbml_loss, contrastive_memory_loss
from lightning_modules.san import (
    SAN,
    Assembly,
    SpatialAssembly,
    assemble,
    assembly_correlation,
    assembly_diagnostics,
    assembly_entropy,
    local_coherence,
    normalize_assembly,
    stage_shape,
)
from lightning_modules.supervised import MetricLearning

# the 2 x 2 map: u = i * 2 + j
SWAP = torch.tensor([[0., 1, 0, 0], [0, 0, 0, 1], [1, 0, 0, 0], [0, 0, 1, 0]])  # w[u, v]: P(0)=2, P(1)=0, ...
UNIFORM = torch.full((4, 4), 0.25)
BLOCKS = torch.tensor([[.5, .5, 0, 0], [.5, .5, 0, 0], [0, 0, .5, .5], [0, 0, .5, .5]])


def with_san(trunk, stage: str, image_size: int, in_chans: int = 3, **config):
    channels, height, width = stage_shape(trunk, stage, in_chans, image_size)
    module = SpatialAssembly(channels, height, width, Assembly(stage=stage, **config))
    trunk.insert(stage, module)
    return module


# -- the assembly ------------------------------------------------------------------------------------
def test_one_hot_weights_move_feature_points_exactly():
    fmap = torch.arange(8.0).view(1, 2, 2, 2)  # channel 0: points 0..3 = 0, 1, 2, 3; channel 1: 4..7
    g = assemble(SWAP[None], fmap)
    # output v takes input u with w[u, v] = 1: v0 <- u2, v1 <- u0, v2 <- u3, v3 <- u1
    assert torch.equal(g, torch.tensor([[[[2., 0], [3, 1]], [[6, 4], [7, 5]]]]))


def test_forced_identity_leaves_features_and_the_network_output_unchanged():
    torch.manual_seed(0)
    plain, _ = build_backbone("googlenet")
    trunk, _ = build_backbone("googlenet")
    trunk.load_state_dict(plain.state_dict())
    san = with_san(trunk, "inception4e", 64, beta0=200.0)  # exp(-200) = 0 in fp32: w = I exactly
    plain.eval(), trunk.eval()
    x = torch.randn(2, 3, 64, 64)
    fmap = torch.randn(2, 832, 4, 4)
    assert torch.equal(san(fmap), fmap)
    with torch.no_grad():
        assert torch.equal(trunk(x), plain(x))


def test_identity_init_puts_the_spec_mass_on_the_diagonal():
    w = SpatialAssembly(8, 14, 14).weights(torch.rand(2, 8, 14, 14))
    diagonal = math.exp(8) / (math.exp(8) + 195)  # zero last conv: logits = 8 I, then Sinkhorn keeps it
    assert w.diagonal(dim1=1, dim2=2).mean().item() == pytest.approx(diagonal, abs=1e-4)  # 0.9386
    assert torch.allclose(w.sum(1), torch.ones(2, 196), atol=1e-5)  # columns exact (last step)


def test_sinkhorn_columns_exact_rows_close_and_softmax_in_columns_only():
    logits = torch.randn(3, 16, 16, generator=torch.Generator().manual_seed(0))
    w = normalize_assembly(logits, "sinkhorn", 5)
    soft = normalize_assembly(logits, "softmax_in")
    assert torch.allclose(w.sum(1), torch.ones(3, 16), atol=1e-5)
    assert torch.allclose(soft, logits.softmax(1))
    row_error = (w.sum(2) - 1).abs().max()
    assert row_error < 0.05 and row_error < (soft.sum(2) - 1).abs().max() / 5
    with pytest.raises(ValueError, match="sinkhorn"):
        normalize_assembly(logits, "rows")


# -- regularisers on the 2 x 2 map -----------------------------------------------------------------------
@pytest.mark.parametrize(("w", "entropy", "correlation"), [
    (torch.eye(4), 0.0, 0.0),      # a permutation: both 0
    (SWAP, 0.0, 0.0),
    (UNIFORM, 2.0, 0.75),          # log2 N bits; 1 - 1/N
    (BLOCKS, 1.0, 0.5),            # every row / column two halves: 1 bit; (4 x (1 - 0.5)) x 2 / 8
])
def test_entropy_and_correlation_by_hand(w, entropy, correlation):
    assert assembly_entropy(w[None]).item() == pytest.approx(entropy, abs=1e-6)
    assert assembly_correlation(w[None]).item() == pytest.approx(correlation, abs=1e-6)


def test_local_coherence_by_hand():
    ones = torch.ones(1, 3, 2, 2)  # equal features: alpha = 1 for every neighbour
    # identity: every shifted neighbour map equals the point's own map; only sqrt(eps) is left
    assert local_coherence(torch.eye(4)[None], ones).item() == pytest.approx(1e-6, rel=1e-3)
    # uniform: an axis neighbour's shifted map loses one row/column (2 of 4 entries differ by 1/4), the
    # diagonal neighbour's keeps one entry (3 differ); each point has 2 axis and 1 diagonal neighbour
    expected = (2 * math.sqrt(2) / 4 + math.sqrt(3) / 4) / 3
    assert local_coherence(UNIFORM[None], ones).item() == pytest.approx(expected, rel=1e-6)
    # orthogonal features: alpha = 0, the term vanishes whatever w is
    orthogonal = torch.eye(4).view(1, 4, 2, 2)
    assert local_coherence(SWAP[None], orthogonal).item() == 0.0
    # a permutation that tears neighbours apart costs more than the identity
    assert local_coherence(SWAP[None], ones).item() > 0.3


def test_regulariser_gradients_are_finite_at_the_identity_init():
    san = SpatialAssembly(8, 4, 4)
    fmap = torch.rand(2, 8, 4, 4, requires_grad=True)
    san.train()
    san(fmap)
    w, f = san.last
    total = assembly_entropy(w) + assembly_correlation(w) + local_coherence(w, f)
    total.backward()
    grads = [fmap.grad, san.beta.grad, *(p.grad for p in san.phi.parameters())]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


# -- insertion -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("name", "stages", "size", "in_chans"), [
    ("googlenet", ["inception3a", "inception3b", "maxpool3", "inception4a", "inception4e", "maxpool4",
                   "inception5a"], 64, 3),
    ("resnet18", ["layer1", "layer2", "layer3"], 64, 3),
    ("small_cnn", ["block1", "block2", "block3"], 8, 1),
])
def test_shapes_at_every_insertion_stage(name, stages, size, in_chans):
    x = torch.randn(2, in_chans, size, size)
    built, dim = build_backbone(name, in_chans=in_chans)
    for stage in stages:
        trunk = copy.deepcopy(built)
        expected = stage_shape(trunk, stage, in_chans, size)
        san = with_san(trunk, stage, size, in_chans)
        seen = []
        san.register_forward_hook(lambda m, i, out, seen=seen: seen.append((i[0].shape, out.shape)))
        trunk.train()
        assert trunk(x).shape == (2, dim), stage
        assert seen[0][0] == seen[0][1] == (2, *expected), stage
        assert san.last[0].shape == (2, expected[1] * expected[2], expected[1] * expected[2]), stage


def test_unknown_stage_names_the_valid_ones():
    trunk, _ = build_backbone("small_cnn", in_chans=1)
    with pytest.raises(ValueError, match="block3"):
        stage_shape(trunk, "layer3", 1, 8)


@pytest.mark.parametrize(("name", "last", "earlier", "size", "in_chans"), [
    ("small_cnn", "block4", "block3", 8, 1),
    ("resnet18", "layer4", "layer3", 64, 3),
])
def test_right_before_global_pooling_san_is_a_no_op_and_earlier_it_is_not(name, last, earlier, size, in_chans):
    """GAP of a doubly stochastic re-arrangement is GAP of the input, so SAN must have
    convolutions after it. A random (non-identity) Φ, Sinkhorn run to convergence."""
    torch.manual_seed(0)
    x = torch.randn(4, in_chans, size, size)
    outputs = {}
    for stage in (None, last, earlier):
        torch.manual_seed(1)
        trunk, _ = build_backbone(name, in_chans=in_chans)
        if stage:
            san = with_san(trunk, stage, size, in_chans, iterations=200, beta0=0.0)
            torch.nn.init.normal_(san.phi[-1].weight, std=1.0)
        trunk.eval()
        with torch.no_grad():
            outputs[stage] = trunk(x)
    assert torch.allclose(outputs[last], outputs[None], atol=1e-5)
    assert (outputs[earlier] - outputs[None]).abs().max() > 1e-2


# -- the training module ---------------------------------------------------------------------------------
def small_san(**kwargs) -> SAN:
    model = SAN(backbone="small_cnn", in_chans=1, embedding_dim=16,
                assembly=Assembly(stage="block3", hidden=16), **kwargs)
    model.insert_assembly(8)
    return model


def test_san_module_inserts_once_and_its_key_network_carries_san_too():
    model = small_san()
    model.insert_assembly(8)
    assert sum(isinstance(m, SpatialAssembly) for m in model.trunk.modules()) == 1
    assert sum(isinstance(m, SpatialAssembly) for m in model.key_trunk.modules()) == 1
    assert not any(p.requires_grad for p in model.key_trunk.parameters())
    baseline = SAN(backbone="small_cnn", in_chans=1, embedding_dim=16, assembly=Assembly(enabled=False))
    baseline.insert_assembly(8)
    assert baseline.san is None


def test_a_checkpoint_rebuilds_san_before_its_weights_load():
    model = small_san()
    torch.nn.init.normal_(model.san.phi[-1].weight)
    checkpoint = {"state_dict": model.state_dict()}
    model.on_save_checkpoint(checkpoint)
    fresh = SAN(backbone="small_cnn", in_chans=1, embedding_dim=16, assembly=Assembly(stage="block3", hidden=16))
    fresh.on_load_checkpoint(checkpoint)
    fresh.load_state_dict(checkpoint["state_dict"])
    assert torch.equal(fresh.san.phi[-1].weight, model.san.phi[-1].weight)


def test_training_step_logs_every_regulariser_and_adds_them_weighted():
    torch.manual_seed(0)
    model = small_san(loss="proxy_anchor", num_classes=4, memory_weight=0.0)
    assert sum(p.numel() for p in model.proxies.parameters()) == 4 * 16
    logged = {}
    model.log_terms = lambda terms, embedding=None: logged.update(terms)
    batch = {"views": [torch.randn(8, 1, 8, 8)], "index": torch.arange(8), "target": torch.arange(8) % 4}
    model.train()
    loss = model.training_step(batch, 0)
    reg = sum(w * logged[f"san_{k}"] for k, w in model.lambdas.items())
    assert loss.item() == pytest.approx((logged["proxy_anchor"] + reg).item(), rel=1e-5)
    assert {"san_diagonal", "san_moved", "san_row_sum_std", "san_beta", "san_loss"} <= set(logged)
    loss.backward()
    assert model.san.beta.grad is not None and torch.isfinite(model.san.beta.grad)


def test_true_labels_are_read_only_when_revealed():
    model = MetricLearning(backbone="small_cnn", in_chans=1, embedding_dim=8, memory_weight=0.0)
    hidden = {"views": [torch.randn(4, 1, 8, 8)], "index": torch.arange(4), "target": torch.full((4,), -1)}
    model._trainer = SimpleNamespace(datamodule=SimpleNamespace(supervised=False))  # refused at fit start,
    with pytest.raises(ValueError, match="supervised=true"):  # not at each step (a check there blocks the host)
        model.on_fit_start()
    pseudo = MetricLearning(backbone="small_cnn", in_chans=1, embedding_dim=8, memory_weight=0.0, labels="pseudo")
    revealed = {**hidden, "target": torch.tensor([3, 3, 3, 3])}
    pseudo.set_pseudo_labels(torch.tensor([0, 1, 0, 1]), torch.zeros(2, 8))
    assert pseudo.batch_labels(revealed).tolist() == [0, 1, 0, 1]  # the batch's targets are never read
    with pytest.raises(RuntimeError, match="labels=pseudo"):
        model.set_pseudo_labels(torch.tensor([0, 1, 0, 1]), torch.zeros(2, 8))


def test_memory_queue_is_read_by_index_and_filled_in_fifo_order():
    model = MetricLearning(backbone="small_cnn", in_chans=1, embedding_dim=2, labels="pseudo")
    model.set_pseudo_labels(torch.tensor([0, 1, 1]), torch.zeros(2, 2), embedding=torch.eye(3)[:, :2])
    model.enqueue(torch.tensor([[0.6, 0.8], [0.8, 0.6]]), torch.tensor([2, 0]))
    assert model.memory_index.tolist() == [2, 0, 2]
    assert model.memory_labels().tolist() == [1, 0, 1]
    assert torch.equal(model.memory_embedding[:2], torch.tensor([[0.6, 0.8], [0.8, 0.6]]))
    assert model.memory_cursor.item() == 2


def test_contrastive_memory_loss_by_hand():
    query = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    keys = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.8, 0.6]])
    # q0 (class 0): k0 is itself (s = 1, left out), k1 positive 1 - 0.6, k2 negative 0.8 - 0.5;
    # q1 (class 1): k0 negative s = 0 (inactive), k1 negative 0.8 - 0.5, k2 positive 1 - 0.6
    loss = contrastive_memory_loss(query, torch.tensor([0, 1]), keys, torch.tensor([0, 0, 1]))
    assert loss.item() == pytest.approx((0.4 + 0.3 + 0.3 + 0.4) / 2)


def unit(s: float) -> list[float]:
    """A 2-d unit key at cosine s to the query (1, 0)."""
    return [s, math.sqrt(1 - s * s)]


def test_cbml_memory_loss_by_hand():
    query = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    keys = torch.tensor([[1.0, 0.0], unit(0.8), unit(0.3), unit(0.5), unit(-0.2)])
    key_labels = torch.tensor([0, 0, 0, 1, 1])
    # q0 (class 0): k0 is itself (s = 1, left out); P = {0.8, 0.3}, N = {0.5, -0.2}
    # mu = 0.1 * 0.55 + 0.9 * 0.15 = 0.19; V = (0.5 - 0.19)^2 + (-0.2 - 0.19)^2 = 0.2482
    # mined: positives with s - 0.1 < 0.5 -> {0.3}; negatives with s + 0.1 > 0.3 -> {0.5}
    # L_0 = log(1 + e^{-(0.3 - 0.5)/0.5}) + log(1 + e^{(0.5 - 1)/0.01}) + V; q1 (class 2) has no positive: 0
    expected = math.log1p(math.exp(0.4)) + math.log1p(math.exp(-50)) + 0.2482
    loss = cbml_loss(query, torch.tensor([0, 2]), keys, key_labels)
    assert loss.item() == pytest.approx(expected / 2, rel=1e-5)
    mean = cbml_loss(query, torch.tensor([0, 2]), keys, key_labels, variance="mean")
    assert mean.item() == pytest.approx((expected - 0.2482 / 2) / 2, rel=1e-5)


def test_the_paper_memory_term_is_cbml_and_its_gradient_share_is_logged():
    torch.manual_seed(0)
    model = MetricLearning(backbone="small_cnn", in_chans=1, embedding_dim=8, labels="pseudo", memory_loss="cbml")
    model.set_pseudo_labels(torch.arange(16) % 4, torch.zeros(4, 8),
                            embedding=torch.nn.functional.normalize(torch.randn(16, 8), dim=1))
    logged = {}
    model.log_terms = lambda terms, embedding=None: logged.update(terms)
    batch = {"views": [torch.randn(8, 1, 8, 8)], "index": torch.arange(8), "target": torch.full((8,), -1)}
    model.train()
    loss = model.training_step(batch, 0)
    assert loss.item() == pytest.approx((logged["ms"] + logged["memory"]).item(), rel=1e-5)
    assert logged["memory"] > 0
    assert (logged["grad_share/ms"] + logged["grad_share/memory"]).item() == pytest.approx(1.0)
    assert logged["grad_share/memory"] > 0.05
    with pytest.raises(ValueError, match="cbml_variance"):
        MetricLearning(backbone="small_cnn", in_chans=1, embedding_dim=8, cbml_variance="max")


def positional_flip_batch(batch: int = 16, size: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """A map whose channels say where each point is (one-hot positions) plus 4 noise channels; the
    target is the map mirrored left-right, which only moving points can produce."""
    n = size * size
    positions = torch.eye(n).view(n, size, size).expand(batch, n, size, size)
    fmap = torch.cat([torch.randn(batch, 4, size, size), positions], 1)
    return fmap, fmap.flip(-1)


def test_each_terms_share_of_the_gradient_at_the_assembly_is_logged():
    """train/grad_share_assembly/<term>: the metric loss and the regularisers all reach w; the shares sum to
    1, and a regulariser weighted 0 has share 0."""
    torch.manual_seed(0)
    batch = {"views": [torch.randn(8, 1, 8, 8)], "index": torch.arange(8), "target": torch.arange(8) % 4}
    shares = {}
    for entropy_weight in (0.01, 0.0):
        model = small_san(loss="proxy_anchor", num_classes=4, memory_weight=0.0, entropy_weight=entropy_weight)
        logged = {}
        model.log_terms = lambda terms, embedding=None, into=logged: into.update(terms)
        model.train()
        model.training_step(batch, 0)
        shares[entropy_weight] = {k.split("/")[1]: v.item() for k, v in logged.items()
                                  if k.startswith("grad_share_assembly/")}
    assert set(shares[0.01]) == {"proxy_anchor", "entropy", "correlation", "coherence"}
    assert sum(shares[0.01].values()) == pytest.approx(1.0)
    assert shares[0.01]["proxy_anchor"] > 0 and shares[0.01]["entropy"] > 0
    assert shares[0.0]["entropy"] == 0.0 and shares[0.0]["proxy_anchor"] > shares[0.01]["proxy_anchor"]


def train_to_flip(lambdas: dict[str, float], steps: int = 150) -> tuple[float, float, float]:
    """(first task loss, last task loss, share of moved output points) of a SpatialAssembly at its identity
    start (β0 = 8, learnable), trained with Adam on ‖G − mirror(F)‖² + Σ λ·regulariser."""
    torch.manual_seed(0)
    module = SpatialAssembly(20, 4, 4, Assembly(stage="x", hidden=32))
    optimizer = torch.optim.Adam(module.parameters(), lr=1e-3)
    first = None
    for _ in range(steps):
        fmap, target = positional_flip_batch()
        task = (module(fmap) - target).square().mean()
        w = module.last[0]
        regs = {"entropy": assembly_entropy(w), "correlation": assembly_correlation(w),
                "coherence": local_coherence(w, fmap)}
        loss = task + sum(lambdas[k] * v for k, v in regs.items())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        first = task.item() if first is None else first
    return first, task.item(), assembly_diagnostics(w)["san_moved"].item()


def test_the_assembly_leaves_its_identity_start_where_moving_pays():
    """With the shipped λ's the assembly learns to move points (measured: 70% moved, task loss 0.50 ->
    0.19); at λ1 = 0.1 the entropy term pins it at the identity (0% moved, loss stays 0.52)."""
    first, last, moved = train_to_flip(small_san().lambdas)
    assert moved > 0.4 and last < 0.6 * first
    _, pinned_last, pinned = train_to_flip({**small_san().lambdas, "entropy": 0.1})
    assert pinned == 0.0 and pinned_last > 0.9 * first


def test_the_share_of_moved_points_is_reported_by_validation():
    model = small_san()
    model.eval()
    model.on_validation_epoch_start()
    assert model.validation_extras() == {}
    with torch.no_grad():
        model(torch.randn(4, 1, 8, 8))
    assert model.validation_extras()["val/san_moved"] == 0.0  # identity start
    assert model.validation_extras()["val/san_diagonal"] > 0.99
    model.san.beta.data.fill_(-20.0)  # a prior against staying: every point moves
    model.on_validation_epoch_start()
    with torch.no_grad():
        model(torch.randn(4, 1, 8, 8))
    assert model.validation_extras()["val/san_moved"] == 1.0


def test_bench_times_san_and_the_bare_backbone_on_the_same_batch():
    from experiments.bench import SAN_QUICK, _san_case

    for enabled in (False, True):
        rate, peak = _san_case(enabled, SAN_QUICK)
        assert rate > 0 and peak >= 0


def test_a_fit_on_hidden_labels_stops_before_training_and_names_the_flag(tmp_path):
    import lightning as L

    from datamodules.digits import DigitsDataModule

    model = MetricLearning(backbone="small_cnn", in_chans=1, embedding_dim=8, memory_weight=0.0)
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, default_root_dir=tmp_path)
    with pytest.raises(ValueError, match="supervised=true"):
        trainer.fit(model, datamodule=DigitsDataModule(train_transform="digits", image_size=8))


# -- centred features (EmbeddingModule.center_features, shared with TAC-CCL and ROUL) -------------------
def mean_cosine(z: torch.Tensor) -> float:
    """Mean cosine over the distinct pairs of unit rows."""
    n = len(z)
    return float(((z @ z.T).sum() - n) / (n * (n - 1)))


@pytest.mark.parametrize("seed", range(3))
def test_centring_spreads_a_random_trunks_embeddings_out_of_their_cone(seed):
    """A random small_cnn maps 64 random images into one narrow cone (mean cosine 0.99, seeds 0-4); centred
    features spread them (about -0.01), so the MS and memory terms see angles to work on."""
    x = torch.rand(64, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    cosines = {}
    for centred in (False, True):
        torch.manual_seed(seed)
        model = SAN(backbone="small_cnn", embedding_dim=32, labels="pseudo", memory_loss="cbml",
                    center_features=centred, assembly=Assembly(enabled=False))
        cosines[centred] = mean_cosine(model(x))
    assert cosines[False] > 0.9 and abs(cosines[True]) < 0.1, cosines


def test_the_key_network_centres_as_the_query_network_does():
    """The momentum key network copies the centring: at the start (key = query, both in training mode) the
    keys equal the queries; keys from uncentred features would sit in the cone the queries left."""
    torch.manual_seed(0)
    model = SAN(backbone="small_cnn", embedding_dim=32, labels="pseudo", memory_loss="cbml",
                center_features=True, assembly=Assembly(enabled=False)).train()
    x = torch.rand(16, 3, 32, 32)
    torch.testing.assert_close(model.key_embed(x), model(x).float())
    assert mean_cosine(model.key_embed(x)) < 0.5


def test_ema_moves_a_parameter_free_module_by_its_buffers():
    """The centring BatchNorm has no parameters: the key network's copy takes its running statistics."""
    source, target = torch.nn.BatchNorm1d(4, affine=False), torch.nn.BatchNorm1d(4, affine=False)
    source(torch.randn(32, 4) + 3.0)
    ema_update(target, source, 0.99)
    torch.testing.assert_close(target.running_mean, source.running_mean)
    assert source.running_mean.abs().min() > 0.1
