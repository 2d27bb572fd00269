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
    ("convnet13_mixmatch", 128, 3.12e6),  # the conv-LReLU-BN option (not MixMatch's network)
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


def test_convnet13_layers_and_parameters_by_hand():
    """Laine & Aila's / Mean Teacher's ConvNet-13: each conv = kernel + bias + weight norm's g (one per output
    channel) + BN's scale and shift (two per channel); 3,124,608 in all, 3.13 M with a 10-class head, as the
    dissertation states. Shapes on a 32x32 input: 32 -> pool 16 -> pool 8 -> valid 3x3 conv 6 -> pooled 1."""
    trunk, dim = build_backbone("convnet13")
    convs = [(3, 128, 3), (128, 128, 3), (128, 128, 3), (128, 256, 3), (256, 256, 3), (256, 256, 3),
             (256, 512, 3), (512, 256, 1), (256, 128, 1)]
    by_hand = sum(cin * cout * k * k + cout + cout + 2 * cout for cin, cout, k in convs)
    assert by_hand == 3_124_608 and count(trunk) == by_hand and dim == 128
    assert round((by_hand + 128 * 10 + 10) / 1e6, 2) == 3.13
    layers = list(trunk.net)
    kinds = ["conv" if isinstance(m, torch.nn.Conv2d) else type(m).__name__ for m in layers]
    assert kinds[0] == "GaussianNoise" and kinds.count("conv") == 9 and kinds.count("BatchNorm2d") == 9
    assert kinds.count("MaxPool2d") == 2 and kinds.count("Dropout") == 2 and kinds.count("LeakyReLU") == 9
    assert kinds[1:4] == ["conv", "BatchNorm2d", "LeakyReLU"]  # conv -> BN -> LeakyReLU(0.1)
    assert kinds[10:12] == ["MaxPool2d", "Dropout"]  # pool, then dropout
    assert all(torch.nn.utils.parametrize.is_parametrized(m, "weight") for m in layers
               if isinstance(m, torch.nn.Conv2d))  # weight norm on every conv
    assert all(m.negative_slope == 0.1 for m in layers if isinstance(m, torch.nn.LeakyReLU))
    assert all(m.p == 0.5 for m in layers if isinstance(m, torch.nn.Dropout))
    shapes, x = [], torch.zeros(2, 3, 32, 32)
    trunk.eval()
    with torch.no_grad():
        for m in layers:
            x = m(x)
            if isinstance(m, (torch.nn.MaxPool2d, torch.nn.Conv2d)):
                shapes.append(tuple(x.shape[1:]))
    assert shapes == [(128, 32, 32)] * 3 + [(128, 16, 16)] + [(256, 16, 16)] * 3 + [(256, 8, 8), (512, 6, 6),
                                                                                 (256, 6, 6), (128, 6, 6)]
    assert tuple(x.shape) == (2, 128)
