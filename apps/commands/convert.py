"""``flashtier convert MODEL_DIR OUT_DIR``: rewrite a checkpoint into a layout made for paging.

Default: each MoE expert becomes one aligned, contiguous extent (one read per expert) with a
manifest; ``--bundle``: each dense FFN neuron becomes one row-column bundle (gate row, up row,
down column) for sparse neuron reads. The output folder stays a loadable Hugging Face folder. It is
written into a temporary sibling and renamed at the end (nothing partial is left on an error, disk
full included); an existing non-empty output folder is replaced only with ``--force``.
"""

from __future__ import annotations

import argparse

from flashtier.apps.common import progress, refuse_gguf, staged_output_dir


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="rewrite a checkpoint for paging (expert extents, neuron bundles)", description=__doc__)
    p.add_argument("model_dir")
    p.add_argument("out_dir")
    p.add_argument("--bundle", action="store_true", help="write row-column neuron bundles for the sparse FFN path")
    p.add_argument("--force", action="store_true", help="replace an existing, non-empty output folder")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    refuse_gguf(args.model_dir, "convert", "a GGUF file's experts are already stacked per tensor and read in place; "
                "--bundle needs a safetensors ReLU model")
    with staged_output_dir(args.out_dir, args.force, source=args.model_dir) as tmp:
        if args.bundle:
            from flashtier.checkpoint.bundles import convert_bundled

            convert_bundled(args.model_dir, tmp, progress=progress("bundling"))
        else:
            from flashtier.checkpoint.expert_layout import convert_experts

            convert_experts(args.model_dir, tmp, progress=progress("converting"))
    out = args.out_dir
    print(out)
    return 0
