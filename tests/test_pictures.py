import importlib.util
import json

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image

from callbacks import pictures
from callbacks.pictures import Pictures, draw_discoveries, map_method, spread_sample, top_k_neighbours
from datamodules.digits import DigitsDataModule
from lightning_modules.isif import ISIF

pytestmark = pytest.mark.usefixtures("one_thread")


def png_size(path) -> tuple[int, int]:
    assert path.stat().st_size > 1000  # a real picture, not an empty file
    with Image.open(path) as image:
        assert image.format == "PNG"
        return image.size


def test_the_callback_writes_the_map_and_the_retrieval_grid(tmp_path):
    L.seed_everything(0)
    callback = Pictures(map_method="tsne", max_points=200, num_queries=4, top_k=5)
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, limit_train_batches=1, num_sanity_val_steps=0,
                        callbacks=[callback], logger=False, enable_progress_bar=False, enable_checkpointing=False,
                        enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(ISIF(backbone="small_cnn", in_chans=1, embedding_dim=16), DigitsDataModule(num_workers=0))
    assert sorted(p.name for p in (tmp_path / "pictures").iterdir()) == ["map-epoch000.png",
                                                                         "retrieval-epoch000.png"]
    assert png_size(tmp_path / "pictures" / "map-epoch000.png") == (600, 600)  # 6 x 6 inches at 100 dpi
    assert png_size(tmp_path / "pictures" / "retrieval-epoch000.png") == (600, 430)  # (1 + 5) x 4 cells


def test_the_discovery_picture_of_a_semi_run(tmp_path):
    history = [{"generation": 1, "iteration": 1, "count": 50, "error": 4.0},
               {"generation": 1, "iteration": 2, "count": 100, "error": 6.5},
               {"generation": 2, "iteration": 1, "count": 200, "error": None}]
    assert png_size(draw_discoveries(history, tmp_path / "d.png")) == (600, 400)
    (tmp_path / "discovery.json").write_text(json.dumps(history))  # what ConfidentSampleDiscovery writes

    class Trainer:  # the two attributes discovery_history reads
        callbacks, default_root_dir = [], str(tmp_path)
    assert pictures.discovery_history(Trainer()) == history


def test_umap_when_importable_else_tsne(monkeypatch):
    assert map_method("auto") == ("umap" if importlib.util.find_spec("umap") else "tsne")
    assert map_method("tsne") == "tsne"
    monkeypatch.setattr(pictures.importlib.util, "find_spec", lambda name: None)  # umap-learn not installed
    assert map_method("auto") == "tsne"
    with pytest.raises(ImportError, match="tsne"):
        map_method("umap")
    with pytest.raises(ValueError, match="auto, umap or tsne"):
        Pictures(map_method="pca")


def test_neighbours_and_the_sample_spread_over_classes():
    x = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.1, 1.0], [-1.0, 0.0]])
    assert top_k_neighbours(x, x, 2, same_set=True).tolist() == [[1, 2], [0, 2], [1, 0], [2, 1]]
    assert top_k_neighbours(x[:1], x, 1, same_set=False).tolist() == [[0]]
    target = np.array([0, 0, 0, 0, 1, 1, 2])
    picked = spread_sample(target, 3)
    assert sorted(target[picked].tolist()) == [0, 1, 2]
    assert len(spread_sample(target, 100)) == 7


def test_the_discovered_images_with_the_labels_they_were_given(tmp_path):
    dm = DigitsDataModule(num_workers=0)
    dm.setup()
    truth = np.asarray(dm.splits["train"].targets)
    index = np.arange(40, 80)
    given = truth[index].copy()
    given[:3] = (given[:3] + 1) % 10  # three wrong labels
    discovery = {"generation": 1, "iteration": 1, "index": index.tolist(), "label": given.tolist(), "error": 7.5}
    callback = Pictures(num_discovered=12)
    images, labels, true = callback.discovered_samples(dm, discovery)
    assert len(images) == 12 and images[0].shape == (8, 8)
    shown = spread_sample(given, 12)  # positions in the discovery, spread over the labels given
    assert labels.tolist() == given[shown].tolist() and true.tolist() == truth[index[shown]].tolist()

    class Trainer:
        datamodule = dm
    path = callback.draw_discovered(Trainer(), discovery, tmp_path / "discovered.png")
    assert png_size(path) == (800, 280)  # 8 columns x 2 rows of 1.25-inch cells (image and title) + the title
