"""Backbones and heads: shapes, the CIFAR stem, local weight files, frozen BatchNorm."""
from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from lightning_modules.backbones import build_backbone, freeze_batchnorm
from lightning_modules.heads import EmbeddingHead, l2_normalize


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
    pool5 (1024-d), with no aux outputs, input transform or dropout."""
    reference = torchvision.models.googlenet(weights=None, aux_logits=True, init_weights=False)
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
    assert trunk.net.aux1 is None and not trunk.net.transform_input


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


def test_frozen_bn_survives_train_calls() -> None:
    trunk, dim = build_backbone("small_cnn", frozen_bn=True, in_chans=1)
    model = nn.Sequential(trunk, EmbeddingHead(dim, 16))  # the LightningModule's role
    bns = _bn_layers(trunk)
    before = [(bn.running_mean.clone(), bn.running_var.clone()) for bn in bns]
    for _ in range(2):
        model.train()
        model(torch.randn(4, 1, 8, 8) * 5 + 2).sum().backward()
    assert all(not bn.training for bn in bns)
    assert all(not p.requires_grad and p.grad is None for bn in bns for p in bn.parameters())
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
    assert all(not bn.training and not bn.weight.requires_grad for bn in (net[1], net[2]))


def test_embedding_head_unit_norm() -> None:
    head = EmbeddingHead(32, 8)
    z = head(torch.randn(5, 32) * 10)
    assert z.shape == (5, 8)
    torch.testing.assert_close(z.norm(dim=1), torch.ones(5))
    raw = EmbeddingHead(32, 8, normalize=False)(torch.randn(5, 32) * 10)
    assert not torch.allclose(raw.norm(dim=1), torch.ones(5))
    torch.testing.assert_close(l2_normalize(torch.tensor([[3.0, 4.0]])), torch.tensor([[0.6, 0.8]]))
