"""ROUL's pieces by hand (lightning_modules/roul.py): Φ's anti-symmetry, L_ROC / L_MOC / L_O / the
marginal-variance term on tiny cases, the detach rules (each loss trains only its network), core regions,
the ternary order targets, and the memory bank's labels read by index."""
import math

import pytest
import torch
import torch.nn.functional as F

from lightning_modules.losses import ms_mined_pairs, multi_similarity_loss
from lightning_modules.roul import (
    AUG,
    NONE,
    OTHER,
    ROUL,
    SAME,
    OrderHead,
    comparison_items,
    core_regions,
    distance_gaps,
    item_kinds,
    marginal_variance,
    metric_order_consistency,
    order_loss,
    order_targets,
    reduce_orders,
    relative_order_consistency,
)


@pytest.mark.parametrize("n", [3, 9, 81])
def test_order_head_is_anti_symmetric_for_any_list_size(n):
    torch.manual_seed(n)
    head = OrderHead(16, hidden=32, pair_dim=16, head_dim=8)
    anchor, items = torch.randn(2, 16), torch.randn(2, n, 16)
    orders = head(anchor, items)
    assert orders.shape == (2, n, n)
    assert torch.allclose(orders, -orders.transpose(1, 2), atol=1e-6)
    assert torch.equal(orders.diagonal(dim1=1, dim2=2), torch.zeros(2, n))
    assert orders.abs().max() > 1e-3  # not trivially zero
    swap = torch.arange(n)
    swap[[0, 1]] = swap[[1, 0]]  # swapping a pair in the list flips its prediction
    swapped = head(anchor, items[:, swap])
    assert torch.allclose(swapped[:, 0, 1], -orders[:, 0, 1], atol=1e-6)
    assert torch.allclose(swapped, orders[:, swap][:, :, swap], atol=1e-6)


def hand_case():
    """Anchor at 0, C_1 at distance 1, C_2 at distance 2: D(1, 2) = −1; Ô(1, 2) = 0.5."""
    anchor = torch.zeros(1, 2)
    items = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]], requires_grad=True)
    orders = torch.tensor([[[0.0, 0.5], [-0.5, 0.0]]], requires_grad=True)
    return anchor, items, orders


def test_distance_gaps_by_hand():
    anchor, items, _ = hand_case()
    assert torch.allclose(distance_gaps(anchor, items), torch.tensor([[[0.0, -1.0], [1.0, 0.0]]]))


def test_roc_by_hand_trains_the_embedding_only():
    anchor, items, orders = hand_case()
    gaps = distance_gaps(anchor, items)
    loss = relative_order_consistency(orders, gaps, alpha=0.1)
    assert loss.item() == pytest.approx(0.5 * math.exp(-0.1))  # Σ_{n,m} relu(Ô) e^{αD} of the one anchor
    old = relative_order_consistency(orders, gaps, alpha=0.1, reduction="batch_pairs")
    assert old.item() == pytest.approx(0.5 * math.exp(-0.1) / 4)  # the old mean over B·N²
    grad_orders, grad_items = torch.autograd.grad(loss, [orders, items], allow_unused=True)
    assert grad_orders is None
    assert grad_items.abs().sum() > 0


def test_moc_by_hand_trains_the_order_predictor_only():
    anchor, items, orders = hand_case()
    gaps = distance_gaps(anchor, items)
    loss = metric_order_consistency(orders, gaps, beta=0.1)
    assert loss.item() == pytest.approx((1 - 0.5) * math.log10(2) * 1)  # (1 − Ô)|log_0.1(1 − D)| relu(−D), one pair
    grad_orders, grad_items = torch.autograd.grad(loss, [orders, items], allow_unused=True)
    assert grad_items is None
    assert grad_orders[0, 0, 1].item() == pytest.approx(-math.log10(2))
    literal = metric_order_consistency(orders, gaps, beta=0.1, sign="literal")
    assert literal.item() == pytest.approx(-loss.item())  # the printed signed log_0.1 (docs/methods/roul.md)


def test_moc_weight_is_finite_and_non_negative_over_the_whole_range():
    gaps = torch.linspace(-2, 2, 401).view(1, 1, -1)
    loss = metric_order_consistency(torch.zeros_like(gaps), gaps, beta=0.1)
    assert torch.isfinite(loss) and loss > 0


def test_order_loss_by_hand():
    _, _, orders = hand_case()
    targets = torch.tensor([[[0.0, 1.0], [-1.0, 0.0]]])
    mask = torch.tensor([[[0.0, 1.0], [1.0, 0.0]]])
    assert order_loss(orders, targets, mask).item() == pytest.approx(0.25)
    assert order_loss(orders, targets, torch.zeros_like(mask)).item() == 0.0


def test_marginal_variance_by_hand():
    embedding = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]])
    labels = torch.tensor([0, 0, 1])
    # item 0: μ = 0.1·0.8 + 0.9·0 = 0.08, V = 0.08²; item 1: μ = 0.08 + 0.9·0.6, V = (0.6 − 0.62)²;
    # item 2 has no positive: 0
    expected = (0.08**2 + 0.02**2) / 3
    assert marginal_variance(embedding, labels, h=0.1).item() == pytest.approx(expected)


def test_order_targets_reproduce_the_table_with_symmetric_masks():
    kinds = torch.tensor([[AUG, AUG, SAME, SAME, OTHER, OTHER, NONE]])
    targets, mask = order_targets(kinds)
    t, known = targets[0], mask[0].bool()
    assert torch.equal(known, known.T) and not known.diagonal().any()
    assert torch.equal(t * known, -(t * known).T)
    assert known[0, 1] and t[0, 1] == 0          # aug vs aug: 0
    assert not known[0, 2]                        # aug vs same core: masked
    assert known[0, 4] and t[0, 4] == 1           # aug vs other core: +1
    assert known[2, 3] and t[2, 3] == 0           # same vs same: 0
    assert known[2, 4] and t[2, 4] == 1           # same vs other: +1
    assert known[4, 2] and t[4, 2] == -1          # other vs same: −1
    assert not known[4, 5]                        # other vs other: masked
    assert not known[6].any() and not known[:, 6].any()  # outside every core: masked
    assert order_targets(kinds, other_other="zero")[1][0, 4, 5] == 1


def test_item_kinds_from_cores_and_pseudo_labels():
    labels = torch.tensor([0, 0, 1, 1])
    core = torch.tensor([True, True, True, False])
    kinds = item_kinds(labels, core, num_augs=1)
    assert kinds[0].tolist() == [SAME, OTHER, NONE, AUG]   # items 1, 2, 3, then the self-aug
    assert kinds[2].tolist() == [OTHER, OTHER, NONE, AUG]  # items 0, 1, 3
    assert kinds[3].tolist() == [NONE] * 4                # an anchor outside the cores
    view0, aug = torch.arange(4.0)[:, None], 10 + torch.arange(4.0)[:, None]
    assert comparison_items(view0, [aug])[2, :, 0].tolist() == [0.0, 1.0, 3.0, 12.0]


def test_core_regions_literal_rule_and_fallback():
    # two tight clusters 2 apart: r_core = 2/3 takes every member (the literal rule, disjoint cores)
    tight = torch.tensor([[0.0], [0.1], [-0.1], [0.2], [2.0], [2.1], [1.9]])
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 1])
    centers = torch.tensor([[0.05], [2.0]])
    core, stats = core_regions(tight, labels, centers)
    assert core.all() and stats["core_literal_fraction"] == 1.0 and stats["core_fallback_clusters"] == 0
    # spread clusters: r_core = 1/3 takes 1 of 10 in cluster 0 -> fallback to the ⌈0.3·10⌉ = 3 nearest;
    # cluster 1 (2 members, none within r_core) -> its 2 members (at least 2)
    spread = torch.cat([torch.linspace(-2, 2, 10), torch.tensor([0.5, 1.5])])[:, None]
    labels = torch.tensor([0] * 10 + [1] * 2)
    centers = torch.tensor([[0.0], [1.0]])
    core, stats = core_regions(spread, labels, centers)
    assert core[:10].sum() == 3 and core[10:].all()
    nearest = (spread[:10, 0] - 0.0).abs().argsort()[:3]
    assert core[nearest].all()
    assert stats["core_fallback_clusters"] == 2
    assert core_regions(spread, labels, centers, rule="quantile")[0].sum() == 5
    with pytest.raises(ValueError, match="core_rule"):
        core_regions(spread, labels, centers, rule="nearest")


def small_roul(**kwargs) -> ROUL:
    torch.manual_seed(0)
    return ROUL(**{"backbone": "small_cnn", "in_chans": 1, "embedding_dim": 8, "order_hidden": 16,
                   "order_pair_dim": 8, "order_head_dim": 8, "center_features": True, **kwargs})


def test_each_loss_reaches_only_its_own_network():
    model = small_roul()
    embedding = F.normalize(torch.randn(12, 8), dim=1)
    labels = torch.arange(12) % 3
    model.set_pseudo_labels(labels, torch.randn(3, 8), embedding)
    images, index = torch.randn(6, 1, 8, 8), torch.arange(6)
    views = [images, images.flip(-1), images.flip(-2)]  # view 0 and L = 2 self-augs
    pooled = model.pooled(torch.cat(views))
    z, u = model.head(pooled), F.normalize(pooled, dim=1).detach()
    terms = model.order_terms(z, u, labels[index], index, torch.Generator().manual_seed(0))
    assert terms["order_pairs"] > 0
    phi = list(model.order_head.parameters())
    embedding_net = list(model.trunk.parameters()) + list(model.head.parameters())
    for name, own, other in (("roc", embedding_net, phi), ("moc", phi, embedding_net), ("order", phi, embedding_net)):
        grads = torch.autograd.grad(terms[name], own + other, allow_unused=True, retain_graph=True)
        own_grads, other_grads = grads[:len(own)], grads[len(own):]
        assert any(g is not None and g.abs().sum() > 0 for g in own_grads), name
        assert all(g is None or g.abs().sum() == 0 for g in other_grads), name


def test_memory_labels_are_read_by_index_after_a_re_clustering():
    model = small_roul()
    embedding = F.normalize(torch.randn(10, 8), dim=1)
    model.set_pseudo_labels(torch.arange(10) % 2, torch.randn(2, 8), embedding)
    model.enqueue(torch.zeros(3, 8), torch.tensor([7, 8, 9]))
    assert model.memory_index[:3].tolist() == [7, 8, 9]
    assert model.pseudo_labels[model.memory_index][:3].tolist() == [1, 0, 1]
    model.set_pseudo_labels(torch.arange(10) // 5, torch.randn(2, 8), None)  # relabel, bank kept (resume path)
    assert model.pseudo_labels[model.memory_index][:3].tolist() == [1, 1, 1]


def test_the_baseline_row_runs_no_order_predictor():
    assert not small_roul(roc_weight=0.0, moc_weight=0.0, order_weight=0.0).uses_orders
    assert small_roul(moc_weight=0.0).uses_orders
    with pytest.raises(ValueError, match="moc_sign"):
        small_roul(moc_sign="signed")


def test_cores_and_memory_survive_a_checkpoint():
    model = small_roul()
    embedding = F.normalize(torch.randn(10, 8), dim=1)
    model.set_pseudo_labels(torch.arange(10) % 2, torch.randn(2, 8), embedding)
    model.enqueue(torch.ones(2, 8), torch.tensor([3, 4]))
    checkpoint = {"state_dict": model.state_dict()}
    restored = small_roul()
    restored.on_load_checkpoint(checkpoint)
    restored.load_state_dict(checkpoint["state_dict"])
    assert torch.equal(restored.core, model.core) and restored.core.sum() >= 4
    assert torch.equal(restored.memory_embedding, model.memory_embedding)
    assert torch.equal(restored.memory_index, model.memory_index) and restored.memory_cursor == 2


def test_reduce_orders_by_hand():
    pairwise = torch.arange(8.0).view(2, 2, 2)  # anchor sums 6 and 22
    assert reduce_orders(pairwise, "anchor").item() == 14.0
    assert reduce_orders(pairwise, "sum").item() == 28.0
    assert reduce_orders(pairwise, "batch_pairs").item() == 3.5
    with pytest.raises(ValueError, match="order_reduction"):
        reduce_orders(pairwise, "mean")


def init_shares(**kwargs) -> dict[str, float]:
    """Gradient norms of each weighted term at init, B = 80 (N = 81 with L = 2), 10 pseudo classes: F_γ's
    terms at the embeddings, Φ's at its output."""
    torch.manual_seed(0)
    model = small_roul(embedding_dim=64, roc_warmup_epochs=0, **kwargs)
    labels = torch.arange(400) % 10
    model.set_pseudo_labels(labels, F.normalize(torch.randn(10, 64), dim=1), F.normalize(torch.randn(400, 64), dim=1))
    images, index = torch.randn(80, 1, 8, 8), torch.arange(80)
    pooled = torch.cat([model.pooled(images), model.pooled(torch.cat([images.flip(-1), images.flip(-2)]))])
    z, u = model.head(pooled), F.normalize(pooled, dim=1).detach()
    _, terms = model.ms_with_memory(z[:80], labels[index], index, model.batch_ms)
    order = model.order_terms(z, u, labels[index], index, torch.Generator().manual_seed(0))
    terms.update({k: order[k] for k in ("roc", "moc", "order")})
    embedding, phi = model.weighted_terms(terms)
    norms = {k: torch.autograd.grad(v, z, retain_graph=True)[0].norm().item() for k, v in embedding.items()}
    norms.update({k: torch.autograd.grad(v, order["orders"], retain_graph=True)[0].norm().item()
                  for k, v in phi.items()})
    return norms


def test_order_terms_have_a_real_share_of_the_gradient_at_the_paper_weights():
    """At B = 80, N = 81 the old mean over B·N² left 0.1·∇L_ROC ~1e-5 of the MS gradient and ∇L_MOC ~1e-3 of
    ∇L_O's; the per-anchor sums (averaged over anchors) give them a share (measured 0.31 and 4.7)."""
    norms = init_shares()
    assert norms["roc"] / norms["ms_memory"] > 0.1
    assert norms["moc"] / norms["order"] > 1.0
    old = init_shares(order_reduction="batch_pairs")
    assert old["roc"] / old["ms_memory"] < 1e-3 and old["moc"] / old["order"] < 1e-2


def test_the_gradient_shares_are_logged_and_sum_to_one_per_network():
    model = small_roul(roc_warmup_epochs=0)
    labels = torch.arange(40) % 4
    model.set_pseudo_labels(labels, F.normalize(torch.randn(4, 8), dim=1), F.normalize(torch.randn(40, 8), dim=1))
    pooled = model.pooled(torch.randn(24, 1, 8, 8))
    z, u = model.head(pooled), F.normalize(pooled, dim=1).detach()
    index = torch.arange(8)
    _, terms = model.ms_with_memory(z[:8], labels[index], index, model.batch_ms)
    order = model.order_terms(z, u, labels[index], index, torch.Generator().manual_seed(0))
    terms.update({k: order[k] for k in ("roc", "moc", "order")})
    shares = model.gradient_shares(terms, z, order["orders"])
    assert set(shares) == {"ms_memory", "roc", "moc", "order"}  # no in-batch MS term (Eq. 7)
    assert sum(shares[k] for k in ("ms_memory", "roc")).item() == pytest.approx(1.0)
    assert (shares["moc"] + shares["order"]).item() == pytest.approx(1.0)
    assert shares["roc"] > 0 and shares["moc"] > 0


def test_the_bank_leaves_out_the_querys_own_copies():
    """After a refill the FIFO overwrites from slot 0, so slots past the cursor still hold the clustered copy
    of a query: a same-label "positive" that is the query itself. Masked by dataset index."""
    torch.manual_seed(0)
    model = small_roul()
    bank = F.normalize(torch.randn(10, 8), dim=1)
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 0, 1, 0, 1])
    model.set_pseudo_labels(labels, torch.randn(2, 8), bank)
    model.enqueue(F.normalize(torch.randn(3, 8), dim=1), torch.tensor([7, 3, 2]))  # bank index [7,3,2,3,4,...,9]
    assert model.memory_index.tolist() == [7, 3, 2, 3, 4, 5, 6, 7, 8, 9]
    query, index = F.normalize(bank[[3]] + 0.05 * torch.randn(1, 8), dim=1), torch.tensor([3])
    assert model.own_copies(index).nonzero()[:, 1].tolist() == [1, 3]
    _, terms = model.ms_with_memory(query, labels[index], index)
    keep = torch.tensor([0, 2, 4, 5, 6, 7, 8, 9])
    expected = multi_similarity_loss(query, labels[index], model.memory_embedding[keep], labels[model.memory_index[keep]])
    assert terms["ms_memory"].item() == pytest.approx(expected.item(), rel=1e-6)
    stale = multi_similarity_loss(query, labels[index], model.memory_embedding, model.memory_labels())
    assert abs(stale.item() - expected.item()) > 1e-3  # the copies did change the loss


def test_ms_mined_pairs_follow_the_library_miner():
    from pytorch_metric_learning import miners

    torch.manual_seed(1)
    query, keys = F.normalize(torch.randn(12, 8), dim=1), F.normalize(torch.randn(30, 8), dim=1)
    qlabels, klabels = torch.randint(0, 3, (12,)), torch.randint(0, 3, (30,))
    a1, p, a2, n = miners.MultiSimilarityMiner(epsilon=0.1)(query, qlabels, keys, klabels)
    same = qlabels[:, None] == klabels[None, :]
    positive, negative = ms_mined_pairs(query @ keys.T, same, torch.ones_like(same), 0.1)
    assert set(zip(a1.tolist(), p.tolist())) == set(map(tuple, positive.nonzero().tolist()))
    assert set(zip(a2.tolist(), n.tolist())) == set(map(tuple, negative.nonzero().tolist()))
    masked = multi_similarity_loss(query, qlabels, keys, klabels, exclude=torch.zeros_like(same))
    assert masked.item() == pytest.approx(multi_similarity_loss(query, qlabels, keys, klabels).item(), rel=1e-6)


def test_the_fen_loss_is_eq7_the_batch_against_the_bank():
    """Eq. 7's S is between the batch and the bank: no in-batch MS term unless batch_ms (an option)."""
    model = small_roul()
    labels = torch.arange(20) % 2
    model.set_pseudo_labels(labels, torch.randn(2, 8), F.normalize(torch.randn(20, 8), dim=1))
    z, index = F.normalize(torch.randn(6, 8), dim=1), torch.arange(6)
    loss, terms = model.ms_with_memory(z, labels[index], index, model.batch_ms)
    assert set(terms) == {"ms_memory"} and loss.item() == pytest.approx(terms["ms_memory"].item())
    extra = small_roul(batch_ms=True)
    extra.set_pseudo_labels(labels, torch.randn(2, 8), model.memory_embedding)
    loss, terms = extra.ms_with_memory(z, labels[index], index, extra.batch_ms)
    assert set(terms) == {"ms", "ms_memory"}
    assert loss.item() == pytest.approx((terms["ms"] + terms["ms_memory"]).item())
    with pytest.raises(ValueError, match="batch_ms"):
        small_roul(memory_weight=0.0)
