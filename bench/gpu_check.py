"""The torch backend on one CUDA GPU, in bf16: the cost of a pass over k new tokens for the target and
the drafter (what the router's latency model needs there), and end-to-end tokens/s of target-only
decoding against the chains that are best on CPU. Runs in a few minutes; nothing else needs a GPU.

    .venv/bin/python bench/gpu_check.py [--out DIR] [--max-tokens 128]
    .venv/bin/python bench/gpu_check.py --device cpu --prompts 2 --max-tokens 8   # a smoke run of the script itself

On a device machine with PyTorch and CUDA but no network: `bash bench/device/prepare.sh` here, then
`bash bench/device/gpu_check.sh` there, carrying `.whl` and `.devcache` with the working tree.

With the catalog's Qwen2.5-Coder models prepared (`specrouter models --prepare ...`) it runs them on
HumanEval/ShareGPT prompts and reports the identical-output rate; on a machine without them it runs
randomly initialised models of the same shapes (`--random`): pass costs and overheads are real,
acceptance is not (a random drafter agrees with nothing), and neither is the identical-output rate
(bf16 passes of several tokens round differently from one-token passes, and a random model's
near-uniform logits turn that into flipped near-ties). Writes gpu-check-<timestamp>.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from report import write_result  # noqa: E402

from specrouter.core import catalog  # noqa: E402
from specrouter.engine.engine import Engine  # noqa: E402
from specrouter.core.model import ModelView  # noqa: E402

TARGET, DRAFT = "qwen2.5-coder-1.5b", "qwen2.5-coder-0.5b"
SHAPES = {  # Qwen2.5-Coder-1.5B and -0.5B
    TARGET: dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2),
    DRAFT: dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2),
}
CHAINS = {"target-only": (TARGET, None), "0.5B -> 1.5B": (f"{DRAFT},{TARGET}", [6]),
          "ngram -> 0.5B -> 1.5B": (f"ngram,{DRAFT},{TARGET}", [3, 6]), "ngram -> 1.5B": (f"ngram,{TARGET}", [6])}


def random_model_dirs(root: Path) -> dict[str, str]:
    """Random models of the catalog's shapes, saved with a tokenizer of the right vocabulary size."""
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    dirs = {}
    for name, shape in SHAPES.items():
        path = root / name
        if not path.exists():
            config = Qwen2Config(vocab_size=151936, max_position_embeddings=32768, tie_word_embeddings=name == DRAFT, **shape)
            Qwen2ForCausalLM(config).to(torch.bfloat16).save_pretrained(path)
            tokenizer_dir = catalog.tokenizer_dir(TARGET)
            if (tokenizer_dir / "tokenizer.json").exists():
                AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(path)
        dirs[name] = str(path)
    return dirs


def synchronize(device: str) -> None:
    """Wait for the device's queued work (a CUDA device runs kernels asynchronously; a CPU does not)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def pass_costs(view: ModelView, device: str, context: int = 256, ks=(1, 2, 4, 8, 16), reps: int = 20) -> dict[int, float]:
    """Median ms of one pass over k new tokens after `context` cached tokens (device-synchronised)."""
    cache = view.new_cache()
    view.forward(list(range(100, 100 + context)), 0, cache, 1)
    out = {}
    for k in ks:
        times = []
        for _ in range(reps):
            synchronize(device)
            t0 = time.perf_counter()
            view.forward(list(range(500, 500 + k)), context, cache, k)
            synchronize(device)
            times.append(time.perf_counter() - t0)
        out[k] = round(sorted(times)[reps // 2] * 1e3, 3)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--random", action="store_true", help="random models of the catalog's shapes (no weights needed)")
    parser.add_argument("--random-dir", default=None, help="where --random writes its models (default: OUT/.gpu-check-models)")
    parser.add_argument("--device", default="cuda", help="cuda (the check), or cpu for a smoke run of the script")
    args = parser.parse_args()
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device")

    real = not args.random and all(catalog.is_prepared(n) for n in SHAPES)
    names = {n: n for n in SHAPES} if real else random_model_dirs(Path(args.random_dir or Path(args.out) / ".gpu-check-models"))
    results: dict = {"real_weights": real, "dtype": "bfloat16", "device": args.device}

    engines = {label: Engine(",".join(names.get(part, part) for part in chain.split(",")), dtype="bfloat16", device=args.device,
                             draft_lens=lens) for label, (chain, lens) in CHAINS.items()}
    target_engine = engines["target-only"]
    results["pass_ms_by_k"] = {}
    for name in SHAPES:
        level = next(lv for e in engines.values() for n, lv in e.levels.items() if n == names[name])
        results["pass_ms_by_k"][name] = pass_costs(level.worker.view, args.device)

    if real:
        from workloads import encode, humaneval, sharegpt

        prompts = [encode(target_engine.tokenizer, p) for p in humaneval(args.prompts // 2) + sharegpt(args.prompts - args.prompts // 2)]
    else:
        prompts = [[(7 * i + 13 * j) % 150000 + 100 for j in range(64 + 16 * i)] for i in range(args.prompts)]
    reference = None
    results["chains"] = {}
    for label, engine in engines.items():
        engine.generate(prompts[0], 8, ignore_eos=True)  # warm-up (CUDA kernels, allocator)
        outs, tokens, seconds, steps = [], 0, 0.0, 0
        for ids in prompts:
            synchronize(args.device)
            result = engine.generate(ids, args.max_tokens, ignore_eos=not real)
            synchronize(args.device)
            outs.append(result.token_ids)
            tokens, seconds, steps = tokens + len(result.token_ids), seconds + result.elapsed_s, steps + result.num_steps
        reference = reference or outs
        results["chains"][label] = {"tokens_per_s": round(tokens / seconds, 2), "tokens_per_target_pass": round(tokens / steps, 2),
                                    "identical_to_target_only": round(sum(a == b for a, b in zip(outs, reference)) / len(outs), 3)}
        print(label, results["chains"][label], flush=True)

    path = write_result("gpu-check", results, args.out)
    print(json.dumps(results["pass_ms_by_k"]), f"\nwrote {path}")


if __name__ == "__main__":
    main()
