"""Drafter alignment (DistillSpec): LoRA adapters that move a drafter's token distributions toward
the target's on one task's prompts.

A drafter on the target's tokenizer trains on a divergence. Each step takes one prompt of the task
and a continuation of it: every `on_policy_every`-th step the drafter's own greedy continuation (with
the adapter as trained so far: on-policy), otherwise the target's (generated once and kept). Both
models score the sequence, and the loss is a divergence between the target's and the drafter's
next-token distributions over the continuation's positions: forward KL(p_target || q_draft) or total
variation 0.5 * sum |p_target - q_draft|, the quantity whose complement is the expected acceptance of
a speculative step.

A drafter on another tokenizer has no distribution over the target's tokens to compare, so it trains
on the target's text instead (`align_seqkd`, sequence-level distillation): cross-entropy on the
target's greedy continuations of the task's prompts (generated before the first step, many prompts
decoding together), prompt and continuation spelled by the drafter's tokenizer as a cross-tokenizer
chain shows it the committed text (specrouter/core/retokenize.py).

Only the adapter's weights train (peft LoRA on every projection); the base drafter's stay as loaded
(bf16 or fp32; adapters in fp32). A run checkpoints (adapter, optimiser, step, losses) every
`save_every` steps in a work directory beside the output and resumes from there, the target's
continuations with it (sequence-level distillation keeps the target's text for good, for every later
run on the same prompts: `target_text_path`); the finished adapter is saved with the sha256 of its weights
(specrouter/core/adapters.py), where a `MODEL+task:NAME` level finds it.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import torch
from tqdm import tqdm

from specrouter.core import adapters
from specrouter.core.verification import pairwise_alpha
from specrouter.tasks.align_config import DIVERGENCES, AlignConfig

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class AlignResult:
    path: str
    sha256: str
    steps: int
    minutes: float  # this run's wall time, the target's text included (a resumed run counts from its resumption)
    resumed_at: int
    loss_first: float  # mean loss of the first and last (up to) 5 steps
    loss_last: float
    losses: list[float] = field(default_factory=list)


def divergence(target_logits: torch.Tensor, draft_logits: torch.Tensor, loss: str) -> torch.Tensor:
    """Mean over positions of the divergence between p_target and q_draft, both [T, V] logits."""
    log_p_target = torch.log_softmax(target_logits.float(), -1)  # [T, V]
    log_q_draft = torch.log_softmax(draft_logits.float(), -1)  # [T, V]
    if loss == "fkl":
        return (log_p_target.exp() * (log_p_target - log_q_draft)).sum(-1).mean()
    if loss == "tvd":
        return 0.5 * (log_p_target.exp() - log_q_draft.exp()).abs().sum(-1).mean()
    raise ValueError(f"unknown loss {loss!r}: one of {DIVERGENCES}")


@torch.no_grad()
def expected_acceptance(drafter, target, examples: list[tuple[list[int], list[int]]], temperature: float = 1.0) -> float:
    """alpha = 1 - E[TV(q_draft, p_target)] over the continuation positions of (prompt, continuation)
    pairs, both models teacher-forced on the same tokens: the probability that speculative sampling at
    `temperature` (> 0) accepts a drafted token there, averaged over positions."""
    if temperature <= 0:
        raise ValueError(f"expected acceptance is defined for sampling: temperature must be > 0, got {temperature}")
    accepted, positions = 0.0, 0
    for prompt, continuation in examples:
        ids = torch.tensor([prompt + continuation])  # [1, S]
        scored = slice(len(prompt) - 1, ids.shape[1] - 1)  # positions predicting the continuation
        p_target = torch.softmax(target(input_ids=ids).logits[0, scored].float() / temperature, -1)  # [T, V]
        q_draft = torch.softmax(drafter(input_ids=ids).logits[0, scored].float() / temperature, -1)  # [T, V]
        accepted += float(pairwise_alpha(q_draft, p_target).sum())
        positions += len(continuation)
    return accepted / max(1, positions)


@torch.no_grad()
def greedy_agreement(drafter, examples: list[tuple[list[int], list[int]]]) -> float:
    """How often the drafter's argmax is the next token over the continuation positions of (prompt,
    continuation) pairs in its own tokens, teacher-forced: the greedy counterpart of
    `expected_acceptance`, defined also for a drafter on another tokenizer than the target (over the
    target's text spelled in the drafter's tokens)."""
    agreed, positions = 0, 0
    for prompt, continuation in examples:
        ids = torch.tensor([prompt + continuation])  # [1, S]
        scored = slice(len(prompt) - 1, ids.shape[1] - 1)  # positions predicting the continuation
        agreed += int((drafter(input_ids=ids).logits[0, scored].argmax(-1) == torch.tensor(continuation)).sum())
        positions += len(continuation)
    return agreed / max(1, positions)


@torch.no_grad()
def greedy_continuation(model, prompt: list[int], n: int, eos_ids: frozenset[int]) -> list[int]:
    """n greedy tokens after `prompt` (fewer where an end token comes), with the model's own KV cache."""
    ids, past, out = torch.tensor([prompt]), None, []
    for _ in range(n):
        result = model(input_ids=ids, past_key_values=past, use_cache=True)
        past = result.past_key_values
        token = int(result.logits[0, -1].argmax())
        out.append(token)
        if token in eos_ids:
            break
        ids = torch.tensor([[token]])
    return out


def _lora(drafter, config: AlignConfig):
    from peft import LoraConfig, get_peft_model

    present = {name.rsplit(".", 1)[-1] for name, _ in drafter.named_modules()}
    lora = LoraConfig(r=config.rank, lora_alpha=config.lora_alpha, lora_dropout=0.0,
                      target_modules=[p for p in PROJECTIONS if p in present], task_type="CAUSAL_LM")
    torch.manual_seed(config.seed)  # the adapters' initial weights, and so the whole run, follow the seed
    return get_peft_model(drafter, lora)  # adapters in fp32 over a bf16 or fp32 base (peft's autocast_adapter_dtype)


class Teacher(Protocol):
    """What sequence-level distillation needs of the target: its greedy continuations of many prompts,
    up to `max_batch` decoding together (an `Engine` over the target, on any backend, is one)."""

    tokenizer: Any

    def generate_many(self, prompts: list[list[int]], max_new_tokens: int, *, max_batch: int) -> list[Any]:
        ...  # -> results with `token_ids`, in the prompts' order


class ContinuationCache:
    """The target's continuation of each prompt (by the prompt's tokens), kept in a file after every
    call that generates some, so a resumed or repeated run does not generate them again; kept ones
    count only for runs of the same kind (`source`: the loss, the continuation length, how the target
    decoded). `generate_many` continues a list of prompts, up to `per_call` of them a call."""

    def __init__(self, path: Path, source: str, generate_many: Callable[[list[list[int]]], list[list[int]]], per_call: int = 1):
        self.path, self.source, self.generate_many, self.per_call = path, source, generate_many, per_call
        kept = json.loads(path.read_text()) if path.exists() else {}
        self.known: dict[str, list[int]] = kept.get("continuations", {}) if kept.get("source") == source else {}

    def fill(self, prompts: list[list[int]], progress: bool = False) -> None:
        """Generate the continuations of these prompts not kept yet."""
        by_key = {_key(p): p for p in prompts}
        missing = [(key, p) for key, p in by_key.items() if key not in self.known]
        with tqdm(total=len(by_key), initial=len(by_key) - len(missing), desc="target continuations", unit="prompt",
                  disable=not progress) as bar:
            for start in range(0, len(missing), self.per_call):
                chunk = missing[start : start + self.per_call]
                for (key, _), continuation in zip(chunk, self.generate_many([p for _, p in chunk]), strict=True):
                    self.known[key] = list(continuation)
                self.path.parent.mkdir(parents=True, exist_ok=True)
                tmp = self.path.with_suffix(".partial")
                tmp.write_text(json.dumps({"source": self.source, "continuations": self.known}))
                tmp.replace(self.path)
                bar.update(len(chunk))

    def get(self, prompt: list[int]) -> list[int]:
        key = _key(prompt)
        if key not in self.known:
            self.fill([prompt])
        return self.known[key]


def _key(prompt: list[int]) -> str:
    return hashlib.sha256(json.dumps(prompt).encode()).hexdigest()[:24]


def speller(target_tokenizer, drafter_tokenizer) -> Callable[[list[int]], list[int]]:
    """target ids -> the drafter's tokens for their text (special tokens by content, nothing added)."""
    def spell(ids: list[int]) -> list[int]:
        return drafter_tokenizer(target_tokenizer.decode(ids), add_special_tokens=False)["input_ids"]
    return spell


def target_text_path(target: str, continuation_tokens: int, teacher_batch: int) -> Path:
    """Where sequence-level distillation keeps the text `target` wrote (its greedy continuations of
    `continuation_tokens`, `teacher_batch` prompts decoding together) for every run after: one file
    per target, length and batch, shared by the tasks and drafters that train on it."""
    name = re.sub(r"[^A-Za-z0-9._@+-]", "_", Path(target).name)
    digest = hashlib.sha256(target.encode()).hexdigest()[:8]
    return adapters.adapters_root() / ".target-text" / f"{name}-{digest}--{continuation_tokens}tok--batch{teacher_batch}.json"


def work_dir(out: Path) -> Path:
    """Where a run towards the adapter at `out` keeps its checkpoint and the target's continuations."""
    return out.with_name(f".{out.name}.work")


def align(drafter, target, prompts: list[list[int]], out: Path, config: AlignConfig = AlignConfig(),
          eos_ids: frozenset[int] = frozenset(), meta: dict | None = None) -> AlignResult:
    """Train a LoRA adapter on `drafter` toward `target` (both torch models on one tokenizer) over
    `prompts` (token ids), on the divergence `config.loss`, and save it at `out`."""
    if config.loss not in DIVERGENCES:
        raise ValueError(f"{config.loss!r} is not a divergence: one of {DIVERGENCES} (seqkd: align_seqkd)")
    start = time.perf_counter()
    prompts = _clip(prompts, config)
    target.eval()
    model = _lora(drafter, config)
    targets = ContinuationCache(work_dir(out) / "target_continuations.json", f"divergence:{config.continuation_tokens}",
                                lambda batch: [greedy_continuation(target, p, config.continuation_tokens, eos_ids) for p in batch])
    order = _order(len(prompts), config)

    def loss_at(step: int) -> torch.Tensor:
        index = order[step % len(order)]
        prompt = prompts[index]
        # The continuation: the drafter's own (on-policy) or the target's.
        if config.on_policy_every and step % config.on_policy_every == config.on_policy_every - 1:
            model.eval()
            continuation = greedy_continuation(model, prompt, config.continuation_tokens, eos_ids)
        else:
            continuation = targets.get(prompt)
        ids = torch.tensor([prompt + continuation])  # [1, S]
        scored = slice(len(prompt) - 1, ids.shape[1] - 1)  # positions predicting the continuation
        # The divergence between the two distributions there.
        model.train()
        with torch.no_grad():
            target_logits = target(input_ids=ids).logits[0, scored]  # [T, V]
        draft_logits = model(input_ids=ids).logits[0, scored]  # [T, V]
        return divergence(target_logits, draft_logits, config.loss)

    return _train(model, loss_at, out, config, len(prompts), meta, start)


def align_seqkd(drafter, prompts: list[list[int]], teacher: Teacher, spell: Callable[[list[int]], list[int]], out: Path,
                texts: Path, config: AlignConfig = AlignConfig(), meta: dict | None = None, teacher_batch: int = 16) -> AlignResult:
    """Train a LoRA adapter on `drafter` (on any tokenizer) over `prompts` (the target's token ids) by
    cross-entropy on the target's greedy continuations of them (`teacher`, `teacher_batch` prompts
    decoding together; 1: the text the target alone writes), both spelled in the drafter's tokens by
    `spell` (target ids -> drafter ids), and save it at `out`. The target's text is kept in `texts`
    (`target_text_path`) after each batch and read back by every later run on the same prompts."""
    if config.loss != "seqkd":
        raise ValueError(f"align_seqkd trains on the target's text (loss 'seqkd'), not {config.loss!r}")
    if teacher_batch < 1:
        raise ValueError(f"teacher_batch must be >= 1, got {teacher_batch}")
    start = time.perf_counter()
    prompts = _clip(prompts, config)
    model = _lora(drafter, config)
    targets = ContinuationCache(texts, f"seqkd:{config.continuation_tokens}:batch{teacher_batch}",
                                lambda batch: [r.token_ids for r in teacher.generate_many(batch, config.continuation_tokens,
                                                                                          max_batch=teacher_batch)],
                                per_call=teacher_batch)
    order = _order(len(prompts), config)
    # The target's text first, for every prompt the run's steps visit, a batch decoding together (a
    # batched pass costs little more than a pass of one, but may round differently and so take the
    # other side of a near-tie).
    targets.fill([prompts[i] for i in sorted({order[step % len(order)] for step in range(config.steps)})], progress=True)

    def loss_at(step: int) -> torch.Tensor:
        target_prompt = prompts[order[step % len(order)]]
        prompt, continuation = spell(target_prompt), spell(targets.get(target_prompt))
        ids = torch.tensor([prompt + continuation])  # [1, S]
        labels = torch.tensor([[-100] * len(prompt) + continuation])  # [1, S]: the continuation's tokens only
        model.train()
        return model(input_ids=ids, labels=labels).loss

    return _train(model, loss_at, out, config, len(prompts), meta, start)


def _clip(prompts: list[list[int]], config: AlignConfig) -> list[list[int]]:
    if not prompts:
        raise ValueError("no prompts to align on")
    return [p[-config.max_prompt_tokens :] for p in prompts]


def _order(num_prompts: int, config: AlignConfig) -> list[int]:
    order = list(range(num_prompts))
    random.Random(config.seed).shuffle(order)
    return order


def _train(model, loss_at: Callable[[int], torch.Tensor], out: Path, config: AlignConfig, num_prompts: int,
           meta: dict | None, start: float) -> AlignResult:
    """Steps of AdamW on the adapter of `model` (a peft model) over `loss_at(step)`, resuming from and
    checkpointing to the work directory; the adapter saved and sealed at `out`. `start`: when the run
    began (`time.perf_counter()`), so its minutes count what it did before its steps."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    work = work_dir(out)
    work.mkdir(parents=True, exist_ok=True)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=0.0)

    # 1. Resume: adapter, optimiser, step and losses from the last checkpoint of this configuration.
    checkpoint, step, losses = work / "checkpoint.pt", 0, []
    if checkpoint.exists():
        state = torch.load(checkpoint, weights_only=False)
        if state["config"] == asdict(config) and state["num_prompts"] == num_prompts:
            set_peft_model_state_dict(model, state["adapter"])
            optimizer.load_state_dict(state["optimizer"])
            step, losses = state["step"], state["losses"]
    resumed_at = step

    # 2. Steps, each checkpointed every `save_every`.
    with tqdm(total=config.steps, initial=step, desc=f"align {out.name}", unit="step") as bar:
        while step < config.steps:
            loss = loss_at(step)
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            optimizer.step()
            losses.append(loss.item())
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
            if step % config.save_every == 0 or step == config.steps:
                tmp = checkpoint.with_suffix(".partial")
                torch.save({"config": asdict(config), "num_prompts": num_prompts, "step": step, "losses": losses,
                            "adapter": get_peft_model_state_dict(model), "optimizer": optimizer.state_dict()}, tmp)
                tmp.replace(checkpoint)
    minutes = (time.perf_counter() - start) / 60

    # 3. The adapter, sealed with its sha256; the work directory goes.
    model.eval()
    shutil.rmtree(out, ignore_errors=True)
    model.save_pretrained(str(out))
    head, tail = losses[:5], losses[-5:]
    summary = {**(meta or {}), "config": asdict(config), "prompts": num_prompts, "steps": step, "minutes": round(minutes, 3),
               "loss_first": sum(head) / len(head), "loss_last": sum(tail) / len(tail), "losses": losses}
    digest = adapters.seal(out, summary)
    shutil.rmtree(work, ignore_errors=True)
    model.unload()  # the drafter module without its LoRA layers, as it was passed in
    return AlignResult(str(out), digest, step, minutes, resumed_at, summary["loss_first"], summary["loss_last"], losses)
