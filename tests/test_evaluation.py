"""The evaluator's own logic: DDP padding removal and which metrics each role set yields."""
import lightning as L
import pytest
import torch

from callbacks.evaluation import EmbeddingEvaluator
from datamodules.digits import DigitsDataModule
from embedding_core import metrics
from embedding_core.distributed import deduplicate
from lightning_modules.isif import ISIF


def test_deduplicate_drops_sampler_padding_and_sorts_by_index():
    # 2 ranks, 5 items: rank 0 got indices 0,2,4 and rank 1 got 1,3 plus 0 again as padding
    index = torch.tensor([0, 2, 4, 1, 3, 0])
    emb = index.float().unsqueeze(1) * 10
    target = index % 2
    e, t, i = deduplicate(emb, target, index)
    assert i.tolist() == [0, 1, 2, 3, 4]
    assert e.squeeze(1).tolist() == [0, 10, 20, 30, 40]
    assert t.tolist() == [0, 1, 0, 1, 0]


def unit(*rows):
    return torch.nn.functional.normalize(torch.tensor(rows, dtype=torch.float32), dim=1)


def test_roles_select_the_metrics():
    evaluator = EmbeddingEvaluator(recall_ks=[1], knn_k=1, nmi=False)
    query, query_t = unit((1, 0), (0, 1)), torch.tensor([0, 1])
    # seen protocol: kNN against the reference; the query's leave-one-out R@1 is 0 (no positives)
    seen = evaluator.score({"reference": (unit((1, 0.1), (0.1, 1)), torch.tensor([1, 0])), "query": (query, query_t)})
    # (no query has a positive among the others: MAP@R has no query to average and reports 0)
    assert seen == {"val/knn_top1": 0.0, "val/recall@1": 0.0, "val/map@r": 0.0, "val/r_precision": 0.0}
    # query -> gallery (In-Shop): no self exclusion, the nearest gallery item decides
    gallery = (unit((1, 0.1), (0.1, 1)), torch.tensor([0, 0]))
    # MAP@R: only query 0 has class-0 items in the gallery (R = 2, both ranked first)
    assert evaluator.score({"query": (query, query_t), "gallery": gallery}) == {
        "val/recall@1": 50.0, "val/map@r": 100.0, "val/r_precision": 100.0}


def test_nmi_options_are_checked():
    with pytest.raises(ValueError, match="arithmetic or geometric"):
        EmbeddingEvaluator(nmi_average="max")
    with pytest.raises(ValueError, match="use true .*, false, or last"):
        EmbeddingEvaluator(nmi="first")


def test_both_nmi_normalisations_come_from_one_clustering():
    # near-uniform points, 6 classes, one k-means run: another clustering would give other labels, so the
    # logged pair must equal both normalisations of the seeded clustering itself.
    g = torch.Generator().manual_seed(0)
    emb = torch.nn.functional.normalize(torch.randn(60, 4, generator=g), dim=1)
    target = torch.arange(6).repeat(10)
    evaluator = EmbeddingEvaluator(recall_ks=[], nmi_average="geometric", kmeans_restarts=1, seed=3,
                                   backend="torch")
    scores = evaluator.score({"query": (emb, target)})
    clusters = metrics.kmeans_clusters(emb, target, seed=3, restarts=1, backend="torch")
    assert scores == pytest.approx({
        "val/nmi": metrics.nmi_from_labels(target, clusters, "geometric"),
        "val/nmi_geometric": metrics.nmi_from_labels(target, clusters, "geometric"),
        "val/nmi_arithmetic": metrics.nmi_from_labels(target, clusters, "arithmetic"),
    })
    assert scores["val/nmi_arithmetic"] != pytest.approx(scores["val/nmi_geometric"])
    # the hand-computed labelling (test_metrics): clusters [0, 0, 0, 1] for classes [0, 0, 1, 1]
    four = unit((10, 0), (10, 0.1), (10, -0.1), (0, 10)), torch.tensor([0, 0, 1, 1])
    assert EmbeddingEvaluator(recall_ks=[], kmeans_restarts=1).score({"query": four}) == pytest.approx(
        {"val/nmi": 34.3711, "val/nmi_arithmetic": 34.3711, "val/nmi_geometric": 34.5592}, abs=1e-3)


class Keys(L.Callback):
    """The metric names the evaluator (the callback before this one) stored at each validation."""

    def __init__(self, evaluator: EmbeddingEvaluator):
        self.evaluator, self.seen = evaluator, []

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self.seen.append(set(self.evaluator.latest))


def fit_digits(evaluator: EmbeddingEvaluator, **trainer_args) -> Keys:
    L.seed_everything(0)
    keys = Keys(evaluator)
    trainer = L.Trainer(limit_train_batches=2, num_sanity_val_steps=-1, callbacks=[evaluator, keys], logger=False,
                        enable_progress_bar=False, enable_checkpointing=False, accelerator="cpu", **trainer_args)
    trainer.fit(ISIF(backbone="small_cnn", in_chans=1, embedding_dim=16), DigitsDataModule(batch_size=32))
    return keys


def test_nmi_last_runs_in_the_random_init_pass_and_the_last_epoch_only():
    evaluator = EmbeddingEvaluator(knn_k=20, nmi="last", kmeans_restarts=1)
    keys = fit_digits(evaluator, max_epochs=3)
    nmi = {"val/nmi", "val/nmi_arithmetic", "val/nmi_geometric"}
    assert nmi <= set(evaluator.initial)
    assert [bool(nmi & k) for k in keys.seen] == [False, False, True]
    assert nmi <= set(evaluator.latest) and nmi <= set(evaluator.best)
    assert "val/knn_top1" in keys.seen[0]


def test_nmi_last_needs_a_validation_at_the_last_epoch():
    with pytest.raises(ValueError, match="max_epochs 3 is not a multiple of check_val_every_n_epoch 2"):
        fit_digits(EmbeddingEvaluator(nmi="last"), max_epochs=3, check_val_every_n_epoch=2)
