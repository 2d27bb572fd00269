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


SECTIONS: dict[str, Callable[[bool], str]] = {"evaluation": bench_evaluation}


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
