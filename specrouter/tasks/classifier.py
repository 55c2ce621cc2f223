"""The online prompt classifier: encode the prompt, take the nearest task centroid.

Its cost is the encoder's work on the prompt (`TaskMatch.ms`): `embed:TARGET` reads the target's
input embeddings of the prompt's tokens (a millisecond or two); `hidden:TARGET` runs the target's
decoder over it (sharing the target's weights where the caller passes the loaded target).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from specrouter.tasks.discovery import DEFAULT, TaskModel, task_model_path
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
        self._lock = threading.Lock()  # a served router classes requests from many threads; tokenizers are not reentrant

    @classmethod
    def load(cls, name: str = DEFAULT, shared: dict | None = None) -> "TaskClassifier":
        """A saved task model and its encoder. `name`: a task model in the cache (`default`: the one
        `specrouter tasks fit` chose), or the path of a task model's .json; `shared`: models already in
        memory, by name -> (model, tokenizer) (the target's, to share its weights)."""
        path = task_model_path(name)
        model = TaskModel.load(path.parent, path.stem)
        return cls(model, encoder_for(model.encoder, shared=shared))

    @property
    def tasks(self) -> tuple[str, ...]:
        return self.model.names

    def classify(self, text: str) -> TaskMatch:
        start = time.perf_counter()
        with self._lock:
            task, distance = self.model.assign(self.encoder.encode([text]))[0]
        return TaskMatch(task, distance, 1000 * (time.perf_counter() - start))

