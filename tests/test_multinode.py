"""Multi-node on Lightning's own machinery: 2 "nodes" x 1 process on localhost, each a separate torchrun launch
(--nnodes 2, --node-rank 0 / 1, rendezvous at 127.0.0.1, gloo), score and cluster exactly as 1 process does,
and shard the training batch by global rank; and train an epoch through `experiments.train` as the README and
experiments/slurm_multinode.sh launch it."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests import multinode_run


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_node(node_rank: int, port: int, out_dir) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
                             "--node-rank", str(node_rank), "--master-addr", "127.0.0.1", "--master-port", str(port),
                             "-m", "tests.multinode_run", "--nodes", "2", "--out-dir", str(out_dir)])


def test_two_torchrun_nodes_give_the_metrics_pseudo_labels_and_batch_of_one_process(tmp_path):
    (tmp_path / "one").mkdir(), (tmp_path / "two").mkdir()
    port = free_port()
    nodes = [torchrun_node(rank, port, tmp_path / "two") for rank in (0, 1)]
    multinode_run.run(nodes=1, out_dir=str(tmp_path / "one"))  # the 1-process reference, meanwhile, in this process
    assert [node.wait(timeout=300) for node in nodes] == [0, 0]
    one = json.loads((tmp_path / "one" / "rank0.json").read_text())
    ranks = [json.loads((tmp_path / "two" / f"rank{r}.json").read_text()) for r in (0, 1)]
    # global rank r ran on node r as that node's local rank 0, in a world of 2
    assert [(r["global_rank"], r["node_rank"], r["local_rank"], r["world_size"], r["group_rank_env"])
            for r in ranks] == [(0, 0, 0, 2, "0"), (1, 1, 0, 2, "1")]
    assert set(one["metrics"]) >= {"val/knn_top1", "val/recall@1", "val/nmi"}
    for held in ranks:  # every rank holds the 1-process result, not its node's share
        assert held["metrics"] == pytest.approx(one["metrics"], abs=1e-4)
        assert held["pseudo_labels"] == one["pseudo_labels"]
    # the global batch of 64 is split by global rank: 32 + 32 disjoint images, together the 1-process batch
    halves = [set(r["first_batch"]) for r in ranks]
    assert len(halves[0]) == len(halves[1]) == 32 and not halves[0] & halves[1]
    assert halves[0] | halves[1] == set(one["first_batch"])


def torchrun_train(node_rank: int, port: int, run_dir, cwd) -> subprocess.Popen:
    """One "node" of the documented launch (README, experiments/slurm_multinode.sh LAUNCHER=torchrun) on digits:
    one epoch of 2 steps of the global batch, then the evaluation."""
    configs = "experiments/configs"
    return subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1", "--node-rank",
         str(node_rank), "--master-addr", "127.0.0.1", "--master-port", str(port),
         "-m", "experiments.train", "fit", "--config", f"{configs}/base.yaml", "--config",
         f"{configs}/datasets/digits.yaml", "--config", f"{configs}/isif/digits.yaml", "--trainer.num_nodes", "2",
         "--trainer.devices", "1", "--trainer.strategy", "ddp", "--trainer.accelerator", "cpu",
         "--run.dir", str(run_dir), "--run.logger", "csv", "--trainer.max_epochs", "1",
         "--trainer.limit_train_batches", "2", "--trainer.enable_progress_bar", "false",
         "--data.num_workers", "0", "--evaluation.nmi", "false",
         "--trainer.callbacks+=tests.multinode_run.RankMetrics"],
        cwd=cwd, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True)


def test_two_torchrun_nodes_train_an_epoch_through_the_cli_into_one_run(tmp_path):
    runs = tmp_path / "runs"
    runs.mkdir()
    port = free_port()
    nodes = [torchrun_train(rank, port, runs / "isif-2nodes", Path.cwd()) for rank in (0, 1)]
    outputs = [node.communicate(timeout=600)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    assert [p.name for p in runs.iterdir()] == ["isif-2nodes"]  # one run directory for both nodes
    run = runs / "isif-2nodes"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last.ckpt"]  # rank 0's, and only it
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 2
    ranks = [json.loads((run / f"rank{r}_metrics.json").read_text()) for r in (0, 1)]
    assert [(r["global_rank"], r["node_rank"], r["world_size"], r["steps"]) for r in ranks] == [(0, 0, 2, 2),
                                                                                                (1, 1, 2, 2)]
    final = json.loads((run / "final_metrics.json").read_text())["final"]
    assert {"val/knn_top1", "val/recall@1"} <= set(ranks[0]["metrics"])
    assert ranks[1]["metrics"] == ranks[0]["metrics"]  # both ranks computed the same scores
    assert final == pytest.approx({k: v for k, v in ranks[0]["metrics"].items() if k in final}, abs=1e-4)


def test_the_slurm_script_documents_the_same_torchrun_launch():
    script = Path("experiments/slurm_multinode.sh").read_text()
    launch = script[script.index("torchrun"):]
    for flag in ("--nnodes", "--nproc-per-node", "--node-rank", "--master-addr", "--master-port",
                 "-m experiments.train fit", "--trainer.num_nodes", "--trainer.devices", "--trainer.strategy ddp",
                 "--run.dir"):
        assert flag in launch, flag
    assert subprocess.run(["bash", "-n", "experiments/slurm_multinode.sh"], check=False).returncode == 0
