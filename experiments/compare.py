"""Runs vs runs vs the papers: one table (markdown, CSV), a bar chart against the papers' numbers and the
metric curves of every run.

    python -m experiments.compare runs/*                          # markdown to stdout
    python -m experiments.compare runs/* --method isif --tag table8-digits --out compare/
    python -m experiments.compare --wandb embedding-suite --dataset cub   # the W&B project (logged in)

Local runs: each run directory's `final_metrics.json` (the last epoch's metrics; never a best-epoch pick)
and, for the curves, its `csv/metrics.csv` (LOGGER=csv runs). W&B runs: the project's runs through the
public API (their summary holds the final metrics, their config the run's method / dataset / variant,
their history the curves). The papers' published numbers (`paper_results.csv`) for the same method and
dataset sit beside them. `--out DIR` writes table.md, table.csv, bars.png and curves.png there.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib
import pandas as pd

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # after the non-interactive backend is chosen
from matplotlib.ticker import MaxNLocator

PAPER_RESULTS = Path(__file__).with_name("paper_results.csv")
META = ("method", "dataset", "variant", "run")


def read_papers(path: Path = PAPER_RESULTS) -> pd.DataFrame:
    return pd.read_csv(path, keep_default_na=False, na_values={"value": [""]})


def wandb_api():
    """wandb.Api(), or a SystemExit that says how to log in (W&B's own UsageError names no command)."""
    import wandb

    from experiments.train import wandb_logged_in

    how = ("--wandb reads the project through W&B's API, which needs a login: run `wandb login` (or set "
           "WANDB_API_KEY); local runs need no --wandb")
    if not wandb_logged_in():
        raise SystemExit(f"error: {how}")
    try:
        return wandb.Api()
    except wandb.errors.UsageError as err:
        raise SystemExit(f"error: {how} ({err})") from None


# -- runs as rows ----------------------------------------------------------------------------------
def load_run(run_dir: Path) -> dict:
    summary = json.loads((run_dir / "final_metrics.json").read_text())
    meta = summary.get("run", {})
    return {"run": run_dir.name, "method": meta.get("method", ""), "dataset": meta.get("dataset", ""),
            "variant": meta.get("variant", ""), "group": meta.get("group", ""), "tags": list(meta.get("tags", [])),
            "path": str(run_dir), **summary["final"]}


def local_runs(run_dirs: list[Path]) -> pd.DataFrame:
    return pd.DataFrame([load_run(d) for d in run_dirs if (d / "final_metrics.json").is_file()])


def wandb_runs(project: str, api=None) -> pd.DataFrame:
    """The project's finished runs as rows like `load_run`'s (`project` = [entity/]project). `api`: a
    wandb.Api (the default needs a login)."""
    if api is None:
        api = wandb_api()
    rows = []
    for run in api.runs(project):
        config, summary = dict(run.config), dict(run.summary)
        rows.append({"run": run.name, "method": config.get("run.method", ""), "dataset": config.get("run.dataset", ""),
                     "variant": config.get("run.variant", ""), "group": run.group or "", "tags": list(run.tags or []),
                     "path": f"wandb:{run.path if isinstance(run.path, str) else '/'.join(run.path)}",
                     **{k: v for k, v in summary.items() if k.startswith("val/") and isinstance(v, int | float)}})
    return pd.DataFrame(rows)


def select(runs: pd.DataFrame, method: str | None = None, dataset: str | None = None,
           tag: str | None = None) -> pd.DataFrame:
    """The runs of a method, a dataset and with a tag (`method:isif`, a table's group, any run.tags), as given.
    A tag matches a run's tags or its group."""
    keep = pd.Series(True, index=runs.index)
    if method:
        keep &= runs["method"] == method
    if dataset:
        keep &= runs["dataset"] == dataset
    if tag:
        keep &= pd.Series([tag in tags or tag == group for tags, group in zip(runs["tags"], runs["group"])],
                          index=runs.index, dtype=bool)
    return runs[keep]


def comparison(run_dirs: list[Path] | pd.DataFrame, papers: pd.DataFrame, method: str | None = None,
               dataset: str | None = None) -> pd.DataFrame:
    """One row per run and one per matching published result (same method and dataset), one column per
    metric. With no runs, the published rows of `method` / `dataset` alone (what a new run will sit beside)."""
    runs = run_dirs if isinstance(run_dirs, pd.DataFrame) else local_runs(run_dirs)
    if runs.empty and not (method or dataset):
        raise SystemExit("no run with final_metrics.json given (or none left after the filters)")
    if runs.empty:
        keys = {(m, d) for m, d in zip(papers["method"], papers["dataset"])
                if (not method or m == method) and (not dataset or d == dataset)}
        if not keys:
            raise SystemExit(f"no run and no published result for method {method or 'any'}, dataset "
                             f"{dataset or 'any'} (experiments/paper_results.csv)")
        runs = pd.DataFrame(columns=["run", "method", "dataset", "variant"])
    else:
        keys = set(zip(runs["method"], runs["dataset"]))
    published = papers[[(m, d) in keys for m, d in zip(papers["method"], papers["dataset"])]]
    table = runs.drop(columns=[c for c in ("group", "tags", "path") if c in runs])
    if not published.empty:
        paper_rows = (published.fillna({"variant": ""})
                      .pivot_table(index=["method", "dataset", "variant", "source"], columns="metric", values="value")
                      .reset_index().assign(run=lambda t: "paper: " + t["source"]).drop(columns="source"))
        table = pd.concat([table, paper_rows], ignore_index=True) if len(table) else paper_rows
    metrics = sorted(c for c in table.columns if c.startswith("val/"))
    return table[[*META[:3], "run", *metrics]].sort_values(["method", "dataset", "run"]).reset_index(drop=True)


# -- outputs -----------------------------------------------------------------------------------------
def markdown(table: pd.DataFrame) -> str:
    """A markdown table, numbers to one decimal (two under 10: the error rates), '-' where there is none."""
    def cell(v):
        if isinstance(v, float):
            return "-" if pd.isna(v) else f"{v:.2f}" if abs(v) < 10 else f"{v:.1f}"
        return str(v)
    lines = ["| " + " | ".join(table.columns) + " |", "|" + "---|" * len(table.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join(lines)


def distinct_metrics(table: pd.DataFrame, metrics: list[str]) -> list[str]:
    """`metrics` without those whose column repeats an earlier one on every row (val/nmi repeats
    val/nmi_arithmetic or val/nmi_geometric: three identical bars say nothing more than one)."""
    kept: list[str] = []
    for m in metrics:
        if not any(table[m].equals(table[k]) for k in kept):
            kept.append(m)
    return kept


def default_metrics(table: pd.DataFrame, limit: int | None = None) -> list[str]:
    """The headline metrics the table holds (experiments.console.HEADLINE's order), else its val/ metrics;
    none that repeats another."""
    from experiments.console import HEADLINE  # the metrics an epoch line shows, in this order

    present = [c for c in table.columns if c.startswith("val/") and table[c].notna().any()]
    chosen = [m for m in HEADLINE if m in present] or present
    return distinct_metrics(table, chosen)[:limit]


def label_of(run: str, variant) -> str:
    return run if variant in ("", run) or pd.isna(variant) or str(run).startswith("paper") else f"{run} ({variant})"


def bar_chart(table: pd.DataFrame, path: Path, metrics: list[str] | None = None) -> Path:
    """One panel per metric (up to 4 a row), one horizontal bar per run (solid, its value written at the
    end) and per published row (hatched), the run names on the left axis: readable at any number of runs."""
    metrics = [m for m in (metrics or default_metrics(table)) if m in table and table[m].notna().any()]
    if not metrics:
        raise SystemExit("no metric with a value to plot")
    rows = table[table[metrics].notna().any(axis=1)].reset_index(drop=True)
    labels = [label_of(r, v) for r, v in zip(rows["run"], rows["variant"])]
    cols = min(4, len(metrics))
    lines = -(-len(metrics) // cols)
    height = 0.28 * len(rows) + 1.0
    fig, axes = plt.subplots(lines, cols, figsize=(2.6 * cols + 0.07 * max(map(len, labels)) + 0.6, height * lines),
                             dpi=100, squeeze=False, sharey=True)
    cmap = plt.get_cmap("tab10")
    ys = list(range(len(rows)))[::-1]
    for n, ax in enumerate(axes.flat):
        if n >= len(metrics):
            ax.axis("off")
            continue
        metric = metrics[n]
        for y, (_, row), i in zip(ys, rows.iterrows(), range(len(rows))):
            if pd.isna(row[metric]):
                continue
            paper = str(row["run"]).startswith("paper: ")
            ax.barh(y, row[metric], 0.8, color=cmap(i % 10), hatch="//" if paper else None,
                    edgecolor="black" if paper else None, alpha=0.6 if paper else 1.0)
            ax.annotate(f"{row[metric]:.1f}", (row[metric], y), xytext=(2, 0), textcoords="offset points",
                        va="center", fontsize=7)
        ax.set_title(metric, fontsize=9)
        ax.set_yticks(ys, labels, fontsize=7)
        ax.tick_params(axis="x", labelsize=7)
        ax.margins(x=0.18)
    fig.suptitle("runs (solid, last epoch) vs papers (hatched), %", fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def run_curves(run: pd.Series, metric: str, api=None) -> pd.DataFrame:
    """(epoch, value) of one metric over a run: the run's csv/metrics.csv, or its W&B history."""
    path = str(run["path"])
    if path.startswith("wandb:"):
        if api is None:
            api = wandb_api()
        history = api.run(path.removeprefix("wandb:")).history(keys=["epoch", metric], pandas=True)
    else:
        csv = Path(path, "csv", "metrics.csv")
        if not csv.is_file():
            return pd.DataFrame(columns=["epoch", metric])
        history = pd.read_csv(csv)
    if metric not in history or "epoch" not in history:
        return pd.DataFrame(columns=["epoch", metric])
    return history[["epoch", metric]].dropna().drop_duplicates("epoch", keep="last").sort_values("epoch")


def curve_lines(runs: pd.DataFrame, metric: str, api=None) -> dict[str, pd.DataFrame]:
    """{run label: (epoch, value) rows} of every run that has a history of `metric`."""
    lines = {}
    for _, run in runs.iterrows():
        curve = run_curves(run, metric, api)
        if len(curve):
            lines[label_of(run["run"], run["variant"])] = curve
    return lines


def curves_chart(runs: pd.DataFrame, metrics: list[str], path: Path, api=None) -> Path | None:
    """One panel per metric, one line per run (epochs 1-based), one colour per run in every panel and a legend
    naming them; None when no run has a curve."""
    labels = [label_of(r, v) for r, v in zip(runs["run"], runs["variant"])]
    colour = {label: plt.get_cmap("tab10")(i % 10) for i, label in enumerate(dict.fromkeys(labels))}
    legend_width = min(3.0, 0.6 + 0.065 * max(map(len, labels), default=8))  # inches, for the run names
    width = 4.0 * len(metrics) + legend_width
    fig, axes = plt.subplots(1, len(metrics), figsize=(width, 3.5), dpi=100, squeeze=False)
    handles = {}
    for ax, metric in zip(axes[0], metrics):
        for label, curve in curve_lines(runs, metric, api).items():
            handles[label], = ax.plot(curve["epoch"] + 1, curve[metric], marker="o", markersize=3, label=label,
                                      color=colour[label])
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(metric, fontsize=9)
    if not handles:
        plt.close(fig)
        return None
    right = 1 - legend_width / width
    fig.tight_layout(rect=(0, 0, right, 1))
    fig.legend(list(handles.values()), list(handles), fontsize=7, frameon=False, loc="center left",
               bbox_to_anchor=(right, 0.5))
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=fig.dpi)
    plt.close(fig)
    return path


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="*", type=Path, help="run directories")
    parser.add_argument("--wandb", metavar="PROJECT", help="also the runs of this W&B project ([entity/]project)")
    parser.add_argument("--method")
    parser.add_argument("--dataset")
    parser.add_argument("--tag", help="a run tag (method:isif, ...) or group (a reproduced table's <method>-<table>)")
    parser.add_argument("--metrics", nargs="+", help="the bar chart's and curves' metrics (default: all / the first)")
    parser.add_argument("--csv", type=Path, help="also write the table as CSV")
    parser.add_argument("--out", type=Path, help="write table.md, table.csv, bars.png and curves.png here")
    args = parser.parse_args(argv)
    runs = local_runs(args.runs)
    if args.wandb:
        runs = pd.concat([runs, wandb_runs(args.wandb)], ignore_index=True)
    if runs.empty and not (args.method or args.dataset):
        raise SystemExit("no run with final_metrics.json given" + (" or in the W&B project" if args.wandb else ""))
    runs = select(runs, args.method, args.dataset, args.tag) if not runs.empty else runs
    table = comparison(runs, read_papers(), args.method, args.dataset)
    if runs.empty:
        print(f"no runs of {args.method or 'any method'} on {args.dataset or 'any dataset'} yet; the papers' rows:\n")
    print(markdown(table))
    if args.csv:
        table.to_csv(args.csv, index=False)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "table.md").write_text(markdown(table) + "\n")
        table.to_csv(args.out / "table.csv", index=False)
        bar_chart(table, args.out / "bars.png", args.metrics)
        metrics = args.metrics or default_metrics(runs, limit=3) if not runs.empty else []
        curves = curves_chart(runs, metrics, args.out / "curves.png") if metrics else None
        print(f"\nwritten to {args.out}: table.md, table.csv, bars.png" + (", curves.png" if curves else
                                                                           " (no csv/metrics.csv: no curves)"))


if __name__ == "__main__":
    main()
