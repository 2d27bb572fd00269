"""Which faiss this environment has: its version, CPU or GPU build, and the distribution that installed it.

faiss-cpu and faiss-gpu-* both install the one `faiss` module, so with both installed the last one written
wins, and a CPU build silently runs the GPU runs' k-means and search on the CPU. `describe` names the build
(the run header and `make bench` print it); `require_gpu_build` refuses GPU search without the GPU build.
The install picks one (setup.py: `SUITE_FAISS=cpu|gpu`, else GPU when `nvidia-smi` lists one).
"""
from __future__ import annotations

from importlib import metadata

# the distributions that provide the `faiss` module
DISTRIBUTIONS = ("faiss-cpu", "faiss-gpu", "faiss-gpu-cu11", "faiss-gpu-cu12", "faiss-gpu-cuvs")
GPU_INSTALL = "pip uninstall -y faiss-cpu && SUITE_FAISS=gpu pip install -e '.[gpu]'"


def installed_distributions() -> list[str]:
    """The faiss distributions pip has installed, e.g. ["faiss-cpu"] (two or more: one overwrote the other)."""
    found = []
    for name in DISTRIBUTIONS:
        try:
            metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
        found.append(name)
    return found


def is_gpu_build(faiss) -> bool:
    """faiss's GPU build has StandardGpuResources; the CPU build does not."""
    return faiss is not None and hasattr(faiss, "StandardGpuResources")


def describe(faiss, distributions: list[str] | None = None) -> str:
    """One line: "faiss 1.9.0, CPU build (faiss-cpu)", "faiss 1.9.0, GPU build (faiss-gpu-cu12), 1 GPU",
    "faiss not installed (the torch backend is used)"; two distributions installed are named as a problem."""
    distributions = installed_distributions() if distributions is None else distributions
    if faiss is None:
        return "faiss not installed (the torch backend searches and clusters)"
    build = "GPU build" if is_gpu_build(faiss) else "CPU build"
    line = f"faiss {faiss.__version__}, {build} ({', '.join(distributions) or 'source build'})"
    if is_gpu_build(faiss):
        line += f", {faiss.get_num_gpus()} GPU(s) visible"
    if len(distributions) > 1:
        line += (f"; WARNING: {len(distributions)} faiss distributions write the same module, the {build} won: "
                 f"keep one ({GPU_INSTALL} for GPU search, or pip uninstall the gpu one)")
    return line


def require_gpu_build(faiss, what: str) -> None:
    """Refuses `what` (e.g. "backend='faiss-gpu'") unless faiss's GPU build is installed and sees a GPU."""
    if not is_gpu_build(faiss):
        raise RuntimeError(f"{what} needs faiss's GPU build, and this environment has {describe(faiss)}; install "
                           f"it with `{GPU_INSTALL}`, or search on the CPU (backend 'auto' or 'faiss')")
    if faiss.get_num_gpus() == 0:
        raise RuntimeError(f"{what}: faiss's GPU build sees no GPU (CUDA_VISIBLE_DEVICES, driver); "
                           f"{describe(faiss)}")
