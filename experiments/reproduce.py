"""Reproduce a paper table: every row of `experiments/tables/<method>-<table>.yaml`, one run after another,
then one markdown table of each row's run against the paper's number, with the difference.

    python -m experiments.reproduce isif table8-digits                 # run the rows, print the table
    python -m experiments.reproduce isif table8-digits --dry-run       # print the rows' commands only
    python -m experiments.reproduce isif table8-digits --sweep         # a W&B sweep grid over the rows
    python -m experiments.reproduce isif table8-digits --rows full -- --trainer.max_epochs=2  # part, overrides

    python -m experiments.reproduce eir table1-cpu --seeds 0 1 2 --out runs/eir-t1  # each row over seeds

(`make reproduce METHOD=isif TABLE=table8-digits`, with DRY_RUN=1, SWEEP=1, ROWS=..., SEEDS="0 1 2", ARGS=...)

A table file is data: `method`, `dataset`, `source` (the paper's table), `config` (under
experiments/configs/, default <method>/<dataset>.yaml), `metrics` (the columns), `args` (flags every row
gets) and `rows`, each a `name`, its `args` (the ablation switches the configs list in their headers), an
optional `config`, and `paper` ({metric: the published number}). A row's run lives in
`<out>/<row id>/`; a row whose directory already holds final_metrics.json is not run again, so the same
`--out` continues an interrupted table. Runs report the last epoch (`final`).

With `--seeds`, each row runs once per seed into `<out>/<row id>/seed<N>/` (`--seed_everything=N` plus the
method's own seed flags, `experiments.seeds.SEED_FLAGS`, or the table's `seed_args`), and the table shows
per row the mean and the worst seed, and against the table's `baseline` row (default: the first) the
paired difference over the seeds both rows ran, beside the paper's difference, with whether the paper's
direction holds; a table's `metric_pairs` ({metric: other}) add per row the difference of two metrics of
the same run (mean and worst over its seeds). Every row present in `<out>` is shown, whichever `--rows` ran. A row's directory keeps
the overrides it ran with (`row.json`): a row already done is announced as kept, and one whose overrides
differ is refused rather than mixed into the table.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import yaml

TABLES = Path(__file__).with_name("tables")
CONFIGS = Path(__file__).with_name("configs")
TABLE_KEYS = {"method", "dataset", "source", "title", "config", "metrics", "args", "rows", "paper_dataset",
              "baseline", "budget", "seed_args", "metric_pairs"}
LOWER_IS_BETTER = ("val/error",)  # metrics (and their prefixed forms, val/error_master) where lower is better
ROW_KEYS = {"name", "args", "config", "dataset", "paper"}


@dataclass
class Row:
    name: str
    args: list[str] = field(default_factory=list)
    config: str = ""
    dataset: str = ""
    paper: dict[str, float] = field(default_factory=dict)

    @property
    def id(self) -> str:
        return slug(self.name)


@dataclass
class Table:
    id: str
    method: str
    dataset: str
    source: str
    metrics: list[str]
    rows: list[Row]
    title: str = ""
    config: str = ""
    args: list[str] = field(default_factory=list)
    paper_dataset: str = ""  # the dataset of the paper's numbers when it differs (a digits version)
    baseline: str = ""  # the row the others are paired against (default: the first)
    budget: str = ""  # what a run costs, for the effects table (network, images, epochs)
    seed_args: list[str] | None = None  # flags that move a run's seeds, "{seed}" filled in
    metric_pairs: dict[str, str] = field(default_factory=dict)  # {metric: the metric of the same run it is set against}

    @property
    def baseline_row(self) -> Row:
        return next((r for r in self.rows if r.id == slug(self.baseline)), self.rows[0])


def slug(name: str) -> str:
    """'w/o ColorJitter' -> 'wo-colorjitter': a row's directory and its `--rows` id."""
    return re.sub(r"[^a-z0-9.]+", "-", name.lower().replace("/", "")).strip("-")


def table_path(method: str, table: str) -> Path:
    """A table id (`table8-digits`) of a method, or a path to a table file."""
    if table.endswith((".yaml", ".yml")):
        return Path(table)
    path = TABLES / f"{method}-{table}.yaml"
    if not path.is_file():
        known = sorted(p.stem.removeprefix(f"{method}-") for p in TABLES.glob(f"{method}-*.yaml"))
        raise SystemExit(f"no table {path}; {method}'s tables: {', '.join(known) or 'none'} "
                         f"(all: {', '.join(sorted(p.stem for p in TABLES.glob('*.yaml')))})")
    return path


def load_table(path: Path) -> Table:
    """Parse and check a table file: unknown keys, duplicate row ids, a paper number on a metric that is
    not a column, and a missing config are errors that name the file."""
    spec = yaml.safe_load(Path(path).read_text())
    where = f"table {path}"
    if not isinstance(spec, dict):
        raise TypeError(f"{where}: expected a mapping with method, dataset, source, metrics, rows")
    unknown = set(spec) - TABLE_KEYS
    if unknown:
        raise ValueError(f"{where}: unknown keys {sorted(unknown)}; valid: {sorted(TABLE_KEYS)}")
    rows = []
    for i, row in enumerate(spec.get("rows") or []):
        bad = set(row) - ROW_KEYS
        if bad or "name" not in row:
            raise ValueError(f"{where}: row {i} has keys {sorted(row)}; a row takes name and optionally "
                             f"{sorted(ROW_KEYS - {'name'})}")
        rows.append(Row(name=str(row["name"]), args=[str(a) for a in row.get("args") or []],
                        config=row.get("config") or "", dataset=row.get("dataset") or "", paper={k: float(v) for k, v in (row.get("paper") or {}).items()}))
    table = Table(id=Path(path).stem, method=spec["method"], dataset=spec["dataset"], source=spec["source"],
                  metrics=list(spec["metrics"]), rows=rows, title=spec.get("title", ""),
                  config=spec.get("config") or "",
                  args=[str(a) for a in spec.get("args") or []], paper_dataset=spec.get("paper_dataset", ""),
                  baseline=spec.get("baseline", ""), budget=spec.get("budget", ""),
                  seed_args=None if spec.get("seed_args") is None else [str(a) for a in spec["seed_args"]],
                  metric_pairs={str(k): str(v) for k, v in (spec.get("metric_pairs") or {}).items()})
    if not rows:
        raise ValueError(f"{where}: no rows")
    ids = [r.id for r in rows]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{where}: row names must differ after slugging: {ids}")
    if table.baseline and slug(table.baseline) not in ids:
        raise ValueError(f"{where}: baseline {table.baseline!r} is not a row ({ids})")
    loose = set(table.metric_pairs.items()) - {(a, b) for a in table.metrics for b in table.metrics if a != b}
    if loose:
        raise ValueError(f"{where}: metric_pairs {sorted(loose)} must pair two different columns ({table.metrics})")
    for row in rows:
        extra = set(row.paper) - set(table.metrics)
        if extra:
            raise ValueError(f"{where}: row {row.name!r} has paper numbers for {sorted(extra)}, not columns "
                             f"({table.metrics}): add them to metrics")
        for config in (row_config(table, row), f"datasets/{row.dataset or table.dataset}.yaml"):
            if not (CONFIGS / config).is_file():
                raise ValueError(f"{where}: row {row.name!r}: no config experiments/configs/{config}")
    return table


def row_config(table: Table, row: Row) -> str:
    """The row's method config: its own, else the table's, else <method>/<the row's dataset>.yaml."""
    return row.config or table.config or f"{table.method}/{row.dataset or table.dataset}.yaml"


def row_method(table: Table, row: Row) -> str:
    """The method a row trains: its config's folder (UMM Table 5's "Baseline ISIF" row runs isif/cifar10.yaml,
    so its run is tagged method:isif and `compare --method isif` finds it; the table's group keeps the rows
    together), else the table's method."""
    folder = row_config(table, row).split("/", 1)[0]
    return folder if folder != "datasets" and (CONFIGS / folder).is_dir() else table.method


def train_args(table: Table, row: Row, run_dir: Path | str, logger: str, overrides: list[str]) -> list[str]:
    """The `experiments.train` arguments of one row: the config stack, the run's tags, the table's flags,
    the row's switches, then the caller's overrides (the last one wins)."""
    dataset = row.dataset or table.dataset
    configs = ["base.yaml", f"datasets/{dataset}.yaml", row_config(table, row)]
    return ["fit", *[a for c in configs for a in ("--config", os.path.relpath(CONFIGS / c))],
            f"--run.dir={run_dir}", f"--run.logger={logger}", f"--run.method={row_method(table, row)}",
            f"--run.dataset={dataset}", f"--run.variant={row.id}",
            f"--run.group={table.method}-{table.id.removeprefix(table.method + '-')}",
            *table.args, *row.args, *overrides]


def command(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "experiments.train", *args]


def seed_args(table: Table, seed: int | None) -> list[str]:
    """The flags that run a row on `seed`: the table's own, else seed_everything and the method's seeds."""
    if seed is None:
        return []
    from experiments.seeds import SEED_FLAGS
    flags = table.seed_args if table.seed_args is not None else [
        "--seed_everything={seed}", *SEED_FLAGS.get(table.method, [])]
    return [flag.format(seed=seed) for flag in flags]


def run_dir(out: Path, row: Row, seed: int | None) -> Path:
    return out / row.id if seed is None else out / row.id / f"seed{seed}"


def row_overrides(table: Table, row: Row, seed: int | None, overrides: list[str]) -> list[str]:
    """What a row's run depends on besides its directory: the table's and row's flags, seed, overrides."""
    return [*table.args, *row.args, *seed_args(table, seed), *overrides]


def check_kept(directory: Path, expected: list[str]) -> None:
    """A finished row is kept when it ran with `expected`; one that ran with other overrides is refused."""
    stored = directory / "row.json"
    ran = json.loads(stored.read_text())["overrides"] if stored.is_file() else None
    if ran is not None and ran != expected:
        changed = sorted(set(ran) ^ set(expected))
        raise SystemExit(f"{directory} already holds this row run with other overrides (differing: {changed}); "
                         "use another --out, or delete that row's folder to run it again")


def result_table(table: Table, finals: dict[str, dict[str, float]]) -> pd.DataFrame:
    """One line per row: for each metric the run's final value, the paper's number and run - paper."""
    lines = []
    for row in table.rows:
        line = {"row": row.name}
        final = finals.get(row.id, {})
        for m in table.metrics:
            run, paper = final.get(m), row.paper.get(m)
            line[f"{m} run"] = run
            line[f"{m} paper"] = paper
            line[f"{m} diff"] = run - paper if run is not None and paper is not None else None
        lines.append(line)
    return pd.DataFrame(lines)


def markdown(table: Table, frame: pd.DataFrame) -> str:
    """The table as markdown, numbers to one decimal, '-' where there is none."""
    paper = f"paper ({table.paper_dataset})" if table.paper_dataset else "paper"
    header = ["row"] + [h for m in table.metrics for h in (f"{m} run", paper, "diff")]
    lines = [f"{table.title or table.source} ({table.method}, {table.dataset}; run = last epoch, diff = run - paper)",
             "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for _, line in frame.iterrows():
        cells = [line["row"]]
        for m in table.metrics:
            for key, sign in ((f"{m} run", ""), (f"{m} paper", ""), (f"{m} diff", "+")):
                value = line[key]
                cells.append("-" if pd.isna(value) else f"{value:{sign}.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def bar_chart(table: Table, frame: pd.DataFrame, path: Path) -> Path:
    """Per metric a panel, per row the run's bar (solid) beside the paper's (hatched)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(table.metrics), figsize=(1.2 * len(frame) * len(table.metrics) + 2, 3.6),
                             dpi=100, squeeze=False)
    xs = range(len(frame))
    for ax, metric in zip(axes[0], table.metrics):
        ax.bar([x - 0.2 for x in xs], frame[f"{metric} run"].astype(float), 0.4, label="run (last epoch)")
        ax.bar([x + 0.2 for x in xs], frame[f"{metric} paper"].astype(float), 0.4, hatch="//", alpha=0.5,
               edgecolor="black", label=f"paper ({table.paper_dataset})" if table.paper_dataset else "paper")
        ax.set_xticks(list(xs), frame["row"], rotation=20, fontsize=8)
        ax.set_title(metric, fontsize=9)
    axes[0][0].legend(fontsize=7, frameon=False)
    fig.suptitle(table.title or table.source, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=fig.dpi)
    plt.close(fig)
    return path


def sweep_grid(table: Table, path: Path, overrides: list[str]) -> dict:
    """A W&B grid sweep with one trial per row: the agent runs `experiments.reproduce <method> <table>
    --rows=<id>` from the repository root, each trial a row of the table (W&B logging)."""
    name = path.stem.removeprefix(f"{table.method}-") if path.parent.resolve() == TABLES.resolve() else (
        os.path.relpath(path))
    return {"name": table.id, "method": "grid",
            "metric": {"name": table.metrics[0], "goal": "minimize" if "error" in table.metrics[0] else "maximize"},
            "parameters": {"rows": {"values": [r.id for r in table.rows]}},
            "command": ["${env}", "${interpreter}", "-m", "experiments.reproduce", table.method, name, "${args}",
                        "--logger=wandb", *(["--", *overrides] if overrides else [])]}


def read_final(run_dir: Path) -> dict[str, float] | None:
    path = run_dir / "final_metrics.json"
    return json.loads(path.read_text())["final"] if path.is_file() else None


def read_seeds(out: Path, row: Row) -> dict[int, dict[str, float]]:
    """{seed: final metrics} of every finished seed run of `row` under `out`."""
    runs = {}
    for directory in sorted((out / row.id).glob("seed*")):
        final = read_final(directory)
        if final is not None and directory.name[4:].isdigit():
            runs[int(directory.name[4:])] = final
    return runs


def better(metric: str, difference: float) -> float:
    """A difference signed so that positive is an improvement."""
    return -difference if metric.startswith(LOWER_IS_BETTER) else difference


def within_runs(table: Table, seeds: dict[int, dict[str, float]]) -> dict[str, dict[int, float]]:
    """The table's `metric_pairs` inside each run of one row: {"<metric> - <other>": {seed: difference}} over
    the seeds whose run has both (ROUL: the refined Recall@1 against the plain one of the same embedding)."""
    pairs = {}
    for metric, other in table.metric_pairs.items():
        differences = {s: r[metric] - r[other] for s, r in sorted(seeds.items()) if metric in r and other in r}
        if differences:
            pairs[f"{metric} - {other}"] = differences
    return pairs


def seed_table(table: Table, runs: dict[str, dict[int, dict[str, float]]]) -> pd.DataFrame:
    """One line per row and metric: seeds, mean, worst seed; the paired difference to the baseline row
    over the seeds both ran (mean, worst, spread), the paper's difference, and whether its direction holds."""
    base = table.baseline_row
    lines = []
    for row in table.rows:
        seeds = runs.get(row.id, {})
        for metric in table.metrics:
            values = {s: r[metric] for s, r in seeds.items() if metric in r}
            if not values:
                continue
            worst = (max if metric.startswith(LOWER_IS_BETTER) else min)(values.values())
            line = {"row": row.name, "metric": metric, "seeds": " ".join(map(str, sorted(values))),
                    "mean": statistics.mean(values.values()), "worst": worst}
            paired = {s: v - runs[base.id][s][metric] for s, v in values.items()
                      if row is not base and metric in runs.get(base.id, {}).get(s, {})}
            paper = (row.paper[metric] - base.paper[metric]
                     if row is not base and metric in row.paper and metric in base.paper else None)
            if paired:
                gains = [better(metric, d) for d in paired.values()]
                line.update({"diff mean": statistics.mean(paired.values()),
                             "diff worst": min(gains) if not metric.startswith(LOWER_IS_BETTER) else -min(gains),
                             "diff spread": statistics.stdev(paired.values()) if len(paired) > 1 else None})
                if paper is not None:
                    line["direction"] = ("✓" if better(metric, line["diff mean"]) * better(metric, paper) > 0
                                         else "✗")
            line["paper diff"] = paper
            lines.append(line)
        for name, differences in within_runs(table, seeds).items():  # mean and worst of the difference itself
            lines.append({"row": row.name, "metric": name, "seeds": " ".join(map(str, differences)),
                          "mean": statistics.mean(differences.values()),
                          "worst": min(differences.values(), key=lambda d: better(name, d)), "paper diff": None})
    return pd.DataFrame(lines)


def seed_markdown(table: Table, frame: pd.DataFrame) -> str:
    """The seeded table as markdown: numbers to one decimal, '-' where there is none."""
    base = table.baseline_row.name
    header = ["row", "metric", "seeds", "mean", "worst", f"diff vs {base}: mean", "worst", "spread",
              "paper diff", "direction"]
    keys = ["row", "metric", "seeds", "mean", "worst", "diff mean", "diff worst", "diff spread", "paper diff",
            "direction"]
    budget = f"; budget: {table.budget}" if table.budget else ""
    title = (f"{table.title or table.source} ({table.method}, {table.dataset}; last epoch over seeds, diff = "
             f"row - {base} on the same seed{budget})")
    lines = [title, "", "| " + " | ".join(header) + " |",
             "|" + "---|" * len(header)]
    for _, line in frame.iterrows():
        cells = []
        for key in keys:
            value = line.get(key)
            if value is None or (isinstance(value, float) and pd.isna(value)):
                cells.append("-")
            elif isinstance(value, float):
                cells.append(f"{value:+.1f}" if "diff" in key else f"{value:.1f}")
            else:
                cells.append(str(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def seed_chart(table: Table, runs: dict[str, dict[int, dict[str, float]]], path: Path) -> Path:
    """Per metric a panel, per row every seed's point and the mean as a bar."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [r for r in table.rows if runs.get(r.id)]
    fig, axes = plt.subplots(1, len(table.metrics), figsize=(1.1 * len(rows) * len(table.metrics) + 2.5, 3.6),
                             dpi=100, squeeze=False)
    for ax, metric in zip(axes[0], table.metrics):
        for x, row in enumerate(rows):
            values = [r[metric] for r in runs[row.id].values() if metric in r]
            if values:
                ax.bar(x, statistics.mean(values), 0.6, alpha=0.35, color="C0")
                ax.scatter([x] * len(values), values, s=14, color="C0", zorder=3)
        ax.set_xticks(range(len(rows)), [r.name for r in rows], rotation=20, fontsize=8)
        ax.set_title(metric, fontsize=9)
    fig.suptitle(f"{table.title or table.source}: every seed (dots) and the mean (bar)", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=fig.dpi)
    plt.close(fig)
    return path


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("method", help="isif, umm, ... (ignored when TABLE is a path)")
    parser.add_argument("table", help="table id (experiments/tables/<method>-<id>.yaml) or a table file")
    parser.add_argument("--rows", nargs="+", default=None, help="row ids to run (default: all)")
    parser.add_argument("--out", type=Path, default=None, help="default runs/reproduce/<method>-<table>-<time>")
    parser.add_argument("--logger", default="wandb", help="wandb | csv | none (each row's run.logger)")
    parser.add_argument("--dry-run", action="store_true", default=bool(os.environ.get("DRY_RUN")),
                        help="print the rows' commands, run nothing (also DRY_RUN=1)")
    parser.add_argument("--sweep", action="store_true", help="print a W&B sweep grid over the rows (YAML)")
    parser.add_argument("--seeds", nargs="+", type=int, default=None,
                        help="run each row once per seed into OUT/<row>/seed<N>/ (also SEEDS=\"0 1 2\")")
    parser.add_argument("--data-root", default=None, help="every row's --data.init_args.root (also DATA_ROOT=)")
    argv = list(sys.argv[1:] if argv is None else argv)
    cut = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:cut])
    args.overrides = argv[cut + 1:]  # after --: flags appended to every row's command
    if args.data_root:
        args.overrides.insert(0, f"--data.init_args.root={args.data_root}")
    path = table_path(args.method, args.table)
    table = load_table(path)
    if args.sweep:
        print(yaml.safe_dump(sweep_grid(table, path, args.overrides), sort_keys=False))
        return
    ids = [r.id for r in table.rows]
    unknown = set(args.rows or []) - set(ids)
    if unknown:
        raise SystemExit(f"--rows {sorted(unknown)}: {path.name} has rows {ids}")
    rows = [r for r in table.rows if args.rows is None or r.id in args.rows]
    out = args.out or Path("runs/reproduce", f"{table.id}-{time.strftime('%Y%m%d-%H%M%S')}")
    for row in rows:
        for seed in args.seeds or [None]:
            directory = run_dir(out, row, seed)
            expected = row_overrides(table, row, seed, args.overrides)
            cmd = command(train_args(table, row, directory, args.logger, [*seed_args(table, seed), *args.overrides]))
            done = read_final(directory) is not None
            if done:
                check_kept(directory, expected)
            if args.dry_run:
                print(("# done, kept: " if done else "") + shlex.join(cmd))
            elif done:
                print(f"== {table.id}: {row.name}{'' if seed is None else f' seed {seed}'}: kept ({directory})")
            else:
                if directory.exists():  # an attempt that did not finish: run the row again in its folder
                    cmd.append("--run.overwrite=true")
                print(f"== {table.id}: {row.name}{'' if seed is None else f' seed {seed}'}\n{shlex.join(cmd)}",
                      flush=True)
                subprocess.run(cmd, check=True)
                (directory / "row.json").write_text(json.dumps({"overrides": expected}, indent=1))
    if args.dry_run:
        return
    seeded = {r.id: read_seeds(out, r) for r in table.rows}
    if any(seeded.values()):
        frame = seed_table(table, seeded)
        text = seed_markdown(table, frame)
        seed_chart(table, seeded, out / "table.png")
    else:
        present = [r for r in table.rows if read_final(out / r.id) is not None]
        finals = {r.id: read_final(out / r.id) or {} for r in present}
        frame = result_table(Table(**{**table.__dict__, "rows": present}), finals)
        text = markdown(table, frame)
        bar_chart(table, frame, out / "table.png")
    (out / "table.md").write_text(text + "\n")
    frame.to_csv(out / "table.csv", index=False)
    print(f"\n{text}\n\n(written to {out}/table.md, table.csv and table.png)")


if __name__ == "__main__":
    main()
