"""The seed study behind every learning check: ``python -m experiments.seeds`` (``make seeds``).

Runs each method's digits config over several seeds (``--seed_everything``, which also draws the semi
split where a config ties the two, and a method's own seeds in `SEED_FLAGS`) and prints, per metric, the random-init network against the last
epoch: mean and worst over seeds, and the worst per-seed gain. A test that a method learns asserts a
margin that this worst gain clears comfortably; ``--budget test`` runs the shortened settings the tests
use (`TEST_BUDGET`, which the tests import), so the margin is measured where it is asserted.

    python -m experiments.seeds                                # every method, seeds 0-4, full digits budget
    python -m experiments.seeds --methods tac_ccl --budget test
    python -m experiments.seeds --methods eir --budget one_step   # the one-step floor of the learning checks
    python -m experiments.seeds --methods isif --fast-path     # the same study on the device-resident path
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

CONFIGS = "experiments/configs"
METHODS = ("isif", "umm", "tac_ccl", "snowball", "snowball_supervised", "roul", "san", "san_unsupervised", "lmcs",
           "lmcs_mixmatch", "eir")
# a method whose digits config is not <method>/digits.yaml: (config folder, variant)
CONFIG_OF = {"san_unsupervised": ("san", "unsupervised"), "lmcs_mixmatch": ("lmcs", "mixmatch"),
             "snowball_supervised": ("snowball", "supervised")}
# metrics read per method; `val/error` is better when lower
METRICS = {
    "isif": ("val/knn_top1", "val/recall@1", "val/nmi"),
    "umm": ("val/knn_top1", "val/recall@1", "val/nmi"),
    "tac_ccl": ("val/recall@1", "val/recall@8", "val/nmi"),
    "snowball": ("val/error",),
    "snowball_supervised": ("val/error",),
    "roul": ("val/nmi", "val/recall@1", "val/recall@1_refined", "val/recall@2", "val/recall@2_refined"),
    "san": ("val/knn_top1", "val/recall@1", "val/nmi"),
    "san_unsupervised": ("val/knn_top1", "val/recall@1", "val/nmi"),
    "lmcs": ("val/error", "val/error_master"),
    "lmcs_mixmatch": ("val/error",),
    "eir": ("val/knn_top1", "val/knn_top1@20", "val/nmi"),
}
LOWER_IS_BETTER = ("val/error", "val/error_master")
# seeds a method draws outside seed_everything (TAC-CCL's per-step draws and its k-means), moved with it
SEED_FLAGS = {
    "tac_ccl": ["--model.init_args.seed={seed}", "--trainer.callbacks.init_args.seed={seed}"],
    "roul": ["--model.init_args.seed={seed}", "--trainer.callbacks.init_args.seed={seed}"],
    "san_unsupervised": ["--trainer.callbacks.init_args.seed={seed}"],
    "eir": ["--model.init_args.seed={seed}"],
}
# the overrides each method's learning test runs with (tests/learning.py runs them)
TEST_BUDGET = {
    "isif": ["--trainer.max_epochs=3", "--evaluation.kmeans_restarts=2"],
    "umm": ["--trainer.max_epochs=3", "--evaluation.kmeans_restarts=2"],
    "tac_ccl": ["--evaluation.kmeans_restarts=1", "--data.num_workers=0"],
    "snowball": ["--trainer.max_epochs=2", "--model.init_args.curriculum.phase0_epochs=1",
                 "--model.init_args.curriculum.iteration_epochs=1", "--model.init_args.curriculum.generations=1",
                 "--model.init_args.curriculum.iterations=1"],
    "snowball_supervised": ["--trainer.max_epochs=2"],  # Snowball's test length, for its baseline
    "roul": ["--trainer.check_val_every_n_epoch=6", "--data.num_workers=0"],
    "san": ["--trainer.max_epochs=1", "--evaluation.kmeans_restarts=1", "--data.num_workers=0"],
    "san_unsupervised": ["--trainer.max_epochs=2", "--evaluation.kmeans_restarts=1", "--data.num_workers=0"],
    # phase 0 of one epoch, then two generations of one epoch, the master on from epoch 1
    "lmcs": ["--trainer.max_epochs=3", "--model.init_args.curriculum.phase0_epochs=1",
             "--model.init_args.curriculum.iteration_epochs=1", "--model.init_args.curriculum.generations=2",
             "--model.init_args.step_epochs=1", "--model.init_args.rampup_steps=16", "--data.num_workers=0"],
    # batch 32: 45 steps per bank refresh (epoch) instead of 11, so the random bank is left behind sooner
    "eir": ["--trainer.max_epochs=6", "--data.batch_size=32", "--trainer.check_val_every_n_epoch=6",
            "--evaluation.kmeans_restarts=2", "--data.num_workers=0"],
}
# the network after one training step, the floor a learning check clears (issue 22). One batch: the CLI hands
# `limit_train_batches=1` to the Trainer as the float 1.0 (= every batch), so it is the fraction 0.1 of a digits
# epoch (10-18 batches: one batch); `steps_run` checks it. Study: --budget test --extra <ONE_STEP flags>.
ONE_STEP = ["--trainer.max_epochs=1", "--trainer.limit_train_batches=0.1", "--trainer.check_val_every_n_epoch=1"]


def steps_run(run_dir: Path) -> int:
    """Optimizer steps a finished run took (its last checkpoint's global step)."""
    import torch

    return torch.load(Path(run_dir) / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["global_step"]


# the device-resident data path (datamodules/device_augment.py), for the fast-vs-standard acceptance study
FAST_PATH = ["--data.init_args.device_resident=true"]


def config_args(method: str, variant: str = "") -> list[str]:
    """The config stack `make train METHOD=<method> DATASET=digits [VARIANT=...]` runs."""
    name = f"digits-{variant}" if variant else "digits"
    return ["--config", f"{CONFIGS}/base.yaml", "--config", f"{CONFIGS}/datasets/digits.yaml",
            "--config", f"{CONFIGS}/{method}/{name}.yaml"]


def run_once(method: str, seed: int, budget: str, out: Path, extra: list[str]) -> dict:
    """One training run in a fresh process; its final_metrics.json."""
    run_dir = out / f"{method}-{budget}-seed{seed}"
    overrides = TEST_BUDGET[method] if budget in ("test", "one_step") else []
    overrides = overrides + (ONE_STEP if budget == "one_step" else [])
    cmd = [sys.executable, "-m", "experiments.train", "fit", *config_args(*CONFIG_OF.get(method, (method,))),
           "--run.dir", str(run_dir), "--run.overwrite=true",  # a study's folders: a rerun replaces them
           "--run.logger=csv", "--trainer.enable_progress_bar=false", "--run.pictures=false",  # numbers only
           f"--seed_everything={seed}",
           *(flag.format(seed=seed) for flag in SEED_FLAGS.get(method, [])), *overrides, *extra]
    started = time.time()
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)  # raised below, with stderr
    if done.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    result = json.loads((run_dir / "final_metrics.json").read_text())
    result["seconds"] = time.time() - started
    return result


def gain(metric: str, initial: float, final: float) -> float:
    return initial - final if metric in LOWER_IS_BETTER else final - initial


def summarise(method: str, runs: list[dict]) -> str:
    """Markdown rows: metric, random init mean / worst, final mean / worst, worst per-seed gain."""
    lines = []
    for metric in METRICS[method]:
        initial = [r["initial"][metric] for r in runs]
        final = [r["final"][metric] for r in runs]
        worst = max if metric in LOWER_IS_BETTER else min
        gains = [gain(metric, i, f) for i, f in zip(initial, final)]
        lines.append(f"| {method} | {metric} | {statistics.mean(initial):.1f} | {worst(initial):.1f} | "
                     f"{statistics.mean(final):.1f} | {worst(final):.1f} | {min(gains):+.1f} |")
    return "\n".join(lines)


HEADER = ("| method | metric | random init mean | random init worst | final mean | final worst | "
          "worst gain |\n|---|---|---|---|---|---|---|")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument("--budget", choices=("full", "test", "one_step"), default="full",
                        help="full: the digits config as shipped; test: the learning tests' shortened runs; "
                             "one_step: the test runs stopped after one training step (ONE_STEP)")
    parser.add_argument("--out", default="runs/seeds", help="where the runs and seeds.json go")
    parser.add_argument("--fast-path", action="store_true",
                        help=f"run on the device-resident data path ({' '.join(FAST_PATH)}); runs go to OUT-fast")
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more CLI overrides, last")
    args = parser.parse_args(argv)
    out = Path(args.out + ("-fast" if args.fast_path else ""))
    extra = (FAST_PATH if args.fast_path else []) + args.extra
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, list[dict]] = {}
    print(f"seeds {args.seeds}, budget {args.budget}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '-')}",
          flush=True)
    for method in args.methods:
        results[method] = []
        for seed in args.seeds:
            run = run_once(method, seed, args.budget, out, extra)
            results[method].append(run)
            shown = ", ".join(f"{m} {run['initial'][m]:.1f} -> {run['final'][m]:.1f}" for m in METRICS[method])
            print(f"{method} seed {seed} ({run['seconds']:.0f} s): {shown}", flush=True)
    (out / f"seeds-{args.budget}.json").write_text(json.dumps(results, indent=2))
    print("\n" + HEADER)
    for method, runs in results.items():
        print(summarise(method, runs))


if __name__ == "__main__":
    main()
