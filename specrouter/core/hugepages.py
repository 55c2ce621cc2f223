"""Transparent huge pages for the memory a model's passes read.

A decoding pass reads every weight once. llama.cpp allocates its weights (repacked for the CPU), KV
cache and compute buffers with malloc, which glibc backs with 4 KiB pages unless the process starts
with the tunable `glibc.malloc.hugetlb=1` (glibc >= 2.35): then large allocations get transparent
huge pages (2 MiB) wherever the kernel's THP mode is `madvise` or `always`, each TLB entry covers 512
times the memory, and a one-token pass of a 1.5B Q4_K_M model takes 7-9% less time on a 2-core
EPYC (docs/benchmarks.md). The tunable is read once, when a process starts, so the processes that host
models get it in their environment: worker actors through their runtime environment
(`runtime/actors.py`), `specrouter generate` by starting itself again once
(`reexec_with_huge_pages`). A process whose environment already sets the tunable keeps its setting,
so `GLIBC_TUNABLES=glibc.malloc.hugetlb=0` turns this off.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping

TUNABLE = "glibc.malloc.hugetlb"


def _tunables(env: Mapping[str, str]) -> list[str]:
    return [t for t in env.get("GLIBC_TUNABLES", "").split(":") if t]


def _is_huge_pages(tunable: str) -> bool:
    return tunable.startswith(TUNABLE + "=")


def sets_huge_pages(env: Mapping[str, str]) -> bool:
    """Whether `env` already sets glibc's huge-page tunable (to anything)."""
    return any(_is_huge_pages(t) for t in _tunables(env))


def with_huge_pages(env: Mapping[str, str]) -> dict[str, str]:
    """`env` with glibc's malloc backing large allocations with transparent huge pages, unless `env`
    already sets that tunable; other tunables are kept."""
    out = dict(env)
    if not sets_huge_pages(out):
        out["GLIBC_TUNABLES"] = ":".join([*_tunables(out), f"{TUNABLE}=1"])
    return out


def without_huge_pages(env: Mapping[str, str]) -> dict[str, str]:
    """`env` without glibc's huge-page tunable (other tunables kept): a process as glibc starts it by
    default (benchmarks run peers such as llama-server so)."""
    out = {k: v for k, v in env.items() if k != "GLIBC_TUNABLES"}
    if others := [t for t in _tunables(env) if not _is_huge_pages(t)]:
        out["GLIBC_TUNABLES"] = ":".join(others)
    return out


def reexec_with_huge_pages() -> None:
    """Start this process again (same interpreter, same command line) with huge pages on, unless its
    environment already sets the tunable. Call it first thing in a program that loads models in-process."""
    if not sets_huge_pages(os.environ):
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], with_huge_pages(os.environ))
