"""The OpenAI-compatible request schema (pydantic, strict), its error shape, and response builders.

Requests are validated straight from the raw body (`parse`), so malformed JSON, invalid UTF-8 and
wrong field types all become the same clear 400 in OpenAI's error shape. Unknown fields are
ignored, as OpenAI's and vLLM's servers do; known fields that would change the output distribution
and are not supported (penalties, logit_bias, logprobs, best_of, echo, suffix, tools) are rejected
rather than silently ignored.
"""

from __future__ import annotations

import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from specrouter.core.tiers import QualityBudget, Thresholds

MAX_STOP = 4  # OpenAI's limit on stop sequences
MAX_N = 8


class APIError(Exception):
    """An error the client caused (or may retry), in OpenAI's shape."""

    def __init__(self, message: str, status: int = 400, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message, self.status, self.type, self.param, self.code = message, status, type, param, code
        self.headers = headers or {}  # e.g. Retry-After on a 429

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    include_usage: bool = False


class TieredVerification(BaseModel):
    """SpecRouter's extension: tiered (lossy) verification (specrouter/core/tiers.py), where the server
    allows it: by thresholds, or by a quality budget."""

    model_config = ConfigDict(strict=True, extra="forbid")
    tau_high: float | None = Field(default=None, description="drafted tokens the drafter was at least this sure of are "
                                                             "committed unchecked (1: none)")
    tau_low: float | None = Field(default=None, description="from here up to tau_high a slim verifier checks them (= tau_high: none)")
    max_disagreement: float | None = Field(
        default=None, description="instead of thresholds, a quality budget: the share of tokens that may differ from the target's; "
                                  "the server calibrates the thresholds on the agreement it measured for the prompt's class "
                                  "and drafter (lossless until it measured enough)")

    @model_validator(mode="after")
    def _valid(self):
        thresholds = (self.tau_high, self.tau_low)
        if self.max_disagreement is not None:
            if thresholds != (None, None):
                raise ValueError("give tau_high and tau_low, or max_disagreement, not both")
            QualityBudget(self.max_disagreement)  # raises ValueError with the reason
        elif None in thresholds:
            raise ValueError("give tau_high and tau_low, or max_disagreement")
        else:
            Thresholds(self.tau_high, self.tau_low)
        return self


class _Request(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0)  # vLLM's extension; 0 disables
    n: int = Field(default=1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    ignore_eos: bool = False  # vLLM's extension
    prompt_class: str | None = None  # SpecRouter's extension: route as this class (default: classified)
    user: str | None = None
    timeout: float | None = Field(default=None, gt=0)  # SpecRouter's extension: seconds until the work is cancelled (408)
    tiered: TieredVerification | None = None  # SpecRouter's extension: opt-in lossy verification (None: lossless)
    # Accepted only at their neutral values: anything else would change the output.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, stop):
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences are allowed, got {len(stops)}")
        if any(s == "" for s in stops):
            raise ValueError("stop sequences must not be empty")
        return stops

    @model_validator(mode="after")
    def _neutral(self):
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) != 0.0:
                raise ValueError(f"{name} is not supported (it would change the target's distribution)")
        if self.logit_bias:
            raise ValueError("logit_bias is not supported")
        return self

    @property
    def stops(self) -> tuple[str, ...]:
        return tuple(self.stop or ())

    @property
    def include_usage_chunk(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_Request):
    prompt: str | list[int] | list[str]
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, prompt):
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise ValueError("one prompt per request (send a batch as separate requests)")
            prompt = prompt[0]
        if len(prompt) == 0:
            raise ValueError("the prompt is empty")
        return prompt

    @model_validator(mode="after")
    def _unsupported(self):
        if self.echo or self.logprobs is not None or (self.best_of or 1) > 1 or self.suffix:
            raise ValueError("echo, logprobs, best_of and suffix are not supported")
        return self


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    @property
    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    tools: list | None = None
    response_format: dict | None = None

    @model_validator(mode="after")
    def _unsupported(self):
        if self.logprobs or self.tools or (self.response_format or {}).get("type", "text") != "text":
            raise ValueError("logprobs, tools and response_format are not supported")
        if self.max_completion_tokens is not None:
            self.max_tokens = self.max_completion_tokens
        return self


_UNION_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


def parse(model: type[_Request], body: bytes) -> _Request:
    """Validate a raw request body; every failure is an APIError(400) naming the parameter."""
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(p) for p in first["loc"] if str(p) not in _UNION_TAGS and "[" not in str(p))
        message = first["msg"].removeprefix("Value error, ")
        if first["type"] in ("json_invalid", "json_type"):
            raise APIError(f"the body is not valid JSON: {message}") from None
        raise APIError(f"{loc}: {message}" if loc else message, param=loc or None) from None


# -- responses ---------------------------------------------------------------------------------------------


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def new_id(chat: bool) -> str:
    return f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"


def completion_response(chat: bool, request_id: str, model: str, choices: list[dict], usage_: dict, stats: list[dict]) -> dict:
    """choices: [{"text", "finish_reason"}] in index order. A lossy generation (tiered verification)
    says so at the top (`lossy`) and in its statistics (`lossy`, `tiers`)."""
    if chat:
        body = [{"index": i, "message": {"role": "assistant", "content": c["text"]}, "finish_reason": c["finish_reason"],
                 "logprobs": None} for i, c in enumerate(choices)]
    else:
        body = [{"index": i, "text": c["text"], "finish_reason": c["finish_reason"], "logprobs": None}
                for i, c in enumerate(choices)]
    return {"id": request_id, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": model, "choices": body, "usage": usage_, "specrouter": stats,
            **({"lossy": True} if any(s.get("lossy") for s in stats) else {})}


def chunk(chat: bool, request_id: str, model: str, index: int, text: str | None, finish_reason: str | None = None,
          first: bool = False) -> dict:
    if chat:
        delta = {"role": "assistant", "content": text or ""} if first else ({"content": text} if text else {})
        choice = {"index": index, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
    else:
        choice = {"index": index, "text": text or "", "finish_reason": finish_reason, "logprobs": None}
    return {"id": request_id, "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(time.time()), "model": model, "choices": [choice]}
