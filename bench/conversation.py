"""Multi-turn chat, served: the time to first token of each turn as the conversation grows, for
SpecRouter's default chain (`specrouter serve`) and, with --peer, llama.cpp's llama-server on the
same GGUF, in one run. Every turn resends the whole history (as an OpenAI chat client does); a server
that keeps the keys and values of the tokens a prompt begins with runs only the new ones.

Each conversation opens with a ShareGPT first turn and goes on with fixed follow-ups; the answers in
the history are the server's own (greedy, --max-tokens each). One conversation at a time.

    .venv/bin/python bench/conversation.py [--conversations 4] [--turns 4] [--max-tokens 64] [--peer]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from peers import TARGET, LlamaServer, llama_server_binary  # noqa: E402
from report import write_result  # noqa: E402
from serving import specrouter_server  # noqa: E402
from workloads import sharegpt  # noqa: E402

from specrouter.core.store import load_tokenizer  # noqa: E402
from specrouter.serving.config import DEFAULT_CHAIN  # noqa: E402
from specrouter.serving.loadtest import sse_events  # noqa: E402

FOLLOW_UPS = ["Make that shorter.", "Now explain it to a beginner.", "Give one more example.",
              "Summarise everything so far in one sentence."]


def chat_turn(url: str, messages: list[dict], max_tokens: int) -> tuple[str, float, float]:
    """One streamed greedy chat completion: (text, time to first token s, latency s)."""
    body = json.dumps({"model": TARGET, "messages": messages, "max_tokens": max_tokens, "temperature": 0,
                       "stream": True}).encode()
    request = urllib.request.Request(f"{url}/v1/chat/completions", body, {"Content-Type": "application/json"})
    t0, ttft, text = time.perf_counter(), None, []
    with urllib.request.urlopen(request, timeout=600) as response:
        for event in sse_events(response):
            delta = event["choices"][0].get("delta", {}).get("content") if event.get("choices") else None
            if delta:
                ttft = ttft if ttft is not None else time.perf_counter() - t0
                text.append(delta)
    return "".join(text), ttft if ttft is not None else float("nan"), time.perf_counter() - t0


def converse(url: str, openers: list[str], turns: int, max_tokens: int, tokenizer) -> list[dict]:
    rows = []
    for c, opener in enumerate(openers):
        messages = [{"role": "user", "content": opener}]
        for turn in range(turns):
            prompt_tokens = len(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False))
            text, ttft, latency = chat_turn(url, messages, max_tokens)
            rows.append({"conversation": c, "turn": turn + 1, "prompt_tokens": prompt_tokens, "ttft_ms": round(1000 * ttft, 1),
                         "latency_s": round(latency, 3)})
            messages += [{"role": "assistant", "content": text}, {"role": "user", "content": FOLLOW_UPS[turn % len(FOLLOW_UPS)]}]
    return rows


def by_turn(rows: list[dict]) -> dict:
    turns = sorted({r["turn"] for r in rows})
    return {t: {"prompt_tokens": round(statistics.mean(r["prompt_tokens"] for r in rows if r["turn"] == t), 1),
                "ttft_ms": round(statistics.mean(r["ttft_ms"] for r in rows if r["turn"] == t), 1)} for t in turns}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chain", default=DEFAULT_CHAIN)
    parser.add_argument("--draft-lens", default="6")
    parser.add_argument("--conversations", type=int, default=4)
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--peer", action="store_true", help="also serve the target's GGUF with llama-server")
    parser.add_argument("--llama-server", default=None, help="the binary (default: bench/build_llama_server.sh's)")
    parser.add_argument("--threads", type=int, default=2, help="llama-server's threads")
    args = parser.parse_args()

    tokenizer = load_tokenizer(TARGET, "gguf")
    openers = [p.text for p in sharegpt(args.conversations)]
    runs = {}
    with specrouter_server(args.chain, args.draft_lens, 8350) as (url, _, memory):
        chat_turn(url, [{"role": "user", "content": "Hello"}], 4)  # warm-up
        runs["specrouter"] = {"chain": args.chain, "rows": converse(url, openers, args.turns, args.max_tokens, tokenizer),
                              **memory.stop()}
    if args.peer:
        server = LlamaServer(llama_server_binary(args.llama_server), (), 8360, args.threads)
        try:
            chat_turn(server.url, [{"role": "user", "content": "Hello"}], 4)
            runs["llama_server"] = {"rows": converse(server.url, openers, args.turns, args.max_tokens, tokenizer),
                                    "peak_rss_gb": server.peak_rss_gb()}
        finally:
            server.stop()
    summary = {name: by_turn(run["rows"]) for name, run in runs.items()}
    for name, turns in summary.items():
        print(name, " ".join(f"turn {t}: {v['prompt_tokens']:.0f} tokens, TTFT {v['ttft_ms']:.0f} ms;" for t, v in turns.items()))
    path = write_result("conversation", {"config": vars(args), "summary": summary, "runs": runs})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
