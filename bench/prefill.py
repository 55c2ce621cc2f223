"""A long prompt arriving while other requests decode: how long it stalls them, and how soon it gets
its first token, with chunked prefill at several chunk sizes and without it, and llama-server under
the same load, in one run.

    .venv/bin/python bench/prefill.py [--decoding 4] [--prompt-tokens 1024] [--chunks 0,512,256,128] [--peer]

`--decoding` requests (short code prompts, greedy) decode; once each has a few tokens, a prompt of
`--prompt-tokens` tokens (real Python source from the standard library, another part of it each run)
arrives. Reported per method,
over the window from its arrival to its first token: the longest gap between two tokens of a decoding
request (its stall), their mean gap, the tokens they committed a second, and the long prompt's time to
first token. Ours runs in process, target alone on the catalog's GGUF (the batch loop is what
schedules prefill; the served system runs the same loop); chunk 0 prefills the prompt whole in one
step. llama-server (`--peer`) serves the same file with one slot per request, its defaults otherwise.

Writes bench/results/prefill-<timestamp>.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from peers import TARGET, LlamaServer, llama_server_binary  # noqa: E402
from report import RESULTS, write_result  # noqa: E402

from specrouter.engine.engine import Engine  # noqa: E402
from specrouter.engine.loop import BatchLoop  # noqa: E402
from specrouter.serving.loadtest import PROMPTS, sse_events  # noqa: E402

WARM_TOKENS = 4  # tokens each decoding request has before the long prompt arrives


def long_prompts(tokenizer, n: int, count: int) -> list[list[int]]:
    """`count` prompts of n tokens of real Python source (the standard library's), asked to be
    continued: consecutive parts of it, so no run finds its prompt cached by an earlier one."""
    import argparse as source_module

    ids = tokenizer(Path(source_module.__file__).read_text())["input_ids"]
    if len(ids) < n * count:
        raise ValueError(f"the source has {len(ids)} tokens, fewer than {count} prompts of {n}")
    return [ids[i * n : (i + 1) * n] for i in range(count)]


def window_stats(arrivals: list[list[float]], start: float, end: float, ttft: float) -> dict:
    """Gaps between consecutive tokens of the decoding requests that end inside [start, end]."""
    gaps, tokens = [], 0
    for times in arrivals:
        inside = [t for t in times if start < t <= end]
        tokens += len(inside)
        before = [t for t in times if t <= start][-1:]
        gaps += [b - a for a, b in zip(before + inside, inside)]
    return {"max_stall_s": round(max(gaps), 3) if gaps else None, "mean_gap_s": round(statistics.mean(gaps), 3) if gaps else None,
            "decode_tok_per_s": round(tokens / (end - start), 2), "ttft_s": round(ttft, 3)}


def run_ours(engine: Engine, shorts: list[list[int]], long: list[int], chunk: int, max_tokens: int) -> dict:
    loop = BatchLoop(engine, prefill_chunk=chunk or 1 << 30)
    ids = [loop.submit(p, max_tokens, ignore_eos=True) for p in shorts]
    arrivals = [[] for _ in ids]

    def step() -> tuple[float, set[str]]:
        """One step; each decoding request's tokens arrive at its end. Returns when, and who committed."""
        report = loop.step()
        now = time.perf_counter()
        for a, i in zip(arrivals, ids):
            a += [now] * len(report.committed.get(i, []))
        return now, set(report.committed)

    while min(len(a) for a in arrivals) < WARM_TOKENS:
        step()
    start = time.perf_counter()
    late = loop.submit(long, 4, ignore_eos=True)
    first = None
    while first is None:
        now, committed = step()
        first = now if late in committed else None
    for i in [*ids, late]:
        loop.cancel(i)
    return window_stats(arrivals, start, first, first - start)


def _stream(url: str, prompt: list[int], max_tokens: int, arrivals: list[float]) -> None:
    body = json.dumps({"prompt": prompt, "n_predict": max_tokens, "temperature": 0, "stream": True, "cache_prompt": False,
                       "ignore_eos": True}).encode()
    with urllib.request.urlopen(urllib.request.Request(f"{url}/completion", body, {"Content-Type": "application/json"}),
                                timeout=600) as response:
        for event in sse_events(response):
            if event.get("content") is not None:
                arrivals.append(time.perf_counter())


def run_peer(server: LlamaServer, shorts: list[list[int]], long: list[int], max_tokens: int) -> dict:
    arrivals = [[] for _ in shorts]
    threads = [threading.Thread(target=_stream, args=(server.url, p, max_tokens, a)) for p, a in zip(shorts, arrivals)]
    for t in threads:
        t.start()
    while min(len(a) for a in arrivals) < WARM_TOKENS:
        time.sleep(0.01)
    start = time.perf_counter()
    late: list[float] = []
    _stream(server.url, long, 1, late)
    for t in threads:
        t.join()
    return window_stats(arrivals, start, late[0], late[0] - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--decoding", type=int, default=4, help="requests decoding when the long prompt arrives")
    parser.add_argument("--prompt-tokens", type=int, default=1024)
    parser.add_argument("--chunks", type=lambda s: [int(x) for x in s.split(",")], default=[0, 512, 256, 128],
                        help="prefill chunk sizes of ours (0: the prompt whole in one step)")
    parser.add_argument("--max-tokens", type=int, default=160, help="each decoding request's tokens (enough to outlast the prefill)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--peer", action="store_true", help="also llama-server on the same GGUF")
    parser.add_argument("--llama-server", default=None, help="the binary (default: bench/build_llama_server.sh's)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()

    engine = Engine(f"{TARGET}@gguf", num_threads=args.threads)
    shorts = [engine.tokenizer(PROMPTS[i % len(PROMPTS)])["input_ids"] for i in range(args.decoding)]
    longs = iter(long_prompts(engine.tokenizer, args.prompt_tokens, args.repeats * (len(args.chunks) + args.peer)))
    server = LlamaServer(llama_server_binary(args.llama_server), (), 8187, args.threads, parallel=args.decoding + 1) if args.peer else None
    rows = []
    try:
        for repeat in range(args.repeats):  # every method in turn, so the machine's drift hits them alike
            for chunk in args.chunks:
                row = {"method": f"ours, chunk {chunk}" if chunk else "ours, prompt whole", "repeat": repeat,
                       **run_ours(engine, shorts, next(longs), chunk, args.max_tokens)}
                print(row, flush=True)
                rows.append(row)
            if server is not None:
                row = {"method": "llama-server", "repeat": repeat, **run_peer(server, shorts, next(longs), args.max_tokens)}
                print(row, flush=True)
                rows.append(row)
    finally:
        if server is not None:
            server.stop()
    summary = {}
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method]
        summary[method] = {k: round(statistics.mean(r[k] for r in mine), 3) for k in ("max_stall_s", "mean_gap_s", "decode_tok_per_s", "ttft_s")}
    for method, s in summary.items():
        print(f"{method:22s} stall {s['max_stall_s']:6.2f} s  mean gap {s['mean_gap_s']:5.2f} s  "
              f"decoding {s['decode_tok_per_s']:5.1f} tok/s  TTFT {s['ttft_s']:6.2f} s")
    path = write_result("prefill", {"config": vars(args) | {"target": f"{TARGET}@gguf"}, "summary": summary, "rows": rows},
                        args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
