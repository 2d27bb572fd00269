"""The semi-supervised 32x32 networks: feature sizes and parameter counts of the papers, and what differs
between training and evaluation (input noise, dropout, shake-shake)."""
import pytest
import torch

from lightning_modules.backbones import build_backbone

pytestmark = pytest.mark.usefixtures("one_thread")


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("name, dim, params", [
    ("convnet13", 128, 3.12e6),           # Pi-model / MT: "about 3.1 M"
    ("convnet13_mixmatch", 128, 3.12e6),  # MixMatch CNN13 / LMCS: 3.13 M with the classifier
    ("wrn28_2", 128, 1.466e6),            # WRN-28-2: 1.47 M with the classifier
    ("shakeshake26", 384, 26.19e6),       # MT cifar_shakeshake26 (2x96d)
])
def test_feature_size_and_parameter_count(name, dim, params):
    torch.manual_seed(0)
    trunk, out_dim = build_backbone(name)
    assert out_dim == dim and count(trunk) == pytest.approx(params, rel=0.01)
    x = torch.randn(2, 3, 16, 16)  # fully convolutional: 16x16 costs a quarter of 32x32
    trunk.eval()
    with torch.no_grad():
        a, b = trunk(x), trunk(x)
    assert a.shape == (2, dim) and torch.equal(a, b)  # evaluation is deterministic
    if name in ("convnet13", "shakeshake26"):  # noise + dropout, shake-shake gates: training is not
        trunk.train()
        with torch.no_grad():
            assert not torch.equal(trunk(x), trunk(x))
