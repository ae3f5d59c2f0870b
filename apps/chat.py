"""Terminal chat, kept apart from the terminal: a conversation (:class:`ChatSession`) and a
line-oriented loop (:class:`ChatApp`) whose input and output are injected.

* A session keeps the message history; each turn's prompt extends the previous one, so the engine
  prefills only the new tokens (``cached_prompt_tokens`` grows turn by turn). The oldest turns are
  dropped when the conversation no longer fits the context.
* A :class:`Reply` runs its generation on a background thread; the caller's thread only takes text
  from a queue. A Ctrl-C (``KeyboardInterrupt``, always delivered to the main thread) therefore
  never lands inside the engine: the reply is cancelled before the next token and the KV cache
  stays consistent for the next turn. What was shown of an interrupted answer stays in the history.
* Commands: ``/reset`` (forget the conversation), ``/stats`` (speed and memory per tier),
  ``/exit`` or ``/bye`` (quit, as does end of input / Ctrl-D), ``/help``.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, TextIO

from flashtier.apps.reporting import context_limit, format_bytes, hit_rates, tier_fields
from flashtier.errors import FlashtierError
from flashtier.runtime import Model, SamplingConfig
from flashtier.runtime.generate import GenerationStats

_END = object()
CHAT_SAMPLING = SamplingConfig(temperature=0.7, top_p=0.95)


@dataclass(frozen=True, slots=True)
class _Failure:
    error: BaseException


class Reply:
    """One streamed answer. Iterate for its text pieces; :meth:`cancel` stops it. When it ends
    (finished, cancelled or failed) the session history is updated exactly once."""

    def __init__(self, session: ChatSession, messages: list[dict[str, str]], max_new_tokens: int) -> None:
        self._session = session
        self._pieces: queue.Queue[Any] = queue.Queue()
        self._cancel = threading.Event()
        self._shown: list[str] = []
        self._done = False
        self.stats = GenerationStats()
        self.error: BaseException | None = None
        self.cancelled = False
        self.started = time.perf_counter()
        self.wall_s = 0.0
        self._thread = threading.Thread(target=self._produce, args=(messages, max_new_tokens),
                                        name="flashtier-chat-reply", daemon=True)
        self._thread.start()

    @property
    def text(self) -> str:
        """The text handed out so far (all of it once the reply finished)."""
        return "".join(self._shown)

    def __iter__(self) -> Iterator[str]:
        complete = False
        try:
            while (item := self._pieces.get()) is not _END:
                if isinstance(item, _Failure):
                    self.error = item.error
                    raise item.error
                self._shown.append(item)
                yield item
            complete = True
        finally:
            if not complete and self.error is None:
                self._cancel.set()  # the consumer stopped early (Ctrl-C, close): that is a cancel
            self._finish()

    def cancel(self) -> None:
        """Stop generating (at the next token) and wait for the generation thread to let go."""
        self._cancel.set()
        self._finish()

    def _produce(self, messages: list[dict[str, str]], max_new_tokens: int) -> None:
        session = self._session
        try:
            events = session.model.stream(messages=messages, max_new_tokens=max_new_tokens,
                                          sampling=session.sampling, stats=self.stats)
            with contextlib.closing(events):
                for event in events:
                    if self._cancel.is_set():
                        break
                    if event.text:
                        self._pieces.put(event.text)
        except BaseException as e:  # handed to the consumer, which raises it on its own thread
            self._pieces.put(_Failure(e))
        finally:
            self._pieces.put(_END)

    def _finish(self) -> None:
        if self._done:
            return
        self._done = True
        self.cancelled = self._cancel.is_set()
        self._cancel.set()
        self._thread.join()
        self.wall_s = time.perf_counter() - self.started
        self._session._turn_ended(self)


class ChatSession:
    """A multi-turn conversation with ``model``: the history, and one :class:`Reply` at a time."""

    def __init__(self, model: Model, *, system: str | None = None,
                 sampling: SamplingConfig = CHAT_SAMPLING,
                 max_new_tokens: int = 512) -> None:
        self.model = model
        self.system = system
        self.sampling = sampling
        self.max_new_tokens = max_new_tokens
        self.messages: list[dict[str, str]] = []
        self.last: Reply | None = None
        self._active: Reply | None = None
        self.reset()

    def reset(self) -> None:
        """Forget the conversation (the system prompt stays)."""
        if self._active is not None:
            self._active.cancel()
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def ask(self, text: str) -> Reply:
        """Add the user's ``text`` and start the answer; iterate the :class:`Reply` for its text."""
        if self._active is not None:
            raise RuntimeError("the previous reply is still running; iterate it to the end or cancel it")
        self.messages.append({"role": "user", "content": text})
        try:
            max_new = self._fit_context()
        except FlashtierError:
            self.messages.pop()  # the question cannot be asked: take it back
            raise
        self._active = Reply(self, list(self.messages), max_new)
        return self._active

    def _fit_context(self) -> int:
        """Drop the oldest turns until the prompt leaves room to answer; the token budget left."""
        context = context_limit(self.model)
        first = 1 if self.system else 0
        while True:
            n = len(self.model.encode(messages=self.messages))
            if n + self.max_new_tokens <= context or len(self.messages) - first <= 1:
                return max(1, min(self.max_new_tokens, context - n))
            del self.messages[first:first + 2]  # the oldest user turn and its answer

    def _turn_ended(self, reply: Reply) -> None:
        self._active = None
        if reply.error is not None and not reply.text:
            self.messages.pop()  # the question failed: take it back
            return
        self.messages.append({"role": "assistant", "content": reply.text})
        self.last = reply


def timings_report(stats: dict[str, Any], wall_s: float) -> str:
    """ollama-style timings of one answer (``--verbose``)."""
    evaluated = stats["prompt_tokens"] - stats["cached_prompt_tokens"]
    return (f"total duration:       {wall_s * 1000:.0f}ms\n"
            f"load duration:        {stats['load_s'] * 1000:.0f}ms\n"
            f"prompt eval count:    {evaluated} token(s) (+{stats['cached_prompt_tokens']} cached)\n"
            f"prompt eval duration: {stats['prefill_s'] * 1000:.0f}ms\n"
            f"prompt eval rate:     {stats['prefill_tok_s']:.2f} tokens/s\n"
            f"eval count:           {stats['generated_tokens']} token(s)\n"
            f"eval duration:        {stats['decode_s'] * 1000:.0f}ms\n"
            f"eval rate:            {stats['decode_tok_s']:.2f} tokens/s\n")


def memory_lines(report: dict[str, Any], stats: dict[str, Any] | None = None) -> list[str]:
    """One line per memory tier (its byte fields, and its hit rate when ``stats`` has one), then
    KV cache and peak RSS."""
    rates = hit_rates(stats or {})
    lines = []
    for tier, fields in tier_fields(report).items():
        parts = [f"{format_bytes(v)} {k.removesuffix('_bytes').replace('_', ' ')}" if k.endswith("bytes")
                 else f"{k.replace('_', ' ')} {v:.3g}" for k, v in fields.items()]
        if tier in rates:
            parts.append(f"hit rate {rates[tier]:.1%}")
        lines.append(f"  {tier + ':':<14}{', '.join(parts)}")
    lines.append(f"  {'KV cache:':<14}{format_bytes(report.get('kv_bytes', 0))}")
    lines.append(f"  {'peak RSS:':<14}{format_bytes(report.get('peak_rss_bytes', 0))}")
    return lines


HELP = """commands:
  /reset   forget the conversation
  /stats   speed of the last answer and memory per tier
  /exit    quit (also /bye or Ctrl-D)
Ctrl-C stops the answer being written.
"""


class ChatApp:
    """The chat loop: reads lines with ``read_line(prompt)`` (raises ``EOFError`` at the end),
    writes answers to ``out`` and ``--verbose`` timings to ``err``."""

    def __init__(self, session: ChatSession, read_line: Callable[[str], str], out: TextIO, err: TextIO,
                 *, verbose: bool = False, prompt: str = ">>> ") -> None:
        self.session = session
        self.read_line = read_line
        self.out = out
        self.err = err
        self.verbose = verbose
        self.prompt = prompt
        self._commands: dict[str, Callable[[], bool]] = {
            "/reset": self._reset, "/clear": self._reset, "/stats": self._stats, "/help": self._help,
            "/exit": lambda: False, "/bye": lambda: False, "/quit": lambda: False,
        }

    def run(self) -> int:
        """Loop until ``/exit`` or end of input; returns the exit status."""
        while True:
            try:
                line = self.read_line(self.prompt)
            except EOFError:
                self.out.write("\n")
                return 0
            except KeyboardInterrupt:
                self.out.write("\n(use /exit or Ctrl-D to quit)\n")
                continue
            if not self.handle(line):
                return 0

    def handle(self, line: str) -> bool:
        """Run one input line; False means quit."""
        text = line.strip()
        if not text:
            return True
        if text.startswith("/"):
            command = self._commands.get(text.split()[0].lower())
            if command is None:
                self.out.write(f"unknown command {text.split()[0]!r}; /help lists them\n")
                return True
            return command()
        self.answer(text)
        return True

    def answer(self, text: str) -> Reply | None:
        """Stream the answer to ``text``; Ctrl-C stops it and returns to the prompt. An error the
        user can act on is printed, and the conversation goes on (None)."""
        try:
            reply = self.session.ask(text)
        except FlashtierError as e:
            self.out.write(f"error: {e}\n")
            return None
        try:
            for piece in reply:
                self.out.write(piece)
                self.out.flush()
            self.out.write("\n")
        except KeyboardInterrupt:
            reply.cancel()
            self.out.write("\n[interrupted]\n")
        except FlashtierError as e:
            self.out.write(f"\nerror: {e}\n")
            return None
        self.out.flush()
        if self.verbose:
            self.err.write(timings_report(self.session.model.stats_dict(reply.stats), reply.wall_s))
            self.err.flush()
        return reply

    def _reset(self) -> bool:
        self.session.reset()
        self.out.write("(conversation cleared)\n")
        return True

    def _stats(self) -> bool:
        model = self.session.model
        last = self.session.last
        s = None
        if last is None:
            self.out.write("no answer yet\n")
        else:
            s = model.stats_dict(last.stats)
            self.out.write(f"last answer: {s['prompt_tokens']} prompt tokens ({s['cached_prompt_tokens']} cached), "
                           f"{s['generated_tokens']} generated, finish: "
                           f"{'interrupted' if last.cancelled else s['finish_reason']}\n"
                           f"speed: prompt {s['prefill_tok_s']:.1f} tokens/s, "
                           f"decode {s['decode_tok_s']:.1f} tokens/s\n")
        self.out.write("memory:\n" + "\n".join(memory_lines(model.memory_report(), s)) + "\n")
        return True

    def _help(self) -> bool:
        self.out.write(HELP)
        return True
