"""Embed flashtier in your own program: open a model under a memory budget, stream a chat answer,
then print the speed and where the memory went.

    python apps/examples/embed.py [MODEL_DIR] [--dram-budget 64M] [--question TEXT]

MODEL_DIR defaults to the shipped tiny-moe-16k model. Without ``--dram-budget`` every weight stays
resident in host memory; with one, weights are paged through the tiered store.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import flashtier
from flashtier.errors import FlashtierError
from flashtier.runtime import SamplingConfig, open_model
from flashtier.runtime.generate import GenerationStats

DEFAULT_MODEL = Path(flashtier.__file__).resolve().parent / "models" / "tiny-moe-16k"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir", nargs="?", default=str(DEFAULT_MODEL))
    parser.add_argument("--dram-budget", default=None, help="host memory for weights, e.g. 64M")
    parser.add_argument("--question", default="Write a Python function that reverses a string.")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    args = parser.parse_args(argv)

    options = {"dram_budget": args.dram_budget} if args.dram_budget else {}
    try:
        with open_model(args.model_dir, **options) as llm:  # budgets: "64M", "1G", or bytes
            stats = GenerationStats()
            messages = [{"role": "user", "content": args.question}]
            sampling = SamplingConfig(temperature=0.7, top_p=0.95, seed=0)  # seeded: the same answer every run
            events = llm.stream(messages=messages, max_new_tokens=args.max_new_tokens, sampling=sampling, stats=stats)
            for event in events:  # tokens arrive as they are generated; breaking out cancels
                print(event.text, end="", flush=True)
            print()
            s = llm.stats_dict(stats)
            print(f"\n{s['generated_tokens']} tokens at {s['decode_tok_s']:.1f} tokens/s "
                  f"(prompt: {s['prompt_tokens']} tokens at {s['prefill_tok_s']:.1f} tokens/s)")
            print("memory:", json.dumps(llm.memory_report(), indent=2))
    except FlashtierError as e:  # a missing folder, a bad budget...: one line, no traceback
        print(f"embed.py: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
