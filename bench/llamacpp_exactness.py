"""Which llama.cpp kernels make a wider pass round differently from one-token decoding, and what a pass
costs with each of them switched off.

    .venv/bin/python bench/llamacpp_exactness.py [--model qwen2.5-coder-1.5b] [--threads 2] [--widest 8]
        [--no-tiled-matmul]

A llama.cpp target verifies a drafted block bit-exactly only while a pass over k tokens gives every
row the bits k one-token passes give (its `exact_width`, measured at load). Two kernel choices in
llama.cpp's CPU backend depend on a pass's row count: repacked Q4_K weights (a vector product for one
row, tiled products from four) and flash attention (one query over 512 or more cached positions is
split across threads and merged; several queries run one by one). For the runtime's set-up and for
each switched off (weights left as in the file: `use_extra_bufts`; attention without flash
attention), this measures the exact width after 16, 320, 700 and 1500 cached positions and the time
of a pass over k = 1, 2, 4, 8, 16, 32 new tokens after 300 (median of 7): verification's cost, which
decides how long a block pays. Weights as in the file take llama.cpp's tiled K-quant products from 8
rows; `--no-tiled-matmul` switches those off for the whole run (GGML_CPU_TILED_MM=0, read once per
process), leaving every row a vector product of its own.

Writes bench/results/llamacpp-exactness-<timestamp>.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import llama_cpp as ll

sys.path.insert(0, str(Path(__file__).parent))
from report import write_result  # noqa: E402

from specrouter.core import catalog  # noqa: E402
from specrouter.core.llamacpp import LlamaCppModel  # noqa: E402

CONTEXTS = (16, 320, 700, 1500)
PASS_WIDTHS = (1, 2, 4, 8, 16, 32)  # passes timed
VARIANTS = {  # name -> (repacked weights, flash attention: llama.cpp's enum, -1 auto)
    "runtime (repacked weights, flash attention)": (True, ll.LLAMA_FLASH_ATTN_TYPE_AUTO),
    "weights as in the file, flash attention": (False, ll.LLAMA_FLASH_ATTN_TYPE_AUTO),
    "weights as in the file, no flash attention": (False, ll.LLAMA_FLASH_ATTN_TYPE_DISABLED),
    "repacked weights, no flash attention": (True, ll.LLAMA_FLASH_ATTN_TYPE_DISABLED),
}


def load(path: Path, threads: int, repack: bool, flash_attn: int) -> LlamaCppModel:
    """The runtime's LlamaCppModel with two of llama.cpp's defaults replaced for this load."""
    model_defaults, context_defaults = ll.llama_model_default_params, ll.llama_context_default_params

    def model_params():
        params = model_defaults()
        params.use_extra_bufts = repack
        return params

    def context_params():
        params = context_defaults()
        params.flash_attn_type = flash_attn
        return params

    ll.llama_model_default_params, ll.llama_context_default_params = model_params, context_params
    try:
        return LlamaCppModel(path, threads=threads, context=4096, max_sequences=2, share_prefixes=False)
    finally:
        ll.llama_model_default_params, ll.llama_context_default_params = model_defaults, context_defaults


def measure(model: LlamaCppModel, widest: int) -> dict:
    seq = model.take_sequence()
    widths = {context: model._exact_width_after(seq, context, widest) for context in CONTEXTS}
    tokens = [(7 * i + 3) % model.vocab_size for i in range(300 + max(PASS_WIDTHS))]
    model.keep_before(seq, 0)
    model.decode([(t, i, seq, False) for i, t in enumerate(tokens[:300])])
    pass_ms = {}
    for k in PASS_WIDTHS:
        times = []
        for _ in range(7):
            model.keep_before(seq, 300)
            start = time.perf_counter()
            model.decode([(tokens[300 + i], 300 + i, seq, True) for i in range(k)])
            times.append(time.perf_counter() - start)
        pass_ms[k] = round(1e3 * statistics.median(times), 1)
    model.drop_sequence(seq, keep=False)
    return {"exact_width_after": widths, "pass_ms_after_300": pass_ms,
            "relative_to_one_token": {k: round(pass_ms[k] / pass_ms[1], 2) for k in PASS_WIDTHS}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen2.5-coder-1.5b")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--widest", type=int, default=8, help="the widest pass probed for bit-exactness")
    parser.add_argument("--no-tiled-matmul", action="store_true", help="llama.cpp's tiled K-quant products off")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    if args.no_tiled_matmul:
        os.environ["GGML_CPU_TILED_MM"] = "0"  # before llama.cpp's first product reads it
    path = catalog.prepare_gguf(args.model)
    variants = {}
    for name, (repack, flash_attn) in VARIANTS.items():
        model = load(path, args.threads, repack, flash_attn)
        variants[name] = measure(model, args.widest)
        del model
        print(f"{name}: {variants[name]}", flush=True)
    print(f"wrote {write_result('llamacpp-exactness', {'config': {**vars(args), 'gguf': path.name}, 'variants': variants}, args.out)}")


if __name__ == "__main__":
    main()
