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

PAPER_RESULTS = Path(__file__).with_name("paper_results.csv")
META = ("method", "dataset", "variant", "run")


def read_papers(path: Path = PAPER_RESULTS) -> pd.DataFrame:
    return pd.read_csv(path, keep_default_na=False, na_values={"value": [""]})


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
        import wandb
        api = wandb.Api()
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


def comparison(run_dirs: list[Path] | pd.DataFrame, papers: pd.DataFrame) -> pd.DataFrame:
    """One row per run and one per matching published result (same method and dataset), one column per
    metric."""
    runs = run_dirs if isinstance(run_dirs, pd.DataFrame) else local_runs(run_dirs)
    if runs.empty:
        raise SystemExit("no run with final_metrics.json given (or none left after the filters)")
    keys = set(zip(runs["method"], runs["dataset"]))
    published = papers[[(m, d) in keys for m, d in zip(papers["method"], papers["dataset"])]]
    table = runs.drop(columns=[c for c in ("group", "tags", "path") if c in runs])
    if not published.empty:
        paper_rows = (published.fillna({"variant": ""})
                      .pivot_table(index=["method", "dataset", "variant", "source"], columns="metric", values="value")
                      .reset_index().assign(run=lambda t: "paper: " + t["source"]).drop(columns="source"))
        table = pd.concat([table, paper_rows], ignore_index=True)
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


def bar_chart(table: pd.DataFrame, path: Path, metrics: list[str] | None = None) -> Path:
    """Grouped bars: one group per metric, one bar per run (solid) and per published row (hatched)."""
    metrics = metrics or [c for c in table.columns if c.startswith("val/") and table[c].notna().any()]
    metrics = [m for m in metrics if m in table and table[m].notna().any()]
    if not metrics:
        raise SystemExit("no metric with a value to plot")
    rows = table[table[metrics].notna().any(axis=1)]
    labels = [r if v in ("", r) or r.startswith("paper") else f"{r} ({v})" for r, v in zip(rows["run"], rows["variant"])]
    width = 0.8 / len(rows)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(metrics) * len(rows) ** 0.5 + 3), 4), dpi=100)
    cmap = plt.get_cmap("tab10")
    for i, (label, (_, row)) in enumerate(zip(labels, rows.iterrows())):
        paper = str(row["run"]).startswith("paper: ")
        xs = [j + (i - (len(rows) - 1) / 2) * width for j in range(len(metrics))]
        ax.bar(xs, [row[m] for m in metrics], width, label=label, color=cmap(i % 10), hatch="//" if paper else None,
               edgecolor="black" if paper else None, alpha=0.6 if paper else 1.0)
    ax.set_xticks(range(len(metrics)), metrics)
    ax.set_ylabel("%")
    ax.set_title("runs (solid, last epoch) vs papers (hatched)", fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    fig.tight_layout()
    return _save(fig, path)


def run_curves(run: pd.Series, metric: str, api=None) -> pd.DataFrame:
    """(epoch, value) of one metric over a run: the run's csv/metrics.csv, or its W&B history."""
    path = str(run["path"])
    if path.startswith("wandb:"):
        if api is None:
            import wandb
            api = wandb.Api()
        history = api.run(path.removeprefix("wandb:")).history(keys=["epoch", metric], pandas=True)
    else:
        csv = Path(path, "csv", "metrics.csv")
        if not csv.is_file():
            return pd.DataFrame(columns=["epoch", metric])
        history = pd.read_csv(csv)
    if metric not in history or "epoch" not in history:
        return pd.DataFrame(columns=["epoch", metric])
    return history[["epoch", metric]].dropna().drop_duplicates("epoch", keep="last").sort_values("epoch")


def curves_chart(runs: pd.DataFrame, metrics: list[str], path: Path, api=None) -> Path | None:
    """One panel per metric, one line per run (epochs 1-based); None when no run has a curve."""
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.5 * len(metrics), 3.5), dpi=100, squeeze=False)
    drawn = False
    for ax, metric in zip(axes[0], metrics):
        for _, run in runs.iterrows():
            curve = run_curves(run, metric, api)
            if len(curve):
                label = run["run"] if run["variant"] in ("", run["run"]) else f"{run['run']} ({run['variant']})"
                ax.plot(curve["epoch"] + 1, curve[metric], marker="o", markersize=3, label=label)
                drawn = True
        ax.set_xlabel("epoch")
        ax.set_title(metric, fontsize=9)
    if not drawn:
        plt.close(fig)
        return None
    axes[0][-1].legend(fontsize=7, frameon=False)
    fig.tight_layout()
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
    if runs.empty:
        raise SystemExit("no run with final_metrics.json given" + (" or in the W&B project" if args.wandb else ""))
    runs = select(runs, args.method, args.dataset, args.tag)
    table = comparison(runs, read_papers())
    print(markdown(table))
    if args.csv:
        table.to_csv(args.csv, index=False)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "table.md").write_text(markdown(table) + "\n")
        table.to_csv(args.out / "table.csv", index=False)
        bar_chart(table, args.out / "bars.png", args.metrics)
        metrics = args.metrics or [c for c in table.columns if c.startswith("val/") and runs.get(c) is not None
                                   and runs[c].notna().any()][:2]
        curves = curves_chart(runs, metrics, args.out / "curves.png")
        print(f"\nwritten to {args.out}: table.md, table.csv, bars.png" + (", curves.png" if curves else
                                                                           " (no csv/metrics.csv: no curves)"))


if __name__ == "__main__":
    main()
