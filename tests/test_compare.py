import json

import pandas as pd

from experiments.compare import PAPER_RESULTS, comparison


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
