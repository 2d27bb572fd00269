"""`make train METHOD=isif DATASET=digits` at the learning tests' budget must end above both floors a plain
network reaches without learning: its random init and the same run stopped after one training step."""
from tests.learning import assert_gains, best_of, one_step_run

# One training step lifts ISIF well above its random init (`python -m experiments.seeds --methods isif --budget
# one_step`, seeds 0-4: kNN top-1 78.1-81.9 against 69.7-73.1, NMI 55.7-63.2 against 34.4-44.6). The test
# budget's gains over max(random init, one step) (`--budget test`), seeds 0-4: kNN top-1 +12.8 / +16.9 / +13.1 /
# +9.8 / +15.0, NMI +7.8 / +19.1 / +9.8 / +5.2 / +10.6
MARGINS = {"val/knn_top1": 5.0, "val/nmi": 3.0}


def test_isif_on_digits_beats_its_random_init_and_its_first_step(tmp_path, isif_digits_run):
    first_step = one_step_run(tmp_path / "one_step", "isif")["final"]
    assert_gains(isif_digits_run["final"], best_of(isif_digits_run["initial"], first_step), MARGINS)
