"""`specrouter` command line: serve, generate, bench, models, tasks, align."""

from __future__ import annotations

import argparse
import json
import os
import sys

from specrouter.core.hugepages import reexec_with_huge_pages
from specrouter.serving.config import DEFAULT_CHAIN, ServeConfig
from specrouter.tasks.align_config import LOSSES, AlignConfig

DEFAULT_DRAFTER, DEFAULT_TARGET = "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="specrouter", description="Lossless multi-level speculative decoding.")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate text with a chain of models")
    gen.add_argument("--chain", default=DEFAULT_CHAIN, help="M1,M2,...,TARGET (drafters smallest first; target last)")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--max-tokens", type=int, default=128)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16")
    gen.add_argument("--device", default="cpu")
    gen.add_argument("--draft-lens", type=_int_list, default=None, help="block length per drafter level, bottom first")
    gen.add_argument("--draft-confidence", type=float, default=0.0,
                     help="a drafting model ends its block after a token it gave less than this probability (0: never)")
    gen.add_argument("--threads", type=int, default=None, help="threads of torch and llama.cpp levels (default: every core)")
    gen.add_argument("--not-bit-exact", dest="bit_exact", action="store_false",
                     help="let a llama.cpp target verify blocks wider than it verifies bit-exactly (faster; equal up to rounding)")
    gen.add_argument("--ignore-eos", action="store_true", help="do not stop at end tokens")
    gen.add_argument("--json", action="store_true", help="print one JSON object")
    gen.add_argument("--adaptive", action="store_true", help="treat --chain as a pool; route each step to the best chain")
    gen.add_argument("--prompt-class", default=None, help="with --adaptive: the prompt's class (default: classified)")
    gen.add_argument("--tau-high", type=float, default=None,
                     help="tiered (lossy) verification: commit drafted tokens the drafter was at least this sure of unchecked")
    gen.add_argument("--tau-low", type=float, default=None,
                     help="with --tau-high: check those from here up with the slim verifier (default: --tau-high, none)")
    gen.add_argument("--max-disagreement", type=float, default=None,
                     help="tiered (lossy) verification by a quality budget instead of --tau-high: the share of tokens "
                          "that may differ from the target's; thresholds calibrated on the target's agreement with "
                          "the drafter measured as it generates (lossless until it measured enough)")
    gen.add_argument("--slim-verifier", default="@skip",
                     help="with --tau-low below --tau-high: the slim verifier, the target with @skip (a llama.cpp "
                          "target has none); none: the target checks tier 2 too")
    gen.add_argument("--tasks", nargs="?", const="default", default=None, metavar="TASK_MODEL",
                     help="with --adaptive: class the prompt by its discovered task (`specrouter tasks fit`; default: "
                     "the default task model) instead of the lexical classifier")

    srv = sub.add_parser("serve", help="serve the OpenAI-compatible HTTP API and the gRPC API on an embedded local Ray")
    srv.add_argument("--config", default=None, help="YAML ServeConfig (chain, dtype, placement, ...); flags override it")
    srv.add_argument("--chain", default=None, help=f"the chain or, with --adaptive, the pool (default {DEFAULT_CHAIN})")
    srv.add_argument("--adaptive", action="store_true", default=None, help="route each step to the best chain of the pool")
    srv.add_argument("--pipeline", action="store_true", default=None, help="draft the next block while the target verifies")
    srv.add_argument("--not-bit-exact", dest="bit_exact", action="store_false", default=None,
                     help="let a llama.cpp target verify blocks wider than it verifies bit-exactly (faster; equal up to rounding)")
    srv.add_argument("--host", default="127.0.0.1", help="HTTP bind address (default loopback)")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--grpc-port", type=int, default=None, help="public gRPC API port (default 9000; binds the config's grpc_host)")
    srv.add_argument("--address", default=None, help="a running Ray cluster to join (default: start a local one)")
    srv.add_argument("--api-key", action="append", default=None, metavar="KEY",
                     help="require this API key (repeat for several; default $SPECROUTER_API_KEY, comma-separated)")
    srv.add_argument("--api-key-file", default=None, metavar="PATH", help="require one of the keys in this file (one a line)")
    srv.add_argument("--max-waiting-requests", type=int, default=None,
                     help="requests that may wait for a place in the batch; past it: 429 with Retry-After (default 64)")
    srv.add_argument("--kv-cache-tokens", type=int, default=None, metavar="N",
                     help="positions of each llama.cpp model's KV cache, all its sequences together (default 16384)")
    srv.add_argument("--prefill-chunk-tokens", type=int, default=None, metavar="N",
                     help="the most prompt tokens a step prefills; longer prompts take several steps (default 512)")
    srv.add_argument("--tasks", nargs="?", const="default", default=None, metavar="TASK_MODEL",
                     help="class each request by its discovered task (a task model of `specrouter tasks fit`, or its "
                          ".json; default: the default task model) instead of the lexical classifier")

    bench = sub.add_parser("bench", help="load-test a running server over HTTP (tokens/s, TTFT, inter-token latency)")
    bench.add_argument("--url", default="http://127.0.0.1:8000")
    bench.add_argument("--num-prompts", type=int, default=8)
    bench.add_argument("--concurrency", type=int, default=1)
    bench.add_argument("--max-tokens", type=int, default=64)
    bench.add_argument("--temperature", type=float, default=0.0)
    bench.add_argument("--json", action="store_true", help="print one JSON object")

    models = sub.add_parser("models", help="list the offline catalog and what each model is ready for (torch: "
                            "converted weights; gguf: the hash-checked GGUF for llama.cpp levels)")
    models.add_argument("--prepare", nargs="*", metavar="NAME", help="prepare these models for both backends (no names: all)")
    models.add_argument("--gguf-only", action="store_true", help="with --prepare: the GGUF alone (llama.cpp levels)")
    models.add_argument("--requirements", nargs="+", metavar="NAME", help="print the pip requirements of these models")
    models.add_argument("--tokenizer-only", action="store_true", help="with --prepare / --requirements: the tokenizer alone")

    tasks = sub.add_parser("tasks", help="discover tasks in a prompt corpus (clusters of prompt embeddings)")
    tasks_sub = tasks.add_subparsers(dest="tasks_command", required=True)
    fit = tasks_sub.add_parser("fit", help="embed the training corpus with each encoder, cluster it, keep the most accurate "
                               "one that classes a request within 5 ms as default")
    fit.add_argument("--encoders", default=f"minilm,embed:{DEFAULT_TARGET},hidden:{DEFAULT_TARGET}",
                     help="comma-separated: minilm, embed:MODEL (its input embeddings), hidden:MODEL (its last layer)")
    fit.add_argument("--per-source", type=int, default=64, help="training prompts per source (code: stdlib, chat: ShareGPT)")
    fit.add_argument("--held-out", type=int, default=40, help="evaluation prompts per source scored for routing accuracy")
    fit.add_argument("--k", type=_int_list, default=[2, 3, 4, 5], help="cluster counts tried (best silhouette wins)")
    fit.add_argument("--seed", type=int, default=0)
    fit.add_argument("--json", action="store_true", help="print one JSON object")

    align = sub.add_parser("align", help="distil a drafter toward the target on one task's prompts (LoRA adapter)")
    align.add_argument("--task", required=True, help="a task of the default task model (`specrouter tasks fit`)")
    align.add_argument("--drafter", default=DEFAULT_DRAFTER)
    align.add_argument("--target", default=DEFAULT_TARGET,
                       help="the target (torch) whose distributions a divergence compares; with --loss seqkd any level "
                            "that generates its text, e.g. qwen2.5-coder-1.5b@gguf")
    align.add_argument("--steps", type=int, default=AlignConfig.steps)
    align.add_argument("--lr", type=float, default=AlignConfig.lr)
    align.add_argument("--rank", type=int, default=AlignConfig.rank)
    align.add_argument("--loss", choices=LOSSES, default=AlignConfig.loss,
                       help="total variation (1 - acceptance) or forward KL (drafters on the target's tokenizer); "
                            "seqkd: cross-entropy on the target's text (drafters on any tokenizer, e.g. smollm2-135m)")
    align.add_argument("--continuation-tokens", type=int, default=AlignConfig.continuation_tokens)
    align.add_argument("--teacher-batch", type=_positive_int, default=16,
                       help="seqkd: prompts the target continues together (1: one at a time, the text the target alone "
                            "writes; a batched pass may round differently and take the other side of a near-tie)")
    align.add_argument("--max-prompts", type=int, default=None, help="use at most this many of the task's prompts")
    align.add_argument("--per-source", type=int, default=64,
                       help="training prompts per source, each classed by the task model (as many as `tasks fit` took, or more)")
    align.add_argument("--drafter-dtype", choices=["float32", "bfloat16"], default="bfloat16",
                       help="the frozen base drafter's dtype (adapters train in float32)")
    align.add_argument("--seed", type=int, default=AlignConfig.seed)
    return parser


def cmd_generate(args) -> int:
    from specrouter.engine.engine import Engine
    from specrouter.core.sampling import SamplingParams

    from specrouter.core.tiers import QualityBudget, Thresholds

    params = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    if args.tau_low is not None and args.tau_high is None:
        raise ValueError("--tau-low needs --tau-high")
    if args.tau_high is not None and args.max_disagreement is not None:
        raise ValueError("give --tau-high or --max-disagreement, not both")
    tiered = Thresholds(args.tau_high, args.tau_low if args.tau_low is not None else args.tau_high) if args.tau_high is not None else None
    budget = QualityBudget(args.max_disagreement) if args.max_disagreement is not None else None  # no slim tier
    engine = Engine(args.chain, dtype=args.dtype, device=args.device, draft_lens=args.draft_lens, num_threads=args.threads,
                    draft_confidence=args.draft_confidence, bit_exact=args.bit_exact,
                    slim_verifier=tiered.slim_verifier(args.slim_verifier) if tiered is not None else None)
    router, klass, match = None, "default", None
    if args.adaptive:
        from specrouter.engine.calibration import router_for
        from specrouter.routing.classifier import classify_request
        from specrouter.tasks.classifier import TaskClassifier

        if args.prompt_class is None and args.tasks:
            target = engine.specs[-1]
            shared = {} if target.quant else {target.model: (engine.provider.get(target.model).model, engine.tokenizer)}
            match = TaskClassifier.load(args.tasks, shared=shared).classify(args.prompt)
            print(f"[class {match.task}: discovered task at distance {match.distance:.3f}, {match.ms:.1f} ms]", file=sys.stderr)
        klass = classify_request(args.prompt, args.prompt_class, match.task if match is not None else None)
        router = router_for(engine)
    result = engine.generate_text(args.prompt, args.max_tokens, params=params, seed=args.seed, ignore_eos=args.ignore_eos,
                                  router=router, klass=klass, tiered=budget or tiered)
    if args.json:
        print(json.dumps({**result.as_dict(), **({"task": match.as_dict()} if match is not None else {})}))
        return 0
    print(result.text)
    print(
        f"\n[{len(result.token_ids)} tokens in {result.elapsed_s:.2f}s = {result.tokens_per_s:.2f} tok/s; "
        f"{result.as_dict()['tokens_per_target_step']} tokens per target step; chain {' -> '.join(result.chain)}]",
        file=sys.stderr,
    )
    if result.tiered is not None:
        t = result.tiers
        budget = f"max_disagreement {result.quality_budget.max_disagreement:g}, last " if result.quality_budget else ""
        print(f"  tiered verification ({'lossy' if result.lossy else 'lossless'}, {budget}tau_high {result.tiered.tau_high:g}, "
              f"tau_low {result.tiered.tau_low:g}): {t.tier1_tokens} tokens unchecked, {t.tier2_tokens} by the slim verifier "
              f"({t.slim_rejections} replaced), {t.tier3_tokens} by the target", file=sys.stderr)
    if router is not None:
        for d in result.routing["decisions"]:
            print(f"  route @token {d['at_token']}: {' -> '.join(d['chain'])} {d['draft_lens']} ({d['reason']})", file=sys.stderr)
    for stats in result.level_stats[:-1]:
        print(
            f"  {stats.name}: drafted {stats.num_draft_tokens}, accepted {stats.num_accepted_tokens} "
            f"({stats.acceptance_rate:.0%}), mean accepted length {stats.mean_accepted_length:.2f}",
            file=sys.stderr,
        )
    return 0


def serve_config(args) -> ServeConfig:
    """The config file's ServeConfig (or the default) with the command's flags over it."""
    config = (ServeConfig.from_file(args.config) if args.config else ServeConfig()).model_dump()
    overrides = {"chain": args.chain, "adaptive": args.adaptive, "pipeline": args.pipeline, "bit_exact": args.bit_exact,
                 "grpc_port": args.grpc_port,
                 "api_key": args.api_key, "api_key_file": args.api_key_file, "max_waiting_requests": args.max_waiting_requests,
                 "prefill_chunk_tokens": args.prefill_chunk_tokens, "tasks": args.tasks}
    config.update({k: v for k, v in overrides.items() if v is not None})
    if args.kv_cache_tokens is not None:  # every model's placement, the "*" entry included
        config["placement"] = {label: {**entry, "kv_cache_tokens": args.kv_cache_tokens}
                               for label, entry in {"*": {}, **config["placement"]}.items()}
    return ServeConfig.model_validate(config)


def cmd_serve(args) -> int:
    import signal
    import threading

    import ray

    from specrouter.serving import serve as specrouter_serve
    from specrouter.runtime.actors import start_local_ray

    config = serve_config(args)
    if config.tasks is not None and not args.address:  # the router runs here: its task model must be here too
        from specrouter.tasks.discovery import task_model_path

        task_model_path(config.tasks)
    warning = specrouter_serve.exposure_warning(config, args.host)
    if warning:
        print(f"specrouter: {warning}", file=sys.stderr, flush=True)
    if args.address:
        ray.init(address=args.address, log_to_driver=False)
        started = False
    else:  # the embedded Ray listens here: its ports must be free before anything starts
        specrouter_serve.check_ports_free(config, args.host, args.port)
        started = start_local_ray(num_cpus=max(4, len(config.chain.split(",")) + 2))
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        print(f"specrouter: loading {config.chain} ...", file=sys.stderr, flush=True)
        urls = specrouter_serve.start(config, args.host, args.port)
        print(f"specrouter: serving {config.served_name}\n"
              f"  chain        {specrouter_serve.served_chain()}\n"
              f"  OpenAI HTTP  {urls.http}/v1  (completions, chat/completions, models)\n"
              f"  metrics      {urls.http}/metrics\n"
              f"  gRPC         {urls.grpc or 'disabled'}  (specrouter.v1.SpecRouter; SDK: specrouter.Client)\n"
              "Ctrl-C stops.", flush=True)
        stop.wait()
    finally:
        if started:  # the embedded Ray stops whole, Serve's actors with it
            ray.shutdown()
        else:  # a cluster's Ray goes on: take this application off it
            from ray import serve

            serve.shutdown()
    return 0


def cmd_bench(args) -> int:
    from specrouter.serving.loadtest import run_load

    report = run_load(args.url, args.num_prompts, args.concurrency, args.max_tokens, args.temperature)
    if args.json:
        print(json.dumps(report))
    else:
        for key, value in report.items():
            print(f"{key:28s} {value}")
    return 0


def cmd_models(args) -> int:
    from specrouter.core import adapters, catalog

    if args.requirements:
        for name in args.requirements:
            entry = catalog.get_entry(name)
            print("\n".join(entry.tokenizer_requirements if args.tokenizer_only else entry.requirements))
        return 0
    names = list(catalog.CATALOG) if args.prepare == [] else (args.prepare or [])
    for name in names:
        if args.tokenizer_only:
            print(f"{name}: {catalog.prepare_tokenizer(name)}")
        elif args.gguf_only:
            print(f"{name}: {catalog.prepare_gguf(name)} (tokenizer {catalog.prepare_tokenizer(name)})")
        else:
            print(f"{name}: {catalog.prepare(name)} (gguf {catalog.prepare_gguf(name)})")
    if args.prepare is None:
        print(f"{'model':22s} {'torch':6s} {'gguf':6s} description")
        for entry in catalog.CATALOG.values():
            torch_ready, gguf_ready = catalog.is_prepared(entry.name), catalog.is_gguf_prepared(entry.name)
            print(f"{entry.name:22s} {'ready' if torch_ready else '-':6s} {'ready' if gguf_ready else '-':6s} {entry.description}")
            if not (torch_ready or gguf_ready):
                print(f"{'':22s} install: {entry.install_command[:100]}{'...' if len(entry.install_command) > 100 else ''}")
            if tasks := adapters.aligned_tasks(entry.name):
                print(f"{'':22s} aligned drafters: {', '.join(f'{entry.name}+task:{t}' for t in tasks)}")
    return 0


def cmd_tasks(args) -> int:
    from specrouter.tasks.fit import fit_and_compare

    report = fit_and_compare(args.encoders.split(","), args.per_source, args.held_out, args.seed, tuple(args.k))
    if args.json:
        print(json.dumps(report))
        return 0
    for r in report["encoders"]:
        print(f"{r['encoder']:32s} K={r['k']} tasks {', '.join(r['names'])}: routing accuracy {r['routing_accuracy']:.1%}, "
              f"{r['ms_per_prompt']:.1f} ms per prompt")
    print(f"default: {report['default']} (saved in {report['tasks_dir']})")
    return 0


def cmd_align(args) -> int:
    from specrouter.tasks.commands import align_task

    config = AlignConfig(steps=args.steps, lr=args.lr, rank=args.rank, lora_alpha=2 * args.rank,
                         continuation_tokens=args.continuation_tokens, loss=args.loss, seed=args.seed)
    teacher = None
    if args.loss == "seqkd":  # the target generates the text the drafter learns, on its own backend
        from specrouter.engine.engine import Engine

        teacher = Engine(args.target)
    result = align_task(args.task, args.drafter, args.target, config, args.per_source, drafter_dtype=args.drafter_dtype,
                        max_prompts=args.max_prompts, teacher=teacher, teacher_batch=args.teacher_batch)
    losses = " ".join(f"{x:.4f}" for x in result.losses) if len(result.losses) <= 10 else \
        f"{result.loss_first:.4f} (first 5) -> {result.loss_last:.4f} (last 5)"
    print(f"{args.drafter}+task:{args.task}: {result.steps - result.resumed_at} steps in {result.minutes:.1f} min; loss {losses}\n"
          f"  adapter {result.path} (sha256 {result.sha256})")
    return 0


def main(argv: list[str] | None = None) -> int:
    from specrouter.core.catalog import CatalogError

    args = build_parser().parse_args(argv)
    if argv is None and args.command == "generate":  # this process loads the models: with huge pages
        reexec_with_huge_pages()
    if args.command == "serve" and not args.address:
        # A Ray started with clusters off takes 127.0.0.1 as its node address, and then binds every
        # server it runs (GCS, raylet, workers, agents) to loopback alone. Set before Ray is imported:
        # the driver reads it once, and every process it starts inherits it.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    try:
        commands = {"serve": cmd_serve, "generate": cmd_generate, "bench": cmd_bench, "models": cmd_models, "tasks": cmd_tasks,
                    "align": cmd_align}
        return commands[args.command](args)
    except (CatalogError, ValueError) as exc:
        print(f"specrouter: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
