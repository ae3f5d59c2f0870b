"""llama.cpp through llama-cpp-python (mmap, 2 threads): a decode-speed peer, llama.cpp's own GGUF
quantizer, and its logits as a test oracle.

    python -m flashtier.benchmarks.peers.llamacpp MODEL.gguf --tokens 16
        prints one JSON line: {"peer", "decode_tok_s", "prefill_s", "tokens", "load_s", ...}
    python -m flashtier.benchmarks.peers.llamacpp F16.gguf --quantize OUT.gguf --ftype q4_k_m
        writes OUT.gguf with llama.cpp's quantizer (q8_0, q4_0, q4_k_m, q5_k_m, q6_k)

From Python: ``decode_timing(gguf)``, ``quantize(src, dst, ftype)``, ``logits(gguf, token_ids)``.

Every model is loaded with ``use_extra_bufts = False``. llama.cpp's default extra buffer types (CPU
weight repacking for Q4_0 / Q4_K / IQ4_NL, AMX) copy the repacked weights into anonymous memory,
which defeats mmap (an OOM under a memory cap), and on some of these machines they crashed with an
illegal instruction. llama-cpp-python 0.3.x has no keyword for the field, so ``Llama`` here takes the
default model params from ``llama_model_default_params`` patched for the duration of the load, and
checks the field afterwards. llama.cpp itself is installed by ``scripts/install_llamacpp.sh``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

FTYPES = {  # name -> llama_cpp.LLAMA_FTYPE_MOSTLY_* attribute
    "f16": "LLAMA_FTYPE_MOSTLY_F16",
    "q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0",
    "q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0",
    "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
    "q5_k_m": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
    "q6_k": "LLAMA_FTYPE_MOSTLY_Q6_K",
}


def model_params(**fields: Any):
    """``llama_model_default_params()`` with ``use_extra_bufts = False`` (and ``fields`` set): for
    the low-level API (``llama_cpp.llama_model_load_from_file``)."""
    import llama_cpp

    p = llama_cpp.llama_model_default_params()
    p.use_extra_bufts = False
    for k, v in fields.items():
        setattr(p, k, v)
    return p


@contextlib.contextmanager
def _no_extra_bufts() -> Iterator[None]:
    """While active, ``llama_cpp.llama_model_default_params()`` (which ``Llama.__init__`` calls to
    start its model params) returns params with ``use_extra_bufts = False``."""
    import llama_cpp.llama_cpp as lc

    orig = lc.llama_model_default_params

    def patched():
        p = orig()
        p.use_extra_bufts = False
        return p

    lc.llama_model_default_params = patched
    try:
        yield
    finally:
        lc.llama_model_default_params = orig


def load(gguf: str | Path, *, n_ctx: int = 256, threads: int = 2, n_batch: int = 64, logits_all: bool = False,
         verbose: bool = False, **kw: Any):
    """A ``llama_cpp.Llama`` on ``gguf`` (mmap) with ``use_extra_bufts = False``."""
    from llama_cpp import Llama

    with _no_extra_bufts():
        llm = Llama(model_path=str(gguf), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, use_mmap=True,
                    n_batch=n_batch, logits_all=logits_all, verbose=verbose, **kw)
    if llm.model_params.use_extra_bufts:
        raise RuntimeError("llama.cpp model loaded with use_extra_bufts=True")
    return llm


def decode_timing(gguf: str | Path, tokens: int = 16, prompt_len: int = 16, threads: int = 2) -> dict[str, Any]:
    """Greedy decode of ``tokens`` tokens after a ``prompt_len``-token prompt; decode tok/s is
    measured between the first and the last generated token (prefill excluded)."""
    import llama_cpp

    t0 = time.perf_counter()
    llm = load(gguf, threads=threads)
    load_s = time.perf_counter() - t0
    prompt = list(range(300, 300 + prompt_len))
    stamps: list[float] = []
    start = time.perf_counter()
    for _ in llm.generate(prompt, top_k=1, temp=0.0, reset=True):
        stamps.append(time.perf_counter())
        if len(stamps) >= tokens:
            break
    decode = (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else 0.0
    out = {"peer": "llama.cpp", "decode_tok_s": decode, "prefill_s": stamps[0] - start, "tokens": len(stamps),
           "load_s": load_s, "threads": threads, "use_extra_bufts": bool(llm.model_params.use_extra_bufts),
           "llama_cpp_python": llama_cpp.__version__}
    llm.close()
    return out


def quantize(src_gguf: str | Path, dst_gguf: str | Path, ftype: str, threads: int = 2) -> Path:
    """Write ``dst_gguf``: ``src_gguf`` (f16/f32) quantized by llama.cpp's own quantizer
    (``llama_model_quantize``, default mixture for the ftype, e.g. Q4_K_M keeps some tensors at Q6_K)."""
    import llama_cpp

    key = ftype.lower()
    if key not in FTYPES:
        raise ValueError(f"ftype {ftype!r}: expected one of {sorted(FTYPES)}")
    llama_cpp.llama_backend_init()
    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype = getattr(llama_cpp, FTYPES[key])
    p.nthread = threads
    dst = Path(dst_gguf)
    dst.parent.mkdir(parents=True, exist_ok=True)
    rc = llama_cpp.llama_model_quantize(str(src_gguf).encode(), str(dst).encode(), p)
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize({src_gguf} -> {dst}, {ftype}) returned {rc}")
    return dst


def logits(gguf_path: str | Path, token_ids: Sequence[int], threads: int = 2) -> np.ndarray:
    """llama.cpp's logits for every position of the prompt ``token_ids`` (no BOS added):
    float32 ``(len(token_ids), n_vocab)``; row i predicts token i + 1."""
    ids = [int(t) for t in token_ids]
    n = len(ids)
    llm = load(gguf_path, n_ctx=max(256, n), n_batch=max(1, min(512, n)), threads=threads, logits_all=True)
    try:
        llm.reset()
        llm.eval(ids)
        return np.array(llm.scores[:n], dtype=np.float32, copy=True)
    finally:
        llm.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("gguf")
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quantize", metavar="OUT_GGUF", help="quantize GGUF to OUT_GGUF with --ftype instead of timing")
    ap.add_argument("--ftype", default="q4_k_m", choices=sorted(FTYPES))
    a = ap.parse_args()
    if a.quantize:
        t0 = time.perf_counter()
        out = quantize(a.gguf, a.quantize, a.ftype, threads=a.threads)
        print(json.dumps({"quantized": str(out), "ftype": a.ftype, "bytes": out.stat().st_size,
                          "seconds": round(time.perf_counter() - t0, 1)}))
        return
    print(json.dumps(decode_timing(a.gguf, tokens=a.tokens, prompt_len=a.prompt_len, threads=a.threads)))


if __name__ == "__main__":
    main()
