"""A transformers causal LM run with explicit positions over our own KV cache.

We keep the model's own modules (embeddings, rotary embedding, projections, MLPs, norms, LM head)
and drive the decoder loop ourselves, gpt-fast style: every forward writes keys/values at explicit
positions `[start, start + S)` and attends to `[0, start + S)`. Whatever the cache holds beyond that
is stale and simply overwritten later, so a rollback is just a smaller `start` next time, and is
idempotent. A "slim" view runs the same weights with some decoder layers skipped; it owns a
separate cache but no copy of any weight.

Supported: Llama-style decoders (Llama, SmolLM2, Qwen2/2.5, Qwen3, Mistral without sliding window).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F


def apply_rotary_pos_emb(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary position embedding of q and k ([1, heads, N, D]) by cos and sin ([1, N, D]), in the
    half-split layout of Llama and Qwen checkpoints: the same operations, in the same order, as
    transformers' modeling code (so a view of a model rounds as the model does)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class UnsupportedModelError(ValueError):
    pass


def load_hf_tokenizer(path: str | Path):
    """A saved transformers tokenizer (a local dir, or an already-cached HF id). A directory with a
    tokenizer.json loads through transformers' generic fast tokenizer, which runs that file as it is:
    the same vocabulary, merges, special tokens and chat template as the model's own class, where a
    class such as Qwen2Tokenizer rebuilds the tokenizer from Python copies of its vocabulary and
    merges and keeps them (Qwen's 151k tokens: 349 MB loaded that way, 159 MB this way)."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if (Path(path) / "tokenizer.json").is_file():
        return PreTrainedTokenizerFast.from_pretrained(path)
    return AutoTokenizer.from_pretrained(path)


def load_hf_model(path: str, dtype: str = "float32", device: str = "cpu", quant: str | None = None, adapter=None):
    """Load a transformers causal LM and its tokenizer from a local dir (or an already-cached HF id).

    adapter: a LoRA adapter directory merged into the weights before any quantisation (an aligned
    drafter: specrouter/core/adapters.py).

    quant="int8": int8 linears with dynamic activation quantisation (CPU). It changes the model's
    distribution, so it is for drafters and intermediate levels only: the target verifies.
    quant="w8": int8 weights, activations in the loaded dtype (`Int8WeightLinear`): a model of its own,
    allowed as a target, whose every token's result is the same in a pass of one token or of many.
    quant="w4": the same with 4-bit weights in groups of 32 (`Int4WeightLinear`, CPU): half of w8's
    bytes again, and a pass of 4 tokens costs little more than a pass of one.
    """
    from transformers import AutoModelForCausalLM

    if quant not in (None, "int8", "w8", "w4"):
        raise ValueError(f"unknown quantisation {quant!r} (supported: int8, w8, w4)")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype]).to(device).eval()
    if adapter is not None:
        from specrouter.core.adapters import merge_adapter

        model = merge_adapter(model, adapter).eval()
    if quant == "int8":
        model = quantize_int8(model)
    elif quant in WEIGHT_ONLY:
        model = quantize_weights(model, WEIGHT_ONLY[quant])
    return model, load_hf_tokenizer(path)


def quantize_int8(model: torch.nn.Module) -> torch.nn.Module:
    """Per-channel int8 weights for every Linear (fbgemm kernels, fp32 activations): faster drafting
    on CPU. Quantises one decoder layer at a time, so peak memory stays near the model's.
    Each layer's projections that read the same input are fused first (`fuse_projections`), so the
    model is for ModelView alone: transformers' own forward no longer finds q_proj or gate_proj.
    The embedding table keeps its loaded dtype (its rows are cast to fp32 as they are looked up):
    the same values, at half the memory of an fp32 copy. Every quantised Linear scales the tokens of
    a pass in bands of magnitude (RowBandedLinear)."""
    import warnings

    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    qconfig = {torch.nn.Linear: per_channel_dynamic_qconfig}
    embed, loaded_dtype = model.get_input_embeddings(), model.dtype
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao's deprecation notices; the API works in the pinned torch
        for layer in model.model.layers:
            fuse_projections(layer)
            quantize_dynamic(layer.float(), qconfig, dtype=torch.qint8, inplace=True)
        model = quantize_dynamic(model.float(), qconfig, dtype=torch.qint8, inplace=True)  # the LM head
    _band_rows(model)
    embed.to(loaded_dtype).register_forward_hook(lambda module, inputs, output: output.float())
    return model


class RowBandedLinear(torch.nn.Module):
    """A dynamically quantised Linear whose input rows are quantised in bands of magnitude.

    Dynamic int8 scales a matmul's whole input by one number, its largest magnitude. A model's first
    token can carry activations many times the median token's (an attention sink), so in a prompt's
    prefill all the other tokens would be quantised to a few levels, and the int8 drafter would draft
    from that cache for the whole request. Here a pass of several tokens is split by each token's largest
    magnitude into bands a `factor` apart (band 0: up to `factor` x the median token's), one matmul
    per band (one unless some token stands out; two in a prefill), so no token is scaled more than
    `factor` x coarser than its own magnitude needs. A pass of one token is unchanged.
    """

    def __init__(self, linear: torch.nn.Module, factor: float = 4.0):
        super().__init__()
        self.linear, self.factor = linear, factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])  # [N, in]
        if rows.shape[0] == 1:
            return self.linear(x)
        magnitude = rows.abs().amax(-1)  # [N]
        ratio = magnitude / magnitude.median().clamp(min=torch.finfo(magnitude.dtype).tiny)  # [N]
        band = torch.log(ratio).div(math.log(self.factor)).floor().clamp(min=0).long()  # [N]
        if not band.any():
            return self.linear(x)
        out = rows.new_empty(rows.shape[0], self.linear.out_features)  # [N, out]
        for b in band.unique().tolist():
            members = (band == b).nonzero().flatten()
            out[members] = self.linear(rows[members])
        return out.view(*x.shape[:-1], -1)


class Int8WeightLinear(torch.nn.Module):
    """A Linear with int8 weights and one scale per output channel, computing in its input's dtype
    (torch's `_weight_int8pack_mm`): a quarter of fp32's bytes, half of bf16's, so a one-token pass,
    which reads every weight once, runs near the memory bound. Each input row is computed on its own,
    so a token's output is bit-identical whether it runs alone or in a pass of many."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        weight = linear.weight.detach().float()  # [out, in]
        scales = weight.abs().amax(dim=1).clamp(min=1e-12) / 127  # [out]
        self.register_buffer("weight", torch.round(weight / scales[:, None]).to(torch.int8))
        self.register_buffer("scales", scales.to(linear.weight.dtype))
        self.bias = None if linear.bias is None else torch.nn.Parameter(linear.bias.detach(), requires_grad=False)
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).to(self.scales.dtype)  # [N, in]
        out = torch.ops.aten._weight_int8pack_mm(rows.contiguous(), self.weight, self.scales)  # [N, out]
        if self.bias is not None:
            out = out + self.bias
        return out.view(*x.shape[:-1], self.out_features)


class Int4WeightLinear(torch.nn.Module):
    """A Linear with 4-bit weights in groups of `group` input channels, each group with its own scale
    and offset (asymmetric min-max; Q4_K's 32-weight sub-blocks have the same shape), computing in its
    input's dtype with torch's CPU kernel `_weight_int4pack_mm_for_cpu`. An eighth of fp32's bytes,
    so a one-token pass reads a quarter of what a bf16 one does. Like Int8WeightLinear, each input row
    is computed on its own: a token's output is bit-identical alone or in a pass of many.

    The kernel is bound by compute past a few rows (about 16 ms a token for a 1.5B model's prefill on
    two AVX-512 cores, against 3 ms for bf16 matmuls), so long prompts prefill slower than in bf16."""

    BLOCK = 16  # the CPU kernel packs output channels in sixteens

    def __init__(self, linear: torch.nn.Linear, group: int = 32):
        super().__init__()
        out_features, in_features = linear.weight.shape
        if in_features % group:
            raise UnsupportedModelError(f"@w4 needs input widths divisible by {group}, not {in_features}")
        if linear.weight.device.type != "cpu":
            raise UnsupportedModelError("@w4 runs on CPU; on a GPU use bf16 or @w8")
        padded = -out_features % self.BLOCK  # pad output channels to whole blocks with zero rows
        weight = F.pad(linear.weight.detach().float(), (0, 0, 0, padded))  # [out', in]
        groups = weight.view(out_features + padded, in_features // group, group)  # [out', G, group]
        low, high = groups.amin(-1), groups.amax(-1)  # [out', G]
        scale = ((high - low) / 15).clamp(min=1e-12)  # [out', G]
        codes = torch.round((groups - low[..., None]) / scale[..., None]).clamp(0, 15)  # [out', G, group] in 0..15
        # The kernel computes weight = (code - 8) * scale + zero, so zero = low + 8 * scale.
        scales_and_zeros = torch.stack([scale, low + 8 * scale], dim=-1).transpose(0, 1)  # [G, out', 2]
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).view(-1, in_features), 1)
        self.register_buffer("weight", packed)
        self.register_buffer("scales_and_zeros", scales_and_zeros.contiguous().to(linear.weight.dtype))
        self.bias = None if linear.bias is None else torch.nn.Parameter(linear.bias.detach(), requires_grad=False)
        self.in_features, self.out_features, self.group = in_features, out_features, group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).to(self.scales_and_zeros.dtype).contiguous()  # [N, in]
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(rows, self.weight, self.group, self.scales_and_zeros)  # [N, out']
        out = out[:, : self.out_features]
        if self.bias is not None:
            out = out + self.bias
        return out.view(*x.shape[:-1], self.out_features)


WEIGHT_ONLY = {"w8": Int8WeightLinear, "w4": Int4WeightLinear}  # a level's weight-only quantisation -> its Linear


def quantize_weights(model: torch.nn.Module, kind: type[torch.nn.Module]) -> torch.nn.Module:
    """Every Linear of `model` (decoder layers, LM head) as a weight-only quantised `kind`
    (Int8WeightLinear or Int4WeightLinear), in place; the projections that read the same input are
    fused first (`fuse_projections`)."""
    for layer in model.model.layers:
        fuse_projections(layer)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, torch.nn.Linear):
                setattr(parent, name, kind(child))
    return model


def _band_rows(model: torch.nn.Module) -> None:
    """Wrap every dynamically quantised Linear of `model` in a RowBandedLinear (in place)."""
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, DynamicLinear):
                setattr(parent, name, RowBandedLinear(child))


def _concat_linears(linears: list[torch.nn.Linear]) -> torch.nn.Linear:
    """One Linear whose output is the given Linears' outputs side by side (biases too, if any)."""
    has_bias = linears[0].bias is not None
    fused = torch.nn.Linear(linears[0].in_features, sum(m.out_features for m in linears), bias=has_bias,
                            dtype=linears[0].weight.dtype, device=linears[0].weight.device)
    with torch.no_grad():
        fused.weight.copy_(torch.cat([m.weight for m in linears]))
        if has_bias:
            fused.bias.copy_(torch.cat([m.bias for m in linears]))
    return fused


def fuse_projections(layer: torch.nn.Module) -> None:
    """Replace q/k/v_proj by one `qkv_proj` and gate/up_proj by one `gate_up_proj` (in place; the old
    weights are freed). Each output element is the same dot product; under dynamic int8 the three (two)
    inputs were the same tensor, quantised with the same scale, so the output is unchanged, for one
    matmul instead of three (two): on CPU a small drafter's time is mostly per-call overhead."""
    attn, mlp = layer.self_attn, layer.mlp
    attn.qkv_sizes = (attn.q_proj.out_features, attn.k_proj.out_features, attn.v_proj.out_features)
    attn.qkv_proj = _concat_linears([attn.q_proj, attn.k_proj, attn.v_proj])
    del attn.q_proj, attn.k_proj, attn.v_proj
    mlp.gate_up_proj = _concat_linears([mlp.gate_proj, mlp.up_proj])
    del mlp.gate_proj, mlp.up_proj


def _qkv(attn: torch.nn.Module, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """h [1, N, H] -> q [1, N, heads * D], k, v [1, N, kv_heads * D]."""
    if hasattr(attn, "qkv_proj"):
        return attn.qkv_proj(h).split(attn.qkv_sizes, dim=-1)
    return attn.q_proj(h), attn.k_proj(h), attn.v_proj(h)


def _mlp(mlp: torch.nn.Module, h: torch.Tensor) -> torch.Tensor:
    """down(act(gate(h)) * up(h)), h [1, N, H]."""
    if hasattr(mlp, "gate_up_proj"):
        gate, up = mlp.gate_up_proj(h).chunk(2, dim=-1)
        return mlp.down_proj(mlp.act_fn(gate) * up)
    return mlp(h)


class KVCache:
    """Keys and values of one sequence for each decoder layer of one model view.

    Storage grows in chunks; only positions `[0, end)` of the latest forward are meaningful.
    """

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype, device, chunk: int = 256):
        self.shape = (1, num_kv_heads, 0, head_dim)  # [B, H_kv, T, D]
        self.dtype, self.device, self.chunk = dtype, device, chunk
        self.keys = [torch.empty(self.shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.empty(self.shape, dtype=dtype, device=device) for _ in range(num_layers)]

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2] if self.keys else 0

    def reserve(self, end: int) -> None:
        if end <= self.capacity:
            return
        new_cap = max(end, 2 * self.capacity, self.chunk)
        new_cap = (new_cap + self.chunk - 1) // self.chunk * self.chunk
        for store in (self.keys, self.values):
            for i, old in enumerate(store):
                grown = torch.empty((*old.shape[:2], new_cap, old.shape[3]), dtype=self.dtype, device=self.device)
                grown[:, :, : old.shape[2]] = old
                store[i] = grown

    def write(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v [B, H_kv, S, D] at positions [start, start+S); return views over [0, start+S)."""
        end = start + k.shape[2]
        self.keys[layer][:, :, start:end] = k
        self.values[layer][:, :, start:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]


# A pass's rows whose logits are asked for, up to this many (a verification block and the token before
# it; a prefill's last token), attend one query at a time, each over its own prefix, exactly as a
# one-token pass does: fused attention over many queries rounds differently. The rows before them (a
# prompt) attend fused, as the same prompt's prefill does alone. With row-independent Linears (w8, w4)
# a token's logits then have the same bits whether its pass verifies a block, prefills, or decodes it.
ROW_EXACT_TOKENS = 16


@dataclass(frozen=True)
class ModelView:
    """The decoder of a loaded model with `skip_layers` removed; shares every weight with the model."""

    hf_model: torch.nn.Module
    skip_layers: tuple[int, ...] = ()

    def __post_init__(self):
        config = self.hf_model.config
        inner = self.hf_model.model
        needed = ("embed_tokens", "layers", "norm", "rotary_emb")
        if not all(hasattr(inner, n) for n in needed) or not hasattr(self.hf_model, "lm_head"):
            raise UnsupportedModelError(f"{type(self.hf_model).__name__}: only Llama-style decoders are supported")
        layer_types = getattr(config, "layer_types", None) or []
        if getattr(config, "use_sliding_window", False) and "sliding_attention" in layer_types:
            raise UnsupportedModelError("sliding-window attention is not supported")
        n = config.num_hidden_layers
        bad = [i for i in self.skip_layers if not 0 <= i < n]
        if bad or len(set(self.skip_layers)) >= n:
            raise ValueError(f"skip_layers {self.skip_layers} invalid for a {n}-layer model")

    @property
    def layers(self) -> list[torch.nn.Module]:
        skip = set(self.skip_layers)
        return [layer for i, layer in enumerate(self.hf_model.model.layers) if i not in skip]

    @property
    def vocab_size(self) -> int:
        return self.hf_model.config.vocab_size

    @property
    def device(self) -> torch.device:
        return self.hf_model.model.embed_tokens.weight.device

    @property
    def max_positions(self) -> int:
        return self.hf_model.config.max_position_embeddings

    @property
    def kv_pool(self) -> "KVPool | None":
        """None: each sequence's KV cache grows on its own (no shared pool to run out of)."""
        return None

    @property
    def exact_width(self) -> int | None:
        """The widest pass whose rows are bit-identical to one-token passes: ROW_EXACT_TOKENS when every
        Linear computes each row alone (w8, w4). None otherwise (no cap): dense bf16 matmuls round
        differently at different widths, fp32 ones rarely enough that exactness is proven in fp32 (tests)."""
        weight_only = tuple(WEIGHT_ONLY.values())
        linears = [m for m in self.hf_model.modules() if isinstance(m, (torch.nn.Linear, *weight_only))]
        if all(isinstance(m, weight_only) for m in linears):
            return ROW_EXACT_TOKENS
        return None

    def new_cache(self) -> KVCache:
        config = self.hf_model.config
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        compute_dtype = self.hf_model.model.norm.weight.dtype  # fp32 for int8 models, whose embeddings stay bf16
        return KVCache(len(self.layers), config.num_key_value_heads, head_dim, compute_dtype, self.device)

    def forward(self, token_ids: list[int], start: int, cache: KVCache, num_logits: int) -> torch.Tensor:
        """Run `token_ids` at positions [start, start+S); return float32 logits [num_logits, V] of the last rows."""
        return self.forward_batch([SeqBlock(token_ids, start, cache, num_logits)])[0]

    @torch.inference_mode()
    def forward_batch(self, blocks: list["SeqBlock"]) -> list[torch.Tensor]:
        """One pass over many sequences, ragged: sequence b runs its S_b tokens at positions
        [start_b, start_b + S_b) over its own cache and gets float32 logits [num_logits_b, V].

        The tokens of all sequences are packed into one row of N = sum(S_b) tokens, so every weight
        matmul (embedding, projections, MLP, LM head) runs once for the batch with no padding;
        attention runs per sequence over that sequence's own cache prefix [0, start_b + S_b), causal
        within its new tokens, its last num_logits_b rows one query at a time (ROW_EXACT_TOKENS). Each
        sequence's result equals running it alone (to float rounding), except on int8 views: dynamic
        quantisation scales activations per tensor, so a drafter's distributions can depend on its
        batch-mates (drafts only; the target verifies at full precision)."""
        inner = self.hf_model.model
        device = self.device
        check_blocks(blocks, self.max_positions)
        for b in blocks:
            b.cache.reserve(b.start + len(b.token_ids))
        lens = [len(b.token_ids) for b in blocks]
        offsets = [sum(lens[:i]) for i in range(len(blocks))]  # where sequence b's tokens begin in the packed row
        total = sum(lens)
        ids = torch.tensor([[t for b in blocks for t in b.token_ids]], dtype=torch.long, device=device)  # [1, N]
        positions = torch.cat([torch.arange(b.start, b.start + n, device=device) for b, n in zip(blocks, lens)])[None]  # [1, N]
        x = inner.embed_tokens(ids)  # [1, N, H]
        cos, sin = inner.rotary_emb(x, positions)  # [1, N, D] each
        fused = [n - b.num_logits if b.num_logits <= ROW_EXACT_TOKENS else n for b, n in zip(blocks, lens)]  # rows attending fused
        # Fused query i of sequence b (at position start_b+i) sees keys 0..start_b+i; a single query sees everything.
        masks = [
            torch.arange(b.start + f, device=device)[None, :] <= torch.arange(b.start, b.start + f, device=device)[:, None]
            if f > 1 else None
            for b, f in zip(blocks, fused)
        ]  # [F_b, start_b+F_b] each
        for li, layer in enumerate(self.layers):
            attn = layer.self_attn
            h = layer.input_layernorm(x)
            shape = (1, total, -1, attn.head_dim)
            q, k, v = (t.reshape(shape) for t in _qkv(attn, h))  # [1, N, heads, D]
            if hasattr(attn, "q_norm"):  # Qwen3-style per-head norms
                q, k = attn.q_norm(q), attn.k_norm(k)
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [1, heads, N, D]
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            outs = []
            for b, n, off, f, mask in zip(blocks, lens, offsets, fused, masks):
                k_all, v_all = b.cache.write(li, b.start, k[:, :, off : off + n], v[:, :, off : off + n])  # [1, H_kv, start_b+S_b, D]
                if f:
                    outs.append(F.scaled_dot_product_attention(q[:, :, off : off + f], k_all[:, :, : b.start + f], v_all[:, :, : b.start + f],
                                                               attn_mask=mask, scale=attn.scaling, enable_gqa=True))
                for i in range(f, n):  # each query alone over its own prefix: the bits of a one-token pass
                    end = b.start + i + 1
                    outs.append(F.scaled_dot_product_attention(q[:, :, off + i : off + i + 1], k_all[:, :, :end], v_all[:, :, :end],
                                                               scale=attn.scaling, enable_gqa=True))
            o = torch.cat(outs, dim=2) if len(outs) > 1 else outs[0]  # [1, heads, N, D]
            x = x + attn.o_proj(o.transpose(1, 2).reshape(1, total, -1))
            x = x + _mlp(layer.mlp, layer.post_attention_layernorm(x))
        last = torch.cat([torch.arange(off + n - b.num_logits, off + n, device=device) for b, n, off in zip(blocks, lens, offsets)])
        logits = self.hf_model.lm_head(inner.norm(x[:, last]))[0].float()  # [sum(num_logits_b), V]
        return list(logits.split([b.num_logits for b in blocks]))


def check_blocks(blocks: list["SeqBlock"], max_positions: int) -> None:
    """Refuse a batch that a view of any backend cannot run: an empty block, or one past the positions."""
    for b in blocks:
        if not b.token_ids:
            raise ValueError("every sequence in a batch needs at least one token")
        if b.start + len(b.token_ids) > max_positions:
            raise ValueError(f"sequence of {b.start + len(b.token_ids)} tokens exceeds the model's {max_positions} positions")


@dataclass(frozen=True)
class KVPool:
    """A model's KV cache as one pool shared by all its sequences (llama.cpp): positions and sequence
    slots, all sequences together. The generation loop admits requests while theirs fit."""

    positions: int
    sequences: int


@dataclass(frozen=True)
class SeqBlock:
    """One sequence's part of a batched forward: tokens to run at [start, start+len) over `cache`,
    and how many of the last rows' logits to return."""

    token_ids: list[int]
    start: int
    cache: KVCache
    num_logits: int
