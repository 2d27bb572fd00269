"""Seeds and random streams: each draw a function of what it is for, so resumes, worker counts and DDP world
sizes repeat it."""
from __future__ import annotations

import hashlib

import torch


def sample_seed(seed: int, epoch: int, index: int, draw: int = 0) -> int:
    """A seed that depends only on (seed, epoch, index, draw): augmentations are then identical across
    resumes, worker counts and DDP world sizes. `draw` tells apart repeats of one image in an epoch."""
    key = f"{seed}:{epoch}:{index}" + (f":{draw}" if draw else "")
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF


def step_generator(seed: int, step: int, rank: int) -> torch.Generator:
    """A CPU generator for one training step on one rank, a function of (seed, step, rank): a resume repeats
    the step's draws and the ranks draw differently (TAC-CCL's and ROUL's homographies, anchors, pairs)."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step * 101 + rank)


def own_random_stream():
    """A context whose draws leave the global (CPU and current CUDA device) random state as it was. LMCS's
    bookkeeping (the master's build, its k-means feature pass, discovery) runs in one, so it never shifts the
    student's MixUp draws: LMCS without guidance or discovery trains the student exactly as MixMatch alone on
    the same seed, which pairs the two in the digits study."""
    return torch.random.fork_rng(devices=[torch.cuda.current_device()] if torch.cuda.is_available() else [])
