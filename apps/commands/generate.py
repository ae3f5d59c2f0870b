"""``flashtier generate``: complete a prompt; ``--json`` prints one object with ids, text, stats."""

from __future__ import annotations

import argparse
import json
import sys

from flashtier.apps.common import add_model_arg, resolve_model_dir
from flashtier.apps.engine_flags import add_engine_args, engine_options
from flashtier.errors import InputError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate text from a prompt", description=__doc__)
    add_model_arg(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text")
    src.add_argument("--prompt-ids", help="prompt as comma-separated token ids, e.g. 1,2,3")
    src.add_argument("--chat", metavar="MESSAGE", help="a user message, rendered with the chat template")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--greedy", action="store_true", help="pick the most likely token (same as --temperature 0)")
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--ignore-eos", action="store_true", help="do not stop at end-of-sequence tokens")
    p.add_argument("--json", action="store_true", help="print one JSON object: tokens, text, stats")
    p.add_argument("--verbose", action="store_true", help="print load / prompt / decode timings on stderr")
    add_engine_args(p)
    p.set_defaults(func=run)


def parse_ids(text: str) -> list[int]:
    try:
        ids = [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise InputError(f"--prompt-ids must be comma-separated integers, got {text!r}") from None
    if not ids:
        raise InputError("--prompt-ids is empty")
    return ids


def run(args: argparse.Namespace) -> int:
    from flashtier.runtime import SamplingConfig, open_model

    sampling = SamplingConfig(temperature=0.0 if args.greedy else args.temperature, top_k=args.top_k,
                              top_p=args.top_p, seed=args.seed)
    with open_model(resolve_model_dir(args.model_dir), **engine_options(args)) as llm:
        kwargs = dict(max_new_tokens=args.max_new_tokens, sampling=sampling, ignore_eos=args.ignore_eos)
        if args.chat is not None:
            kwargs["messages"] = [{"role": "user", "content": args.chat}]
            prompt = None
        else:
            prompt = parse_ids(args.prompt_ids) if args.prompt_ids is not None else args.prompt
        if args.json:
            result = llm.generate(prompt, **kwargs)
            print(json.dumps({"tokens": result.tokens, "text": result.text, "stats": result.stats}))
        else:
            from flashtier.runtime.generate import GenerationStats

            stats = GenerationStats()
            events = llm.stream(prompt, stats=stats, **kwargs)
            first = next(events, None)  # validates the request before anything is printed
            if isinstance(prompt, str):
                sys.stdout.write(prompt)
            if first is not None:
                sys.stdout.write(first.text)
            for ev in events:
                sys.stdout.write(ev.text)
                sys.stdout.flush()
            sys.stdout.write("\n")
            result_stats = llm.stats_dict(stats)
        if args.verbose:
            s = result.stats if args.json else result_stats
            print(f"load time:        {s['load_s']:.2f} s\n"
                  f"prompt eval:      {s['prompt_tokens']} tokens, {s['prefill_tok_s']:.1f} tokens/s\n"
                  f"decode:           {s['generated_tokens']} tokens, {s['decode_tok_s']:.1f} tokens/s\n"
                  f"peak RSS:         {s['peak_rss_bytes'] / 2**20:.0f} MiB", file=sys.stderr)
    return 0
