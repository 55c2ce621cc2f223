"""The online prompt classifier: encode the prompt, take the nearest task centroid.

Its cost is the encoder's forward over the prompt (`TaskMatch.ms`); `hidden:TARGET` shares the
target's weights where the caller passes the loaded target.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from specrouter.tasks.discovery import DEFAULT, TaskModel, tasks_root
from specrouter.tasks.encoders import Encoder, encoder_for


@dataclass(frozen=True)
class TaskMatch:
    task: str  # the nearest task's name
    distance: float  # to its centroid (TaskModel.assign)
    ms: float  # encoding and routing the prompt

    def as_dict(self) -> dict:
        return {"task": self.task, "distance": round(self.distance, 4), "ms": round(self.ms, 2)}


class TaskClassifier:
    def __init__(self, model: TaskModel, encoder: Encoder):
        if encoder.name != model.encoder:
            raise ValueError(f"the task model was fitted on {model.encoder}, not {encoder.name}")
        self.model, self.encoder = model, encoder

    @classmethod
    def load(cls, root: Path | None = None, stem: str = DEFAULT, shared: dict | None = None) -> "TaskClassifier":
        """The saved task model (default: the one `specrouter tasks fit` chose) and its encoder;
        `shared`: models already in memory, by name -> (model, tokenizer) (the target's, to share its weights)."""
        model = TaskModel.load(root or tasks_root(), stem)
        return cls(model, encoder_for(model.encoder, shared=shared))

    @property
    def tasks(self) -> tuple[str, ...]:
        return self.model.names

    def classify(self, text: str) -> TaskMatch:
        start = time.perf_counter()
        task, distance = self.model.assign(self.encoder.encode([text]))[0]
        return TaskMatch(task, distance, 1000 * (time.perf_counter() - start))

