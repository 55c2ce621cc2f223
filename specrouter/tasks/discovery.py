"""Task discovery: cluster a prompt corpus's embeddings into tasks, and name them.

Embeddings are standardised with the corpus's own mean and spread (a causal LM's hidden states share
a large common component) and scaled to unit length; scikit-learn's KMeans (seeded) clusters them
for each K of a small range and the K of the best silhouette is kept. A cluster is named after the
source most of its prompts came from (`code`, `chat`; `chat-2` for a second chat cluster, larger
first): the name is the request's class, so the router keeps acceptance tables per task. The task
model (centroids, standardisation, encoder name, K, names, corpus hash) is saved as JSON + npz.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

DEFAULT = "default"  # the task model the classifier loads when none is named


def tasks_root() -> Path:
    return Path(os.environ.get("SPECROUTER_CACHE", Path.home() / ".cache" / "specrouter")) / "tasks"


def task_model_path(name: str) -> Path:
    """A task model's .json: `name` in the cache (`default`: the one `specrouter tasks fit` chose), or a
    path ending in .json. ValueError if there is none."""
    path = Path(name) if name.endswith(".json") else tasks_root() / f"{name}.json"
    if not path.exists():
        raise ValueError(f"no task model at {path}: `specrouter tasks fit` makes the default one")
    return path


@dataclass(frozen=True)
class TaskModel:
    encoder: str  # encoder name (specrouter/tasks/encoders.py)
    names: tuple[str, ...]  # one per centroid
    centroids: np.ndarray  # [K, d] in the standardised, unit-norm space
    mean: np.ndarray  # [d] the corpus mean
    scale: np.ndarray  # [d] the corpus spread per dimension
    corpus_sha256: str
    seed: int
    silhouette: dict[int, float]  # K -> silhouette score
    sources: tuple[str, ...]  # one per centroid: the source most of its prompts came from

    @property
    def k(self) -> int:
        return len(self.names)

    def project(self, vectors: np.ndarray) -> np.ndarray:
        z = (vectors - self.mean) / self.scale
        return z / np.linalg.norm(z, axis=1, keepdims=True).clip(1e-8)

    def nearest(self, vectors: np.ndarray) -> list[str]:
        """The task of each row of `vectors` [n, d]: its nearest centroid's name."""
        return [name for name, _ in self.assign(vectors)]

    def assign(self, vectors: np.ndarray) -> list[tuple[str, float]]:
        """Each row's nearest centroid: its name and the Euclidean distance to it in the projected space
        (prompts project to unit vectors, centroids lie inside the unit ball: at most 2)."""
        distances = np.sqrt(((self.project(vectors)[:, None, :] - self.centroids[None]) ** 2).sum(-1))  # [n, K]
        return [(self.names[i], float(distances[row, i])) for row, i in enumerate(distances.argmin(1))]

    def source_of(self, name: str) -> str:
        return self.sources[self.names.index(name)]

    def save(self, root: Path, stem: str) -> Path:
        root.mkdir(parents=True, exist_ok=True)
        meta = {k: v for k, v in asdict(self).items() if k not in ("centroids", "mean", "scale")}
        meta["k"] = self.k
        (root / f"{stem}.json").write_text(json.dumps(meta, indent=2))
        np.savez(root / f"{stem}.npz", centroids=self.centroids, mean=self.mean, scale=self.scale)
        return root / f"{stem}.json"

    @classmethod
    def load(cls, root: Path, stem: str = DEFAULT) -> "TaskModel":
        meta = json.loads((root / f"{stem}.json").read_text())
        arrays = np.load(root / f"{stem}.npz")
        return cls(meta["encoder"], tuple(meta["names"]), arrays["centroids"], arrays["mean"], arrays["scale"],
                   meta["corpus_sha256"], meta["seed"], {int(k): v for k, v in meta["silhouette"].items()},
                   tuple(meta["sources"]))


def fit_tasks(vectors: np.ndarray, sources: list[str], encoder: str, corpus_sha256: str,
              k_range: tuple[int, ...] = (2, 3, 4, 5), seed: int = 0) -> TaskModel:
    """Cluster `vectors` [n, d] (one per corpus prompt, whose source is `sources[i]`) into tasks."""
    from sklearn.cluster import KMeans
    from sklearn.metrics import silhouette_score

    mean = vectors.mean(0)
    scale = vectors.std(0) + 1e-6 * (np.abs(vectors).mean() + 1e-12)
    z = (vectors - mean) / scale
    z = z / np.linalg.norm(z, axis=1, keepdims=True).clip(1e-8)
    fits, scores = {}, {}
    for k in k_range:
        if k >= len(vectors):
            break
        fits[k] = KMeans(n_clusters=k, random_state=seed, n_init=10).fit(z)
        scores[k] = float(silhouette_score(z, fits[k].labels_, random_state=seed))
    best = max(scores, key=lambda k: (scores[k], -k))
    labels = fits[best].labels_
    order = sorted(range(best), key=lambda c: (-int((labels == c).sum()), c))  # larger clusters first
    majority = {c: Counter(s for s, lab in zip(sources, labels) if lab == c).most_common(1)[0][0] for c in order}
    names, seen = {}, Counter()
    for c in order:
        seen[majority[c]] += 1
        names[c] = majority[c] if seen[majority[c]] == 1 else f"{majority[c]}-{seen[majority[c]]}"
    centroids = fits[best].cluster_centers_[order]
    centroids = centroids / np.linalg.norm(centroids, axis=1, keepdims=True).clip(1e-8)
    return TaskModel(encoder, tuple(names[c] for c in order), centroids.astype(np.float32), mean.astype(np.float32),
                     scale.astype(np.float32), corpus_sha256, seed, scores, tuple(majority[c] for c in order))


def routing_accuracy(model: TaskModel, vectors: np.ndarray, sources: list[str]) -> float:
    """Share of prompts whose task's source is their own (held-out prompts of known source)."""
    routed = model.nearest(vectors)
    return sum(model.source_of(name) == src for name, src in zip(routed, sources)) / max(1, len(sources))


def members(model: TaskModel, vectors: np.ndarray, task: str) -> list[int]:
    """Indices of the rows of `vectors` that fall in `task`."""
    return [i for i, name in enumerate(model.nearest(vectors)) if name == task]
