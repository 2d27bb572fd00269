"""Real DDP: sample discovery under 2 CPU processes (gloo) adds the same images with the same labels as
under 1, in both iterations of a generation; ClassificationEvaluator scores the same errors."""
from tests.ddp_discovery import run
from tests.ddp_launch import one_or_launched


def discover(devices: int, tmp_path) -> dict:
    return one_or_launched("tests.ddp_discovery", run, devices, tmp_path / f"discovery-{devices}.json")


def test_two_processes_discover_what_one_does(tmp_path):
    single, double = discover(1, tmp_path), discover(2, tmp_path)
    assert [(h["count"], h["labeled"]) for h in single["history"]] == [(30, 60), (60, 120)]
    for one, two in zip(single["history"], double["history"], strict=True):
        assert (one["index"], one["label"]) == (two["index"], two["label"])
    assert (single["labeled"], single["targets"]) == (double["labeled"], double["targets"])
    assert set(single["errors"]) == {"val/error", "val/error_student", "val/error_teacher", "val/error_master"}
    assert double["errors"] == single["errors"]
