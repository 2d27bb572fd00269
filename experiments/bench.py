"""Benchmarks, printed as markdown: ``python -m experiments.bench [--only SECTION] [--quick]``.

Sections are pluggable: add a function ``(quick: bool) -> str`` returning markdown to ``SECTIONS``.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from callbacks import metrics, search

KNN_K = 200
PLAIN_TORCH_MAX_BYTES = 8 * 2**30  # a full N x N float32 matrix above this is computed blockwise


@dataclass(frozen=True)
class EvalSize:
    """A test split shape and the k-means settings used for it."""

    name: str
    n: int
    dim: int
    classes: int
    ks: tuple[int, ...]
    restarts: int
    iterations: int


FULL_SIZES = (
    EvalSize("CUB", 5_924, 512, 100, (1, 2, 4, 8), restarts=10, iterations=50),
    # ISIF's SOP "fast" mode: one k-means run; 10 iterations keep 11,316 clusters affordable on CPU.
    EvalSize("SOP", 60_502, 128, 11_316, (1, 10, 100), restarts=1, iterations=10),
)
QUICK_SIZES = (
    EvalSize("CUB-quick", 1_000, 64, 20, (1, 2, 4, 8), restarts=2, iterations=10),
    EvalSize("SOP-quick", 5_000, 32, 1_000, (1, 10, 100), restarts=1, iterations=5),
)


def device_info() -> str:
    """One line naming the hardware and thread counts, so timings can be compared."""
    faiss = search.load_faiss()
    if torch.cuda.is_available():
        where = f"GPU {torch.cuda.get_device_name()}"
    else:
        where = f"CPU {platform.processor() or platform.machine()}"
    faiss_part = (
        "faiss missing"
        if faiss is None
        else f"faiss {faiss.__version__} ({faiss.omp_get_max_threads()} OpenMP threads, {faiss.get_num_gpus()} GPUs)"
    )
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (
        f"{where}; torch {torch.__version__} ({torch.get_num_threads()} threads); {faiss_part}; "
        f"1-min load average {load:.1f} (other processes skew timings)"
    )


def _timed(fn: Callable[[], object]) -> tuple[float, object]:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    value = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start, value


def random_split(size: EvalSize, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised Gaussian embeddings and balanced labels (every class present)."""
    g = torch.Generator().manual_seed(seed)
    emb = F.normalize(torch.randn(size.n, size.dim, generator=g), dim=1)
    targets = torch.randperm(size.n, generator=g) % size.classes
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return emb.to(device), targets.to(device)


# ---- baselines: the same quantities with no validation, blocking or tie handling ------------------


def _vote_top1(sims: torch.Tensor, idx: torch.Tensor, targets: torch.Tensor, classes: int) -> float:
    scores = torch.zeros(idx.shape[0], classes, device=sims.device)
    scores.scatter_add_(1, targets[idx], torch.exp(sims / 0.1))
    return 100.0 * (scores.argmax(dim=1) == targets).float().mean().item()


def _hits_after_self(idx: torch.Tensor, targets: torch.Tensor, ks: tuple[int, ...]) -> dict[int, float]:
    """Recall@K from a (N, >= Kmax + 1) neighbour list whose column 0 is assumed to be the query."""
    same = targets[idx[:, 1:]] == targets[:, None]
    return {k: 100.0 * same[:, :k].any(dim=1).float().mean().item() for k in ks}


def _faiss_topk(emb: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    faiss = search.load_faiss()
    x = emb.cpu().numpy()
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    sims, idx = index.search(x, k)
    return torch.from_numpy(sims).to(emb.device), torch.from_numpy(idx).to(emb.device)


def _faiss_nmi(emb: torch.Tensor, targets: torch.Tensor, size: EvalSize) -> float:
    faiss = search.load_faiss()
    x = emb.cpu().numpy()
    km = faiss.Kmeans(
        x.shape[1],
        size.classes,
        niter=size.iterations,
        nredo=size.restarts,
        seed=0,
        max_points_per_centroid=x.shape[0],
        min_points_per_centroid=1,
    )
    km.train(x)
    return metrics.nmi_from_labels(targets, km.assign(x)[1])


def _plain_topk(emb: torch.Tensor, k: int, mask_self: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Full matmul + topk, or 4096-row blocks when the full matrix would pass PLAIN_TORCH_MAX_BYTES."""
    n = emb.shape[0]
    rows = n if n * n * 4 <= PLAIN_TORCH_MAX_BYTES else 4096
    parts = []
    for start in range(0, n, rows):
        sims = emb[start : start + rows] @ emb.T
        if mask_self:
            r = torch.arange(sims.shape[0], device=sims.device)
            sims[r, r + start] = -torch.inf
        parts.append(sims.topk(k, dim=1))
    return torch.cat([p.values for p in parts]), torch.cat([p.indices for p in parts])


def _plain_recall(emb: torch.Tensor, targets: torch.Tensor, ks: tuple[int, ...]) -> dict[int, float]:
    _, idx = _plain_topk(emb, max(ks), mask_self=True)
    same = targets[idx] == targets[:, None]
    return {k: 100.0 * same[:, :k].any(dim=1).float().mean().item() for k in ks}


def _plain_note(size: EvalSize) -> str:
    return "full matrix" if size.n**2 * 4 <= PLAIN_TORCH_MAX_BYTES else "4096-row blocks (N x N > 8 GiB)"


# ---- the section ------------------------------------------------------------------------------------


def _evaluation_rows(size: EvalSize) -> list[str]:
    emb, y = random_split(size)
    kmax = max(size.ks)
    km = f"k-means {size.classes} clusters, restarts={size.restarts}, iterations={size.iterations}"
    plain = f"torch: {_plain_note(size)}"
    cases = [
        (
            "kNN top-1",
            f"k={KNN_K}, sigma=0.1, set vs itself (self votes: value ~100); {plain}",
            lambda: metrics.weighted_knn_top1(emb, y, emb, y, k=KNN_K),
            lambda: _vote_top1(*_faiss_topk(emb, KNN_K), y, size.classes),
            lambda: _vote_top1(*_plain_topk(emb, KNN_K, mask_self=False), y, size.classes),
        ),
        (
            "Recall@K",
            f"K={','.join(map(str, size.ks))}; faiss: top-{kmax + 1}, drop column 0; {plain}",
            lambda: metrics.recall_at_k(emb, y, size.ks),
            lambda: _hits_after_self(_faiss_topk(emb, kmax + 1)[1], y, size.ks),
            lambda: _plain_recall(emb, y, size.ks),
        ),
        (
            "NMI",
            f"{km}; ours/faiss: random init, torch: k-means++",
            lambda: metrics.nmi(emb, y, restarts=size.restarts, iterations=size.iterations),
            lambda: _faiss_nmi(emb, y, size),
            lambda: metrics.nmi(emb, y, restarts=size.restarts, iterations=size.iterations, backend="torch"),
        ),
    ]
    rows = []
    for metric, settings, *impls in cases:
        timings = [_timed(impl) for impl in impls]
        seconds = " | ".join(f"{t:.2f}" for t, _ in timings)
        values = " / ".join(_format_value(v) for _, v in timings)
        rows.append(
            f"| {size.name} | {size.n:,} x {size.dim}, {size.classes:,} cl. | {metric} | {settings} "
            f"| {seconds} | {values} |"
        )
    return rows


def _format_value(value: object) -> str:
    if isinstance(value, dict):
        return ",".join(f"{v:.2f}" for v in value.values())
    return f"{value:.2f}"


def bench_evaluation(quick: bool = False) -> str:
    """Wall time of kNN top-1, Recall@K and NMI: ours vs bare faiss vs plain torch, on random data."""
    lines = [
        "### Evaluation (random L2-normalised embeddings)",
        "",
        device_info(),
        "",
        (
            "| set | size | metric | settings | ours (s) | bare faiss (s) | plain torch (s) "
            "| value: ours / faiss / torch (%) |"
        ),
        "|---|---|---|---|---|---|---|---|",
    ]
    for size in QUICK_SIZES if quick else FULL_SIZES:
        lines.extend(_evaluation_rows(size))
    return "\n".join(lines)


# ---- TAC-CCL: k-means pseudo-label refresh and training throughput ----------------------------------

REFRESH_ITERATIONS = 50  # KMeansPseudoLabels' default: one run of 50 iterations


def _sklearn_kmeans(x: torch.Tensor, clusters: int, iterations: int) -> None:
    from sklearn.cluster import KMeans

    KMeans(clusters, init="random", n_init=1, max_iter=iterations, tol=0.0, algorithm="lloyd",
           random_state=0).fit(x.cpu().numpy())


def _seconds_and_50(run: Callable[[int], object], iterations: tuple[int, int]) -> tuple[float, float]:
    """(seconds of a run with iterations[1] iterations, seconds extrapolated to 50): two runs give the cost
    per iteration; what does not grow with iterations (setup, final assignment) is counted once."""
    low, high = (_timed(lambda i=i: run(i))[0] for i in iterations)
    per_iteration = max(high - low, 0.0) / (iterations[1] - iterations[0])
    return high, high + per_iteration * (REFRESH_ITERATIONS - iterations[1])


def clustered_features(n: int, dim: int, components: int, seed: int = 0) -> torch.Tensor:
    """L2-normalised Gaussian-mixture rows (unit noise around `components` random centres): structured
    enough that Lloyd's labels keep changing for many iterations (on plain random rows scikit-learn
    stops after 2 on its strict-convergence test, and the timing would measure nothing)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(components, dim, generator=g)
    rows = centres[torch.randint(components, (n,), generator=g)] + torch.randn(n, dim, generator=g)
    return F.normalize(rows, dim=1)


def _refresh_rows(quick: bool) -> list[str]:
    """faiss (the callback's path) at the SOP size (60,000 x 512, K = 10,000), and faiss and scikit-learn on
    a 1/4 x 1/4 problem, whose cost per iteration (N K d) is 16x smaller; scikit-learn's full-size time
    is that x16 (too long on a 2-core CPU to run)."""
    n, dim, k = (6_000, 128, 1_000) if quick else (60_000, 512, 10_000)
    iterations = (1, 2) if quick else (2, 6)
    x = clustered_features(n, dim, 2 * k)
    sub, sub_k = clustered_features(n // 4, dim, 2 * k // 4), k // 4
    cases = [("faiss (`callbacks.search.kmeans`)", x, k,
              lambda i: search.kmeans(x, k, restarts=1, iterations=i)),
             ("faiss (`callbacks.search.kmeans`)", sub, sub_k,
              lambda i: search.kmeans(sub, sub_k, restarts=1, iterations=i)),
             ("scikit-learn KMeans (lloyd, n_init=1)", sub, sub_k, lambda i: _sklearn_kmeans(sub, sub_k, i))]
    rows = []
    for name, data, clusters, run in cases:
        seconds, at_50 = _seconds_and_50(run, iterations)
        rows.append(f"| {name} | {data.shape[0]:,} x {dim}, K={clusters:,} | {iterations[1]} | {seconds:.1f} "
                    f"| {at_50:.0f} |")
    rows.append(f"| scikit-learn, extrapolated (x16 the 1/4 x 1/4 row) | {n:,} x {dim}, K={k:,} | - | - "
                f"| {16 * at_50:.0f} |")
    return rows


def _tac_ccl_images_per_second(backbone: str, size: int, batch_size: int, steps: int, **flags) -> float:
    """Optimizer steps of TACCCL.training_step on random images (model and losses only, no data loading),
    with 100 pseudo classes, P x 5 batches and a 5,864-entry memory bank (CUB-sized)."""
    import warnings

    from callbacks.pseudo_labels import cluster_centers
    from lightning_modules.tac_ccl import TACCCL

    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    in_chans, dim, n_train, clusters, per_class = (1 if backbone == "small_cnn" else 3), 512, 5_864, 100, 5
    model = TACCCL(backbone=backbone, in_chans=in_chans, embedding_dim=dim, frozen_bn=backbone == "googlenet",
                   **flags).to(device).train()
    bank = F.normalize(torch.randn(n_train, dim), dim=1)
    labels = torch.arange(n_train) % clusters
    model.set_pseudo_labels(labels, cluster_centers(bank, labels, clusters), bank)
    index = (torch.arange(batch_size // per_class)[:, None] + clusters * torch.arange(per_class)).flatten()
    images = torch.randn(batch_size, in_chans, size, size, device=device)
    batch = {"views": [images], "index": index.to(device)}
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-5)

    def step() -> None:
        optimizer.zero_grad()
        model.training_step(batch, 0).backward()
        optimizer.step()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # self.log outside a Trainer
        step()  # warm-up
        seconds = _timed(lambda: [step() for _ in range(steps)])[0]
    return batch_size * steps / seconds


def bench_tac_ccl(quick: bool = False) -> str:
    """k-means refresh time (faiss vs scikit-learn) and TAC-CCL training throughput."""
    baseline = {"ccl_weight": 0.0, "tac_weight": 0.0, "feature_weight": 0.0}
    cases = [("small_cnn", 8, 80, "digits")]
    cases.append(("googlenet", 64, 20, "GoogLeNet 64x64 (quick)") if quick
                 else ("googlenet", 227, 20, "GoogLeNet 227x227"))
    steps = 1 if quick else 2
    lines = ["### TAC-CCL", "", device_info(), "",
             ("k-means pseudo-label refresh on clustered L2-normalised features (one run; 50 iterations = "
              "the callback's default, extrapolated from two runs of fewer iterations):"), "",
             "| k-means | data | iterations timed | seconds | at 50 iterations (s) |",
             "|---|---|---|---|---|",
             *_refresh_rows(quick), "",
             (f"Training throughput (`TACCCL.training_step` + backward + Adam step on random images, {steps} "
              "steps after one warm-up; model and losses only):"), "",
             "| backbone, input | batch (P x 5) | Baseline: MS + memory (img/s) | full TAC-CCL (img/s) |",
             "|---|---|---|---|"]
    for backbone, size, batch_size, label in cases:
        rates = [_tac_ccl_images_per_second(backbone, size, batch_size, steps, **flags)
                 for flags in (baseline, {})]
        lines.append(f"| {label} | {batch_size} | {rates[0]:.1f} | {rates[1]:.1f} |")
    return "\n".join(lines)


# ---- UMM: training throughput and memory against ISIF -----------------------------------------------


@dataclass(frozen=True)
class TrainSize:
    """The network and batch UMM and ISIF are timed on, and the L_R-alone case (CUB's n = 64 at k = 50)."""

    backbone: str
    channels: int
    image: int
    batch: int
    steps: int
    ranking_batch: int
    ranking_chunk: int


UMM_FULL = TrainSize("cifar_resnet18", 3, 32, 128, steps=4, ranking_batch=64, ranking_chunk=1600)
UMM_QUICK = TrainSize("small_cnn", 1, 8, 64, steps=3, ranking_batch=16, ranking_chunk=400)
UMM_KS = (1, 5, 50)
RANKING_BINS = 20


def _peak_bytes(fn: Callable[[], float]) -> tuple[float, int]:
    """(fn's value, the memory it added at its peak): CUDA max_memory_allocated over what was allocated
    before, or on CPU the growth of the process's peak RSS (so each CPU case runs in a fresh process)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        value = fn()
        torch.cuda.synchronize()
        return value, torch.cuda.max_memory_allocated() - before
    import resource

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    value = fn()
    return value, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024  # Linux: KiB


def _isolated(fn: Callable, *args) -> tuple[float, int]:
    """fn(*args); on CPU in a fresh process, so that the peak RSS it reports is its own."""
    if torch.cuda.is_available():
        return fn(*args)
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def _umm_case(method: str, k: int, size: TrainSize) -> tuple[float, int]:
    """Images/s of the method's own `training_step` + backward + SGD step on random images, and peak memory."""
    import warnings

    from lightning_modules.isif import ISIF
    from lightning_modules.umm import UMM

    warnings.filterwarnings("ignore", message=".*self.log.*")  # no Trainer attached: logging is skipped
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    common = {"backbone": size.backbone, "in_chans": size.channels, "gather_negatives": False}
    model = (UMM(num_samples=k, **common) if method == "UMM" else ISIF(**common)).to(device)
    optimizer = model.configure_optimizers()["optimizer"]
    views = [torch.randn(size.batch, size.channels, size.image, size.image, device=device) for _ in range(2)]
    batch = {"views": views, "index": torch.arange(size.batch), "target": torch.full((size.batch,), -1)}

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        model.training_step(batch, 0).backward()
        optimizer.step()

    def images_per_second() -> float:
        step()  # warm-up: allocator, optimizer state
        seconds = _timed(lambda: [step() for _ in range(size.steps)])[0]
        return 2 * size.batch * size.steps / seconds

    return _peak_bytes(images_per_second)


def _ranking_case(n: int, k: int, chunk: int | None) -> tuple[float, int]:
    """Seconds of one L_R forward + backward on 2nk random unit candidates (D = 128), and peak memory."""
    from lightning_modules.umm import ranking_loss

    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    z1, z2 = (F.normalize(torch.randn(n, k, 128, device=device), dim=-1).requires_grad_() for _ in range(2))
    return _peak_bytes(lambda: _timed(lambda: ranking_loss(z1, z2, RANKING_BINS, chunk=chunk).backward())[0])


def bench_umm(quick: bool = False) -> str:
    """UMM vs ISIF training throughput on one backbone and batch at k = 1, 5, 50; and L_R alone at CUB's size.

    L_R never builds the dense (2nk, 2nk, B + 1) soft-histogram tensor: each similarity weighs on two
    adjacent bins, so the histograms are scatter_adds of the (2nk)² similarities into (2nk, B + 1) bins,
    O((2nk)² + 2nk·B) memory; `ranking_chunk` recomputes query chunks in backward to bound it by O(chunk·2nk).
    """
    size = UMM_QUICK if quick else UMM_FULL
    mib = 2**20
    lines = ["### UMM vs ISIF training throughput (forward + backward + SGD step)", "", device_info(), "",
             (f"{size.backbone}, {size.channels}x{size.image}x{size.image} random images, n = {size.batch} "
              f"images x 2 views, {size.steps} steps after one warm-up; peak memory = CUDA max_memory_allocated, "
              "else the growth of peak RSS in a fresh process."), "",
             "| method | k | candidates 2nk | images/s | vs ISIF | peak memory (MiB) |", "|---|---|---|---|---|---|"]
    isif_rate, isif_peak = _isolated(_umm_case, "ISIF", 1, size)
    lines.append(f"| ISIF | - | - | {isif_rate:.0f} | 1.00 | {isif_peak / mib:.0f} |")
    for k in UMM_KS:
        rate, peak = _isolated(_umm_case, "UMM", k, size)
        lines.append(f"| UMM | {k} | {2 * size.batch * k:,} | {rate:.0f} | {rate / isif_rate:.2f} | {peak / mib:.0f} |")
    n, k = size.ranking_batch, max(UMM_KS)
    m = 2 * n * k
    lines += ["", (f"L_R alone (forward + backward), n = {n}, k = {k}: M = 2nk = {m:,} candidates, B = {RANKING_BINS}; "
                   f"a dense (M, M, B + 1) fp32 kernel tensor alone would take {m * m * (RANKING_BINS + 1) * 4 / mib:,.0f} MiB."),
              "", "| ranking_chunk | seconds | peak memory (MiB) |", "|---|---|---|"]
    for chunk in (None, size.ranking_chunk):
        seconds, peak = _isolated(_ranking_case, n, k, chunk)
        lines.append(f"| {chunk or 'none'} | {seconds:.2f} | {peak / mib:.0f} |")
    return "\n".join(lines)


SECTIONS: dict[str, Callable[[bool], str]] = {"evaluation": bench_evaluation, "tac_ccl": bench_tac_ccl, "umm": bench_umm}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=sorted(SECTIONS), help="run one section (default: all)")
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke test")
    args = parser.parse_args(argv)
    for name in [args.only] if args.only else SECTIONS:
        start = time.perf_counter()
        print(SECTIONS[name](args.quick))
        print(f"\n_{name}: {time.perf_counter() - start:.0f} s wall_\n", flush=True)


if __name__ == "__main__":
    main()
