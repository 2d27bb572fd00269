"""Real DDP: sample discovery under 2 CPU processes (gloo) adds the same images with the same labels as
under 1, in both iterations of a generation; ClassificationEvaluator scores the same errors."""
import json
import subprocess
import sys

import torch

from tests.ddp_discovery import run


def discover(devices: int, tmp_path) -> dict:
    """One process runs here; two are launched from a fresh process, as a user's DDP run would be."""
    out = tmp_path / f"discovery-{devices}.json"
    if devices == 1:
        threads = torch.get_num_threads()
        run(1, str(out))
        torch.set_num_threads(threads)
    else:
        subprocess.run([sys.executable, "-m", "tests.ddp_discovery", "--devices", str(devices), "--out", str(out)],
                       check=True, timeout=600)
    return json.loads(out.read_text())


def test_two_processes_discover_what_one_does(tmp_path):
    single, double = discover(1, tmp_path), discover(2, tmp_path)
    assert [(h["count"], h["labeled"]) for h in single["history"]] == [(30, 60), (60, 120)]
    for one, two in zip(single["history"], double["history"], strict=True):
        assert (one["index"], one["label"]) == (two["index"], two["label"])
    assert (single["labeled"], single["targets"]) == (double["labeled"], double["targets"])
    assert set(single["errors"]) == {"val/error", "val/error_student", "val/error_teacher", "val/error_master"}
    assert double["errors"] == single["errors"]
