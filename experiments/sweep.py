"""`make sweep METHOD=umm DATASET=cub`: create the W&B sweep of a method on a dataset and start an agent.

The sweep is experiments/sweeps/<method>_<dataset>.yaml, else the method's digits sweep retargeted: its
config stack and run.dataset point at the dataset, its metric is the one the dataset's protocol logs
(seen: val/knn_top1, unseen: val/recall@1, semi: val/error), and each numeric range is moved by the ratio
of the target config's value to the digits config's (a learning rate of 0.06 on digits searched over
0.01-0.2 is searched over 0.00017-0.0033 for a config at 0.001). `--dry-run` (DRY_RUN=1) prints the metric
and the commands of a few sampled trials, as the agent would run them, and needs no server.

    python -m experiments.sweep umm cub --dry-run --trials 3
    python -m experiments.sweep umm cub --count 20 --project embedding-suite
"""
from __future__ import annotations

import argparse
import itertools
import math
import os
import random
import shlex
import subprocess
import sys
from pathlib import Path

import yaml

SWEEPS = Path(__file__).with_name("sweeps")
CONFIGS = Path(__file__).with_name("configs")


def load_sweep(method: str, dataset: str) -> dict:
    """The sweep definition for method x dataset (the digits one retargeted when there is no own file)."""
    own = SWEEPS / f"{method}_{dataset}.yaml"
    if own.is_file():
        return yaml.safe_load(own.read_text())
    base = SWEEPS / f"{method}_digits.yaml"
    if not base.is_file():
        raise SystemExit(f"no sweep {own.name} or {base.name}; sweeps: {sorted(p.name for p in SWEEPS.glob('*.yaml'))}")
    for config in (f"datasets/{dataset}.yaml", f"{method}/{dataset}.yaml"):
        if not (CONFIGS / config).is_file():
            raise SystemExit(f"no config experiments/configs/{config}: {method} has no {dataset} protocol")
    sweep = yaml.safe_load(base.read_text())
    swaps = {"--config=experiments/configs/datasets/digits.yaml": f"--config=experiments/configs/datasets/{dataset}.yaml",
             f"--config=experiments/configs/{method}/digits.yaml": f"--config=experiments/configs/{method}/{dataset}.yaml",
             "--run.dataset=digits": f"--run.dataset={dataset}"}
    sweep["command"] = [swaps.get(str(part), part) for part in sweep["command"]]
    sweep["name"] = f"{method}-{dataset}"
    source = ["datasets/digits.yaml", f"{method}/digits.yaml"]
    target = [f"datasets/{dataset}.yaml", f"{method}/{dataset}.yaml"]
    name, goal = PROTOCOL_METRICS[config_value(target, "data.protocol") or "seen"]
    sweep["metric"] = {"name": name, "goal": goal}
    for key, spec in sweep.get("parameters", {}).items():
        old, new = config_value(source, key), config_value(target, key)
        if isinstance(old, (int, float)) and isinstance(new, (int, float)) and old and new != old:
            sweep["parameters"][key] = scaled(spec, new / old)
    return sweep


# the metric a protocol's evaluation logs, and its direction
PROTOCOL_METRICS = {"seen": ("val/knn_top1", "maximize"), "unseen": ("val/recall@1", "maximize"),
                    "semi": ("val/error", "minimize")}


def config_value(configs: list[str], key: str):
    """The value a sweep key (`model.optim.lr`: a model / data argument) takes in a config stack (the
    last file that sets it), or None."""
    section, *rest = key.split(".")
    path = [section, "init_args", *rest] if section in ("model", "data") else [section, *rest]
    value = None
    for config in configs:
        node = yaml.safe_load((CONFIGS / config).read_text()) or {}
        for part in path:
            node = node.get(part) if isinstance(node, dict) else None
        value = node if node is not None else value
    return value


def scaled(spec: dict, factor: float) -> dict:
    """A parameter spec with its numbers multiplied by `factor` (values, value, min and max)."""
    out = dict(spec)
    for field in ("min", "max", "value"):
        if isinstance(out.get(field), (int, float)):
            out[field] = out[field] * factor
    if "values" in out:
        out["values"] = [v * factor if isinstance(v, (int, float)) else v for v in out["values"]]
    if out.get("distribution") == "int_uniform":
        out["distribution"] = "uniform"
    return out


def sample_value(spec: dict, rng: random.Random):
    """One draw of a W&B parameter spec (value, values, uniform, int_uniform, log_uniform_values)."""
    if "value" in spec:
        return spec["value"]
    if "values" in spec:
        return rng.choice(spec["values"])
    kind = spec.get("distribution", "uniform")
    low, high = spec["min"], spec["max"]
    if kind == "log_uniform_values":
        return math.exp(rng.uniform(math.log(low), math.log(high)))
    if kind == "int_uniform":
        return rng.randint(low, high)
    if kind == "uniform":
        return rng.uniform(low, high)
    raise ValueError(f"parameter distribution {kind!r} is not sampled by the dry run")


def sample_trials(sweep: dict, count: int, seed: int = 0) -> list[dict]:
    """`count` parameter sets: the grid's first ones for a grid sweep, random draws otherwise."""
    params = sweep.get("parameters", {})
    if sweep.get("method") == "grid":
        names = list(params)
        grid = itertools.product(*[p["values"] if "values" in p else [p["value"]] for p in params.values()])
        return [dict(zip(names, values)) for values in itertools.islice(grid, count)]
    rng = random.Random(seed)
    return [{name: sample_value(spec, rng) for name, spec in params.items()} for _ in range(count)]


def trial_command(sweep: dict, params: dict) -> list[str]:
    """The agent's command for one trial: the sweep's `command` with its macros expanded."""
    args = [f"--{k}={v}" for k, v in params.items()]
    out: list[str] = []
    for part in sweep.get("command", ["${env}", "${interpreter}", "${program}", "${args}"]):
        if part == "${env}":
            continue
        out += {"${interpreter}": [sys.executable], "python": [sys.executable], "${program}": [sweep.get("program", "")],
                "${args}": args, "${args_no_hyphens}": [a[2:] for a in args]}.get(str(part), [str(part)])
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("method")
    parser.add_argument("dataset")
    parser.add_argument("--dry-run", action="store_true", default=bool(os.environ.get("DRY_RUN")))
    parser.add_argument("--trials", type=int, default=3, help="trials printed by --dry-run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--count", type=int, default=None, help="trials the agent runs (default: until stopped)")
    parser.add_argument("--project", default="embedding-suite")
    args = parser.parse_args(argv)
    sweep = load_sweep(args.method, args.dataset)
    if args.dry_run:
        print(f"# metric: {sweep['metric']['name']} ({sweep['metric']['goal']})")
        for params in sample_trials(sweep, args.trials, args.seed):
            print(shlex.join(trial_command(sweep, params)))
        return
    import wandb

    from experiments.train import wandb_logged_in
    if not wandb_logged_in():
        raise SystemExit("a sweep needs the W&B server: `wandb login` first (DRY_RUN=1 prints trials without it)")
    sweep_id = wandb.sweep(sweep=sweep, project=args.project)
    print(f"sweep {sweep_id} created; starting an agent (more: wandb agent --project {args.project} {sweep_id})")
    subprocess.run(["wandb", "agent", "--project", args.project, *(["--count", str(args.count)] if args.count else []),
                    sweep_id], check=True)


if __name__ == "__main__":
    main()
