"""The effects study's record: every seeded run of the effect tables, one CSV line per run and metric.

    python -m experiments.effects.gather runs/effects            # add the runs under it to results.csv
    python -m experiments.effects.gather --readme                 # print the README's table from results.csv

The effect tables are `experiments/tables/<method>-<table>-cpu.yaml`; `make reproduce ... SEEDS="0 1 2"
OUT=runs/effects/<method>-<table>` runs them. `gather` walks `<out>/<row>/seed<N>/final_metrics.json` and
adds `method,table,row,seed,metric,value,git_commit,budget` to `results.csv`, keeping the lines already
there (a rerun of the same row, seed and metric replaces its line, so the file holds one value each).
The README's "Effects on real data" table is built from that file alone (`summary`).
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import pandas as pd
import yaml

from experiments.reproduce import TABLES, better, load_table, within_runs

RESULTS = Path(__file__).with_name("results.csv")
COLUMNS = ["method", "table", "row", "seed", "metric", "value", "git_commit", "budget"]
KEY = ["method", "table", "row", "seed", "metric"]


def on_validation_split(run_dir: Path) -> bool:
    """Whether the run evaluated on held-out train images (`data.init_args.validation_per_class` > 0 in the
    config.yaml it saved) instead of the test split."""
    config = Path(run_dir) / "config.yaml"
    data = (yaml.safe_load(config.read_text()) or {}).get("data") or {} if config.is_file() else {}
    return bool((data.get("init_args") or {}).get("validation_per_class"))


def runs_under(out: Path) -> pd.DataFrame:
    """The lines of every finished seeded row run below `out` (any depth: one folder per table). Runs on the
    validation split (budget choices) are left out: results.csv holds test-split runs only."""
    lines = []
    for path in sorted(Path(out).rglob("seed*/final_metrics.json")):
        result = json.loads(path.read_text())
        run = result.get("run", {})
        group, row, seed = run.get("group", ""), path.parent.parent.name, path.parent.name[4:]
        if not group or not seed.isdigit():
            continue
        if on_validation_split(path.parent):
            print(f"{path.parent}: evaluated on the validation split, left out of the results")
            continue
        method = run.get("method") or group.split("-")[0]
        # the group is the table's id; a row may train another method (UMM Table 5's Baseline ISIF: method isif)
        table_id = group if (TABLES / f"{group}.yaml").is_file() else f"{method}-{group.removeprefix(method + '-')}"
        table_file = TABLES / f"{table_id}.yaml"
        table = load_table(table_file) if table_file.is_file() else None
        method, budget = (table.method, table.budget) if table else (method, "")
        for metric, value in result.get("final", {}).items():
            lines.append({"method": method, "table": table_id, "row": row, "seed": int(seed), "metric": metric,
                          "value": float(value), "git_commit": run.get("git_commit", ""), "budget": budget})
    return pd.DataFrame(lines, columns=COLUMNS)


def merge(old: pd.DataFrame, new: pd.DataFrame) -> pd.DataFrame:
    """`old` with `new`'s lines added; a line of `new` replaces the one of `old` with the same key."""
    both = pd.concat([old, new], ignore_index=True).drop_duplicates(KEY, keep="last")
    return both.sort_values(KEY, kind="stable").reset_index(drop=True)


def read_results(path: Path = RESULTS) -> pd.DataFrame:
    return (pd.read_csv(path, keep_default_na=False, dtype={"git_commit": str, "budget": str}) if path.is_file()
            else pd.DataFrame(columns=COLUMNS))


def summary(results: pd.DataFrame) -> str:
    """The README's table: per effect table, metric and row other than the baseline, the paired difference
    to the baseline row (mean and worst over the seeds both ran) beside the paper's, and ✓ / ✗ for its
    direction."""
    lines = ["| method | pair | metric | seeds | ours: mean (worst) | paper | direction | budget |",
             "|---|---|---|---|---|---|---|---|"]
    for table_id, runs in results.groupby("table", sort=True):
        table = load_table(TABLES / f"{table_id}.yaml")
        base = table.baseline_row
        budget = "; ".join(sorted(set(runs.budget) - {""}))  # as recorded with the runs
        for metric in table.metrics:
            of = runs[runs.metric == metric]
            base_values = of[of.row == base.id].set_index("seed")["value"]
            for row in table.rows:
                values = of[of.row == row.id].set_index("seed")["value"]
                seeds = sorted(set(values.index) & set(base_values.index))
                if row is base or not seeds:
                    continue
                paired = [values[s] - base_values[s] for s in seeds]
                mean = statistics.mean(paired)
                worst = min(paired, key=lambda d: better(metric, d))
                paper = (row.paper[metric] - base.paper[metric]
                         if metric in row.paper and metric in base.paper else None)
                direction = "-" if paper is None else ("✓" if better(metric, mean) * better(metric, paper) > 0
                                                       else "✗")
                lines.append(f"| {table.method} | {row.name} vs {base.name} | {metric} | "
                             f"{' '.join(map(str, seeds))} | {mean:+.1f} ({worst:+.1f}) | "
                             f"{'-' if paper is None else f'{paper:+.1f}'} | {direction} | {budget} |")
        for row in table.rows:  # the table's metric_pairs inside each run (no paper number to set beside)
            seeds = {int(s): dict(zip(g.metric, g.value)) for s, g in runs[runs.row == row.id].groupby("seed")}
            for name, differences in within_runs(table, seeds).items():
                worst = min(differences.values(), key=lambda d: better(name, d))
                lines.append(f"| {table.method} | {row.name}, within each run | {name} | "
                             f"{' '.join(map(str, differences))} | {statistics.mean(differences.values()):+.1f} "
                             f"({worst:+.1f}) | - | - | {budget} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", nargs="*", type=Path, help="folders holding `make reproduce SEEDS=...` outputs")
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--readme", action="store_true", help="print the README table from the results")
    args = parser.parse_args(argv)
    results = read_results(args.results)
    for out in args.out:
        found = runs_under(out)
        results = merge(results, found)
        print(f"{out}: {len(found)} lines")
    if args.out:
        results.to_csv(args.results, index=False)
    if args.readme:
        print(summary(results))


if __name__ == "__main__":
    main()
