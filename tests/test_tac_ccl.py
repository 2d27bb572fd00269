"""TAC-CCL: the losses on hand-computed cases, the shared warp of image and attention map, cross-image
matching on a known shift, and frozen BatchNorm through a fit with validation."""
import math

import lightning as L
import numpy as np
import pytest
import torch
from torch import nn

from callbacks.pseudo_labels import KMeansPseudoLabels
from datamodules.base import EmbeddingDataModule, Records
from lightning_modules.backbones import build_backbone
from lightning_modules.homography import (
    TransformRanges,
    apply_homography,
    cell_centers,
    homography_from_points,
    sample_homographies,
    warp,
)
from lightning_modules.losses.clustering import contrastive_clustering_loss
from lightning_modules.losses.pairs import multi_similarity_loss
from lightning_modules.tac_ccl import (
    TACCCL,
    CrossPairs,
    SecondView,
    attention_consistency,
    feature_similarity_loss,
    gradient_shares,
    keypoint_mask,
    match_in_batch,
    ransac_affine,
)


# -- losses -------------------------------------------------------------------------------------------
def test_contrastive_clustering_loss_hand_computed():
    centers = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    # (0.6, 0.8): d = sqrt(.8), sqrt(.4), sqrt(3.2) -> nearest c1 (sqrt .4), second c0 (sqrt .8):
    # ratio sqrt(1/2)
    # (0, -1): d = sqrt2, 2, sqrt2 -> a tie between c0 and c2: ratio 1
    f = torch.tensor([[0.6, 0.8], [0.0, -1.0]], requires_grad=True)
    loss = contrastive_clustering_loss(f, centers)
    assert loss.item() == pytest.approx((math.sqrt(0.5) + 1.0) / 2, abs=1e-6)
    loss.backward()
    assert f.grad.abs().sum() > 0
    # assigned: sample 0 belongs to c0 -> d+ = sqrt(.8), d- = nearest other = c1, sqrt(.4): ratio sqrt 2
    assigned = contrastive_clustering_loss(f.detach(), centers, torch.tensor([0, 2]))
    assert assigned.item() == pytest.approx((math.sqrt(2.0) + 1.0) / 2, abs=1e-6)


def test_contrastive_clustering_loss_leaves_the_centres_alone():
    centers = torch.randn(5, 3, requires_grad=True)
    contrastive_clustering_loss(torch.randn(4, 3, requires_grad=True), centers).backward()
    assert centers.grad is None


def test_feature_similarity_loss_squared_and_plain_norm_hand_computed():
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]], requires_grad=True)
    b = torch.tensor([[0.6, 0.8], [0.0, 1.0]])
    # pair 0: F - F' = (0.4, -0.8), |.|^2 = 0.8; pair 1 agrees: 0
    assert feature_similarity_loss(a, b, "squared").item() == pytest.approx(0.4)
    assert feature_similarity_loss(a, b, "norm").item() == pytest.approx(math.sqrt(0.8) / 2)
    # the plain norm's gradient has length 1/2 (1/B) whatever the distance; the squared one shrinks with it
    near = torch.tensor([[1.0, 0.0]], requires_grad=True)
    for distance, squared_grad in ((0.1, 0.2), (0.01, 0.02)):
        feature_similarity_loss(near, torch.tensor([[1.0, distance]]), "norm").backward()
        assert near.grad.norm().item() == pytest.approx(1.0, rel=1e-5)
        near.grad = None
        feature_similarity_loss(near, torch.tensor([[1.0, distance]]), "squared").backward()
        assert near.grad.norm().item() == pytest.approx(squared_grad, rel=1e-5)
        near.grad = None
    with pytest.raises(ValueError, match="norm, squared"):
        feature_similarity_loss(a, b, "cube")


def test_feature_loss_defaults_to_the_dissertations_plain_norm():
    """L_F = mean ‖F − F'‖ (docs/methods/tac_ccl.md), unsquared, in the function and in the module."""
    a, b = torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[0.6, 0.8], [0.0, 1.0]])
    assert feature_similarity_loss(a, b).item() == pytest.approx(math.sqrt(0.8) / 2)
    assert TACCCL(backbone="small_cnn", in_chans=1, embedding_dim=8).feature_loss == "norm"


def test_gradient_shares_hand_computed():
    x = torch.ones(4, requires_grad=True)
    y = x * 3
    # d(2 Σy)/dy = 2, d(Σy²/2)/dy = y = 3, a constant reaches nothing: norms 4, 6, 0 over 4 entries
    shares = gradient_shares({"a": 2 * y.sum(), "b": y.square().sum() / 2, "c": torch.tensor(1.0)}, y)
    assert shares["a"].item() == pytest.approx(0.4) and shares["b"].item() == pytest.approx(0.6)
    assert shares["c"].item() == 0.0
    y.sum().backward()  # the graph survives for the training backward
    assert torch.equal(x.grad, torch.full((4,), 3.0))


def test_tac_terms_average_self_and_cross_pairs_over_the_whole_batch():
    model = TACCCL(backbone="small_cnn", in_chans=1, embedding_dim=8, cross=CrossPairs(sigma=100.0))
    identity = torch.eye(3).repeat(4, 1, 1)
    anchor = torch.zeros(4, 1, 2, 2)
    second = torch.ones(4, 1, 2, 2)  # every pair differs by 1 in each of its 4 cells: 4 per pair
    cross = torch.tensor([True, False, False, False])
    points = torch.zeros(4, 1, 2)  # one keypoint in the middle; sigma 100 cells: the mask is ~1 everywhere
    view = SecondView(torch.zeros(4, 1, 8, 8), identity, cross, points, points, torch.ones(4, 1))
    terms = model.tac_terms(anchor, second, view)
    # batch mean: the cross pair gives 4/4 = 1, the three self pairs 12/4 = 3 (not 4 and 4 over own pairs)
    assert terms["tac_cross"].item() == pytest.approx(1.0, rel=1e-3)
    assert terms["tac_self"].item() == pytest.approx(3.0)


def test_training_step_forwards_both_views_in_one_batch():
    model = TACCCL(backbone="small_cnn", in_chans=1, embedding_dim=8, memory_weight=0.0,
                   cross=CrossPairs(probability=0.0))
    model.set_pseudo_labels(torch.tensor([0, 0, 1, 1]), torch.randn(2, 8))
    sizes = []
    model.trunk.net.register_forward_pre_hook(lambda module, inputs: sizes.append(len(inputs[0])))
    loss = model.training_step({"views": [torch.randn(4, 1, 8, 8)], "index": torch.arange(4)}, 0)
    assert torch.isfinite(loss) and sizes == [8]  # one trunk pass over anchor and second view together


def offline_batch(n: int = 4) -> dict:
    """A batch as callbacks.cross_pairs delivers it: items 0 and 2 are cross items with 3 keypoints."""
    points = torch.tensor([[-0.5, -0.5], [0.25, 0.0], [0.5, 0.75]]).expand(n, 2, 3, 2)
    return {"views": [torch.randn(n, 1, 8, 8)], "index": torch.arange(n),
            "cross": torch.arange(n) % 2 == 0, "cross_views": torch.randn(n, 2, 1, 8, 8),
            "cross_points": points, "cross_weights": torch.ones(n, 3),
            "cross_affine": torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]).expand(n, 2, 3)}


def test_keypoint_masks_stay_fp32_in_a_bf16_autocast_step():
    """Γ is an einsum of Gaussians: autocast would round it to bf16 (3 digits); it is computed in fp32."""
    torch.manual_seed(0)
    model = TACCCL(backbone="small_cnn", in_chans=1, embedding_dim=8, memory_weight=0.0,
                   cross=CrossPairs(matching="offline", clamp_mask=False))
    model.set_pseudo_labels(torch.tensor([0, 0, 1, 1]), torch.randn(2, 8))
    masks = []
    inner = model.keypoint_mask
    model.keypoint_mask = lambda *args: masks.append(inner(*args)) or masks[-1]
    model.log_terms = lambda terms, embedding=None: None
    batch = offline_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.isfinite(model.training_step(batch, 0))
    assert len(masks) == 2 and all(m.dtype == torch.float32 for m in masks)
    # against a float64 evaluation of Eq. 4.4-4.5 at the cells (4x4 grid, σ = 1 cell)
    points = batch["cross_points"][:, 0].double()
    u, v = (points[..., 0] + 1) * 2 - 0.5, (points[..., 1] + 1) * 2 - 0.5
    cells = torch.arange(4, dtype=torch.float64)
    expected = torch.exp(-(cells[None, None, :, None] - v[..., None, None]).square() / 2
                         - (cells[None, None, None, :] - u[..., None, None]).square() / 2).sum(1)
    assert torch.allclose(masks[0][:, 0].double(), expected, rtol=1e-6, atol=1e-7)


def test_in_batch_matching_updates_batchnorm_statistics_once_a_step():
    """The matching pass reads the trunk's cells with batch statistics but leaves the running ones (and the
    batch count) to the training forward: one BatchNorm update per step."""
    torch.manual_seed(0)
    model = TACCCL(backbone="small_cnn", in_chans=1, embedding_dim=8, memory_weight=0.0,
                   cross=CrossPairs(matching="in_batch", probability=1.0, min_inliers=3))
    model.set_pseudo_labels(torch.tensor([0, 0, 1, 1]), torch.randn(2, 8))
    model.log_terms = lambda terms, embedding=None: None
    norms = [m for m in model.trunk.modules() if isinstance(m, nn.BatchNorm2d)]
    passes = []
    model.trunk.net.register_forward_pre_hook(lambda module, inputs: passes.append(len(inputs[0])))
    images = torch.randn(4, 1, 8, 8)
    for step in (1, 2):
        model.training_step({"views": [images], "index": torch.arange(4)}, step)
        assert all(m.num_batches_tracked.item() == step for m in norms)
    assert passes == [4, 8, 4, 8]  # the matching pass does run (then the two views together)


def test_offline_matching_without_the_callback_names_the_fix():
    model = TACCCL(backbone="small_cnn", in_chans=1, embedding_dim=8, cross=CrossPairs(matching="offline"))
    model.set_pseudo_labels(torch.tensor([0, 0, 1, 1]), torch.randn(2, 8))
    with pytest.raises(RuntimeError, match="OfflineCrossPairs"):
        model.training_step({"views": [torch.randn(4, 1, 8, 8)], "index": torch.arange(4)}, 0)
    with pytest.raises(ValueError, match="offline or in_batch"):
        TACCCL(backbone="small_cnn", in_chans=1, embedding_dim=8, cross=CrossPairs(matching="sift"))


def test_every_term_logs_its_share_of_the_gradient():
    torch.manual_seed(0)
    model = TACCCL(backbone="small_cnn", in_chans=1, embedding_dim=8, cross=CrossPairs(matching="offline"))
    embedding = torch.nn.functional.normalize(torch.randn(4, 8), dim=1)
    model.set_pseudo_labels(torch.tensor([0, 0, 1, 1]), torch.randn(2, 8), embedding)
    logged = {}
    model.log_terms = lambda terms, embedding=None: logged.update(terms)
    model.training_step(offline_batch(), 0)
    shares = {k[len("grad_share/"):]: v.item() for k, v in logged.items() if k.startswith("grad_share/")}
    assert set(shares) == {"ms", "ms_memory", "ccl", "tac", "feature"}
    assert sum(shares.values()) == pytest.approx(1.0) and shares["ccl"] > 0 and shares["tac"] > 0


def test_multi_similarity_loss_hand_computed():
    # a = (1, 0), b = (0.6, 0.8) share label 0, c = (0, 1) has label 1: s_ab = .6, s_bc = .8, s_ac = 0.
    # a: its positive b (.6) is easier than margin below the hardest negative (0) -> skipped.
    # b: positive a kept (.5 < .8), negative c kept (.9 > .6). c: no positive -> skipped. Divide by B = 3.
    z = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])
    labels = torch.tensor([0, 0, 1])
    expected = (0.5 * math.log1p(math.exp(-0.2)) + math.log1p(math.exp(12.0)) / 40) / 3
    loss = multi_similarity_loss(z, labels)
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_multi_similarity_loss_against_a_memory_has_no_diagonal():
    # keys are not the queries: memory row 0 (label 0, s = .6) is a positive although it sits at index 0
    z = torch.tensor([[1.0, 0.0]])
    memory = torch.tensor([[0.6, 0.8], [0.8, 0.6]])
    loss = multi_similarity_loss(z, torch.tensor([0]), memory, torch.tensor([0, 1]))
    expected = 0.5 * math.log1p(math.exp(-2 * 0.1)) + math.log1p(math.exp(40 * 0.3)) / 40
    assert loss.item() == pytest.approx(expected, rel=1e-6)


# -- geometry -----------------------------------------------------------------------------------------
def _blob(center: torch.Tensor, size: int, width: float) -> torch.Tensor:
    """(1, 1, size, size) Gaussian blob at a normalised point."""
    points = cell_centers(size, size)
    d2 = (points - center).square().sum(1)
    return torch.exp(-d2 / (2 * width**2)).reshape(1, 1, size, size)


def _argmax_point(t: torch.Tensor) -> torch.Tensor:
    h, w = t.shape[-2:]
    return cell_centers(h, w)[t.flatten().argmax()]


def test_warp_maps_a_known_point_to_the_same_place_in_image_and_attention_map():
    quarter_turn = torch.tensor([[[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]])
    q = cell_centers(8, 8)[1 * 8 + 5]  # row 1, column 5 of an 8x8 attention grid
    expected = apply_homography(torch.linalg.inv(quarter_turn), q[None, None])[0, 0]  # where q appears in x'
    image, attention = _blob(q, 64, 0.05), _blob(q, 8, 0.05)
    warped_image, image_valid = warp(image, quarter_turn, (64, 64))
    warped_map, map_valid = warp(attention, quarter_turn, (8, 8))
    assert torch.allclose(_argmax_point(warped_image), expected, atol=2 / 64)
    assert torch.allclose(_argmax_point(warped_map), expected, atol=1e-6)
    assert warped_map.max() == pytest.approx(1.0)
    assert image_valid.all() and map_valid.all()


@pytest.mark.parametrize("kind", ["crop", "zoom", "rotation", "perspective"])
def test_every_transform_kind_moves_image_and_map_together(kind):
    generator = torch.Generator().manual_seed(3)
    h = sample_homographies(1, TransformRanges(kinds=[kind]), generator)
    q = torch.tensor([0.1, -0.2])
    p = apply_homography(torch.linalg.inv(h), q[None, None])[0, 0]  # q's place in the second view
    warped_image, _ = warp(_blob(q, 64, 0.08), h, (64, 64))
    warped_map, _ = warp(_blob(q, 16, 0.15), h, (16, 16))
    assert torch.allclose(_argmax_point(warped_image), p, atol=2 * 2 / 64)
    assert torch.allclose(_argmax_point(warped_map), _argmax_point(warped_image), atol=2 / 16)


def test_zoom_out_marks_the_border_invalid():
    zoom_out = torch.diag(torch.tensor([1.5, 1.5, 1.0]))[None]  # second-view points map 1.5x farther out
    _, valid = warp(torch.ones(1, 1, 6, 6), zoom_out, (6, 6))
    assert valid[0, 0, 0, 0] == 0 and valid[0, 0, 2, 2] == 1


def test_homography_from_points_hits_the_four_targets():
    source = torch.tensor([[[-1.0, -1.0], [1.0, -1.0], [1.0, 1.0], [-1.0, 1.0]]])
    target = source + torch.tensor([[[0.1, 0.0], [-0.1, 0.2], [0.0, -0.1], [0.15, 0.05]]])
    assert torch.allclose(apply_homography(homography_from_points(source, target), source), target, atol=1e-5)


def test_attention_consistency_is_zero_for_consistent_maps_and_counts_cells():
    h = sample_homographies(2, TransformRanges(kinds=["rotation"]), torch.Generator().manual_seed(0))
    anchor = torch.rand(2, 1, 7, 7)
    second, _ = warp(anchor, h, (7, 7))
    ones = torch.ones(2, 1, 7, 7)
    aligned = torch.ones(2, dtype=torch.bool)
    assert attention_consistency(anchor, second, h, ones, ones, aligned).abs().max() < 1e-6
    literal = attention_consistency(torch.ones_like(anchor), torch.zeros_like(anchor), h, ones, ones,
                                    ~aligned)
    assert torch.allclose(literal, torch.full((2,), 49.0))


def test_keypoint_mask_peaks_at_the_keypoint_cell():
    point = cell_centers(7, 7)[2 * 7 + 4][None, None]  # row 2, column 4
    mask = keypoint_mask(point, torch.ones(1, 1), (7, 7), sigma=1.0, clamp=True)
    assert mask[0, 0, 2, 4] == pytest.approx(1.0)
    assert mask[0, 0, 2, 5] == pytest.approx(math.exp(-0.5), rel=1e-5)


# -- cross-image matching -----------------------------------------------------------------------------
def test_ransac_recovers_an_affine_despite_outliers():
    generator = torch.Generator().manual_seed(0)
    source = torch.rand(1, 30, 2, generator=generator) * 2 - 1
    true = torch.tensor([[0.9, 0.1], [-0.2, 1.1], [0.05, -0.1]])  # [x y 1] @ true
    target = torch.cat([source, torch.ones(1, 30, 1)], -1) @ true
    target[:, :8] += 0.7  # outliers
    affine, inliers = ransac_affine(source, target, torch.ones(1, 30, dtype=torch.bool), 0.05, 64, generator)
    assert torch.allclose(affine[0], true, atol=1e-4)
    assert inliers[0, 8:].all() and not inliers[0, :8].any()


def test_match_in_batch_finds_the_shifted_copy_of_an_image():
    generator = torch.Generator().manual_seed(0)
    size = (6, 6)
    first = torch.nn.functional.normalize(torch.randn(6, 6, 16, generator=generator), dim=-1)
    shifted = torch.roll(first, shifts=1, dims=1)  # content one cell right: partner x = anchor x + 1 cell
    stranger = torch.nn.functional.normalize(torch.randn(6, 6, 16, generator=generator), dim=-1)
    descriptors = torch.stack([first, shifted, stranger, first]).flatten(1, 2)
    labels, index = torch.tensor([0, 0, 0, 1]), torch.tensor([10, 11, 12, 10])
    found = match_in_batch(descriptors, labels, index, size, CrossPairs(min_inliers=10), generator)
    assert found.partner[0] == 1 and found.partner[1] == 0
    assert found.partner[3] == -1  # alone in its pseudo class (a copy of image 10 is not a partner)
    expected = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-2 / 6, 0.0]])  # partner -> anchor: one cell left
    assert torch.allclose(found.affine[0], expected, atol=1e-4)
    assert found.inliers[0].sum() >= 25  # all but the wrapped-around column


# -- network ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, size, grid", [("small_cnn", 8, 4), ("resnet18", 64, 2)])
def test_trunk_feature_map_averages_to_the_pooled_features(name, size, grid):
    trunk, dim = build_backbone(name, in_chans=1)
    trunk.eval()
    x = torch.randn(2, 1, size, size)
    fmap = trunk.feature_map(x)
    assert fmap.shape == (2, dim, grid, grid)
    assert torch.allclose(fmap.mean((2, 3)), trunk(x), atol=1e-5)


def test_attention_map_shape_and_range():
    model = TACCCL(backbone="small_cnn", in_chans=1, embedding_dim=8)
    z, attention, _ = model.attend(torch.randn(3, 1, 8, 8))
    assert z.shape == (3, 8) and torch.allclose(z.norm(dim=1), torch.ones(3))
    assert attention.shape == (3, 1, 4, 4) and 0 < attention.min() and attention.max() < 1


# -- frozen BatchNorm across a fit with validation -----------------------------------------------------
class Noise(EmbeddingDataModule):
    """24 random 32x32 RGB images of 4 classes: a train and a query split."""

    name = "noise"
    protocols = ("unseen",)

    def read_records(self) -> dict[str, Records]:
        images = np.random.default_rng(0).integers(0, 256, (24, 32, 32, 3), dtype=np.uint8)
        targets = np.repeat(np.arange(4), 6)
        return {"train": Records(images[:12], targets[:12]), "test": Records(images[12:], targets[12:])}


class BatchNormProbe(L.Callback):
    """Records, at every training batch, whether any trunk BatchNorm is in training mode."""

    def __init__(self):
        self.modes: list[bool] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.modes.append(any(m.training for m in pl_module.trunk.modules() if isinstance(m, nn.BatchNorm2d)))


def test_googlenet_batchnorm_stays_frozen_across_a_fit_with_validation():
    L.seed_everything(0)
    model = TACCCL(backbone="googlenet", frozen_bn=True, embedding_dim=16, tac_weight=0.0, feature_weight=0.0)
    bns = [m for m in model.trunk.modules() if isinstance(m, nn.BatchNorm2d)]
    before = [(bn.running_mean.clone(), bn.running_var.clone(), bn.weight.clone()) for bn in bns]
    attention_before = model.attention.spatial.weight.detach().clone()
    probe = BatchNormProbe()
    data = Noise(protocol="unseen", batch_size=10, eval_batch_size=12, sampler="pk", samples_per_class=5,
                 image_size=32, train_transform="weak", eval_transform="plain")
    trainer = L.Trainer(accelerator="cpu", max_epochs=2, limit_train_batches=1, num_sanity_val_steps=0,
                        logger=False, enable_progress_bar=False, enable_checkpointing=False,
                        enable_model_summary=False, callbacks=[KMeansPseudoLabels(num_clusters=2), probe])
    trainer.fit(model, data)
    assert probe.modes == [False, False]  # the second batch comes after a validation loop's train() call
    for bn, (mean, var, weight) in zip(bns, before):
        assert torch.equal(bn.running_mean, mean) and torch.equal(bn.running_var, var)
        assert not torch.equal(bn.weight, weight)  # statistics frozen, affine parameters train
    assert not torch.equal(model.attention.spatial.weight, attention_before)  # the rest trained
