"""The evaluator's own logic: DDP padding removal and which metrics each role set yields."""
import pytest
import torch

from callbacks.evaluation import EmbeddingEvaluator, deduplicate


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
    assert seen == {"val/knn_top1": 0.0, "val/recall@1": 0.0}
    # query -> gallery (In-Shop): no self exclusion, the nearest gallery item decides
    gallery = (unit((1, 0.1), (0.1, 1)), torch.tensor([0, 0]))
    assert evaluator.score({"query": (query, query_t), "gallery": gallery}) == {"val/recall@1": 50.0}


def test_nmi_normalisation_is_checked():
    with pytest.raises(ValueError, match="arithmetic or geometric"):
        EmbeddingEvaluator(nmi_average="max")
