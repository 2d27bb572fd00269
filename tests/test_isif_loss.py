"""ISIF loss against values worked out by hand (ISIF paper §3.2; symmetric form: docs/methods/isif.md)."""
import math

import pytest
import torch

from lightning_modules.isif import isif_loss, isif_loss_literal

# f1, f2 (branch 1) and f̂1, f̂2 (branch 2); pairwise dots: a.b=0, a.c=.6, a.d=.8, b.c=.8, b.d=.6, c.d=.96
A, B, C, D = (1.0, 0.0), (0.0, 1.0), (0.6, 0.8), (0.8, 0.6)
TAU = 0.5  # logits = 2 x dot


def views():
    return torch.tensor([A, B]), torch.tensor([C, D])


def test_symmetric_two_instances_by_hand():
    e = math.exp
    # anchors a and b: candidates have logits {0, 1.2 (positive), 1.6}
    z_ab = 1 + e(1.2) + e(1.6)
    l_ab = -math.log(e(1.2) / z_ab) - math.log(1 - 1 / z_ab) - math.log(1 - e(1.6) / z_ab)
    # anchors c and d: candidates have logits {1.2 (positive), 1.6, 1.92}
    z_cd = e(1.2) + e(1.6) + e(1.92)
    l_cd = -math.log(e(1.2) / z_cd) - math.log(1 - e(1.6) / z_cd) - math.log(1 - e(1.92) / z_cd)
    out = isif_loss(*views(), temperature=TAU)
    assert out["loss"].item() == pytest.approx((2 * l_ab + 2 * l_cd) / 4, rel=1e-6)
    positive = (-2 * math.log(e(1.2) / z_ab) - 2 * math.log(e(1.2) / z_cd)) / 4
    assert out["positive"].item() == pytest.approx(positive, rel=1e-6)
    assert (out["positive"] + out["negative"]).item() == pytest.approx(out["loss"].item())


def test_hard_and_easy_half_by_hand():
    e = math.exp
    # each anchor keeps 1 of its 2 negatives: hard keeps the more similar one, easy the less similar one
    z_ab, z_cd = e(1.2) + e(1.6), e(1.2) + e(1.92)
    hard = (2 * (-math.log(e(1.2) / z_ab) - math.log(1 - e(1.6) / z_ab))
            + 2 * (-math.log(e(1.2) / z_cd) - math.log(1 - e(1.92) / z_cd))) / 4
    assert isif_loss(*views(), TAU, negative_selection="hard_half")["loss"].item() == pytest.approx(hard, rel=1e-6)
    z_ab, z_cd = 1 + e(1.2), e(1.2) + e(1.6)
    easy = (2 * (-math.log(e(1.2) / z_ab) - math.log(1 - 1 / z_ab))
            + 2 * (-math.log(e(1.2) / z_cd) - math.log(1 - e(1.6) / z_cd))) / 4
    assert isif_loss(*views(), TAU, negative_selection="easy_half")["loss"].item() == pytest.approx(easy, rel=1e-6)


def test_literal_two_instances_by_hand():
    e = math.exp
    # positives: f̂1 against {f1, f2} has logits (1.2, 1.6); f̂2 has (1.6, 1.2)
    p_pos = e(1.2) / (e(1.2) + e(1.6))
    # negatives: f1 against {f1, f2} has logits (2, 0) (self included), so P(2 | x1) = 1 / (e^2 + 1)
    p_neg = 1 / (e(2) + 1)
    expected = (-2 * math.log(p_pos) - 2 * math.log(1 - p_neg)) / 2
    assert isif_loss_literal(*views(), temperature=TAU)["loss"].item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("loss", [isif_loss, isif_loss_literal])
def test_single_instance_is_zero_and_finite(loss):
    z1 = torch.nn.functional.normalize(torch.randn(1, 8), dim=1).requires_grad_()
    z2 = torch.nn.functional.normalize(torch.randn(1, 8), dim=1)
    out = loss(z1, z2)
    assert out["loss"].item() == pytest.approx(0.0, abs=1e-7)
    out["loss"].backward()
    assert torch.isfinite(z1.grad).all()


def test_large_logits_stay_finite_and_candidates_are_detached():
    z = torch.nn.functional.normalize(torch.ones(4, 16) + 1e-3 * torch.randn(4, 16), dim=1)
    z1 = z[:2].clone().requires_grad_()
    z2 = z[2:].clone().requires_grad_()
    out = isif_loss(z1, z2, temperature=0.01)
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and torch.isfinite(z1.grad).all()
    # detaching the candidates changes the gradient but not the value
    w1, w2 = z[:2].clone().requires_grad_(), z[2:].clone().requires_grad_()
    attached = isif_loss(w1, w2, temperature=0.01, detach_candidates=False)
    attached["loss"].backward()
    assert attached["loss"].item() == pytest.approx(out["loss"].item(), rel=1e-6)
    assert not torch.allclose(w1.grad, z1.grad)


def test_orthogonal_features_at_high_temperature_are_uniform():
    # P(k | a) -> 1 / (2N - 1): positive term -> log(2N - 1)
    z = torch.eye(6)
    out = isif_loss(z[:3], z[3:], temperature=1e6)
    assert out["positive"].item() == pytest.approx(math.log(5), rel=1e-4)
