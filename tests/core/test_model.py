import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_llama
from specrouter.core.model import ModelView, apply_rotary_pos_emb, load_hf_model


def test_forward_with_explicit_positions_matches_transformers(tmp_path):
    model = tiny_llama(0, 300)
    ids = torch.randint(0, 300, (1, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = model(ids).logits[0]  # [S, V]
    view = ModelView(model)
    cache = view.new_cache()
    prefill = view.forward(ids[0, :12].tolist(), 0, cache, 12)
    block = view.forward(ids[0, 12:].tolist(), 12, cache, 8)  # continues from the cache
    torch.testing.assert_close(torch.cat([prefill, block]), reference, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_embedding_has_the_bits_of_transformers(dtype):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb as reference

    gen = torch.Generator().manual_seed(0)
    q, k = (torch.randn(1, heads, 5, 64, generator=gen).to(dtype) for heads in (6, 2))  # [1, H, N, D]
    cos, sin = (torch.randn(1, 5, 64, generator=gen).to(dtype) for _ in range(2))  # [1, N, D]
    for ours, theirs in zip(apply_rotary_pos_emb(q, k, cos, sin), reference(q, k, cos, sin)):
        assert torch.equal(ours, theirs)


def test_smollm2_forward_matches_transformers(smollm2_dir):
    model, tokenizer = load_hf_model(str(smollm2_dir), "float32")
    ids = tokenizer("def add(a, b):\n    return a + b\n", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        reference = model(ids).logits[0, -3:]
    view = ModelView(model)
    ours = view.forward(ids[0].tolist(), 0, view.new_cache(), 3)
    torch.testing.assert_close(ours, reference, atol=1e-4, rtol=1e-4)


def test_skip_view_shares_weights_and_runs_fewer_layers():
    model = tiny_llama(0, 300)
    full, slim = ModelView(model), ModelView(model, (1, 2))
    assert len(slim.layers) == 2 and all(a is b for a, b in zip(slim.layers, [model.model.layers[0], model.model.layers[3]]))
    ids = list(range(10))
    assert not torch.allclose(full.forward(ids, 0, full.new_cache(), 1), slim.forward(ids, 0, slim.new_cache(), 1))


def test_invalid_skip_layers_are_rejected():
    model = tiny_llama(0, 300)
    with pytest.raises(ValueError):
        ModelView(model, (7,))
    with pytest.raises(ValueError):
        ModelView(model, (0, 1, 2, 3))


def test_cache_grows_past_its_first_chunk():
    model = tiny_llama(0, 300)
    view = ModelView(model)
    cache = view.new_cache()
    ids = torch.randint(0, 300, (300,), generator=torch.Generator().manual_seed(1)).tolist()
    view.forward(ids[:200], 0, cache, 1)
    last = view.forward(ids[200:], 200, cache, 1)
    assert cache.capacity >= 300
    torch.testing.assert_close(last, view.forward(ids, 0, view.new_cache(), 1), atol=1e-5, rtol=1e-5)


def test_batched_forward_equals_each_sequence_alone():
    """Ragged batch: 16 sequences, each at its own position with its own cache and new-token count
    (prefills mixed with single tokens and blocks), equal to running each alone."""
    from specrouter.core.model import SeqBlock

    view = ModelView(tiny_llama(0, 300))
    gen = torch.Generator().manual_seed(3)
    alone, blocks, histories = [], [], []
    for b in range(16):
        cached = torch.randint(0, 300, (b * 7 % 23,), generator=gen).tolist()  # 0..22 cached tokens
        new = torch.randint(0, 300, (1 + b % 5 if cached else 9,), generator=gen).tolist()
        solo, shared = view.new_cache(), view.new_cache()
        if cached:
            view.forward(cached, 0, solo, 1)
            view.forward(cached + [1, 2, 3], 0, shared, 1)  # stale tokens beyond the cached prefix
        num_logits = min(len(new), 1 + b % 3)
        alone.append(view.forward(new, len(cached), solo, num_logits))
        blocks.append(SeqBlock(new, len(cached), shared, num_logits))
        histories.append(cached + new)
    batched = view.forward_batch(blocks)
    for a, b in zip(alone, batched):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
        assert torch.equal(b.argmax(-1), a.argmax(-1))
    # the shared caches now hold exactly each history: one more token continues as a fresh full pass
    follow = view.forward_batch([SeqBlock([7], len(hist), blk.cache, 1) for blk, hist in zip(blocks, histories)])
    for hist, out in zip(histories, follow):
        torch.testing.assert_close(out, view.forward(hist + [7], 0, view.new_cache(), 1), atol=1e-5, rtol=1e-5)


def tiny_qwen2(seed: int, vocab_size: int):
    """A tiny random Qwen2 (biases on q/k/v, unlike Llama)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0, 0.5)  # random init leaves them zero
    return model


@pytest.mark.parametrize("make", [tiny_llama, tiny_qwen2], ids=["llama", "qwen2-biases"])
def test_fused_projections_compute_the_same_logits_without_the_separate_weights(make):
    import copy

    from specrouter.core.model import fuse_projections

    model = make(0, 300)
    fused = copy.deepcopy(model)
    for layer in fused.model.layers:
        fuse_projections(layer)
    attn, mlp = fused.model.layers[0].self_attn, fused.model.layers[0].mlp
    assert not any(hasattr(attn, n) for n in ("q_proj", "k_proj", "v_proj")) and not hasattr(mlp, "gate_proj")
    ids = torch.randint(0, 300, (24,), generator=torch.Generator().manual_seed(2)).tolist()
    plain, ours = ModelView(model), ModelView(fused)
    torch.testing.assert_close(ours.forward(ids, 0, ours.new_cache(), 24), plain.forward(ids, 0, plain.new_cache(), 24), atol=1e-5, rtol=1e-5)


def test_int8_model_with_fused_projections_equals_int8_quantisation_of_each_projection():
    """Dynamic int8 quantises each matmul's input with one scale: q, k and v (gate and up) read the same
    input, so fusing them changes no output, while running 4 quantised matmuls a layer instead of 7."""
    import copy
    import warnings

    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    from specrouter.core.model import quantize_int8

    model = tiny_qwen2(1, 300)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        separate = quantize_dynamic(copy.deepcopy(model), {torch.nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8)
    fused = quantize_int8(copy.deepcopy(model))
    qkv = fused.model.layers[0].self_attn.qkv_proj.linear
    assert type(qkv).__name__ == "Linear" and "quantized" in type(qkv).__module__
    ids = torch.randint(0, 300, (24,), generator=torch.Generator().manual_seed(3)).tolist()
    a, b = ModelView(separate), ModelView(fused)
    expected, got = a.forward(ids, 0, a.new_cache(), 24), b.forward(ids, 0, b.new_cache(), 24)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(got.argmax(-1), expected.argmax(-1))


def test_int8_tokens_of_outlying_magnitude_are_quantised_apart_from_the_rest():
    """One token 30x the others' magnitude (Qwen2.5's first token) no longer sets the others' scale:
    they come out as if quantised alone, the outlier as if alone too, and a single token is as before."""
    import warnings

    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    from specrouter.core.model import RowBandedLinear

    torch.manual_seed(0)
    plain = torch.nn.Sequential(torch.nn.Linear(64, 32))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantised = quantize_dynamic(plain, {torch.nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8)[0]
    banded = RowBandedLinear(quantised)
    x = torch.randn(1, 20, 64)  # [1, N, in]
    x[0, 0] *= 30.0
    got = banded(x)
    torch.testing.assert_close(got[0, 1:], quantised(x[0, 1:]), atol=0, rtol=0)
    torch.testing.assert_close(got[0, :1], quantised(x[0, :1]), atol=0, rtol=0)
    exact = plain(x)[0, 1:]
    assert (got[0, 1:] - exact).abs().mean() < 0.25 * (quantised(x)[0, 1:] - exact).abs().mean()
    torch.testing.assert_close(banded(x[:, :1]), quantised(x[:, :1]), atol=0, rtol=0)
    no_outlier = x[:, 1:]
    torch.testing.assert_close(banded(no_outlier), quantised(no_outlier), atol=0, rtol=0)


LAYOUTS = {  # each weight-only Linear's storage, and its error bound as a share of the output's range
    "w8": (lambda q: q.weight.dtype == torch.int8 and q.scales.shape == (96,), 0.02),  # per-channel int8
    "w4": (lambda q: q.scales_and_zeros.shape == (256 // 32, 96, 2), 0.15),  # 16 levels a group of 32; 96 = 6 x 16: no padding
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("quant", sorted(LAYOUTS))
def test_weight_only_linear_computes_each_row_alone_within_its_quantisation_error(quant, dtype):
    from specrouter.core.model import WEIGHT_ONLY

    laid_out, bound = LAYOUTS[quant]
    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 96, bias=True).to(dtype)
    quantised = WEIGHT_ONLY[quant](linear)
    assert laid_out(quantised)
    x = torch.randn(2, 5, 256, dtype=dtype)
    out = quantised(x)  # [2, 5, 96]
    assert out.shape == (2, 5, 96) and out.dtype == dtype
    for row in range(5):  # a row's result does not depend on the rows beside it
        assert torch.equal(quantised(x[:, row : row + 1]), out[:, row : row + 1])
    exact = linear(x).float()
    assert (out.float() - exact).abs().max() < bound * exact.abs().max()


def test_int4_weight_linear_reproduces_weights_already_on_a_4_bit_grid():
    from specrouter.core.model import Int4WeightLinear

    torch.manual_seed(1)
    codes = torch.randint(0, 16, (64, 128)).float()
    codes[:, ::32], codes[:, 1::32] = 0, 15  # every group spans the whole grid, as Q4_K's sub-blocks may
    scale = torch.rand(64, 4, 1) * 0.1 + 0.01  # [out, groups, 1]
    low = torch.randn(64, 4, 1) * 0.1
    weight = (codes.view(64, 4, 32) * scale + low).view(64, 128)
    linear = torch.nn.Linear(128, 64, bias=False)
    with torch.no_grad():
        linear.weight.copy_(weight)
    x = torch.randn(3, 128)
    torch.testing.assert_close(Int4WeightLinear(linear)(x), x @ weight.T, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("quant", ["w8", "w4"])
def test_weight_only_model_quantises_every_linear_and_stays_close_to_its_source(quant):
    from specrouter.core.model import WEIGHT_ONLY, quantize_weights

    linear_kind = WEIGHT_ONLY[quant]
    model = tiny_llama(0, 300)
    quantised = quantize_weights(tiny_llama(0, 300), linear_kind)
    assert not any(isinstance(m, torch.nn.Linear) for m in quantised.modules())
    assert sum(isinstance(m, linear_kind) for m in quantised.modules()) == 4 * 4 + 1  # qkv, o, gate_up, down; LM head
    ids = [1, 5, 9, 200, 17]
    exact = ModelView(model).forward(ids, 0, ModelView(model).new_cache(), len(ids))
    close = ModelView(quantised).forward(ids, 0, ModelView(quantised).new_cache(), len(ids))
    similarity = F.cosine_similarity(exact - exact.mean(-1, keepdim=True), close - close.mean(-1, keepdim=True), dim=-1)
    assert similarity.min() > 0.95, similarity  # int8: 0.9999, int4: 0.98


@pytest.mark.parametrize("quant", ["w8", "w4"])
def test_weight_only_quantised_view_gives_blocks_the_bits_of_target_only_decoding_in_bf16(quant):
    from specrouter.core.model import ROW_EXACT_TOKENS, WEIGHT_ONLY, quantize_weights

    view = ModelView(quantize_weights(tiny_llama(3, 304).to(torch.bfloat16), WEIGHT_ONLY[quant]))
    assert view.exact_width == ROW_EXACT_TOKENS and ModelView(tiny_llama(3, 304)).exact_width is None
    ids = [(7 * i + 3) % 304 for i in range(40)]
    alone = view.new_cache()  # target-only decoding: a prefill, then one token a pass
    decoded = torch.cat([view.forward(ids[:30], 0, alone, 1)] + [view.forward([t], 30 + i, alone, 1) for i, t in enumerate(ids[30:38])])
    cache = view.new_cache()  # a chain's first pass: the prompt and a drafted block at once
    assert torch.equal(view.forward(ids[:34], 0, cache, 5), decoded[:5])
    assert torch.equal(view.forward(ids[34:38], 34, cache, 4), decoded[5:])  # a verification block after it
    assert torch.equal(view.forward(ids[33:38], 33, cache, 5), decoded[4:])  # rolled back a token and verified again


def test_a_saved_tokenizer_loads_as_its_own_class_does(qwen_tokenizer_dir, smollm2_dir):
    from transformers import AutoTokenizer

    from specrouter.core.model import load_hf_tokenizer

    texts = ["def fib(n):\n    return n", "  spaces\tand tabs\n\n", "héllo wörld 你好 🙂", "<|im_end|> in text", "", " "]
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Write fizzbuzz."},
                    {"role": "assistant", "content": "ok"}, {"role": "user", "content": "again"}]
    gen = torch.Generator().manual_seed(0)
    for path in (qwen_tokenizer_dir, smollm2_dir):
        ours, theirs = load_hf_tokenizer(path), AutoTokenizer.from_pretrained(path)
        assert ours.get_vocab() == theirs.get_vocab() and ours.all_special_ids == theirs.all_special_ids
        assert ours.eos_token_id == theirs.eos_token_id
        assert [ours.encode(t) for t in texts] == [theirs.encode(t) for t in texts]
        for ids in torch.randint(0, len(theirs), (50, 12), generator=gen).tolist():
            assert ours.decode(ids) == theirs.decode(ids)
            assert ours.decode(ids, skip_special_tokens=True) == theirs.decode(ids, skip_special_tokens=True)
        for prompt in (True, False):
            assert (ours.apply_chat_template(conversation, tokenize=False, add_generation_prompt=prompt)
                    == theirs.apply_chat_template(conversation, tokenize=False, add_generation_prompt=prompt))
