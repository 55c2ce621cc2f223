"""From a user's request to a stream of text: tokenise (or apply the chat template), check it fits,
classify it for the router, run it through the generation loop, detokenise incrementally and honour
stop strings.

The same `Frontend` runs in-process and inside the router actor (specrouter/runtime/actors.py), so every
serving face (HTTP, gRPC, CLI) gets the same behaviour and the same errors.
"""

from __future__ import annotations

from collections.abc import Iterator

from specrouter.routing.classifier import classify_request
from specrouter.engine.detokenizer import TextStream
from specrouter.engine.engine import Engine
from specrouter.engine.loop import BatchLoop
from specrouter.engine.request import GenerationRequest
from specrouter.core.sampling import SamplingParams
from specrouter.core.tiers import QualityBudget, Thresholds


def chat_ids(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of chat messages under the tokenizer's chat template, the assistant's turn opened."""
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)


def tiered_mode(request: GenerationRequest) -> Thresholds | QualityBudget | None:
    """The request's tiered verification mode: its thresholds, its quality budget, or None (lossless).
    Raises ValueError for bad values or for both at once."""
    if request.tiered is not None and request.max_disagreement is not None:
        raise ValueError("tiered verification takes thresholds (tau_high, tau_low) or a quality budget (max_disagreement), not both")
    if request.max_disagreement is not None:
        return QualityBudget(request.max_disagreement)
    return Thresholds(*request.tiered) if request.tiered is not None else None


class Frontend:
    def __init__(self, engine: Engine, router=None, default_max_tokens: int = 256, batcher=None, tasks=None):
        """`router`: an AdaptiveRouter (specrouter/routing/router.py) to pick each step's chain, or None.
        `batcher`: a BatchServer (specrouter/engine/batch_server.py) over the same engine and router:
        requests then run in its shared batch; without one, each request runs in a loop of its own.
        `tasks`: a TaskClassifier (specrouter/tasks/classifier.py): a request's class is its nearest
        discovered task (reported in its stats as "task"), unless it names one; None: the lexical class."""
        self.engine, self.router, self.default_max_tokens = engine, router, default_max_tokens
        self.batcher, self.tasks = batcher, tasks

    def prompt_ids(self, request: GenerationRequest) -> list[int]:
        tokenizer = self.engine.tokenizer
        if request.messages is not None:
            return chat_ids(tokenizer, [{"role": role, "content": content} for role, content in request.messages])
        if isinstance(request.prompt, str):
            return tokenizer(request.prompt)["input_ids"]
        vocab = self.engine.vocab_size
        if any(not 0 <= t < vocab for t in request.prompt):
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
        return list(request.prompt)

    def stream(self, request: GenerationRequest) -> Iterator[dict]:
        """Yields {"prompt_tokens"} once the request is accepted, queued in the batch if there is one (a
        ValueError before it means bad input, an Overloaded a full queue), then {"text", "token_ids"} per
        step that makes text final, then {"finish_reason", "prompt_tokens", "completion_tokens", "stats"}.
        The batch enforces `request.timeout_s` (finish_reason "timeout")."""
        ids = self.prompt_ids(request)
        room = self.engine.max_positions - len(ids)
        max_tokens = request.max_tokens if request.max_tokens is not None else max(1, min(self.default_max_tokens, room))
        self.engine.check_request(len(ids), max_tokens)
        params = SamplingParams(temperature=request.temperature, top_k=request.top_k, top_p=request.top_p)
        tiered = tiered_mode(request)  # bad thresholds or budget, or both at once: ValueError

        klass, match = "default", None
        if self.router is not None or self.tasks is not None:
            text_for_class = request.prompt if isinstance(request.prompt, str) else self.engine.tokenizer.decode(ids)
            if self.tasks is not None and request.prompt_class is None:
                match = self.tasks.classify(text_for_class)
            klass = classify_request(text_for_class, request.prompt_class, match.task if match is not None else None)
        text = TextStream(self.engine.tokenizer, request.stop)
        if self.batcher is not None:
            steps = self.batcher.steps(ids, max_tokens, params, request.seed, request.ignore_eos, klass, request.timeout_s, tiered)
        else:
            loop = BatchLoop(self.engine, self.router, max_batch=1)
            steps = loop.stream(loop.submit(ids, max_tokens, params, request.seed, request.ignore_eos, klass, request.timeout_s,
                                            tiered=tiered))
        halt, pending = None, []  # tokens whose text is held back (partial character, maybe a stop string)
        try:
            yield {"prompt_tokens": len(ids)}
            while True:
                try:
                    new = steps.send(halt)
                except StopIteration as done:
                    result = done.value
                    break
                pending.extend(new)
                delta = text.push(new)
                halt = text.stopped or None
                if delta:
                    yield {"text": delta, "token_ids": pending}
                    pending = []
        finally:
            steps.close()  # closed early (cancelled): the workers free the sequence now
        tail = text.finish()
        if tail or pending:
            yield {"text": tail, "token_ids": pending}
        stats = result.as_dict()
        for key in ("text", "token_ids"):
            stats.pop(key)
        if match is not None:
            stats["task"] = match.as_dict()
        yield {"finish_reason": result.finish_reason, "prompt_tokens": len(ids),
               "completion_tokens": len(result.token_ids), "stats": stats}

    def generate(self, request: GenerationRequest) -> dict:
        """The whole stream collected: {"text", "finish_reason", "prompt_tokens", "completion_tokens", "stats"}."""
        parts, final = [], {}
        for item in self.stream(request):
            if "text" in item:
                parts.append(item["text"])
            elif "finish_reason" in item:
                final = item
        return {"text": "".join(parts), **final}
