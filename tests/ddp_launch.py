"""Runs a DDP test script with N CPU processes the way a user's run starts them."""
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import torch


def one_or_launched(script: str, run: Callable[[int, str], None], devices: int, out: Path) -> dict:
    """One process runs `run` here (thread count restored after); two or more are launched from a fresh
    `python -m script --devices N --out OUT`. The JSON rank 0 wrote."""
    if devices == 1:
        threads = torch.get_num_threads()
        run(1, str(out))
        torch.set_num_threads(threads)
    else:
        subprocess.run([sys.executable, "-m", script, "--devices", str(devices), "--out", str(out)],
                       check=True, timeout=600)
    return json.loads(out.read_text())
