"""Exact top-k search and k-means (embedding_core.search): both backends, hand-made cases."""

import pytest
import torch
import torch.nn.functional as F

from embedding_core import search
from embedding_core.metrics import nmi_from_labels

BACKENDS = ["faiss", "torch"]


def _unit(n: int, dim: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(n, dim, generator=torch.Generator().manual_seed(seed)), dim=1)


def _blobs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """3 blobs of 30 points, centres 10 apart, noise 0.05: any sane k-means separates them."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.tensor([[10.0, 0, 0, 0], [0, 10.0, 0, 0], [0, 0, 10.0, 0]])
    labels = torch.arange(3).repeat_interleave(30)
    return centres[labels] + 0.05 * torch.randn(90, 4, generator=g), labels


def test_backends_agree_without_ties():
    q, ref = _unit(50, 16, 0), _unit(300, 16, 1)
    s_f, i_f = search.topk_search(q, ref, 7, backend="faiss")
    s_t, i_t = search.topk_search(q, ref, 7, backend="torch")
    assert torch.equal(i_f, i_t)
    assert torch.allclose(s_f, s_t, atol=1e-5)
    assert torch.allclose(s_t, (q @ ref.T).topk(7).values, atol=1e-5)  # best first, exact
    assert i_f.dtype == i_t.dtype == torch.long


def test_backends_agree_as_sets_with_ties():
    # 4 distinct vectors, each stored twice: the top-4 of any query is 2 whole tie pairs.
    base = _unit(4, 8, 2)
    ref = base.repeat(2, 1)  # rows j and j + 4 are identical
    q = _unit(20, 8, 3)
    _, i_f = search.topk_search(q, ref, 4, backend="faiss")
    _, i_t = search.topk_search(q, ref, 4, backend="torch")
    for row_f, row_t in zip(i_f.tolist(), i_t.tolist()):
        assert set(row_f) == set(row_t)
        assert {(j + 4) % 8 for j in row_f} == set(row_f)  # whole pairs: each row's twin is there


@pytest.mark.parametrize("backend", BACKENDS)
def test_exclude_self_with_duplicates(backend):
    # 3 distinct vectors, 4 exact copies each: rows i, i+3, i+6, i+9 are identical.
    x = _unit(3, 8, 4).repeat(4, 1)
    sims, idx = search.topk_search(x, x, 5, exclude_self=True, backend=backend)
    rows = torch.arange(12)[:, None]
    assert idx.shape == (12, 5)
    assert not (idx == rows).any()
    for i in range(12):
        assert set(idx[i, :3].tolist()) == {j for j in range(12) if j % 3 == i % 3} - {i}
    assert torch.allclose(sims[:, :3], torch.ones(12, 3), atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_exclude_self_when_all_rows_tie(backend):
    # 6 identical rows, k = 1: self may or may not be among the 2 searched; never returned.
    x = _unit(1, 8, 5).repeat(6, 1)
    _, idx = search.topk_search(x, x, 1, exclude_self=True, backend=backend)
    assert not (idx[:, 0] == torch.arange(6)).any()


def test_drop_self_is_by_identity_not_position():
    sims = torch.tensor([[0.9, 0.8, 0.7], [1.0, 1.0, 0.5]])
    idx = torch.tensor([[3, 4, 5], [0, 1, 2]])  # row 0: self absent; row 1: self (1) in column 1
    s, i = search._drop_self(sims, idx)
    assert i.tolist() == [[3, 4], [0, 2]]
    assert torch.equal(s, torch.tensor([[0.9, 0.8], [1.0, 0.5]]))


def test_torch_topk_blockwise_matches_one_block(monkeypatch):
    q, ref = _unit(37, 8, 6), _unit(53, 8, 7)
    expected = search.topk_search(q, ref, 5, backend="torch")
    monkeypatch.setattr(search, "_BLOCK_ELEMENTS", 3 * 53)  # 3 query rows per block
    got = search.topk_search(q, ref, 5, backend="torch")
    assert torch.equal(got[1], expected[1])


def test_topk_errors_name_the_fix():
    x = _unit(5, 4, 8)
    with pytest.raises(ValueError, match=r"k must be in \[1, 4\]"):
        search.topk_search(x, x, 5, exclude_self=True)
    with pytest.raises(ValueError, match="same dim"):
        search.topk_search(x, _unit(5, 3, 8), 1)
    with pytest.raises(ValueError, match="exclude_self=False"):
        search.topk_search(x[:3], x, 1, exclude_self=True)
    with pytest.raises(ValueError, match="backend must be"):
        search.topk_search(x, x, 1, backend="annoy")


@pytest.mark.parametrize("backend", BACKENDS)
def test_kmeans_recovers_blobs_and_is_reproducible(backend):
    x, labels = _blobs()
    clusters = search.kmeans(x, 3, seed=1, backend=backend)
    assert clusters.shape == (90,) and clusters.dtype == torch.long
    assert nmi_from_labels(labels, clusters) == pytest.approx(100.0)
    assert torch.equal(clusters, search.kmeans(x, 3, seed=1, backend=backend))


def test_torch_kmeans_blockwise_matches_one_block(monkeypatch):
    x, _ = _blobs(1)
    expected = search.kmeans(x, 5, seed=0, restarts=2, backend="torch")
    monkeypatch.setattr(search, "_BLOCK_ELEMENTS", 7 * 5)
    assert torch.equal(search.kmeans(x, 5, seed=0, restarts=2, backend="torch"), expected)


def test_kmeans_more_clusters_than_points():
    with pytest.raises(ValueError, match=r"num_clusters must be in \[1, 4\] for 4 points"):
        search.kmeans(torch.zeros(4, 2), 5)


def test_faiss_gpu_is_chosen_by_the_data_device_and_the_faiss_build():
    # faiss-gpu is not installable here, so the GPU build is a stand-in with its two relevant traits; the
    # CPU build is the real faiss-cpu of this environment (no StandardGpuResources, 0 GPUs).
    from types import SimpleNamespace

    gpu_build = SimpleNamespace(StandardGpuResources=object, get_num_gpus=lambda: 2)
    no_gpu_visible = SimpleNamespace(StandardGpuResources=object, get_num_gpus=lambda: 0)
    cpu_build = search.load_faiss()
    assert not hasattr(cpu_build, "StandardGpuResources")
    assert search.faiss_gpu_device(torch.device("cuda", 1), gpu_build) == 1  # the tensor's own GPU (DDP rank)
    assert search.faiss_gpu_device(torch.device("cpu"), gpu_build) is None  # CPU data: faiss on CPU
    assert search.faiss_gpu_device(torch.device("cuda", 0), cpu_build) is None  # faiss-cpu on a GPU machine
    assert search.faiss_gpu_device(torch.device("cuda", 0), no_gpu_visible) is None
    assert search.faiss_gpu_device(torch.device("cuda", 0), None) is None  # no faiss: the torch backend


def test_cpu_tensors_take_the_faiss_cpu_path_unchanged():
    # The CPU path is what it was: an exact IndexFlatIP search and faiss.Kmeans on numpy copies.
    faiss = search.load_faiss()
    q, ref = _unit(20, 16, 9), _unit(200, 16, 10)
    index = faiss.IndexFlatIP(16)
    index.add(ref.numpy())
    sims, idx = index.search(q.numpy(), 5)
    got = search.topk_search(q, ref, 5, backend="faiss")
    assert torch.equal(got[1], torch.from_numpy(idx)) and torch.equal(got[0], torch.from_numpy(sims))
    x, _ = _blobs(2)
    km = faiss.Kmeans(4, 3, niter=50, nredo=2, seed=3, spherical=False, max_points_per_centroid=90,
                      min_points_per_centroid=1, verbose=False)
    km.train(x.numpy())
    assert torch.equal(search.kmeans(x, 3, seed=3, restarts=2, backend="faiss", init="random"),
                       torch.from_numpy(km.assign(x.numpy())[1]).long())


def test_default_kmeans_is_faiss_lloyd_from_greedy_k_means_plus_plus_seeds():
    # restarts=1: the torch-drawn seeds (same generator stream), then faiss's Lloyd from exactly those seeds
    faiss = search.load_faiss()
    x = _unit(300, 8, 4)
    seeds = search.kmeans_plus_plus(x, 12, torch.Generator().manual_seed(5))
    km = faiss.Kmeans(8, 12, niter=20, spherical=False, max_points_per_centroid=300, min_points_per_centroid=1)
    km.train(x.numpy(), init_centroids=seeds.numpy())
    assert torch.equal(search.kmeans(x, 12, seed=5, restarts=1, iterations=20),
                       torch.from_numpy(km.assign(x.numpy())[1]).long())


def test_faiss_and_torch_lloyd_agree_from_the_same_centroids():
    x = _unit(400, 8, 6)
    seeds = search.kmeans_plus_plus(x, 15, torch.Generator().manual_seed(0))
    centroids = seeds.clone()
    torch_labels, torch_inertia = search.lloyd(x, centroids, 30)
    faiss_labels, faiss_inertia = search.faiss_lloyd(x, seeds, 30)
    assert torch.equal(faiss_labels, torch_labels)
    assert faiss_inertia == pytest.approx(torch_inertia, rel=1e-5)
    assert torch.equal(seeds, search.kmeans_plus_plus(x, 15, torch.Generator().manual_seed(0)))  # not moved


def _ten_blobs(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """10 well-separated clusters of 50 points in 16-d (centres ~N(0, I), noise 0.2)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(10).repeat_interleave(50)
    return torch.randn(10, 16, generator=g)[labels] + 0.2 * torch.randn(500, 16, generator=g), labels


def _clusters_seeded(x: torch.Tensor, labels: torch.Tensor, seeds: torch.Tensor) -> int:
    """How many distinct true clusters hold a seed (seeds are rows of x)."""
    rows = torch.cdist(seeds, x).argmin(dim=1)
    return int(labels[rows].unique().numel())


def test_greedy_seeding_covers_every_separated_cluster_where_plain_k_means_plus_plus_misses():
    # Plain k-means++ misses a cluster on the last draws with probability ~ the covered clusters' share of
    # the potential (about 1/4 here); the greedy draw (2 + ln 10 = 4 candidates) keeps the best of them.
    greedy, plain = [], []
    for seed in range(10):
        x, labels = _ten_blobs(seed)
        greedy.append(_clusters_seeded(x, labels, search.kmeans_plus_plus(x, 10, torch.Generator().manual_seed(seed))))
        plain.append(_clusters_seeded(x, labels, search.kmeans_plus_plus(
            x, 10, torch.Generator().manual_seed(seed), local_trials=1)))
    assert greedy == [10] * 10
    assert sum(covered < 10 for covered in plain) >= 3  # 6 of 10 here


@pytest.mark.parametrize("backend", BACKENDS)
def test_random_seeds_are_a_named_option_and_miss_separated_clusters(backend):
    # The fast path stays available, and what it costs is visible: one run from random points leaves
    # merged clusters on most of these sets; the default (greedy k-means++) finds all 10 on every set.
    exact = {"random": 0, "k-means++": 0}
    for seed in range(10):
        x, labels = _ten_blobs(seed)
        for init in exact:
            clusters = search.kmeans(x, 10, restarts=1, backend=backend, init=init)
            exact[init] += nmi_from_labels(labels, clusters) == pytest.approx(100.0)
    assert exact["k-means++"] == 10 and exact["random"] <= 5
    with pytest.raises(ValueError, match=r"k-means init must be one of \('k-means\+\+', 'random'\), got 'forgy'"):
        search.kmeans(x, 10, init="forgy")


def test_auto_kmeans_keeps_gpu_data_on_the_gpu_when_faiss_cannot_use_it():
    # faiss-cpu here: CPU data goes to faiss's Lloyd; CUDA data stays on its GPU (torch's Lloyd) under
    # "auto", and goes to faiss-cpu only when backend="faiss" is asked for.
    assert search.lloyd_for(torch.device("cpu")) is search.faiss_lloyd
    assert search.lloyd_for(torch.device("cuda", 0)) is search.lloyd
    assert search.lloyd_for(torch.device("cuda", 0), "faiss") is search.faiss_lloyd
    assert search.lloyd_for(torch.device("cpu"), "torch") is search.lloyd
