import json

import pandas as pd

from experiments.compare import PAPER_RESULTS, comparison


def write_run(path, method, dataset, final):
    path.mkdir()
    (path / "final_metrics.json").write_text(json.dumps(
        {"run": {"method": method, "dataset": dataset, "variant": ""}, "initial": {}, "final": final, "best": {}}))
    return path


def test_runs_sit_beside_the_published_numbers(tmp_path):
    a = write_run(tmp_path / "a", "isif", "cifar10", {"val/knn_top1": 80.0, "val/nmi": 50.0})
    b = write_run(tmp_path / "b", "isif", "cifar10", {"val/knn_top1": 82.0})
    table = comparison([a, b], pd.read_csv(PAPER_RESULTS, keep_default_na=False, na_values={"value": [""]}))
    assert table["run"].tolist() == ["a", "b", "paper: ISIF Table 1"]
    assert table["val/knn_top1"].tolist() == [80.0, 82.0, 83.6]
    assert table["val/nmi"].isna().tolist() == [False, True, True]
    assert "val/recall@1" not in table  # CUB rows of the paper are not pulled in for a CIFAR run
