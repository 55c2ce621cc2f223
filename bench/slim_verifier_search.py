"""Pick the skip set of a slim verifier for tiered verification (specrouter/core/tiers.py).

A slim verifier checks the tokens the drafter was medium-sure of (confidence in [tau_low, tau_high)),
so its skip set is chosen by how often it agrees with the full target on those tokens, not on all of
them (bench/skip_search.py). On target-generated continuations of code and chat prompts, teacher-forced:
1. the drafter's greedy token and confidence at every position; the medium-confidence positions;
2. each layer skipped alone, scored by greedy agreement with the full target there;
3. a forward greedy search over the best-ranked layers up to --skip layers, against the all-token
   choice (the catalog's default skip set) and the every-other-layer heuristic;
4. per prompt class, the thresholds `calibrate` picks at a few disagreement budgets for each set.

    .venv/bin/python bench/slim_verifier_search.py --target qwen2.5-coder-1.5b --drafter qwen2.5-coder-0.5b
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
from workloads import encode, humaneval, sharegpt  # noqa: E402

from specrouter.core import catalog  # noqa: E402
from specrouter.core.model import ModelView, SeqBlock  # noqa: E402
from specrouter.core.spec import default_skip_layers  # noqa: E402
from specrouter.core.store import ModelStore  # noqa: E402
from specrouter.core.tiers import Observation, calibrate  # noqa: E402

BUDGETS = (0.01, 0.02, 0.05, 0.1)


@torch.inference_mode()
def greedy_continuation(view: ModelView, ids: list[int], n: int) -> list[int]:
    cache, out = view.new_cache(), []
    logits = view.forward(ids, 0, cache, 1)
    for _ in range(n):
        token = int(logits[-1].argmax())
        out.append(token)
        logits = view.forward([token], len(ids) + len(out) - 1, cache, 1)
    return out


@torch.inference_mode()
def teacher_forced(view: ModelView, sequences: list[tuple[list[int], int]]) -> list[torch.Tensor]:
    """Each sequence's logits [T, V] at the rows predicting its T generated tokens, in one batched pass."""
    blocks = [SeqBlock(ids, 0, view.new_cache(), len(ids) - n + 1) for ids, n in sequences]
    return [logits[:-1] for logits in view.forward_batch(blocks)]


def slim_argmax(model, skip: tuple[int, ...], sequences) -> torch.Tensor:
    return torch.cat([logits.argmax(-1) for logits in teacher_forced(ModelView(model, skip), sequences)])  # [N]


def agreement(pred: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor) -> float:
    return float((pred[mask] == ref[mask]).float().mean()) if mask.any() else 0.0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--target", default="qwen2.5-coder-1.5b")
    parser.add_argument("--drafter", default="qwen2.5-coder-0.5b")
    parser.add_argument("--skip", type=int, default=7, help="how many layers the slim verifier skips")
    parser.add_argument("--candidates", type=int, default=9, help="best single layers the greedy search draws from")
    parser.add_argument("--prompts", type=int, default=3, help="per class (code, chat)")
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--tau-low", type=float, default=0.3)
    parser.add_argument("--tau-high", type=float, default=0.9)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    t_start = time.time()
    store = ModelStore(args.dtype)
    target, drafter = store.get(args.target), store.get(args.drafter)
    model = target.model
    full = ModelView(model)

    # 1. Target continuations; the drafter's token and confidence at each of their positions.
    prompts = humaneval(args.prompts) + sharegpt(args.prompts)
    sequences, classes = [], []
    for prompt in prompts:
        ids = encode(target.tokenizer, prompt)
        sequences.append((ids + greedy_continuation(full, ids, args.tokens), len(ids)))
        classes += [prompt.klass] * args.tokens
        print(f"continued {prompt.id} ({len(ids)} prompt tokens)", flush=True)
    reference = torch.cat([logits.argmax(-1) for logits in teacher_forced(full, sequences)])  # [N]
    draft_logits = torch.cat(teacher_forced(ModelView(drafter.model), sequences))  # [N, V_d]
    draft_probs = torch.softmax(draft_logits.float(), -1)
    confidence, draft_token = draft_probs.max(-1)  # [N] each
    medium = (confidence >= args.tau_low) & (confidence < args.tau_high)
    everywhere = torch.ones_like(medium)
    print(f"{len(reference)} positions, {int(medium.sum())} medium-confidence", flush=True)

    # 2. Each layer skipped alone, on the medium-confidence tokens.
    n_layers = model.config.num_hidden_layers
    t0 = time.time()
    preds: dict[tuple[int, ...], torch.Tensor] = {}

    def pred(skip: tuple[int, ...]) -> torch.Tensor:
        if skip not in preds:
            preds[skip] = slim_argmax(model, skip, sequences)
        return preds[skip]

    single = {}
    for i in range(n_layers):
        single[i] = agreement(pred((i,)), reference, medium)
        print(f"skip {i} alone: {single[i]:.3f}", flush=True)

    # 3. Forward greedy search over the best single layers.
    pool = sorted(single, key=single.get, reverse=True)[: args.candidates]
    chosen: tuple[int, ...] = ()
    path = []
    while len(chosen) < args.skip:
        scores = {layer: agreement(pred(tuple(sorted(chosen + (layer,)))), reference, medium) for layer in pool if layer not in chosen}
        best = max(scores, key=scores.get)
        chosen = tuple(sorted(chosen + (best,)))
        path.append({"skip": chosen, "medium_agreement": scores[best]})
        print(f"greedy {chosen}: {scores[best]:.3f}", flush=True)
    search_s = time.time() - t0

    entry_skip = catalog.CATALOG[args.target].default_skip if args.target in catalog.CATALOG else None
    sets = {"medium_greedy": chosen, "single_rank": tuple(sorted(pool[: args.skip])), "heuristic": default_skip_layers(n_layers)}
    if entry_skip:
        sets["catalog_default"] = tuple(entry_skip)
    class_of = torch.tensor([c == "code" for c in classes])
    drafter_agreed = draft_token == reference
    result_sets = {}
    for name, skip in sets.items():
        p = pred(skip)
        slim_agreed = p == reference
        calibration = {}
        for klass, mask in (("code", class_of), ("chat", ~class_of)):
            obs = [Observation(float(c), bool(d), bool(s)) for c, d, s in zip(confidence[mask], drafter_agreed[mask], slim_agreed[mask])]
            calibration[klass] = {str(b): calibrate(obs, b).as_dict() for b in BUDGETS}
        result_sets[name] = {
            "skip": skip,
            "medium_agreement": agreement(p, reference, medium),
            "all_agreement": agreement(p, reference, everywhere),
            "calibration": calibration,
        }
    result = {
        "target": args.target,
        "drafter": args.drafter,
        "dtype": args.dtype,
        "num_layers": n_layers,
        "tau_low": args.tau_low,
        "tau_high": args.tau_high,
        "num_positions": len(reference),
        "num_medium": int(medium.sum()),
        "drafter_agreement_medium": agreement(draft_token, reference, medium),
        "drafter_agreement_all": agreement(draft_token, reference, everywhere),
        "medium_agreement_skipping_one_layer": single,
        "greedy_path": path,
        "sets": result_sets,
        "search_s": round(search_s, 1),
        "total_s": round(time.time() - t_start, 1),
    }
    print(json.dumps({k: v for k, v in result.items() if k != "medium_agreement_skipping_one_layer"}, indent=1))
    print(f"wrote {write_result(f'slim-verifier-{args.target}', result)}")


if __name__ == "__main__":
    main()
