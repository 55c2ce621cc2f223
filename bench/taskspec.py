"""TaskSpec: discovered tasks, task-aligned drafters, and the router over them.

1. Task discovery: each encoder's routing accuracy on held-out prompts of known source and its cost
   (`specrouter tasks fit`, re-run here unless --skip-fit; the default task model is then the better).
2. Per task and per held-out source (HumanEval: code, ShareGPT: chat; never trained on), acceptance
   of the base drafter and of each aligned drafter under the target: alpha (accepted / drafted) and
   mean accepted length, with each static chain's tokens/s.
3. The adaptive router over the pool (base and aligned drafters, the target) against the best static
   chain, each prompt classed by the default task model.

    nice -n 15 .venv/bin/python bench/taskspec.py [--prompts 4] [--max-tokens 48] [--skip-fit]

Aligned drafters must exist (`specrouter align --task NAME`); tasks without one are skipped.
Writes bench/results/taskspec-<timestamp>.json (the machine it ran on, peak RSS).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from report import write_result  # noqa: E402
from workloads import Prompt, code_edits, encode, humaneval, sharegpt  # noqa: E402

from specrouter.core import adapters  # noqa: E402
from specrouter.core.store import ModelStore  # noqa: E402
from specrouter.engine.calibration import router_for  # noqa: E402
from specrouter.engine.engine import Engine  # noqa: E402
from specrouter.tasks import corpora  # noqa: E402
from specrouter.tasks.classifier import TaskClassifier  # noqa: E402
from specrouter.tasks.fit import fit_and_compare  # noqa: E402

TARGET, DRAFTER = "qwen2.5-coder-1.5b", "qwen2.5-coder-0.5b"
TARGETS = {"aligned_relative_acceptance_gain_on_own_task": 0.15, "max_relative_loss_elsewhere": 0.05, "routing_accuracy": 0.90}


def held_out_prompts(n: int) -> list[Prompt]:
    """Evaluation prompts past those `tasks fit` scores routing on, checked disjoint from training."""
    skip = 40
    prompts = humaneval(skip + n)[skip:] + sharegpt(skip + n)[skip:]
    as_texts = [corpora.Text(p.klass, p.id, p.text, p.chat) for p in prompts + code_edits(8)]
    corpora.assert_disjoint(corpora.training_corpus(64), as_texts)
    return prompts


def run_static(engine: Engine, encoded: list[tuple[Prompt, list[int]]], max_tokens: int) -> dict:
    by_source: dict[str, dict] = {}
    for prompt, ids in encoded:
        result = engine.generate(ids, max_tokens, ignore_eos=True)
        row = by_source.setdefault(prompt.klass, {"drafted": 0, "accepted": 0, "lengths": [], "tokens": 0, "seconds": 0.0})
        drafter = result.level_stats[0]
        row["drafted"] += drafter.num_draft_tokens
        row["accepted"] += drafter.num_accepted_tokens
        row["lengths"].append(drafter.mean_accepted_length)
        row["tokens"] += len(result.token_ids)
        row["seconds"] += result.elapsed_s
    return {source: {"alpha": row["accepted"] / max(1, row["drafted"]), "tokens_per_s": row["tokens"] / row["seconds"],
                     "mean_accepted_length": sum(row["lengths"]) / len(row["lengths"]), "drafted": row["drafted"],
                     "accepted": row["accepted"], "tokens": row["tokens"], "seconds": row["seconds"]}
            for source, row in by_source.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=4, help="held-out prompts per source")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--draft-len", type=int, default=4)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--skip-fit", action="store_true", help="use the saved default task model as it is")
    parser.add_argument("--encoders", default=f"minilm,hidden:{TARGET}")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()

    report: dict = {"targets": TARGETS, "args": vars(args)}
    if not args.skip_fit:
        report["discovery"] = fit_and_compare(args.encoders.split(","))
        print(json.dumps(report["discovery"]), flush=True)

    store = ModelStore(args.dtype)
    target_engine = Engine(TARGET, provider=store)
    classifier = TaskClassifier.load(shared={TARGET: (store.get(TARGET).model, target_engine.tokenizer)})
    aligned = [t for t in classifier.tasks if (adapters.adapter_dir(DRAFTER, t) / adapters.WEIGHTS).exists()]
    prompts = held_out_prompts(args.prompts)
    encoded = [(p, encode(target_engine.tokenizer, p)) for p in prompts]
    routed = [classifier.classify(p.text) for p in prompts]
    report["classes"] = {"routed": dict(zip([p.id for p in prompts], routed)), "ms_last": classifier.last_ms,
                         "accuracy": sum(classifier.model.source_of(r) == p.klass for r, p in zip(routed, prompts)) / len(prompts)}

    # 2. Static chains: the base drafter and each aligned one, on every held-out source.
    drafters = [DRAFTER] + [f"{DRAFTER}+task:{t}" for t in aligned]
    static = {}
    for drafter in drafters:
        engine = Engine(f"{drafter},{TARGET}", draft_lens=[args.draft_len], provider=store)
        static[drafter] = run_static(engine, encoded, args.max_tokens)
        print(json.dumps({drafter: static[drafter]}), flush=True)
    report["static"] = static
    base = static[DRAFTER]
    report["relative_acceptance"] = {
        d: {s: row["alpha"] / max(1e-9, base[s]["alpha"]) - 1 for s, row in static[d].items()} for d in drafters[1:]}

    # 3. The adaptive router over the whole pool vs the best static chain.
    pool = Engine(",".join(drafters + [TARGET]), draft_lens=[args.draft_len] * len(drafters), provider=store)
    router = router_for(pool)
    tokens, seconds = 0, 0.0
    for (prompt, ids), klass in zip(encoded, routed):
        result = pool.generate(ids, args.max_tokens, ignore_eos=True, router=router, klass=klass)
        tokens, seconds = tokens + len(result.token_ids), seconds + result.elapsed_s
    def overall(d: str) -> float:
        return sum(r["tokens"] for r in static[d].values()) / sum(r["seconds"] for r in static[d].values())

    best = max(static, key=overall)
    report["adaptive"] = {"tokens_per_s": tokens / seconds, "best_static": best, "best_static_tokens_per_s": overall(best)}
    print(f"wrote {write_result('taskspec', report, args.out)}")


if __name__ == "__main__":
    main()
