"""`make bench` runs end to end at its quick sizes and its tables hold what they claim (no timing is
asserted: timings live in the benchmark's output, never in a test)."""
import re

from experiments.bench import SECTIONS


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


def test_evaluation_section_implementations_agree():
    text = SECTIONS["evaluation"](True)
    rows = [r for r in table_rows(text, "CUB-quick") + table_rows(text, "SOP-quick")
            if r[2] in ("kNN top-1", "Recall@K")]
    assert len(rows) == 4
    for row in rows:
        ours, faiss, torch = row[-1].split(" / ")
        assert ours == faiss == torch, row
        assert re.fullmatch(r"[\d.,]+", ours)
