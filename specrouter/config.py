"""The serving configuration (YAML / Serve application args), validated at the edge with pydantic.

    chain: "qwen2.5-coder-0.5b@int8,qwen2.5-coder-1.5b"   # drafters smallest first, target last
    dtype: bfloat16
    draft_lens: [6]                  # optional, one per drafter level
    draft_confidence: 0.0            # a drafting model ends its block after a token it gave less than this
    adaptive: false                  # true: --chain is a pool and each step runs the best chain
    pipeline: false                  # true: draft the next block while the target verifies (PipeSpec-style)
    model_name: null                 # the served model id (default: the target's name)
    default_max_tokens: 256          # when a chat request gives no max_tokens
    grpc_host: 127.0.0.1             # the public gRPC API; null port disables it
    grpc_port: 9000
    placement:                       # per model label (name or name@int8), or "*"
      qwen2.5-coder-1.5b: {num_gpus: 1, accelerator_type: A100, device: cuda}
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from specrouter.spec import parse_chain

DEFAULT_CHAIN = "qwen2.5-coder-0.5b@int8,qwen2.5-coder-1.5b"


class PlacementConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    num_cpus: float = Field(default=1.0, ge=0)
    num_gpus: float = Field(default=0.0, ge=0)
    accelerator_type: str | None = None
    resources: dict[str, float] = {}
    torch_threads: int | None = Field(default=None, ge=1)
    device: str = "cpu"
    env: dict[str, str] = {}  # extra environment of the model's actor (e.g. OMP_WAIT_POLICY)


class ServeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    chain: str = DEFAULT_CHAIN
    dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"
    draft_lens: list[int] | None = None
    draft_confidence: float = Field(default=0.0, ge=0.0, lt=1.0)
    adaptive: bool = False
    pipeline: bool = False
    model_name: str | None = None
    default_max_tokens: int = Field(default=256, ge=1)
    grpc_host: str = "127.0.0.1"  # the public gRPC API (protos/specrouter/v1/specrouter.proto)
    grpc_port: int | None = Field(default=9000, ge=0)  # 0: any free port; null: no gRPC
    placement: dict[str, PlacementConfig] = {}

    @model_validator(mode="after")
    def _chain_parses(self):
        specs = parse_chain(self.chain)  # ValueError -> a validation error naming the chain
        if self.draft_lens is not None and len(self.draft_lens) != len(specs) - 1:
            raise ValueError(f"draft_lens needs one length per drafter ({len(specs) - 1}), got {self.draft_lens}")
        return self

    @property
    def served_name(self) -> str:
        return self.model_name or parse_chain(self.chain)[-1].label

    @classmethod
    def from_file(cls, path: str | Path) -> "ServeConfig":
        import yaml

        return cls.model_validate(yaml.safe_load(Path(path).read_text()) or {})
