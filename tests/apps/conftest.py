"""Shared fixtures of the app tests: a small chat model and a live server on loopback.

``chat_model_dir`` is a random-weight MixtralForCausalLM (the tiny-mixtral preset, float32) with a
byte-level BPE tokenizer and the same ChatML template and special tokens as the shipped tiny-moe,
so chat templates, stop tokens and KV reuse run exactly as they do on the real model. Its context
is 2048 tokens, small enough that "prompt longer than the context" is cheap to trigger.

``live_server`` is one uvicorn server per test session on a free 127.0.0.1 port, bound before the
server thread starts (clients connect at once; nothing polls for readiness).
"""

from __future__ import annotations

import json
import socket
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import pytest

from flashtier.checkpoint.make_model import PRESETS, MakeModelSpec, write_model

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
CONTEXT = 2048
VOCAB = 320  # 256 byte symbols + 3 special tokens + 61 merges

_CORPUS = """\
The quick brown fox jumps over the lazy dog. A model whose weights do not fit in memory is run by
keeping every piece of state as pages in a tiered store: device memory, host memory and flash.
def fibonacci(n):
    if n < 2:
        return n
    return fibonacci(n - 1) + fibonacci(n - 2)

for i in range(10):
    print(i, fibonacci(i))
Hello! How are you today? I am fine, thank you. What is the capital of France? Paris is.
"""


def write_chat_model(out: Path) -> Path:
    """Write the fixture chat model into ``out`` (weights, config, tokenizer, chat template)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    config = {**PRESETS["tiny-mixtral"], "vocab_size": VOCAB, "max_position_embeddings": CONTEXT,
              "bos_token_id": 0, "eos_token_id": 2}
    write_model(out, MakeModelSpec(config, "float32", seed=0))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), min_frequency=2)
    tok.train_from_iterator([_CORPUS] * 4, trainer)
    assert tok.get_vocab_size() <= VOCAB
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
        "add_bos_token": False, "additional_special_tokens": SPECIAL_TOKENS[1:], "chat_template": CHAT_TEMPLATE,
    }, indent=2))
    return out


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread() -> Iterator[None]:
    """The fixture model is tiny: one intra-op thread is fastest, and on a shared, busy machine
    torch's default thread pool makes it ~100x slower (measured: 1270 vs 12 tokens/s). Threads
    started later (chat replies) take this setting; the server's worker sets its own (see
    :func:`one_thread_loader`)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def one_thread_loader(model_dir: Path, **options: object) -> Callable[[], object]:
    """A model loader for ``create_app`` that runs the model with one torch thread. It runs on the
    server's worker thread, and a thread keeps the torch thread count it had at its first op."""

    def load() -> object:
        import torch

        from flashtier.runtime import open_model

        torch.set_num_threads(1)
        return open_model(model_dir, **options)

    return load


@pytest.fixture(scope="session")
def model_loader() -> Callable[..., Callable[[], object]]:
    """:func:`one_thread_loader`, for tests that build their own app."""
    return one_thread_loader


def slowed_loader(model_dir: Path, pass_s: float, **options: object) -> Callable[[], object]:
    """:func:`one_thread_loader` whose model sleeps ``pass_s`` before every pass over the weights
    (each prefill chunk, each decode step of the batch), on this model only: tests of timing
    (timeouts, queues) then rest on a step time the machine's speed barely changes."""
    load = one_thread_loader(model_dir, **options)

    def load_slowed() -> object:
        import time

        model = load()
        transformer = model.transformer  # type: ignore[attr-defined]
        forward_groups = transformer.forward_groups

        def slowed(*args: object, **kwargs: object) -> object:
            time.sleep(pass_s)
            return forward_groups(*args, **kwargs)

        transformer.forward_groups = slowed
        return model

    return load_slowed


@pytest.fixture(scope="session")
def slow_model_loader() -> Callable[..., Callable[[], object]]:
    """:func:`slowed_loader`, for tests that build their own app."""
    return slowed_loader


@pytest.fixture(scope="session")
def chat_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_chat_model(tmp_path_factory.mktemp("apps") / "chat-model")


@dataclass
class LiveServer:
    """A uvicorn server running ``app`` on ``base_url`` in a background thread."""

    app: object
    base_url: str
    server: object
    thread: threading.Thread

    def stop(self) -> None:
        self.server.should_exit = True  # type: ignore[attr-defined]
        self.thread.join(timeout=30)


def start_server(app: object) -> LiveServer:
    """Serve ``app`` on a free loopback port; the socket listens before this returns."""
    import uvicorn

    # proto=IPPROTO_TCP, as getaddrinfo gives: asyncio sets TCP_NODELAY on accepted connections only
    # then; without it every response waits ~40 ms (Nagle + delayed ACK) between headers and body.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True, name="uvicorn-test")
    thread.start()
    return LiveServer(app, f"http://127.0.0.1:{port}", server, thread)


def _hold_stream(base_url: str, release: threading.Event) -> None:
    """Stream a long completion from the server at ``base_url`` until ``release`` is set (then close
    the stream): keeps one generation (a batch slot) busy for a test."""
    import httpx

    body = {"prompt": "story", "max_tokens": 1500, "temperature": 0, "ignore_eos": True, "stream": True}
    with httpx.Client(base_url=base_url, timeout=60) as http, http.stream("POST", "/v1/completions", json=body) as r:
        for _ in r.iter_lines():
            if release.is_set():
                return


@pytest.fixture(scope="session")
def hold_stream() -> Callable[[str, threading.Event], None]:
    """:func:`_hold_stream`, for tests that keep generations busy in threads."""
    return _hold_stream


@pytest.fixture(scope="session")
def server_factory() -> Iterator[Callable[[object], LiveServer]]:
    """Start servers for apps built by a test; all are stopped at the end of the session."""
    started: list[LiveServer] = []

    def start(app: object) -> LiveServer:
        live = start_server(app)
        started.append(live)
        return live

    yield start
    for live in started:
        live.stop()


@pytest.fixture(scope="session")
def live_server(chat_model_dir: Path, server_factory: Callable[[object], LiveServer]) -> LiveServer:
    """The shared server on the fixture model, loaded and ready."""
    from flashtier.apps.server import ServerConfig, create_app

    # prefill chunks of 16 tokens: a repeated conversation reuses its KV (whole chunks only)
    app = create_app(one_thread_loader(chat_model_dir, prefill_chunk=16), ServerConfig("chat-model"))
    live = server_factory(app)
    assert app.state.worker.wait_ready(timeout=60), "the model did not load within 60 s"
    return live
