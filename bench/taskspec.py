"""TaskSpec: discovered tasks, task-aligned drafters, and the router over them.

1. Task discovery: each encoder's routing accuracy on held-out prompts of known source and its cost
   (`specrouter tasks fit`, re-run here unless --skip-fit; the default task model is then the better).
2. Per task and per held-out source (HumanEval: code, ShareGPT: chat; never trained on), acceptance
   of the base drafter (--drafter) and of each aligned copy of it under the target: in greedy
   decoding (accepted / drafted: how often the drafter's argmax is the target's) and mean accepted
   length, with each static chain's tokens/s; in sampling at temperature 1 (accepted / drafted under
   rejection sampling); and alpha = 1 - E[TV(q_draft, p_target)] teacher-forced on the target's
   greedy continuations up to their first end token (the acceptance probability of sampling at
   temperature 1, measured at every position rather than at those a run happens to draft), for a
   drafter on the target's tokenizer (one on another, such as SmolLM2, has no distribution over the
   target's tokens); and, for every drafter, greedy agreement over the same text spelled in the
   drafter's tokens (how often its argmax is the next token, teacher-forced).
3. The adaptive router over the pool (base and aligned drafters, the target) against the best static
   chain, greedy and sampled, on the mix and per source, each prompt classed by the default task model.
   Every prompt runs under every static chain and the router in turn, so the machine's drift hits
   them alike.

    nice -n 15 .venv/bin/python bench/taskspec.py [--prompts 4] [--max-tokens 48] [--skip-fit] [--drafter smollm2-135m]

Aligned drafters must exist (`specrouter align --task NAME [--drafter D --loss seqkd]`); tasks without
one are skipped.
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
from specrouter.core.sampling import SamplingParams  # noqa: E402
from specrouter.core.store import ModelStore  # noqa: E402
from specrouter.engine.calibration import router_for  # noqa: E402
from specrouter.engine.engine import Engine  # noqa: E402
from specrouter.tasks import corpora  # noqa: E402
from specrouter.tasks.align import expected_acceptance, greedy_agreement, speller  # noqa: E402
from specrouter.tasks.classifier import TaskClassifier  # noqa: E402
from specrouter.tasks.fit import fit_and_compare  # noqa: E402

TARGET = "qwen2.5-coder-1.5b"
TARGETS = {"aligned_relative_acceptance_gain_on_own_task": 0.15, "max_relative_loss_elsewhere": 0.05, "routing_accuracy": 0.90}


def held_out_prompts(n: int) -> list[Prompt]:
    """Evaluation prompts past those `tasks fit` scores routing on, checked disjoint from training."""
    skip = 40
    prompts = humaneval(skip + n)[skip:] + sharegpt(skip + n)[skip:]
    as_texts = [corpora.Text(p.klass, p.id, p.text, p.chat) for p in prompts + code_edits(8)]
    corpora.assert_disjoint(corpora.training_corpus(64), as_texts)
    return prompts


def add_static(row: dict, result) -> None:
    """One static chain run into its source's row: the bottom drafter's acceptance, tokens, seconds."""
    drafter = result.level_stats[0]
    row["drafted"] += drafter.num_draft_tokens
    row["accepted"] += drafter.num_accepted_tokens
    row["lengths"].append(drafter.mean_accepted_length)
    row["tokens"] += len(result.token_ids)
    row["seconds"] += result.elapsed_s


def summarise_static(by_source: dict[str, dict]) -> dict:
    """Per held-out source: acceptance and tokens/s of a static chain."""
    return {source: {"alpha": row["accepted"] / max(1, row["drafted"]), "tokens_per_s": speed([row]),
                     "mean_accepted_length": sum(row["lengths"]) / len(row["lengths"]), "drafted": row["drafted"],
                     "accepted": row["accepted"], "tokens": row["tokens"], "seconds": row["seconds"]}
            for source, row in by_source.items()}


def add_adaptive(row: dict, result) -> None:
    """One adaptive run into its source's row: tokens, seconds and the steps each drafter led."""
    row["tokens"] += len(result.token_ids)
    row["seconds"] += result.elapsed_s
    for plan in result.routing["steps_by_plan"]:
        drafter = plan["chain"][0] if len(plan["chain"]) > 1 else "target alone"
        row["steps_by_drafter"][drafter] = row["steps_by_drafter"].get(drafter, 0) + plan["steps"]


def speed(rows) -> float:
    """Tokens/s over rows of {"tokens", "seconds"} together."""
    return sum(r["tokens"] for r in rows) / sum(r["seconds"] for r in rows)


def relative(table: dict, key: str, base: str) -> dict:
    """Each drafter's `key` per source relative to the base drafter's (0.1: 10% higher)."""
    return {d: {s: row[key] / max(1e-9, table[base][s][key]) - 1 for s, row in by_source.items()}
            for d, by_source in table.items() if d != base}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=4, help="held-out prompts per source")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--draft-len", type=int, default=4)
    parser.add_argument("--drafter", default="qwen2.5-coder-0.5b", help="the base drafter, measured beside its aligned copies")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--skip-fit", action="store_true", help="use the saved default task model as it is")
    parser.add_argument("--encoders", default=f"minilm,embed:{TARGET},hidden:{TARGET}")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()

    report: dict = {"targets": TARGETS, "args": vars(args)}
    if not args.skip_fit:
        report["discovery"] = fit_and_compare(args.encoders.split(","))
        print(json.dumps(report["discovery"]), flush=True)

    store = ModelStore(args.dtype)
    target_engine = Engine(TARGET, provider=store)
    classifier = TaskClassifier.load(shared={TARGET: (store.get(TARGET).model, target_engine.tokenizer)})
    base = args.drafter
    aligned = [t for t in classifier.tasks if (adapters.adapter_dir(base, t) / adapters.WEIGHTS).exists()]
    prompts = held_out_prompts(args.prompts)
    encoded = [(p, encode(target_engine.tokenizer, p)) for p in prompts]
    matches = [classifier.classify(p.text) for p in prompts]
    routed = [m.task for m in matches]
    report["classes"] = {"routed": {p.id: m.as_dict() for p, m in zip(prompts, matches)},
                         "ms_per_prompt": sum(m.ms for m in matches) / len(matches),
                         "accuracy": sum(classifier.model.source_of(r) == p.klass for r, p in zip(routed, prompts)) / len(prompts)}

    # 2. Static chains (the base drafter, each aligned one) and 3. the adaptive router over the whole
    # pool, greedy and sampled: every prompt under every method in turn, so drift hits them alike.
    drafters = [base] + [f"{base}+task:{t}" for t in aligned]
    engines = {d: Engine(f"{d},{TARGET}", draft_lens=[args.draft_len], provider=store) for d in drafters}
    pool = Engine(",".join(drafters + [TARGET]), draft_lens=[args.draft_len] * len(drafters), provider=store)
    modes = {"greedy": SamplingParams(), "sampled": SamplingParams(temperature=1.0)}
    routers = {mode: router_for(pool) for mode in modes}
    static_rows = {mode: {d: {} for d in drafters} for mode in modes}
    adaptive_rows: dict[str, dict[str, dict]] = {mode: {} for mode in modes}
    base_greedy: dict[str, list[int]] = {}  # per prompt: the base chain's greedy output, the target's (up to bf16 rounding)
    for seed, ((prompt, ids), klass) in enumerate(zip(encoded, routed)):
        for mode, params in modes.items():
            for drafter, engine in engines.items():
                result = engine.generate(ids, args.max_tokens, params, seed=seed, ignore_eos=True)
                add_static(static_rows[mode][drafter].setdefault(
                    prompt.klass, {"drafted": 0, "accepted": 0, "lengths": [], "tokens": 0, "seconds": 0.0}), result)
                if mode == "greedy" and drafter == base:
                    base_greedy[prompt.id] = result.token_ids
            result = pool.generate(ids, args.max_tokens, params, seed=seed, ignore_eos=True, router=routers[mode], klass=klass)
            add_adaptive(adaptive_rows[mode].setdefault(prompt.klass, {"tokens": 0, "seconds": 0.0, "steps_by_drafter": {}}),
                         result)
        print(json.dumps({"done": prompt.id}), flush=True)
    static = {d: summarise_static(static_rows["greedy"][d]) for d in drafters}
    sampled = {d: summarise_static(static_rows["sampled"][d]) for d in drafters}
    print(json.dumps({"greedy": static, "sampled": sampled}), flush=True)
    report["static"], report["sampled"] = static, sampled
    report["relative_acceptance"] = relative(static, "alpha", base)
    report["relative_sampled_acceptance"] = relative(sampled, "alpha", base)

    # Teacher-forced on the target's greedy continuations (the base chain's greedy output), each up
    # to its first end token (the runs above ignore end tokens, a request would stop there): greedy
    # agreement for every drafter, over that text spelled in the drafter's tokens; alpha = 1 - E[TV]
    # for a drafter on the target's tokenizer.
    eos_ids = store.get(TARGET).info.eos_ids
    continuations = {pid: tokens[: next((i + 1 for i, t in enumerate(tokens) if t in eos_ids), len(tokens))]
                     for pid, tokens in base_greedy.items()}
    target_lm, target_tokenizer = store.get(TARGET).model, store.get(TARGET).tokenizer
    shared_vocab = store.get(base).fingerprint == store.get(TARGET).fingerprint  # as the engine tells a cross-tokenizer level
    spell = (lambda ids: ids) if shared_vocab else speller(target_tokenizer, store.get(base).tokenizer)
    forced: dict[str, dict] = {}
    for drafter in drafters:
        task = drafter.partition("+task:")[2] or None
        drafter_lm = store.get(base, task=task).model
        for source in sorted({p.klass for p in prompts}):
            examples = [(spell(ids), spell(continuations[p.id])) for p, ids in encoded if p.klass == source]
            row = {"greedy_agreement": greedy_agreement(drafter_lm, examples), "positions": sum(len(c) for _, c in examples)}
            if shared_vocab:
                row["alpha"] = expected_acceptance(drafter_lm, target_lm, examples)
            forced.setdefault(drafter, {})[source] = row
        print(json.dumps({drafter: {"teacher_forced": forced[drafter]}}), flush=True)
    report["teacher_forced"] = forced
    report["relative_teacher_forced_greedy_agreement"] = relative(forced, "greedy_agreement", base)
    report["relative_teacher_forced_alpha"] = relative(forced, "alpha", base) if shared_vocab else None

    # 3. The adaptive router against the best static chain, on the mix and per source.
    report["adaptive"] = {}
    for mode, table in (("greedy", static), ("sampled", sampled)):
        by_source = adaptive_rows[mode]
        best = max(table, key=lambda d: speed(table[d].values()))
        report["adaptive"][mode] = {
            "tokens_per_s": speed(by_source.values()), "best_static": best, "best_static_tokens_per_s": speed(table[best].values()),
            "by_source": {source: {**row, "tokens_per_s": speed([row]),
                                   "best_static_tokens_per_s": max(speed([table[d][source]]) for d in table)}
                          for source, row in by_source.items()}}
        print(json.dumps({f"adaptive {mode}": report["adaptive"][mode]}), flush=True)
    print(f"wrote {write_result('taskspec', report, args.out)}")

if __name__ == "__main__":
    main()
