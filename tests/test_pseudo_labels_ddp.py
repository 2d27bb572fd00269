"""Real DDP (2 CPU processes, gloo): after a refresh every rank holds the same pseudo labels, centres and
memory bank, in the callback, the module and the datamodule's sampler."""
import subprocess
import sys

import torch


def test_both_ranks_hold_identical_pseudo_labels_after_a_refresh(tmp_path):
    subprocess.run([sys.executable, "-m", "tests.ddp_pseudo_labels", "--devices", "2",
                    "--out", str(tmp_path)], check=True, timeout=300)
    first, second = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert first["epoch"] == second["epoch"] == 1  # refreshed at fit start and before epoch 1
    for key in ("callback", "centers", "module", "datamodule", "memory_embedding", "memory_index"):
        assert torch.equal(first[key], second[key]), key
    assert torch.equal(first["module"], first["callback"])
    assert torch.equal(first["datamodule"], first["callback"])
    assert len(first["callback"]) == 901 and first["centers"].shape == (8, 16)
