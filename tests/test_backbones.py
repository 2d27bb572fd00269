"""Backbones and heads: shapes, the CIFAR stem, local weight files, the input contract (pretrained
normalisation through the datamodule), frozen BatchNorm."""
from __future__ import annotations

import lightning as L
import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from datamodules.base import EmbeddingDataModule, Records
from datamodules.digits import DigitsDataModule
from embedding_core.distances import l2_normalize
from lightning_modules.backbones import build_backbone, freeze_batchnorm
from lightning_modules.base import EmbeddingModule, Optim
from lightning_modules.heads import EmbeddingHead
from lightning_modules.isif import ISIF

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # what torchvision documents for its ImageNet weights
IMAGENET_STD = (0.229, 0.224, 0.225)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def _bn_layers(module: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@pytest.mark.parametrize("name, in_chans, size, dim", [
    ("resnet18", 3, 32, 512),
    ("resnet50", 3, 32, 2048),
    ("small_cnn", 1, 8, 128),
    ("cifar_resnet18", 1, 8, 512),
    ("timm:test_resnet", 3, 32, 96),
])
def test_output_shape(name: str, in_chans: int, size: int, dim: int) -> None:
    trunk, out_dim = build_backbone(name, in_chans=in_chans)
    assert out_dim == dim == trunk.out_dim
    trunk.eval()
    with torch.no_grad():
        out = trunk(torch.randn(2, in_chans, size, size))
    assert out.shape == (2, dim)


def test_cifar_resnet18_stem() -> None:
    trunk, _ = build_backbone("cifar_resnet18")
    conv1 = trunk.net.conv1
    assert conv1.kernel_size == (3, 3) and conv1.stride == (1, 1)
    assert not any(isinstance(m, nn.MaxPool2d) for m in trunk.modules())
    shapes = []
    trunk.net.layer4.register_forward_hook(lambda mod, inp, out: shapes.append(out.shape))
    trunk.eval()
    with torch.no_grad():
        out = trunk(torch.randn(1, 3, 32, 32))
    assert shapes == [(1, 512, 4, 4)] and out.shape == (1, 512)


def test_unknown_names() -> None:
    with pytest.raises(ValueError, match="unknown backbone"):
        build_backbone("resnet999")
    with pytest.raises(ValueError, match="unknown timm model"):
        build_backbone("timm:not_a_model")


def test_weights_round_trip(tmp_path) -> None:
    source, _ = build_backbone("small_cnn", in_chans=1)
    with torch.no_grad():  # non-trivial BN statistics, so buffers are checked too
        source(torch.randn(4, 1, 8, 8) * 3 + 1)
    path = tmp_path / "trunk.pth"
    torch.save(source.state_dict(), path)
    loaded, _ = build_backbone("small_cnn", pretrained=True, weights=str(path), in_chans=1)
    x = torch.randn(2, 1, 8, 8)
    source.eval(), loaded.eval()
    with torch.no_grad():
        assert torch.equal(source(x), loaded(x))


def test_file_without_num_batches_tracked_loads(tmp_path) -> None:
    """State dicts saved before BatchNorm counted batches lack these buffers; they still load."""
    state = build_backbone("small_cnn", in_chans=1)[0].state_dict()
    path = tmp_path / "old.pth"
    torch.save({k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}, path)
    trunk, _ = build_backbone("small_cnn", pretrained=True, weights=str(path), in_chans=1)
    torch.testing.assert_close(trunk.state_dict(), state, atol=0, rtol=0)


def test_googlenet_loads_a_torchvision_file(tmp_path) -> None:
    """A torchvision state dict (fc.*, aux*) inside DDP/checkpoint wrappers loads; the trunk gives
    pool5 (1024-d), with no aux outputs or dropout, and the `transform_input` of torchvision's own
    pretrained construction."""
    reference = torchvision.models.googlenet(weights=None, aux_logits=True, transform_input=True,
                                             init_weights=False)
    state = {f"module.{k}": v for k, v in reference.state_dict().items()}
    assert any(k.startswith("module.aux1.") for k in state) and "module.fc.weight" in state
    path = tmp_path / "googlenet.pth"
    torch.save({"state_dict": state, "epoch": 3}, path)
    trunk, dim = build_backbone("googlenet", pretrained=True, weights=str(path), frozen_bn=True)
    reference.fc = nn.Identity()
    reference.eval(), trunk.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(reference(x), trunk(x))
        trunk.train()
        out = trunk(x)
        assert out.shape == (2, dim) == (2, 1024) and torch.equal(out, trunk(x))
    assert trunk.net.aux1 is None and trunk.net.transform_input
    assert (trunk.input_mean, trunk.input_std) == (IMAGENET_MEAN, IMAGENET_STD)


# -- input contract: the backbone owns the normalisation its weights expect ----------------------------
class RGBNoise(EmbeddingDataModule):
    """16 random 32x32 RGB images of 4 classes (unseen: a train and a query split); the base's 0.5/0.5
    statistics, so a backbone that did not set its own would be fed the wrong input."""

    name = "rgb_noise"
    protocols = ("unseen",)

    def read_records(self) -> dict[str, Records]:
        images = np.random.default_rng(0).integers(0, 256, (16, 32, 32, 3), dtype=np.uint8)
        targets = np.repeat(np.arange(4), 4)
        return {"train": Records(images[:8], targets[:8]), "test": Records(images[8:], targets[8:])}


def _imagenet_normalised(images: np.ndarray) -> torch.Tensor:
    """(N, 3, H, W): uint8 HWC images as torchvision's ImageNet weights want them, written out by hand."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    return (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


@pytest.fixture(scope="module")
def googlenet_file(tmp_path_factory) -> tuple[str, nn.Module]:
    """A torchvision GoogLeNet state dict with non-trivial BN statistics, and torchvision's pretrained
    construction of it (transform_input=True, fc = Identity) as the reference."""
    torch.manual_seed(1)
    reference = torchvision.models.googlenet(weights=None, aux_logits=False, transform_input=True,
                                             init_weights=False)
    with torch.no_grad():
        for bn in _bn_layers(reference):
            bn.running_mean.normal_(0, 0.1)
            bn.running_var.uniform_(0.5, 2.0)
    path = tmp_path_factory.mktemp("weights") / "googlenet.pth"
    torch.save(reference.state_dict(), path)
    reference.fc = nn.Identity()
    return str(path), reference.eval()


def _trainer(**kwargs) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                     enable_checkpointing=False, enable_model_summary=False, num_sanity_val_steps=0, **kwargs)


def test_pretrained_googlenet_matches_torchvision_through_the_datamodule(googlenet_file) -> None:
    """End to end: the datamodule's eval (and train) transform, after the module's setup hook, feeds the
    trunk what torchvision's pretrained GoogLeNet gives on ImageNet-normalised pixels."""
    path, reference = googlenet_file
    model = EmbeddingModule(backbone="googlenet", pretrained=True, weights=path, frozen_bn=True)
    dm = RGBNoise(protocol="unseen", batch_size=4, eval_batch_size=8, image_size=32,
                  train_transform="plain", eval_transform="plain")
    _trainer(limit_val_batches=1).validate(model, datamodule=dm)  # Lightning calls model.setup
    assert (dm.mean, dm.std) == (IMAGENET_MEAN, IMAGENET_STD)
    batch = next(iter(dm.eval_dataloader("query")))
    expected = _imagenet_normalised(dm.splits["query"].items[batch["index"].numpy()])
    torch.testing.assert_close(batch["image"], expected)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model.trunk(batch["image"]), reference(expected), rtol=1e-4, atol=1e-5)
    train = next(iter(dm.train_dataloader()))  # the training views get the same normalisation
    torch.testing.assert_close(train["views"][0], _imagenet_normalised(dm.splits["train"].items[train["index"].numpy()]))


def test_a_mean_std_that_contradicts_pretrained_weights_is_an_error(googlenet_file) -> None:
    path, _ = googlenet_file
    model = EmbeddingModule(backbone="googlenet", pretrained=True, weights=path)
    dm = RGBNoise(protocol="unseen", image_size=32, eval_transform="plain", mean=[0.5, 0.5, 0.5])
    with pytest.raises(ValueError, match=r"--data.mean=\[0.5, 0.5, 0.5\] contradicts the pretrained backbone"):
        _trainer(limit_val_batches=1).validate(model, datamodule=dm)
    agreeing = RGBNoise(protocol="unseen", std=list(IMAGENET_STD))  # restating the same values is allowed
    agreeing.set_input_normalization(IMAGENET_MEAN, IMAGENET_STD)
    assert (agreeing.mean, agreeing.std) == (IMAGENET_MEAN, IMAGENET_STD)


def test_loaders_without_the_hook_get_a_warning_naming_the_values(googlenet_file) -> None:
    path, _ = googlenet_file
    model = EmbeddingModule(backbone="googlenet", pretrained=True, weights=path)
    dm = RGBNoise(protocol="unseen", image_size=32, eval_transform="plain")
    dm.setup()
    with pytest.warns(UserWarning, match=r"mean \(0.485, 0.456, 0.406\).*set_input_normalization"):
        _trainer(limit_val_batches=1).validate(model, dataloaders=dm.eval_dataloader("query"))


@pytest.mark.parametrize("name", ["resnet18", "googlenet", "small_cnn", "timm:test_resnet"])
def test_only_published_weights_declare_an_input_normalisation(name, tmp_path) -> None:
    """From scratch, every net leaves the dataset's statistics alone; with pretrained weights, the
    torchvision nets declare ImageNet statistics and a timm net its own pretrained_cfg."""
    scratch, _ = build_backbone(name)
    assert scratch.input_mean is None and scratch.input_std is None
    assert not getattr(scratch.net, "transform_input", False)
    path = tmp_path / "w.pth"
    torch.save(scratch.state_dict(), path)
    trunk, _ = build_backbone(name, pretrained=True, weights=str(path))
    expected = {"resnet18": (IMAGENET_MEAN, IMAGENET_STD), "googlenet": (IMAGENET_MEAN, IMAGENET_STD),
                "small_cnn": (None, None), "timm:test_resnet": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))}[name]
    assert (trunk.input_mean, trunk.input_std) == expected


def test_wrong_keys_give_a_clear_error(tmp_path) -> None:
    state = build_backbone("small_cnn", in_chans=1)[0].state_dict()
    state["net.bogus.weight"] = torch.zeros(1)
    del state["net.0.weight"]
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(ValueError, match="missing trunk keys: 0.weight") as err:
        build_backbone("small_cnn", pretrained=True, weights=str(path), in_chans=1)
    assert "unexpected keys: bogus.weight" in str(err.value) and str(path) in str(err.value)


def test_shape_mismatch_is_reported(tmp_path) -> None:
    path = tmp_path / "rgb.pth"
    torch.save(build_backbone("small_cnn", in_chans=3)[0].state_dict(), path)
    with pytest.raises(ValueError, match=r"shape mismatches .*0\.weight"):
        build_backbone("small_cnn", pretrained=True, weights=str(path), in_chans=1)


def test_missing_weights_file(tmp_path) -> None:
    path = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        build_backbone("resnet18", pretrained=True, weights=str(path))


def test_weights_without_pretrained_is_an_error(tmp_path) -> None:
    with pytest.raises(ValueError, match="pretrained=True"):
        build_backbone("resnet18", weights=str(tmp_path / "w.pth"))


def test_no_published_weights_asks_for_a_file() -> None:
    with pytest.raises(ValueError, match="weights=/path/to/file.pth"):
        build_backbone("cifar_resnet18", pretrained=True)


def test_failed_download_asks_for_a_file(monkeypatch) -> None:
    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(RuntimeError, match="weights=/path/to/file.pth"):
        build_backbone("resnet18", pretrained=True)


@pytest.mark.parametrize("affine", [False, True])
def test_frozen_bn_survives_train_calls(affine: bool) -> None:
    trunk, dim = build_backbone("small_cnn", frozen_bn=True, in_chans=1, frozen_bn_affine=affine)
    model = nn.Sequential(trunk, EmbeddingHead(dim, 16))  # the LightningModule's role
    bns = _bn_layers(trunk)
    before = [(bn.running_mean.clone(), bn.running_var.clone()) for bn in bns]
    for _ in range(2):
        model.train()
        model(torch.randn(4, 1, 8, 8) * 5 + 2).sum().backward()
    assert all(not bn.training for bn in bns)
    if affine:  # the strict form: BN weight and bias fixed too
        assert all(not p.requires_grad and p.grad is None for bn in bns for p in bn.parameters())
    else:  # the default: statistics fixed, affine parameters train
        assert all(p.requires_grad and p.grad.abs().sum() > 0 for bn in bns for p in bn.parameters())
    for bn, (mean, var) in zip(bns, before):
        assert torch.equal(bn.running_mean, mean) and torch.equal(bn.running_var, var)
    convs = [m for m in trunk.modules() if isinstance(m, nn.Conv2d)]
    assert all(c.weight.grad is not None and c.weight.grad.abs().sum() > 0 for c in convs)
    model.eval()
    model.train()
    assert all(not bn.training for bn in bns) and trunk.training


def test_without_frozen_bn_statistics_move() -> None:
    trunk, _ = build_backbone("small_cnn", in_chans=1)
    bn = _bn_layers(trunk)[0]
    mean = bn.running_mean.clone()
    trunk.train()
    trunk(torch.randn(4, 1, 8, 8) + 2)
    assert bn.training and not torch.equal(bn.running_mean, mean)


def test_freeze_batchnorm_helper() -> None:
    net = nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2), nn.BatchNorm1d(2))
    freeze_batchnorm(net)
    assert net[0].weight.requires_grad and net[0].training
    assert all(not bn.training and bn.weight.requires_grad for bn in (net[1], net[2]))
    freeze_batchnorm(net, affine=True)
    assert all(not bn.weight.requires_grad and not bn.bias.requires_grad for bn in (net[1], net[2]))
    assert net[0].weight.requires_grad


def test_frozen_bn_affine_needs_frozen_bn() -> None:
    with pytest.raises(ValueError, match="frozen_bn=True"):
        build_backbone("small_cnn", in_chans=1, frozen_bn_affine=True)


@pytest.mark.parametrize("affine", [False, True])
def test_frozen_bn_in_a_lightning_fit(affine: bool) -> None:
    """A real fit (ISIF on digits, 2 epochs with validation between): frozen BN keeps its running
    statistics; its affine parameters train unless frozen_bn_affine. A from-scratch net leaves the
    dataset's statistics in the datamodule."""
    L.seed_everything(0)
    model = ISIF(backbone="small_cnn", in_chans=1, embedding_dim=16, frozen_bn=True, frozen_bn_affine=affine,
                 optim=Optim(lr=0.1))
    bns = _bn_layers(model.trunk)
    stats = [(bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone()) for bn in bns]
    affine_before = [(bn.weight.detach().clone(), bn.bias.detach().clone()) for bn in bns]
    conv_before = model.trunk.net[0].weight.detach().clone()
    dm = DigitsDataModule(batch_size=32, eval_batch_size=64)
    _trainer(max_epochs=2, limit_train_batches=2, limit_val_batches=1).fit(model, datamodule=dm)
    for bn, (mean, var, count) in zip(bns, stats):
        assert torch.equal(bn.running_mean, mean) and torch.equal(bn.running_var, var)
        assert torch.equal(bn.num_batches_tracked, count)
    moved = [not torch.equal(bn.weight, w) and not torch.equal(bn.bias, b) for bn, (w, b) in zip(bns, affine_before)]
    assert moved == [not affine] * len(bns)
    assert not torch.equal(model.trunk.net[0].weight, conv_before)  # the convolutions trained either way
    assert (dm.mean, dm.std) == (DigitsDataModule.mean, DigitsDataModule.std)


def test_embedding_head_unit_norm() -> None:
    head = EmbeddingHead(32, 8)
    z = head(torch.randn(5, 32) * 10)
    assert z.shape == (5, 8)
    torch.testing.assert_close(z.norm(dim=1), torch.ones(5))
    raw = EmbeddingHead(32, 8, normalize=False)(torch.randn(5, 32) * 10)
    assert not torch.allclose(raw.norm(dim=1), torch.ones(5))
    torch.testing.assert_close(l2_normalize(torch.tensor([[3.0, 4.0]])), torch.tensor([[0.6, 0.8]]))
