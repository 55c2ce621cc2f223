"""`specrouter bench`: load-test a running server over its OpenAI HTTP API, as `vllm bench serve`
does: requests at a fixed concurrency, streamed, reporting throughput, TTFT and inter-token latency."""

from __future__ import annotations

import json
import statistics
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

from tqdm import tqdm

PROMPTS = [
    'def fibonacci(n: int) -> int:\n    """Return the n-th Fibonacci number."""\n',
    "Explain in two sentences why the sky is blue.",
    'def is_palindrome(text: str) -> bool:\n    """Check whether text reads the same backwards."""\n',
    "Write a short haiku about distributed systems.",
    "class Stack:\n    \"\"\"A LIFO stack backed by a list.\"\"\"\n\n    def __init__(self):\n",
    "What are three tips for writing readable Python code?",
]


def sse_events(response) -> Iterator[dict]:
    """The JSON events of a server-sent-events HTTP response (OpenAI's and llama-server's streams),
    up to `data: [DONE]`."""
    for line in response:
        if line.strip() == b"data: [DONE]":
            return
        if line.startswith(b"data: "):
            yield json.loads(line[6:])


def _one(url: str, model: str, prompt: str, max_tokens: int, temperature: float) -> dict:
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": temperature,
                       "stream": True, "stream_options": {"include_usage": True}}).encode()
    request = urllib.request.Request(f"{url}/v1/completions", body, {"Content-Type": "application/json"})
    t0, arrivals, tokens = time.perf_counter(), [], 0
    with urllib.request.urlopen(request, timeout=600) as response:
        for event in sse_events(response):
            if "error" in event:
                raise RuntimeError(event["error"]["message"])
            if event.get("choices") and event["choices"][0]["text"]:
                arrivals.append(time.perf_counter() - t0)
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
    return {"latency_s": time.perf_counter() - t0, "ttft_s": arrivals[0] if arrivals else None, "tokens": tokens}


def run_load(url: str, num_prompts: int, concurrency: int, max_tokens: int, temperature: float = 0.0) -> dict:
    url = url.rstrip("/")
    with urllib.request.urlopen(f"{url}/v1/models", timeout=30) as response:
        model = json.loads(response.read())["data"][0]["id"]
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(num_prompts)]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool, tqdm(total=num_prompts, desc="requests", unit="req") as bar:
        futures = [pool.submit(_one, url, model, p, max_tokens, temperature) for p in prompts]
        results = []
        for future in futures:
            results.append(future.result())
            bar.update()
    wall = time.perf_counter() - t0
    tokens = sum(r["tokens"] for r in results)
    ttfts = [r["ttft_s"] for r in results if r["ttft_s"] is not None]
    itls = [(r["latency_s"] - r["ttft_s"]) / (r["tokens"] - 1) for r in results if r["ttft_s"] is not None and r["tokens"] > 1]
    return {
        "model": model,
        "requests": num_prompts,
        "concurrency": concurrency,
        "output_tokens": tokens,
        "duration_s": round(wall, 3),
        "output_tokens_per_s": round(tokens / wall, 3),
        "mean_ttft_ms": round(1000 * statistics.mean(ttfts), 1) if ttfts else None,
        "median_ttft_ms": round(1000 * statistics.median(ttfts), 1) if ttfts else None,
        "mean_itl_ms": round(1000 * statistics.mean(itls), 1) if itls else None,
        "mean_latency_s": round(statistics.mean(r["latency_s"] for r in results), 3),
    }
