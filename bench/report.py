"""What every benchmark's result file holds besides its numbers, and where it goes: the machine it ran
on and this process's peak RSS, in bench/results/NAME-<timestamp>.json (a plot beside it, .png)."""

from __future__ import annotations

import json
import os
import platform
import resource
import time
from pathlib import Path

import torch
import transformers

RESULTS = Path(__file__).parent / "results"


def machine_info() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    return {
        "cpu": cpu,
        "cores": len(os.sched_getaffinity(0)),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def peak_rss_gb() -> float:
    """This process's peak resident memory so far, in GB."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)


def tokens_per_s(rows) -> float:
    """Tokens/s over generations (each with `token_ids` and `elapsed_s`) together."""
    return sum(len(r.token_ids) for r in rows) / sum(r.elapsed_s for r in rows)


def write_result(name: str, result: dict, out_dir: str | Path = RESULTS) -> Path:
    """Write `result` under the benchmark's name, the machine and this process's peak RSS (keys of
    `result` win) to OUT_DIR/NAME-<timestamp>.json; returns the path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps({"benchmark": name, "machine": machine_info(), "peak_rss_gb": peak_rss_gb(), **result}, indent=1))
    return path
