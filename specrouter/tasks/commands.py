"""`specrouter align --task NAME`: align a drafter to the target on one discovered task's prompts."""

from __future__ import annotations

from specrouter.core import adapters, catalog
from specrouter.core.model import load_hf_model
from specrouter.core.store import end_tokens
from specrouter.tasks import corpora
from specrouter.tasks.align import AlignResult, Teacher, align, align_seqkd, speller, target_text_path
from specrouter.tasks.align_config import AlignConfig
from specrouter.tasks.discovery import DEFAULT, TaskModel, members, tasks_root
from specrouter.tasks.encoders import encoder_for


def prompt_ids(tokenizer, text: corpora.Text) -> list[int]:
    """A prompt's token ids as a request sends it: chat turns under the tokenizer's chat template."""
    if text.chat and tokenizer.chat_template:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text.text}], add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    return tokenizer(text.text)["input_ids"]


def task_texts(model: TaskModel, task: str, per_source: int, shared: dict | None = None) -> list[corpora.Text]:
    """The prompts of the training corpus (`per_source` of each source: those the task model was
    fitted on, or more) whose nearest task is `task`."""
    if task not in model.names:
        raise ValueError(f"unknown task {task!r}: the task model has {', '.join(model.names)}")
    train = corpora.training_corpus(per_source)
    vectors = encoder_for(model.encoder, shared=shared).encode([t.text for t in train])
    return [train[i] for i in members(model, vectors, task)]


def align_task(task: str, drafter: str, target: str, config: AlignConfig, per_source: int = 64,
               task_model: str = DEFAULT, drafter_dtype: str = "bfloat16", target_dtype: str = "bfloat16",
               max_prompts: int | None = None, teacher: Teacher | None = None, teacher_batch: int = 16) -> AlignResult:
    """Align `drafter` to `target` on `task`'s training prompts: on a divergence from the target's
    distributions (the torch `target` loaded here), or with `config.loss` "seqkd" on the text of
    `teacher` (the target on any backend, `teacher_batch` prompts decoding together; the drafter on
    any tokenizer)."""
    model = TaskModel.load(tasks_root(), task_model)
    drafter_lm, drafter_tokenizer = load_hf_model(catalog.resolve(drafter), drafter_dtype)
    meta = {"task": task, "drafter": drafter, "target": target, "corpus_sha256": model.corpus_sha256,
            "encoder": model.encoder, "prompts_per_source": per_source, "drafter_dtype": drafter_dtype}
    if config.loss == "seqkd":
        if teacher is None:
            raise ValueError("sequence-level distillation (seqkd) needs the target to generate its text")
        tokenizer = teacher.tokenizer
        texts = _task_prompts(model, task, per_source, max_prompts)
        return align_seqkd(drafter_lm, [prompt_ids(tokenizer, t) for t in texts], teacher, speller(tokenizer, drafter_tokenizer),
                           adapters.adapter_dir(drafter, task), target_text_path(target, config.continuation_tokens, teacher_batch),
                           config, meta={**meta, "teacher_batch": teacher_batch}, teacher_batch=teacher_batch)
    target_lm, tokenizer = load_hf_model(catalog.resolve(target), target_dtype)
    texts = _task_prompts(model, task, per_source, max_prompts, shared={target: (target_lm, tokenizer)})
    if len(drafter_tokenizer) != len(tokenizer) or drafter_tokenizer.get_vocab() != tokenizer.get_vocab():
        raise ValueError(f"{drafter} and {target} do not share a tokenizer: align them with --loss seqkd")
    return align(drafter_lm, target_lm, [prompt_ids(tokenizer, t) for t in texts], adapters.adapter_dir(drafter, task),
                 config, end_tokens(tokenizer, target_lm.generation_config), meta={**meta, "target_dtype": target_dtype})


def _task_prompts(model: TaskModel, task: str, per_source: int, max_prompts: int | None,
                  shared: dict | None = None) -> list[corpora.Text]:
    texts = task_texts(model, task, per_source, shared=shared)
    corpora.assert_disjoint(texts, corpora.evaluation_texts())
    return texts[:max_prompts] if max_prompts else texts
