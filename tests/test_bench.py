"""`make bench` runs end to end at its quick sizes and its tables hold what they claim (no timing is
asserted: timings live in the benchmark's output, never in a test)."""
import re

from experiments.bench import SECTIONS, StepSize, gemm_floor, machine, main, step_rates


def table_rows(text: str, first_cell: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines()
            if line.startswith(f"| {first_cell}")]


def test_umm_section_times_isif_and_every_k_with_memory():
    text = SECTIONS["umm"](True)
    rows = table_rows(text, "UMM")
    assert [r[1] for r in rows] == ["1", "5", "50"]
    assert [r[2] for r in rows] == ["128", "640", "6,400"]  # 2nk candidates at n = 64
    (isif,) = table_rows(text, "ISIF")
    for row in [isif, *rows]:
        assert float(row[3]) > 0 and float(row[5]) >= 0  # images/s, peak MiB
    chunked = table_rows(text, "400")
    assert len(chunked) == 1 and float(chunked[0][1]) > 0


def test_tac_ccl_section_compares_faiss_with_scikit_learn_and_times_both_models():
    text = SECTIONS["tac_ccl"](True)
    assert len(table_rows(text, "faiss")) == 2 and len(table_rows(text, "scikit-learn")) == 2
    (digits,) = table_rows(text, "digits")
    assert float(digits[2]) > 0 and float(digits[3]) > 0


def test_evaluation_section_implementations_agree(capsys):
    main(["--only", "evaluation", "--quick"])
    text = capsys.readouterr().out
    assert text.startswith(f"## make bench --quick: {machine()[:-len('2026-01-01 00:00 UTC')]}")  # once, on top
    rows = [r for r in table_rows(text, "CUB-quick") + table_rows(text, "SOP-quick")
            if r[2] in ("kNN top-1", "Recall@K")]
    assert len(rows) == 4
    for row in rows:
        ours, faiss, torch = row[-1].split(" / ")
        assert ours == faiss == torch, row
        assert re.fullmatch(r"[\d.,]+", ours)
    floor_rows = [r for r in table_rows(text, "3,000 x 128") + table_rows(text, "6,000 x 128") if len(r) == 6]
    assert len(floor_rows) == 2
    (busy,) = [r for r in table_rows(text, "3,000 x 128") if len(r) == 7]  # quiet and beside a busy process
    assert all(float(v) > 0 for v in busy[1:])
    for o, f, ratio in ((float(busy[1]), float(busy[2]), float(busy[3])), (float(busy[4]), float(busy[5]),
                                                                          float(busy[6]))):
        half = 0.005
        assert (o - half) / (f + half) - half <= ratio <= (o + half) / max(f - half, 1e-9) + half
    for _, ours, floor, ratio, faiss, faiss_ratio in floor_rows:
        assert float(floor) > 0 and float(ours) > 0 and float(faiss) > 0
        o, f, half = float(ours), float(floor), 0.005  # the seconds are printed to 2 decimals
        assert (o - half) / (f + half) - half <= float(ratio) <= (o + half) / max(f - half, 1e-9) + half


def test_machine_names_cpu_cores_and_gpu():
    assert re.fullmatch(r".+, \d+ CPU cores; (no GPU|\d+ x .+ \(\d+ GiB\)); host .*; \d{4}-\d\d-\d\d \d\d:\d\d UTC",
                        machine())


def test_gemm_floor_writes_every_tile_of_the_similarity_matrix(monkeypatch):
    # The floor must do the whole N x N product: record every tile's rows and columns.
    import torch

    seen = []
    real_mm = torch.mm
    monkeypatch.setattr(torch, "mm", lambda a, b, out: seen.append((a.shape[0], b.shape[1])) or real_mm(a, b, out=out))
    gemm_floor(torch.randn(10, 4), rows=4, cols=3)
    assert sum(r * c for r, c in seen) == 100 and len(seen) == 3 * 4


def test_kmeans_section_times_each_seeding_with_lloyd_and_scores_it_like_scikit_learn():
    text = SECTIONS["kmeans"](True)
    for name, k in (("CUB-quick", 20), ("SOP-quick", 200)):
        rows = table_rows(text, name)
        assert [r[2].split(" (")[0].split(" + ")[0] for r in rows] == [
            "random points", "k-means++, plain", "greedy k-means++", "scikit-learn"]
        assert f"K={k}" in rows[0][1]
        for _, _, _, seeding, lloyd, total, inertia, nmi in rows:
            assert float(seeding) >= 0 and float(lloyd) >= 0 and float(inertia) > 0
            assert abs(float(seeding) + float(lloyd) - float(total)) <= 0.011  # printed to 2 decimals
            assert 0 < float(nmi) <= 100


def test_cpu_step_variants_time_their_own_switch():
    """Each variant's step runs its switch (no timing asserted): the first step and the median are timed."""
    rates = step_rates(StepSize("small_cnn", 8, 4, rounds=1, budget=1), ("bare fp32", "channels_last",
                                                                          "bf16 autocast"))
    assert set(rates) == {"bare fp32", "channels_last", "bf16 autocast"}
    assert all(r["first"] > 0 and r["step"] > 0 for r in rates.values())


def test_gpu_check_fails_on_any_path_that_ran_on_the_cpu():
    import subprocess

    import torch

    from experiments import gpu_check

    on_gpu = {"step bf16 autocast": torch.device("cuda", 0), "k-means labels": torch.device("cuda", 0),
              "faiss": "faiss 1.9.0, GPU build (faiss-gpu-cu12), 1 GPU(s) visible"}
    assert gpu_check.cpu_fallbacks(on_gpu) == []
    fell_back = {**on_gpu, "resident images": torch.device("cpu"), "faiss": "faiss 1.9.0, CPU build (faiss-cpu)"}
    assert sorted(gpu_check.cpu_fallbacks(fell_back)) == ["faiss: faiss 1.9.0, CPU build (faiss-cpu)",
                                                          "resident images ran on cpu"]
    two_copies = {"faiss": "faiss 1.9.0, GPU build (faiss-gpu-cu12); WARNING: 2 faiss distributions ..."}
    assert len(gpu_check.cpu_fallbacks(two_copies)) == 1
    assert subprocess.run(["bash", "-n", "experiments/gpu_check.sh"], check=False).returncode == 0
    if not torch.cuda.is_available():
        assert gpu_check.main() == 2  # no GPU: refused, not a CPU run that passes
