"""`specrouter tasks fit`: embed the training corpus with each encoder, discover tasks, score them.

Each encoder's task model is scored on held-out prompts of known source (HumanEval: code; ShareGPT
evaluation turns: chat) for routing accuracy and for cost (milliseconds to encode and route a
prompt). The default task model is the most accurate of the encoders that class a request within
ONLINE_BUDGET_MS and route at least ROUTING_FLOOR of held-out prompts right (a request pays for its
classing before its first token); where none does, the most accurate (the cheaper on a tie).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from specrouter.tasks import corpora
from specrouter.tasks.discovery import DEFAULT, TaskModel, fit_tasks, tasks_root
from specrouter.tasks.encoders import Encoder, encoder_for, timed_encode


ONLINE_BUDGET_MS = 5.0  # classing one request
ROUTING_FLOOR = 0.9  # held-out routing accuracy


@dataclass
class EncoderReport:
    encoder: str
    k: int
    names: list[str]
    silhouette: dict[int, float]
    routing_accuracy: float
    ms_per_prompt: float  # encode + nearest centroid, held-out prompts
    fit_s: float
    model_path: str = ""
    confusion: dict[str, dict[str, int]] = field(default_factory=dict)  # source -> task -> prompts


def held_out(n: int) -> list[corpora.Text]:
    """n code and n chat prompts of the evaluation sets (never trained on)."""
    return corpora.humaneval()[:n] + corpora.sharegpt_evaluation()[:n]


def evaluate(model: TaskModel, encoder: Encoder, texts: list[corpora.Text]) -> tuple[float, float, dict]:
    start = time.perf_counter()
    routed = model.nearest(encoder.encode([t.text for t in texts]))
    ms = 1000 * (time.perf_counter() - start) / max(1, len(texts))
    confusion: dict[str, dict[str, int]] = {}
    for t, name in zip(texts, routed):
        confusion.setdefault(t.source, {}).setdefault(name, 0)
        confusion[t.source][name] += 1
    accuracy = sum(model.source_of(name) == t.source for t, name in zip(texts, routed)) / max(1, len(texts))
    return accuracy, ms, confusion


def fit_encoder(encoder: Encoder, train: list[corpora.Text], test: list[corpora.Text], seed: int,
                k_range: tuple[int, ...]) -> tuple[TaskModel, EncoderReport]:
    start = time.perf_counter()
    embedded = timed_encode(encoder, [t.text for t in train])
    model = fit_tasks(embedded.vectors, [t.source for t in train], encoder.name, corpora.corpus_sha256(train), k_range, seed)
    fit_s = time.perf_counter() - start
    accuracy, ms, confusion = evaluate(model, encoder, test)
    return model, EncoderReport(encoder.name, model.k, list(model.names), model.silhouette, accuracy, ms, fit_s,
                                confusion=confusion)


def choose(reports: list[EncoderReport]) -> EncoderReport:
    """The default task model's encoder (the module's rule)."""
    online = [r for r in reports if r.ms_per_prompt <= ONLINE_BUDGET_MS and r.routing_accuracy >= ROUTING_FLOOR]
    return max(online or reports, key=lambda r: (r.routing_accuracy, -r.ms_per_prompt))


def fit_and_compare(encoder_names: list[str], per_source: int = 64, held_out_per_source: int = 40, seed: int = 0,
                    k_range: tuple[int, ...] = (2, 3, 4, 5), dtype: str = "bfloat16") -> dict:
    """Fit a task model per encoder, save each under its encoder's name and the chosen one as the default."""
    train, test = corpora.training_corpus(per_source), held_out(held_out_per_source)
    corpora.assert_disjoint(train, test)
    root = tasks_root()
    reports, models = [], {}
    for name in encoder_names:
        model, report = fit_encoder(encoder_for(name, dtype), train, test, seed, k_range)
        report.model_path = str(model.save(root, name.replace(":", "-")))
        models[name] = model
        reports.append(report)
    best = choose(reports)
    models[best.encoder].save(root, DEFAULT)
    return {"default": best.encoder, "corpus": {"prompts": len(train), "sha256": corpora.corpus_sha256(train)},
            "held_out": len(test), "encoders": [vars(r) for r in reports], "tasks_dir": str(root)}
