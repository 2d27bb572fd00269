"""Mixed precision, channels_last and compile: bf16 autocast leaves the losses in fp32 and the loss of a fixed
batch where fp32 puts it; the layout and compile options change speed, not values or checkpoints."""
from __future__ import annotations

import pytest
import torch

from experiments.train import default_precision
from lightning_modules import isif, losses, relations, roul, san, semi, tac_ccl, umm
from lightning_modules.isif import ISIF
from lightning_modules.losses import fp32
from lightning_modules.umm import UMM

# every method loss (README table); a new method adds its losses here
METHOD_LOSSES = [
    isif.isif_loss, isif.isif_loss_literal,
    umm.set_softmax_loss, umm.distribution_consistency_loss, umm.ranking_loss, umm.histogram_average_precision,
    umm.sample_candidates,
    tac_ccl.contrastive_clustering_loss, tac_ccl.feature_similarity_loss, tac_ccl.attention_consistency,
    losses.multi_similarity_loss, losses.contrastive_memory_loss, losses.proxy_anchor,
    relations.bank_logits, relations.iraug_loss, relations.intra_relation_loss, relations.interpolation_loss,
    roul.relative_order_consistency, roul.metric_order_consistency, roul.order_loss, roul.marginal_variance,
    san.normalize_assembly, san.assembly_entropy, san.assembly_correlation, san.local_coherence,
    semi.softmax_mse, semi.probability_mse, semi.batch_cross_entropy, semi.soft_cross_entropy,
]
FP32_WRAPPER = fp32(lambda: None).__code__


@pytest.mark.parametrize("loss", METHOD_LOSSES, ids=lambda f: f.__name__)
def test_every_method_loss_runs_through_the_fp32_wrapper(loss):
    assert loss.__code__ is FP32_WRAPPER, f"{loss.__module__}.{loss.__name__} is not decorated with @fp32"


def test_fp32_wrapper_computes_in_fp32_under_bf16_autocast():
    g = torch.Generator().manual_seed(0)
    z1, z2 = (torch.nn.functional.normalize(torch.randn(64, 32, generator=g), dim=1) for _ in range(2))
    want = isif.isif_loss(z1, z2)["loss"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = isif.isif_loss(z1.bfloat16(), z2.bfloat16())["loss"]
        unguarded = torch.logsumexp(z1 @ z2.T / 0.1, 1).mean()  # what an undecorated loss would compute in
    assert got.dtype == torch.float32 and unguarded.dtype == torch.bfloat16
    # only the bf16 rounding of the inputs (rel. 2^-8 on unit vectors) remains
    torch.testing.assert_close(got, want, rtol=0, atol=2e-2)


def views(channels: int, size: int, batch: int = 16) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(batch, channels, size, size, generator=g) for _ in range(2)]


def bf16_and_fp32(loss_of) -> tuple[torch.Tensor, torch.Tensor]:
    full = loss_of()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = loss_of()
    return mixed, full


@pytest.mark.parametrize("backbone", ["small_cnn", "cifar_resnet18"])
def test_isif_loss_of_a_fixed_batch_is_the_same_in_bf16_and_fp32(backbone):
    torch.manual_seed(0)
    channels, size = (1, 8) if backbone == "small_cnn" else (3, 32)
    model = ISIF(backbone=backbone, in_chans=channels, embedding_dim=32)
    v1, v2 = views(channels, size, batch=16 if backbone == "small_cnn" else 8)
    mixed, full = bf16_and_fp32(lambda: isif.isif_loss(*model.embed_views([v1, v2]))["loss"])
    assert mixed.dtype == full.dtype == torch.float32
    assert abs(mixed.item() - full.item()) < 2e-3 * full.item(), (mixed.item(), full.item())  # measured 3e-5-3e-4


def test_umm_loss_of_a_fixed_batch_is_the_same_in_bf16_and_fp32():
    torch.manual_seed(0)
    model = UMM(backbone="small_cnn", in_chans=1, embedding_dim=32, gather_negatives=False)
    v1, v2 = views(1, 8)
    mixed, full = bf16_and_fp32(lambda: (torch.manual_seed(2), model.loss_terms(v1, v2)[0]["loss"])[1])
    assert abs(mixed.item() - full.item()) < 5e-3 * abs(full.item()), (mixed.item(), full.item())  # measured 5e-4


def test_channels_last_and_compile_keep_values_and_checkpoint_keys():
    torch.manual_seed(0)
    plain = ISIF(backbone="cifar_resnet18", embedding_dim=16).eval()
    nhwc = ISIF(backbone="cifar_resnet18", embedding_dim=16, channels_last=True).eval()
    nhwc.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 32, 32)
    conv = next(m for m in nhwc.trunk.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(nhwc(x), plain(x), atol=1e-5, rtol=0)
    small = ISIF(backbone="small_cnn", in_chans=1, embedding_dim=16).eval()
    compiled = ISIF(backbone="small_cnn", in_chans=1, embedding_dim=16, compile=True, compile_backend="eager")
    compiled.eval().load_state_dict(small.state_dict())  # the same names: checkpoints load either way
    assert list(compiled.state_dict()) == list(small.state_dict())
    assert compiled.trunk._compiled_call_impl is not None  # nn.Module.compile's in-place marker
    y = torch.randn(4, 1, 8, 8)
    torch.testing.assert_close(compiled(y), small(y), atol=1e-6, rtol=0)


def test_precision_null_is_bf16_on_a_gpu_with_bf16_and_fp32_elsewhere():
    assert default_precision("cpu", cuda=True, bf16=True) == "32-true"
    assert default_precision("auto", cuda=False, bf16=False) == "32-true"
    assert default_precision("auto", cuda=True, bf16=True) == "bf16-mixed"
    assert default_precision("gpu", cuda=True, bf16=False) == "32-true"  # V100-era GPUs: no bf16
    assert default_precision(None, cuda=True, bf16=True) == "bf16-mixed"


@pytest.mark.parametrize("device, in_chans, size, nhwc", [("cuda", 1, 8, True), ("cpu", 3, 32, True),
                                                        ("cpu", 1, 8, False), ("cpu", 3, 16, False)])
def test_channels_last_by_default_where_it_was_measured_to_win(device, in_chans, size, nhwc):
    """channels_last=None (the default) turns NHWC on in setup for a CUDA run and for a CPU run on RGB images of
    32 px or more (the effect tables' step: 1.12x in `make bench` cpu_step); digits-size grey images keep NCHW;
    an explicit false stays off."""
    from types import SimpleNamespace

    conv = lambda m: [c for c in m.trunk.modules() if isinstance(c, torch.nn.Conv2d)][-1]
    for channels_last, expected in ((None, nhwc), (False, False)):
        model = ISIF(backbone="small_cnn", in_chans=in_chans, embedding_dim=16, channels_last=channels_last)
        model._trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device(device)),
                                         datamodule=SimpleNamespace(image_size=size))
        model.setup("fit")
        assert conv(model).weight.is_contiguous(memory_format=torch.channels_last) == expected
        assert model._forward_pre_hooks == {} and bool(model.trunk._forward_pre_hooks) == expected
