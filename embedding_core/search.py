"""Exact inner-product search and k-means for evaluation.

This is the only module that imports faiss, so the rest of the project keeps working (through the
pure-torch fallback) where faiss is missing. Backends:

- ``"faiss"``: faiss on the input's GPU when the input is on CUDA and faiss has GPU support (the
  ``gpu`` extra, ``faiss-gpu``); faiss-cpu otherwise (``faiss_gpu_device`` decides).
- ``"torch"``: blockwise matmul + topk and a Lloyd's k-means, on the input's device. A block holds at
  most ``_BLOCK_ELEMENTS`` similarities, so a 60,502 x 60,502 matrix never exists at once.
- ``"auto"`` (default): ``"faiss"`` if it imports, else ``"torch"``; k-means's Lloyd's iterations also
  stay on torch for GPU data that faiss cannot use (`lloyd_for`).

k-means seeds with greedy k-means++ on either backend (`kmeans`); random-point seeds are a named option.

Results always come back as torch tensors on the input's device.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from types import ModuleType
from typing import Literal

import numpy as np
import torch
from torch import Tensor

Backend = Literal["auto", "faiss", "faiss-gpu", "torch"]

# 2**25 float32 similarities = 128 MiB per block: large enough for BLAS efficiency, small enough for
# the CPU memory of a laptop and for a GPU that also holds a model.
_BLOCK_ELEMENTS = 2**25


@functools.cache
def load_faiss() -> ModuleType | None:
    """The faiss module, or None when it is not installed (callers then use the torch backend)."""
    try:
        import faiss
    except ImportError:
        return None
    return faiss


def resolve_backend(backend: Backend) -> Literal["faiss", "torch"]:
    """Turn ``"auto"`` into a concrete backend and fail early when faiss is asked for but missing.
    ``"faiss-gpu"``: faiss, refused unless its GPU build is installed (never a silent CPU fallback)."""
    if backend == "faiss-gpu":
        from embedding_core.faiss_build import require_gpu_build

        require_gpu_build(load_faiss(), "backend='faiss-gpu' (GPU search and k-means)")
        return "faiss"
    if backend == "auto":
        return "faiss" if load_faiss() is not None else "torch"
    if backend == "faiss" and load_faiss() is None:
        raise ImportError(
            "backend='faiss' needs faiss: install faiss-cpu (or faiss-gpu), or pass backend='torch'"
        )
    if backend not in ("faiss", "torch"):
        raise ValueError(f"backend must be 'auto', 'faiss', 'faiss-gpu' or 'torch', got {backend!r}")
    return backend


def block_rows(num_columns: int) -> int:
    """Rows per block so that a (rows, num_columns) float32 block stays near ``_BLOCK_ELEMENTS``."""
    return max(1, _BLOCK_ELEMENTS // max(1, num_columns))


# A GEMM tile that is read again (Recall@K's count) should still be in cache when it is: 1 MiB of float32
# fits a core's L2 on CPU. Rows: enough that BLAS amortises packing each gallery chunk (at 30,000 x 128,
# 512 x 512 was the best of 256-1024 rows x 512-1024 columns). A GPU wants fewer, larger launches: 2,048
# rows x up to _BLOCK_ELEMENTS in all.
_CPU_TILE_ELEMENTS = 2**18
_TILE_ROWS = {"cpu": 512, "cuda": 2048}


def tile_shape(device: torch.device) -> tuple[int, int]:
    """(query rows, gallery columns) of one similarity tile on ``device``; never above ``_BLOCK_ELEMENTS``."""
    elements = _BLOCK_ELEMENTS if device.type == "cuda" else min(_BLOCK_ELEMENTS, _CPU_TILE_ELEMENTS)
    rows = max(1, min(_TILE_ROWS.get(device.type, _TILE_ROWS["cpu"]), elements))
    return rows, max(1, elements // rows)


def faiss_gpu_device(device: torch.device, faiss: ModuleType | None) -> int | None:
    """The GPU faiss runs on for data on ``device``, or None for faiss on the CPU.

    The data's device decides, as it does for torch: a CUDA tensor with a faiss that has GPU support
    and sees a GPU runs on that tensor's GPU (under DDP, each rank's own); CPU data, faiss-cpu (which
    has no ``StandardGpuResources``) or no visible GPU keep the CPU path.
    """
    if device.type != "cuda" or faiss is None:
        return None
    if not hasattr(faiss, "StandardGpuResources"):
        _warn_cpu_build(faiss)
        return None
    if faiss.get_num_gpus() == 0:
        return None
    return device.index if device.index is not None else torch.cuda.current_device()


@functools.cache
def _warn_cpu_build(faiss: ModuleType) -> None:
    """Once per process: GPU data searched by faiss's CPU build (backend 'faiss-gpu' refuses this instead)."""
    import warnings

    from embedding_core.faiss_build import GPU_INSTALL, describe

    warnings.warn(f"data on the GPU but {describe(faiss)}: faiss cannot run there (its search goes through the "
                  f"CPU; k-means takes torch's Lloyd on the GPU); for faiss on the GPU install `{GPU_INSTALL}`, or "
                  "pass backend 'faiss-gpu' to refuse instead", stacklevel=3)


_FAISS_GPU_MAX_K = 2048  # faiss GPU's largest k for a flat search; larger k searches on the CPU


@functools.cache
def _gpu_resources(gpu: int):
    """One faiss GPU resource object (cuBLAS handle, scratch memory) per GPU for the process's life."""
    return load_faiss().StandardGpuResources()


def _to_numpy(x: Tensor) -> np.ndarray:
    return np.ascontiguousarray(x.detach().to("cpu", torch.float32).numpy())


def _check_matrix(name: str, x: Tensor) -> None:
    if x.ndim != 2:
        raise ValueError(f"{name} must be 2-D (rows, dim), got shape {tuple(x.shape)}")


# ----------------------------------------------------------------------------------------------------
# top-k search
# ----------------------------------------------------------------------------------------------------


def _faiss_topk(queries: Tensor, reference: Tensor, k: int) -> tuple[Tensor, Tensor]:
    faiss = load_faiss()
    index = faiss.IndexFlatIP(reference.shape[1])
    gpu = faiss_gpu_device(reference.device, faiss)
    if gpu is not None and k <= _FAISS_GPU_MAX_K:
        return _search_on_device(faiss.index_cpu_to_gpu(_gpu_resources(gpu), gpu, index), queries, reference, k)
    index.add(_to_numpy(reference))
    sims, idx = index.search(_to_numpy(queries), k)
    return torch.from_numpy(sims).to(queries.device), torch.from_numpy(idx).to(queries.device)


def _search_on_device(index, queries: Tensor, reference: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """A faiss GPU index fed torch CUDA tensors (faiss.contrib.torch_utils): the embeddings and the results
    stay on the device, with no round trip through numpy."""
    import faiss.contrib.torch_utils  # noqa: F401  (faiss's indexes then take and return torch tensors)

    index.add(reference.detach().float().contiguous())
    sims, idx = index.search(queries.detach().float().contiguous(), k)
    return sims, idx.long()


def _torch_topk(queries: Tensor, reference: Tensor, k: int) -> tuple[Tensor, Tensor]:
    reference_t = reference.float().T
    step = block_rows(reference.shape[0])
    parts = [torch.topk(q.float() @ reference_t, k, dim=1) for q in queries.split(step)]
    return torch.cat([p.values for p in parts]), torch.cat([p.indices for p in parts])


def _drop_self(sims: Tensor, idx: Tensor) -> tuple[Tensor, Tensor]:
    """Remove each row's own index from a (Q, k+1) result; rows without it lose their last column.

    Dropping by identity (not "column 0") keeps the result right when a duplicate of the query ties
    with it and comes first.
    """
    is_self = idx == torch.arange(idx.shape[0], device=idx.device)[:, None]
    drop = is_self.clone()
    drop[~is_self.any(dim=1), -1] = True
    keep = ~drop
    k = idx.shape[1] - 1
    return sims[keep].view(-1, k), idx[keep].view(-1, k)


def topk_search(
    queries: Tensor, reference: Tensor, k: int, exclude_self: bool = False, backend: Backend = "auto"
) -> tuple[Tensor, Tensor]:
    """Exact top-k by inner product: (similarities (Q, k) float32, indices (Q, k) int64), best first.

    ``exclude_self=True`` declares that ``queries`` are the rows of ``reference`` (same order); row i
    then never returns index i, whatever the ties.
    """
    _check_matrix("queries", queries)
    _check_matrix("reference", reference)
    if queries.shape[1] != reference.shape[1]:
        raise ValueError(
            f"queries {tuple(queries.shape)} and reference {tuple(reference.shape)} need the same dim"
        )
    if exclude_self and queries.shape != reference.shape:
        raise ValueError(
            f"exclude_self=True needs queries to be the reference rows, got shapes "
            f"{tuple(queries.shape)} and {tuple(reference.shape)}; pass exclude_self=False for "
            "query->gallery search"
        )
    available = reference.shape[0] - int(exclude_self)
    if not 1 <= k <= available:
        raise ValueError(f"k must be in [1, {available}] for {reference.shape[0]} reference rows, got {k}")
    search = _faiss_topk if resolve_backend(backend) == "faiss" else _torch_topk
    sims, idx = search(queries, reference, k + int(exclude_self))
    return _drop_self(sims, idx) if exclude_self else (sims, idx)


# ----------------------------------------------------------------------------------------------------
# k-means
# ----------------------------------------------------------------------------------------------------

Init = Literal["k-means++", "random"]
INITS = ("k-means++", "random")


def check_init(init: str) -> None:
    """Fail early on an unknown k-means seeding name."""
    if init not in INITS:
        raise ValueError(f"k-means init must be one of {INITS}, got {init!r}")


def _faiss_kmeans_random(x: Tensor, num_clusters: int, seed: int, restarts: int, iterations: int) -> Tensor:
    """faiss k-means from random-point seeds (faiss's own default), best of ``restarts`` by objective: the
    ``init="random"`` fast path (see `kmeans` for what it costs in quality)."""
    faiss = load_faiss()
    n, dim = x.shape
    km = faiss.Kmeans(
        dim,
        num_clusters,
        niter=iterations,
        nredo=restarts,
        seed=seed,
        spherical=False,
        max_points_per_centroid=n,  # faiss silently subsamples above k * max_points_per_centroid
        min_points_per_centroid=1,  # few points per cluster is the protocol (SOP: ~5), not a mistake
        verbose=False,
    )
    _faiss_on_device(km, x.device, dim)
    points = _to_numpy(x)
    km.train(points)
    _, labels = km.assign(points)
    return torch.from_numpy(labels).long().to(x.device)


def _faiss_on_device(km, device: torch.device, dim: int) -> None:
    """Point a faiss.Kmeans at the GPU of ``device`` where faiss can (Kmeans(gpu=...) would take GPUs
    0..n-1 whatever the DDP rank); otherwise it stays on the CPU."""
    faiss = load_faiss()
    gpu = faiss_gpu_device(device, faiss)
    if gpu is not None:
        config = faiss.GpuIndexFlatConfig()
        config.device = gpu
        km.index = faiss.GpuIndexFlatL2(_gpu_resources(gpu), dim, config)


def faiss_lloyd(x: Tensor, centroids: Tensor, iterations: int) -> tuple[Tensor, float]:
    """faiss's Lloyd iterations from the given centroids: (labels, inertia), labels on x's device.

    faiss runs all ``iterations`` (no convergence test) and re-seeds an empty cluster by splitting a large
    one. The centroids are not modified.
    """
    faiss = load_faiss()
    n, dim = x.shape
    km = faiss.Kmeans(dim, centroids.shape[0], niter=iterations, nredo=1, spherical=False,
                      max_points_per_centroid=n, min_points_per_centroid=1, verbose=False)
    _faiss_on_device(km, x.device, dim)
    points = _to_numpy(x)
    km.train(points, init_centroids=_to_numpy(centroids))
    dists, labels = km.assign(points)
    return torch.from_numpy(labels).long().to(x.device), float(dists.astype(np.float64).sum())


def _assign(x: Tensor, centroids: Tensor) -> tuple[Tensor, Tensor]:
    """Nearest centroid and squared distance per row, blockwise over rows."""
    c_sq = centroids.square().sum(dim=1)
    labels, dists = [], []
    for block in x.split(block_rows(centroids.shape[0])):
        d = torch.addmm(c_sq, block, centroids.T, alpha=-2).add_(block.square().sum(dim=1, keepdim=True))
        dist, label = d.min(dim=1)
        labels.append(label)
        dists.append(dist.clamp_min(0))
    return torch.cat(labels), torch.cat(dists)


def greedy_trials(num_clusters: int) -> int:
    """Candidates per centre of greedy k-means++: 2 + ln K, scikit-learn's choice (after Arthur &
    Vassilvitskii's experiments)."""
    return 2 + int(np.log(num_clusters))


def kmeans_plus_plus(x: Tensor, num_clusters: int, generator: torch.Generator,
                     local_trials: int | None = None) -> Tensor:
    """Greedy k-means++ seeds (K, d) on x's device: scikit-learn's default seeding.

    k-means++ (Arthur & Vassilvitskii 2007) draws each next centre with probability ~ D(x)^2, the squared
    distance to the nearest centre so far. The greedy variant draws ``local_trials`` candidates
    (default `greedy_trials`: 2 + ln K) and keeps the one that lowers the potential sum D^2 most;
    ``local_trials=1`` is plain k-means++. Plain k-means++ still misses a well-separated cluster with
    real probability: its last draw lands in one of the K - 1 covered clusters with probability their
    share of the potential (about 1/4 for 10 clusters of 16-d points at noise 0.2; all 4 greedy
    candidates land there with probability ~1/4^4 < 1 %). The candidates' distances are one (N, L) matmul, so a step reads x once like plain
    k-means++ does; the draws are an inverse-CDF lookup on the device, so a GPU run never syncs.
    """
    n = x.shape[0]
    trials = local_trials if local_trials is not None else greedy_trials(num_clusters)
    x_sq = x.square().sum(dim=1)

    def sq_distances(idx: Tensor) -> Tensor:  # (N, len(idx)) squared distances to the rows idx
        return torch.addmm(x_sq[idx], x, x[idx].T, alpha=-2).add_(x_sq[:, None]).clamp_min_(0)

    chosen = [torch.randint(n, (1,), generator=generator, device=x.device)]
    d2 = sq_distances(chosen[0])[:, 0]
    for _ in range(num_clusters - 1):
        cdf = d2.double().cumsum(0)
        u = torch.rand(trials, generator=generator, device=x.device, dtype=torch.float64) * cdf[-1]
        candidates = torch.searchsorted(cdf, u, right=True).clamp_max_(n - 1)
        candidate_d2 = torch.minimum(d2[:, None], sq_distances(candidates))
        best = candidate_d2.sum(dim=0).argmin().view(1)  # a tensor index: no device-to-host sync
        chosen.append(candidates.index_select(0, best))
        d2 = candidate_d2.index_select(1, best).squeeze(1)
    return x[torch.cat(chosen)].clone()


def random_seeds(x: Tensor, num_clusters: int, generator: torch.Generator) -> Tensor:
    """K distinct rows of x drawn uniformly: the classic (Forgy) seeding, faiss's default."""
    return x[torch.randperm(x.shape[0], generator=generator, device=x.device)[:num_clusters]].clone()


def lloyd(x: Tensor, centroids: Tensor, iterations: int) -> tuple[Tensor, float]:
    """Lloyd's iterations from the given centroids, which it moves in place (LMCS starts them at the labeled
    class means); an empty cluster keeps its previous centroid. Returns (labels, inertia)."""
    previous = None
    for _ in range(iterations):
        labels, _ = _assign(x, centroids)
        if previous is not None and torch.equal(labels, previous):
            break
        counts = torch.bincount(labels, minlength=centroids.shape[0])
        sums = torch.zeros_like(centroids).index_add_(0, labels, x)
        nonempty = counts > 0
        centroids[nonempty] = sums[nonempty] / counts[nonempty, None].to(x.dtype)
        previous = labels
    labels, dists = _assign(x, centroids)
    return labels, dists.sum().item()


Lloyd = Callable[[Tensor, Tensor, int], tuple[Tensor, float]]


def lloyd_for(device: torch.device, backend: Backend = "auto") -> Lloyd:
    """The Lloyd's iterations `kmeans` runs for data on ``device``: `faiss_lloyd` for backend "faiss", or
    "auto" with faiss installed and able to run on that device (CPU data, or a GPU that faiss-gpu sees);
    `lloyd` (torch, on the device) otherwise. Under "auto", data on a GPU that faiss cannot use stays
    there: torch's Lloyd on the GPU beats a copy to faiss-cpu."""
    resolved = resolve_backend(backend)
    if resolved == "torch":
        return lloyd
    if backend == "faiss" or device.type != "cuda":
        return faiss_lloyd
    return faiss_lloyd if faiss_gpu_device(device, load_faiss()) is not None else lloyd


def kmeans(
    x: Tensor,
    num_clusters: int,
    seed: int = 0,
    restarts: int = 10,
    iterations: int = 50,
    backend: Backend = "auto",
    init: Init = "k-means++",
) -> Tensor:
    """Euclidean k-means cluster ids (N,) int64 on x's device; best of ``restarts`` by inertia.

    The one k-means of the project (NMI, pseudo labels). ``init``:

    - ``"k-means++"`` (default): greedy k-means++ seeds (`kmeans_plus_plus`, scikit-learn's seeding and
      the papers' protocol), drawn by torch on x's device, then Lloyd's iterations: faiss's on the CPU
      or on x's GPU where faiss has GPU support, torch's (`lloyd`) where the backend is torch or x sits
      on a GPU that faiss cannot use. On 10 separated clusters one run finds them all. The seeding is
      K sequential steps, each reading x once for N d (2 + ln K) multiply-adds: the flops of 2 + ln K
      Lloyd passes (11 at K = 10,000), at the speed of a skinny product rather than a full GEMM. ``make bench --only kmeans`` times
      it against Lloyd's iterations and scikit-learn (which seeds the same way; docs/kmeans.md has the figures).
    - ``"random"``: K random points as seeds (faiss's own k-means on the faiss backend). It is cheaper
      to seed, but it rarely hits every cluster: 10 random draws cover 10 equal clusters with
      probability 10!/10^10 (0.04 %), Lloyd's iterations seldom pull a merged pair apart, and restarts
      do not compensate (10 restarts reached NMI 100 on 2 of 10 such sets, tests/test_metrics.py, where
      one greedy k-means++ run reaches it on all). Use it only when the seeding time matters more than the clustering.

    Runs are reproducible for a fixed seed on one backend and device; backends and devices draw
    different (equally valid) seeds.
    """
    _check_matrix("x", x)
    n = x.shape[0]
    if not 1 <= num_clusters <= n:
        raise ValueError(f"num_clusters must be in [1, {n}] for {n} points, got {num_clusters}")
    if restarts < 1 or iterations < 1:
        raise ValueError(f"restarts and iterations must be >= 1, got {restarts} and {iterations}")
    check_init(init)
    run_lloyd = lloyd_for(x.device, backend)
    if init == "random" and run_lloyd is faiss_lloyd:
        return _faiss_kmeans_random(x, num_clusters, seed, restarts, iterations)
    x = x.float()
    generator = torch.Generator(device=x.device).manual_seed(seed)
    best_labels, best_inertia = None, float("inf")
    for _ in range(restarts):
        seeds = (kmeans_plus_plus(x, num_clusters, generator) if init == "k-means++"
                 else random_seeds(x, num_clusters, generator))
        labels, inertia = run_lloyd(x, seeds, iterations)
        if inertia < best_inertia:
            best_labels, best_inertia = labels, inertia
    return best_labels
