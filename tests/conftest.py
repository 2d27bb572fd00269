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


@pytest.fixture(scope="session")
def isif_digits_run(tmp_path_factory):
    """ISIF on digits at its test budget, logged to an offline W&B run: tests/test_isif_train.py's learning
    check and tests/test_train.py's W&B checks read this one run (it is the same command for both)."""
    from tests.learning import digits_run

    return digits_run(tmp_path_factory.mktemp("isif") / "run", "isif", logger="wandb")
