"""Shadow replay of a prompt-lookup drafter over the tokens a step committed."""

from specrouter.core.records import TimingRecord, VerifyRecord
from specrouter.engine.engine import Engine
from specrouter.core.levels import NgramLevel
from specrouter.engine.calibration import router_for
from specrouter.engine.loop import BatchLoop
from specrouter.routing.router import Decision, RouterConfig
from specrouter.routing.scheduler import Plan
from specrouter.core.sequence import SequenceState
from specrouter.core.shadow import shadow_records

CONTEXT = [1, 2, 3, 4, 5, 6, 1, 2]  # the n-gram drafter proposes what followed "1 2": 3 4 5 6 1 2


def verdicts(records: list) -> list[tuple[int, int, list[float], int]]:
    return [(r.num_draft_tokens, r.num_accepted_tokens, r.alphas, r.num_asked) for r in records if isinstance(r, VerifyRecord)]


def test_a_mismatch_is_a_rejection_and_the_replay_goes_on_after_the_targets_token():
    records = shadow_records(NgramLevel(16), SequenceState.new("s", CONTEXT), [3, 4, 9, 7], "t", 4)
    # block 3 4 5 6: two accepted, 5 rejected (the target emitted 9); then after "... 9": no match at all
    assert verdicts(records) == [(4, 2, [1.0, 1.0, 0.0], 4), (0, 0, [], 1)]
    drafts = [(r.level, r.op, r.num_tokens, r.asked) for r in records if isinstance(r, TimingRecord)]
    assert drafts == [("ngram", "draft", 4, 4), ("ngram", "draft", 0, 4)]


def test_a_block_running_past_the_step_is_judged_only_on_the_committed_tokens():
    records = shadow_records(NgramLevel(16), SequenceState.new("s", CONTEXT), [3, 4], "t", 4)
    assert verdicts(records) == [(2, 2, [1.0, 1.0], 2)]  # both accepted; positions 3-4 unobserved, not rejected


def fixed_router(engine: Engine, plan: Plan):
    """A router that runs one plan on every step and keeps what each step teaches it (`observed`)."""
    router = router_for(engine, RouterConfig(explore_every=0), calibrate=False)
    router.plan = lambda requests, backlog=None, remaining=0.0: Decision(plan, (plan.draft_lens[-1],) * len(requests), "fixed")
    router.observed, observe = [], router.observe
    router.observe = lambda requests, records, timings, seconds: router.observed.append(records[0]) or observe(requests, records, timings, seconds)
    return router


def test_replaying_an_ngram_over_greedy_steps_gives_the_verdicts_running_it_gave(tiny_dirs):
    engine = Engine(f"ngram,{tiny_dirs['target']}", dtype="float32")
    router = fixed_router(engine, Plan(("ngram", engine.target_name), (4,), 0.0))
    prompt = [5, 6, 7, 8] * 6
    loop = BatchLoop(engine, router)
    steps, context, ran, replayed = loop.stream(loop.submit(prompt, 48, ignore_eos=True)), list(prompt), [], []
    for new in steps:
        step = verdicts(router.observed[-1])
        if step:  # the last step, asked for one token, runs the target alone
            ran += step
            replayed += verdicts(shadow_records(engine.levels["ngram"], SequenceState.new("s", context), new, engine.target_name, 4))
        context += new
    assert sum(accepted for _, accepted, _, _ in ran) > 0  # the drafter was right sometimes: a real test of agreement
    # each step is one round: the replay sees the same accepted tokens and alphas (its block cut to the step's tokens)
    assert [(a, alphas) for _, a, alphas, _ in replayed] == [(a, alphas) for _, a, alphas, _ in ran]


def test_a_routed_request_measures_the_ngram_drafter_on_every_step_without_running_it(tiny_dirs):
    engine = Engine(f"ngram,{tiny_dirs['draft']},{tiny_dirs['target']}", dtype="float32")
    target = engine.target_name
    router = fixed_router(engine, Plan((tiny_dirs["draft"], target), (3,), 0.0))
    result = engine.generate([5, 6, 7, 8] * 6, 24, ignore_eos=True, router=router, klass="code")
    shadow = [r for records in router.observed for r in records if isinstance(r, VerifyRecord) and r.drafter == "ngram"]
    assert len(shadow) >= result.num_steps and all(r.verifier == target for r in shadow)
    assert router.acceptance.count("code", "ngram", target) > 0
