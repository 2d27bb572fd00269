"""Benchmarks, printed as markdown: ``python -m experiments.bench [--only SECTION] [--quick]``.

Sections are pluggable: add a function ``(quick: bool) -> str`` returning markdown to ``SECTIONS``.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from embedding_core import faiss_build, metrics, search

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


def _cpu_model() -> str:
    """The CPU's model name (Linux /proc/cpuinfo), else what platform knows."""
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    except OSError:
        names = []
    return names[0] if names else platform.processor() or platform.machine()


def machine() -> str:
    """The machine a table was measured on: CPU model and cores, GPU and its memory, host, date."""
    gpu = "no GPU"
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        gpu = f"{torch.cuda.device_count()} x {props.name} ({props.total_memory / 2**30:.0f} GiB)"
    return (f"{_cpu_model()}, {os.cpu_count()} CPU cores; {gpu}; host {platform.node()}; "
            f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")


def device_info() -> str:
    """One line naming the hardware and thread counts, so timings can be compared."""
    faiss = search.load_faiss()
    if torch.cuda.is_available():
        where = f"GPU {torch.cuda.get_device_name()}"
    else:
        where = f"CPU {_cpu_model()}"
    faiss_part = faiss_build.describe(faiss) + (
        f" ({faiss.omp_get_max_threads()} OpenMP threads)" if faiss is not None else "")
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


def _steps_per_second(model, batch: dict, optimizer: torch.optim.Optimizer, steps: int) -> float:
    """Training steps per second on one fixed batch, after one warm-up step (allocator, optimizer state)."""

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        model.training_step(batch, 0).backward()
        optimizer.step()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # self.log outside a Trainer
        step()
        return steps / _timed(lambda: [step() for _ in range(steps)])[0]


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
            f"{km}; ours: greedy k-means++ + faiss Lloyd, bare faiss: random init, torch: greedy k-means++",
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
    return "\n".join(lines + ["", *_floor_table(quick)])


# ---- Recall@K against the GEMM floor ----------------------------------------------------------------

FLOOR_SIZES = ((30_000, 128), (60_502, 128))  # a 30K split and SOP's test split
FLOOR_QUICK = ((3_000, 128), (6_000, 128))
FLOOR_REPEATS = {True: 3, False: 2}  # best of: other processes only ever add time


def gemm_floor(emb: torch.Tensor, rows: int, cols: int) -> None:
    """The bare similarity pass that any exact Recall@K must make: every (rows x cols) tile of emb @ emb.T
    into one preallocated buffer, nothing read back."""
    buffer = torch.empty(rows * cols, device=emb.device)
    for start in range(0, emb.shape[0], rows):
        q = emb[start : start + rows]
        for c in range(0, emb.shape[0], cols):
            g = emb[c : c + cols]
            torch.mm(q, g.T, out=buffer[: q.shape[0] * g.shape[0]].view(q.shape[0], -1))


def _best_seconds(fn: Callable[[], object], repeats: int) -> float:
    return min(_timed(fn)[0] for _ in range(repeats))


def _floor_row(n: int, dim: int, repeats: int) -> str:
    """One row: ours, the GEMM floor (the faster of the evaluator's tiling and full-width blocks) and faiss."""
    size = EvalSize(f"{n}", n, dim, n // 5, (1, 10, 100), restarts=1, iterations=1)
    emb, y = random_split(size)
    rows, cols = search.tile_shape(emb.device)
    ours = _best_seconds(lambda: metrics.recall_at_k(emb, y, size.ks), repeats)
    floor = min(_best_seconds(lambda: gemm_floor(emb, rows, cols), repeats),
                _best_seconds(lambda: gemm_floor(emb, search.block_rows(n), n), repeats))
    faiss = _best_seconds(lambda: search.topk_search(emb, emb, 101, backend="faiss"), repeats) \
        if search.load_faiss() is not None else float("nan")
    return f"| {n:,} x {dim} | {ours:.2f} | {floor:.2f} | {ours / floor:.2f} | {faiss:.2f} | {faiss / floor:.2f} |"


class BusyProcess:
    """`with BusyProcess():` one other Python process spinning on a core (`while True: pass`), as a DataLoader
    worker or a concurrent run is beside an evaluation during training."""

    def __enter__(self):
        import subprocess
        import sys

        self.process = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        time.sleep(0.5)  # started and spinning
        return self

    def __exit__(self, *exc) -> None:
        self.process.kill()
        self.process.wait()


def contention_row(n: int, dim: int, repeats: int) -> str:
    """Recall@K and the GEMM floor (the evaluator's tiling), medians of `repeats` interleaved runs, on a quiet
    machine and beside one busy process: the evaluator must keep its ratio to the floor under contention."""
    size = EvalSize(f"{n}", n, dim, n // 5, (1, 10, 100), restarts=1, iterations=1)
    emb, y = random_split(size)
    rows, cols = search.tile_shape(emb.device)
    runs = {"ours": lambda: metrics.recall_at_k(emb, y, size.ks), "floor": lambda: gemm_floor(emb, rows, cols)}

    def medians() -> dict[str, float]:
        times: dict[str, list[float]] = {k: [] for k in runs}
        for _ in range(repeats):
            for name, fn in runs.items():
                times[name].append(_timed(fn)[0])
        return {k: statistics.median(v) for k, v in times.items()}

    quiet = medians()
    with BusyProcess():
        busy = medians()
    return (f"| {n:,} x {dim} | {quiet['ours']:.2f} | {quiet['floor']:.2f} | {quiet['ours'] / quiet['floor']:.2f} | "
            f"{busy['ours']:.2f} | {busy['floor']:.2f} | {busy['ours'] / busy['floor']:.2f} |")


def _floor_table(quick: bool) -> list[str]:
    """Recall@K (ours, leave-one-out, K = 1, 10, 100) against the GEMM floor and a bare faiss exact top-101
    search, on the evaluator's device."""
    rows, cols = search.tile_shape(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    repeats = FLOOR_REPEATS[quick]
    return [(f"Recall@K at the GEMM floor (leave-one-out, K = 1, 10, 100, one class per 5 rows; best of {repeats}; "
             f"tile {rows} x {cols}; floor = the faster of that tiling and full rows in blocks of "
             f"{search._BLOCK_ELEMENTS:,} similarities, nothing read back):"), "",
            "| N x D | ours (s) | GEMM floor (s) | ours / floor | bare faiss top-101 (s) | faiss / floor |",
            "|---|---|---|---|---|---|",
            *(_floor_row(n, dim, repeats) for n, dim in (FLOOR_QUICK if quick else FLOOR_SIZES)), "",
            (f"Recall@K beside one busy process (`python -c 'while True: pass'`), medians of {repeats} interleaved "
             f"runs, {torch.get_num_threads()} torch threads; the evaluator must stay within 1.5x of the floor:"), "",
            ("| N x D | ours, quiet (s) | floor, quiet (s) | ours / floor | ours, busy (s) | floor, busy (s) | "
             "ours / floor, busy |"), "|---|---|---|---|---|---|---|",
            contention_row(*(FLOOR_QUICK if quick else FLOOR_SIZES)[0], repeats)]


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
    cases = [("faiss (`embedding_core.search.kmeans`)", x, k,
              lambda i: search.kmeans(x, k, restarts=1, iterations=i)),
             ("faiss (`embedding_core.search.kmeans`)", sub, sub_k,
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

    from embedding_core.clusters import cluster_centers
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

    return batch_size * _steps_per_second(model, batch, optimizer, steps)


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

    return _peak_bytes(lambda: 2 * size.batch * _steps_per_second(model, batch, optimizer, size.steps))


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


# ---- ROUL: training throughput against TAC-CCL's baseline, refinement cost per query ---------------------


def _roul_images_per_second(backbone: str, size: int, batch_size: int, steps: int, **flags) -> float:
    """Optimizer steps of ROUL.training_step on random images (model and losses only), with TAC-CCL's bench
    setting: 100 pseudo classes, P x 5 batches, a 5,864-entry memory bank; 128-d; every item in a core."""

    from embedding_core.clusters import cluster_centers
    from lightning_modules.roul import ROUL

    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    in_chans, dim, n_train, clusters, per_class = (1 if backbone == "small_cnn" else 3), 128, 5_864, 100, 5
    model = ROUL(backbone=backbone, in_chans=in_chans, embedding_dim=dim, frozen_bn=backbone == "googlenet",
                 core_fraction=1.0, **flags).to(device).train()
    bank = F.normalize(torch.randn(n_train, dim), dim=1)
    labels = torch.arange(n_train) % clusters
    model.set_pseudo_labels(labels, cluster_centers(bank, labels, clusters), bank)
    index = (torch.arange(batch_size // per_class)[:, None] + clusters * torch.arange(per_class)).flatten()
    batch = {"views": [torch.randn(batch_size, in_chans, size, size, device=device)], "index": index.to(device)}
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-5)

    return batch_size * _steps_per_second(model, batch, optimizer, steps)


def _refinement_ms_per_query(queries: int, m: int, feature_dim: int) -> tuple[float, float]:
    """(ms per query for the whole refinement, of which Φ) on random unit embeddings (128-d) and order
    features, leave-one-out top-M, Φ at the paper configs' sizes (512 / 256 / 128)."""
    from callbacks.refine import refined_neighbors
    from lightning_modules.roul import OrderHead

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    emb = F.normalize(torch.randn(queries, 128, device=device), dim=1)
    feature = F.normalize(torch.randn(queries, feature_dim, device=device), dim=1)
    head = OrderHead(feature_dim).to(device).eval()
    phi_seconds = [0.0]

    def order_fn(anchor: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        start = time.perf_counter()
        out = head(anchor, items)
        if device == "cuda":
            torch.cuda.synchronize()
        phi_seconds[0] += time.perf_counter() - start
        return out

    refined_neighbors(emb[:8], feature[:8], order_fn, m, 10.0, 1.0, emb, feature)  # warm-up
    phi_seconds[0] = 0.0
    seconds = _timed(lambda: refined_neighbors(emb, feature, order_fn, m, 10.0, 1.0))[0]
    return 1e3 * seconds / queries, 1e3 * phi_seconds[0] / queries


def bench_roul(quick: bool = False) -> str:
    """ROUL's training throughput against TAC-CCL's Baseline (MS + memory) on the same backbone and batch, and
    the test-time refinement's cost per query at M = 32 (CUB/Cars) and M = 100 (SOP)."""
    cases = [("small_cnn", 8, 80, "digits-size CNN 8x8")]
    cases.append(("googlenet", 64, 20, "GoogLeNet 64x64 (quick)") if quick
                 else ("googlenet", 227, 80, "GoogLeNet 227x227"))
    steps = 1 if quick else 3
    no_phi = {"roc_weight": 0.0, "moc_weight": 0.0, "order_weight": 0.0}
    small_phi = {"order_hidden": 64, "order_pair_dim": 32, "order_head_dim": 32}
    lines = ["### ROUL", "", device_info(), "",
             (f"Training throughput (`training_step` + backward + Adam step on random images, {steps} steps after "
              "one warm-up; model and losses only). ROUL's full step runs the backbone on 1 + L = 3 views and Φ "
              "on B x (B + 1)² pairs; its Baseline row has no Φ and one view:"), "",
             "| backbone, input | batch (P x 5) | TAC-CCL Baseline (img/s) | ROUL Baseline (img/s) | ROUL full (img/s) |",
             "|---|---|---|---|---|"]
    for backbone, size, batch_size, label in cases:
        phi = small_phi if backbone == "small_cnn" else {}
        tac = _tac_ccl_images_per_second(backbone, size, batch_size, steps, ccl_weight=0.0, tac_weight=0.0,
                                         feature_weight=0.0)
        rates = [_roul_images_per_second(backbone, size, batch_size, steps, **flags) for flags in (no_phi, phi)]
        lines.append(f"| {label} | {batch_size} | {tac:.1f} | {rates[0]:.1f} | {rates[1]:.1f} |")
    queries = 500 if quick else 2_000
    lines += ["", (f"Test-time refinement per query ({queries:,} queries, leave-one-out top-M on 128-d unit "
                   "embeddings, Φ on 1024-d order features at 512 / 256 / 128, odd-even swap descent):"), "",
              "| M | total (ms / query) | of which Φ (ms / query) |", "|---|---|---|"]
    for m in (32, 100):
        total, phi_ms = _refinement_ms_per_query(queries, m, 1024)
        lines.append(f"| {m} | {total:.3f} | {phi_ms:.3f} |")
    return "\n".join(lines)


# -- data: the device-resident fast path against the DataLoader + PIL path -------------------------------
@dataclass(frozen=True)
class DataSize:
    """A CIFAR-10-shaped synthetic training set, the batch and the steps timed (after `warmup` steps)."""

    images: int
    batch_size: int
    steps: int
    warmup: int
    backbone: str


FULL_DATA = DataSize(50_000, 128, 40, 5, "cifar_resnet18")  # ISIF's CIFAR-10 protocol: 50K, 128 x 2 views
QUICK_DATA = DataSize(1_024, 32, 3, 1, "small_cnn")  # the test-sized network


def synthetic_cifar(size: DataSize, device_resident: bool, workers: int):
    """An ISIF CIFAR-10 datamodule (npid preset, 2 views) over random 32x32 images, on either path."""
    import numpy as np

    from datamodules.base import EmbeddingDataModule, Records

    class SyntheticCIFAR(EmbeddingDataModule):
        name = "synthetic CIFAR-10"

        def read_records(self):
            g = np.random.default_rng(0)
            images = g.integers(0, 256, (size.images, 32, 32, 3), dtype=np.uint8)
            targets = np.arange(size.images) % 10
            return {"train": Records(images, targets), "test": Records(images[:256], targets[:256])}

    from datamodules.cifar import CIFAR10DataModule

    return SyntheticCIFAR(batch_size=size.batch_size, num_workers=workers, device_resident=device_resident,
                          mean=CIFAR10DataModule.mean, std=CIFAR10DataModule.std)


def _images_per_second(dm, size: DataSize, device: torch.device, train: bool) -> float:
    """Training instances (of 2 views each) per second, steady state: the loader, the transfer, the device
    augmentation (fast path) and, with `train`, ISIF's step (bf16 autocast and channels_last on a GPU)."""
    from lightning.fabric.utilities.apply_func import move_data_to_device

    from lightning_modules.isif import ISIF, isif_loss

    on_gpu = device.type == "cuda"
    model = ISIF(backbone=size.backbone, channels_last=on_gpu).to(device) if train else None
    optimizer = torch.optim.SGD(model.parameters(), lr=0.03, momentum=0.9) if train else None
    batches = iter(dm.train_dataloader())
    start = 0.0
    for step in range(size.warmup + size.steps):
        if step == size.warmup:
            if on_gpu:
                torch.cuda.synchronize()
            start = time.perf_counter()
        batch = dm.on_after_batch_transfer(move_data_to_device(next(batches), device), 0)
        if train:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=on_gpu):
                loss = isif_loss(*model.embed_views(batch["views"]))["loss"]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    if on_gpu:
        torch.cuda.synchronize()
    return size.steps * size.batch_size / (time.perf_counter() - start)


def bench_data(quick: bool = False) -> str:
    """ISIF on CIFAR-10-shaped data: the fast path (data on the device) against the DataLoader + PIL path,
    the data path alone and with the training step, and the epoch / 200-epoch times that follow."""
    size = QUICK_DATA if quick else FULL_DATA
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    workers = min(8, os.cpu_count() or 1)
    rows = []
    for name, resident, loader_workers in (("DataLoader + PIL", False, workers), ("device-resident", True, 0)):
        dm = synthetic_cifar(size, resident, loader_workers)
        data = _images_per_second(dm, size, device, train=False)
        train = _images_per_second(dm, size, device, train=True)
        epoch = 50_000 / train
        rows.append(f"| {name} | {loader_workers} | {data:,.0f} | {train:,.0f} | {epoch:,.1f} | "
                    f"{200 * epoch / 3600:,.2f} |")
    title = (f"### data: ISIF on CIFAR-10-shaped data ({size.backbone}, batch {size.batch_size} x 2 views, "
             f"{size.images:,} synthetic 32x32 images, {device.type})")
    header = ("| path | loader workers | data only, images/s | ISIF training, images/s | epoch of 50K, s | "
              "200 epochs, h |\n|---|---|---|---|---|---|")
    note = ("images = training instances (2 augmented views each); steady state after "
            f"{size.warmup} warm-up steps, {size.steps} steps timed; the epoch and 200-epoch times extrapolate "
            "the training rate to CIFAR-10's 50,000 images (evaluation passes not included).")
    return "\n".join([title, device_info(), "", header, *rows, "", note])


# ---- SAN: overhead over the same backbone without it ------------------------------------------------------


@dataclass(frozen=True)
class SanSize:
    """The backbone, stage, input and batch SAN's overhead is timed at (full: the paper's GoogLeNet, 227, 80)."""

    backbone: str
    stage: str
    channels: int
    image: int
    batch: int
    steps: int


SAN_FULL = SanSize("googlenet", "inception4e", 3, 227, 80, steps=2)
SAN_QUICK = SanSize("small_cnn", "block3", 1, 8, 80, steps=3)


def _san_case(enabled: bool, size: SanSize) -> tuple[float, int]:
    """Images/s of `SAN.training_step` (MS loss, no memory: the bank costs both rows the same) + backward +
    Adam step on random images in 16 x 5 class batches, and peak memory; `enabled` False = no SAN."""
    import warnings

    from lightning_modules.san import SAN, Assembly

    warnings.filterwarnings("ignore", message=".*self.log.*")  # no Trainer attached: logging is skipped
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = SAN(backbone=size.backbone, in_chans=size.channels, embedding_dim=512, memory_weight=0.0,
                frozen_bn=size.backbone == "googlenet", assembly=Assembly(enabled=enabled, stage=size.stage))
    model.insert_assembly(size.image)
    model = model.to(device).train()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    images = torch.randn(size.batch, size.channels, size.image, size.image, device=device)
    batch = {"views": [images], "index": torch.arange(size.batch, device=device),
             "target": (torch.arange(size.batch, device=device) // 5)}

    return _peak_bytes(lambda: size.batch * _steps_per_second(model, batch, optimizer, size.steps))


def bench_san(quick: bool = False) -> str:
    """SAN's training overhead (time and memory) over the same backbone without it."""
    size = SAN_QUICK if quick else SAN_FULL
    mib = 2**20
    lines = ["### SAN overhead (forward + backward + Adam step, MS loss, no memory bank)", "", device_info(), "",
             (f"{size.backbone}, SAN after {size.stage}, {size.channels}x{size.image}x{size.image} random images, "
              f"batch {size.batch} (16 classes x 5), {size.steps} steps after one warm-up; peak memory = CUDA "
              "max_memory_allocated, else the growth of peak RSS in a fresh process."), "",
             "| network | images/s | time vs no SAN | peak memory (MiB) | memory vs no SAN |", "|---|---|---|---|---|"]
    base_rate, base_peak = _isolated(_san_case, False, size)
    rate, peak = _isolated(_san_case, True, size)
    lines.append(f"| no SAN | {base_rate:.1f} | 1.00 | {base_peak / mib:.0f} | 1.00 |")
    lines.append(f"| SAN | {rate:.1f} | {base_rate / rate:.2f} | {peak / mib:.0f} | "
                 f"{peak / max(base_peak, 1):.2f} |")
    return "\n".join(lines)


# ---- EIR: training throughput against ISIF's on the same backbone and batch ---------------------------------

EIR_BANK = {False: 50_000, True: 1_437}  # CIFAR's N (full), digits' training split (quick)


def _eir_case(method: str, size: TrainSize, bank: int) -> tuple[float, int]:
    """Training instances/s of the method's own `training_step` + backward + SGD step on random images (an
    instance = one dataset image: two views for ISIF and IRaug, two views and one mixed image for EIR),
    and peak memory. EIR and IRaug read and write a bank of `bank` rows."""
    import warnings

    from lightning_modules.eir import EIR
    from lightning_modules.isif import ISIF
    from lightning_modules.relations import Relations

    warnings.filterwarnings("ignore", message=".*self.log.*")  # no Trainer attached: logging is skipped
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    common = {"backbone": size.backbone, "in_chans": size.channels, "gather_negatives": False}
    if method == "ISIF":
        model = ISIF(**common)
    else:
        relations = Relations(intra_weight=15.0, inter_weight=2.0) if method == "EIR" else Relations()
        model = EIR(relations=relations, **common)
        model.bank.resize(bank)
    model = model.to(device)
    optimizer = model.configure_optimizers()["optimizer"]
    views = [torch.randn(size.batch, size.channels, size.image, size.image, device=device) for _ in range(2)]
    batch = {"views": views, "index": torch.randperm(bank)[: size.batch].to(device),
             "target": torch.full((size.batch,), -1)}

    return _peak_bytes(lambda: size.batch * _steps_per_second(model, batch, optimizer, size.steps))


def bench_eir(quick: bool = False) -> str:
    """EIR (IRaug + intra + inter) vs its IRaug baseline vs ISIF: training throughput on one backbone and batch.
    EIR forwards 3 images per instance (two views, one mixed) against ISIF's 2 (about 1.5x the
    cost), and IRaug's N-way softmax reads the whole bank twice per step."""
    size, bank = (UMM_QUICK if quick else UMM_FULL), EIR_BANK[quick]
    mib = 2**20
    lines = ["### EIR vs ISIF training throughput (forward + backward + SGD step)", "", device_info(), "",
             (f"{size.backbone}, {size.channels}x{size.image}x{size.image} random images, batch = {size.batch} "
              f"instances, {size.steps} steps after one warm-up; memory bank N = {bank:,} rows (EIR, IRaug); "
              "instances/s = dataset images per second; peak memory = CUDA max_memory_allocated, else the growth "
              "of peak RSS in a fresh process."), "",
             "| method | images per instance | instances/s | vs ISIF | peak memory (MiB) |", "|---|---|---|---|---|"]
    isif_rate, isif_peak = _isolated(_eir_case, "ISIF", size, bank)
    lines.append(f"| ISIF | 2 | {isif_rate:.0f} | 1.00 | {isif_peak / mib:.0f} |")
    for method, images in (("IRaug", 2), ("EIR", 3)):
        rate, peak = _isolated(_eir_case, method, size, bank)
        lines.append(f"| {method} | {images} | {rate:.0f} | {rate / isif_rate:.2f} | {peak / mib:.0f} |")
    return "\n".join(lines)


# ---- k-means: seeding and Lloyd's iterations, time and NMI ---------------------------------------------


@dataclass(frozen=True)
class KMeansSize:
    """A k-means problem: N rows of `dim`, K clusters = classes, Lloyd's iterations per run, class noise."""

    name: str
    n: int
    dim: int
    clusters: int
    iterations: int
    noise: float = 2.0


# CUB: its test split and TAC-CCL's 100 clusters, the pseudo-label callback's 50 iterations. SOP: TAC-CCL's
# pseudo labels (the ~60K training images, K = 10,000); 10 Lloyd iterations keep scikit-learn's run on a CPU
# to minutes (Lloyd's time grows linearly with them; the seeding's does not).
KMEANS_FULL = (KMeansSize("CUB", 5_924, 512, 100, 50), KMeansSize("SOP", 60_000, 512, 10_000, 10))
KMEANS_QUICK = (KMeansSize("CUB-quick", 600, 32, 20, 10, noise=0.5),
                KMeansSize("SOP-quick", 1_200, 32, 200, 5, noise=0.5))


def labelled_clusters(size: KMeansSize, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised rows around `size.clusters` class centres ~N(0, I) with N(0, noise^2) per coordinate,
    and their balanced class labels: data whose k-means clustering has a right answer to score (NMI). At
    noise 2 in 512-d, classes overlap enough that seeding matters (neither 100 nor chance)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(size.clusters, size.dim, generator=g)
    targets = torch.randperm(size.n, generator=g) % size.clusters
    rows = F.normalize(centres[targets] + size.noise * torch.randn(size.n, size.dim, generator=g), dim=1)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return rows.to(device), targets


def _sklearn_kmeans_plus_plus(x: torch.Tensor, size: KMeansSize) -> tuple[float, float, object]:
    """(seeding s, Lloyd s, fitted KMeans) of scikit-learn: its greedy k-means++, then its Lloyd's
    iterations from those seeds (tol=0: all `iterations`, as faiss runs them)."""
    from sklearn.cluster import KMeans, kmeans_plusplus

    points = x.cpu().numpy()
    seed_s, (seeds, _) = _timed(lambda: kmeans_plusplus(points, size.clusters, random_state=0))
    lloyd_s, fitted = _timed(lambda: KMeans(size.clusters, init=seeds, n_init=1, max_iter=size.iterations,
                                            tol=0.0, algorithm="lloyd").fit(points))
    return seed_s, lloyd_s, fitted


def _kmeans_row(size: KMeansSize, method: str, seed_s: float, lloyd_s: float, inertia: float, targets,
                labels) -> str:
    nmi = metrics.nmi_from_labels(targets, labels)
    return (f"| {size.name} | {size.n:,} x {size.dim}, K={size.clusters:,} | {method} | {seed_s:.2f} "
            f"| {lloyd_s:.2f} | {seed_s + lloyd_s:.2f} | {inertia:.1f} | {nmi:.2f} |")


def _kmeans_rows(size: KMeansSize) -> Iterator[str]:
    """One run (restarts = 1, the pseudo-label configs') per seeding on the same data: seeding and Lloyd
    seconds, inertia and NMI against the classes, a row as each run ends (a long run shows what it has)."""
    x, targets = labelled_clusters(size)
    k = size.clusters
    run_lloyd = search.lloyd_for(x.device)
    where = f"{'faiss' if run_lloyd is search.faiss_lloyd else 'torch'} Lloyd"
    seeders = [
        ("random points (`init=\"random\"`)", lambda g: search.random_seeds(x, k, g)),
        ("k-means++, plain (1 draw per centre)", lambda g: search.kmeans_plus_plus(x, k, g, local_trials=1)),
        (f"greedy k-means++ ({search.greedy_trials(k)} draws, the default)",
         lambda g: search.kmeans_plus_plus(x, k, g)),
    ]
    for name, seeder in seeders:
        seed_s, seeds = _timed(lambda seeder=seeder: seeder(torch.Generator(device=x.device).manual_seed(0)))
        lloyd_s, (labels, inertia) = _timed(lambda seeds=seeds: run_lloyd(x, seeds, size.iterations))
        yield _kmeans_row(size, f"{name} + {where}", seed_s, lloyd_s, inertia, targets, labels)
    seed_s, lloyd_s, fitted = _sklearn_kmeans_plus_plus(x, size)
    yield _kmeans_row(size, "scikit-learn (greedy k-means++ + its Lloyd)", seed_s, lloyd_s,
                      fitted.inertia_, targets, fitted.labels_)


def bench_kmeans(quick: bool = False, sizes: tuple[KMeansSize, ...] | None = None) -> str:
    """k-means seeding (random points, plain and greedy k-means++, scikit-learn's) with Lloyd's iterations:
    seconds and NMI on the same data, at CUB's size and at SOP's pseudo-label size (`sizes` overrides)."""
    sizes = sizes or (KMEANS_QUICK if quick else KMEANS_FULL)
    lines = ["### k-means: seeding and Lloyd's iterations", "", device_info(), "",
             ("One run each (restarts = 1, as the pseudo-label configs) on L2-normalised Gaussian classes "
              "(centres ~N(0, I), noise per coordinate and Lloyd's iterations: "
              + ", ".join(f"{s.noise:g} and {s.iterations} at {s.name}" for s in sizes)
              + "); seeds drawn by torch on the data's device; NMI (%) of the clusters against the classes."),
             "",
             "| set | data | seeding + Lloyd | seeding (s) | Lloyd (s) | total (s) | inertia | NMI |",
             "|---|---|---|---|---|---|---|---|"]
    for size in sizes:
        lines.extend(_kmeans_rows(size))
    return "\n".join(lines)


# ---- CPU step: the effect tables' network, each speed switch, paired --------------------------------------

@dataclass(frozen=True)
class StepSize:
    """The step timed: `backbone` at `image` px, `batch` instances x 2 views (ISIF), `rounds` interleaved."""

    backbone: str
    image: int
    batch: int
    rounds: int
    budget: int  # the run length a one-off cost (compilation) is weighed against


STEP_FULL = StepSize("small_cnn", 32, 128, rounds=5, budget=400)  # the effect tables: 4 x 100 steps of 128
STEP_QUICK = StepSize("small_cnn", 16, 8, rounds=2, budget=400)
STEP_VARIANTS = ("bare fp32", "channels_last", "bf16 autocast", "torch.compile")


def _isif_step(variant: str, size: StepSize, device: torch.device | None = None) -> Callable[[], float]:
    """One ISIF training step (forward of both views, loss, backward, SGD) under `variant`, on a fixed batch
    on `device` (default CPU). The step returns the loss (a host read: it also ends the step on a GPU)."""
    from lightning_modules.isif import ISIF, isif_loss

    device = device or torch.device("cpu")
    torch.manual_seed(0)
    model = ISIF(backbone=size.backbone, channels_last=variant == "channels_last",
                 compile=variant == "torch.compile").to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.03, momentum=0.9)
    views = [torch.randn(size.batch, 3, size.image, size.image, device=device) for _ in range(2)]
    step_device[variant] = next(model.parameters()).device

    def step() -> float:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=variant == "bf16 autocast"):
            loss = isif_loss(*model.embed_views(views))["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    return step


step_device: dict[str, torch.device] = {}  # where each variant's model last ran (gpu_check's fallback check)


def step_rates(size: StepSize, variants: tuple[str, ...] = STEP_VARIANTS,
               device: torch.device | None = None) -> dict[str, dict[str, float]]:
    """Per variant: the first step's seconds (compilation, allocator) and the median step of `rounds`, the
    variants interleaved step by step so that other processes' load falls on all of them alike."""
    steps = {v: _isif_step(v, size, device) for v in variants}
    first = {v: _timed(steps[v])[0] for v in variants}
    for v in variants:  # a second warm-up (compile's guards, the optimizer's state)
        steps[v]()
    times: dict[str, list[float]] = {v: [] for v in variants}
    for _ in range(size.rounds):
        for v in variants:
            times[v].append(_timed(steps[v])[0])
    return {v: {"first": first[v], "step": statistics.median(times[v])} for v in variants}


def bench_cpu_step(quick: bool = False) -> str:
    """The CPU step throughput of the effect tables' network (ISIF step, 2 views) under each speed switch,
    and the resident data path against DataLoader + PIL with that network."""
    size = STEP_QUICK if quick else STEP_FULL
    rates = step_rates(size, STEP_VARIANTS[:-1] if quick else STEP_VARIANTS)  # compiling takes minutes
    bare = rates["bare fp32"]["step"]
    rows = []
    for variant, r in rates.items():
        saved = bare - r["step"]
        overhead = max(0.0, r["first"] - r["step"])
        pays = (f"{overhead / saved:,.0f} steps" if saved > 0 else "never") if variant != "bare fp32" else "-"
        rows.append(f"| {variant} | {2 * size.batch / r['step']:,.0f} | {bare / r['step']:.2f} | "
                    f"{r['first']:.2f} | {pays} |")
    data_size = DataSize(1_024 if quick else 2_048, size.batch, 3 if quick else 8, 1 if quick else 2, size.backbone)
    workers = min(2, os.cpu_count() or 1)
    data_rows = []
    for name, resident, loader_workers in (("DataLoader + PIL", False, workers), ("device-resident", True, 0)):
        rate = _images_per_second(synthetic_cifar(data_size, resident, loader_workers), data_size,
                                  torch.device("cpu"), train=True)
        data_rows.append(f"| {name} | {loader_workers} | {2 * rate:,.0f} |")
    title = (f"### cpu_step: ISIF step of {size.backbone} at {size.image} px, batch {size.batch} x 2 views, on the "
             f"CPU ({torch.get_num_threads()} threads)")
    note = (f"median of {size.rounds} steps per variant, the variants interleaved step by step (other processes' "
            f"load falls on all alike); pays back = the first step's extra time over the steps it saves (a "
            f"{size.budget}-step effect run must exceed it). The data rows time the same step fed by each path "
            f"(npid preset, {data_size.steps} steps after {data_size.warmup}).")
    return "\n".join([title, device_info(), "",
                      "| variant | images/s | x bare | first step, s | compile/warm-up pays back after |",
                      "|---|---|---|---|---|", *rows, "",
                      "| data path | loader workers | training images/s |", "|---|---|---|", *data_rows, "", note])


SECTIONS: dict[str, Callable[[bool], str]] = {"evaluation": bench_evaluation, "tac_ccl": bench_tac_ccl, "umm": bench_umm,
                                              "roul": bench_roul, "data": bench_data, "san": bench_san,
                                              "eir": bench_eir, "kmeans": bench_kmeans, "cpu_step": bench_cpu_step}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=sorted(SECTIONS), help="run one section (default: all)")
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke test")
    args = parser.parse_args(argv)
    print(f"## make bench{' --quick' if args.quick else ''}: {machine()}\n", flush=True)
    for name in [args.only] if args.only else SECTIONS:
        start = time.perf_counter()
        print(SECTIONS[name](args.quick))
        print(f"\n_{name}: {time.perf_counter() - start:.0f} s wall_\n", flush=True)


if __name__ == "__main__":
    main()
