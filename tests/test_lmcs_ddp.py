"""LMCS under real DDP (2 CPU processes, gloo) and across a resume: each finds the same critical samples with
the same labels as one uninterrupted process in both generations, builds the same look-ahead set, starts the
master, and scores the same errors."""
import torch

from tests.ddp_launch import one_or_launched
from tests.ddp_lmcs import fit as fit_lmcs
from tests.ddp_lmcs import run


def fit(devices: int, tmp_path) -> dict:
    return one_or_launched("tests.ddp_lmcs", run, devices, tmp_path / f"lmcs-{devices}.json")


def test_two_processes_discover_and_score_what_one_does(tmp_path):
    single, double = fit(1, tmp_path), fit(2, tmp_path)
    assert [(h["count"], h["labeled"]) for h in single["history"]] == [(30, 60), (60, 120)]
    assert single["history"] == double["history"]
    assert (single["labeled"], single["lookahead"]) == (double["labeled"], double["lookahead"])
    assert len(single["labeled"]) == 60 and len(single["lookahead"]) == 120  # the student a generation behind
    assert single["master_started"] and double["master_started"]
    assert set(single["errors"]) == {"val/error", "val/error_student", "val/error_teacher", "val/error_master"}
    # the master's evaluation normalises with each evaluation batch's statistics (master_bn batch, the mode
    # it trains in: docs/methods/lmcs.md), and DDP shards the test set into other batches: its error is not
    # world-size invariant; every per-sample evaluation is
    per_sample = [k for k in single["errors"] if k != "val/error_master"]
    assert {k: double["errors"][k] for k in per_sample} == {k: single["errors"][k] for k in per_sample}
    assert abs(double["errors"]["val/error_master"] - single["errors"]["val/error_master"]) < 10


def test_a_fit_resumed_between_the_generations_continues_as_the_straight_one(tmp_path):
    """The checkpoint of epoch 2 is written after generation 1's discovery (U_1 with the master only): the
    resumed fit hands U_1 to the student and discovers U_2 as the straight fit does."""
    straight = fit_lmcs(1, str(tmp_path / "straight"))
    fit_lmcs(1, str(tmp_path / "half"), max_epochs=2)
    resumed = fit_lmcs(1, str(tmp_path / "resumed"), ckpt_path=str(tmp_path / "half" / "ckpt" / "last.ckpt"))
    (model, data, discovery, evaluator, _), (model2, data2, discovery2, evaluator2, _) = straight, resumed
    assert [h["index"] for h in discovery2.history] == [h["index"] for h in discovery.history]
    assert [h["label"] for h in discovery2.history] == [h["label"] for h in discovery.history]
    assert (data2.labeled_indices.tolist(), data2.lookahead_indices.tolist()) == \
        (data.labeled_indices.tolist(), data.lookahead_indices.tolist())
    assert bool(model2.master_started) and torch.equal(model2.jd_centers, model.jd_centers)
    assert evaluator2.latest == evaluator.latest
