"""The terminal chat, driven through its class with injected input and output: multi-turn with KV
reuse, /reset, /stats, --verbose timings, Ctrl-C that stops one answer, and the CLI end to end."""

from __future__ import annotations

import io
import subprocess
import sys
from typing import Callable, Iterable

import pytest

from flashtier.apps.chat import ChatApp, ChatSession
from flashtier.runtime import SamplingConfig, open_model


@pytest.fixture(scope="module")
def model(chat_model_dir):
    with open_model(chat_model_dir, prefill_chunk=16) as m:  # small chunks: short chats reuse their KV
        yield m


def reader(lines: Iterable[str]) -> Callable[[str], str]:
    """``input()`` over scripted lines; EOFError (Ctrl-D) after the last."""
    it = iter(lines)

    def read(prompt: str) -> str:
        line = next(it, None)
        if line is None:
            raise EOFError
        if isinstance(line, BaseException):
            raise line
        return line

    return read


class CtrlCOnWrite(io.StringIO):
    """An output whose ``at``-th write while armed raises KeyboardInterrupt, as Ctrl-C would."""

    def __init__(self, at: int) -> None:
        super().__init__()
        self.at = at
        self.armed = False
        self.writes = 0

    def write(self, s: str) -> int:
        if self.armed:
            self.writes += 1
            if self.writes == self.at:
                self.armed = False
                raise KeyboardInterrupt
        return super().write(s)


def session(model, max_new_tokens: int = 8, system: str | None = "You are terse.") -> ChatSession:
    return ChatSession(model, system=system, sampling=SamplingConfig(temperature=0.0), max_new_tokens=max_new_tokens)


def test_multi_turn_reuses_whole_prefill_chunks_and_answers_as_if_alone(chat_model_dir):
    """Each prompt extends the previous conversation; its KV is reused in whole prefill chunks (what
    a fresh prefill computes bit for bit), so every answer equals the same prompt asked of a fresh
    model, bf16 included."""
    chunk = 16
    with open_model(chat_model_dir, prefill_chunk=chunk) as m, open_model(chat_model_dir, prefill_chunk=chunk) as fresh:
        chat = session(m, max_new_tokens=12)
        app = ChatApp(chat, reader([]), io.StringIO(), io.StringIO())
        turns, alone = [], []
        for question in ("Hello!", "What is the capital of France?", "And of Italy?"):
            asked = [dict(x) for x in chat.messages] + [{"role": "user", "content": question}]
            assert app.handle(question)
            turns.append(chat.last.stats)
            fresh.cache.truncate(0)  # nothing to reuse: a fresh prefill
            alone.append(fresh.generate(messages=asked, max_new_tokens=12, sampling=SamplingConfig(temperature=0.0)))
            assert chat.last.text == alone[-1].text
        assert [m["role"] for m in chat.messages] == ["system"] + ["user", "assistant"] * 3
        assert turns[0].cached_prompt_tokens == 0
        for before, now in zip(turns, turns[1:]):
            assert now.cached_prompt_tokens == before.prompt_tokens // chunk * chunk > 0
        assert all(a.stats["cached_prompt_tokens"] == 0 for a in alone)


def test_reset_stats_help_and_exit(model):
    chat = session(model)
    out = io.StringIO()
    app = ChatApp(chat, reader(["/stats", "Hello!", "/stats", "/reset", "/nope", "/help", "/exit", "never read"]),
                  out, io.StringIO())
    assert app.run() == 0
    text = out.getvalue()
    assert text.index("no answer yet") < text.index("last answer:")
    assert "tokens/s" in text and "host:" in text and "KV cache:" in text and "peak RSS:" in text
    assert "(conversation cleared)" in text and "unknown command '/nope'" in text and "/reset" in text
    assert chat.messages == [{"role": "system", "content": "You are terse."}]


def test_end_of_input_quits_and_ctrl_c_at_the_prompt_does_not(model):
    out = io.StringIO()
    app = ChatApp(session(model), reader([KeyboardInterrupt(), "Hello!"]), out, io.StringIO())
    assert app.run() == 0
    assert "use /exit or Ctrl-D" in out.getvalue()
    assert app.session.last is not None


def test_verbose_prints_ollama_style_timings(model):
    err = io.StringIO()
    app = ChatApp(session(model), reader(["Hello!"]), io.StringIO(), err, verbose=True)
    app.run()
    for line in ("total duration:", "prompt eval count:", "prompt eval rate:", "eval count:", "eval rate:"):
        assert line in err.getvalue()


def test_ctrl_c_stops_the_answer_not_the_chat(model, chat_model_dir):
    chat = session(model, max_new_tokens=8)
    out = CtrlCOnWrite(at=1)
    app = ChatApp(chat, reader([]), out, io.StringIO())
    app.handle("Hello!")  # a first turn; then interrupt the next, long answer at its first piece
    chat.max_new_tokens = 1500
    out.armed = True
    assert app.handle("Tell me a very long story.")
    interrupted = chat.last
    assert interrupted.cancelled and "[interrupted]" in out.getvalue()
    assert interrupted.stats.generated_tokens < 1500
    assert chat.messages[-1] == {"role": "assistant", "content": interrupted.text}  # what was shown stays
    # The chat goes on, and the KV cache of the interrupted turn is still good to reuse.
    chat.max_new_tokens = 4
    assert app.handle("Go on.")
    assert not chat.last.cancelled and chat.last.stats.generated_tokens >= 1
    assert chat.last.stats.cached_prompt_tokens == interrupted.stats.prompt_tokens // 16 * 16 > 0
    with open_model(chat_model_dir) as fresh:  # no cache: the answer must be the same
        alone = fresh.generate(messages=chat.messages[:-1], max_new_tokens=4, sampling=SamplingConfig(temperature=0))
    assert alone.text == chat.last.text


def test_oldest_turns_are_dropped_when_the_context_is_full(model):
    chat = session(model, max_new_tokens=4, system=None)
    long_question = "hello world " * 80  # ~720 tokens; three of them do not fit the 2048-token context
    for _ in range(3):
        list(chat.ask(long_question))
    assert len(model.encode(messages=chat.messages[:-1])) + 4 <= model.config.max_position_embeddings
    assert [m["role"] for m in chat.messages] == ["user", "assistant"] * 2


def test_chat_command_end_to_end(chat_model_dir):
    r = subprocess.run([sys.executable, "-m", "flashtier", "chat", str(chat_model_dir), "--greedy",
                        "--max-new-tokens", "4", "--threads", "1", "--verbose"],
                       input="Hello!\n/stats\n/exit\n", capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "last answer:" in r.stdout and "generated, finish:" in r.stdout
    assert "eval rate:" in r.stderr and "Traceback" not in r.stderr
