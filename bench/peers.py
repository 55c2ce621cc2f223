"""SpecRouter against the engine its users already run: llama.cpp's llama-server on the catalog's own
GGUF files (Qwen2.5-Coder-1.5B Q4_K_M target, 0.5B Q4_K_M draft), side by side in one run.

    bash bench/build_llama_server.sh                      # once: llama-server from the pinned llama.cpp
    .venv/bin/python bench/peers.py [--humaneval 6] [--sharegpt 4] [--edits 4] [--max-tokens 128]

Workloads: HumanEval prompts (code), ShareGPT first turns (chat), and code edits of standard-library
functions (answers that repeat much of the prompt). Every request runs end to end, prefill included,
greedy, 2 threads, one at a time; each prompt under every method in turn, so drift hits them alike.
Neither side reuses what earlier prompts left (llama-server's prompt cache and our llama.cpp levels'
prefix sharing are off): every method runs each prompt whole, so outputs compare with the target
alone's. llama-server runs plain, with its n-gram speculation and with the 0.5B as its draft model (its
defaults, and two settings); SpecRouter in-process runs each target alone on each backend (llama.cpp;
torch in bf16, with int8 weights, with 4-bit weights), static chains, and adaptive routing over a pool;
chains verify blocks no wider than their target verifies bit-exactly (llama.cpp: measured at load;
w8/w4: 16 tokens) unless named "not bit-exact". Reported: tokens/s, speed relative to llama-server
plain, the rate of outputs identical to the same target alone, tokens per target pass, peak RSS of each
process. Our models load in this process with glibc's huge-page tunable, as a worker actor's do
(specrouter/core/hugepages.py); llama-server runs as users run it, and once more with the tunable.

Writes bench/results/peers-<timestamp>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).parent))
from report import peak_rss_gb, tokens_per_s, write_result  # noqa: E402
from workloads import Prompt, code_edits, encode, humaneval, sharegpt  # noqa: E402

from specrouter.core import catalog  # noqa: E402
from specrouter.core.hugepages import reexec_with_huge_pages, with_huge_pages, without_huge_pages  # noqa: E402
from specrouter.routing.classifier import classify  # noqa: E402
from specrouter.engine.engine import Engine  # noqa: E402
from specrouter.engine.calibration import router_for  # noqa: E402
from specrouter.core.store import ModelStore  # noqa: E402

TARGET, DRAFT = "qwen2.5-coder-1.5b", "qwen2.5-coder-0.5b"
BASELINE = "llama-server"


@dataclass(frozen=True)
class Method:
    name: str
    server_args: tuple[str, ...] | None = None  # llama-server's flags beyond the model (None: ours)
    chain: str = ""
    draft_lens: tuple[int, ...] = ()
    draft_confidence: float = 0.0
    adaptive: bool = False
    bit_exact: bool = True  # the target verifies blocks no wider than it verifies bit-exactly
    reference: str = ""  # the method whose output is this one's "target alone"
    huge_pages: bool = False  # llama-server started with glibc's huge-page tunable, as our processes are


def methods(threads: int) -> list[Method]:
    draft = str(catalog.prepare_gguf(DRAFT))
    spec = ("-md", draft, "--spec-type", "draft-simple", "-td", str(threads))
    gguf, w8, w4 = f"{TARGET}@gguf", f"{TARGET}@w8", f"{TARGET}@w4"
    return [
        Method(BASELINE, ()),
        Method("llama-server (huge pages)", (), huge_pages=True),
        Method("llama-server ngram", ("--spec-type", "ngram-mod")),
        Method("llama-server 0.5B draft (defaults)", spec),  # n-max 3, p-min 0 in the vendored llama.cpp
        Method("llama-server 0.5B draft (n-max 3, p-min 0.7)", spec + ("--spec-draft-n-max", "3", "--spec-draft-p-min", "0.7")),
        Method("llama-server 0.5B draft (n-max 8)", spec + ("--spec-draft-n-max", "8")),
        Method("ours: 1.5B gguf alone", chain=gguf, reference="ours: 1.5B gguf alone"),
        Method("ours: 1.5B bf16 alone", chain=TARGET, reference="ours: 1.5B bf16 alone"),
        Method("ours: 1.5B w8 alone", chain=w8, reference="ours: 1.5B w8 alone"),
        Method("ours: 1.5B w4 alone", chain=w4, reference="ours: 1.5B w4 alone"),
        Method("ours: ngram -> 1.5B w4", chain=f"ngram,{w4}", draft_lens=(6,), reference="ours: 1.5B w4 alone"),
        # w4 passes cost by tiles of 4 rows (bench/pass_costs.py): blocks of 3 drafted tokens fill one
        Method("ours: 0.5B gguf -> 1.5B w4", chain=f"{DRAFT}@gguf,{w4}", draft_lens=(3,), reference="ours: 1.5B w4 alone"),
        Method("ours: 0.5B gguf -> 1.5B w4 (stop 0.5)", chain=f"{DRAFT}@gguf,{w4}", draft_lens=(8,), draft_confidence=0.5,
               reference="ours: 1.5B w4 alone"),
        Method("ours: ngram:8 -> 1.5B w4", chain=f"ngram:8,{w4}", draft_lens=(15,), reference="ours: 1.5B w4 alone"),
        Method("ours: ngram -> 0.5B gguf -> 1.5B w4", chain=f"ngram,{DRAFT}@gguf,{w4}", draft_lens=(4, 3),
               reference="ours: 1.5B w4 alone"),
        Method("ours: adaptive (ngram, 0.5B gguf, 1.5B w4)", chain=f"ngram,{DRAFT}@gguf,{w4}", adaptive=True,
               reference="ours: 1.5B w4 alone"),
        Method("ours: adaptive (ngram:8, 0.5B gguf, 1.5B w4)", chain=f"ngram:8,{DRAFT}@gguf,{w4}", adaptive=True,
               reference="ours: 1.5B w4 alone"),
        Method("ours: ngram -> 1.5B gguf", chain=f"ngram,{gguf}", draft_lens=(6,), reference="ours: 1.5B gguf alone"),
        Method("ours: 0.5B gguf -> 1.5B gguf", chain=f"{DRAFT}@gguf,{gguf}", draft_lens=(6,), reference="ours: 1.5B gguf alone"),
        Method("ours: ngram -> 0.5B gguf -> 1.5B gguf", chain=f"ngram,{DRAFT}@gguf,{gguf}", draft_lens=(4, 6),
               reference="ours: 1.5B gguf alone"),
        Method("ours: ngram -> 1.5B gguf, not bit-exact", chain=f"ngram,{gguf}", draft_lens=(6,), bit_exact=False,
               reference="ours: 1.5B gguf alone"),
        Method("ours: 0.5B gguf -> 1.5B gguf (stop 0.5), not bit-exact", chain=f"{DRAFT}@gguf,{gguf}", draft_lens=(8,),
               draft_confidence=0.5, bit_exact=False, reference="ours: 1.5B gguf alone"),
        Method("ours: adaptive (ngram, 0.5B gguf, 1.5B gguf)", chain=f"ngram,{DRAFT}@gguf,{gguf}", adaptive=True,
               reference="ours: 1.5B gguf alone"),
        Method("ours: ngram:8 -> 1.5B gguf, not bit-exact", chain=f"ngram:8,{gguf}", draft_lens=(31,), bit_exact=False,
               reference="ours: 1.5B gguf alone"),
        Method("ours: adaptive (ngram:8, 0.5B gguf, 1.5B gguf), not bit-exact", chain=f"ngram:8,{DRAFT}@gguf,{gguf}",
               adaptive=True, bit_exact=False, reference="ours: 1.5B gguf alone"),
    ]


def llama_server_binary(path: str | None) -> str:
    """`path`, or the llama-server that bench/build_llama_server.sh builds (once) and names."""
    return path or subprocess.run(["bash", str(Path(__file__).parent / "build_llama_server.sh")],
                                  check=True, capture_output=True, text=True).stdout.strip()


class LlamaServer:
    """One llama-server process on loopback with `parallel` slots of 4096 positions each."""

    def __init__(self, binary: str, args: tuple[str, ...], port: int, threads: int, parallel: int = 1, huge_pages: bool = False):
        cmd = [binary, "-m", str(catalog.prepare_gguf(TARGET)), "-t", str(threads), "-tb", str(threads),
               "-c", str(4096 * parallel), "--host", "127.0.0.1", "--port", str(port), "-np", str(parallel), *args]
        self.url = f"http://127.0.0.1:{port}"
        # As users run it (without the tunable this process starts itself with), or with huge pages too
        env = with_huge_pages(os.environ) if huge_pages else without_huge_pages(os.environ)
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=5) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        raise RuntimeError(f"llama-server did not come up: {cmd}")

    def generate(self, prompt_ids: list[int], max_tokens: int) -> tuple[list[int], float, dict]:
        body = json.dumps({"prompt": prompt_ids, "n_predict": max_tokens, "temperature": 0, "cache_prompt": False,
                           "return_tokens": True}).encode()
        t0 = time.perf_counter()
        with urllib.request.urlopen(urllib.request.Request(f"{self.url}/completion", body, {"Content-Type": "application/json"}),
                                    timeout=600) as r:
            reply = json.loads(r.read())
        return reply["tokens"], time.perf_counter() - t0, reply.get("timings", {})

    def peak_rss_gb(self) -> float:
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        return round(int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM"))) / 2**20, 2)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=60)


@dataclass
class Row:
    method: str
    klass: str
    prompt_id: str
    token_ids: list[int]
    elapsed_s: float
    target_steps: int | None = None
    extra: dict = field(default_factory=dict)


def routing_summary(chosen: list[Method], by: dict, prompts) -> dict:
    """Each adaptive method against the static chains over its pool (same target, its levels among the
    pool's): the best one on every prompt, and with hindsight the best one per workload and per prompt,
    what a router choosing one chain a workload or a prompt could reach at most (per prompt, the
    hindsight also picks the luckier of runs that differ by noise)."""
    out = {}
    for m in (m for m in chosen if m.adaptive):
        pool = m.chain.split(",")
        statics = [s.name for s in chosen if s.server_args is None and not s.adaptive
                   and (s.bit_exact == m.bit_exact or s.chain == pool[-1])  # the target alone is either
                   and s.chain.split(",")[-1] == pool[-1] and set(s.chain.split(",")) <= set(pool)]
        if not statics:
            continue
        ids = [p.id for p in prompts]
        best = max(statics, key=lambda s: tokens_per_s([by[(s, i)] for i in ids]))
        by_workload, hindsight = {}, []
        for klass in sorted({p.klass for p in prompts}):
            mine = [p.id for p in prompts if p.klass == klass]
            by_workload[klass] = max(statics, key=lambda s: tokens_per_s([by[(s, i)] for i in mine]))
            hindsight += [by[(by_workload[klass], i)] for i in mine]
        per_prompt = [min((by[(s, i)] for s in statics), key=lambda r: r.elapsed_s / len(r.token_ids)) for i in ids]
        rate, best_rate = tokens_per_s([by[(m.name, i)] for i in ids]), tokens_per_s([by[(best, i)] for i in ids])
        out[m.name] = {"statics": statics, "tokens_per_s": round(rate, 2), "best_static": best,
                       "best_static_tokens_per_s": round(best_rate, 2), "vs_best_static": round(rate / best_rate, 3),
                       "best_static_by_workload": by_workload,
                       "hindsight_by_workload_vs_best_static": round(tokens_per_s(hindsight) / best_rate, 3),
                       "hindsight_by_prompt_vs_best_static": round(tokens_per_s(per_prompt) / best_rate, 3)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--humaneval", type=int, default=6)
    parser.add_argument("--sharegpt", type=int, default=4)
    parser.add_argument("--edits", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--methods", default="", help="a subset of method names, separated by ';' (the baseline always runs)")
    parser.add_argument("--llama-server", default=None, help="the binary (default: bench/build_llama_server.sh's)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()

    reexec_with_huge_pages()  # our models load in this process, as a worker actor's would: with huge pages
    torch.set_num_threads(args.threads)
    chosen = [m for m in methods(args.threads) if not args.methods or m.name in args.methods.split(";") or m.name == BASELINE]
    binary = llama_server_binary(args.llama_server)
    store = ModelStore("bfloat16", threads=args.threads, share_prefixes=False)
    tokenizer = store.get(TARGET, "gguf").tokenizer
    end_ids = set(store.target_info(TARGET, "gguf").eos_ids)
    prompts: list[Prompt] = humaneval(args.humaneval) + sharegpt(args.sharegpt) + code_edits(args.edits)
    encoded = {p.id: encode(tokenizer, p) for p in prompts}

    servers = {m.name: LlamaServer(binary, m.server_args, 18200 + i, args.threads, huge_pages=m.huge_pages)
               for i, m in enumerate(chosen) if m.server_args is not None}
    engines, routers = {}, {}
    for m in chosen:
        if m.server_args is None:
            engines[m.name] = Engine(m.chain, provider=store, draft_lens=list(m.draft_lens) or None, draft_confidence=m.draft_confidence,
                                     bit_exact=m.bit_exact)
            if m.adaptive:
                routers[m.name] = router_for(engines[m.name])

    def run(m: Method, p: Prompt, max_tokens: int) -> Row:
        ids = encoded[p.id]
        if m.name in servers:  # outputs compare without the end token (llama-server returns it, ours too)
            tokens, elapsed, timings = servers[m.name].generate(ids, max_tokens)
            return Row(m.name, p.klass, p.id, [t for t in tokens if t not in end_ids], elapsed, None,
                       {k: v for k, v in timings.items() if k.startswith("draft")})
        result = engines[m.name].generate(ids, max_tokens, router=routers.get(m.name), klass=classify(p.text))
        tokens = [t for t in result.token_ids if t not in end_ids]
        return Row(m.name, p.klass, p.id, tokens, result.elapsed_s, result.num_steps,
                   {"routing": result.routing["decisions"][-1]["chain"] if result.routing else None})

    for m in chosen:  # warm-up
        run(m, prompts[0], 4)
    rows: list[Row] = []
    bar = tqdm(total=len(prompts) * len(chosen), desc="peers", unit="gen")
    for p in prompts:
        for m in chosen:
            bar.set_postfix_str(f"{p.id} | {m.name}")
            rows.append(run(m, p, args.max_tokens))
            bar.update()
    bar.close()
    server_rss = {name: s.peak_rss_gb() for name, s in servers.items()}
    for s in servers.values():
        s.stop()

    by = {(r.method, r.prompt_id): r for r in rows}
    summary = {}
    for klass in ("code", "chat", "edit", "all"):
        ids = [p.id for p in prompts if klass == "all" or p.klass == klass]
        if not ids:
            continue
        base_rate = tokens_per_s([by[(BASELINE, i)] for i in ids])
        table = {}
        for m in chosen:
            mine = [by[(m.name, i)] for i in ids]
            rate = tokens_per_s(mine)
            entry = {"tokens_per_s": round(rate, 2), "vs_llama_server": round(rate / base_rate, 3),
                     "identical_to_llama_server": round(sum(r.token_ids == by[(BASELINE, r.prompt_id)].token_ids for r in mine) / len(mine), 3)}
            if m.reference and all((m.reference, i) in by for i in ids):
                entry["identical_to_target_alone"] = round(
                    sum(r.token_ids == by[(m.reference, r.prompt_id)].token_ids for r in mine) / len(mine), 3)
            if mine[0].target_steps:
                entry["tokens_per_target_pass"] = round(sum(len(r.token_ids) for r in mine) / sum(r.target_steps for r in mine), 2)
            table[m.name] = entry
        summary[klass] = table

    routing = routing_summary(chosen, by, prompts)
    memory = {"specrouter (in-process, every method of ours)": peak_rss_gb(), **server_rss}
    path = write_result("peers", {
        "config": {**vars(args), "llama_server": binary, "target": TARGET, "draft": DRAFT, "greedy": True},
        "methods": [m.__dict__ for m in chosen],
        "peak_rss_gb": memory,
        "summary": summary,
        "routing": routing,
        "rows": [r.__dict__ for r in rows],
    }, args.out)
    for klass, table in summary.items():
        print(f"\n== {klass} ==")
        for name, e in table.items():
            same = e.get("identical_to_target_alone", e["identical_to_llama_server"])
            print(f"{name:50s} {e['tokens_per_s']:6.2f} tok/s  x{e['vs_llama_server']:.2f} vs llama-server  identical {same:.2f}"
                  f"  {e.get('tokens_per_target_pass', '')}")
    for name, e in routing.items():
        print(f"\n{name}: x{e['vs_best_static']:.3f} the best static chain ({e['best_static']}); with hindsight, the best "
              f"chain a workload x{e['hindsight_by_workload_vs_best_static']:.3f}, a prompt x{e['hindsight_by_prompt_vs_best_static']:.3f}")
    print(f"\npeak RSS {memory}; wrote {path}")


if __name__ == "__main__":
    main()
