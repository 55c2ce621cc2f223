"""`specrouter generate --adaptive --tasks`: the prompt's class is its discovered task."""

import json

import pytest

from conftest import CHAT_PROMPT, CODE_PROMPT
from specrouter.cli import main
from specrouter.core.model import load_hf_model
from specrouter.tasks.discovery import fit_tasks, tasks_root
from specrouter.tasks.encoders import HiddenStateEncoder

TEXTS = [(CODE_PROMPT, "code"), ("import os\nfor name in os.listdir('.'):\n    print(name)\n", "code"),
         ("class Stack:\n    def push(self, item):\n        self.items.append(item)\n", "code"),
         (CHAT_PROMPT, "chat"), ("What should I cook for dinner tonight?", "chat"), ("Tell me a story about a cat.", "chat")]


def test_generate_classes_the_prompt_by_its_discovered_task_on_the_targets_own_weights(tiny_dirs, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SPECROUTER_CACHE", str(tmp_path))
    target = tiny_dirs["target"]
    encoder = HiddenStateEncoder(*load_hf_model(target, "float32"), target)
    model = fit_tasks(encoder.encode([t for t, _ in TEXTS]), [s for _, s in TEXTS], encoder.name, "corpus", k_range=(2,), seed=0)
    model.save(tasks_root(), "tiny")
    chain = f"{tiny_dirs['draft']},{target}"
    assert main(["generate", "--adaptive", "--tasks", "tiny", "--chain", chain, "--prompt", CODE_PROMPT, "--max-tokens", "8",
                 "--dtype", "float32", "--ignore-eos", "--json"]) == 0
    captured = capsys.readouterr()
    (routed, distance), = model.assign(encoder.encode([CODE_PROMPT]))
    assert f"[class {routed}: discovered task at distance {distance:.3f}" in captured.err
    out = json.loads(captured.out)
    assert len(out["token_ids"]) == 8
    assert out["task"]["task"] == out["routing"]["class"] == routed  # the class and its distance in the statistics
    assert out["task"]["distance"] == pytest.approx(distance, abs=1e-4) and out["task"]["ms"] > 0
