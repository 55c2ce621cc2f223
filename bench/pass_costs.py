"""What a torch model pass costs on the CPU it runs on, by weight format and block width.

    .venv/bin/python bench/pass_costs.py [--model qwen2.5-coder-1.5b] [--threads 2]

1. One weight matrix of the model's MLP shape (8960 x 1536 for the 1.5B) times N rows, in bf16, int8
   weights (`_weight_int8pack_mm`) and 4-bit weights in groups of 32 (`_weight_int4pack_mm_for_cpu`),
   over 16 distinct matrices in turn so the weights come from memory, not cache.
2. A pass of the whole model over k new tokens after a 128-token prompt (k = 1, 2, 4, 8, 16) for the
   torch formats (bf16, @w8, @w4), and a prefill of 128 tokens.
3. torch.compile of the parts a compiler can fuse in a decode pass (the RMS norms and the MLP) against
   eager, on the fastest format.

Writes bench/results/pass-costs-<timestamp>.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from report import write_result  # noqa: E402

from specrouter.core import catalog  # noqa: E402
from specrouter.core import model as model_module  # noqa: E402
from specrouter.core.model import Int4WeightLinear, Int8WeightLinear, ModelView, load_hf_model  # noqa: E402

PROMPT = 'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n'


def per_call_ms(fn, calls: int, repeat: int = 5) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) / repeat / calls * 1e3


def matmuls(out_features: int, in_features: int, rows: list[int], copies: int = 16) -> dict:
    torch.manual_seed(0)
    linears = [torch.nn.Linear(in_features, out_features, bias=False).to(torch.bfloat16) for _ in range(copies)]
    int8 = [Int8WeightLinear(linear) for linear in linears]
    int4 = [Int4WeightLinear(linear) for linear in linears]
    table = {}
    for n in rows:
        x = torch.randn(n, in_features, dtype=torch.bfloat16)
        with torch.inference_mode():
            table[n] = {
                "bf16_ms": round(per_call_ms(lambda: [m(x) for m in linears], copies), 3),
                "w8_ms": round(per_call_ms(lambda: [m(x) for m in int8], copies), 3),
                "w4_ms": round(per_call_ms(lambda: [m(x) for m in int4], copies), 3),
            }
        print(f"{out_features}x{in_features}, {n} rows: {table[n]}", flush=True)
    return table


def pass_costs(view: ModelView, prompt_ids: list[int], widths: list[int]) -> dict:
    cache = view.new_cache()
    view.forward(prompt_ids, 0, cache, 1)
    start = len(prompt_ids)
    costs = {}
    for k in widths:
        block = prompt_ids[:k]
        costs[k] = round(per_call_ms(lambda: view.forward(block, start, cache, k), 1, repeat=6), 1)
    prefill = prompt_ids[:128]
    costs["prefill_128"] = round(per_call_ms(lambda: view.forward(prefill, 0, view.new_cache(), 1), 1, repeat=2), 1)
    return costs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen2.5-coder-1.5b")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    path = catalog.resolve(args.model)

    result: dict = {"config": vars(args)}
    result["matmul_8960x1536"] = matmuls(8960, 1536, [1, 2, 4, 8, 16])

    widths = [1, 2, 4, 8, 16]
    passes = {}
    for quant in (None, "w8", "w4"):
        model, tokenizer = load_hf_model(path, "bfloat16", quant=quant)
        prompt_ids = tokenizer(PROMPT * 12)["input_ids"][:128]
        view = ModelView(model)
        label = quant or "bf16"
        passes[label] = pass_costs(view, prompt_ids, widths)
        passes[label]["relative"] = {k: round(passes[label][k] / passes[label][1], 2) for k in widths}
        print(label, passes[label], flush=True)
        if quant == "w4":
            eager = pass_costs(view, prompt_ids, [1])[1]
            mlp, norms = model_module._mlp, []
            model_module._mlp = torch.compile(mlp, dynamic=True)
            for layer in model.model.layers:
                for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                    norms.append((norm, norm.forward))
                    norm.forward = torch.compile(norm.forward, dynamic=True)
            compile_start = time.perf_counter()
            pass_costs(view, prompt_ids, [1])
            compile_s = time.perf_counter() - compile_start
            compiled = pass_costs(view, prompt_ids, [1])[1]
            model_module._mlp = mlp
            for norm, forward in norms:
                norm.forward = forward
            result["torch_compile_w4_decode"] = {"eager_ms": eager, "compiled_ms": compiled, "first_call_with_compile_s": round(compile_s, 1),
                                                 "compiled": "norms and MLP of every decoder layer, dynamic shapes"}
            print(result["torch_compile_w4_decode"], flush=True)
        del model, view
    result["model_pass_ms"] = passes
    print(f"wrote {write_result('pass-costs', result, args.out)}")


if __name__ == "__main__":
    main()
