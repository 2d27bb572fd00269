"""Multi-node on Lightning's own machinery: 2 "nodes" x 1 process on localhost, each a separate torchrun launch
(--nnodes 2, --node-rank 0 / 1, rendezvous at 127.0.0.1, gloo), score and cluster exactly as 1 process does,
and shard the training batch by global rank."""
import json
import socket
import subprocess
import sys

import pytest

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
