"""UMM's pure pieces against independent computations: Eq. 5-7 by explicit sums, the KL by
torch.distributions, histogram AP by brute-force ranking, and gradients through the sampling."""
import math
from pathlib import Path

import pytest
import torch
import yaml
from torch.distributions import Independent, Normal, kl_divergence

from datamodules.digits import DigitsDataModule
from embedding_core.distances import l2_normalize
from lightning_modules.heads import GaussianHead
from lightning_modules.umm import (
    UMM,
    distribution_consistency_loss,
    histogram_average_precision,
    ranking_loss,
    sample_candidates,
    set_softmax_loss,
)


def unit(*shape, seed=0):
    return l2_normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))


def test_set_softmax_equals_the_double_sum_of_eq5():
    n, k, tau = 3, 2, 0.5
    z1, z2 = unit(n, k, 4, seed=1), unit(n, k, 4, seed=2)

    def d(a, b):  # Eq. 5, mean average inner product of two candidate sets
        return sum(float(a[u] @ b[t]) for u in range(k) for t in range(k)) / k**2

    nll = [-math.log(math.exp(d(z1[i], z2[i]) / tau) / sum(math.exp(d(z1[j], z2[i]) / tau) for j in range(n)))
           for i in range(n)]  # Eq. 6-7, anchor x'_i against the first-view sets
    assert set_softmax_loss(z1, z2, tau).item() == pytest.approx(sum(nll) / n, rel=1e-6)
    reverse = set_softmax_loss(z2, z1, tau).item()
    assert set_softmax_loss(z1, z2, tau, "symmetric").item() == pytest.approx((sum(nll) / n + reverse) / 2, rel=1e-6)


def test_zero_variance_gives_mu_and_ls_becomes_cross_view_infonce():
    mu = unit(4, 1, 8, seed=4)
    z = sample_candidates(mu, torch.full_like(mu, -60.0), 5)
    assert torch.allclose(z, mu.expand(4, 5, 8).float(), atol=1e-6)
    z1, z2 = z, sample_candidates(unit(4, 1, 8, seed=5), torch.full_like(mu, -60.0), 5)
    logits = z2[:, 0] @ z1[:, 0].T / 0.1
    infonce = torch.nn.functional.cross_entropy(logits, torch.arange(4))
    assert set_softmax_loss(z1, z2, 0.1).item() == pytest.approx(infonce.item(), rel=1e-5)


def test_consistency_equals_the_closed_form_kl_both_ways():
    mu1, mu2 = unit(5, 6, seed=6), unit(5, 6, seed=7)
    g = torch.Generator().manual_seed(8)
    logvar1, logvar2 = torch.randn(5, 6, generator=g, dtype=torch.float64), torch.randn(5, 6, generator=g,
                                                                                        dtype=torch.float64)
    p = Independent(Normal(mu1, torch.exp(0.5 * logvar1)), 1)
    q = Independent(Normal(mu2, torch.exp(0.5 * logvar2)), 1)
    expected = (kl_divergence(p, q) + kl_divergence(q, p)).mean()
    summed = distribution_consistency_loss(mu1, logvar1, mu2, logvar2, reduction="sum")
    assert summed.item() == pytest.approx(expected.item(), rel=1e-5)
    assert distribution_consistency_loss(mu1, logvar1, mu2, logvar2).item() == pytest.approx(expected.item() / 6,
                                                                                              rel=1e-5)
    assert distribution_consistency_loss(mu1, logvar1, mu1, logvar1).item() == 0.0


def test_consistency_reductions_by_hand_on_two_instances_in_three_dimensions():
    """Instance 1: unit variances, means e1 vs e2: ½ Σ_d 2 Δ_d² = 2. Instance 2: equal means, σ'² = (2, 1, ½):
    ½ Σ_d (r + 1/r - 2) = ½ (½ + 0 + ½) = ½. Sum over D, mean over instances: 5/4; mean over D too: 5/12."""
    mu1 = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    mu2 = torch.tensor([[0.0, 1.0, 0.0], [0.0, 1.0, 0.0]])
    logvar1 = torch.zeros(2, 3)
    logvar2 = torch.tensor([[0.0, 0.0, 0.0], [math.log(2.0), 0.0, -math.log(2.0)]])
    assert distribution_consistency_loss(mu1, logvar1, mu2, logvar2).item() == pytest.approx(5 / 12, rel=1e-6)
    assert distribution_consistency_loss(mu1, logvar1, mu2, logvar2, "sum").item() == pytest.approx(5 / 4, rel=1e-6)
    with pytest.raises(ValueError, match="mean, sum"):
        distribution_consistency_loss(mu1, logvar1, mu2, logvar2, "batchmean")
    with pytest.raises(ValueError, match="mean, sum"):
        UMM(backbone="small_cnn", in_chans=1, consistency_reduction="none")


@pytest.mark.parametrize("protocol", ["cifar10", "stl10"])
def test_paper_lambda_n_weighs_like_ls_and_lr_at_initialisation(protocol):
    """The issue: with L_N summed over D = 128, the paper's λ_N = 10 put λ_N L_N at ~1,400 here at random
    init against L_S ≈ log n ≈ 5 and λ_R L_R ≈ 7, so σ² ran to its clamp. The default (mean over D) must bring it
    within an order of magnitude of both; "sum" is exactly D times larger and is not. The model is the
    shipped config's (τ, λ's, D, k, heads) on a digits batch of the config's size (in_chans = 1)."""
    config = yaml.safe_load(Path(f"experiments/configs/umm/{protocol}.yaml").read_text())
    args = {k: v for k, v in config["model"]["init_args"].items()
            if k not in ("optim", "schedule", "gather_negatives")}  # no Trainer, so no DDP gather
    assert args.pop("consistency_reduction") == "mean" and args["lambda_n"] == 10.0 and args["embedding_dim"] == 128
    dm = DigitsDataModule(batch_size=config["data"]["init_args"]["batch_size"], num_workers=0)
    dm.setup("fit")
    v1, v2 = next(iter(dm.train_dataloader()))["views"][:2]
    terms = {}
    for reduction in ("mean", "sum"):
        torch.manual_seed(0)
        model = UMM(**args, in_chans=1, consistency_reduction=reduction, gather_negatives=False)
        with torch.no_grad():
            terms[reduction] = {k: v.item() for k, v in model.loss_terms(v1, v2)[0].items()}
    lam_n, lam_r = args["lambda_n"], args["lambda_r"]
    new, old = terms["mean"], terms["sum"]
    assert old["consistency"] == pytest.approx(128 * new["consistency"], rel=1e-5)
    for reference in (new["set_softmax"], lam_r * new["ranking"]):
        assert 0.1 < lam_n * new["consistency"] / reference < 10
    assert lam_n * old["consistency"] > 10 * max(old["set_softmax"], lam_r * old["ranking"])


def brute_force_ap(sim: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """AP per row by sorting: mean over the positive columns of (positives ranked at or above) / rank."""
    aps = []
    for s, cols in zip(sim.tolist(), positive.tolist()):
        ranked = [j in cols for j in sorted(range(len(s)), key=lambda j: -s[j])]
        hits = [sum(ranked[: r + 1]) / (r + 1) for r, is_positive in enumerate(ranked) if is_positive]
        aps.append(sum(hits) / len(hits))
    return torch.tensor(aps, dtype=torch.float64)


def test_histogram_ap_is_exact_ap_on_distinct_bin_centres_of_a_fine_histogram():
    bins, queries, items, positives = 1000, 6, 40, 9
    g = torch.Generator().manual_seed(9)
    centre = torch.stack([torch.randperm(bins + 1, generator=g)[:items] for _ in range(queries)])
    sim = 1.0 - centre.double() * (2.0 / bins)
    positive = torch.stack([torch.randperm(items, generator=g)[:positives] for _ in range(queries)])
    ap = histogram_average_precision(sim, positive, bins)
    assert torch.allclose(ap.double(), brute_force_ap(sim, positive), atol=1e-6)
    excluded = positive[:, :1]  # leaving a positive out of the list = dropping it from the ranking
    kept = positive[:, 1:]
    dropped = sim.scatter(1, excluded, -float("inf"))
    assert torch.allclose(histogram_average_precision(sim, kept, bins, excluded).double(),
                          brute_force_ap(dropped, kept), atol=1e-6)


def dense_reference_loss(z1, z2, bins):
    """L_R (Eqs. 11-12) with the full (M, M, B + 1) triangular-kernel tensor, both views pooled."""
    items = torch.cat([z1, z2]).flatten(0, 1).double()
    n, k = z1.shape[:2]
    instance = torch.arange(n).repeat_interleave(k).repeat(2)
    sim = items @ items.T
    centres = 1.0 - torch.arange(bins + 1, dtype=torch.float64) * (2.0 / bins)
    kernel = (1.0 - (sim[..., None] - centres).abs() / (2.0 / bins)).clamp(min=0.0)
    listed = ~torch.eye(len(items), dtype=torch.bool)
    positive = (instance[:, None] == instance[None, :]) & listed
    h = (kernel * listed[..., None]).sum(1)
    h_pos = (kernel * positive[..., None]).sum(1)
    ap = (h_pos * h_pos.cumsum(1) / h.cumsum(1).clamp_min(1e-12)).sum(1) / positive.sum(1)
    return 1.0 - ap.mean()


def test_ranking_loss_and_its_gradient_equal_the_dense_kernel_formula():
    z1, z2 = unit(4, 3, 5, seed=10).requires_grad_(), unit(4, 3, 5, seed=11)
    expected = dense_reference_loss(z1, z2, 20)
    (expected_grad,) = torch.autograd.grad(expected, z1)
    loss = ranking_loss(z1, z2, bins=20)
    (grad,) = torch.autograd.grad(loss, z1)
    assert loss.item() == pytest.approx(expected.item(), abs=1e-6)
    assert torch.allclose(grad.double(), expected_grad, atol=1e-5) and expected_grad.abs().max() > 1e-3


def test_chunks_and_shards_give_the_full_loss_and_gradient():
    z1, z2 = unit(4, 3, 5, seed=12).float().requires_grad_(), unit(4, 3, 5, seed=13).float()
    full = ranking_loss(z1, z2, bins=10)
    (grad_full,) = torch.autograd.grad(full, z1)
    chunked = ranking_loss(z1, z2, bins=10, chunk=5)
    (grad_chunked,) = torch.autograd.grad(chunked, z1)
    assert chunked.item() == pytest.approx(full.item(), abs=1e-6)
    assert torch.allclose(grad_chunked, grad_full, atol=1e-6)
    shards = [ranking_loss(z1, z2, bins=10, shard=(i, 3)) for i in range(3)]
    assert sum(s.item() for s in shards) / 3 == pytest.approx(full.item(), abs=1e-6)


def test_literal_pool_is_constant_at_k1_but_both_views_is_not():
    z1, z2 = torch.eye(6)[:3, None].clone().requires_grad_(), (torch.eye(6)[3:, None] + 0.3).requires_grad_()
    literal = ranking_loss(z1, l2_normalize(z2), pool="single_view_literal")
    literal.backward()
    assert literal.item() == 0.0 and z1.grad.abs().max() == 0.0
    z1.grad = None
    both = ranking_loss(z1, l2_normalize(z2))
    both.backward()
    assert both.item() > 0.0 and z1.grad.abs().max() > 0.0


def test_sampling_is_differentiable_in_mean_and_variance():
    mu = unit(3, 1, 8, seed=14).float().requires_grad_()
    logvar = torch.full((3, 1, 8), -2.0, requires_grad=True)
    z = sample_candidates(mu, logvar, 4, generator=torch.Generator().manual_seed(0))
    assert z.shape == (3, 4, 8) and torch.allclose(z.norm(dim=-1), torch.ones(3, 4))
    (set_softmax_loss(*z.chunk(2, dim=1)) + ranking_loss(*z.chunk(2, dim=1))).backward()
    assert mu.grad.abs().sum() > 0 and logvar.grad.abs().sum() > 0
    again = sample_candidates(mu, logvar, 4, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again, z)


def test_mixture_candidates_take_components_in_turn():
    mu = torch.stack([torch.eye(4)[0], torch.eye(4)[1]])[None]  # one image, C = 2 components
    z = sample_candidates(mu, torch.full_like(mu, -60.0), 5)
    assert torch.allclose(z[0], mu[0, [0, 1, 0, 1, 0]])


@pytest.mark.parametrize("variance", ["exp", "softplus"])
def test_gaussian_head_starts_at_variance_one_over_d_and_clamps(variance):
    head = GaussianHead(16, out_dim=32, components=2, variance=variance)
    x = torch.randn(5, 16)
    mu, logvar = head.moments(x)
    assert mu.shape == logvar.shape == (5, 2, 32)
    assert torch.allclose(mu.norm(dim=-1), torch.ones(5, 2))
    assert logvar.exp().mean().item() == pytest.approx(1 / 32, rel=0.05)
    assert torch.allclose(head(x), l2_normalize(mu.mean(1)))
    with torch.no_grad():
        head.log_variance.bias.fill_(50.0)
    assert head.moments(x)[1].max().item() == 2.0


def test_bad_options_name_the_fix():
    with pytest.raises(ValueError, match="literal, symmetric, isif_2n"):
        set_softmax_loss(unit(2, 1, 3), unit(2, 1, 3), mode="both")
    with pytest.raises(ValueError, match="both_views, single_view_literal"):
        ranking_loss(unit(2, 1, 3), unit(2, 1, 3), pool="all")


def test_l_n_is_an_alignment_pull_weighted_by_the_inverse_variance():
    """Why lambda_N = 10 collapses mu on digits (issue 22, item 16; docs/methods/umm.md). L_N averaged over D at
    equal variances is (1/D) sum_d (mu_d - mu'_d)^2 / sigma^2: at the head's initial sigma^2 = 1/D exactly the mean
    ||mu - mu'||^2, a pull of the two views together with no push between instances, and its weight on mu grows
    as 1/sigma^2 while training shrinks sigma (UMM Fig. 10). At the paper's lambda_N = 10 its gradient on mu is
    several times L_S's from the first step (digits, measured: 3.3x, mu collapsing within 4 SGD steps); at the
    digits config's 0.64 it is a fraction (0.2x)."""
    g = torch.Generator().manual_seed(0)
    n, d = 64, 64
    base = l2_normalize(torch.randn(n, d, generator=g))
    mu1 = l2_normalize(base + 0.15 * torch.randn(n, d, generator=g)).requires_grad_()
    mu2 = l2_normalize(base + 0.15 * torch.randn(n, d, generator=g)).requires_grad_()
    initial = torch.full((n, d), math.log(1.0 / d))  # GaussianHead's start
    consistency = distribution_consistency_loss(mu1, initial, mu2, initial, "mean")
    assert consistency.item() == pytest.approx((mu1 - mu2).pow(2).sum(1).mean().item(), rel=1e-5)
    pull = torch.autograd.grad(10.0 * consistency, mu1)[0]
    torch.testing.assert_close(pull, 2 * 10.0 * (mu1 - mu2).detach() / n)
    halved = distribution_consistency_loss(mu1, initial - math.log(2.0), mu2, initial - math.log(2.0), "mean")
    torch.testing.assert_close(torch.autograd.grad(10.0 * halved, mu1)[0], 2 * pull)
    z1, z2 = sample_candidates(torch.stack([mu1, mu2], 1).flatten(0, 1)[:, None],
                               initial.repeat_interleave(2, 0)[:, None], 5, g).view(n, 2, 5, d).unbind(1)
    spread = torch.autograd.grad(set_softmax_loss(z1, z2, 0.1), mu1)[0]
    assert pull.norm() > 2 * spread.norm()  # lambda_N = 10: L_N leads
    assert 0.064 * pull.norm() < 0.5 * spread.norm()  # lambda_N = 0.64: L_S leads


@pytest.mark.parametrize("lambda_n, consistency_leads", [(10.0, True), (0.64, False)])
def test_the_gradient_shares_on_mu_are_logged_and_show_l_n_leading_at_the_papers_lambda(lambda_n, consistency_leads):
    """`grad_share/*` (logged every SHARE_EVERY steps) are each weighted term's gradient norm on μ over their sum. On a digits
    batch at init with the digits config, λ_N = 10 gives L_N the largest share (it then collapses μ within a
    few steps) and the shipped 0.64 leaves L_S ahead (docs/methods/umm.md)."""
    config = yaml.safe_load(Path("experiments/configs/umm/digits.yaml").read_text())
    args = {k: v for k, v in config["model"]["init_args"].items() if k not in ("optim", "schedule")}
    dm = DigitsDataModule(batch_size=128, num_workers=0)
    dm.setup("fit")
    v1, v2 = next(iter(dm.train_dataloader()))["views"][:2]
    torch.manual_seed(0)
    model = UMM(**{**args, "lambda_n": lambda_n, "gather_negatives": False})
    terms = model.loss_terms(v1, v2, shares=True)[0]
    shares = [terms[f"grad_share/{name}"].item() for name in ("set_softmax", "consistency", "ranking")]
    assert sum(shares) == pytest.approx(1.0, rel=1e-5)
    assert (shares[1] > shares[0]) == consistency_leads
