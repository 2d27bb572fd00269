import json

import pandas as pd

from experiments.effects.gather import COLUMNS, main, read_results, summary


def write_run(out, row: str, seed: int, final: dict, commit: str = "abc") -> None:
    directory = out / row / f"seed{seed}"
    directory.mkdir(parents=True)
    run = {"method": "isif", "group": "isif-table8-digits", "git_commit": commit}
    (directory / "final_metrics.json").write_text(json.dumps({"run": run, "final": final}))


def test_gather_keeps_one_line_per_run_and_metric_and_builds_the_readme_table(tmp_path, capsys):
    out, results = tmp_path / "isif-table8", tmp_path / "results.csv"
    for seed, (full, no_da) in enumerate([(90.0, 50.0), (80.0, 60.0)]):
        write_run(out, "full", seed, {"val/knn_top1": full})
        write_run(out, "no-da", seed, {"val/knn_top1": no_da})
    main([str(out), "--results", str(results)])
    first = read_results(results)
    assert list(first.columns) == COLUMNS and len(first) == 4
    assert first.iloc[0].to_dict() == {"method": "isif", "table": "isif-table8-digits", "row": "full", "seed": 0,
                                       "metric": "val/knn_top1", "value": 90.0, "git_commit": "abc",
                                       "budget": ""}
    # a rerun of one seed replaces its line, the other lines stay
    (out / "no-da" / "seed1" / "final_metrics.json").unlink()
    (out / "no-da" / "seed1").rmdir()
    write_run(out, "no-da", 1, {"val/knn_top1": 70.0}, commit="def")
    main([str(out), "--results", str(results), "--readme"])
    again = read_results(results)
    assert len(again) == 4
    changed = again[(again.row == "no-da") & (again.seed == 1)].iloc[0]
    assert (changed.value, changed.git_commit) == (70.0, "def")
    # no-da - full: -40 (seed 0), -10 (seed 1): mean -25, worst -40; the paper's -46.2 has the same sign
    table = capsys.readouterr().out.strip().splitlines()[-1]
    assert table == "| isif | No DA vs Full | val/knn_top1 | 0 1 | -25.0 (-40.0) | -46.2 | ✓ |  |"


def test_summary_marks_a_direction_the_paper_does_not_have():
    lines = [{"method": "isif", "table": "isif-table8-digits", "row": r, "seed": 0, "metric": "val/knn_top1",
              "value": v, "git_commit": "x", "budget": "b"} for r, v in (("full", 80.0), ("hard", 82.0))]
    assert summary(pd.DataFrame(lines)).splitlines()[-1] == \
        "| isif | Hard vs Full | val/knn_top1 | 0 | +2.0 (+2.0) | -0.4 | ✗ | b |"


def test_a_row_that_trains_another_method_stays_in_its_table(tmp_path):
    """UMM Table 5's Baseline ISIF row is tagged method:isif (it trains ISIF); its group names the table."""
    out = tmp_path / "umm-table5-cpu"
    for row, method in (("baseline-isif", "isif"), ("l-s", "umm")):
        directory = out / row / "seed0"
        directory.mkdir(parents=True)
        run = {"method": method, "group": "umm-table5-cpu", "git_commit": "abc"}
        (directory / "final_metrics.json").write_text(json.dumps({"run": run, "final": {"val/knn_top1": 80.0}}))
    main([str(out), "--results", str(tmp_path / "results.csv")])
    lines = read_results(tmp_path / "results.csv")
    assert set(zip(lines.method, lines.table, lines.row)) == {("umm", "umm-table5-cpu", "baseline-isif"),
                                                              ("umm", "umm-table5-cpu", "l-s")}


def test_summary_adds_a_tables_metric_pairs_inside_each_run():
    lines = [{"method": "roul", "table": "roul-table4-cpu", "row": row, "seed": seed, "metric": metric,
              "value": value, "git_commit": "x", "budget": "b"}
             for row, seed, metric, value in (("baseline", 0, "val/recall@1", 50.0),
                                              ("moc-roul", 0, "val/recall@1", 51.0),
                                              ("moc-roul", 0, "val/recall@1_refined", 51.5))]
    assert summary(pd.DataFrame(lines)).splitlines()[-1] == \
        "| roul | + MOC (ROUL), within each run | val/recall@1_refined - val/recall@1 | 0 | +0.5 (+0.5) | - | - | b |"


def test_gather_leaves_out_runs_on_the_validation_split(tmp_path):
    """Budget choices run on held-out train images; results.csv holds the test split only."""
    out, results = tmp_path / "isif-table8", tmp_path / "results.csv"
    write_run(out, "full", 0, {"val/knn_top1": 90.0})
    write_run(out, "full", 100, {"val/knn_top1": 70.0})
    (out / "full" / "seed100" / "config.yaml").write_text(
        "data:\n  init_args:\n    validation_per_class: 500\n    validation_seed: 100\n")
    (out / "full" / "seed0" / "config.yaml").write_text("data:\n  init_args:\n    validation_per_class: 0\n")
    main([str(out), "--results", str(results)])
    assert read_results(results).seed.tolist() == [0]
