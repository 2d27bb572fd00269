"""Pictures of a run: a 2-D map of the test embeddings coloured by class, a retrieval grid (queries and their
top-K, right in green, wrong in red) and, for semi-supervised runs, the samples each discovery added with
their wrong-label rate and the latest discovery's images with the labels they were given. PNGs under
`<run dir>/pictures/`, logged to W&B as images when it is a logger. `experiments.train` adds the callback to
every run (`--run.pictures=false` to leave it out).

The map is UMAP when umap-learn is installed (the `pictures` extra), else scikit-learn's t-SNE, on at most
`max_points` images spread over the classes (seconds at any dataset size). Embeddings are the evaluator's of
the same validation (gathered from every rank, padding removed), else a pass of their own
(`extract_features`); only rank 0 draws.
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import lightning as L
import matplotlib
import numpy as np
import torch
from lightning.pytorch.loggers import WandbLogger

from callbacks.evaluation import EmbeddingEvaluator, is_final_validation
from embedding_core.features import extract_features

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # after the non-interactive backend is chosen

MAP_METHODS = ("auto", "umap", "tsne")


# -- the math ----------------------------------------------------------------------------------------
def map_method(requested: str = "auto") -> str:
    """'umap' when asked for or when auto and umap-learn is importable, else 'tsne'."""
    if requested not in MAP_METHODS:
        raise ValueError(f"map method {requested!r}: use auto, umap or tsne")
    if requested == "auto":
        return "umap" if importlib.util.find_spec("umap") is not None else "tsne"
    if requested == "umap" and importlib.util.find_spec("umap") is None:
        raise ImportError("umap-learn is not installed: pip install -e '.[pictures]' or use method tsne")
    return requested


def project_2d(embedding: np.ndarray, method: str = "auto", seed: int = 0) -> np.ndarray:
    """(N, 2) coordinates of (N, d) embeddings (cosine geometry: rows are l2-normalised first)."""
    x = embedding / np.maximum(np.linalg.norm(embedding, axis=1, keepdims=True), 1e-12)
    if map_method(method) == "umap":
        import umap
        return umap.UMAP(n_components=2, metric="cosine", random_state=seed, n_jobs=1).fit_transform(x)
    from sklearn.manifold import TSNE
    return TSNE(n_components=2, perplexity=min(30.0, (len(x) - 1) / 3), init="pca", random_state=seed).fit_transform(x)


def top_k_neighbours(query: torch.Tensor, gallery: torch.Tensor, k: int, same_set: bool) -> torch.Tensor:
    """(Q, k) gallery indices by cosine similarity, most similar first; a query never retrieves itself when
    the gallery is the query set."""
    sim = torch.nn.functional.normalize(query.float(), dim=1) @ torch.nn.functional.normalize(gallery.float(), dim=1).T
    if same_set:
        sim.fill_diagonal_(-float("inf"))
    return sim.topk(min(k, sim.shape[1] - int(same_set)), dim=1).indices


def spread_sample(target: np.ndarray, count: int, seed: int = 0) -> np.ndarray:
    """`count` indices spread over the classes (round robin over a seeded shuffle of each class)."""
    rng = np.random.default_rng(seed)
    pools = [list(rng.permutation(np.flatnonzero(target == c))) for c in np.unique(target)]
    picked: list[int] = []
    while len(picked) < min(count, len(target)):
        for pool in pools:
            if pool and len(picked) < count:
                picked.append(int(pool.pop()))
    return np.array(sorted(picked))


def displayable(image: torch.Tensor) -> np.ndarray:
    """A normalised CxHxW tensor as an HxW(x3) array in [0, 1] (min-max per image)."""
    x = image.float().cpu()
    x = (x - x.min()) / (x.max() - x.min()).clamp_min(1e-8)
    return x[0].numpy() if x.shape[0] == 1 else x.permute(1, 2, 0).numpy()


# -- drawing -----------------------------------------------------------------------------------------
def draw_map(points: np.ndarray, target: np.ndarray, path: Path, title: str, size: tuple[float, float] = (6, 6),
             dpi: int = 100) -> Path:
    """Scatter of the 2-D points coloured by class; a PNG of exactly size x dpi pixels."""
    fig, ax = plt.subplots(figsize=size, dpi=dpi)
    classes = np.unique(target)
    cmap = plt.get_cmap("tab10" if len(classes) <= 10 else "tab20")
    for i, c in enumerate(classes):
        keep = target == c
        ax.scatter(points[keep, 0], points[keep, 1], s=6, color=cmap(i % cmap.N), label=str(c) if len(classes) <= 20
                   else None)
    if len(classes) <= 20:
        ax.legend(markerscale=2, fontsize=7, loc="best", frameon=False)
    ax.set_title(title, fontsize=9)
    ax.set_xticks([]), ax.set_yticks([])
    return _save(fig, path)


def draw_retrieval(queries: list[np.ndarray], retrieved: list[list[np.ndarray]], correct: np.ndarray, path: Path,
                   title: str, cell: float = 1.0, dpi: int = 100) -> Path:
    """Rows: a query (blue frame) then its top-K, each framed green (same class) or red (another class)."""
    rows, k = len(queries), len(retrieved[0])
    fig, axes = plt.subplots(rows, k + 1, figsize=(cell * (k + 1), cell * rows + 0.3), dpi=dpi, squeeze=False)
    for r in range(rows):
        for c in range(k + 1):
            ax = axes[r, c]
            image = queries[r] if c == 0 else retrieved[r][c - 1]
            ax.imshow(image, cmap="gray" if image.ndim == 2 else None)
            color = "tab:blue" if c == 0 else ("tab:green" if correct[r, c - 1] else "tab:red")
            for spine in ax.spines.values():
                spine.set_edgecolor(color)
                spine.set_linewidth(3)
            ax.set_xticks([]), ax.set_yticks([])
    fig.suptitle(title, fontsize=8)
    return _save(fig, path)


def draw_discoveries(history: list[dict], path: Path, size: tuple[float, float] = (6, 4), dpi: int = 100) -> Path:
    """Bars: images added by each discovery (generation.iteration), annotated with their wrong-label rate."""
    fig, ax = plt.subplots(figsize=size, dpi=dpi)
    names = [f"g{h['generation']}.{h['iteration']}" for h in history]
    bars = ax.bar(names, [h["count"] for h in history],
                  color=[plt.get_cmap("tab10")(h["generation"] % 10) for h in history])
    for bar, h in zip(bars, history):
        label = "-" if h.get("error") is None else f"{h['error']:.1f}% wrong"
        ax.annotate(label, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom", fontsize=7)
    ax.set_xlabel("generation.iteration")
    ax.set_ylabel("discovered images")
    ax.set_title("discovered samples per generation (wrong-label rate)", fontsize=9)
    return _save(fig, path)


def draw_discovered(images: list[np.ndarray], labels: np.ndarray, truth: np.ndarray, path: Path, title: str,
                    columns: int = 8, cell: float = 1.0, dpi: int = 100) -> Path:
    """The discovered images, each titled with the label it was given, framed green when that label is the
    true one, red (with the true one) when not, grey when the truth is hidden (< 0)."""
    rows = max(1, -(-len(images) // columns))
    fig, axes = plt.subplots(rows, columns, figsize=(cell * columns, (cell + 0.25) * rows + 0.3), dpi=dpi,
                             squeeze=False)
    for n, ax in enumerate(axes.flat):
        ax.set_xticks([]), ax.set_yticks([])
        if n >= len(images):
            ax.axis("off")
            continue
        ax.imshow(images[n], cmap="gray" if images[n].ndim == 2 else None)
        known, right = truth[n] >= 0, labels[n] == truth[n]
        color = "tab:gray" if not known else "tab:green" if right else "tab:red"
        ax.set_title(f"{labels[n]}" + ("" if not known or right else f" (is {truth[n]})"), fontsize=7, color=color)
        for spine in ax.spines.values():
            spine.set_edgecolor(color)
            spine.set_linewidth(3)
    fig.suptitle(title, fontsize=8)
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=fig.dpi)  # no bbox_inches="tight": the size stays figsize x dpi
    plt.close(fig)
    return path


# -- the callback ------------------------------------------------------------------------------------
class Pictures(L.Callback):
    """Draws the pictures at the validation that ends training and, with `every_n_epochs`, every N epochs.

    Args:
      every_n_epochs: 0 = the end of training only.
      map_method: auto (UMAP if importable, else t-SNE), umap or tsne.
      max_points: the map's points at most, spread over the classes (t-SNE on SOP's 60K would take hours).
      num_queries, top_k: the retrieval grid's rows and columns. Queries come from the `query` role and
        retrieve from `gallery` (In-Shop), else `reference` (seen protocol), else the other queries.
    """

    def __init__(self, every_n_epochs: int = 0, map_method: str = "auto", max_points: int = 1000,
                 num_queries: int = 8, top_k: int = 8, seed: int = 0, num_discovered: int = 24):
        if map_method not in MAP_METHODS:
            raise ValueError(f"map_method {map_method!r}: use auto, umap or tsne")
        if every_n_epochs < 0 or num_queries < 1 or top_k < 1 or max_points < 2:
            raise ValueError("every_n_epochs >= 0, num_queries >= 1, top_k >= 1, max_points >= 2")
        self.every_n_epochs, self.map_method, self.max_points = every_n_epochs, map_method, max_points
        self.num_queries, self.top_k, self.seed = num_queries, top_k, seed
        self.num_discovered = num_discovered
        self.written: list[Path] = []

    def due(self, trainer) -> bool:
        if trainer.sanity_checking:
            return False
        if is_final_validation(trainer):
            return True
        return bool(self.every_n_epochs) and (trainer.current_epoch + 1) % self.every_n_epochs == 0

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if not self.due(trainer):
            return
        roles = trainer.datamodule.eval_roles
        loaders = dict(zip(roles, trainer.val_dataloaders))
        features = self.features(trainer, pl_module, loaders)
        if not trainer.is_global_zero:
            return
        folder = Path(trainer.default_root_dir, "pictures")
        epoch = trainer.current_epoch
        paths = {"map": self.draw_map(features["query"], folder / f"map-epoch{epoch:03d}.png", epoch),
                 "retrieval": self.draw_retrieval(loaders, features, folder / f"retrieval-epoch{epoch:03d}.png",
                                                  epoch)}
        history = discovery_history(trainer)
        if history:
            paths["discovery"] = draw_discoveries(history, folder / f"discovery-epoch{epoch:03d}.png")
            if "index" in history[-1]:  # discovery.json files from before the indices were kept have none
                paths["discovered"] = self.draw_discovered(trainer, history[-1],
                                                           folder / f"discovered-epoch{epoch:03d}.png")
        self.written += list(paths.values())
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                for key, path in paths.items():
                    logger.log_image(key=f"pictures/{key}", images=[str(path)], step=trainer.global_step)

    @staticmethod
    def features(trainer, pl_module, loaders: dict) -> dict:
        """{role: (embedding, target, index)}: the evaluator's embeddings of this validation when there is one
        (no second pass over the eval sets), else a pass of their own (semi runs score logits)."""
        evaluator = next((c for c in trainer.callbacks if isinstance(c, EmbeddingEvaluator)), None)
        if evaluator is not None and evaluator.has_embeddings(len(loaders)):
            return {role: evaluator.embeddings(pl_module, i) for i, role in enumerate(loaders)}
        return {role: extract_features(pl_module, loader) for role, loader in loaders.items()}

    def discovered_samples(self, datamodule, discovery: dict) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
        """(images, labels given, true labels) of up to num_discovered images of a discovery (`history` entry:
        training-split `index` and `label`), spread over the labels given."""
        index, labels = np.asarray(discovery["index"]), np.asarray(discovery["label"])
        picked = spread_sample(labels, self.num_discovered, self.seed)
        dataset = datamodule.train_eval_dataloader(reveal_targets=True).dataset
        items = [dataset[int(index[p])] for p in picked]
        return ([displayable(item["image"]) for item in items], labels[picked],
                np.array([int(item["target"]) for item in items]))

    def draw_discovered(self, trainer, discovery: dict, path: Path) -> Path:
        images, labels, truth = self.discovered_samples(trainer.datamodule, discovery)
        wrong = "" if discovery.get("error") is None else f", {discovery['error']:.1f}% of all wrong"
        return draw_discovered(images, labels, truth, path,
                               f"discovery g{discovery['generation']}.{discovery['iteration']}: {len(images)} of "
                               f"{len(discovery['index'])} images with the label each was given (red: wrong, the "
                               f"true one in brackets){wrong}")

    def draw_map(self, query, path: Path, epoch: int) -> Path:
        embedding, target, _ = query
        target = target.cpu().numpy()
        keep = spread_sample(target, self.max_points, self.seed)
        method = map_method(self.map_method)
        points = project_2d(embedding[keep].cpu().numpy(), method, self.seed)
        return draw_map(points, target[keep], path, f"test embeddings, epoch {epoch + 1} ({method}, "
                                                    f"{len(keep)} of {len(target)} images)")

    def draw_retrieval(self, loaders: dict, features: dict, path: Path, epoch: int) -> Path:
        gallery_role = next((r for r in ("gallery", "reference") if r in features), "query")
        q_emb, q_target, q_index = features["query"]
        g_emb, g_target, g_index = features[gallery_role]
        rows = spread_sample(q_target.cpu().numpy(), self.num_queries, self.seed)
        ranks = top_k_neighbours(q_emb[rows], g_emb, self.top_k, same_set=gallery_role == "query")
        correct = (g_target[ranks] == q_target[rows, None]).cpu().numpy()
        q_set, g_set = loaders["query"].dataset, loaders[gallery_role].dataset
        queries = [displayable(q_set[int(q_index[r])]["image"]) for r in rows]
        retrieved = [[displayable(g_set[int(g_index[j])]["image"]) for j in line] for line in ranks.tolist()]
        return draw_retrieval(queries, retrieved, correct, path,
                              f"epoch {epoch + 1}: query (blue) -> top {ranks.shape[1]} from {gallery_role} "
                              f"(green right, red wrong); top-1 right {100 * correct[:, 0].mean():.0f}%")


def discovery_history(trainer) -> list[dict]:
    """The discoveries of a semi-supervised run (a discovery callback's `history`), else []."""
    for callback in trainer.callbacks:
        history = getattr(callback, "history", None)
        if isinstance(history, list) and history and "generation" in history[0]:
            return history
    path = Path(trainer.default_root_dir, "discovery.json")
    return json.loads(path.read_text()) if path.is_file() else []
