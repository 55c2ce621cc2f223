"""A llama.cpp model's passes with and without transparent huge pages (glibc.malloc.hugetlb=1, which
our model processes start with: specrouter/core/hugepages.py), in fresh processes taking turns.

    .venv/bin/python bench/huge_pages.py [--pairs 6] [--model qwen2.5-coder-1.5b] [--threads 2]

Each process loads the model's GGUF, then over 4 ShareGPT prompts, twice, prefills the prompt and
decodes 63 greedy tokens one pass at a time (the bare llama.cpp loop, no engine); it reports the mean
prefill and one-token pass, the huge pages its memory sits on, and its peak RSS. The tunable is read
when a process starts, so the two settings cannot share one process; pairs of processes alternate
which setting goes first, so the machine's drift hits both alike.

Writes bench/results/huge-pages-<timestamp>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from report import peak_rss_gb, write_result  # noqa: E402

from specrouter.core.hugepages import TUNABLE, with_huge_pages  # noqa: E402


def child(model: str, threads: int) -> dict:
    from workloads import encode, sharegpt

    from specrouter.core import catalog
    from specrouter.core.llamacpp import LlamaCppModel
    from specrouter.core.store import load_tokenizer

    llama = LlamaCppModel(catalog.prepare_gguf(model), threads=threads, share_prefixes=False)
    tokenizer = load_tokenizer(model, "gguf")
    prefill, one_token = [], []
    for _ in range(2):
        for prompt in sharegpt(4):
            ids, seq = encode(tokenizer, prompt), llama.take_sequence()
            t0 = time.perf_counter()
            logits = llama.decode([(t, i, seq, i == len(ids) - 1) for i, t in enumerate(ids)])
            prefill.append(time.perf_counter() - t0)
            token = int(logits[-1].argmax())
            for k in range(63):
                t0 = time.perf_counter()
                logits = llama.decode([(token, len(ids) + k, seq, True)])
                one_token.append(time.perf_counter() - t0)
                token = int(logits[-1].argmax())
            llama.drop_sequence(seq, keep=False)

    return {"prefill_ms": round(statistics.mean(prefill) * 1e3, 2), "one_token_ms": round(statistics.mean(one_token) * 1e3, 3),
            "huge_pages_gib": round(int(Path("/proc/self/smaps_rollup").read_text().split("AnonHugePages:")[1].split()[0]) / 2**20, 2),
            "peak_rss_gb": peak_rss_gb()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=6)
    parser.add_argument("--model", default="qwen2.5-coder-1.5b")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.model, args.threads)))
        return

    plain_env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    envs = {"4 KiB pages": {**plain_env, "GLIBC_TUNABLES": f"{TUNABLE}=0"}, "huge pages": with_huge_pages(plain_env)}
    runs = []
    for pair in range(args.pairs):
        order = list(envs) if pair % 2 == 0 else list(envs)[::-1]
        for setting in order:
            out = subprocess.run([sys.executable, __file__, "--child", "--model", args.model, "--threads", str(args.threads)],
                                 env=envs[setting], capture_output=True, text=True, check=True).stdout
            runs.append({"pair": pair, "setting": setting, **json.loads(out.strip().splitlines()[-1])})
            print(runs[-1], flush=True)
    summary = {}
    for setting in envs:
        mine = [r for r in runs if r["setting"] == setting]
        summary[setting] = {key: round(statistics.mean(r[key] for r in mine), 3)
                            for key in ("prefill_ms", "one_token_ms", "huge_pages_gib", "peak_rss_gb")}
    one_token = {(r["pair"], r["setting"]): r["one_token_ms"] for r in runs}
    summary["one_token_ratio"] = round(summary["huge pages"]["one_token_ms"] / summary["4 KiB pages"]["one_token_ms"], 3)
    summary["pairs_where_huge_pages_were_faster"] = sum(one_token[pair, "huge pages"] < one_token[pair, "4 KiB pages"]
                                                        for pair in range(args.pairs))
    print(json.dumps(summary, indent=1))
    path = write_result("huge-pages", {"config": vars(args), "summary": summary, "runs": runs,
                                       "peak_rss_gb": max(r["peak_rss_gb"] for r in runs)}, args.out)  # the model processes'
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
