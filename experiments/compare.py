"""Runs vs runs vs the papers, as one table.

    python -m experiments.compare runs/*              # markdown to stdout
    python -m experiments.compare runs/* --csv out.csv

Reads each run directory's `final_metrics.json` (the last epoch's metrics; never a best-epoch pick) and
puts the papers' published numbers (`paper_results.csv`) for the same method and dataset beside them.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd

PAPER_RESULTS = Path(__file__).with_name("paper_results.csv")


def load_run(run_dir: Path) -> dict:
    summary = json.loads((run_dir / "final_metrics.json").read_text())
    meta = summary.get("run", {})
    return {"run": run_dir.name, "method": meta.get("method", ""), "dataset": meta.get("dataset", ""),
            "variant": meta.get("variant", ""), **summary["final"]}


def comparison(run_dirs: list[Path], papers: pd.DataFrame) -> pd.DataFrame:
    """One row per run and one per matching published result, one column per metric."""
    runs = pd.DataFrame([load_run(d) for d in run_dirs])
    if runs.empty:
        raise SystemExit("no run directory with final_metrics.json given")
    keys = set(zip(runs["method"], runs["dataset"]))
    published = papers[[(m, d) in keys for m, d in zip(papers["method"], papers["dataset"])]]
    paper_rows = (published.fillna({"variant": ""})
                  .pivot_table(index=["method", "dataset", "variant", "source"], columns="metric", values="value")
                  .reset_index().assign(run=lambda t: "paper: " + t["source"]).drop(columns="source"))
    table = pd.concat([runs, paper_rows], ignore_index=True)
    metrics = sorted(c for c in table.columns if c.startswith("val/"))
    return table[["method", "dataset", "variant", "run", *metrics]].sort_values(["method", "dataset", "run"])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="run directories")
    parser.add_argument("--csv", type=Path, help="also write the table as CSV")
    args = parser.parse_args(argv)
    table = comparison([d for d in args.runs if (d / "final_metrics.json").is_file()],
                       pd.read_csv(PAPER_RESULTS, keep_default_na=False, na_values={"value": [""]}))
    print(table.to_string(index=False, float_format=lambda v: f"{v:.1f}", na_rep="-"))
    if args.csv:
        table.to_csv(args.csv, index=False)


if __name__ == "__main__":
    main()
