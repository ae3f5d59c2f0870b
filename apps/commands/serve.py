"""``flashtier serve``: an OpenAI-compatible HTTP server and a web chat page for one model.

Endpoints: ``/v1/models``, ``/v1/chat/completions``, ``/v1/completions`` (streaming with
``"stream": true``), ``/health``, ``/metrics`` (Prometheus), ``/v1/flashtier/stats``, and the
chat page at ``/``. The server listens at once; the model loads in the background (503 until then).
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flashtier.apps.common import add_engine_args, add_model_arg, engine_options, resolve_model_dir
from flashtier.errors import CheckpointError

if TYPE_CHECKING:
    from flashtier.runtime import Model

DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024  # = ServerConfig's default (not imported: that would import FastAPI)
API_KEY_ENV = "FLASHTIER_API_KEY"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API and a web chat page",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arg(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default: 8000)")
    p.add_argument("--model-name", default=None, help="name clients use for the model (default: the folder name)")
    p.add_argument("--default-max-tokens", type=int, default=512,
                   help="tokens generated when a request gives no max_tokens (default: 512)")
    p.add_argument("--max-body-bytes", type=_positive_int, default=DEFAULT_MAX_BODY_BYTES, metavar="BYTES",
                   help=f"largest request body accepted; larger ones get 413 "
                        f"(default: {DEFAULT_MAX_BODY_BYTES}, 4 MiB)")
    p.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                   help="also accept requests whose Host or Origin header names NAME (repeatable; against DNS "
                        "rebinding only localhost, 127.0.0.1, [::1] and the --host address are accepted by default; "
                        "'*' accepts any)")
    p.add_argument("--api-key", default=None, metavar="KEY",
                   help=f"require 'Authorization: Bearer KEY' on every /v1 request (else 401); /health, /metrics and "
                        f"the chat page stay open, but the page's requests then fail. Default: the environment "
                        f"variable {API_KEY_ENV} (better: a flag shows in the process list), else no key")
    p.add_argument("--max-prompt-chars", type=_positive_int, default=None, metavar="CHARS",
                   help="longest prompt (characters of all messages, or of the completion prompt) that is tokenized; "
                        "longer ones get 400 at once (default: 16 per token of the model's context)")
    p.add_argument("--shutdown-timeout", type=_positive_int, default=30, metavar="SECONDS",
                   help="on SIGTERM / Ctrl-C, wait at most this long for running requests to finish before "
                        "closing them (default: 30)")
    p.add_argument("--max-queue", type=int, default=None, metavar="N",
                   help="most requests waiting for the model besides the running ones; more get 503 with Retry-After "
                        "before their prompt is tokenized (default: unbounded)")
    p.add_argument("--max-batch", type=_positive_int, default=1, metavar="N",
                   help="requests that decode together (continuous batching: a request joins after its prompt is "
                        "prefilled and leaves when done; each weight is fetched once per step for all of them, and "
                        "every request's tokens equal its tokens alone). Default 1: one at a time, reusing the last "
                        "conversation's KV")
    p.add_argument("--request-timeout", type=_positive_seconds, default=None, metavar="SECONDS",
                   help="longest a request may take from being queued (waiting included) to its last token; past it "
                        "the request gets 504 (a stream: an error event) and its generation stops at the next token, "
                        "freeing its place in the batch (default: no limit)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    add_engine_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from flashtier.apps.server import ServerConfig, create_app

    model_dir = resolve_model_dir(args.model_dir)
    from flashtier.checkpoint.gguf_checkpoint import find_gguf

    # fail before listening on what cannot load at all
    if not (model_dir / "config.json").is_file() and (not model_dir.exists() or find_gguf(model_dir) is None):
        raise CheckpointError(f"{model_dir} does not exist or has no config.json; pass a Hugging Face model folder "
                              "or a GGUF file")
    config = ServerConfig(model_name=args.model_name or model_dir.name, default_max_tokens=args.default_max_tokens,
                          aliases=(str(model_dir),), max_body_bytes=args.max_body_bytes,
                          allowed_hosts=(args.host, *args.allow_host), api_key=_api_key(args),
                          max_prompt_chars=args.max_prompt_chars, max_batch=args.max_batch,
                          max_queue=args.max_queue, request_timeout_s=args.request_timeout)
    options = engine_options(args)
    options.setdefault("kv_sequences", args.max_batch)  # the budgets plan the KV of every batched request
    app = create_app(functools.partial(_load, model_dir, options), config)
    print(f"flashtier serve: http://{args.host}:{args.port}/ (chat page), OpenAI API at /v1; "
          f"loading {model_dir} in the background"
          + ("; /v1 requests need the API key" if config.api_key is not None else ""), file=sys.stderr, flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level,
                timeout_graceful_shutdown=args.shutdown_timeout)
    return 0


def _api_key(args: argparse.Namespace) -> str | None:
    """``--api-key``, else ``$FLASHTIER_API_KEY`` (empty: unset), else None (no authentication)."""
    if args.api_key is not None:
        return args.api_key
    return os.environ.get(API_KEY_ENV) or None


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number of seconds, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text!r}")
    return value


def _load(model_dir: Path, options: dict[str, Any]) -> Model:
    """Runs on the server's model worker thread (``--threads`` is applied per generation)."""
    from flashtier.runtime import open_model

    return open_model(model_dir, **options)
