"""Offline keypoint matching (dissertation §4.3.4): real OpenCV SIFT + RANSAC on a hand-built image pair whose
affine is known, an unrelated image that must stay unmatched, the crop-frame affine, and the cache."""
import cv2
import lightning as L
import numpy as np
import pytest
import torch

from callbacks.cross_pairs import (
    CrossPairCrops,
    OfflineCrossPairs,
    PairTable,
    cache_key,
    match_keypoints,
    mine_pairs,
    sift_keypoints,
)
from callbacks.pseudo_labels import KMeansPseudoLabels
from datamodules.base import EmbeddingDataModule, Records
from lightning_modules.tac_ccl import TACCCL, CrossPairs


def texture(seed: int, size: int = 256) -> np.ndarray:
    """A smooth random texture (uint8, size x size): many well-localised SIFT blobs."""
    noise = np.random.default_rng(seed).random((size // 8, size // 8)).astype(np.float32)
    image = cv2.GaussianBlur(cv2.resize(noise, (size, size), interpolation=cv2.INTER_CUBIC), (0, 0), 1.5)
    return np.round(255 * (image - image.min()) / (image.max() - image.min())).astype(np.uint8)


# rotate 12 degrees, scale 0.9, shift (30, -10) px: a point p of the original appears at WARP @ [p, 1]
_theta = np.deg2rad(12.0)
WARP = np.array([[0.9 * np.cos(_theta), -0.9 * np.sin(_theta), 30.0],
                 [0.9 * np.sin(_theta), 0.9 * np.cos(_theta), -10.0]], np.float32)


@pytest.fixture(scope="module")
def images():
    original = texture(0)
    return original, cv2.warpAffine(original, WARP, (256, 256)), texture(1)


def test_ransac_recovers_the_applied_affine(images):
    original, warped, _ = images
    match = match_keypoints(sift_keypoints(original), sift_keypoints(warped))
    assert match.inliers >= 100
    expected = cv2.invertAffineTransform(WARP)  # the match maps the warped image's pixels to the original's
    assert np.allclose(match.affine[:, :2], expected[:, :2], atol=0.01)
    assert np.allclose(match.affine[:, 2], expected[:, 2], atol=1.0)  # pixels
    mapped = match.points_b @ match.affine[:, :2].T + match.affine[:, 2]
    assert np.abs(mapped - match.points_a).max() < 5.0  # every inlier within the RANSAC threshold


def test_an_unrelated_image_gets_fewer_than_the_minimum_inliers(images):
    original, _, stranger = images
    match = match_keypoints(sift_keypoints(original), sift_keypoints(stranger))
    assert match is None or match.inliers < 20


def test_mine_pairs_keeps_matched_partners_within_a_cluster_and_maps_crop_points(images):
    original, warped, stranger = images
    table = mine_pairs([original, warped, stranger, original], np.array([0, 0, 0, 1]), top_k=2,
                       min_inliers=20)
    assert table.partner[0].tolist() == [1, -1] and table.partner[1].tolist() == [0, -1]
    assert (table.partner[2] == -1).all()  # unrelated
    assert (table.partner[3] == -1).all()  # its copy sits in another cluster: never a candidate
    assert table.precision(np.array([5, 5, 7, 5])) == 100.0
    assert table.precision(np.array([5, 6, 7, 5])) == 0.0
    # the crop-frame affine carries the partner's normalised keypoints onto the image's own
    m = table.point_count[0, 0]
    affine = table.affine[0, 0]
    mapped = table.points_partner[0, 0, :m] @ affine[:, :2].T + affine[:, 2]
    pixels = (table.box_self[0, 0, 2:] - table.box_self[0, 0, :2]) / 2  # pixels per normalised unit
    assert np.abs((mapped - table.points_self[0, 0, :m]) * pixels).max() < 5.0


def test_pair_table_round_trips_through_the_cache_file(tmp_path, images):
    original, warped, _ = images
    table = mine_pairs([original, warped], np.array([0, 0]), top_k=1, min_inliers=20)
    table.save(tmp_path / "pairs.npz")
    loaded = PairTable.load(tmp_path / "pairs.npz")
    assert all(np.array_equal(getattr(table, k), getattr(loaded, k)) for k in PairTable.__dataclass_fields__)
    key = cache_key([original, warped], np.array([0, 0]), {"min_inliers": 20})
    assert key != cache_key([original, warped], np.array([0, 1]), {"min_inliers": 20})
    assert key != cache_key([original, warped], np.array([0, 0]), {"min_inliers": 30})


def test_cross_pair_crops_flip_both_crops_and_keep_the_affine_consistent(images):
    original, warped, _ = images
    table = mine_pairs([original, warped], np.array([0, 0]), top_k=1, min_inliers=20)
    crops = CrossPairCrops(Records(np.stack([original, warped]), np.array([0, 0])), table, probability=1.0,
                           size=32, mean=[0.5], std=[0.5])
    flips = set()
    for seed in range(8):
        item = crops(0, seed)
        assert item["cross"] and item["cross_views"].shape == (2, 1, 32, 32)
        m = int(item["cross_weights"].sum())
        own, partner = item["cross_points"][0, :m].numpy(), item["cross_points"][1, :m].numpy()
        affine = item["cross_affine"].numpy()
        mapped = partner @ affine[:, :2].T + affine[:, 2]
        assert np.abs(mapped - own).max() < 0.05  # normalised crop units, flipped or not
        flips.add(bool(np.sign(own[0, 0]) != np.sign(table.points_self[0, 0, 0, 0])))
    assert flips == {True, False}  # both crops mirrored together half the time
    never = CrossPairCrops(Records(np.stack([original, warped]), np.array([0, 0])), table, probability=0.0,
                           size=32, mean=[0.5], std=[0.5])
    assert not never(0, 0)["cross"] and never(0, 0)["cross_views"].abs().sum() == 0


def test_training_step_uses_the_offline_cross_items():
    model = TACCCL(backbone="small_cnn", in_chans=1, embedding_dim=8, memory_weight=0.0)
    model.set_pseudo_labels(torch.tensor([0, 0, 1, 1]), torch.randn(2, 8))
    points = torch.zeros(4, 2, 3, 2)
    batch = {"views": [torch.randn(4, 1, 8, 8)], "index": torch.arange(4),
             "cross": torch.tensor([True, False, True, False]), "cross_views": torch.randn(4, 2, 1, 8, 8),
             "cross_points": points, "cross_weights": torch.ones(4, 3),
             "cross_affine": torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]).expand(4, 2, 3)}
    seen = []
    model.trunk.net.register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0].clone()))
    assert torch.isfinite(model.training_step(batch, 0))
    assert len(seen) == 1  # no in-batch matching pass: the pairs came with the batch
    both = seen[0]
    assert torch.equal(both[0], batch["cross_views"][0, 0]) and torch.equal(both[1], batch["views"][0][1])
    assert torch.equal(both[4], batch["cross_views"][0, 1])  # second view of a cross item: the partner crop


class Warps(EmbeddingDataModule):
    """Eight 64x64 rotated, scaled copies of one texture (train) and four textures (test)."""

    name = "warps"
    protocols = ("unseen",)
    mean, std = (0.5,), (0.5,)

    def read_records(self) -> dict[str, Records]:
        base = cv2.resize(texture(0), (64, 64), interpolation=cv2.INTER_AREA)
        warps = [cv2.warpAffine(base, cv2.getRotationMatrix2D((32, 32), angle, 1.1), (64, 64),
                                borderMode=cv2.BORDER_REFLECT) for angle in range(-12, 12, 3)]
        test = [cv2.resize(texture(s), (64, 64), interpolation=cv2.INTER_AREA) for s in (1, 2, 3, 4)]
        return {"train": Records(np.stack(warps), np.zeros(8, np.int64)),
                "test": Records(np.stack(test), np.array([0, 0, 1, 1]))}


def fit_with_offline_pairs(tmp_path, **losses) -> tuple[OfflineCrossPairs, list[float]]:
    """One training batch on `Warps` with the pairs callback reading the module's cross probability;
    returns the callback and each batch's share of cross items (-1: the batch carried none)."""
    L.seed_everything(0)
    model = TACCCL(backbone="small_cnn", in_chans=1, embedding_dim=8,
                   cross=CrossPairs(matching="offline", probability=1.0), **losses)
    data = Warps(protocol="unseen", batch_size=8, eval_batch_size=8, sampler="pk", samples_per_class=4,
                 image_size=16, train_transform="plain", eval_transform="plain")
    pairs = OfflineCrossPairs(cache_dir=str(tmp_path), min_inliers=10, longer_side=128, min_side=16.0)
    shares = []

    class Share(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            shares.append(batch["cross"].float().mean().item() if "cross" in batch else -1.0)

    trainer = L.Trainer(accelerator="cpu", max_epochs=1, limit_train_batches=1, num_sanity_val_steps=0,
                        limit_val_batches=0, logger=False, enable_progress_bar=False, enable_checkpointing=False,
                        enable_model_summary=False,
                        callbacks=[KMeansPseudoLabels(num_clusters=2), pairs, Share()])
    trainer.fit(model, data)
    return pairs, shares


def test_offline_pairs_reach_the_training_batches_and_are_cached(tmp_path):
    pairs, shares = fit_with_offline_pairs(tmp_path)
    assert pairs.stats["pairs"] > 0 and pairs.stats["precision"] == 100.0  # one true class
    assert shares == [1.0]  # every image has a partner: all items arrive as cross items (probability 1)
    assert len(list(tmp_path.glob("pairs-*.npz"))) == 1


def test_rows_without_a_second_branch_mine_nothing_and_keep_plain_anchors(tmp_path):
    """Table 4.4's Baseline and +CCL rows run the same config with TAC and L_F off: no pairs are mined and
    no anchor is swapped for a keypoint crop."""
    pairs, shares = fit_with_offline_pairs(tmp_path, tac_weight=0.0, feature_weight=0.0)
    assert pairs.stats["pairs"] == 0 and shares == [-1.0]
    assert not list(tmp_path.glob("pairs-*.npz"))
