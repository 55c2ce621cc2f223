"""A light prompt classifier: cheap lexical features, no model, microseconds per prompt.

Each class (code, summarization, chat) gets its own acceptance table and its own best chain, as in
TaskSpec: drafters agree with the target far more on code than on open chat. A request may also
name its class explicitly. Where a task model is configured (`specrouter tasks fit`), its classifier
(specrouter/tasks/classifier.py) names the class instead: a discovered task.
"""

from __future__ import annotations

import re

CLASSES = ("code", "summarization", "chat")

_CODE_PATTERNS = [
    r"^\s*(def|class|import|from|return|for|while|if|elif|else:|try:|except|with)\b",
    r"^\s*(function|const|let|var|public|private|static|void|int|#include|package|fn|impl)\b",
    r"[{};]\s*$",
    r"\w+\(.*\)",
    r"```",
    r"^\s{4,}\S",
    r"(==|!=|<=|>=|->|=>|\+=|&&|\|\|)",
]
_CODE_RE = [re.compile(p, re.MULTILINE) for p in _CODE_PATTERNS]
_SUMMARY_RE = re.compile(r"\b(summari[sz]e|summary|tl;?dr|key points|main (ideas|points)|in (\d+|a few|three|five) (bullet )?points)\b", re.I)
_CODE_WORDS_RE = re.compile(r"\b(python|javascript|java|c\+\+|rust|sql|function|code|script|regex|bug|compile|api)\b", re.I)


def features(text: str) -> dict[str, float]:
    lines = [line for line in text.splitlines() if line.strip()] or [""]
    code_lines = sum(any(r.search(line) for r in _CODE_RE) for line in lines)
    symbols = sum(text.count(c) for c in "{}()[];=<>_:#")
    return {
        "code_line_share": code_lines / len(lines),
        "symbol_density": symbols / max(1, len(text)),
        "code_words": len(_CODE_WORDS_RE.findall(text)),
        "summary_cue": float(bool(_SUMMARY_RE.search(text))),
        "length": float(len(text)),
    }


def classify(text: str) -> str:
    f = features(text)
    code_score = 2.0 * f["code_line_share"] + 8.0 * f["symbol_density"] + 0.5 * min(f["code_words"], 3)
    if f["summary_cue"] and code_score < 1.2:
        return "summarization"
    if code_score >= 1.0:
        return "code"
    return "chat"


def classify_request(text: str, explicit: str | None = None, discovered: str | None = None) -> str:
    """The request's class: the one it names, else its discovered task (the nearest task of a
    `specrouter tasks fit` model), else the lexical class."""
    return explicit or discovered or classify(text)
