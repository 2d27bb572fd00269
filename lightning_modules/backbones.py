"""Backbone trunks: images -> pooled feature vector (B, D).

`build_backbone` wraps every network in `Trunk`, which owns the frozen-BatchNorm option so that it
survives the `train()` call Lightning makes every epoch, and declares the input normalisation its
pretrained weights expect (`input_mean` / `input_std`), which `EmbeddingModule.setup` hands to the
datamodule: no config restates it. Pretrained weights come from a local file (`weights=`) because runs
and tests have no internet; the download path (torchvision `DEFAULT` / timm hub) is only for users who
have it.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import Tensor, nn

TIMM_PREFIX = "timm:"
DOWNLOADABLE = ("resnet18", "resnet50", "googlenet")  # torchvision archs with ImageNet weights
WEIGHTS_HINT = ("pass weights=/path/to/file.pth (on the command line: --model.weights=/path/to/file.pth), a state "
                "dict saved with torch.save")
_CLASSIFIER_ROOTS = ("fc", "classifier", "head")


def freeze_batchnorm(module: nn.Module, affine: bool = False) -> nn.Module:
    """Fix every BatchNorm's running statistics (eval mode); with `affine`, its weight and bias too.

    Fine-tuning a pretrained trunk on small, class-skewed batches would otherwise overwrite its
    ImageNet statistics (the MS-loss / CBML / Proxy-Anchor `bn_freeze` convention). The affine
    parameters keep training by default (docs/methods/tac_ccl.md).
    """
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
            if affine:
                for p in m.parameters(recurse=False):
                    p.requires_grad_(False)
    return module


class Trunk(nn.Module):
    """A network mapping images to (B, out_dim) features.

    With `frozen_bn`, BatchNorm statistics are re-frozen after every `train(mode)` call, so the freeze
    persists through the `model.train()` the training loop issues each epoch; `frozen_bn_affine` also
    fixes the BN weight and bias (the stricter form some DML code uses).
    `input_mean` / `input_std`: the normalisation the weights expect (per channel, applied to [0, 1]
    pixels by the datamodule); None for from-scratch nets, whose inputs use the dataset's statistics.
    """

    def __init__(self, net: nn.Module, out_dim: int, frozen_bn: bool = False, frozen_bn_affine: bool = False,
                 input_mean: Sequence[float] | None = None, input_std: Sequence[float] | None = None) -> None:
        super().__init__()
        if frozen_bn_affine and not frozen_bn:
            raise ValueError("frozen_bn_affine=True freezes the BN affine parameters on top of frozen_bn; set "
                             "frozen_bn=True too (--model.frozen_bn=true), or drop frozen_bn_affine")
        if (input_mean is None) != (input_std is None):
            raise ValueError("a trunk declares input_mean and input_std together, or neither")
        self.net = net
        self.out_dim = out_dim
        self.frozen_bn, self.frozen_bn_affine = frozen_bn, frozen_bn_affine
        self.input_mean = None if input_mean is None else tuple(float(m) for m in input_mean)
        self.input_std = None if input_std is None else tuple(float(s) for s in input_std)
        self.stage_aliases: dict[str, str] = {}  # friendly stage name -> child name (set by build_backbone)
        if frozen_bn:
            freeze_batchnorm(net, affine=frozen_bn_affine)

    def train(self, mode: bool = True) -> Trunk:
        super().train(mode)
        if self.frozen_bn:
            freeze_batchnorm(self.net, affine=self.frozen_bn_affine)
        return self

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def stage_names(self) -> list[str]:
        """Names `insert` accepts: the network's top-level children, plus the architecture's aliases."""
        return [*self.stage_aliases, *(n for n, _ in self.net.named_children())]

    def insert(self, stage: str, module: nn.Module) -> None:
        """Run `module` on the output of `stage` (SAN's "insert at a named stage"): the stage becomes
        `Sequential(stage, module)`, so its weights load before the insertion and the upper network is
        untouched. Insert after the weights are loaded (the stage's keys gain a `.0`)."""
        path = self.stage_aliases.get(stage, stage)
        if stage not in self.stage_names():
            raise ValueError(f"unknown stage {stage!r} for insertion; use one of {self.stage_names()}")
        setattr(self.net, path, nn.Sequential(getattr(self.net, path), module))

    def feature_map(self, x: Tensor) -> Tensor:
        """(B, C, h, w): the last spatial map, whose global average is `forward(x)`; attention modules
        (TAC-CCL's CBAM) act on it. timm nets give it by `forward_features`; the others are read at the
        input of their final global pooling."""
        if hasattr(self.net, "forward_features"):
            fmap = self.net.forward_features(x)
        else:
            pools = [m for m in self.net.modules() if isinstance(m, nn.AdaptiveAvgPool2d)]
            if not pools:
                raise ValueError(f"{type(self.net).__name__} has no global average pooling to read a feature "
                                 "map before; use a convolutional backbone")
            captured: list[Tensor] = []
            handle = pools[-1].register_forward_hook(lambda module, inputs, output: captured.append(inputs[0]))
            try:
                self.net(x)
            finally:
                handle.remove()
            fmap = captured[0]
        if fmap.ndim != 4:
            raise ValueError(f"backbone gives a {tuple(fmap.shape)} feature map, not (B, C, h, w); use a "
                             "convolutional backbone")
        return fmap


# -- architectures -------------------------------------------------------------------------------
def _kaiming_conv(in_chans: int, out_chans: int, kernel: int, stride: int, padding: int) -> nn.Conv2d:
    """A bias-free conv initialised like torchvision's ResNet convs, for swapped-in stems."""
    conv = nn.Conv2d(in_chans, out_chans, kernel, stride, padding, bias=False)
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    return conv


def _with_in_chans(conv: nn.Conv2d, in_chans: int) -> nn.Conv2d:
    """The same stem conv for a different number of input channels (e.g. 1-channel digits)."""
    if in_chans == conv.in_channels:
        return conv
    return _kaiming_conv(in_chans, conv.out_channels, conv.kernel_size[0], conv.stride[0], conv.padding[0])


def _cifar_resnet18(in_chans: int) -> tuple[nn.Module, int]:
    """ResNet18 with the CIFAR stem (3x3 stride-1 conv, no max-pool): a 32x32 input ends at 4x4."""
    net = torchvision.models.resnet18(weights=None)
    net.conv1 = _kaiming_conv(in_chans, 64, kernel=3, stride=1, padding=1)
    net.maxpool = nn.Identity()
    net.fc = nn.Identity()
    return net, 512


def _imagenet_resnet(arch: str, in_chans: int) -> tuple[nn.Module, int]:
    """torchvision ImageNet-style ResNet (7x7 stem, max-pool) without its classifier."""
    net = getattr(torchvision.models, arch)(weights=None)
    dim = net.fc.in_features
    net.conv1 = _with_in_chans(net.conv1, in_chans)
    net.fc = nn.Identity()
    return net, dim


def _googlenet(in_chans: int) -> tuple[nn.Module, int]:
    """torchvision GoogLeNet (BN variant) up to pool5 (1024-d).

    No aux heads; the dropout before fc belongs to the ImageNet classifier, so it goes with it.
    `transform_input` stays off here (a from-scratch net sees the dataset's statistics); `build_backbone`
    turns it on for pretrained weights, as torchvision's own pretrained construction does.
    """
    net = torchvision.models.googlenet(weights=None, aux_logits=False, transform_input=False,
                                       init_weights=True)
    net.conv1.conv = _with_in_chans(net.conv1.conv, in_chans)
    net.dropout = nn.Identity()
    net.fc = nn.Identity()
    return net, 1024


def _small_cnn(in_chans: int) -> tuple[nn.Module, int]:
    """Four conv-BN-ReLU layers and global pooling (8x8 -> 4x4 -> 128-d): fast on CPU for digits."""
    layers: list[nn.Module] = []
    channels = in_chans
    for width, stride in ((32, 1), (64, 1), (128, 2), (128, 1)):
        layers += [nn.Conv2d(channels, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width),
                   nn.ReLU(inplace=True)]
        channels = width
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    return nn.Sequential(*layers), channels


# -- semi-supervised 32x32 networks (Snowball, LMCS) ----------------------------------------------
class GaussianNoise(nn.Module):
    """Additive input noise while training (Mean Teacher's ConvNet-13, sigma 0.15); each forward draws
    its own, so student and teacher see independent noise."""

    def __init__(self, std: float) -> None:
        super().__init__()
        self.std = std

    def forward(self, x: Tensor) -> Tensor:
        return x + self.std * torch.randn_like(x) if self.training and self.std > 0 else x


def _convnet13(in_chans: int, variant: str) -> tuple[nn.Module, int]:
    """ConvNet-13, the 13-layer CNN of the Pi-model / temporal ensembling (Laine & Aila, "Temporal Ensembling
    for Semi-Supervised Learning", ICLR 2017, Table 5) and Mean Teacher (Tarvainen & Valpola, NeurIPS 2017,
    its TensorFlow code's ConvNet), for 32x32 inputs; the network Snowball and LMCS cite for their ConvNet-13
    rows: 3x conv3x3 128, max-pool 2, dropout 0.5, 3x conv3x3 256, max-pool 2, dropout 0.5, conv3x3 512
    valid, conv1x1 256, conv1x1 128, global average pool (128-d), then the owner's linear classifier.
    variant "mt" (the configs'): Gaussian input noise 0.15, each conv weight-normed -> BN -> LeakyReLU(0.1).
      3,124,608 trunk parameters, 3.13 M with a 10-class classifier: the dissertation's "3.13 million"
      (without weight norm it would be 3.12 M); BN keeps PyTorch's momentum (see docs/methods/lmcs.md).
    variant "mixmatch": conv -> LeakyReLU(0.2) -> BN, no noise and no dropout. Not MixMatch's network (its
      code has no 13-layer CNN); an earlier reading kept as an option only."""
    mt = variant == "mt"

    def unit(cin: int, cout: int, kernel: int, padding: int) -> list[nn.Module]:
        conv = nn.Conv2d(cin, cout, kernel, padding=padding)
        if mt:
            return [nn.utils.parametrizations.weight_norm(conv), nn.BatchNorm2d(cout), nn.LeakyReLU(0.1)]
        return [conv, nn.LeakyReLU(0.2), nn.BatchNorm2d(cout)]

    def pool() -> list[nn.Module]:
        return [nn.MaxPool2d(2, 2), *([nn.Dropout(0.5)] if mt else [])]

    layers: list[nn.Module] = [GaussianNoise(0.15)] if mt else []
    layers += unit(in_chans, 128, 3, 1) + unit(128, 128, 3, 1) + unit(128, 128, 3, 1) + pool()
    layers += unit(128, 256, 3, 1) + unit(256, 256, 3, 1) + unit(256, 256, 3, 1) + pool()
    layers += unit(256, 512, 3, 0) + unit(512, 256, 1, 0) + unit(256, 128, 1, 0)
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    return nn.Sequential(*layers), 128


class _Shake(torch.autograd.Function):
    """Per-image random convex mix of two branches: gate ~ U(0, 1) forward, a fresh gate backward."""

    @staticmethod
    def forward(ctx, a: Tensor, b: Tensor) -> Tensor:
        gate = a.new_empty(a.shape[0], 1, 1, 1).uniform_()
        return gate * a + (1 - gate) * b

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor]:
        gate = grad.new_empty(grad.shape[0], 1, 1, 1).uniform_()
        return gate * grad, (1 - gate) * grad


class _ShiftConvDownsample(nn.Module):
    """Mean Teacher's stride-2 shortcut: the two pixel lattices (even/odd offsets) side by side,
    ReLU, a grouped 1x1 conv and BN."""

    def __init__(self, in_chans: int, out_chans: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2 * in_chans, out_chans, 1, groups=2, bias=False)
        self.bn = nn.BatchNorm2d(out_chans)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.cat([x[:, :, 0::2, 0::2], x[:, :, 1::2, 1::2]], dim=1)
        return self.bn(self.conv(torch.relu(x)))


class _ShakeShakeBlock(nn.Module):
    """Two ReLU-conv-BN-ReLU-conv-BN branches mixed by shake-shake (their mean at evaluation)."""

    def __init__(self, in_chans: int, out_chans: int, stride: int) -> None:
        super().__init__()
        self.branches = nn.ModuleList(nn.Sequential(
            nn.ReLU(), nn.Conv2d(in_chans, out_chans, 3, stride, 1, bias=False), nn.BatchNorm2d(out_chans),
            nn.ReLU(), nn.Conv2d(out_chans, out_chans, 3, 1, 1, bias=False), nn.BatchNorm2d(out_chans))
            for _ in range(2))
        if stride == 2:
            self.shortcut: nn.Module = _ShiftConvDownsample(in_chans, out_chans)
        elif in_chans != out_chans:
            self.shortcut = nn.Sequential(nn.Conv2d(in_chans, out_chans, 1, bias=False),
                                          nn.BatchNorm2d(out_chans))
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        a, b = (branch(x) for branch in self.branches)
        mixed = _Shake.apply(a, b) if self.training else 0.5 * (a + b)
        return self.shortcut(x) + mixed


def _shakeshake26(in_chans: int, width: int = 96) -> tuple[nn.Module, int]:
    """Mean Teacher's `cifar_shakeshake26` (ResNet-26, shake-shake 2x96d): conv3x3 16, three stages of
    four shake-shake blocks (96/192/384 channels; shift-conv downsampling), global average pool (384-d).
    Its two classifier heads belong to the method (SemiSupervised `two_heads`)."""
    layers: list[nn.Module] = [nn.Conv2d(in_chans, 16, 3, 1, 1, bias=False)]
    channels = 16
    for stage, out in enumerate((width, 2 * width, 4 * width)):
        for block in range(4):
            layers.append(_ShakeShakeBlock(channels, out, stride=2 if stage and not block else 1))
            channels = out
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    net = nn.Sequential(*layers)
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    return net, channels


class _WideBlock(nn.Module):
    """Pre-activation residual block of MixMatch's WRN: BN-LReLU(0.1)-conv3x3-BN-LReLU-conv3x3, a 1x1
    conv shortcut where the width changes. The first block of the network also feeds its activated
    input to the shortcut (`activate_shortcut`)."""

    def __init__(self, in_chans: int, out_chans: int, stride: int, activate_shortcut: bool = False) -> None:
        super().__init__()
        self.activate_shortcut = activate_shortcut
        self.pre = nn.Sequential(nn.BatchNorm2d(in_chans, momentum=0.001), nn.LeakyReLU(0.1))
        self.body = nn.Sequential(
            nn.Conv2d(in_chans, out_chans, 3, stride, 1, bias=False), nn.BatchNorm2d(out_chans, momentum=0.001),
            nn.LeakyReLU(0.1), nn.Conv2d(out_chans, out_chans, 3, 1, 1, bias=False))
        self.shortcut = (nn.Conv2d(in_chans, out_chans, 1, stride, bias=False) if in_chans != out_chans
                         else nn.Identity())

    def forward(self, x: Tensor) -> Tensor:
        activated = self.pre(x)
        return self.shortcut(activated if self.activate_shortcut else x) + self.body(activated)


def _wrn28(in_chans: int, filters: int) -> tuple[nn.Module, int]:
    """MixMatch's Wide ResNet-28: conv3x3 16, three stages of four pre-activation blocks (filters x 1, 2,
    4; BN momentum 0.001 = TF's 0.999), BN-LReLU(0.1), global average pool. filters=32 is WRN-28-2
    (1.47 M parameters, 128-d); filters=135 is MixMatch's large model (about 26 M)."""
    layers: list[nn.Module] = [nn.Conv2d(in_chans, 16, 3, 1, 1, bias=False)]
    channels = 16
    for stage, out in enumerate((filters, 2 * filters, 4 * filters)):
        for block in range(4):
            layers.append(_WideBlock(channels, out, stride=2 if stage and not block else 1,
                                     activate_shortcut=stage == 0 and block == 0))
            channels = out
    layers += [nn.BatchNorm2d(channels, momentum=0.001), nn.LeakyReLU(0.1),
               nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    net = nn.Sequential(*layers)
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="leaky_relu")
    return net, channels


# names for stages of nets whose children are numbered (small_cnn: the ReLU ending each conv block)
_STAGE_ALIASES = {"small_cnn": {"block1": "2", "block2": "5", "block3": "8", "block4": "11"}}

_ARCHS: dict[str, Callable[[int], tuple[nn.Module, int]]] = {
    "cifar_resnet18": _cifar_resnet18,
    "resnet18": partial(_imagenet_resnet, "resnet18"),
    "resnet50": partial(_imagenet_resnet, "resnet50"),
    "googlenet": _googlenet,
    "small_cnn": _small_cnn,
    "convnet13": partial(_convnet13, variant="mt"),
    "convnet13_mixmatch": partial(_convnet13, variant="mixmatch"),
    "shakeshake26": _shakeshake26,
    "wrn28_2": partial(_wrn28, filters=32),
    "wrn28_135": partial(_wrn28, filters=135),
}


def _timm_net(model_name: str, in_chans: int, download: bool) -> tuple[nn.Module, int]:
    """Any timm model without its classifier; timm is imported here because it adds seconds to
    every start-up that does not use it."""
    import timm

    if not timm.is_model(model_name):
        raise ValueError(f"unknown timm model {model_name!r}; see timm.list_models()")
    try:
        net = timm.create_model(model_name, pretrained=download, num_classes=0, in_chans=in_chans)
    except Exception as err:
        if not download:
            raise
        raise RuntimeError(f"could not download pretrained weights for timm model {model_name!r} "
                           f"({err}); without internet {WEIGHTS_HINT}") from err
    # head_hidden_size differs from num_features where a conv head follows the last stage
    return net, getattr(net, "head_hidden_size", None) or net.num_features


# -- weights -------------------------------------------------------------------------------------
def read_state_dict(path: str | Path) -> dict[str, Any]:
    """Load a state dict safely (weights_only) and strip the wrappers saved files commonly carry:
    a {"state_dict": ...} checkpoint, DDP's `module.` prefix and a saved Trunk's `net.` prefix."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"backbone weights file not found: {path}")
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise TypeError(f"{path} holds a {type(obj).__name__}, not a state dict; {WEIGHTS_HINT}")
    state = {k.removeprefix("module."): v for k, v in obj.items()}
    if state and all(k.startswith("net.") for k in state):
        state = {k.removeprefix("net."): v for k, v in state.items()}
    return state


def _is_classifier_key(key: str) -> bool:
    root = key.split(".", 1)[0]
    return root in _CLASSIFIER_ROOTS or root.lower().startswith("aux")


def _listing(keys: list[str], limit: int = 10) -> str:
    more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def load_trunk_weights(net: nn.Module, state: Mapping[str, Any], source: str) -> None:
    """Load `state` into `net` strictly, except for classifier keys the trunk does not have
    (fc.*, classifier.*, head.*, aux*). Any other difference raises one error that lists it all."""
    own = net.state_dict()
    state = {k: v for k, v in state.items() if k in own or not _is_classifier_key(k)}
    # files from before BatchNorm counted batches lack num_batches_tracked; load_state_dict fills it
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    mismatched = [f"{k} {tuple(getattr(v, 'shape', ()))} vs {tuple(own[k].shape)}"
                  for k, v in state.items()
                  if k in own and (not isinstance(v, Tensor) or v.shape != own[k].shape)]
    if missing or unexpected or mismatched:
        problems = [f"{label}: {_listing(keys)}" for label, keys in
                    (("missing trunk keys", missing), ("unexpected keys", unexpected),
                     ("shape mismatches (file vs trunk)", mismatched)) if keys]
        raise ValueError(f"weights from {source} do not fit the backbone; " + "; ".join(problems)
                         + ". Save the state dict of the same architecture (torchvision/timm key names).")
    net.load_state_dict(state, strict=True)


def _download_state_dict(name: str) -> dict[str, Any]:
    """The torchvision ImageNet weights (`DEFAULT`), for users with internet."""
    if name not in DOWNLOADABLE:
        raise ValueError(f"backbone {name!r} has no published pretrained weights; {WEIGHTS_HINT}")
    url = torchvision.models.get_model_weights(name).DEFAULT.url
    try:
        return torch.hub.load_state_dict_from_url(url, map_location="cpu", progress=True, check_hash=True,
                                                  weights_only=True)
    except Exception as err:
        raise RuntimeError(f"could not download pretrained weights for {name!r} from {url} ({err}); "
                           f"without internet {WEIGHTS_HINT}") from err


# -- input contract ------------------------------------------------------------------------------
def pretrained_input(name: str, net: nn.Module, in_chans: int) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """(mean, std) the published weights of backbone `name` expect, read from torchvision's weights
    metadata or timm's `pretrained_cfg` (the owners of that fact); None for an architecture without
    published weights (a user's own file: its inputs keep the dataset's statistics).

    torchvision's GoogLeNet is switched to `transform_input=True` here: its weights were ported from TF
    and expect (x - 0.5) / 0.5 inputs, which that flag makes of ImageNet-normalised ones."""
    if name.startswith(TIMM_PREFIX):
        cfg = getattr(net, "pretrained_cfg", None) or {}
        if "mean" not in cfg or "std" not in cfg:
            return None
        mean, std = cfg["mean"], cfg["std"]
    elif name in DOWNLOADABLE:
        preset = torchvision.models.get_model_weights(name).DEFAULT.transforms()
        mean, std = preset.mean, preset.std
        if hasattr(net, "transform_input"):
            net.transform_input = True
    else:
        return None
    if len(mean) != in_chans:
        raise ValueError(f"pretrained backbone {name!r} expects {len(mean)}-channel images, got in_chans={in_chans}; "
                         f"use in_chans={len(mean)} (convert the images), or --model.pretrained=false")
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


# -- entry point ---------------------------------------------------------------------------------
def build_backbone(name: str, pretrained: bool = False, weights: str | None = None,
                   frozen_bn: bool = False, in_chans: int = 3,
                   frozen_bn_affine: bool = False) -> tuple[Trunk, int]:
    """(trunk, D): a `Trunk` mapping (B, in_chans, H, W) images to (B, D) pooled features.

    `name` is one of cifar_resnet18, resnet18, resnet50, googlenet, small_cnn, convnet13,
    convnet13_mixmatch, shakeshake26, wrn28_2, wrn28_135, or `timm:<model>`.
    `pretrained=True` loads `weights` (a local file in the published weights' format) or, without it,
    downloads the published weights; the trunk then declares the input normalisation they expect.
    `frozen_bn` fixes the BN running statistics; `frozen_bn_affine` also its weight and bias.
    """
    if weights is not None and not pretrained:
        raise ValueError(f"weights={weights!r} given with pretrained=False; set pretrained=True to load it")
    if not (name in _ARCHS or name.startswith(TIMM_PREFIX)):
        raise ValueError(f"unknown backbone {name!r}; use one of {sorted(_ARCHS)} or timm:<model_name>")
    state = read_state_dict(weights) if weights is not None else None
    if name in _ARCHS:
        net, dim = _ARCHS[name](in_chans)
        if pretrained and state is None:
            state = _download_state_dict(name)
    else:
        net, dim = _timm_net(name.removeprefix(TIMM_PREFIX), in_chans, download=pretrained and state is None)
    if state is not None:
        load_trunk_weights(net, state, source=f"{weights or 'the download'} (backbone {name!r})")
    mean, std = (pretrained_input(name, net, in_chans) if pretrained else None) or (None, None)
    trunk = Trunk(net, dim, frozen_bn, frozen_bn_affine, input_mean=mean, input_std=std)
    trunk.stage_aliases = dict(_STAGE_ALIASES.get(name, {}))
    return trunk, dim
