"""The end-to-end learning check every method's digits test runs, in one place: `make train METHOD=<m>
DATASET=digits` at the method's test budget (`experiments.seeds.TEST_BUDGET`), in this process, against
the floors a network reaches without learning: its random init (`initial`) and the same run stopped after one
training step (`ONE_STEP`). Each test keeps its own margins, which its comments source (the worst of seeds
0-4 clears them); this module runs the CLI, reads the results and compares."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

from experiments.seeds import LOWER_IS_BETTER, ONE_STEP, TEST_BUDGET, steps_run
from experiments.train import RUN_DIR_ENV, main

CONFIGS = "experiments/configs"


def digits_run(run_dir: Path, method: str, *extra: str, config: str | None = None, logger: str = "csv") -> dict:
    """`<config>` (default `<method>/digits`) on digits at TEST_BUDGET[method] plus `extra`; the run's
    final_metrics.json ({"initial", "final", ...}) with its folder under "dir"."""
    os.environ.pop(RUN_DIR_ENV, None)  # a folder claimed by an earlier run in this process is not this run's
    main(["fit", "--config", f"{CONFIGS}/base.yaml", "--config", f"{CONFIGS}/datasets/digits.yaml",
          "--config", f"{CONFIGS}/{config or method + '/digits'}.yaml", "--run.dir", str(run_dir),
          f"--run.logger={logger}", "--trainer.enable_progress_bar=false", *TEST_BUDGET[method], *extra])
    return {"dir": Path(run_dir), **json.loads(Path(run_dir, "final_metrics.json").read_text())}


def one_step_run(run_dir: Path, method: str, *extra: str, config: str | None = None) -> dict:
    """The same run stopped after one optimizer step (checked): the floor that already counts what a single
    step moves for free (BatchNorm statistics, the head)."""
    run = digits_run(run_dir, method, *ONE_STEP, *extra, config=config)
    assert steps_run(run["dir"]) == 1
    return run


def best_of(*metrics: dict[str, float]) -> dict[str, float]:
    """Per metric present in all, the best value (the largest; the smallest for an error)."""
    names = set.intersection(*(set(m) for m in metrics))
    return {name: (min if name in LOWER_IS_BETTER else max)(m[name] for m in metrics) for name in names}


def assert_gains(final: dict[str, float], floor: dict[str, float], margins: dict[str, float]) -> None:
    """Each metric beats its floor by its margin: above for a score, below for an error."""
    for name, margin in margins.items():
        if name in LOWER_IS_BETTER:
            assert final[name] < floor[name] - margin, (name, final[name], floor[name], margin)
        else:
            assert final[name] > floor[name] + margin, (name, final[name], floor[name], margin)


def assert_finite(metrics: dict[str, float]) -> None:
    assert all(math.isfinite(v) for v in metrics.values()), metrics


def assert_logged(run_dir: Path, terms) -> None:
    """Every term is a column of the run's CSV log."""
    logged = (Path(run_dir) / "csv" / "metrics.csv").read_text().splitlines()[0]
    for term in terms:
        assert term in logged, term
