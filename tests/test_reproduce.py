import json
import shlex
import subprocess
from collections import defaultdict

import pytest
import yaml

from experiments.reproduce import TABLES, load_table, main, row_config, train_args
from experiments.sweep import main as sweep_main
from experiments.train import SuiteCLI

TINY = ["--trainer.max_epochs=1", "--trainer.limit_train_batches=1", "--evaluation.kmeans_restarts=1",
        "--data.init_args.num_workers=0", "--trainer.enable_progress_bar=false"]


class ParseOnly(SuiteCLI):
    """The suite's CLI parser; nothing is built or run."""

    def instantiate_classes(self) -> None:
        pass

    def _run_subcommand(self, subcommand) -> None:
        pass


def test_every_table_parses_and_the_cli_accepts_its_rows(tmp_path):
    tables = [load_table(p) for p in sorted(TABLES.glob("*.yaml"))]
    methods = {"isif", "umm", "tac_ccl", "snowball", "roul", "san", "eir", "lmcs"}
    assert {t.method for t in tables} >= methods
    assert {t.method for t in tables if t.dataset == "digits"} >= methods
    # rows on the same config stack are parsed together, their switches applied in turn: one parse per stack
    stacks, switches = {}, defaultdict(list)
    for table in tables:
        for row in table.rows:
            stack = (row.dataset or table.dataset, row_config(table, row))
            stacks.setdefault(stack, train_args(table, row, tmp_path / row.id, "none", []))
            switches[stack] += [*table.args, *row.args]
    cli = ParseOnly(args=next(iter(stacks.values())))
    for stack, args in stacks.items():
        cli.parser.parse_args(args + switches[stack])  # exits with the CLI's error on a bad row


def test_a_row_on_another_methods_config_is_tagged_with_that_method(tmp_path):
    table = load_table(TABLES / "umm-table5-digits.yaml")
    baseline, full = table.rows[0], next(r for r in table.rows if r.id == "l-s-l-n-l-r")
    assert baseline.name == "Baseline ISIF"
    assert "--run.method=isif" in train_args(table, baseline, tmp_path, "none", [])
    assert "--run.method=umm" in train_args(table, full, tmp_path, "none", [])
    assert "--run.group=umm-table5-digits" in train_args(table, baseline, tmp_path, "none", [])


def test_a_table_file_with_a_mistake_names_it(tmp_path):
    bad = tmp_path / "isif-bad.yaml"
    bad.write_text(yaml.safe_dump({"method": "isif", "dataset": "digits", "source": "x", "metrics": ["val/knn_top1"],
                                   "rows": [{"name": "a", "paper": {"val/nmi": 1.0}}]}))
    with pytest.raises(ValueError, match="val/nmi"):
        load_table(bad)
    bad.write_text(yaml.safe_dump({"method": "isif", "dataset": "digits", "source": "x", "metrics": [],
                                   "rows": [{"name": "a", "config": "isif/nope.yaml"}]}))
    with pytest.raises(ValueError, match="isif/nope.yaml"):
        load_table(bad)


def test_dry_run_prints_one_command_per_row_and_sweep_a_grid(capsys):
    main(["isif", "table8-digits", "--dry-run", "--", "--trainer.max_epochs=2"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 4 and all(shlex.split(line)[-1] == "--trainer.max_epochs=2" for line in lines)
    assert "--model.init_args.negative_selection=hard_half" in lines[2]
    main(["isif", "table8-digits", "--sweep"])
    sweep = yaml.safe_load(capsys.readouterr().out)
    assert sweep["method"] == "grid" and sweep["parameters"]["rows"]["values"] == ["full", "no-da", "hard", "easy"]


def test_make_reproduce_runs_the_rows_and_writes_the_table(tmp_path):
    out = tmp_path / "table"
    (out / "full").mkdir(parents=True)  # a row already run (its final metrics), as an interrupted table leaves it
    (out / "full" / "final_metrics.json").write_text(json.dumps({"final": {"val/knn_top1": 90.0, "val/nmi": 60.0}}))
    subprocess.run(["make", "-o", ".venv/.installed", "reproduce", "METHOD=isif", "TABLE=table8-digits",
                    "ROWS=full no-da", f"OUT={out}", "LOGGER=none", f"ARGS={' '.join(TINY)}"],
                   check=True, capture_output=True, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["full", "no-da"]  # full kept, not rerun
    final = json.loads((out / "no-da" / "final_metrics.json").read_text())
    assert final["run"]["variant"] == "no-da" and final["run"]["group"] == "isif-table8-digits"
    knn, nmi = final["final"]["val/knn_top1"], final["final"]["val/nmi"]
    lines = (out / "table.md").read_text().splitlines()
    assert lines[0].startswith("ISIF Table 8, digits version (isif, digits; run = last epoch")
    assert lines[2] == "| row | val/knn_top1 run | paper (cifar10) | diff | val/nmi run | paper (cifar10) | diff |"
    assert lines[4] == "| Full | 90.0 | 83.6 | +6.4 | 60.0 | - | - |"
    assert lines[5] == f"| No DA | {knn:.1f} | 37.4 | {knn - 37.4:+.1f} | {nmi:.1f} | - | - |"
    assert len(lines) == 6  # the rows not asked for are not in the table
    assert (out / "table.png").stat().st_size > 1000  # run vs paper, per row


def test_sweep_dry_run_prints_sampled_trials_for_the_dataset(capsys):
    sweep_main(["umm", "cub", "--dry-run", "--trials", "3"])
    metric, *lines = capsys.readouterr().out.strip().splitlines()
    assert metric == "# metric: val/recall@1 (maximize)"  # CUB is unseen classes: no kNN reference
    lines = [shlex.split(line) for line in lines]
    assert len(lines) == 3
    for line in lines:
        assert line[1:5] == ["-m", "experiments.train", "fit", "--config=experiments/configs/base.yaml"]
        assert "--config=experiments/configs/umm/cub.yaml" in line and "--run.dataset=cub" in line
        assert "--config=experiments/configs/datasets/digits.yaml" not in line
        lr = float(next(a for a in line if a.startswith("--model.optim.lr=")).split("=")[1])
        assert 0.01 / 60 <= lr <= 0.2 / 60  # digits 0.01-0.2 around 0.06, moved to CUB's 0.001
    assert len({tuple(line) for line in lines}) == 3
    with pytest.raises(SystemExit, match="snowball has no cub protocol"):
        sweep_main(["snowball", "cub", "--dry-run"])


def write_run(directory, final: dict, overrides=None) -> None:
    """A finished row run as `main` leaves it: final metrics, and the overrides it ran with."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "final_metrics.json").write_text(json.dumps({"final": final}))
    if overrides is not None:
        (directory / "row.json").write_text(json.dumps({"overrides": overrides}))


def test_seeded_rows_go_to_seed_folders_with_the_methods_seed_flags(tmp_path, capsys):
    out = tmp_path / "t"
    write_run(out / "full" / "seed1", {"val/knn_top1": 1.0},
              ["--seed_everything=1", "--trainer.max_epochs=2"])  # done with these flags: kept
    main(["tac_ccl", "table4.4-digits", "--rows", "baseline", "--seeds", "0", "1", "--out", str(out),
          "--dry-run", "--", "--trainer.max_epochs=2"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2
    assert f"--run.dir={out}/baseline/seed0" in lines[0] and f"--run.dir={out}/baseline/seed1" in lines[1]
    for seed, line in enumerate(lines):  # TAC-CCL's own seeds move with seed_everything
        assert {f"--seed_everything={seed}", f"--model.init_args.seed={seed}",
                f"--trainer.callbacks.init_args.seed={seed}"} <= set(shlex.split(line))
    main(["isif", "table8-digits", "--rows", "full", "--seeds", "1", "--out", str(out), "--dry-run", "--",
          "--trainer.max_epochs=2"])
    assert capsys.readouterr().out.startswith("# done, kept: ")
    with pytest.raises(SystemExit, match=r"other overrides \(differing: \['--trainer.max_epochs=2', "
                                         r"'--trainer.max_epochs=3'\]\)"):
        main(["isif", "table8-digits", "--rows", "full", "--seeds", "1", "--out", str(out), "--dry-run", "--",
              "--trainer.max_epochs=3"])


def test_seeded_table_pairs_rows_with_the_baseline_on_the_same_seeds_and_keeps_every_row(tmp_path, capsys):
    out = tmp_path / "t"
    # ISIF Table 8 (digits): Full is the baseline row; paper knn: Full 83.6, No DA 37.4 (diff -46.2)
    for seed, (full, no_da) in enumerate([(90.0, 50.0), (80.0, 60.0), (85.0, 40.0)]):
        flags = [f"--seed_everything={seed}"]
        write_run(out / "full" / f"seed{seed}", {"val/knn_top1": full, "val/nmi": 50.0}, flags)
        write_run(out / "no-da" / f"seed{seed}", {"val/knn_top1": no_da, "val/nmi": 51.0},
                  ["--data.init_args.train_transform=plain", *flags])
    write_run(out / "hard" / "seed0", {"val/knn_top1": 91.0, "val/nmi": 49.0},
              ["--model.init_args.negative_selection=hard_half", "--seed_everything=0"])
    main(["isif", "table8-digits", "--rows", "hard", "--seeds", "0", "--out", str(out)])  # kept, not run
    lines = (out / "table.md").read_text().splitlines()
    assert lines[2].startswith("| row | metric | seeds | mean | worst | diff vs Full: mean | worst | spread |")
    assert lines[4] == "| Full | val/knn_top1 | 0 1 2 | 85.0 | 80.0 | - | - | - | - | - |"
    # no-da - full per seed: -40, -20, -45: mean -35, worst -45, sample std 13.2; paper -46.2, same direction
    assert lines[6] == "| No DA | val/knn_top1 | 0 1 2 | 50.0 | 40.0 | -35.0 | -45.0 | +13.2 | -46.2 | ✓ |"
    assert lines[7] == "| No DA | val/nmi | 0 1 2 | 51.0 | 51.0 | +1.0 | +1.0 | +0.0 | - | - |"
    # Hard (paper 83.2, -0.4 below Full) ran seed 0 alone: +1.0 against Full's seed 0, against the paper
    assert lines[8] == "| Hard | val/knn_top1 | 0 | 91.0 | 91.0 | +1.0 | +1.0 | - | -0.4 | ✗ |"
    assert (out / "table.png").stat().st_size > 1000


def test_the_sweep_that_sweep_emits_runs_each_row(capsys):
    from experiments.sweep import trial_command
    main(["isif", "table8-digits", "--sweep", "--", "--trainer.max_epochs=2"])
    sweep = yaml.safe_load(capsys.readouterr().out)
    assert sweep["name"] == "isif-table8-digits"
    for row in ("full", "easy"):
        cmd = trial_command(sweep, {"rows": row})
        cut = cmd.index("--")
        done = subprocess.run([*cmd[:cut], "--dry-run", *cmd[cut:]], capture_output=True, text=True, check=True)
        (line,) = done.stdout.strip().splitlines()
        assert f"--run.variant={row}" in line and line.endswith("--trainer.max_epochs=2")


def test_metric_pairs_set_two_metrics_of_the_same_run_against_each_other(tmp_path):
    """ROUL's refined Recall@1 against the plain one of the same run, per seed: the refinement's gain."""
    from experiments.reproduce import seed_table

    table = load_table(TABLES / "roul-table4-cpu.yaml")
    assert table.metric_pairs == {"val/recall@1_refined": "val/recall@1"}
    runs = {"baseline": {0: {"val/recall@1": 50.0}, 1: {"val/recall@1": 52.0}},  # no Φ: no refined metric
            "moc-roul": {0: {"val/recall@1": 51.0, "val/recall@1_refined": 52.5},
                         1: {"val/recall@1": 53.0, "val/recall@1_refined": 52.0}}}
    frame = seed_table(table, runs)
    pair = frame[frame.metric == "val/recall@1_refined - val/recall@1"]
    assert list(pair.row) == ["+ MOC (ROUL)"]  # the Baseline has no refined metric to pair
    # +1.5 (seed 0), -1.0 (seed 1): mean +0.25, worst -1.0
    assert pair.iloc[0][["seeds", "mean", "worst"]].tolist() == ["0 1", 0.25, -1.0]
    bad = tmp_path / "roul-bad.yaml"
    bad.write_text((TABLES / "roul-table4-cpu.yaml").read_text().replace(
        "metric_pairs: {val/recall@1_refined: val/recall@1}", "metric_pairs: {val/recall@2_refined: val/recall@1}"))
    with pytest.raises(ValueError, match="metric_pairs"):
        load_table(bad)
