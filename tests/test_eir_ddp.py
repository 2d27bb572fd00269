"""EIR's memory bank under real 2-process DDP (gloo): each step every rank writes the global batch (both
ranks' indices and view-1 features, gathered), each row once, with the momentum rule; the banks of the two
ranks start and stay identical."""
import subprocess
import sys

import torch
import torch.nn.functional as F

MOMENTUM = 0.5  # EIR's default memory_momentum


def test_each_bank_row_is_written_once_per_step_and_both_ranks_hold_one_bank(tmp_path):
    subprocess.run([sys.executable, "-m", "tests.ddp_eir", "--out", str(tmp_path)], check=True, timeout=300)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 2  # two steps
    for step in range(2):
        r0, r1 = ranks[0][step], ranks[1][step]
        torch.testing.assert_close(r0["before"], r1["before"], atol=0, rtol=0)
        torch.testing.assert_close(r0["after"], r1["after"], atol=0, rtol=0)
        index = torch.cat([r0["index"], r1["index"]])
        feats = torch.cat([r0["feats"], r1["feats"]])
        assert len(index) == 32 and len(index.unique()) == 32  # the global batch, split 16 + 16
        expected = r0["before"].clone()
        expected[index] = F.normalize(MOMENTUM * r0["before"][index] + (1 - MOMENTUM) * feats, dim=1)
        torch.testing.assert_close(r0["after"], expected, atol=1e-6, rtol=0)
        untouched = torch.ones(len(expected), dtype=torch.bool)
        untouched[index] = False
        assert torch.equal(r0["after"][untouched], r0["before"][untouched])
    torch.testing.assert_close(ranks[0][1]["before"], ranks[0][0]["after"], atol=0, rtol=0)
