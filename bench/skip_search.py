"""Pick which decoder layers a slim (skip-layer) level should skip, by measured greedy agreement.

For each layer alone, skipping it is scored by teacher-forced greedy agreement with the full model
on target-generated continuations of code and chat prompts; the least important layers form the
candidate set, whose agreement is then measured against the heuristic default.

    .venv/bin/python bench/skip_search.py --model qwen2.5-coder-1.5b --skip 7
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from workloads import encode, humaneval, sharegpt  # noqa: E402

from specrouter.engine.engine import Engine  # noqa: E402
from specrouter.core.spec import default_skip_layers  # noqa: E402
from specrouter.core.store import ModelStore  # noqa: E402
from specrouter.core.model import ModelView  # noqa: E402


def agreement(model, sequences: list[tuple[list[int], int]], skip: tuple[int, ...], reference: list[torch.Tensor]) -> float:
    view = ModelView(model, skip)
    hits = total = 0
    for (ids, prompt_len), ref in zip(sequences, reference):
        pred = view.forward(ids, 0, view.new_cache(), len(ids) - prompt_len).argmax(-1)
        hits += int((pred == ref).sum())
        total += len(ref)
    return hits / total


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="qwen2.5-coder-1.5b")
    parser.add_argument("--skip", type=int, default=7, help="how many layers to skip")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--dtype", default="bfloat16")
    args = parser.parse_args()
    torch.set_num_threads(2)
    store = ModelStore(args.dtype)
    engine = Engine(args.model, provider=store)
    model, tokenizer = store.get(args.model).model, engine.tokenizer
    sequences = []
    for prompt in humaneval(2) + sharegpt(2):
        ids = encode(tokenizer, prompt)
        out = engine.generate(ids, args.tokens, ignore_eos=True)
        sequences.append((ids + out.token_ids, len(ids)))
    full = ModelView(model)
    reference = [full.forward(ids, 0, full.new_cache(), len(ids) - n).argmax(-1) for ids, n in sequences]
    n_layers = model.config.num_hidden_layers
    t0 = time.time()
    single = {i: agreement(model, sequences, (i,), reference) for i in range(n_layers)}
    chosen = tuple(sorted(sorted(single, key=single.get, reverse=True)[: args.skip]))
    heuristic = default_skip_layers(n_layers)
    result = {
        "model": args.model,
        "dtype": args.dtype,
        "num_layers": n_layers,
        "agreement_skipping_one_layer": single,
        "chosen": chosen,
        "chosen_agreement": agreement(model, sequences, chosen, reference),
        "heuristic": heuristic,
        "heuristic_agreement": agreement(model, sequences, heuristic, reference),
        "search_s": round(time.time() - t0, 1),
    }
    print(json.dumps(result, indent=1))
    out = Path(__file__).parent / "results" / f"skip-search-{args.model}.json"
    out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
