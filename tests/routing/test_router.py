"""The adaptive router against a simulated environment (costs and acceptances we control), and on
real tiny models through the engine."""

import random

import pytest
import torch

from specrouter.core.records import TimingRecord, VerifyRecord
from specrouter.routing.classifier import classify
from specrouter.routing.router import AdaptiveRouter, Decision, RequestRoute, RouterConfig, shared_devices
from specrouter.routing.scheduler import Plan, predict

from conftest import synthetic_batch_profile


def next_plan(router: AdaptiveRouter, request: RequestRoute, backlog=None, remaining=float("inf")) -> Plan:
    """A request alone's next plan, as the generation loop asks for it (a batch of one)."""
    return router.plan([request], backlog, remaining).plan


def step_done(router: AdaptiveRouter, request: RequestRoute, records: list, seconds: float) -> None:
    """A request alone's step feedback, as the loop gives it (here its level timings among its records)."""
    router.observe([request], [records], [], seconds)


def plan_for(router: AdaptiveRouter, klass: str, backlog=None, remaining=float("inf")) -> Decision:
    """The plan for a new request of `klass` alone."""
    return router.plan([RequestRoute(klass)], backlog, remaining)


def plan_batch(router: AdaptiveRouter, classes: list[str], backlog=None, remaining=float("inf")) -> Plan:
    """The plan for new requests of these classes stepping together."""
    return router.plan([RequestRoute(k) for k in classes], backlog, remaining).plan


def learned(router: AdaptiveRouter, klass: str, records: list, seconds: float | None = None) -> None:
    """A step of some request of `klass` past its first (which would teach no acceptance)."""
    router.observe([RequestRoute(klass, steps=1)], [records], [], seconds)


class SimEnv:
    """Per-level costs (seconds per pass, seconds per drafted token) and pairwise acceptance, by class."""

    def __init__(self, cost: dict[str, float], alpha: dict, seed: int = 0):
        self.cost, self.alpha = dict(cost), alpha
        self.slow: dict[str, float] = {}
        self.rng = random.Random(seed)

    def c(self, level: str) -> float:
        return self.cost[level] * self.slow.get(level, 1.0)

    def step(self, plan: Plan, klass: str) -> tuple[list, int, float]:
        records: list = []
        committed = self._round(plan, len(plan.chain) - 1, plan.draft_lens[-1] if plan.draft_lens else 0, klass, records)
        seconds = sum(r.seconds for r in records if isinstance(r, TimingRecord))
        return records, committed, seconds

    def _round(self, plan, i, k, klass, records) -> int:
        block = self._propose(plan, i - 1, k, klass, records) if i > 0 and k > 0 else 0
        level = plan.chain[i]
        records.append(TimingRecord(level, "score", block + 1, self.c(level) * (1 + 0.02 * block)))
        if not block:
            return 1
        a = self.alpha[klass][(plan.chain[i - 1], level)]
        accepted = 0
        while accepted < block and self.rng.random() < a:
            accepted += 1
        records.append(VerifyRecord(plan.chain[i - 1], level, block, accepted, [a] * block))
        return accepted + 1

    def _propose(self, plan, i, n, klass, records) -> int:
        if i == 0:
            records.append(TimingRecord(plan.chain[0], "draft", n, n * self.c(plan.chain[0])))
            return n
        got = 0
        while got < n:
            got += self._round(plan, i, min(plan.draft_lens[i - 1], n - got - 1), klass, records)
        return min(got, n)


def run(router: AdaptiveRouter, env: SimEnv, klass: str, steps: int) -> list[Plan]:
    request = RequestRoute(klass)
    plans = []
    for _ in range(steps):
        plan = next_plan(router, request)
        records, _, seconds = env.step(plan, klass)
        step_done(router, request, records, seconds)
        plans.append(plan)
    return plans


COSTS = {"A": 0.03, "B": 0.06, "T": 0.25}
ALPHA = {"chat": {("A", "T"): 0.8, ("B", "T"): 0.85, ("A", "B"): 0.85}}


def true_s_per_token(plan: Plan) -> float:
    """What a plan really costs in the simulation (acceptance there is independent per position)."""
    alpha = ALPHA["chat"]
    return predict(plan.chain, plan.draft_lens, lambda level, n: COSTS[level] * (1 + 0.02 * (n - 1)), lambda level, n: COSTS[level] * n,
                   lambda d, v: alpha[(d, v)], 0.0)


def test_router_settles_on_the_best_chain():
    # A -> T is the best chain, A -> B -> T 7% slower: a few unlucky rounds can hide the difference
    # for a while, so over 12 seeded runs the router must settle within 8% of the best in every one
    # and on A -> T itself in most.
    optimum = true_s_per_token(Plan(("A", "T"), (5,), 0.0))
    settled = []
    for seed in range(12):
        plans = run(AdaptiveRouter(["A", "B"], "T", {}), SimEnv(COSTS, ALPHA, seed=seed), "chat", 60)
        assert sum(true_s_per_token(p) for p in plans[-20:]) / 20 <= 1.08 * optimum
        settled.append(plans[-1].chain)
    assert settled.count(("A", "T")) >= 9


def test_a_pair_not_measured_for_a_while_is_explored_when_its_chain_is_close():
    router = AdaptiveRouter(["A", "B"], "T", {})
    router.acceptance.observe("chat", "A", "T", [0.8] * 50)  # measured once, long ago
    env, running = SimEnv(COSTS, ALPHA), Plan(("A", "B", "T"), (2, 5), 0.0)
    for _ in range(RouterConfig().explore_every):  # every level measured, but A and T not as neighbours
        records, _, seconds = env.step(running, "chat")
        learned(router, "chat", records, seconds)
    decision = plan_for(router, "chat")
    assert decision.reason.startswith("explore: A -> T") and decision.plan.chain == ("A", "T")
    assert plan_for(router, "chat").reason == "best predicted"  # explored: not again at once


def test_router_switches_when_a_drafter_slows_down_and_back_when_it_recovers():
    router = AdaptiveRouter(["A", "B"], "T", {}, RouterConfig(explore_every=10))
    env = SimEnv(COSTS, ALPHA)
    before = run(router, env, "chat", 60)
    assert before[-1].chain == ("A", "T")
    env.slow["A"] = 3.0
    during = run(router, env, "chat", 60)
    switched_at = next(i for i, p in enumerate(during) if "A" not in p.chain)
    assert switched_at <= 8
    assert [p.chain for p in during[-10:]].count(("B", "T")) >= 8
    env.slow.clear()
    after = run(router, env, "chat", 80)
    back_at = next(i for i, p in enumerate(after) if p.chain == ("A", "T") and all(q.chain == ("A", "T") for q in after[i : i + 5]))
    assert back_at <= 40


def test_a_route_re_plans_at_once_when_a_levels_cost_changes_as_a_whole():
    """Between re-plans a route keeps its plan, but not past a level-wide change of cost: a drafter
    seen 50 times slower in two passes of one step is dropped on the very next step."""
    router = profiled_router(0.01)
    router.acceptance.observe("code", "d", "t", [0.9] * 100)
    route = RequestRoute("code")
    assert next_plan(router, route).chain == ("d", "t")
    slow = TimingRecord("d", "draft", 4, 4 * 0.5)
    step_done(router, route, [slow, slow, TimingRecord("t", "score", 5, 0.15), VerifyRecord("d", "t", 4, 4, [0.9] * 4)], 4.2)
    assert router.profiler.speed("d") > 10
    assert next_plan(router, route).chain == ("t",)


def test_a_request_starts_from_its_classs_last_plan_unless_another_is_clearly_faster():
    """Two drafters a few % apart are a near tie in the model; a new request keeps to the plan its
    class's last request planned unless another is predicted faster by the hysteresis margin."""
    router = AdaptiveRouter(["a", "b"], "t", {"a": False, "b": False, "t": True}, RouterConfig(explore_every=0))
    router.observe([], [], [TimingRecord("t", "score", n, 0.1 + 0.01 * n, 1) for n in (1, 2, 4, 8, 12)])
    for drafter, seconds in (("a", 0.010), ("b", 0.0102)):
        router.profiler.observe_draft(drafter, 1, seconds)
        router.acceptance.observe("code", drafter, "t", [0.8] * 100)
    assert next_plan(router, RequestRoute("code")).chain == ("a", "t")
    router.profiler.observe_draft("a", 1, 0.0104, weight=1.0)  # b is now predicted a little faster
    assert router.plans("code")[0].chain == ("b", "t")
    assert next_plan(router, RequestRoute("code")).chain == ("a", "t")
    assert next_plan(router, RequestRoute("chat")).chain == ("b", "t")  # another class: no plan of its own yet
    router.profiler.observe_draft("a", 1, 0.03, weight=1.0)  # a is now far dearer
    assert next_plan(router, RequestRoute("code")).chain == ("b", "t")


def test_useless_drafter_pool_falls_back_to_target_only():
    env = SimEnv({"J": 0.05, "T": 0.25}, {"chat": {("J", "T"): 0.02}})
    router = AdaptiveRouter(["J"], "T", {})
    plans = run(router, env, "chat", 60)
    assert [p.chain for p in plans[-20:]].count(("T",)) >= 18


def test_classes_with_different_best_drafters_are_routed_differently():
    alpha = {
        "code": {("A", "T"): 0.9, ("B", "T"): 0.5, ("A", "B"): 0.5},
        "chat": {("A", "T"): 0.3, ("B", "T"): 0.85, ("A", "B"): 0.3},
    }
    env = SimEnv({"A": 0.04, "B": 0.04, "T": 0.25}, alpha)
    router = AdaptiveRouter(["A", "B"], "T", {})
    for _ in range(4):
        run(router, env, "code", 20)
        run(router, env, "chat", 20)
    assert plan_for(router, "code").plan.chain == ("A", "T")
    assert plan_for(router, "chat").plan.chain == ("B", "T")


def test_a_routed_result_explains_chain_prediction_and_runner_up(tiny_dirs):
    from specrouter.engine.calibration import router_for
    from specrouter.engine.engine import Engine

    engine = Engine(f"ngram,{tiny_dirs['draft']},{tiny_dirs['target']}", dtype="float32")
    router = router_for(engine, calibrate=False)
    why = engine.generate_text("Once upon a time", 10, ignore_eos=True, router=router, klass="chat").routing
    assert why["class"] == "chat" and why["measured_s_per_token"] > 0 and why["predicted_s_per_token"] > 0
    assert why["decisions"][0]["runner_up"] is not None and why["steps_by_plan"]


@pytest.mark.parametrize(
    "text, klass",
    [
        ("def add(a, b):\n    return a + b\n", "code"),
        ("for (int i = 0; i < n; i++) {\n  sum += a[i];\n}", "code"),
        ("Write a Python function that reverses a linked list.", "code"),
        ("Summarize the main ideas of this article in three bullet points: ...", "summarization"),
        ("What are some good places to visit in Portugal in spring?", "chat"),
        ("How do I tell if a customer segment is well segmented?", "chat"),
    ],
)
def test_prompt_classifier(text, klass):
    assert classify(text) == klass


def test_routed_generation_on_real_models_is_lossless_and_explained(tiny_dirs):
    from specrouter.engine.calibration import router_for
    from specrouter.engine.engine import Engine

    engine = Engine(f"ngram,{tiny_dirs['draft']},{tiny_dirs['target']}@skip:1,{tiny_dirs['target']}", dtype="float32")
    router = router_for(engine, RouterConfig(explore_every=4))
    expected = Engine(tiny_dirs["target"], dtype="float32").generate_text("def f(x):\n    return", 40, ignore_eos=True).token_ids
    for _ in range(2):
        result = engine.generate_text("def f(x):\n    return", 40, ignore_eos=True, router=router, klass="code")
        assert result.token_ids == expected
    why = result.as_dict()["routing"]
    assert why["class"] == "code" and why["decisions"] and why["measured_s_per_token"] > 0
    assert sum(p["steps"] for p in why["steps_by_plan"]) == result.num_steps
    assert router.profiler.score_time(tiny_dirs["target"], 4) is not None


class SimLevel:
    """A level whose passes take the simulated environment's cost (scaled to real seconds)."""

    can_verify = True

    def __init__(self, name: str, env: SimEnv):
        self.name, self.env = name, env

    def score(self, items):
        import time

        time.sleep(self.env.c(self.name))

    def propose(self, items):
        self.score(items)

    def release(self, seq_id):
        pass


def test_a_far_behind_stale_drafter_is_probed_not_run_and_found_again_when_it_recovers():
    env = SimEnv({"A": 0.003, "S": 0.2, "T": 0.025}, {"chat": {("A", "T"): 0.7, ("S", "T"): 0.95, ("A", "S"): 0.7}})
    router = AdaptiveRouter(["A", "S"], "T", {}, RouterConfig(explore_every=5), levels={"S": SimLevel("S", env)})
    router.acceptance.observe("chat", "S", "T", [0.95] * 50)  # as calibration would have measured it
    slow_phase = run(router, env, "chat", 60)
    assert sum("S" in p.chain for p in slow_phase) <= 2  # at most measured once or twice, then only probed
    assert [p.chain for p in slow_phase[-10:]].count(("A", "T")) >= 8
    env.slow["S"] = 0.0  # S becomes nearly free (a probe still measures real overheads): now the best drafter
    recovered = run(router, env, "chat", 40)
    found = next(i for i, p in enumerate(recovered) if "S" in p.chain)
    assert found <= 20  # a probe every 5 steps; a change this large takes two or three probes to believe
    assert [("S" in p.chain) for p in recovered[-10:]].count(True) >= 8


def test_a_level_whose_probes_confirm_its_cost_is_probed_less_often():
    env = SimEnv({"A": 0.003, "S": 0.2, "T": 0.025}, {"chat": {("A", "T"): 0.7, ("S", "T"): 0.95, ("A", "S"): 0.7}})
    probes = []

    class CountedLevel(SimLevel):
        def score(self, items):
            probes.append(len(probes))
            super().score(items)

    router = AdaptiveRouter(["A", "S"], "T", {}, RouterConfig(explore_every=5), levels={"S": CountedLevel("S", env)})
    router.acceptance.observe("chat", "S", "T", [0.95] * 50)
    run(router, env, "chat", 120)
    # every 5 steps would be 20 or more; backing off to every 20 after a few that found it unchanged: about 8
    assert 4 <= len(probes) <= 10


def test_a_level_on_the_device_of_a_level_in_use_is_never_probed():
    """A skip-layer view of the target's weights (S shares T's device) is up to date while T runs:
    no probe of it, where one on a device of its own is probed every few steps."""
    env = SimEnv({"A": 0.003, "S": 0.2, "T": 0.025}, {"chat": {("A", "T"): 0.7, ("S", "T"): 0.95, ("A", "S"): 0.7}})
    probes = {True: [], False: []}

    for shared in (True, False):
        class CountedLevel(SimLevel):
            def score(self, items, shared=shared):
                probes[shared].append(1)
                super().score(items)

        router = AdaptiveRouter(["A", "S"], "T", {}, RouterConfig(explore_every=5), levels={"S": CountedLevel("S", env)},
                                hosts={"S": "T"} if shared else None)
        router.acceptance.observe("chat", "S", "T", [0.95] * 50)
        plans = run(router, env, "chat", 60)
        assert [p.chain for p in plans[-10:]].count(("A", "T")) >= 8
    assert probes[True] == [] and len(probes[False]) >= 3


def test_a_skip_layer_view_shares_its_full_models_device():
    assert shared_devices(["ngram", "m@int8", "t@skip:1+2", "t@skip", "t"]) == {"t@skip:1+2": "t", "t@skip": "t"}
    assert shared_devices(["m@skip", "m@int8", "t"]) == {}  # int8 weights are another copy, on another worker


def test_a_probe_times_the_short_pass_it_records():
    env = SimEnv({"A": 0.003, "S": 0.02, "T": 0.025}, {"chat": {}})
    passes = []

    class Recording(SimLevel):
        def score(self, items):
            passes.extend(len(item.ctx) + len(item.draft) for item in items)
            super().score(items)

    router = AdaptiveRouter(["A", "S"], "T", {}, RouterConfig(explore_every=5), levels={"S": Recording("S", env)})
    router._probe("S")
    assert passes == [2]  # the 2-token pass it is recorded as, not a prefill of context besides
    assert 0.02 <= router.profiler.score_time("S", 2) < 0.5  # its sleep, and whatever a loaded machine adds
    assert router.profiler.draft_time("S") == pytest.approx(router.profiler.score_time("S", 2), rel=0.05)  # a short pass: a drafted token


def test_a_drafting_calls_own_share_makes_longer_blocks_pay():
    """A remote drafter whose calls cost 60 ms of their own and 5 ms a token, against the same drafter
    priced per token from its 4-token calls alone (20 ms a token): the router plans longer blocks for
    it, as a short block costs it far more a token than a long one."""
    def plan(calls: list[tuple[int, float]]) -> Plan:
        router = AdaptiveRouter(["d"], "t", {"d": False, "t": True}, RouterConfig(explore_every=0))
        router.observe([], [], [TimingRecord("t", "score", n, 0.15 + 0.005 * n) for n in (1, 2, 3, 4, 6, 8, 12)]
                       + [TimingRecord("d", "draft", n, seconds) for n, seconds in calls])
        router.acceptance.observe("code", "d", "t", [0.8] * 200)
        return router.plans("code")[0]

    per_call = plan([(1, 0.065), (4, 0.080)])
    per_token = plan([(4, 0.080)])
    assert per_call.chain == per_token.chain == ("d", "t")
    assert per_call.draft_lens[0] >= per_token.draft_lens[0] + 2


def test_calibration_times_a_drafters_calls_at_two_lengths():
    import time

    from specrouter.core.levels import Block

    from specrouter.engine.calibration import calibrate_costs

    class Remote:  # 100 ms a call besides 5 ms a token
        name, can_verify = "r", False

        def propose(self, items):
            time.sleep(0.1 + 0.005 * items[0].n)
            return [Block([1] * item.n, torch.zeros(item.n, 8)) for item in items]

        def release(self, seq_id):
            pass

    router = AdaptiveRouter(["r"], "T", {"r": False})
    calibrate_costs(router, {"r": Remote()})
    one, four = router.profiler.draft_time("r", 1), router.profiler.draft_time("r", 4)
    assert one >= 0.105 and four >= 0.12
    assert four < 2 * one  # not four times a token's: the call's own share is counted once


def test_a_model_and_its_task_aligned_copies_are_never_stacked():
    from specrouter.routing.router import sibling_pairs

    names = ["ngram", "ngram:8", "smollm2-135m", "smollm2-135m+task:code", "smollm2-135m+task:chat", "q@skip", "q"]
    pairs = sibling_pairs(names)
    family = ["smollm2-135m", "smollm2-135m+task:code", "smollm2-135m+task:chat"]
    assert pairs == {(a, b) for a in family for b in family if a != b}  # not the n-grams, nor a skip-layer view
    pool = names[:-1]
    router = AdaptiveRouter(pool, "q", {}, RouterConfig(explore_every=0), siblings=pairs)
    chains = [p.chain for p in router.plans("code")]
    assert ("smollm2-135m", "smollm2-135m+task:code", "q") not in chains
    assert ("ngram", "smollm2-135m+task:code", "q") in chains and ("smollm2-135m+task:chat", "q@skip", "q") in chains
    assert not any(pair in pairs for pair in router._pairs)  # nor explored


def test_calibration_charges_a_drafter_that_stops_unsure_per_token_it_drafts():
    import time

    from specrouter.core.levels import Block

    from specrouter.engine.calibration import calibrate_costs

    class StopsAtOnce:  # asked for 4 tokens, drafts 1 (unsure after it) in 20 ms
        name, can_verify = "s", False

        def propose(self, items):
            time.sleep(0.02)
            return [Block([1], torch.zeros(1, 8), num_drafted=1) for _ in items]

        def release(self, seq_id):
            pass

    router = AdaptiveRouter(["s"], "T", {"s": False})
    calibrate_costs(router, {"s": StopsAtOnce()})
    assert router.profiler.draft_time("s") >= 0.02  # not a quarter of it


def test_calibration_times_a_level_only_on_the_passes_a_plan_can_run_on_it():
    from specrouter.core.levels import Block
    from specrouter.engine.calibration import calibrate_costs

    class Recording:  # records the rows of every scoring pass
        can_verify, min_confidence = True, 0.0

        def __init__(self, name):
            self.name, self.rows = name, []

        def score(self, items):
            self.rows.append(len(items[0].draft) + 1)

        def propose(self, items):
            return [Block([1], torch.zeros(1, 8)) for _ in items]

        def release(self, seq_id):
            pass

    drafter, middle, target = Recording("d"), Recording("m"), Recording("t")
    levels = {"d": drafter, "m": middle, "t": target}
    router = AdaptiveRouter(["d", "m"], "t", {"d": True, "m": True, "t": True}, RouterConfig(lengths=(1, 2, 3, 4, 6)), max_top_len=0)
    calibrate_costs(router, levels)
    # after the prefill: up to a block of 6 and the verifier's token, also for a middle level (whatever
    # its own bit-exact width: the target checks what it passes up)
    assert drafter.rows[1:] == middle.rows[1:] == [1, 2, 3, 4, 6, 8]
    assert target.rows[1:] == [1]  # it verifies no drafted token bit-exactly: no plan gives it a longer pass
    uncapped = Recording("t")
    calibrate_costs(AdaptiveRouter(["d"], "t", {"d": True, "t": True}, RouterConfig(lengths=(1, 2, 3, 4, 6))), {"t": uncapped})
    assert uncapped.rows[1:] == [1, 2, 3, 4, 6, 8]


def test_calibration_ends_a_stopping_drafters_blocks_after_a_token_it_was_unsure_of():
    from specrouter.engine.calibration import calibration_rounds

    agreed = [True] * 6 + [False] + [True] * 3
    sure = [True, True, False] + [True] * 7
    # (asked, drafted, accepted) from every other position; the text's end is no rejection
    assert calibration_rounds(agreed, sure) == [(8, 3, 3), (8, 1, 1), (6, 6, 2), (4, 4, 0), (2, 2, 2)]
    assert calibration_rounds(agreed) == [(8, 8, 6), (8, 8, 4), (6, 6, 2), (4, 4, 0), (2, 2, 2)]


@pytest.mark.parametrize("draft_confidence", [0.0, 0.05])
def test_calibration_measures_each_pairs_acceptance_per_class_before_any_request(tiny_dirs, draft_confidence):
    from specrouter.engine.calibration import CALIBRATION_PROMPTS, router_for
    from specrouter.engine.engine import Engine

    engine = Engine(f"ngram,{tiny_dirs['other']},{tiny_dirs['draft']},{tiny_dirs['target']}", dtype="float32",
                    draft_confidence=draft_confidence)  # with it, calibration's blocks end where a drafter is unsure
    router = router_for(engine)
    other, draft, target = tiny_dirs["other"], tiny_dirs["draft"], tiny_dirs["target"]
    for klass in CALIBRATION_PROMPTS:
        assert router.acceptance.count(klass, draft, target) > 20 and router.acceptance.count(klass, "ngram", target) > 20
        # The perturbed copy of the target agrees with it far more than an unrelated model does.
        assert router.acceptance.alpha(klass, draft, target) > router.acceptance.alpha(klass, other, target) + 0.3


def test_routed_pool_with_a_cross_tokenizer_drafter_is_lossless_and_learns_its_acceptance(cross_dirs):
    from specrouter.engine.calibration import router_for
    from specrouter.engine.engine import Engine

    smol, qwen_draft, target = cross_dirs["smol"], cross_dirs["qwen-draft"], cross_dirs["target"]
    engine = Engine(f"{smol},{qwen_draft},{target}", dtype="float32")
    router = router_for(engine, RouterConfig(explore_every=3))
    prompt = "def f(x):\n    return"
    expected = Engine(target, dtype="float32").generate_text(prompt, 32, ignore_eos=True).token_ids
    result = engine.generate_text(prompt, 32, ignore_eos=True, router=router, klass="code")
    assert result.token_ids == expected
    # Its acceptance is measured like any pair's, in the verifier's tokens.
    assert any(router.acceptance.count("code", smol, verifier) > 0 for verifier in (qwen_draft, target))
    assert router.profiler.draft_time(smol) is not None


def test_batch_plan_turns_speculation_off_for_a_large_batch_and_on_again_for_a_small_one():
    router = AdaptiveRouter(["d"], "t", {"d": True, "t": True})
    synthetic_batch_profile(router, "t", "d")
    assert plan_batch(router, ["default"] * 16).chain == ("t",)
    assert plan_batch(router, ["default"] * 32).chain == ("t",)  # beyond the profile: extended along its slope
    small = plan_batch(router, ["default"])
    assert small.chain == ("d", "t") and small.draft_lens[0] >= 2
    assert plan_batch(router, ["default"] * 2).chain == ("d", "t")  # between profiled sizes: interpolated


def test_batch_plan_charges_a_far_behind_drafter_its_catch_up_prefill():
    router = AdaptiveRouter(["d"], "t", {"d": True, "t": True})
    synthetic_batch_profile(router, "t", "d")
    router.observe([], [], [TimingRecord("d", "score", n, 0.02 + 0.004 * n, 1) for n in (1, 8)])  # its prefill rate
    assert plan_batch(router, ["default"]).chain == ("d", "t")
    # 2,000 uncached context tokens cost ~13 s to prefill: not worth it for 4 more tokens, worth it for 1,000
    assert plan_batch(router, ["default"], backlog={"d": 2000}, remaining=4).chain == ("t",)
    assert plan_batch(router, ["default"], backlog={"d": 2000}, remaining=1000).chain == ("d", "t")
    assert router.profiler.prefill_time("d", 2000) == pytest.approx(2000 * (0.02 + 0.004 * 8) / 8)


def test_a_drafters_catch_up_teaches_its_prefill_rate_less_the_drafting_it_also_did():
    router = AdaptiveRouter(["d"], "t", {"d": True, "t": True})
    router.observe([], [], [TimingRecord("d", "draft", 4, 0.1, 1, 4)])  # 25 ms a drafted token
    # caught up on 100 context tokens, then drafted 4: 0.5 s in all
    router.observe([], [], [TimingRecord("d", "prefill", 4, 0.5, 1, 4, context=100)])
    assert router.profiler.prefill_time("d", 100) == pytest.approx(0.4)
    assert router.profiler.draft_time("d") == pytest.approx(0.025)  # no drafting cost learnt from it


def test_calibration_times_each_levels_prefill():
    import time

    from specrouter.core.levels import Block
    from specrouter.engine.calibration import calibrate_costs

    class Sleeps:  # 1 ms a row
        name, can_verify, min_confidence = "t", True, 0.0

        def score(self, items):
            time.sleep(0.001 * (len(items[0].ctx) + len(items[0].draft)))

        def propose(self, items):
            return [Block([1], torch.zeros(1, 8)) for _ in items]

        def release(self, seq_id):
            pass

    router = AdaptiveRouter([], "t", {"t": True}, RouterConfig(lengths=(1,)))
    calibrate_costs(router, {"t": Sleeps()}, context=101)
    assert 0.1 <= router.profiler.prefill_time("t", 100) < 1.0  # the 100 rows it slept for, and whatever load adds


def test_a_drafter_out_of_use_is_explored_where_its_catch_up_is_cheap_and_less_often_each_time():
    """Re-measuring a drafter out of use by running its plan first caches what it missed: that runs
    where the step costs a small share of the steps until the next look (20 tokens to catch up), a
    small timed pass (a probe) stands in where it would not (100 tokens at 3 ms); each such look
    doubles the wait for the next while the drafter stays out of use."""
    import time


    class Probed:
        name, can_verify, min_confidence = "d", True, 0.0

        def __init__(self):
            self.probes = 0

        def score(self, items):  # a pass at its drafting cost
            self.probes += 1
            time.sleep(0.01)

        def release(self, seq_id):
            pass

    def router_and_drafter():
        drafter = Probed()
        router = AdaptiveRouter(["d"], "t", {"d": True, "t": True}, levels={"d": drafter})
        # t alone is best (0.1 s a token); d -> t close behind: a pass of 2+ tokens costs 0.15 s + 0.01 s a token
        router.observe([], [], [TimingRecord("t", "score", n, 0.1 if n == 1 else 0.15 + 0.01 * n, 1) for n in (1, 2, 4, 8, 12)]
                       + [TimingRecord("d", "draft", 4, 4 * 0.01, 1)])
        router.profiler.observe_prefill("d", 100, 0.3)
        router.acceptance.observe("chat", "d", "t", [0.55] * 200)
        return router, drafter

    def after_steps(router, n):
        for _ in range(n):
            router.observe([], [], [])

    far, drafter = router_and_drafter()
    after_steps(far, RouterConfig().explore_every)
    decision = plan_for(far, "chat", backlog={"d": 100}, remaining=1000)
    assert decision.plan.chain == ("t",) and drafter.probes == 1
    near, drafter = router_and_drafter()
    after_steps(near, RouterConfig().explore_every)
    decision = plan_for(near, "chat", backlog={"d": 20}, remaining=1000)
    assert decision.reason.startswith("explore: d") and decision.plan.chain == ("d", "t")
    after_steps(near, RouterConfig().explore_every)
    assert not plan_for(near, "chat", backlog={"d": 20}, remaining=1000).reason.startswith("explore")
    after_steps(near, RouterConfig().explore_every)
    assert plan_for(near, "chat", backlog={"d": 20}, remaining=1000).reason.startswith("explore: d")
    assert drafter.probes == 0


def test_request_plan_charges_a_far_behind_drafter_its_catch_up_prefill():
    router = AdaptiveRouter(["d"], "t", {"d": True, "t": True}, RouterConfig(explore_every=0))
    synthetic_batch_profile(router, "t", "d", batches=(1,))
    router.observe([], [], [TimingRecord("d", "score", 8, 0.052, 1)])
    assert plan_for(router, "default").plan.chain == ("d", "t")
    assert plan_for(router, "late", backlog={"d": 2000}, remaining=4).plan.chain == ("t",)
    assert plan_for(router, "early", backlog={"d": 2000}, remaining=1000).plan.chain == ("d", "t")


def test_a_drafter_catching_up_is_neither_a_drafting_cost_nor_overhead():
    router = AdaptiveRouter(["d"], "t", {"d": True, "t": True})
    learned(router, "code", [TimingRecord("d", "draft", 4, 0.04, asked=4), TimingRecord("t", "score", 5, 0.2)], 0.25)
    overhead = router.overhead_s  # 0.2 of the step's 0.01 unaccounted for
    learned(router, "code", [TimingRecord("d", "prefill", 4, 1.5, asked=4), TimingRecord("t", "score", 5, 0.2)], 1.71)
    assert router.overhead_s == pytest.approx(overhead + 0.2 * (0.01 - overhead))
    assert router.profiler.draft_time("d") == pytest.approx(0.01)


def test_each_sequence_drafts_what_its_own_acceptance_pays_for():
    router = AdaptiveRouter(["d"], "t", {"d": True, "t": True})
    synthetic_batch_profile(router, "t", "d")
    plan = plan_batch(router, ["default"] * 2)
    assert plan.chain == ("d", "t")

    def accepting(alpha: float | None) -> RequestRoute:
        """A request that has accepted `alpha` of d's tokens over many blocks (None: it has run none)."""
        request = RequestRoute("default")
        if alpha is not None:
            request.own.observe("d", "t", [alpha] * 2000)
        return request

    low, high, unknown = router.sequence_draft_lens(plan, [accepting(0.2), accepting(0.95), accepting(None)])
    assert 1 <= low < high <= plan.draft_lens[-1]
    assert unknown == router.sequence_draft_lens(plan, [accepting(None)])[0]  # its class's acceptance (0.8)
    assert router.sequence_draft_lens(Plan(("t",), (), 0.1), [accepting(0.9)]) == [0]


def test_a_batched_sequence_of_a_stopping_drafter_drafts_what_its_own_rounds_pay_for():
    """A drafter that stops unsure is planned from each sequence's own rounds (as a routed request's
    are: AdaptiveRouter.teach), not from its agreement ratio: a sequence whose blocks are rejected at
    once drafts shorter ones than a new sequence of its class."""
    from specrouter.routing.acceptance import OwnAcceptance

    router = AdaptiveRouter(["d"], "t", {"d": True, "t": True}, stopping=frozenset({"d"}))
    synthetic_batch_profile(router, "t", "d")
    for i in range(100):  # the class: 9 blocks in 10 accepted whole
        router.acceptance.observe("default", "d", "t", [0.9] * 8)
        router.acceptance.observe_round("default", "d", "t", 8, 8 if i % 10 else 0)
    hard = OwnAcceptance()
    router.teach(hard, [VerifyRecord("d", "t", 8, 0, [0.9] * 8, num_asked=8)] * 12)
    assert hard.runs[("d", "t")].reached[0] == 12
    plan = Plan(("d", "t"), (8,), 0.0)
    new, rejected = router.sequence_draft_lens(plan, [RequestRoute("default"), RequestRoute("default", own=hard)])
    assert rejected < new


def test_batch_speculates_only_when_predicted_clearly_faster_than_plain_decoding():
    cautious = AdaptiveRouter(["d"], "t", {"d": True, "t": True}, RouterConfig(explore_every=0, batch_speculation_margin=0.9))
    bold = AdaptiveRouter(["d"], "t", {"d": True, "t": True}, RouterConfig(explore_every=0, batch_speculation_margin=0.0))
    for router in (cautious, bold):
        synthetic_batch_profile(router, "t", "d")
    # a batch of two: a request alone is held to its own hysteresis instead
    assert plan_batch(bold, ["default"] * 2).chain == ("d", "t")  # faster, but not 90% faster
    assert plan_batch(cautious, ["default"] * 2).chain == ("t",)


def test_batch_plan_explores_an_unmeasured_drafter_and_keeps_it_when_it_pays():
    router = AdaptiveRouter(["d"], "t", {"d": True, "t": True}, RouterConfig(explore_every=4))
    timings = [TimingRecord("t", "score", n, 0.1, 1) for n in (1, 2, 4, 8)] + [TimingRecord("d", "draft", 4, 4 * 0.06, 1)]
    router.observe([], [], timings)
    assert plan_batch(router, ["default"]).chain == ("t",)  # at the prior acceptance the drafter does not pay
    for _ in range(4):
        router.observe([], [], [TimingRecord("t", "score", 1, 0.1, 1)])
    assert plan_batch(router, ["default"]).chain == ("d", "t")  # one exploratory step
    assert plan_batch(router, ["default"]).chain == ("t",)
    router.observe([RequestRoute("default", steps=1)], [[VerifyRecord("d", "t", 3, 3, [0.95] * 3)] * 5], timings)
    assert plan_batch(router, ["default"]).chain == ("d", "t")  # it pays: speculation is back for good


def test_an_early_rejection_does_not_anchor_the_acceptance_estimate():
    from specrouter.routing.acceptance import AcceptanceTable

    table = AcceptanceTable()
    table.observe("code", "d", "t", [0.0])  # a greedy first position: rejected
    table.observe("code", "d", "t", [1.0] * 9)
    assert table.alpha("code", "d", "t") == pytest.approx(0.889, abs=0.01)  # the mean, not ~0.37 (EMA from 0)


def test_expected_tokens_follow_measured_runs_not_just_alpha():
    from specrouter.routing.acceptance import AcceptanceTable
    from specrouter.routing.scheduler import expected_tokens

    table = AcceptanceTable()
    # streaky acceptance: half the rounds accept all 8, half reject at once (alpha 0.5 per position overall)
    for i in range(60):
        table.observe("chat", "d", "t", [1.0] * 8 if i % 2 else [0.0] * 8)
        table.observe_round("chat", "d", "t", 8, 8 if i % 2 else 0)
    iid = expected_tokens(table.alpha("chat", "d", "t"), 8)
    assert table.expected_tokens("chat", "d", "t", 8) > iid + 1.0  # the runs say ~ 0.5 * 9 + 0.5 * 1 = 5 (shrunk toward alpha)
    assert table.expected_tokens("chat", "d", "t", 1) == pytest.approx(1.5, abs=0.05)
    assert table.expected_tokens("chat", "d", "t", 8, ratio=2.0) < table.expected_tokens("chat", "d", "t", 8)  # rejected twice as often
    # no rounds seen: the i.i.d. formula with the pair's alpha
    assert table.expected_tokens("code", "x", "t", 4) == pytest.approx(expected_tokens(table.alpha("code", "x", "t"), 4))


def test_blocks_shorter_than_asked_count_their_first_missing_token_as_a_rejection():
    from specrouter.routing.acceptance import AcceptanceTable

    table = AcceptanceTable()
    table.observe("code", "d", "t", [1.0] * 100)  # every token drafted is accepted ...
    for _ in range(100):
        table.observe_round("code", "d", "t", 2, 2, num_asked=8)  # ... but blocks of 8 hold only 2
    # 2 accepted + the verifier's own (the positions never reached stay near alpha, shrunk): not 9
    assert 3.0 <= table.expected_tokens("code", "d", "t", 8) < 4.0


def test_expected_drafted_tokens_follow_a_drafter_that_stops_unsure():
    from specrouter.routing.acceptance import AcceptanceTable

    table = AcceptanceTable()
    assert table.expected_drafted("code", "d", 8) == 8.0  # never seen stopping: it drafts what it is asked for
    for i in range(100):
        table.observe_draft("code", "d", 8, 2 if i % 2 else 4)
    assert table.expected_drafted("code", "d", 8) == pytest.approx(3.0, abs=0.3)  # shrunk a little toward 8
    assert table.expected_drafted("code", "d", 1) == pytest.approx(1.0, abs=0.01)
    assert table.expected_drafted("chat", "d", 8) == pytest.approx(table.expected_drafted("code", "d", 8), rel=0.05)  # an unseen class: the pooled rates


def test_a_class_seen_little_starts_from_the_pairs_runs_in_other_classes_at_its_own_level():
    from specrouter.routing.acceptance import AcceptanceTable

    table = AcceptanceTable()
    for i in range(100):  # code: long runs once the first token is through (alpha 0.8)
        table.observe("code", "d", "t", [0.8] * 8)
        table.observe_round("code", "d", "t", 8, 8 if i % 5 else 0)
        table.observe_draft("code", "d", 8, 8)
    table.observe("chat", "d", "t", [0.4] * 40)  # chat: half code's acceptance, in two rounds so far ...
    for _ in range(2):
        table.observe_round("chat", "d", "t", 8, 1)
        table.observe_draft("chat", "d", 8, 2)  # ... which stopped after 2 drafted tokens
    chat = table.expected_tokens("chat", "d", "t", 8, stops=True)
    # Two rounds that accepted one token each say little: code's shape (deep positions all but
    # certain) with chat's higher rejection rate, pulled down a little by them; not their own ~1.9
    # tokens, which shrinking each position toward chat's alpha alone would give.
    assert 3.5 < chat < table.expected_tokens("code", "d", "t", 8, stops=True) - 1.0
    assert table.expected_drafted("chat", "d", 8) > 4.0  # two short blocks against 100 full ones elsewhere


def test_a_harder_request_is_rejected_more_where_its_class_rejects_not_where_the_drafter_is_sure():
    from specrouter.routing.acceptance import AcceptanceTable, rejection_ratio

    table = AcceptanceTable()
    table.observe("code", "d", "t", [0.8] * 100)
    for i in range(100):  # a drafter that stops unsure: the first token accepted 4 times in 5, then it is sure
        table.observe_round("code", "d", "t", 8, 8 if i % 5 else 0)
    easy = table.expected_tokens("code", "d", "t", 8, stops=True)
    ratio = rejection_ratio(0.6, 0.8)  # a request accepting 0.6 where its class accepts 0.8: twice the rejections
    assert ratio == pytest.approx(2.0)
    hard = table.expected_tokens("code", "d", "t", 8, ratio=ratio, stops=True)
    # the first position drops from 0.8 to 0.6, the sure ones stay sure; scaling every rate by 0.6 / 0.8
    # would take the deep ones down to 0.75 and cut the block's worth by more than half
    assert hard == pytest.approx(1 + (easy - 1) * 0.6 / 0.8, rel=0.05)


def test_a_requests_own_rounds_pull_a_stopping_drafters_rates_toward_what_it_accepts():
    from specrouter.routing.acceptance import AcceptanceTable, OwnAcceptance

    table = AcceptanceTable()
    table.observe("chat", "d", "t", [0.9] * 100)
    for i in range(100):  # the class: 9 rounds in 10 accept a whole block of 8
        table.observe_round("chat", "d", "t", 8, 8 if i % 10 else 0)
    own = OwnAcceptance()
    for i in range(12):  # this request: its blocks stop after 3 tokens and are rejected at once half the time
        own.observe("d", "t", [1.0] * 3 if i % 2 else [0.0])
        own.observe_round("d", "t", 3, 3 if i % 2 else 0, num_asked=8)
    cls = table.expected_tokens("chat", "d", "t", 8, stops=True)
    mine = table.expected_tokens("chat", "d", "t", 8, stops=True, request=own.runs[("d", "t")])
    # its own rounds emit 0.5 * 1 + 0.5 * 4 = 2.5 tokens; 12 of them outweigh the class's prior (3 rounds'
    # worth) at the positions they reached (the 4th, where they stopped, only 6 times); beyond, the
    # class's rates carry what little survives
    assert cls > 7.0
    assert 2.5 < mine < 4.0


def test_a_requests_rounds_set_the_difficulty_of_the_deep_positions_they_have_not_reached():
    """An easy request (blocks of 5 all accepted, where its class rejects 1 in 5 at every position)
    is read as easy beyond position 5 too, and a hard one (rejected at the second token every time)
    as hard beyond the positions it reached: its own rejections over those its class's rates predict."""
    from specrouter.routing.acceptance import AcceptanceTable, OwnAcceptance

    table = AcceptanceTable()
    table.observe("chat", "d", "t", [0.8] * 100)
    rng = random.Random(0)
    for _ in range(300):
        accepted = next((j for j in range(10) if rng.random() > 0.8), 10)
        table.observe_round("chat", "d", "t", 10, accepted)

    def deep_worth(request=None) -> float:
        """(E(10) - E(5)) / (E(5) - E(4)): r + ... + r^5 for a rate r at positions 6-10 (2.69 at 0.8)."""
        e = table.expected_tokens_by_length("chat", "d", "t", 10, stops=True, request=request)
        return (e[10] - e[5]) / (e[5] - e[4])

    easy, hard = OwnAcceptance(), OwnAcceptance()
    for _ in range(4):
        easy.observe_round("d", "t", 5, 5, num_asked=5)
        hard.observe_round("d", "t", 10, 1)
    assert deep_worth() == pytest.approx(2.69, abs=0.2)
    assert deep_worth(easy.runs[("d", "t")]) > 3.5
    assert deep_worth(hard.runs[("d", "t")]) < 2.0


def test_a_route_follows_its_own_rounds_only_for_drafters_that_stop_unsure():
    def expected_after_own_rounds(stopping: frozenset[str]) -> float:
        router = profiled_router(0.01, stopping)
        for i in range(50):
            router.acceptance.observe("chat", "d", "t", [0.9] * 8)
            router.acceptance.observe_round("chat", "d", "t", 8, 8 if i % 10 else 0)
        route = RequestRoute("chat")
        for _ in range(10):  # agreement as the class's, but every block ends (stops) after 2 tokens, accepted
            next_plan(router, route)
            step_done(router, route, [VerifyRecord("d", "t", 2, 2, [0.9, 0.9], num_asked=8)], 0.1)
        return router._expected(["chat"], router._own_ratios("chat", route.own), route.own)("d", "t", 8)

    assert expected_after_own_rounds(frozenset({"d"})) < 4.5  # 3 tokens a round, as its rounds give
    assert expected_after_own_rounds(frozenset()) > 6.0  # a drafter that does not stop: its ratio (1.0) says it all


def test_a_stopping_drafter_agreeing_where_it_was_sure_is_not_taken_for_easier_than_its_class():
    """Its class's alpha can come from every position of a text (calibration), its own agreement only
    from the positions it was sure of. A request whose first rounds are just like its class's is
    predicted as its class, not (as its rejection ratio would have it) as an easier prompt."""
    router = profiled_router(0.05, frozenset({"d"}))
    router.acceptance.observe("chat", "d", "t", [0.7] * 32)  # calibration: agreement over every position
    for _ in range(30):  # the class's rounds: 3 tokens drafted of 10 asked, all accepted
        router.acceptance.observe_round("chat", "d", "t", 3, 3, num_asked=10)
    route = RequestRoute("chat")
    for _ in range(3):  # this request's rounds: the same, agreeing 0.97 on the tokens it drafted
        next_plan(router, route)
        step_done(router, route, [VerifyRecord("d", "t", 3, 3, [0.97] * 3, num_asked=10)], 0.2)
    ratios = router._own_ratios("chat", route.own)
    assert ratios[("d", "t")] < 0.8  # read as an easier prompt than its class
    cls = router.acceptance.expected_tokens("chat", "d", "t", 10, stops=True)
    assert router._expected(["chat"], ratios, route.own)("d", "t", 10) == pytest.approx(cls, rel=0.05)
    with_ratio = router.acceptance.expected_tokens("chat", "d", "t", 10, ratio=ratios[("d", "t")], stops=True)
    assert with_ratio > 1.08 * cls


def test_an_n_gram_that_matches_rarely_is_expected_to_fill_its_block_when_it_does():
    """Prompt lookup drafts on 1 block in 5 and then all 10 tokens asked, in its class and on a request
    with 5 blocks so far: 2 tokens a block, not its match rate taken for its stop rate at every position."""
    from specrouter.routing.acceptance import AcceptanceTable, _Runs

    table, request = AcceptanceTable(), _Runs()
    for i in range(100):
        table.observe_draft("code", "n", 10, 10 if i % 5 == 0 else 0)
    for i in range(5):
        request.add(10, 10 if i == 0 else 0, decay=1.0)
    assert table.expected_drafted("code", "n", 10) == pytest.approx(2.0, abs=0.4)
    assert table.expected_drafted("code", "n", 10, request) == pytest.approx(2.0, abs=0.4)


def test_a_drafter_seen_only_on_short_blocks_is_charged_its_stop_rate_beyond_them():
    from specrouter.routing.acceptance import AcceptanceTable

    table = AcceptanceTable()
    for i in range(100):
        table.observe_draft("chat", "d", 3, (1, 2, 1, 3)[i % 4])  # asked for 3: each next token drafted half the time
    assert table.expected_drafted("chat", "d", 3) == pytest.approx(1.75, abs=0.05)
    # beyond 3, unseen: the last stop rate seen (1 + 1/2 + 1/4 + ... ~ 2), not never stopping (~ 7.5)
    assert table.expected_drafted("chat", "d", 10) < 2.5


def test_a_stopping_drafter_is_not_taken_to_get_worse_beyond_the_positions_seen():
    from specrouter.routing.acceptance import AcceptanceTable

    table = AcceptanceTable()
    table.observe("chat", "d", "t", [0.5] * 100)  # alpha 0.5, over every token drafted
    for _ in range(100):  # blocks of 3: once through the first position, the drafter is sure
        table.observe_round("chat", "d", "t", 3, 3)
        table.observe_round("chat", "d", "t", 3, 0)
    stopping, full = (table.expected_tokens("chat", "d", "t", 8, stops=s) for s in (True, False))
    assert full < 3.0  # positions 4..8 unseen, for a drafter that drafts whole blocks: alpha, 0.5 each
    assert stopping > 3.5  # ... for one that stops unsure: as well accepted as the third, ~1 each
    # where rounds were seen, they decide for both (which differ in how much alpha, the prior, weighs)
    assert table.expected_tokens("chat", "d", "t", 3, stops=True) == pytest.approx(table.expected_tokens("chat", "d", "t", 3), rel=0.05)


def profiled_router(draft_s_per_token: float, stopping: frozenset[str] = frozenset()) -> AdaptiveRouter:
    """A router over drafter d and target t whose verification costs 0.1 + 0.01 n seconds for n tokens."""
    router = AdaptiveRouter(["d"], "t", {"d": True, "t": True}, RouterConfig(explore_every=0), stopping=stopping)
    router.observe([], [], [TimingRecord("t", "score", n, 0.1 + 0.01 * n, 1) for n in (1, 2, 4, 8, 12)]
                         + [TimingRecord("d", "draft", 4, 4 * draft_s_per_token, 1)])
    return router


def test_a_drafter_that_stops_unsure_is_charged_for_the_tokens_it_drafts():
    router = profiled_router(0.05)
    router.acceptance.observe("code", "d", "t", [0.9] * 200)
    full = router.plans("code")[0]
    # The same drafter, seen stopping after 3 tokens whatever it is asked for (confident runs only).
    learned(router, "code", [TimingRecord("d", "draft", 3, 3 * 0.05, asked=10)] * 40, 0.0)
    stopping = router.plans("code")[0]
    assert stopping.draft_lens[0] > full.draft_lens[0] and stopping.predicted_s_per_token < full.predicted_s_per_token


def test_a_drafter_that_stops_unsure_proposes_up_to_the_longest_length_unsearched():
    """Its block length is a cap that binds only while it stays sure; a drafter of whole blocks has its
    length searched (here short: acceptance 0.5)."""
    whole, stopping = profiled_router(0.05), profiled_router(0.05, stopping=frozenset({"d"}))
    for router in (whole, stopping):
        router.acceptance.observe("code", "d", "t", [0.5] * 200)
    speculating = [next(p for p in router.plans("code") if p.chain == ("d", "t")) for router in (whole, stopping)]
    assert speculating[0].draft_lens[0] <= 3
    assert speculating[1].draft_lens == (max(RouterConfig().lengths),)


def test_a_stopping_level_in_the_middle_is_charged_for_the_blocks_it_passes_up():
    """In n -> d -> t, d verifies n's blocks and passes up 3 of the 10 tokens asked (it stopped unsure):
    those blocks count as its drafted ones, for the class and for the request."""
    router = AdaptiveRouter(["n", "d"], "t", {"n": False, "d": True, "t": True}, RouterConfig(explore_every=0), stopping=frozenset({"d"}))
    route = RequestRoute("chat")
    before = router._drafted(["chat"])("d", 10)
    step = [TimingRecord("n", "draft", 2, 0.0003, asked=3), VerifyRecord("n", "d", 2, 2, [1.0, 1.0], 3),
            VerifyRecord("d", "t", 3, 3, [1.0] * 3, 10)]
    for _ in range(20):
        next_plan(router, route)
        step_done(router, route, step, 0.2)
    assert before > 9.0 and router._drafted(["chat"])("d", 10) < 4.0 and router._drafted(["chat"], route.own)("d", 10) < 4.0
    # a drafter that does not stop unsure, or one at the bottom (its TimingRecord counts), adds nothing here
    assert router.middle_blocks(step) == [("d", 10, 3)]
    assert router.middle_blocks(step[2:]) == []


def test_a_request_on_which_its_drafter_stops_sooner_is_charged_the_tokens_it_drafts_there():
    router = profiled_router(0.05)
    router.acceptance.observe("chat", "d", "t", [0.9] * 200)
    learned(router, "chat", [TimingRecord("d", "draft", 10, 0.5, asked=10)] * 40, 0.0)  # the class: whole blocks
    hard = RequestRoute("chat")
    for _ in range(3):  # on this prompt the drafter is unsure after 2 tokens, and those 2 are accepted
        next_plan(router, hard)
        step_done(router, hard, [TimingRecord("d", "draft", 2, 0.1, asked=10), VerifyRecord("d", "t", 2, 2, [1.0, 1.0], 10)], 0.2)
    class_drafted, own_drafted = router._drafted(["chat"])("d", 10), router._drafted(["chat"], hard.own)("d", 10)
    assert class_drafted > 9.0 and own_drafted < 4.0
    # So asking for long blocks costs this request little: its best plan keeps them.
    assert router.plans("chat", hard.own)[0].draft_lens[0] >= 8


def test_a_prompt_lookup_drafter_is_expected_to_give_no_more_than_its_matches_hold():
    """The class: a match on 1 round in 5, then 2 of 4 accepted. A request: a match on 1 round in 5, each
    accepted whole, so it agrees more where it drafts (its ratio to the class halves the rejections)
    but matches no more often: a round of 4 gives it at most 1 + 0.2 * 4 tokens, not the class's
    no-match rounds scaled away by that ratio."""
    from specrouter.routing.acceptance import OwnAcceptance

    router = AdaptiveRouter(["n"], "t", {"n": True, "t": True}, RouterConfig(explore_every=0), lookup=frozenset({"n"}))
    table, own = router.acceptance, OwnAcceptance()
    for i in range(125):
        matched = i % 5 == 0
        table.observe_round("code", "n", "t", 4 if matched else 0, 2 if matched else 0, 4)
        table.observe_draft("code", "n", 4, 4 if matched else 0)
        if matched:
            table.observe("code", "n", "t", [1.0, 1.0, 0.0])
    for i in range(25):
        matched = i % 5 == 0
        own.observe_round("n", "t", 4 if matched else 0, 4 if matched else 0, 4)
        own.observe_draft("n", 4, 4 if matched else 0)
        if matched:
            own.observe("n", "t", [1.0] * 4)
    ratios = router._own_ratios("code", own)
    assert ratios[("n", "t")] < 0.6
    request, klass = router._expected(["code"], ratios, own)("n", "t", 4), router._expected(["code"])("n", "t", 4)
    assert klass < request <= 1 + 0.2 * 4


def test_prompt_lookup_runs_blocks_longer_than_a_models_where_wide_passes_cost_little_a_token():
    """A target whose pass over 32 rows costs 9 one-token passes (llama.cpp's on a CPU), and prompt
    lookup that finds a match on 1 round in 2 and is then accepted whole: its blocks run past the
    longest a model drafter's may, where the router searches lookup lengths."""
    costs = {1: 0.027, 2: 0.043, 3: 0.055, 4: 0.066, 6: 0.096, 8: 0.116, 12: 0.143, 16: 0.142, 24: 0.216, 32: 0.251}
    records = [TimingRecord("n", "draft", 4, 1e-4, 1)] + [TimingRecord("t", "score", n, s, 1) for n, s in costs.items()]
    plans = {}
    for lookup in (frozenset(), frozenset({"n"})):
        router = AdaptiveRouter(["n"], "t", {"n": True, "t": True}, RouterConfig(explore_every=0), lookup=lookup)
        router.observe([], [], records)
        for i in range(200):
            g = max(router.lengths_of("n"))
            matched = i % 2 == 0
            router.acceptance.observe_round("code", "n", "t", g if matched else 0, g if matched else 0, g)
            router.acceptance.observe_draft("code", "n", g, g if matched else 0)
            if matched:
                router.acceptance.observe("code", "n", "t", [1.0] * g)
        plans[bool(lookup)] = router.plans("code")[0]
    assert plans[False].chain == plans[True].chain == ("n", "t")
    assert plans[False].draft_lens[0] <= max(RouterConfig().lengths) < plans[True].draft_lens[0]
    assert plans[True].predicted_s_per_token < plans[False].predicted_s_per_token


def test_streaky_acceptance_makes_the_router_draft_longer_blocks():
    router = profiled_router(0.02)
    router.acceptance.observe("chat", "d", "t", [0.6] * 200)
    iid = router.plans("chat")[0]
    for i in range(100):
        router.acceptance.observe_round("chat", "d", "t", 10, 10 if i % 5 < 3 else 0)  # 60% of blocks accepted whole
    streaky = router.plans("chat")[0]
    assert streaky.chain == iid.chain == ("d", "t") and streaky.draft_lens[0] > iid.draft_lens[0]


def test_requests_of_one_class_are_planned_for_their_own_acceptance():
    router = profiled_router(0.02)
    router.acceptance.observe("chat", "d", "t", [0.6] * 400)
    easy, hard = RequestRoute("chat"), RequestRoute("chat")
    for _ in range(RouterConfig().replan_every):  # each re-plans after as many of its own steps
        for route, accepted in ((easy, 8), (hard, 0)):
            next_plan(router, route)
            step_done(router, route, [VerifyRecord("d", "t", 8, accepted, [float(accepted > 0)] * 8)] * 2, 1.0)
    easy_plan, hard_plan = next_plan(router, easy), next_plan(router, hard)
    assert easy_plan.chain == ("d", "t")
    assert easy_plan.predicted_s_per_token < hard_plan.predicted_s_per_token
    assert hard_plan.chain == ("t",) or hard_plan.draft_lens[0] < easy_plan.draft_lens[0]


def test_a_request_that_suits_a_drafter_against_the_target_is_planned_for_it_below_other_verifiers_too():
    from specrouter.routing.acceptance import OwnAcceptance

    router = AdaptiveRouter(["n", "d"], "t", {"n": False, "d": True, "t": True}, RouterConfig(explore_every=0))
    router.observe([], [], [TimingRecord(level, "score", k, base + 0.01 * k, 1) for level, base in (("t", 0.1), ("d", 0.03))
                              for k in (1, 2, 4, 8, 12)] + [TimingRecord("n", "draft", 4, 0.0004, 1)])
    for pair, alpha in ((("n", "t"), 0.2), (("n", "d"), 0.2), (("d", "t"), 0.8)):
        router.acceptance.observe("chat", *pair, [alpha] * 200)
    copying = OwnAcceptance()  # n-gram replays against the target (specrouter/core/shadow.py) that accepted everything
    copying.observe("n", "t", [1.0] * 40)

    def three_level(own):
        return next(p for p in router.plans("chat", own) if p.chain == ("n", "d", "t"))

    # the n -> d pair was never run by the request: its replays against t are what make n -> d -> t faster
    assert three_level(copying).predicted_s_per_token < 0.9 * three_level(None).predicted_s_per_token
    assert router.plans("chat", copying)[0].chain[0] == "n" and router.plans("chat", None)[0].chain[0] != "n"


@pytest.mark.parametrize("replayed", [True, False])
def test_a_drafter_replayed_on_every_step_is_estimated_from_its_replays_below_every_verifier(replayed):
    """A class whose requests copy a lot (its n-gram replays against the target accept 5 tokens of 6)
    plans n -> d -> t from those replays, though n -> d was last measured at calibration, on a text
    that did not copy; a drafter measured against the target by real rounds keeps its pairs apart."""
    router = AdaptiveRouter(["n", "d"], "t", {"n": False, "d": True, "t": True}, RouterConfig(explore_every=0))
    router.observe([], [], [TimingRecord(level, "score", k, base + 0.01 * k, 1) for level, base in (("t", 0.1), ("d", 0.03))
                              for k in (1, 2, 4, 8, 12)] + [TimingRecord("n", "draft", 4, 0.0004, 1)])
    router.acceptance.observe("code", "n", "d", [0.02] * 30)  # calibration
    router.acceptance.observe("code", "d", "t", [0.8] * 200)
    step = [TimingRecord("n", "draft", 3, 0.0003, asked=3), VerifyRecord("n", "t", 3, 3, [1.0] * 3, 3, replayed=replayed),
            TimingRecord("n", "draft", 3, 0.0003, asked=3), VerifyRecord("n", "t", 3, 2, [1.0, 1.0, 0.0], 3, replayed=replayed)]
    for _ in range(30):
        learned(router, "code", step, 0.3)
    three_level = next(p for p in router.plans("code") if p.chain == ("n", "d", "t"))
    two_level = next(p for p in router.plans("code") if p.chain == ("d", "t"))
    if replayed:
        assert three_level.predicted_s_per_token < 0.9 * two_level.predicted_s_per_token
    else:
        assert three_level.predicted_s_per_token > 0.95 * two_level.predicted_s_per_token


@pytest.mark.parametrize("replayed", [True, False])
def test_a_drafter_replayed_on_every_step_is_not_explored(replayed):
    router = AdaptiveRouter(["n", "d"], "t", {"n": False, "d": True, "t": True}, RouterConfig())
    router.observe([], [], [TimingRecord(level, "score", k, base + 0.01 * k, 1) for level, base in (("t", 0.1), ("d", 0.03))
                              for k in (1, 2, 4, 8, 12)] + [TimingRecord("n", "draft", 4, 0.0004, 1)])
    router.acceptance.observe("chat", "n", "d", [0.9] * 50)  # measured once, long ago: n -> d -> t is close to the best
    step = [TimingRecord("d", "draft", 3, 0.09, asked=3), TimingRecord("t", "score", 4, 0.14),
            VerifyRecord("d", "t", 3, 2, [1.0, 1.0, 0.0]),
            # n, replayed against t over the step's tokens (specrouter/core/shadow.py): its first token would have been accepted
            TimingRecord("n", "draft", 3, 0.0003, asked=10), VerifyRecord("n", "t", 3, 1, [1.0, 0.0], 3, replayed=replayed)]
    reasons = []
    for _ in range(3 * RouterConfig().explore_every):
        reasons.append(plan_for(router, "chat").reason)
        learned(router, "chat", step, 0.25)
    explored = [r for r in reasons if r.startswith("explore")]
    assert explored == [] if replayed else any("n -> d" in r for r in explored)


def test_a_requests_first_step_teaches_no_acceptance():
    """A response's first tokens are drafted worse than the rest: the first step's verdicts (it also
    prefills every level) count neither for the class nor for the request's own plan."""
    router = profiled_router(0.02)
    router.acceptance.observe("chat", "d", "t", [0.6] * 200)
    route = RequestRoute("chat")
    for accepted in (0, 8):
        next_plan(router, route)
        step_done(router, route, [VerifyRecord("d", "t", 8, accepted, [float(accepted > 0)] * 8)], 1.0)
    assert router.acceptance.count("chat", "d", "t") == 208  # the second step's 8 positions only
    assert route.own.alpha("d", "t", fallback=0.6) > 0.6  # its own: the block accepted whole, not the first


def test_a_kept_plan_is_predicted_anew_from_the_requests_latest_rounds():
    """Between re-plans a request keeps its plan, but each step's prediction (what its explanation
    compares with the time measured) follows its latest rounds."""
    router = profiled_router(0.02)
    router.acceptance.observe("chat", "d", "t", [0.6] * 200)
    route = RequestRoute("chat")
    plans = []
    for _ in range(2 * RouterConfig().replan_every):
        plans.append(next_plan(router, route))
        g = plans[-1].draft_lens[0]
        step_done(router, route, [VerifyRecord("d", "t", g, g, [1.0] * g)], 1.0)  # every block accepted whole
    replanned, kept = plans[RouterConfig().replan_every:][:2]
    assert kept.chain + kept.draft_lens == replanned.chain + replanned.draft_lens
    assert kept.predicted_s_per_token < replanned.predicted_s_per_token
