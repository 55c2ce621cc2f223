"""Aligned drafters: LoRA distillation toward the target, loaded as a chain level, lossless in use."""

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import model_level, perturbed, prompts, save_with_tokenizer, tiny_llama
from core.test_chain import chi_square_p_value, joint_two_tokens, run
from specrouter.core import adapters
from specrouter.core.chain import Chain
from specrouter.core.model import ModelView, load_hf_model
from specrouter.core.sampling import SamplingParams
from specrouter.core.spec import LevelSpec, parse_chain
from specrouter.core.store import ModelStore
from specrouter.engine.calibration import router_for
from specrouter.engine.engine import Engine
from specrouter.tasks import align as align_module
from specrouter.tasks.align import align, align_seqkd
from specrouter.tasks.align_config import AlignConfig

VOCAB = 49152
FAST = AlignConfig(steps=6, lr=3e-3, rank=4, lora_alpha=8, continuation_tokens=8, on_policy_every=2, save_every=2)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        root = tmp_path_factory.mktemp("cache")
        patch.setenv("SPECROUTER_CACHE", str(root))
        yield root


@pytest.fixture(scope="module")
def dirs(tmp_path_factory, tiny_dirs, smollm2_dir):
    """The tiny target, and a drafter far enough from it that alignment has something to close."""
    far = perturbed(tiny_llama(0, VOCAB), 1, 0.5)  # tiny_dirs' target is tiny_llama(0, VOCAB)
    return {"target": tiny_dirs["target"], "draft": save_with_tokenizer(far, tmp_path_factory.mktemp("far") / "draft", smollm2_dir)}


def tiny_pair(dirs):
    draft, _ = load_hf_model(dirs["draft"], "float32")
    target, _ = load_hf_model(dirs["target"], "float32")
    return draft, target


@torch.no_grad()
def mean_divergence(drafter, target, data: list[list[int]]) -> float:
    """KL(p_target || q_draft) over the target's own greedy continuations of `data`."""
    total = 0.0
    for prompt in data:
        ids = torch.tensor([prompt + align_module.greedy_continuation(target, prompt, 8, frozenset())])
        scored = slice(len(prompt) - 1, ids.shape[1] - 1)
        total += float(align_module.divergence(target(input_ids=ids).logits[0, scored], drafter(input_ids=ids).logits[0, scored], "fkl"))
    return total / len(data)


def target_continuations(target, data: list[list[int]]) -> list[tuple[list[int], list[int]]]:
    return [(prompt, align_module.greedy_continuation(target, prompt, 8, frozenset())) for prompt in data]


@pytest.fixture(scope="module")
def aligned(cache, dirs):
    draft, target = tiny_pair(dirs)
    data = prompts(6, VOCAB)
    before = mean_divergence(draft, target, data)
    alpha_before = align_module.expected_acceptance(draft, target, target_continuations(target, data))
    result = align(draft, target, data, adapters.adapter_dir(dirs["draft"], "code"), FAST, meta={"task": "code"})
    merged = adapters.merge_adapter(tiny_pair(dirs)[0], Path(result.path)).eval()
    alpha_after = align_module.expected_acceptance(merged, target, target_continuations(target, data))
    return result, (before, mean_divergence(merged, target, data)), (alpha_before, alpha_after)


def test_a_level_names_its_aligned_task():
    spec = LevelSpec.parse("qwen2.5-coder-0.5b+task:code@w8")
    assert (spec.model, spec.task, spec.quant) == ("qwen2.5-coder-0.5b", "code", "w8")
    assert spec.label == "qwen2.5-coder-0.5b+task:code@w8"
    assert [s.task for s in parse_chain("a+task:chat-2,a+task:code@skip:1,b")] == ["chat-2", "code", None]
    assert LevelSpec.parse("a+task:code@gguf").label == "a+task:code@gguf"  # the adapter as a llama.cpp LoRA
    for bad in ("a+task:", "a+task:x/y"):
        with pytest.raises(ValueError):
            LevelSpec.parse(bad)
    with pytest.raises(ValueError):
        parse_chain("a,b+task:code")  # the target is the target, never an aligned copy


def test_expected_acceptance_is_one_minus_the_mean_total_variation(dirs):
    draft, target = tiny_pair(dirs)
    examples = target_continuations(target, prompts(2, VOCAB))
    assert align_module.expected_acceptance(target, target, examples) == pytest.approx(1.0, abs=1e-5)
    with torch.no_grad():
        tv = []
        for prompt, continuation in examples:
            ids = torch.tensor([prompt + continuation])
            p = torch.softmax(target(input_ids=ids).logits[0, len(prompt) - 1 : -1] / 0.7, -1)
            q = torch.softmax(draft(input_ids=ids).logits[0, len(prompt) - 1 : -1] / 0.7, -1)
            tv += (0.5 * (p - q).abs().sum(-1)).tolist()
    alpha = align_module.expected_acceptance(draft, target, examples, temperature=0.7)
    assert 0.0 < alpha < 1.0 and alpha == pytest.approx(1.0 - np.mean(tv), abs=1e-5)


def test_greedy_agreement_counts_the_positions_where_the_drafters_argmax_is_the_next_token(dirs):
    _, target = tiny_pair(dirs)
    draft = perturbed(target, seed=5, noise=0.3)  # agrees on some positions, not all
    examples = target_continuations(target, prompts(4, VOCAB))
    assert align_module.greedy_agreement(target, examples) == 1.0  # its own greedy text
    with torch.no_grad():
        agreed = [int(draft(input_ids=torch.tensor([p + c])).logits[0, len(p) - 1 + i].argmax()) == t
                  for p, c in examples for i, t in enumerate(c)]
    assert align_module.greedy_agreement(draft, examples) == pytest.approx(np.mean(agreed)) and 0 < np.mean(agreed) < 1


def test_alignment_lowers_the_divergence_raises_acceptance_and_seals_the_adapter(aligned):
    aligned, (before, after), (alpha_before, alpha_after) = aligned
    assert aligned.steps == FAST.steps and aligned.resumed_at == 0
    assert after < 0.85 * before
    assert alpha_after > alpha_before
    path = Path(aligned.path)
    assert (path / adapters.DIGEST).read_text().strip() == aligned.sha256 == adapters.file_sha256(path / adapters.WEIGHTS)
    meta = json.loads((path / "meta.json").read_text())
    assert meta["task"] == "code" and meta["sha256"] == aligned.sha256 and meta["steps"] == FAST.steps
    assert not path.with_name(f".{path.name}.work").exists()


def test_aligned_drafter_loads_as_a_level_and_greedy_output_equals_the_target_alone(aligned, dirs):
    draft, target = dirs["draft"], dirs["target"]
    engine = Engine(f"{draft}+task:code,{target}", dtype="float32", draft_lens=[3])
    assert list(engine.levels)[0] == f"{draft}+task:code"
    merged = engine.provider.get(draft, None, "code").model
    base, _ = load_hf_model(draft, "float32")
    assert not torch.equal(merged.model.layers[0].self_attn.q_proj.weight, base.model.layers[0].self_attn.q_proj.weight)
    assert type(merged) is type(base)  # merged into plain weights: no LoRA layers left
    target_only = Engine(target, dtype="float32")
    for prompt in prompts(3, VOCAB, seed=5):
        expected = target_only.generate(prompt, 24, ignore_eos=True).token_ids
        result = engine.generate(prompt, 24, ignore_eos=True)
        assert result.token_ids == expected
        assert result.level_stats[0].num_draft_tokens > 0  # the aligned level drafted


def test_router_pools_base_and_aligned_drafters_per_task_and_stays_lossless(aligned, dirs):
    draft, target = dirs["draft"], dirs["target"]
    engine = Engine(f"{draft},{draft}+task:code,{target}", dtype="float32", draft_lens=[3, 3])
    router = router_for(engine)
    assert f"{draft}+task:code" in router.pool
    target_only = Engine(target, dtype="float32")
    for task, prompt in zip(("code", "chat-2"), prompts(2, VOCAB, seed=7)):  # a discovered task name is the class
        result = engine.generate(prompt, 20, ignore_eos=True, router=router, klass=task)
        assert result.token_ids == target_only.generate(prompt, 20, ignore_eos=True).token_ids
        assert result.routing["decisions"]


def test_an_aligned_drafter_runs_in_a_ray_actor_of_its_own_and_stays_lossless(local_ray, aligned, cache, dirs):
    from specrouter.runtime.actors import RouterActor

    draft, target = dirs["draft"], dirs["target"]
    placement = {"*": {"num_cpus": 1, "torch_threads": 1, "env": {"SPECROUTER_CACHE": str(cache)}}}  # the node's cache
    router = RouterActor.remote(f"{draft},{draft}+task:code,{target}", dtype="float32", draft_lens=[2, 3], placement=placement)
    try:
        placements = local_ray.get(router.placements.remote(), timeout=600)
        assert set(placements) == {draft, f"{draft}+task:code", target}
        assert len({p["pid"] for p in placements.values()}) == 3  # the base and the aligned copy are two models
        target_only = Engine(target, dtype="float32")
        for prompt in prompts(2, VOCAB, seed=11):
            out = local_ray.get(router.generate.remote(prompt, 20, ignore_eos=True), timeout=600)
            assert out["token_ids"] == target_only.generate(prompt, 20, ignore_eos=True).token_ids
            assert out["levels"][1]["num_draft_tokens"] > 0  # the aligned level drafted for the target
    finally:
        local_ray.kill(router)


@pytest.fixture(scope="module")
def aligned_gguf(cache, tiny_gguf_dirs):
    """An adapter aligning the tiny GGUF drafter (through its transformers copy) to the tiny GGUF target."""
    draft, _ = load_hf_model(tiny_gguf_dirs["draft"], "float32")
    target, _ = load_hf_model(tiny_gguf_dirs["target"], "float32")
    align(draft, target, prompts(6, VOCAB), adapters.adapter_dir(tiny_gguf_dirs["draft"], "code"), FAST, meta={"task": "code"})
    return tiny_gguf_dirs


def test_an_aligned_drafter_runs_on_llamacpp_with_its_adapter_as_a_gguf_lora(aligned_gguf):
    draft, target = aligned_gguf["draft"], aligned_gguf["target"]
    store = ModelStore("float32")
    ids = prompts(1, VOCAB, seed=3)[0]

    def llamacpp_logits(model) -> np.ndarray:
        seq = model.take_sequence()
        try:
            return model.decode([(t, i, seq, True) for i, t in enumerate(ids)])
        finally:
            model.drop_sequence(seq)

    with torch.no_grad():
        merged = store.get(draft, None, "code").model(input_ids=torch.tensor([ids])).logits[0].numpy()
    base, aligned = llamacpp_logits(store.get(draft, "gguf").model), llamacpp_logits(store.get(draft, "gguf", "code").model)
    # llama.cpp's base + LoRA computes what the merged torch model does, up to the two backends' rounding (F32
    # both: 3e-4 apart without an adapter); Q and K rows in the wrong order would be 2.5e-3 off
    assert np.abs(aligned - merged).max() < 0.005 * np.abs(base - merged).max()

    engine = Engine(f"{draft}+task:code@gguf,{target}@gguf", provider=store, bit_exact=False)
    alone = Engine(f"{target}@gguf", provider=store)
    for prompt in prompts(2, VOCAB, seed=13):
        result = engine.generate(prompt, 20, ignore_eos=True)
        assert result.token_ids == alone.generate(prompt, 20, ignore_eos=True).token_ids
        assert result.level_stats[0].num_draft_tokens > 0


def test_a_tampered_adapter_is_refused(aligned, dirs):
    source = Path(aligned[0].path)
    copy = adapters.adapter_dir(dirs["draft"], "tampered")
    copy.mkdir(parents=True)
    for f in source.iterdir():
        copy.joinpath(f.name).write_bytes(f.read_bytes())
    copy.joinpath(adapters.DIGEST).write_text("0" * 64 + "\n")
    with pytest.raises(adapters.AdapterError, match="sha256"):
        Engine(f"{dirs['draft']}+task:tampered,{dirs['target']}", dtype="float32")
    with pytest.raises(adapters.AdapterError, match="specrouter align"):
        Engine(f"{dirs['draft']}+task:missing,{dirs['target']}", dtype="float32")


def test_an_interrupted_alignment_resumes_to_the_same_adapter(cache, dirs, monkeypatch):
    config = AlignConfig(steps=4, lr=5e-3, rank=4, lora_alpha=8, continuation_tokens=6, save_every=2)
    data = prompts(3, VOCAB, seed=9)
    whole = align(*tiny_pair(dirs), data, cache / "whole", config)

    calls, divergence = [], align_module.divergence

    def failing(*args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return divergence(*args)

    monkeypatch.setattr(align_module, "divergence", failing)
    with pytest.raises(KeyboardInterrupt):
        align(*tiny_pair(dirs), data, cache / "resumed", config)
    monkeypatch.setattr(align_module, "divergence", divergence)
    resumed = align(*tiny_pair(dirs), data, cache / "resumed", config)
    assert resumed.resumed_at == 2 and resumed.steps == 4
    assert resumed.losses == pytest.approx(whole.losses, rel=1e-5)
    assert resumed.sha256 == whole.sha256 or resumed.losses == whole.losses


SMALL_V = 6


def test_sampling_with_an_aligned_drafter_follows_the_target_joint(tmp_path):
    params = SamplingParams(temperature=0.8, top_k=5)
    target = tiny_llama(10, SMALL_V, init_std=0.1)
    drafter = tiny_llama(11, SMALL_V, init_std=0.1)
    data = [[1, 4, 2, 3], [2, 2, 5], [0, 3, 1, 1, 4]]
    config = AlignConfig(steps=8, lr=2e-2, rank=4, lora_alpha=8, continuation_tokens=4, save_every=4)
    align(drafter, target, data, tmp_path / "adapter", config)
    aligned = adapters.merge_adapter(tiny_llama(11, SMALL_V, init_std=0.1), tmp_path / "adapter").eval()
    assert not torch.equal(aligned.model.layers[0].mlp.up_proj.weight, drafter.model.layers[0].mlp.up_proj.weight)
    chain = Chain([model_level(aligned, "aligned"), model_level(target, "target")], [3])
    prompt, samples = [1, 4, 2], 2000
    counts = torch.zeros(SMALL_V, SMALL_V)
    for seed in range(samples):
        tokens, _ = run(chain, prompt, 2, params, seed=seed)
        counts[tokens[0], tokens[1]] += 1
    assert chi_square_p_value(counts, joint_two_tokens(ModelView(target), prompt, params)) > 1e-3
    assert chi_square_p_value(counts, joint_two_tokens(ModelView(aligned), prompt, params)) < 1e-6


@torch.no_grad()
def mean_cross_entropy(drafter, examples: list[tuple[list[int], list[int]]]) -> float:
    """The drafter's cross-entropy on each continuation after its prompt (its own tokens)."""
    losses = [float(drafter(input_ids=torch.tensor([p + c]), labels=torch.tensor([[-100] * len(p) + c])).loss) for p, c in examples]
    return sum(losses) / len(losses)


def test_sequence_level_distillation_aligns_a_drafter_on_another_tokenizer(cache, cross_dirs, smollm2_dir, tmp_path):
    """seqkd: a drafter on SmolLM2's tokenizer learns the text of a target on Qwen's, spelled in its
    own tokens; the adapter loads as a cross-tokenizer level and the output stays the target's."""
    teacher = Engine(cross_dirs["target"], dtype="float32")
    # Weights wide enough that a LoRA can move its logits (at the usual init a token's logit spans ~1).
    far = save_with_tokenizer(tiny_llama(30, VOCAB, init_std=0.2, layers=2), tmp_path / "smol-wide", smollm2_dir)
    drafter, drafter_tokenizer = load_hf_model(far, "float32")

    spell = align_module.speller(teacher.tokenizer, drafter_tokenizer)
    data = prompts(4, 151936, seed=3)
    examples = [(spell(p), spell(r.token_ids)) for p, r in zip(data, teacher.generate_many(data, 8))]
    before = mean_cross_entropy(drafter, examples)
    config = AlignConfig(steps=24, lr=2e-2, rank=8, lora_alpha=16, continuation_tokens=8, loss="seqkd", save_every=8)
    out = adapters.adapter_dir(far, "code")
    texts = tmp_path / "target-text.json"
    result = align_seqkd(drafter, data, teacher, spell, out, texts, config, meta={"task": "code"})
    assert result.steps == 24 and (out / adapters.DIGEST).read_text().strip() == result.sha256
    after = mean_cross_entropy(adapters.merge_adapter(load_hf_model(far, "float32")[0], out), examples)
    assert after < 0.5 * before

    # Another run on these prompts (other settings, another task's adapter) reads the target's text back.
    counting = CountingTeacher(teacher)
    again = align_seqkd(drafter, data[:3], counting, spell, adapters.adapter_dir(far, "chat"), texts, replace(config, steps=4))
    assert again.steps == 4 and counting.calls == []

    engine = Engine(f"{far}+task:code,{cross_dirs['target']}", dtype="float32", draft_lens=[3])
    drafted = 0
    for prompt in data + prompts(2, 151936, seed=11):
        result = engine.generate(prompt, 16, ignore_eos=True)
        assert result.token_ids == teacher.generate(prompt, 16, ignore_eos=True).token_ids
        drafted += result.level_stats[0].num_draft_tokens
    assert drafted > 0

    with pytest.raises(ValueError, match="seqkd"):  # each loss has its trainer
        align(drafter, drafter, data, cache / "wrong", config)
    with pytest.raises(ValueError, match="seqkd"):
        align_seqkd(drafter, data, teacher, spell, cache / "wrong", tmp_path / "texts.json", FAST)


class CountingTeacher:
    """The target as a teacher, logging the prompts it is asked to continue."""

    def __init__(self, teacher: Engine):
        self.teacher, self.tokenizer, self.calls = teacher, teacher.tokenizer, []

    def generate_many(self, prompts: list[list[int]], max_new_tokens: int, *, max_batch: int) -> list:
        self.calls.append(prompts)
        return self.teacher.generate_many(prompts, max_new_tokens, max_batch=max_batch)


def reversing(calls: list, stop_in: int | None = None):
    """A stand-in target's `generate_many` (each continuation the prompt reversed) logging its calls,
    stopping the run (Ctrl-C) in call `stop_in`."""
    def generate_many(batch: list[list[int]]) -> list[list[int]]:
        calls.append(batch)
        if len(calls) == stop_in:
            raise KeyboardInterrupt
        return [prompt[::-1] for prompt in batch]
    return generate_many


def test_kept_target_continuations_count_only_for_a_run_of_the_same_kind(tmp_path):
    calls, path = [], tmp_path / "target_continuations.json"
    assert align_module.ContinuationCache(path, "seqkd:96", reversing(calls)).get([1, 2]) == [2, 1]
    assert align_module.ContinuationCache(path, "seqkd:96", reversing(calls)).get([1, 2]) == [2, 1]
    assert len(calls) == 1  # a resumed run reads it back
    assert align_module.ContinuationCache(path, "seqkd:48", reversing(calls)).get([1, 2]) == [2, 1]
    assert len(calls) == 2  # a run of another length generates its own


def test_target_continuations_are_generated_many_a_call_and_kept_after_each(tmp_path):
    """The prompts not kept yet go to the target `per_call` at a time; a run stopped in a call keeps
    what the calls before it generated, and its resumption generates only the rest."""
    calls, path, prompts = [], tmp_path / "target_continuations.json", [[i, i + 1] for i in range(7)]
    with pytest.raises(KeyboardInterrupt):
        align_module.ContinuationCache(path, "seqkd:96", reversing(calls, stop_in=3), per_call=3).fill(prompts)
    assert calls == [[[0, 1], [1, 2], [2, 3]], [[3, 4], [4, 5], [5, 6]], [[6, 7]]]
    calls.clear()
    resumed = align_module.ContinuationCache(path, "seqkd:96", reversing(calls), per_call=3)
    resumed.fill(prompts + [[0, 1]])  # a prompt asked twice is continued once
    assert calls == [[[6, 7]]]
    assert [resumed.get(p) for p in prompts] == [p[::-1] for p in prompts]
    assert calls == [[[6, 7]]]  # every one kept: nothing generated again
    more = align_module.ContinuationCache(path, "seqkd:96", reversing(calls), per_call=3)
    more.fill([[9, 8], [3, 4]])  # a larger corpus: only its new prompts go to the target
    assert calls[1:] == [[[9, 8]]]


def test_the_target_text_is_kept_per_target_length_and_batch(cache):
    path = align_module.target_text_path("qwen2.5-coder-1.5b@gguf", 96, 16)
    assert path == align_module.target_text_path("qwen2.5-coder-1.5b@gguf", 96, 16)
    others = {align_module.target_text_path(*key) for key in
              [("qwen2.5-coder-1.5b", 96, 16), ("qwen2.5-coder-1.5b@gguf", 48, 16), ("qwen2.5-coder-1.5b@gguf", 96, 1),
               ("/elsewhere/qwen2.5-coder-1.5b@gguf", 96, 16)]}
    assert len(others) == 4 and path not in others and path.is_relative_to(adapters.adapters_root())
