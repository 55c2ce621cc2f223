"""The online prompt classifier: encode the prompt, take the nearest task centroid.

Its cost is the encoder's forward over the prompt (`last_ms`); `hidden:TARGET` shares the target's
weights where the caller passes the loaded target.
"""

from __future__ import annotations

import time
from pathlib import Path

from specrouter.tasks.discovery import DEFAULT, TaskModel, tasks_root
from specrouter.tasks.encoders import Encoder, encoder_for


class TaskClassifier:
    def __init__(self, model: TaskModel, encoder: Encoder):
        if encoder.name != model.encoder:
            raise ValueError(f"the task model was fitted on {model.encoder}, not {encoder.name}")
        self.model, self.encoder = model, encoder
        self.last_ms = 0.0

    @classmethod
    def load(cls, root: Path | None = None, stem: str = DEFAULT, shared: dict | None = None) -> "TaskClassifier":
        """The saved task model (default: the one `specrouter tasks fit` chose) and its encoder;
        `shared`: models already in memory, by name -> (model, tokenizer) (the target's, to share its weights)."""
        model = TaskModel.load(root or tasks_root(), stem)
        return cls(model, encoder_for(model.encoder, shared=shared))

    @property
    def tasks(self) -> tuple[str, ...]:
        return self.model.names

    def classify(self, text: str) -> str:
        start = time.perf_counter()
        task = self.model.nearest(self.encoder.encode([text]))[0]
        self.last_ms = 1000 * (time.perf_counter() - start)
        return task

