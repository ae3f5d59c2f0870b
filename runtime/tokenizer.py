"""Tokenizer and chat template of a checkpoint (``tokenizer.json`` + ``tokenizer_config.json``).

Text <-> ids through the ``tokenizers`` library; chat messages are rendered with the checkpoint's
Jinja ``chat_template`` (jinja2 is a runtime dependency for exactly this: HF templates are Jinja).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from flashtier.errors import CheckpointError, InputError


class Tokenizer:
    """Encode / decode text and render chat messages for one checkpoint."""

    def __init__(self, model_dir: str | Path) -> None:
        from tokenizers import Tokenizer as HFTokenizer

        model_dir = Path(model_dir)
        path = model_dir / "tokenizer.json"
        if not path.is_file():
            raise CheckpointError(f"{model_dir} has no tokenizer.json; pass --prompt-ids instead of --prompt, or add the tokenizer")
        try:
            self._tok = HFTokenizer.from_file(str(path))
        except Exception as e:  # the tokenizers library raises plain Exception subclasses
            raise CheckpointError(f"{path}: cannot load tokenizer ({e}); restore the file from the model's "
                                  "download") from e
        cfg_path = model_dir / "tokenizer_config.json"
        cfg: dict[str, Any] = {}
        if cfg_path.is_file():
            try:
                cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
                raise CheckpointError(f"{cfg_path}: not readable JSON ({e}); restore the file from the model's "
                                      "download") from e
            if not isinstance(cfg, dict):
                raise CheckpointError(f"{cfg_path}: expected a JSON object; restore the file from the model's download")
        self.chat_template: str | None = cfg.get("chat_template")
        self.bos_token = _token_text(cfg.get("bos_token"))
        self.eos_token = _token_text(cfg.get("eos_token"))
        self.add_bos = bool(cfg.get("add_bos_token", False))

    @classmethod
    def from_parts(cls, tokenizer: Any, chat_template: str | None, bos_token: str | None, eos_token: str | None,
                   add_bos: bool) -> "Tokenizer":
        """A tokenizer from a built ``tokenizers.Tokenizer`` and its settings (e.g. from GGUF metadata)."""
        self = cls.__new__(cls)
        self._tok = tokenizer
        self.chat_template = chat_template
        self.bos_token, self.eos_token, self.add_bos = bos_token, eos_token, add_bos
        return self

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def token_id(self, text: str | None) -> int | None:
        return None if text is None else self._tok.token_to_id(text)

    def encode(self, text: str) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=False).ids
        bos = self.token_id(self.bos_token)
        if self.add_bos and bos is not None:
            ids = [bos, *ids]
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=True)

    def render_chat(self, messages: Sequence[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """Render ``[{"role", "content"}, ...]`` with the checkpoint's chat template."""
        if not messages:
            raise InputError("messages is empty; send at least one {'role': 'user', 'content': ...} message")
        for m in messages:
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise InputError(f"each message needs string 'role' and 'content' fields, got {m!r}")
        if not self.chat_template:
            # No template: plain "role: content" turns, which any base model can continue.
            text = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
            return text + ("assistant: " if add_generation_prompt else "")
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        try:
            return env.from_string(self.chat_template).render(
                messages=list(messages), add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "", eos_token=self.eos_token or "",
            )
        except jinja2.TemplateError as e:
            raise CheckpointError(f"the checkpoint's chat_template failed to render: {e}") from e


def _token_text(tok: object) -> str | None:
    if isinstance(tok, dict):
        return tok.get("content")
    return tok if isinstance(tok, str) else None


def load_tokenizer(checkpoint: Any) -> Tokenizer | None:
    """The tokenizer of a checkpoint: ``tokenizer.json`` of a Hugging Face folder, or the
    ``tokenizer.ggml.*`` metadata of a GGUF file; None when it has none (ids only)."""
    if getattr(checkpoint, "is_gguf", False):
        from flashtier.runtime.gguf_tokenizer import gguf_tokenizer

        return gguf_tokenizer(checkpoint.gguf)
    if (Path(checkpoint.model_dir) / "tokenizer.json").is_file():
        return Tokenizer(checkpoint.model_dir)
    return None
