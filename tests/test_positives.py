"""ISIF's nearest-neighbour positives (CUB, docs/methods/isif.md)."""
import lightning as L
import numpy as np
import torch

from callbacks.positives import NearestNeighbourPositives, draw_partners
from datamodules.base import MultiViewDataset, Records
from datamodules.digits import DigitsDataModule
from datamodules.transforms import build_transform
from embedding_core.distances import l2_normalize
from lightning_modules.isif import ISIF


def test_draw_partners_extremes():
    neighbour = torch.tensor([2, 0, 1])
    g = torch.Generator().manual_seed(0)
    assert draw_partners(neighbour, 1.0, g).tolist() == [2, 0, 1]
    assert draw_partners(neighbour, 0.0, g).tolist() == [0, 1, 2]


def test_the_second_view_comes_from_the_partner_image():
    images = np.stack([np.full((4, 4), v, dtype=np.uint8) for v in (0, 100, 200)])
    plain = build_transform("plain", 4, (0.0,), (1.0,))
    data = MultiViewDataset(Records(images, np.zeros(3, dtype=np.int64)), plain, 2, partners=np.array([2, 1, 0]))
    views = data[0]["views"]
    assert views[0].max().item() == 0.0  # the image itself
    assert abs(views[1].max().item() - 200 / 255) < 1e-6  # its partner, image 2
    assert torch.equal(data[1]["views"][0], data[1]["views"][1])  # partner = itself: two views of it


def test_fit_hands_the_datamodule_nearest_neighbours():
    L.seed_everything(0)
    model = ISIF(backbone="small_cnn", in_chans=1, embedding_dim=16)
    data = DigitsDataModule(batch_size=64, protocol="unseen")
    callback = NearestNeighbourPositives(probability=1.0)
    trainer = L.Trainer(max_epochs=1, limit_train_batches=1, limit_val_batches=0, num_sanity_val_steps=0,
                        callbacks=[callback], logger=False, enable_progress_bar=False,
                        enable_checkpointing=False, accelerator="cpu")
    # the partners for epoch 0 come from the untrained network: compute them independently first
    data.setup()
    model.eval()
    with torch.no_grad():
        images = torch.cat([b["image"] for b in data.train_eval_dataloader()])
        f = l2_normalize(model.trunk(images))
    sims = f @ f.T
    sims.fill_diagonal_(-2)
    expected = sims.argmax(1).numpy()
    trainer.fit(model, data)
    assert data.positive_partners is not None
    first = data.positive_partners  # set at fit start; with max_epochs=1 no later refresh
    assert (first == expected).mean() > 0.99  # ties aside, the exact nearest neighbour
    assert data._train_set.partners is first
