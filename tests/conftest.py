"""Shared fixtures: tiny random Llama models (milliseconds to load) and the real SmolLM2-135M."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from specrouter.core import catalog
from specrouter.core.levels import ModelLevel
from specrouter.core.model import ModelView
from specrouter.core.worker import DraftCall, DraftResult, ForwardCall, ModelWorker

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


CODE_PROMPT = 'def is_palindrome(text: str) -> bool:\n    """Return True if text reads the same backwards."""\n'
CHAT_PROMPT = "The three primary colors are"


def forward_one(worker, *call_fields, allowed=None, confident: bool = False):
    """One sequence's `forward` on a worker (a batch of one): its p [num_logits, V], with its top
    confidences if `confident`; a refusal is raised."""
    (result,) = worker.forward([ForwardCall(*call_fields, confident=confident)], allowed)
    if isinstance(result, Exception):
        raise result
    return (result.p, result.top) if confident else result.p


def draft_one(worker, *call_fields, allowed=None) -> DraftResult:
    """One sequence's `draft` on a worker (a batch of one); a refusal is raised."""
    (result,) = worker.draft([DraftCall(*call_fields)], allowed)
    if isinstance(result, Exception):
        raise result
    return result


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
    return {name: save_with_tokenizer(model, root / name, smollm2_dir) for name, model in models.items()}


def save_with_tokenizer(model, path: Path, tokenizer_dir: Path) -> str:
    model.save_pretrained(path)
    for f in tokenizer_dir.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(f, path / f.name)
    return str(path)


def transplant(target: LlamaForCausalLM, vocab, own_rows: int, seed: int, noise: float) -> LlamaForCausalLM:
    """A model on another vocabulary that agrees with `target` on the tokens both share: the target's
    decoder layers, and its embedding and head rows copied to the shared tokens' own ids (the rest
    random); then noise on every weight (`perturbed`)."""
    config = LlamaConfig(**{**target.config.to_dict(), "vocab_size": own_rows})
    torch.manual_seed(seed)
    own = LlamaForCausalLM(config).eval()
    state = {k: v for k, v in target.state_dict().items() if "embed_tokens" not in k and "lm_head" not in k}
    own.load_state_dict(state, strict=False)
    with torch.no_grad():
        own.model.embed_tokens.weight[vocab.shared_own] = target.model.embed_tokens.weight[vocab.shared_target]
        own.lm_head.weight[vocab.shared_own] = target.lm_head.weight[vocab.shared_target]
    return perturbed(own, seed, noise)


def write_llama_gguf(model: LlamaForCausalLM, path: Path, tokenizer_gguf: Path) -> Path:
    """`model` as an F32 GGUF of llama.cpp's "llama" architecture, its tokenizer metadata copied from
    `tokenizer_gguf`. Q and K rows are permuted as llama.cpp's converter does: its llama rotary embedding
    rotates adjacent pairs where transformers rotates the two halves of each head."""
    import gguf

    config = model.config
    heads, kv_heads, head_dim = config.num_attention_heads, config.num_key_value_heads, config.hidden_size // config.num_attention_heads

    def halves_to_pairs(w: torch.Tensor, n: int) -> torch.Tensor:
        return w.reshape(n, 2, head_dim // 2, -1).transpose(1, 2).reshape(w.shape)

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"] if getattr(config, "rope_parameters", None) else config.rope_theta)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    for key, field in gguf.GGUFReader(tokenizer_gguf).fields.items():
        if key.startswith("tokenizer."):
            sub = field.types[1] if len(field.types) > 1 else None
            writer.add_key_value(key, field.contents(), field.types[0], sub_type=sub)
    state = {k: v.detach().float() for k, v in model.state_dict().items()}
    tensors = {"token_embd.weight": state["model.embed_tokens.weight"], "output_norm.weight": state["model.norm.weight"],
               "output.weight": state["lm_head.weight"]}
    for i in range(config.num_hidden_layers):
        hf = f"model.layers.{i}."
        tensors.update({
            f"blk.{i}.attn_norm.weight": state[hf + "input_layernorm.weight"],
            f"blk.{i}.attn_q.weight": halves_to_pairs(state[hf + "self_attn.q_proj.weight"], heads),
            f"blk.{i}.attn_k.weight": halves_to_pairs(state[hf + "self_attn.k_proj.weight"], kv_heads),
            f"blk.{i}.attn_v.weight": state[hf + "self_attn.v_proj.weight"],
            f"blk.{i}.attn_output.weight": state[hf + "self_attn.o_proj.weight"],
            f"blk.{i}.ffn_norm.weight": state[hf + "post_attention_layernorm.weight"],
            f"blk.{i}.ffn_gate.weight": state[hf + "mlp.gate_proj.weight"],
            f"blk.{i}.ffn_up.weight": state[hf + "mlp.up_proj.weight"],
            f"blk.{i}.ffn_down.weight": state[hf + "mlp.down_proj.weight"],
        })
    for name, tensor in tensors.items():
        writer.add_tensor(name, tensor.contiguous().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="session")
def tiny_gguf_dirs(tmp_path_factory, smollm2_dir) -> dict[str, str]:
    """The tiny target and drafter of `tiny_dirs` (same seeds) as F32 GGUF files for llama.cpp, each in
    a directory with SmolLM2's tokenizer: `DIR@gguf` levels."""
    root = tmp_path_factory.mktemp("tiny_gguf")
    target = tiny_llama(0, 49152)
    models = {"target": target, "draft": perturbed(target, 1, 0.05)}
    tokenizer_gguf = catalog.prepare_gguf("smollm2-135m")
    dirs = {}
    for name, model in models.items():
        folder = Path(save_with_tokenizer(model, root / name, smollm2_dir))
        write_llama_gguf(model, folder / "model.gguf", tokenizer_gguf)
        dirs[name] = str(folder)
    return dirs


@pytest.fixture(scope="session")
def qwen_tokenizer_dir() -> Path:
    """The real Qwen2.5 tokenizer (CI builds it from the 1.5B's first GGUF part: scripts/test.sh)."""
    return catalog.prepare_tokenizer("qwen2.5-coder-1.5b")


@pytest.fixture(scope="session")
def cross_dirs(tmp_path_factory, smollm2_dir, qwen_tokenizer_dir) -> dict[str, str]:
    """Tiny random models on the two real tokenizers: a target and a close drafter on Qwen's (152k),
    and drafters on SmolLM2's (49k) transplanted from the target, so they agree with it often."""
    from transformers import AutoTokenizer

    from specrouter.core.vocab import vocab_map

    root = tmp_path_factory.mktemp("cross")
    qwen_vocab, smol_vocab = 151936, 49152
    vocab = vocab_map(AutoTokenizer.from_pretrained(smollm2_dir), AutoTokenizer.from_pretrained(qwen_tokenizer_dir), smol_vocab, qwen_vocab)
    target = tiny_llama(20, qwen_vocab, layers=2)
    with torch.no_grad():  # prefer the shared tokens, as real text does: ~1 token in 10 is outside them
        outside = torch.ones(qwen_vocab, dtype=torch.bool)
        outside[vocab.shared_target] = False
        target.lm_head.weight[outside] *= 0.85
    qwen = {"target": target, "qwen-draft": perturbed(target, 21, 0.05)}
    smol = {"smol": transplant(target, vocab, smol_vocab, 22, 0.05), "smol-far": transplant(target, vocab, smol_vocab, 23, 0.3)}
    paths = {name: save_with_tokenizer(model, root / name, qwen_tokenizer_dir) for name, model in qwen.items()}
    paths.update({name: save_with_tokenizer(model, root / name, smollm2_dir) for name, model in smol.items()})
    return paths


@pytest.fixture(scope="session")
def local_ray():
    """One light local Ray for the whole session; stops only what it started."""
    import ray

    from specrouter.runtime.actors import start_local_ray

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

    from specrouter.serving import serve as specrouter_serve
    from specrouter.serving.config import ServeConfig

    config = ServeConfig(chain=f"{tiny_dirs['draft']},{tiny_dirs['target']}", dtype="float32", draft_lens=[3],
                         grpc_port=free_port(), placement={"*": {"num_cpus": 1, "torch_threads": 1}})
    urls = specrouter_serve.start(config, "127.0.0.1", free_port())
    yield {"http": urls.http, "grpc": urls.grpc, "model": config.served_name, "config": config}
    serve.shutdown()


def prompts(n: int, vocab: int, seed: int = 0) -> list[list[int]]:
    """Varied lengths, each with a repeated stretch (so prompt lookup finds something)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        head = torch.randint(0, vocab, (3 + i % 7,), generator=gen).tolist()
        out.append(head + head[: 2 + i % 3] + torch.randint(0, vocab, (1 + i % 4,), generator=gen).tolist())
    return out


def chain_spec(tiny_dirs, chain: str) -> str:
    return ",".join(tiny_dirs.get(name.split("@")[0], name.split("@")[0]) + name[len(name.split("@")[0]):] for name in chain.split(","))


def synthetic_batch_profile(router, target: str, drafter: str, batches=(1, 16)) -> None:
    """Profile an AdaptiveRouter over `drafter` -> `target`: verification cost grows with the batch's
    tokens; acceptance 0.8 (class "default")."""
    from specrouter.core.chain import TimingRecord, VerifyRecord
    from specrouter.routing.router import RequestRoute

    for b in batches:
        router.observe([], [], [TimingRecord(target, "score", n, 0.1 + 0.02 * n * b, b) for n in (1, 2, 4, 8)]
                       + [TimingRecord(drafter, "draft", 4, 4 * (0.02 + 0.002 * b), b)])
    accepted = [0] * 5 + [1] * 4 + [2] * 3 + [3] * 3 + [4] * 10  # blocks of 4 accepted position by position at ~0.8
    past_its_first_step = RequestRoute("default", steps=1)  # a first step would teach no acceptance
    router.observe([past_its_first_step], [[VerifyRecord(drafter, target, 4, n, [0.8] * 4) for n in accepted]])
