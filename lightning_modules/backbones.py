"""Backbone trunks: images -> pooled feature vector (B, D).

`build_backbone` wraps every network in `Trunk`, which owns the frozen-BatchNorm option so that it
survives the `train()` call Lightning makes every epoch. Pretrained weights come from a local file
(`weights=`) because runs and tests have no internet; the download path (torchvision `DEFAULT` /
timm hub) is only for users who have it.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import Tensor, nn

TIMM_PREFIX = "timm:"
DOWNLOADABLE = ("resnet18", "resnet50", "googlenet")  # torchvision archs with ImageNet weights
WEIGHTS_HINT = "pass weights=/path/to/file.pth (a state dict saved with torch.save)"
_CLASSIFIER_ROOTS = ("fc", "classifier", "head")


def freeze_batchnorm(module: nn.Module) -> nn.Module:
    """Fix every BatchNorm's running statistics and affine parameters.

    Fine-tuning a pretrained trunk on small, class-skewed batches would otherwise overwrite its
    ImageNet statistics (the MS-loss / CBML / Proxy-Anchor `bn_freeze` convention).
    """
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
            for p in m.parameters(recurse=False):
                p.requires_grad_(False)
    return module


class Trunk(nn.Module):
    """A network mapping images to (B, out_dim) features.

    With `frozen_bn`, BatchNorm is re-frozen after every `train(mode)` call, so the freeze persists
    through the `model.train()` the training loop issues each epoch.
    """

    def __init__(self, net: nn.Module, out_dim: int, frozen_bn: bool = False) -> None:
        super().__init__()
        self.net = net
        self.out_dim = out_dim
        self.frozen_bn = frozen_bn
        if frozen_bn:
            freeze_batchnorm(net)

    def train(self, mode: bool = True) -> Trunk:
        super().train(mode)
        if self.frozen_bn:
            freeze_batchnorm(self.net)
        return self

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


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

    No aux heads and no `transform_input` (inputs use ImageNet mean/std like the other backbones);
    the dropout before fc belongs to the ImageNet classifier, so it goes with it.
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


_ARCHS: dict[str, Callable[[int], tuple[nn.Module, int]]] = {
    "cifar_resnet18": _cifar_resnet18,
    "resnet18": partial(_imagenet_resnet, "resnet18"),
    "resnet50": partial(_imagenet_resnet, "resnet50"),
    "googlenet": _googlenet,
    "small_cnn": _small_cnn,
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


# -- entry point ---------------------------------------------------------------------------------
def build_backbone(name: str, pretrained: bool = False, weights: str | None = None,
                   frozen_bn: bool = False, in_chans: int = 3) -> tuple[Trunk, int]:
    """(trunk, D): a `Trunk` mapping (B, in_chans, H, W) images to (B, D) pooled features.

    `name` is one of cifar_resnet18, resnet18, resnet50, googlenet, small_cnn, or `timm:<model>`.
    `pretrained=True` loads `weights` (a local file) or, without it, downloads the published weights.
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
    return Trunk(net, dim, frozen_bn), dim
