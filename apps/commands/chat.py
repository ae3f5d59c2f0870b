"""``flashtier chat``: talk to a model in the terminal.

Answers stream as they are generated; the conversation is kept, and the engine reuses the KV cache
of earlier turns. Commands: /reset, /stats (speed, memory per tier), /help, /exit. Ctrl-C stops
the answer being written; Ctrl-D or /exit quits. --verbose prints timings after each answer.
"""

from __future__ import annotations

import argparse
import contextlib
import sys

from flashtier.apps.common import add_engine_args, add_model_arg, engine_options, resolve_model_dir


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("chat", help="chat with a model in the terminal", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arg(p)
    p.add_argument("--system", default=None, metavar="TEXT", help="system prompt for the conversation")
    p.add_argument("--max-new-tokens", type=int, default=512, help="longest answer in tokens (default: 512)")
    p.add_argument("--greedy", action="store_true", help="pick the most likely token (same as --temperature 0)")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--verbose", action="store_true",
                   help="print timings after each answer (prompt and decode tokens/s) on stderr")
    add_engine_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from flashtier.apps.chat import ChatApp, ChatSession
    from flashtier.runtime import SamplingConfig, open_model

    sampling = SamplingConfig(temperature=0.0 if args.greedy else args.temperature, top_k=args.top_k,
                              top_p=args.top_p, seed=args.seed)
    model_dir = resolve_model_dir(args.model_dir)
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"loading {model_dir} ...", file=sys.stderr, flush=True)
        with contextlib.suppress(ImportError):
            import readline  # noqa: F401 - line editing and history for input()
    with open_model(model_dir, **engine_options(args)) as model:
        if interactive:
            print(f"flashtier chat with {model.name} (loaded in {model.load_s:.1f} s). /help for commands, "
                  f"Ctrl-D to quit.", file=sys.stderr, flush=True)
        session = ChatSession(model, system=args.system, sampling=sampling, max_new_tokens=args.max_new_tokens)
        app = ChatApp(session, input, sys.stdout, sys.stderr, verbose=args.verbose,
                      prompt=">>> " if interactive else "")
        return app.run()
