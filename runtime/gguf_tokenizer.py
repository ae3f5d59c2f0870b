"""The tokenizer stored in a GGUF file's ``tokenizer.ggml.*`` metadata, built with ``tokenizers``.

Two vocabulary kinds, as llama.cpp reads them:

* ``tokenizer.ggml.model = "llama"`` (SentencePiece BPE: Llama 1/2, Mistral, TinyLlama): tokens
  with scores; text is normalised to ``▁``-separated pieces, then the adjacent pair whose join is
  the vocabulary token of highest score is merged first (BPE with merges ranked by score), bytes
  missing from the vocabulary fall back to ``<0xNN>`` tokens.
* ``tokenizer.ggml.model = "gpt2"`` (byte-level BPE: Llama 3, Qwen2, GPT-2 style): tokens and
  ``tokenizer.ggml.merges``; the pre-tokenizer regex follows ``tokenizer.ggml.pre``.

Control and user-defined tokens (types 3 and 4) are special: they match as whole strings in
text (``<|im_start|>``) and are dropped when decoding. The chat template is
``tokenizer.chat_template``.
"""

from __future__ import annotations

from typing import Any

from flashtier.checkpoint.gguf_format import GGUFFile
from flashtier.errors import CheckpointError, UnsupportedModelError
from flashtier.runtime.tokenizer import Tokenizer

# llama.cpp's pre-tokenizer regexes (llama-vocab.cpp) for the ``tokenizer.ggml.pre`` values we support.
_LLAMA3 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
           r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"
          r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_REGEX: dict[str, str | None] = {
    "default": None, "gpt-2": None, "gpt2": None,  # None: GPT-2's own regex (ByteLevel's)
    "llama-bpe": _LLAMA3, "llama3": _LLAMA3, "smaug-bpe": _LLAMA3,
    "qwen2": _QWEN2, "qwen": _QWEN2,
}

TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED = 3, 4, 5


def gguf_tokenizer(g: GGUFFile) -> Tokenizer | None:
    """The tokenizer of ``g``; None when the file has no vocabulary (then prompts must be ids)."""
    md = g.metadata
    kind = md.get("tokenizer.ggml.model")
    tokens = md.get("tokenizer.ggml.tokens")
    if kind is None or tokens is None or kind == "none" or md.get("flashtier.placeholder_vocabulary"):
        return None
    tokens = list(tokens)
    types = [int(t) for t in md.get("tokenizer.ggml.token_type", [1] * len(tokens))]
    if len(types) != len(tokens):
        raise CheckpointError(f"{g.path}: tokenizer.ggml.token_type has {len(types)} entries for {len(tokens)} tokens")
    if kind == "llama":
        tok = _spm(g, tokens, types)
    elif kind == "gpt2":
        tok = _bpe(g, tokens, types)
    else:
        raise UnsupportedModelError(f"{g.path}: tokenizer model {kind!r} is not supported; supported: llama "
                                    "(SentencePiece), gpt2 (byte-level BPE); pass --prompt-ids instead")
    from tokenizers import AddedToken

    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, ty in zip(tokens, types) if ty in (TOKEN_CONTROL, TOKEN_USER_DEFINED) and t])

    def name(key: str) -> str | None:
        i = md.get(key)
        return tokens[int(i)] if isinstance(i, int) and 0 <= i < len(tokens) else None

    add_bos = md.get("tokenizer.ggml.add_bos_token", kind == "llama")
    return Tokenizer.from_parts(tok, md.get("tokenizer.chat_template"), name("tokenizer.ggml.bos_token_id"),
                                name("tokenizer.ggml.eos_token_id"), bool(add_bos))


def _spm(g: GGUFFile, tokens: list[str], types: list[int]) -> Any:
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, normalizers
    from tokenizers.models import BPE

    scores = g.metadata.get("tokenizer.ggml.scores")
    scores = [float(s) for s in scores] if scores is not None else [0.0] * len(tokens)
    if len(scores) != len(tokens):
        raise CheckpointError(f"{g.path}: tokenizer.ggml.scores has {len(scores)} entries for {len(tokens)} tokens")
    vocab = {t: i for i, t in enumerate(tokens)}
    unk_id = g.metadata.get("tokenizer.ggml.unknown_token_id", 0)
    unk = tokens[int(unk_id)] if isinstance(unk_id, int) and 0 <= unk_id < len(tokens) else None
    # Merges: every split of a vocabulary token into two vocabulary tokens, ranked by the score
    # of the token they make (the pair SentencePiece merges first), then by position.
    merges: list[tuple[float, int, str, str]] = []
    for t, i in vocab.items():
        if types[i] not in (1,) or len(t) < 2:
            continue
        for k in range(1, len(t)):
            a, b = t[:k], t[k:]
            if a in vocab and b in vocab:
                merges.append((-scores[i], vocab[a], a, b))
    merges.sort(key=lambda m: (m[0], m[1]))
    model = BPE(vocab, [(a, b) for _, _, a, b in merges], unk_token=unk, fuse_unk=True, byte_fallback=True)
    tok = HFTokenizer(model)
    prefix = bool(g.metadata.get("tokenizer.ggml.add_space_prefix", True))
    norm = [normalizers.Replace(" ", "\u2581")]
    if prefix:
        norm.insert(0, normalizers.Prepend("\u2581"))
    tok.normalizer = normalizers.Sequence(norm)
    dec = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if prefix:
        dec.append(decoders.Strip(" ", 1, 0))
    tok.decoder = decoders.Sequence(dec)
    return tok


def _bpe(g: GGUFFile, tokens: list[str], types: list[int]) -> Any:
    from tokenizers import Regex
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, pre_tokenizers
    from tokenizers.models import BPE

    raw = g.metadata.get("tokenizer.ggml.merges")
    if raw is None:
        raise CheckpointError(f"{g.path}: a gpt2 tokenizer needs tokenizer.ggml.merges, which is missing")
    merges = []
    for m in raw:
        a, sep, b = m.partition(" ")
        if not sep:
            raise CheckpointError(f"{g.path}: tokenizer merge {m!r} is not two tokens separated by a space")
        merges.append((a, b))
    pre = str(g.metadata.get("tokenizer.ggml.pre", "default"))
    if pre not in PRE_REGEX:
        raise UnsupportedModelError(f"{g.path}: pre-tokenizer {pre!r} is not supported; supported: "
                                    f"{', '.join(PRE_REGEX)}; pass --prompt-ids instead")
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = HFTokenizer(BPE(vocab, merges, fuse_unk=False, byte_fallback=False, ignore_merges=pre in ("llama-bpe", "llama3")))
    regex = PRE_REGEX[pre]
    if regex is None:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    return tok
