"""Linear evaluation on frozen features: a linear probe (`val/linear_top1`) and a linear SVM (`val/svm_top1`).

Both fit on the labelled `reference` role (seen protocol: the labelled train split through the eval
transform) and score the `query` role, on features gathered from every rank with the sampler's padding
removed by index (`extract_features`), so N processes report what one process reports. The fit runs on
rank 0 and its accuracy is broadcast. They run in the random-init pass (`initial`), at the validation
that ends training (`final`) and, with `every_n_epochs`, every N epochs.

features: "embedding" (the evaluated embedding, e.g. ISIF's 128-d l2-normalised vector) or "backbone" (the
pooled trunk output before the head: MoCo's frozen-backbone probe, ISIF's pooled conv5 features).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
from lightning.pytorch.trainer.states import TrainerFn
from sklearn.model_selection import GridSearchCV
from sklearn.svm import LinearSVC
from torch import nn

from callbacks.evaluation import Scoreboard, is_final_validation
from embedding_core.features import extract_features

FEATURES = ("embedding", "backbone")


# -- the math: tensors in, accuracy (%) out -----------------------------------------------------------
def top1(predicted: torch.Tensor | np.ndarray, target: torch.Tensor | np.ndarray) -> float:
    return 100.0 * float((np.asarray(predicted) == np.asarray(target)).mean())


def fit_linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, num_classes: int, epochs: int = 100,
                     lr: float = 30.0, momentum: float = 0.9, weight_decay: float = 0.0,
                     milestones: Sequence[int] = (60, 80), batch_size: int = 256, seed: int = 0) -> nn.Linear:
    """A Linear(d, C) trained by SGD with cross-entropy on fixed features; lr x0.1 at each milestone
    (MoCo's probe recipe by default). Seeded: the same features give the same layer."""
    generator = torch.Generator().manual_seed(seed)
    layer = nn.Linear(train_x.shape[1], num_classes)
    with torch.no_grad():
        bound = 1.0 / train_x.shape[1] ** 0.5
        layer.weight.uniform_(-bound, bound, generator=generator)
        layer.bias.zero_()
    layer = layer.to(train_x.device)
    optimizer = torch.optim.SGD(layer.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, list(milestones), gamma=0.1)
    for _ in range(epochs):
        order = torch.randperm(len(train_x), generator=generator).to(train_x.device)
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            loss = nn.functional.cross_entropy(layer(train_x[rows]), train_y[rows])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        scheduler.step()
    return layer


def linear_probe_top1(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                      **recipe) -> float:
    """Top-1 (%) on the test features of a linear probe fitted on the train features."""
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    with torch.inference_mode(False), torch.enable_grad():  # called inside Lightning's validation loop
        train_x, train_y = train_x.float().clone(), train_y.long().clone()
        layer = fit_linear_probe(train_x, train_y, num_classes, **recipe)
        with torch.no_grad():
            predicted = layer(test_x.float().clone()).argmax(1)
    return top1(predicted.cpu(), test_y.cpu())


def linear_svm_top1(train_x, train_y, test_x, test_y, c: float | Sequence[float] = 1.0, folds: int = 5,
                    seed: int = 0) -> float:
    """Top-1 (%) of scikit-learn's LinearSVC (squared hinge, one-vs-rest); with several `c`, the one chosen
    by `folds`-fold cross-validation on the train features."""
    train_x, test_x = (np.asarray(torch.as_tensor(x).float().cpu()) for x in (train_x, test_x))
    train_y, test_y = (np.asarray(torch.as_tensor(y).cpu()) for y in (train_y, test_y))
    svm = LinearSVC(C=1.0, random_state=seed, max_iter=10_000)
    cs = [float(c)] if isinstance(c, int | float) else [float(v) for v in c]
    if len(cs) == 1:
        model = svm.set_params(C=cs[0]).fit(train_x, train_y)
    else:
        model = GridSearchCV(svm, {"C": cs}, cv=folds).fit(train_x, train_y)
    return top1(model.predict(test_x), test_y)


# -- the callbacks --------------------------------------------------------------------------------
class LinearEvaluator(Scoreboard):
    """The schedule and the feature extraction the two linear evaluations share; `fit_score` is theirs."""

    metric = ""

    def __init__(self, features: Literal["embedding", "backbone"] = "embedding", every_n_epochs: int = 0,
                 initial: bool = True, train_role: str = "reference", test_role: str = "query"):
        super().__init__()
        if features not in FEATURES:
            raise ValueError(f"features {features!r}: use embedding (the evaluated embedding) or backbone (the "
                             "pooled trunk output)")
        if every_n_epochs < 0:
            raise ValueError(f"every_n_epochs {every_n_epochs}: use 0 (end of training only) or N > 0")
        self.features, self.every_n_epochs, self.run_initial = features, every_n_epochs, initial
        self.train_role, self.test_role = train_role, test_role

    def fit_score(self, train_x, train_y, test_x, test_y) -> float:
        raise NotImplementedError

    def due(self, trainer) -> bool:
        """The random-init pass (if `initial`), the last validation of training, every N epochs if asked,
        and any validation outside fit (trainer.validate)."""
        if trainer.sanity_checking:
            return self.run_initial
        if trainer.state.fn != TrainerFn.FITTING or is_final_validation(trainer):
            return True
        return bool(self.every_n_epochs) and (trainer.current_epoch + 1) % self.every_n_epochs == 0

    def forward_fn(self, pl_module):
        if self.features == "embedding":
            return pl_module.embed
        trunk = getattr(pl_module, "trunk", None)
        if trunk is None:
            raise ValueError(f"{type(pl_module).__name__} has no `trunk`: use features=embedding")
        return trunk

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if not self.due(trainer):
            return
        roles = trainer.datamodule.eval_roles
        for role in (self.train_role, self.test_role):
            if role not in roles:
                raise ValueError(f"{type(self).__name__} fits on the {self.train_role!r} role and scores "
                                 f"{self.test_role!r}; this protocol has {roles}: use --data.protocol=seen")
        forward = self.forward_fn(pl_module)
        train_x, train_y, _ = extract_features(pl_module, trainer.val_dataloaders[roles.index(self.train_role)],
                                               forward)
        test_x, test_y, _ = extract_features(pl_module, trainer.val_dataloaders[roles.index(self.test_role)],
                                             forward)
        score = self.fit_score(train_x, train_y, test_x, test_y) if trainer.is_global_zero else 0.0
        score = float(trainer.strategy.broadcast(score, src=0))
        self.record(trainer, pl_module, lambda: {self.metric: score}, complete=True)


class LinearProbe(LinearEvaluator):
    """`val/linear_top1`: a Linear layer trained by SGD on frozen features (defaults: MoCo's probe recipe [R],
    docs/methods/umm.md; on precomputed eval-transform features, without the probe's crop augmentation)."""

    metric = "val/linear_top1"

    def __init__(self, epochs: int = 100, lr: float = 30.0, momentum: float = 0.9, weight_decay: float = 0.0,
                 milestones: Sequence[int] = (60, 80), batch_size: int = 256, seed: int = 0, **kwargs):
        super().__init__(**kwargs)
        self.recipe = {"epochs": epochs, "lr": lr, "momentum": momentum, "weight_decay": weight_decay,
                       "milestones": list(milestones), "batch_size": batch_size, "seed": seed}

    def fit_score(self, train_x, train_y, test_x, test_y) -> float:
        return linear_probe_top1(train_x, train_y, test_x, test_y, **self.recipe)


class LinearSVM(LinearEvaluator):
    """`val/svm_top1`: scikit-learn's LinearSVC on frozen features (ISIF/UMM STL-10 "Linear (SVM)"); `c`
    a list: chosen by `folds`-fold cross-validation on the train features [R] (docs/methods/umm.md)."""

    metric = "val/svm_top1"

    def __init__(self, c: float | list[float] = 1.0, folds: int = 5, seed: int = 0, **kwargs):
        super().__init__(**kwargs)
        self.c, self.folds, self.seed = c, folds, seed

    def fit_score(self, train_x, train_y, test_x, test_y) -> float:
        return linear_svm_top1(train_x, train_y, test_x, test_y, c=self.c, folds=self.folds, seed=self.seed)
