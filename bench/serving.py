"""The served system end to end: `specrouter serve` (embedded local Ray, Serve HTTP, router actor,
one actor per model) under `specrouter bench` load, for the default chain and for target-only
serving, and llama.cpp's llama-server on the target's GGUF file under the same load (`--peer`), in
one run; the peak memory of each whole process tree (driver + Ray + every actor): summed RSS, which
counts the pages the processes share (libraries) once per process, and summed PSS, which splits them.

    .venv/bin/python bench/serving.py [--prompts 6] [--max-tokens 64] [--concurrency 1,4,16] [--peer]
        [--draft-confidence 0.4 --draft-lens 10] [--kv-cache-tokens 8192]

With --draft-confidence, the chain also runs without the confidence stop (at --plain-draft-lens) in the same run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).parent))
from peers import LlamaServer, llama_server_binary  # noqa: E402
from report import write_result  # noqa: E402

from specrouter.serving.config import DEFAULT_CHAIN  # noqa: E402
from specrouter.serving.loadtest import run_load  # noqa: E402


class TreeMemory:
    """Samples the summed RSS of a process and all its descendants, and every `pss_every`-th time their
    summed PSS (reading smaps costs more); keeps the peaks."""

    def __init__(self, pid: int, every_s: float = 0.5, pss_every: int = 4):
        self.root, self.peak_rss, self.peak_pss, self._stop = psutil.Process(pid), 0, 0, threading.Event()
        threading.Thread(target=self._run, args=(every_s, pss_every), daemon=True).start()

    def _run(self, every_s: float, pss_every: int) -> None:
        sample = 0
        while not self._stop.wait(every_s):
            sample += 1
            rss = pss = 0
            try:
                for proc in [self.root, *self.root.children(recursive=True)]:
                    try:
                        if sample % pss_every:
                            rss += proc.memory_info().rss
                        else:
                            full = proc.memory_full_info()
                            rss, pss = rss + full.rss, pss + full.pss
                    except psutil.Error:
                        pass
            except psutil.Error:
                return
            self.peak_rss, self.peak_pss = max(self.peak_rss, rss), max(self.peak_pss, pss)

    def stop(self) -> dict:
        self._stop.set()
        return {"peak_rss_gb": round(self.peak_rss / 2**30, 2), "peak_pss_gb": round(self.peak_pss / 2**30, 2)}


@contextmanager
def specrouter_server(chain: str, draft_lens: str | None, port: int, draft_confidence: float = 0.0,
                      kv_cache_tokens: int | None = None):
    """`specrouter serve` for `chain` in a subprocess, on `port` (gRPC on port + 1); yields (url,
    startup seconds, TreeMemory of its process tree) once it serves; Ctrl-C stops it after."""
    cmd = [sys.executable, "-m", "specrouter.cli", "serve", "--chain", chain, "--port", str(port), "--grpc-port", str(port + 1)]
    config = Path(f"/tmp/specrouter-bench-{port}.yaml")
    config.write_text(f"chain: {chain}\ndraft_confidence: {draft_confidence}\n" + (f"draft_lens: [{draft_lens}]\n" if draft_lens else "")
                      + (f'placement: {{"*": {{kv_cache_tokens: {kv_cache_tokens}}}}}\n' if kv_cache_tokens else ""))
    cmd += ["--config", str(config)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    memory = TreeMemory(proc.pid)
    try:
        for line in proc.stdout:
            if "Ctrl-C stops" in line:
                break
        else:
            raise RuntimeError(f"specrouter serve exited with {proc.wait()}")
        yield f"http://127.0.0.1:{port}", time.perf_counter() - t0, memory
    finally:
        proc.send_signal(2)
        proc.wait(timeout=180)


def serve_and_load(chain: str, draft_lens: str | None, args, port: int, draft_confidence: float = 0.0) -> dict:
    with specrouter_server(chain, draft_lens, port, draft_confidence, args.kv_cache_tokens) as (url, startup_s, memory):
        run_load(url, 1, 1, 8)  # warm-up
        loads = {c: run_load(url, args.prompts, c, args.max_tokens) for c in args.concurrency}
        return {"chain": chain, "draft_lens": draft_lens, "draft_confidence": draft_confidence, "startup_s": round(startup_s, 1),
                **memory.stop(), "load": loads}


def llama_server_load(args, port: int) -> dict:
    """llama-server on the target's GGUF (as many slots as the highest concurrency) under the same load."""
    binary = llama_server_binary(args.llama_server)
    t0 = time.perf_counter()
    server = LlamaServer(binary, (), port, args.threads, parallel=max(args.concurrency))
    memory = TreeMemory(server.proc.pid)
    try:
        startup_s = time.perf_counter() - t0
        run_load(server.url, 1, 1, 8)  # warm-up
        loads = {c: run_load(server.url, args.prompts, c, args.max_tokens) for c in args.concurrency}
        return {"chain": "llama-server", "startup_s": round(startup_s, 1), **memory.stop(), "load": loads}
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--chain", default=DEFAULT_CHAIN)
    parser.add_argument("--draft-lens", default=None, help="e.g. 6 or 4,10 (default: the server's, as the main job runs)")
    parser.add_argument("--draft-confidence", type=float, default=0.0)
    parser.add_argument("--plain-draft-lens", default="6", help="with --draft-confidence: the lengths of the run without it")
    parser.add_argument("--prompts", type=int, default=6)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 4, 16])
    parser.add_argument("--peer", action="store_true", help="also serve the target's GGUF with llama-server")
    parser.add_argument("--llama-server", default=None, help="the binary (default: bench/build_llama_server.sh's)")
    parser.add_argument("--threads", type=int, default=2, help="llama-server's threads")
    parser.add_argument("--kv-cache-tokens", type=int, default=None, help="our llama.cpp models' KV cache (default: the server's)")
    args = parser.parse_args()

    target = args.chain.split(",")[-1]
    runs = {"specrouter": serve_and_load(args.chain, args.draft_lens, args, 8310, args.draft_confidence)}
    if args.draft_confidence:
        runs["specrouter_no_stop"] = serve_and_load(args.chain, args.plain_draft_lens, args, 8330)
    runs["target_only"] = serve_and_load(target, None, args, 8320)
    if args.peer:
        runs["llama_server"] = llama_server_load(args, 8340)
    summary = {
        f"speedup_c{c}" + ("" if name == "specrouter" else "_no_stop"):
            round(run["load"][c]["output_tokens_per_s"] / runs["target_only"]["load"][c]["output_tokens_per_s"], 3)
        for name, run in runs.items() if name not in ("target_only", "llama_server") for c in args.concurrency
    }
    if args.peer:
        summary.update({f"{name}_vs_llama_server_c{c}": round(run["load"][c]["output_tokens_per_s"]
                                                               / runs["llama_server"]["load"][c]["output_tokens_per_s"], 3)
                        for name, run in runs.items() if name != "llama_server" for c in args.concurrency})
    summary.update({f"{name}_peak_{kind}_gb": run[f"peak_{kind}_gb"] for name, run in runs.items() for kind in ("rss", "pss")})
    summary.update({f"{name}_tok_s_c{c}": run["load"][c]["output_tokens_per_s"] for name, run in runs.items() for c in args.concurrency})
    out = write_result("serving", {"config": vars(args), "summary": summary, "runs": runs})  # peak RSS: the driver's
    print(json.dumps(summary, indent=1), f"\nwrote {out}")


if __name__ == "__main__":
    main()
