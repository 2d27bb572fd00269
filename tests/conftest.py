import os

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("WANDB_DISABLE_GIT", "true")
os.environ.setdefault("SUITE_PICTURES", "false")  # a CLI run's default pictures cost seconds; tests ask for them


@pytest.fixture
def one_thread():
    """One intra-op thread: on a shared 2-core machine, two spinning OpenMP threads run ~10x slower.
    A test file opts in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
