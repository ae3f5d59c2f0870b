"""``flashtier make-model``: write a random-weight checkpoint in Hugging Face layout.

The folder is written to a temporary sibling and renamed at the end (nothing partial is left on
any error, disk full included); an existing non-empty folder is replaced only with ``--force``.
"""

from __future__ import annotations

import argparse
import json

from flashtier.apps.common import progress, staged_output_dir
from flashtier.errors import ConfigError


def register(sub: argparse._SubParsersAction) -> None:
    from flashtier.checkpoint.make_model import PRESETS

    p = sub.add_parser("make-model", help="write a random-weight checkpoint (tests, benchmarks)", description=__doc__)
    p.add_argument("out_dir", help="folder to write")
    p.add_argument("--preset", choices=sorted(PRESETS), help="a named shape")
    p.add_argument("--arch", default=None, help="architecture, e.g. LlamaForCausalLM, MixtralForCausalLM")
    p.add_argument("--config", default=None, help='JSON of config.json overrides, e.g. \'{"hidden_size": 256}\'')
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-shard-size", default="2G", help="split into shards of at most this size")
    p.add_argument("--force", action="store_true", help="replace an existing, non-empty output folder")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from flashtier.runtime.units import parse_bytes
    from flashtier.checkpoint.make_model import PRESETS, MakeModelSpec, write_model

    cfg = dict(PRESETS[args.preset]) if args.preset else dict(PRESETS["tiny-llama"])
    if args.arch:
        cfg["architectures"] = [args.arch]
    if args.config:
        try:
            cfg.update(json.loads(args.config))
        except json.JSONDecodeError as e:
            raise ConfigError(f"--config is not valid JSON: {e}") from e
    shard = parse_bytes(args.max_shard_size)
    assert shard is not None
    spec = MakeModelSpec(cfg, args.dtype, args.seed, shard)
    with staged_output_dir(args.out_dir, args.force) as tmp:
        write_model(tmp, spec, progress("writing"))
    print(args.out_dir)
    return 0
