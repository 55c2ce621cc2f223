import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from specrouter.core.hugepages import TUNABLE, sets_huge_pages, with_huge_pages, without_huge_pages


def test_huge_pages_join_other_tunables_and_an_explicit_setting_wins():
    assert with_huge_pages({}) == {"GLIBC_TUNABLES": f"{TUNABLE}=1"}
    assert with_huge_pages({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2", "X": "y"}) == {
        "GLIBC_TUNABLES": f"glibc.malloc.arena_max=2:{TUNABLE}=1", "X": "y"}
    assert with_huge_pages({"GLIBC_TUNABLES": f"{TUNABLE}=0"}) == {"GLIBC_TUNABLES": f"{TUNABLE}=0"}
    assert sets_huge_pages({"GLIBC_TUNABLES": f"glibc.malloc.arena_max=2:{TUNABLE}=0"})
    assert not sets_huge_pages({"GLIBC_TUNABLES": f"{TUNABLE}x=1"})
    assert without_huge_pages({"GLIBC_TUNABLES": f"glibc.malloc.arena_max=2:{TUNABLE}=1", "X": "y"}) == {
        "GLIBC_TUNABLES": "glibc.malloc.arena_max=2", "X": "y"}
    assert without_huge_pages(with_huge_pages({"X": "y"})) == {"X": "y"}


def _run(code: str, env: dict[str, str]) -> str:
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True, timeout=600).stdout


def test_a_process_starts_itself_again_with_huge_pages_once_unless_its_environment_says_otherwise():
    code = ("import os, sys; from specrouter.core.hugepages import reexec_with_huge_pages\n"
            "print('start', flush=True); reexec_with_huge_pages(); print(os.environ.get('GLIBC_TUNABLES'))")
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    assert _run(code, env).split() == ["start", "start", f"{TUNABLE}=1"]  # once more, then not again
    assert _run(code, {**env, "GLIBC_TUNABLES": f"{TUNABLE}=0"}).split() == ["start", f"{TUNABLE}=0"]


def test_worker_actors_start_with_huge_pages_and_keep_the_environment_they_are_given():
    from specrouter.runtime.actors import Placement

    assert Placement().actor_options()["runtime_env"]["env_vars"] == {"GLIBC_TUNABLES": f"{TUNABLE}=1"}
    env = {"OMP_NUM_THREADS": "1", "GLIBC_TUNABLES": f"{TUNABLE}=0"}
    assert Placement(env=env).actor_options()["runtime_env"]["env_vars"] == env


THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def _huge_pages_a_load_adds(env: dict[str, str]) -> int:
    """KiB of anonymous huge pages that loading the SmolLM2-135M GGUF adds to a fresh process."""
    code = ("import json; from specrouter.core import catalog; from specrouter.core.llamacpp import LlamaCppModel\n"
            "def huge(): return int(open('/proc/self/smaps_rollup').read().split('AnonHugePages:')[1].split()[0])\n"
            "before = huge(); model = LlamaCppModel(catalog.prepare_gguf('smollm2-135m'), threads=1, context=512)\n"
            "print(json.dumps(huge() - before))")
    return json.loads(_run(code, env))


@pytest.mark.skipif(not THP_MODE.exists() or "[never]" in THP_MODE.read_text(), reason="the kernel has transparent huge pages off")
def test_a_llamacpp_model_loaded_with_the_tunable_sits_on_huge_pages():
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    plain, huge = _huge_pages_a_load_adds(env), _huge_pages_a_load_adds(with_huge_pages(env))
    assert huge >= 32 << 10 and huge > plain, (plain, huge)  # much of the 135M model's ~100 MB of weights
