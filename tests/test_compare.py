import json
import re
from types import SimpleNamespace

import pandas as pd
import pytest
from PIL import Image

from experiments.compare import (
    PAPER_RESULTS,
    comparison,
    curve_lines,
    default_metrics,
    local_runs,
    main,
    markdown,
    read_papers,
    select,
    wandb_runs,
)
from experiments.train import main as train_main
from tests.fixtures import write_cifar10


def write_run(path, method, dataset, final, variant=""):
    path.mkdir()
    (path / "final_metrics.json").write_text(json.dumps(
        {"run": {"method": method, "dataset": dataset, "variant": variant},
         "initial": {}, "final": final, "best": {}}))
    return path


def test_runs_sit_beside_the_published_numbers(tmp_path):
    a = write_run(tmp_path / "a", "isif", "cifar10", {"val/knn_top1": 80.0, "val/nmi": 50.0})
    b = write_run(tmp_path / "b", "isif", "cifar10", {"val/knn_top1": 82.0})
    table = comparison([a, b], pd.read_csv(PAPER_RESULTS, keep_default_na=False, na_values={"value": [""]}))
    assert table["run"].tolist() == ["a", "b", "paper: ISIF Table 1"]
    assert table["val/knn_top1"].tolist() == [80.0, 82.0, 83.6]
    assert table["val/nmi"].isna().tolist() == [False, True, True]
    assert "val/recall@1" not in table  # CUB rows of the paper are not pulled in for a CIFAR run


def test_a_variant_run_lines_up_with_its_published_row(tmp_path):
    run = write_run(tmp_path / "r", "snowball", "cifar10", {"val/error": 12.0, "val/error_student": 13.0},
                    variant="250")
    table = comparison([run], pd.read_csv(PAPER_RESULTS, keep_default_na=False, na_values={"value": [""]}))
    papers = table[table["run"].str.startswith("paper: ")]
    assert table.loc[~table["run"].str.startswith("paper: "), "run"].tolist() == ["r"]
    # no SVHN / CIFAR-100 rows
    assert set(zip(table["method"], table["dataset"])) == {("snowball", "cifar10")}
    # matching is by (method, dataset): every published CIFAR-10 variant comes along, one row each, told apart
    # by `variant`; the run's own variant has exactly the published number
    assert papers["variant"].is_unique and {"", "250", "convnet13", "mixmatch"} <= set(papers["variant"])
    same = papers[papers["variant"] == "250"]
    assert same["run"].tolist() == ["paper: Dissertation Table 2.6"] and same["val/error"].tolist() == [11.58]
    assert papers.set_index("variant").loc["", "val/error"] == 7.82  # 1,000 labels (cifar10.yaml)
    # the papers report one model (val/error), not the student
    assert table.loc[table["val/error_student"].notna(), "run"].tolist() == ["r"]
    assert not any(c.startswith(("val/knn", "val/recall")) for c in table)


# -- real runs, outputs, W&B, the published numbers ------------------------------------------------
@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """Two real 2-epoch ISIF runs on a tiny CIFAR-10 copy: one logging to W&B offline, one to CSV (with the
    linear SVM callback added from the command line)."""
    tmp = tmp_path_factory.mktemp("runs")
    root = write_cifar10(tmp / "cifar")
    runs = []
    for name, logger in (("wandb-run", "wandb"), ("csv-run", "csv")):
        train_main(["fit", "--config", "experiments/configs/base.yaml", "--config",
                    "experiments/configs/datasets/cifar10.yaml", "--config", "experiments/configs/isif/cifar10.yaml",
                    f"--data.init_args.root={root}", "--data.init_args.allow_partial=true",
                    "--data.init_args.batch_size=16", "--data.init_args.num_workers=0",
                    "--model.init_args.backbone=small_cnn", "--trainer.max_epochs=2",
                    "--trainer.check_val_every_n_epoch=1", "--trainer.precision=32-true", "--evaluation.nmi=false",
                    "--trainer.enable_progress_bar=false", f"--run.dir={tmp / name}", f"--run.logger={logger}",
                    "--run.method=isif", "--run.dataset=cifar10", f"--run.tags=[{name}]",
                    *(["--trainer.callbacks+=callbacks.linear.LinearSVM"] if logger == "csv" else [])])
        runs.append(tmp / name)
    return runs


def test_two_real_runs_beside_the_paper(two_runs, tmp_path, capsys):
    table = comparison(two_runs, read_papers())
    assert table["run"].tolist() == ["csv-run", "paper: ISIF Table 1", "wandb-run"]
    finals = [json.loads((d / "final_metrics.json").read_text())["final"] for d in two_runs]
    assert table.set_index("run").loc[["wandb-run", "csv-run"], "val/knn_top1"].tolist() == [
        f["val/knn_top1"] for f in finals]
    assert table.set_index("run").loc["paper: ISIF Table 1", "val/knn_top1"] == 83.6
    # a linear-eval callback's metric reaches final_metrics.json and the table (callbacks.linear)
    assert table.set_index("run")["val/svm_top1"].notna().tolist() == [True, False, False]
    main([*map(str, two_runs), "--out", str(tmp_path / "out"), "--metrics", "val/knn_top1"])
    assert capsys.readouterr().out.startswith(markdown(table))
    assert (tmp_path / "out" / "table.md").read_text() == markdown(table) + "\n"
    for picture in ("bars.png", "curves.png"):
        with Image.open(tmp_path / "out" / picture) as image:
            assert image.format == "PNG" and image.size[0] >= 450
    # both runs have a history, the W&B one too (it writes csv/metrics.csv beside its offline run): one line
    # each, under the run's name
    lines = curve_lines(local_runs(two_runs), "val/knn_top1")
    assert sorted(lines) == ["csv-run", "wandb-run"] and all(len(c) == 2 for c in lines.values())


def test_the_bar_chart_shows_the_headline_metrics_once(tmp_path):
    """val/nmi repeats val/nmi_geometric on every row: one panel, not three identical ones; the default
    panels are the headline metrics, and the picture stays a readable size."""
    runs = [write_run(tmp_path / f"r{i}", "isif", "digits",
                      {"val/knn_top1": 90.0 + i, "val/recall@1": 93.0, "val/recall@2": 96.0, "val/recall@4": 98.0,
                       "val/recall@8": 99.0, "val/nmi": 70.0 + i, "val/nmi_geometric": 70.0 + i,
                       "val/nmi_arithmetic": 69.0 + i, "val/map@r": 50.0, "val/r_precision": 60.0})
            for i in range(3)]
    table = comparison(runs, read_papers())
    assert default_metrics(table) == ["val/knn_top1", "val/recall@1", "val/map@r", "val/nmi"]
    assert default_metrics(table.drop(columns=["val/knn_top1", "val/recall@1", "val/map@r", "val/nmi"])) == [
        "val/nmi_arithmetic", "val/nmi_geometric", "val/r_precision", "val/recall@2", "val/recall@4", "val/recall@8"]
    main([*map(str, runs), "--out", str(tmp_path / "out")])
    with Image.open(tmp_path / "out" / "bars.png") as image:
        assert image.size[0] <= 1400 and image.size[1] <= 400  # was 2378 x 400 for ten grouped columns


def test_no_runs_yet_shows_the_papers_rows(capsys):
    main(["--method", "umm", "--dataset", "cub"])
    out = capsys.readouterr().out
    assert "no runs of umm on cub yet" in out and "| umm | cub |  | paper: UMM Table 4 |" in out


def test_wandb_without_a_login_says_how_to_log_in(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    (tmp_path / "netrc").write_text("")
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    with pytest.raises(SystemExit, match="wandb login"):
        main(["--wandb", "me/embedding-suite"])


def test_runs_carry_their_tags_and_group_for_filters(two_runs):
    meta = json.loads((two_runs[0] / "final_metrics.json").read_text())["run"]
    assert meta["group"] == "isif-cifar10" and meta["protocol"] == "seen"
    assert meta["tags"] == ["method:isif", "dataset:cifar10", "protocol:seen", "wandb-run"]
    assert re.fullmatch(r"[0-9a-f]{40}(\+dirty)?|", meta["git_commit"])
    runs = local_runs(two_runs)
    assert select(runs, tag="csv-run")["run"].tolist() == ["csv-run"]
    assert select(runs, method="isif", tag="isif-cifar10")["run"].tolist() == ["wandb-run", "csv-run"]
    assert select(runs, dataset="cub").empty


def test_wandb_project_runs_become_rows():
    run = SimpleNamespace(name="r1", config={"run.method": "umm", "run.dataset": "cub", "run.variant": ""},
                          summary={"val/recall@1": 40.0, "initial/recall@1": 10.0, "_step": 3}, group="umm-cub",
                          tags=["method:umm"], path=["me", "embedding-suite", "abc"])
    api = SimpleNamespace(runs=lambda project: [run] if project == "me/embedding-suite" else [])
    rows = wandb_runs("me/embedding-suite", api=api)
    assert rows.iloc[0][["run", "method", "dataset", "val/recall@1", "path"]].tolist() == [
        "r1", "umm", "cub", 40.0, "wandb:me/embedding-suite/abc"]
    assert "initial/recall@1" not in rows and "_step" not in rows


def test_every_published_number_names_its_table_and_is_a_percentage():
    papers = read_papers()
    assert len(papers) > 50
    for row in papers.itertuples():
        assert re.search(r"\bTable \d+(\.\d+)?\b", row.source), row  # e.g. "ISIF Table 2", "Dissertation Table 4.4"
        assert 0 <= row.value <= 100, row
        assert row.metric.startswith("val/"), row  # the names the runs log
