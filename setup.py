"""The install's one faiss. faiss-cpu and faiss-gpu-* write the same `faiss` module, so exactly one of them is
required, chosen when the package is installed (setuptools' dynamic dependencies; pip extras could only add a
second copy): `SUITE_FAISS=cpu` or `SUITE_FAISS=gpu` when set, else the GPU build where `nvidia-smi -L` lists a
GPU and the CPU build otherwise. The extras `cpu` and `gpu` name that same requirement, so `pip install -e .`,
`pip install -e '.[gpu]'` and `pip install -e '.[cpu]'` each install one faiss. For GPU search:
`pip uninstall -y faiss-cpu && SUITE_FAISS=gpu pip install -e '.[gpu]'`. The rest of the metadata is in
pyproject.toml; the suite names the faiss it runs with in each run's header and in `make bench`
(embedding_core/faiss_build.py)."""
from __future__ import annotations

import os
import shutil
import subprocess

FAISS = {"cpu": "faiss-cpu>=1.8", "gpu": "faiss-gpu-cu12>=1.8"}
DEPENDENCIES = [
    "torch>=2.4,<2.15",
    "torchvision>=0.19,<0.30",
    "lightning>=2.4,<3",
    "torchmetrics>=1.4",
    "jsonargparse[signatures]>=4.27",
    "wandb>=0.17",
    "timm>=1.0",
    "pandas>=2.0",
    "scikit-learn>=1.3",
    "scipy>=1.10",
    "pyyaml>=6",
    "pytorch-metric-learning>=2.3,<3",  # MS / Proxy-Anchor losses, miners, cross-batch memory
    "opencv-python-headless>=4.5",  # TAC-CCL's offline SIFT + RANSAC matching (callbacks/cross_pairs.py)
    "matplotlib>=3.7",  # pictures (callbacks/pictures.py) and the compare charts (experiments/compare.py)
    "kornia>=0.7",  # batched colour conversions of the device-resident data path (datamodules/device_augment.py)
]
EXTRAS = {
    # UMAP for the embedding map (callbacks/pictures.py); without it the map is scikit-learn's t-SNE.
    "pictures": ["umap-learn>=0.5"],
    "dev": ["pytest>=8", "ruff>=0.5"],
}


def has_gpu() -> bool:
    """Whether `nvidia-smi -L` lists a GPU (no driver, no nvidia-smi: no)."""
    if shutil.which("nvidia-smi") is None:
        return False
    try:
        listed = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.SubprocessError):
        return False
    return listed.returncode == 0 and "GPU" in listed.stdout


def faiss_build(environ: dict | None = None, gpu_present=has_gpu) -> str:
    """ "cpu" or "gpu": SUITE_FAISS when set, else "gpu" where a GPU is listed."""
    choice = (os.environ if environ is None else environ).get("SUITE_FAISS", "").strip().lower()
    if choice not in ("", "cpu", "gpu"):
        raise SystemExit(f"SUITE_FAISS={choice!r}: use cpu or gpu (or leave it unset to detect a GPU)")
    return choice or ("gpu" if gpu_present() else "cpu")


def requirements(build: str) -> tuple[list[str], dict[str, list[str]]]:
    """(install_requires, extras_require) with the one faiss of `build`; extras cpu / gpu name that one too."""
    return [*DEPENDENCIES, FAISS[build]], {**EXTRAS, "cpu": [FAISS[build]], "gpu": [FAISS[build]]}


if __name__ == "__main__":
    from setuptools import setup

    install_requires, extras_require = requirements(faiss_build())
    setup(install_requires=install_requires, extras_require=extras_require)
