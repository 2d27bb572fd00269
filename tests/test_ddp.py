"""Real DDP: 2 CPU processes (gloo) score the same model exactly as 1 process does, on eval sets whose
sizes (1,437 reference images) are not divisible by 2, and a DDP fit with gathered negatives runs."""
import json
import math
import subprocess
import sys

import pytest


def run(devices: int, tmp_path, *flags) -> dict:
    out = tmp_path / f"metrics-{devices}.json"
    subprocess.run([sys.executable, "-m", "tests.ddp_run", "--devices", str(devices), "--out", str(out), *flags],
                   check=True, timeout=300)
    return json.loads(out.read_text())


def test_two_processes_give_the_metrics_of_one(tmp_path):
    single = run(1, tmp_path)["validate"]
    double = run(2, tmp_path, "--fit")
    assert set(single) == {"val/knn_top1", "val/recall@1", "val/recall@2", "val/recall@4", "val/recall@8", "val/nmi"}
    assert double["validate"] == pytest.approx(single, abs=1e-4)
    assert all(math.isfinite(v) for v in double["fit"].values())
    assert double["fit"] != double["validate"]  # the DDP fit changed the weights
