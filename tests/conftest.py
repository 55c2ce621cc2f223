"""Shared fixtures: tiny random Llama models (milliseconds to load) and the real SmolLM2-135M."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from specrouter import catalog
from specrouter.levels import ModelLevel
from specrouter.model import ModelView
from specrouter.worker import ModelWorker

torch.set_num_threads(2)


def tiny_llama(seed: int, vocab_size: int, init_std: float = 0.02, layers: int = 4) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        initializer_range=init_std,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def perturbed(model: LlamaForCausalLM, seed: int, noise: float) -> LlamaForCausalLM:
    """A copy of `model` with Gaussian noise on every weight: a draft of controllable similarity."""
    copy = LlamaForCausalLM(model.config).eval()
    copy.load_state_dict(model.state_dict())
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in copy.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * noise * p.std().clamp_min(1e-3))
    return copy


def model_level(model, name: str, skip: tuple[int, ...] = ()) -> ModelLevel:
    return ModelLevel(name, ModelWorker(name, ModelView(model, skip)))


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    return catalog.prepare("smollm2-135m")


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory, smollm2_dir) -> dict[str, str]:
    """Tiny random models on SmolLM2's real tokenizer, saved like any HF checkpoint."""
    root = tmp_path_factory.mktemp("tiny")
    vocab = 49152
    target = tiny_llama(0, vocab)
    models = {"target": target, "draft": perturbed(target, 1, 0.05), "other": tiny_llama(2, vocab, layers=2)}
    paths = {}
    for name, model in models.items():
        path = root / name
        model.save_pretrained(path)
        for f in smollm2_dir.iterdir():
            if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
                shutil.copy(f, path / f.name)
        paths[name] = str(path)
    return paths


@pytest.fixture(scope="session")
def local_ray():
    """One light local Ray for the whole session; stops only what it started."""
    import ray

    from specrouter.runtime import start_local_ray

    started = start_local_ray(num_cpus=8)
    yield ray
    if started:
        ray.shutdown()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def live_server(local_ray, tiny_dirs):
    """SpecRouter served by Ray Serve (HTTP) and its own gRPC API, on tiny fp32 models."""
    from ray import serve

    from specrouter import serve as specrouter_serve
    from specrouter.config import ServeConfig

    config = ServeConfig(chain=f"{tiny_dirs['draft']},{tiny_dirs['target']}", dtype="float32", draft_lens=[3],
                         grpc_port=free_port(), placement={"*": {"num_cpus": 1, "torch_threads": 1}})
    urls = specrouter_serve.start(config, "127.0.0.1", free_port())
    yield {"http": urls.http, "grpc": urls.grpc, "model": config.served_name, "config": config}
    serve.shutdown()
