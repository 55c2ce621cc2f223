"""The distributed runtime on a real local Ray with tiny models: same output as in-process, and
faults that shorten the chain (drafter) or fail cleanly then recover (target)."""

import time

import pytest

from specrouter.engine.defaults import PREFILL_CHUNK
from specrouter.engine.engine import Engine
from specrouter.engine.loop import BatchLoop

PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def tiny_chain(tiny_dirs):
    return f"{tiny_dirs['draft']},{tiny_dirs['target']}@skip:1,{tiny_dirs['target']}"


@pytest.fixture(scope="module")
def expected(tiny_dirs):
    engine = Engine(tiny_dirs["target"], dtype="float32")
    ids = engine.tokenizer(PROMPT)["input_ids"]
    return ids, {n: engine.generate(ids, n, ignore_eos=True).token_ids for n in (32, 200)}


def make_router(local_ray, chain, placement=None, **kwargs):
    from specrouter.runtime.actors import RouterActor

    placement = {"*": {"num_cpus": 1, "torch_threads": 1, **(placement or {})}}
    return RouterActor.remote(chain, dtype="float32", draft_lens=[2, 3] if chain.count(",") == 2 else [3], placement=placement, **kwargs)


def test_distributed_chains_equal_in_process_and_target_only(local_ray, tiny_dirs, tiny_chain, expected):
    ids, want = expected
    for chain in (tiny_chain, f"{tiny_dirs['draft']},{tiny_dirs['target']}"):
        router = make_router(local_ray, chain)
        out = local_ray.get(router.generate.remote(ids, 32, ignore_eos=True), timeout=600)
        assert out["token_ids"] == want[32], chain
        assert out["data_plane_bytes"] > 0 and out["levels"][0]["num_draft_tokens"] > 0
        local_ray.kill(router)


def test_distributed_llamacpp_and_mixed_backend_chains_equal_the_gguf_target_alone(local_ray, tiny_gguf_dirs):
    """llama.cpp levels in their own actors: a GGUF drafter and target, and a torch int8 drafter in front
    of the GGUF target, give what the GGUF target gives alone in-process. The placement sizes each
    llama.cpp model's KV cache, and the router's engine learns the pool it admits requests into; a
    prompt prefilled in chunks over the actors gives what it gives chunked in-process."""
    target = f"{tiny_gguf_dirs['target']}@gguf"
    engine = Engine(target)
    ids = engine.tokenizer(PROMPT)["input_ids"]
    assert len(ids) > 2  # prefilled a chunk before its first step
    want = {chunk: BatchLoop(engine, prefill_chunk=chunk).run([{"prompt_ids": ids, "max_new_tokens": 24, "ignore_eos": True}])[0].token_ids
            for chunk in (2, PREFILL_CHUNK)}
    assert want[PREFILL_CHUNK] == engine.generate(ids, 24, ignore_eos=True).token_ids
    for chain, kv, chunk in ((f"{tiny_gguf_dirs['draft']}@gguf,{target}", 256, 2), (f"{tiny_gguf_dirs['draft']}@int8,{target}", None, PREFILL_CHUNK)):
        # whole blocks (the tiny F32 files measure width 1)
        router = make_router(local_ray, chain, placement={"kv_cache_tokens": kv}, bit_exact=False, prefill_chunk=chunk)
        info = local_ray.get(router.info.remote(), timeout=600)
        assert info["kv_pool"]["positions"] == (kv or 16384) and info["max_context"] == min(kv or 16384, 512), chain
        assert info["prefill_chunk"] == chunk
        out = local_ray.get(router.generate.remote(ids, 24, ignore_eos=True), timeout=600)
        assert out["token_ids"] == want[chunk], chain
        assert out["levels"][0]["num_accepted_tokens"] > 0
        local_ray.kill(router)


def test_distributed_cross_tokenizer_chain_equals_target_only(local_ray, cross_dirs):
    """SmolLM2-tokenizer drafters in front of a Qwen-tokenizer target, over Ray and the data plane."""
    engine = Engine(cross_dirs["target"], dtype="float32")
    ids = engine.tokenizer("def add(a, b):\n    return a + b  # 加法 🎉\n")["input_ids"]
    want = engine.generate(ids, 24, ignore_eos=True).token_ids
    router = make_router(local_ray, f"{cross_dirs['smol']},{cross_dirs['qwen-draft']},{cross_dirs['target']}")
    for sampling in (None, {"temperature": 0.8}):
        out = local_ray.get(router.generate.remote(ids, 24, sampling=sampling, ignore_eos=True), timeout=600)
        if sampling is None:
            assert out["token_ids"] == want
        assert out["levels"][0]["num_draft_tokens"] > 0 and out["levels"][0]["vocab_map"]["num_shared"] > 30000
    local_ray.kill(router)


def test_skip_view_lives_in_the_target_actor(local_ray, tiny_chain):
    router = make_router(local_ray, tiny_chain)
    placements = local_ray.get(router.placements.remote(), timeout=600)
    assert len(placements) == 2  # draft actor + target actor (serving the full and the slim view)
    local_ray.kill(router)


@pytest.mark.parametrize("pipeline", [False, True], ids=["plain", "pipelined"])
def test_killing_a_drafter_mid_generation_keeps_the_output(local_ray, tiny_dirs, expected, pipeline):
    ids, want = expected
    chain = f"{tiny_dirs['draft']},{tiny_dirs['target']}"
    router = make_router(local_ray, chain, pipeline=pipeline)
    local_ray.get(router.generate.remote(ids, 8, ignore_eos=True), timeout=600)  # warm: streams open
    drafter = local_ray.get(router.actor.remote(tiny_dirs["draft"]), timeout=60)
    pending = router.generate.remote(ids, 200, ignore_eos=True)
    time.sleep(1.0)
    local_ray.kill(drafter, no_restart=False)
    out = local_ray.get(pending, timeout=600)
    assert out["token_ids"] == want[200]
    # The restarted drafter rejoins later requests.
    time.sleep(6)
    again = local_ray.get(router.generate.remote(ids, 32, ignore_eos=True), timeout=600)
    assert again["token_ids"] == want[32]
    local_ray.kill(router)


def test_a_request_meeting_a_killed_target_fails_cleanly_or_waits_for_its_restart(local_ray, tiny_dirs, expected):
    """The request right after the kill either fails with TargetUnavailable (its data-plane stream had
    not yet seen the target die) or reaches the restarted target (the stream had seen it and waited for
    the new address) and answers exactly; which of the two is a race. The request after it is served."""
    from specrouter.engine.engine import TargetUnavailable

    ids, want = expected
    router = make_router(local_ray, f"{tiny_dirs['draft']},{tiny_dirs['target']}")
    local_ray.get(router.generate.remote(ids, 8, ignore_eos=True), timeout=600)
    target = local_ray.get(router.actor.remote(tiny_dirs["target"]), timeout=60)
    local_ray.kill(target, no_restart=False)
    try:
        out = local_ray.get(router.generate.remote(ids, 16, ignore_eos=True), timeout=600)
        assert out["token_ids"] == want[32][:16]
    except local_ray.exceptions.RayTaskError as err:
        assert isinstance(err.as_instanceof_cause(), TargetUnavailable)
    out = local_ray.get(router.generate.remote(ids, 32, ignore_eos=True), timeout=600)
    assert out["token_ids"] == want[32]
    local_ray.kill(router)


def test_adaptive_router_actor_is_lossless_and_explains(local_ray, tiny_dirs, expected):
    ids, want = expected
    router = make_router(local_ray, f"ngram:3,{tiny_dirs['draft']},{tiny_dirs['target']}", adaptive=True)
    out = local_ray.get(router.generate.remote(ids, 32, ignore_eos=True, prompt_class="chat"), timeout=600)
    assert out["token_ids"] == want[32]
    assert out["routing"]["class"] == "chat" and out["routing"]["decisions"]
    local_ray.kill(router)


def test_concurrent_requests_batch_over_the_data_plane_and_equal_each_alone(local_ray, tiny_dirs):
    """Requests served together go to the workers as batched frames (forward / draft), with the same
    greedy tokens as each request alone."""
    engine = Engine(tiny_dirs["target"], dtype="float32")
    prompts = [engine.tokenizer(p)["input_ids"] for p in (PROMPT, "Once upon a time there", "def fib(n):", "SELECT")]
    want = [engine.generate(ids, 24, ignore_eos=True).token_ids for ids in prompts]
    router = make_router(local_ray, f"{tiny_dirs['draft']},{tiny_dirs['target']}")
    outs = local_ray.get([router.generate.remote(ids, 24, ignore_eos=True) for ids in prompts], timeout=600)
    assert [out["token_ids"] for out in outs] == want
    frames = local_ray.get(router.describe.remote(), timeout=60)["data_plane_frames"]
    draft, target = frames[tiny_dirs["draft"]], frames[tiny_dirs["target"]]
    assert target["forward"] > 0 and draft["draft"] > 0
    assert set(target) | set(draft) <= {"info", "forward", "draft", "release"}  # model calls only as batches
    assert target["forward"] < sum(out["num_target_steps"] for out in outs)  # requests shared frames
    local_ray.kill(router)


def test_a_stream_without_deltas_sends_the_text_after_its_first_piece_in_one_item(local_ray, tiny_dirs, expected):
    """A caller that answers with the whole text (a non-streamed HTTP request) gets two text items, the
    first piece (its time to first token) and the rest joined, instead of one a step; same tokens."""
    from specrouter.engine.request import GenerationRequest

    ids, want = expected
    router = make_router(local_ray, f"{tiny_dirs['draft']},{tiny_dirs['target']}")
    request = GenerationRequest(prompt=ids, max_tokens=32, ignore_eos=True)

    def items(deltas: bool) -> list[dict]:
        refs = router.stream.options(num_returns="streaming").remote(request, deltas)
        return [local_ray.get(ref, timeout=600) for ref in refs]

    stepwise, joined = items(True), items(False)
    texts = [[item for item in got if "text" in item] for got in (stepwise, joined)]
    assert len(texts[0]) > 2 and len(texts[1]) == 2
    assert texts[1][0] == texts[0][0]  # the first piece arrives as it does step by step
    for got, text in zip((stepwise, joined), texts):
        assert [t for item in text for t in item["token_ids"]] == want[32]
        assert got[-1]["finish_reason"] == "length" and got[-1]["completion_tokens"] == 32
    assert "".join(item["text"] for item in texts[1]) == "".join(item["text"] for item in texts[0])
    local_ray.kill(router)
