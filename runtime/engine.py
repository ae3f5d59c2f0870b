"""The public Python API: open a model with budgets, generate / stream text or chat.

    from flashtier.runtime import open_model

    with open_model("models/tiny-moe") as llm:
        print(llm.generate("def fib(n):", max_new_tokens=32).text)
        for event in llm.stream(messages=[{"role": "user", "content": "hi"}]):
            print(event.text, end="", flush=True)

One :class:`Model` serves one generation at a time (a lock guards it); callers that need
concurrency queue requests (the server does). The KV cache of the last generation is kept, so a
request that extends the previous conversation prefills only the new tokens.
"""

from __future__ import annotations

import asyncio
import resource
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Iterator, Sequence

import torch

from flashtier.errors import BudgetError, BusyError, ConfigError, InputError
from flashtier.checkpoint.folder import Checkpoint, open_checkpoint
from flashtier.runtime.generate import GenerationStats, generate_ids
from flashtier.runtime.kernels import Linear, choose_kernel
from flashtier.runtime.kv.cache import KVBudgetFull, KVCache
from flashtier.runtime.quant_kernels import ACTIVATIONS
from flashtier.runtime.model import Transformer
from flashtier.runtime.sampling import Sampler, SamplingConfig
from flashtier.runtime.tokenizer import Tokenizer, load_tokenizer
from flashtier.runtime.units import DTYPES, parse_bytes  # noqa: F401  (re-exported: public API)
from flashtier.runtime.options import (
    ExpertCacheConfig,
    PagingConfig,
    RetrievalOptions,
    SparseFFNConfig,
    as_bool,
    section_kwargs,
)
from flashtier.runtime.weights.base import InMemoryWeights, WeightAccessor

@dataclass(frozen=True, slots=True)
class EngineConfig:
    """How a model is run: budgets, dtypes, cache shape."""

    dram_budget: int | None = None
    """Host memory for weights, e.g. 1G or 700M; what does not fit streams from storage (None:
    everything resident)."""
    device_budget: int | None = None
    """Device memory for weights and KV, e.g. 4G: the planner fills it first (attention, norms,
    output head, then whole layers), keeps what follows in host memory (``dram_budget``, None:
    unlimited) and streams the rest; pages not on the device are copied into a device window at
    their use (``PagedWeights``). With ``device='cpu'`` the device tier is its stand-in in host
    memory: the same placement and transfer schedule, for testing without a GPU (it only adds
    copies). None: no device tier (on CUDA: every weight resident on the GPU)."""
    compute_dtype: str | None = None
    """dtype to compute in: float32, bfloat16 or float16 (None: the checkpoint's, which keeps
    outputs exact against the reference)."""
    kv_block_size: int = 64
    """Tokens per KV cache block."""
    prefill_chunk: int = 512
    """Prompt tokens per prefill forward (bounds activation memory)."""
    attention: str = "full"
    """'full': exact attention over an in-memory KV cache (default); 'retrieval': KV paged device ->
    host -> storage, exact prefill, and decode attends to sinks + window + the top-k keys
    retrieved from an index (options in ``retrieval``)."""
    threads: int | None = None
    """CPU threads for the forward (None: torch's choice). Set on the thread that runs each
    generation, since OpenMP thread counts are per calling thread."""
    fast_matvec: bool | None = None
    """Use flashtier's bf16 kernel for single-token products on the CPU (about 2x torch's; same
    weights, fp32 accumulation; see ``runtime/kernels.py``). None (auto): the C extension's
    kernel whenever it was built; without it the numba kernel, but only when no ``dram_budget``
    is set (numba and LLVM cost ~120 MiB of resident memory, which a memory-capped run spends
    better on weights). True / False force a fast kernel / torch's."""
    activations: str = "f32"
    """Decode products with quantized (GGUF) weights: 'f32' multiplies the exact fp32 activations
    (default: outputs equal the dequantized network's to fp32 rounding; on AVX2 and AVX-512 CPUs
    the K-quant products carry the activations as a 24-bit fixed point per 32 values through
    integer dot products, see ``runtime/quant_kernels.py``); 'f32-fma' the same with the fp32-FMA
    kernels only; 'q8' quantizes each activation row to int8 with a scale per 32 values and uses
    integer dot products, as llama.cpp does: an approximation,
    faster where the CPU has AVX-512 VNNI (measured cost in the README). Ignored for bf16 / fp16 /
    fp32 weights."""
    max_context: int | None = None
    """Most tokens (prompt + generated) a request may hold; the KV cache is budgeted for it
    (None: the model's context, capped at 4096 when a budget is set)."""
    kv_sequences: int = 1
    """Sequences whose KV the budgets plan for, each up to --max-context tokens (``serve`` sets it
    to --max-batch). Full attention: under --dram-budget every running sequence's KV blocks come
    from that one share of the budget, and a sequence that does not fit waits until one finishes.
    Retrieval attention: each batched sequence gets 1/N of --kv-dram-budget (and --kv-device-budget),
    and with a budget at most N run at once."""
    device: str = "cpu"
    """Where the forward pass runs: 'cpu' (default), or 'cuda' / 'cuda:N' with every weight and the
    KV cache resident on that GPU (not with a budget or retrieval attention yet)."""
    prompt_cache: str | None = None
    """Folder of the prompt cache on storage: the KV blocks of prompts, written once and loaded
    instead of prefilled by a later request or process with the same prefix (a long system prompt,
    a document, a conversation resumed after a restart); identical logits (``runtime/kv/prompt_cache.py``).
    Full attention only. None: no prompt cache."""
    prompt_cache_budget: int | None = None
    """Bytes the prompt cache folder may hold, e.g. 4G; the least recently used blocks are deleted
    beyond it (default: 4 GiB)."""
    verified_record: str | None = None
    """File recording the one-time integrity checks that passed (a converted folder's expert
    extents before a resident load, a paged embedding table, FFN bundle files), keyed by each
    file's size, mtime, ctime and inode, so a second load of unchanged files skips them
    (``storage_backends/verified.py``). None: every load runs them. The CLI uses
    ``~/.cache/flashtier/verified.json`` unless ``--reverify``."""
    paging: PagingConfig = PagingConfig()
    """How streamed weights are read (O_DIRECT, the compressed copy)."""
    experts: ExpertCacheConfig | None = ExpertCacheConfig()
    """MoE models under a budget: per-layer expert caches with next-layer prediction. None (flat
    option expert_cache off): experts stream like any other weight."""
    sparse_ffn: SparseFFNConfig | None = None
    """Approximate: read only the FFN neurons the predictors expect active, from row-column bundles
    (ReLU models, with a budget; needs `flashtier convert --bundle` and `flashtier calibrate`).
    None: off."""
    retrieval: RetrievalOptions = RetrievalOptions()
    """Options of ``attention='retrieval'`` (ignored with full attention)."""

    @classmethod
    def from_options(cls, **options: Any) -> EngineConfig:
        """From flat option names, as the CLI and :func:`open_model` take them: this class's fields,
        plus the section fields by their flat names (``expert_slots=4``, ``sparse_ffn=True``,
        ``sparse_ffn_window_k=2``, ``window=256``, ``compressed="off"``, ``expert_cache="off"``;
        see ``runtime/options.py``). Sizes may be strings like ``"1G"``. None means "not set".
        An unknown name is a ConfigError naming the valid ones."""
        options = dict(options)
        for key in ("dram_budget", "device_budget", "prompt_cache_budget"):
            if key in options:
                options[key] = parse_bytes(options[key])
        expert_cache = options.pop("expert_cache", None)
        top = frozenset(f for f in cls.__dataclass_fields__ if f not in ("paging", "experts", "sparse_ffn", "retrieval"))
        kwargs = section_kwargs(options, top)
        if expert_cache is not None and not as_bool(expert_cache, "expert_cache"):
            if "experts" in kwargs:
                raise ConfigError("expert_* options need the expert cache: drop expert_cache=off or them")
            kwargs["experts"] = None
        return cls(**kwargs)

    def __post_init__(self) -> None:
        for name, kind in (("paging", PagingConfig), ("experts", ExpertCacheConfig), ("sparse_ffn", SparseFFNConfig),
                           ("retrieval", RetrievalOptions)):
            value = getattr(self, name)
            if not isinstance(value, kind) and not (value is None and name in ("experts", "sparse_ffn")):
                raise ConfigError(f"EngineConfig.{name} must be a {kind.__name__}, got {type(value).__name__}; "
                                  "build it with EngineConfig.from_options(...) to pass flat option names")
        if self.compute_dtype is not None and self.compute_dtype not in DTYPES:
            raise ConfigError(f"compute dtype {self.compute_dtype!r} unknown; use one of {', '.join(DTYPES)}")
        if self.prefill_chunk <= 0:
            raise ConfigError(f"prefill_chunk must be positive, got {self.prefill_chunk}")
        if self.attention not in ("full", "retrieval"):
            raise ConfigError(f"attention must be 'full' or 'retrieval', got {self.attention!r}")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"threads must be >= 1, got {self.threads}")
        if self.fast_matvec is not None and not isinstance(self.fast_matvec, bool):
            raise ConfigError(f"fast_matvec must be True, False or None (auto), got {self.fast_matvec!r}")
        if self.activations not in ACTIVATIONS:
            raise ConfigError("activations must be 'f32' (exact), 'f32-fma' (exact, the fp32-FMA kernels only) or "
                              f"'q8' (int8, approximate), got {self.activations!r}")
        if self.prompt_cache is not None and self.attention != "full":
            raise ConfigError("--prompt-cache stores the blocks of the full-attention KV cache; it does not work with "
                              "--attention retrieval yet (drop one of them)")
        if self.prompt_cache_budget is not None and self.prompt_cache_budget <= 0:
            raise ConfigError(f"prompt_cache_budget must be positive, got {self.prompt_cache_budget}")
        if not isinstance(self.kv_sequences, int) or self.kv_sequences < 1:
            raise ConfigError(f"kv_sequences must be a whole number >= 1, got {self.kv_sequences!r}")
        if self.max_context is not None and self.max_context <= 0:
            raise ConfigError(f"max_context must be positive, got {self.max_context}")
        if self.device_budget is not None and self.device_budget <= 0:
            raise ConfigError(f"--device-budget must be a positive size (e.g. 4G), got {self.device_budget}; leave it "
                              "out to run without a device tier")
        self._check_device()

    def _check_device(self) -> None:
        if self.device == "cpu":
            return
        head, _, index = self.device.partition(":")
        if head != "cuda" or (index and not index.isdigit()):
            raise ConfigError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {self.device!r}")
        if self.sparse_ffn is not None:
            raise ConfigError(f"--device {self.device}: the sparse FFN runs on the CPU for now; drop --sparse-ffn "
                              "or use --device cpu")
        if self.dram_budget is not None and self.device_budget is None:
            raise ConfigError(f"--device {self.device} with --dram-budget needs --device-budget too (the GPU memory "
                              "the weights and the KV may use, e.g. --device-budget 4G)")
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {self.device}: no CUDA GPU is visible to torch (a CPU build of torch, "
                              "or no driver); use --device cpu")
        if index and int(index) >= torch.cuda.device_count():
            raise ConfigError(f"--device {self.device}: torch sees {torch.cuda.device_count()} CUDA device(s)")


@dataclass
class TokenEvent:
    """One generated token: its id and the text it adds (empty while a UTF-8 character is split
    or a possible stop string is held back). The last event of a stream may carry only text
    (``token_id`` None): the held-back text of tokens already reported."""

    token_id: int | None
    text: str


@dataclass
class GenerationResult:
    tokens: list[int]
    text: str
    finish_reason: str
    stats: dict[str, Any]


WeightsFactory = Callable[[Checkpoint, EngineConfig], WeightAccessor]


def in_memory_weights(checkpoint: Checkpoint, config: EngineConfig) -> WeightAccessor:
    # A converted folder's expert extents carry crc32s (flashtier_experts.json): a resident load
    # checks them too, once, before reading the weights (costs one extra read of the expert bytes;
    # paged runs check each extent on its first read instead).
    folder = getattr(checkpoint, "model_dir", None)
    if folder is not None and Path(folder).is_dir():
        from flashtier.checkpoint.expert_layout import MANIFEST_NAME, verify_checksums

        manifest = Path(folder) / MANIFEST_NAME
        if manifest.is_file() and (config.experts is None or config.experts.verify != "off"):
            from flashtier.storage_backends.verified import VerifiedRecord

            record = VerifiedRecord(config.verified_record)
            files = [manifest, *sorted(Path(folder).glob("*.safetensors"))]
            if not record.verified("expert-extents", files):
                verify_checksums(folder)
                record.mark("expert-extents", files)
    dtype = DTYPES[config.compute_dtype] if config.compute_dtype else None
    return InMemoryWeights(checkpoint, dtype, device=config.device, huge_pages=config.paging.huge_pages)


class Model:
    """A loaded model: tokenizer, forward, KV cache of the current conversation."""

    def __init__(self, model_dir: str | Path, config: EngineConfig = EngineConfig(),
                 weights_factory: WeightsFactory | None = None) -> None:
        t0 = time.perf_counter()
        self.model_dir = Path(model_dir)
        self.engine_config = config
        self.checkpoint = open_checkpoint(self.model_dir)
        self.config = self.checkpoint.config
        _check_gguf_options(self.checkpoint, config)
        self.tokenizer = load_tokenizer(self.checkpoint)
        factory = weights_factory or _default_weights_factory(config)
        self.weights = factory(self.checkpoint, config)
        kernel = choose_kernel(config.fast_matvec, budgeted=config.dram_budget is not None)
        self.linear = Linear(fast=kernel != "torch", threads=config.threads, kernel=kernel,
                             activations=config.activations)
        self.transformer = Transformer(self.config, self.weights, set(self.checkpoint.tensors), self.linear)
        self.cache = self._new_cache()
        self.prompt_cache = self._open_prompt_cache()
        self._cached_ids: list[int] = []
        """Prompt ids whose KV in ``cache`` equals a fresh prefill's (whole prefill chunks from 0)."""
        self._lock = threading.Lock()
        self._lock_owner: int | None = None  # thread id of the open stream holding _lock
        self.load_s = time.perf_counter() - t0
        self.name = self.model_dir.name

    @property
    def context_limit(self) -> int:
        """Most tokens a request may hold: --max-context, else 4096 when budgets are set (the KV
        is budgeted for it), else the model's context."""
        c = self.engine_config
        if c.max_context is not None:
            return min(c.max_context, self.config.max_position_embeddings)
        if c.dram_budget is not None or c.device_budget is not None:
            return min(4096, self.config.max_position_embeddings)
        return self.config.max_position_embeddings

    def _open_prompt_cache(self) -> Any:
        c = self.engine_config
        if c.prompt_cache is None:
            return None
        from flashtier.runtime.kv.prompt_cache import PromptCache, model_key

        cache = self.cache
        settings = {"kv_dtype": str(getattr(cache, "dtype", "")), "block_size": c.kv_block_size,
                    "prefill_chunk": c.prefill_chunk, "kernel": self.linear.kernel, "activations": c.activations,
                    "compute_dtype": c.compute_dtype, "device": c.device}
        return PromptCache(c.prompt_cache, c.prompt_cache_budget or (4 << 30), model_key(self.checkpoint, settings),
                           c.kv_block_size, c.prefill_chunk)

    def _new_cache(self) -> KVCache:
        if self.engine_config.attention == "full":
            return self.transformer.new_cache(self.engine_config.kv_block_size)
        from flashtier.runtime.kv.retrieval import retrieval_cache  # long-context subsystem

        return retrieval_cache(self.transformer, self.engine_config, getattr(self.weights, "store", None))

    # ---------------------------------------------------------------- context manager
    def __enter__(self) -> "Model":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for part in (self.cache, self.weights):  # the cache first: its blocks may be an arena of the weights' store
            close = getattr(part, "close", None)
            if close is not None:
                close()

    # ---------------------------------------------------------------- prompts
    def encode(self, prompt: str | Sequence[int] | None = None, messages: Sequence[dict[str, str]] | None = None) -> list[int]:
        """Token ids for a text prompt, explicit ids, or chat messages (rendered by the template)."""
        if (prompt is None) == (messages is None):
            raise InputError("give exactly one of a prompt or chat messages")
        if messages is not None:
            text = self._need_tokenizer().render_chat(messages)
            return self._need_tokenizer().encode(text)
        if isinstance(prompt, str):
            return self._need_tokenizer().encode(prompt)
        return [int(t) for t in prompt]  # type: ignore[union-attr]

    def _need_tokenizer(self) -> Tokenizer:
        if self.tokenizer is None:
            raise InputError(f"{self.model_dir} has no tokenizer.json: pass token ids instead of text")
        return self.tokenizer

    def stop_ids(self) -> list[int]:
        ids = list(self.config.eos_token_ids)
        if self.tokenizer is not None:
            for tok in (self.tokenizer.eos_token, "<|im_end|>", "<|endoftext|>"):
                tid = self.tokenizer.token_id(tok)
                if tid is not None and tid not in ids:
                    ids.append(tid)
        return ids

    # ---------------------------------------------------------------- generation
    def stream(
        self,
        prompt: str | Sequence[int] | None = None,
        *,
        messages: Sequence[dict[str, str]] | None = None,
        max_new_tokens: int = 128,
        sampling: SamplingConfig = SamplingConfig(),
        stop: Sequence[str] = (),
        stats: GenerationStats | None = None,
        ignore_eos: bool = False,
    ) -> Iterator[TokenEvent]:
        """Yield tokens as they are generated. Closing the iterator cancels the generation."""
        ids = self.encode(prompt, messages)
        stats = stats if stats is not None else GenerationStats()
        me = threading.get_ident()
        if self._lock_owner == me:
            raise BusyError("a stream of this model is still open on this thread: read it to the end or call its "
                            "close() before starting another generation (one generation at a time per Model)")
        with self._lock:
            self._lock_owner = me
            try:
                yield from self._stream_locked(ids, max_new_tokens, sampling, stop, stats, ignore_eos)
            finally:
                self._lock_owner = None

    def _stream_locked(self, ids: list[int], max_new_tokens: int, sampling: SamplingConfig, stop: Sequence[str],
                       stats: GenerationStats, ignore_eos: bool) -> Iterator[TokenEvent]:
        """The body of :meth:`stream`, run while holding the model's lock."""
        if self.engine_config.threads is not None:
            torch.set_num_threads(self.engine_config.threads)
        # Reuse the cached KV of a shared prefix only in whole prefill chunks from position 0: that
        # KV is bit-identical to what a fresh prefill of this prompt computes, so the answer does not
        # depend on what ran before. A partial last chunk and decoded tokens were computed in other
        # shapes (bf16 rounds them differently) and are recomputed.
        chunk = self.engine_config.prefill_chunk
        reuse = _reusable_prefix(self._cached_ids, ids, chunk)
        pc = self.prompt_cache
        loaded = pc.load(self.cache, ids, at_least=reuse) if pc is not None else 0
        if loaded:
            reuse = loaded
            stats.extra["prompt_cache_tokens"] = loaded
        store = pc is not None  # the prefill runs in the chunks a fresh prefill uses (reuse is aligned)
        gen = generate_ids(self.transformer, self.cache, ids, max_new_tokens, Sampler(sampling),
                           () if ignore_eos else self.stop_ids(), stats, self.engine_config.prefill_chunk, reuse,
                           self.context_limit, decode_threads=1 if self.linear.kernel == "native" else None)
        out: list[int] = []
        texts = TextStream(self.tokenizer, stop)
        self._cached_ids = ids[:reuse]
        try:
            for tok in gen:
                out.append(tok)
                if len(out) == 1:
                    stats.decode_start_counters = self._io_counters()
                    self._cached_ids = ids[: len(ids) // chunk * chunk]  # the prompt is in: its whole chunks
                event, stopped = texts.push(tok)
                yield event
                if stopped:
                    stats.finish_reason = "stop"
                    return
            tail = texts.flush()
            if tail is not None:
                yield tail
        except GeneratorExit:
            raise  # the consumer stopped between tokens: the cache is consistent
        except BaseException:
            self._cached_ids = []  # the cache may hold a partial pass: never reuse it
            store = False
            raise
        finally:
            gen.close()
            if store and out:  # the prompt's KV is complete once a token came out
                pc.store(self.cache, ids, len(ids))

    def generate(self, prompt: str | Sequence[int] | None = None, **kwargs: Any) -> GenerationResult:
        """Generate to completion; returns ids, text, finish reason and statistics."""
        stats = kwargs.pop("stats", None) or GenerationStats()
        tokens: list[int] = []
        parts: list[str] = []
        for ev in self.stream(prompt, stats=stats, **kwargs):
            if ev.token_id is not None:
                tokens.append(ev.token_id)
            parts.append(ev.text)
        return GenerationResult(tokens, "".join(parts), stats.finish_reason, self.stats_dict(stats))

    def generate_batch(self, prompts: Sequence[str | Sequence[int]], max_new_tokens: int = 128,
                       sampling: SamplingConfig = SamplingConfig(), ignore_eos: bool = False) -> list[GenerationResult]:
        """Generate for several prompts together (offline batching): each prompt is prefilled on its
        own, then every unfinished sequence decodes in one step, each weight fetched once per step
        for all of them (under a budget, a step streams the weights once instead of once per
        sequence). Batch-invariant: each result's tokens are the tokens :meth:`generate` gives for
        that prompt alone (greedy, or sampling with a seed), whatever else is in the batch.
        Under a budget the KV of ``kv_sequences`` contexts is planned
        (default 1): prompts beyond what it holds wait and join as others finish
        (``batch_waited_for_kv`` in each result's stats counts them; open the model with
        ``kv_sequences=len(prompts)`` to run them all at once). With full attention the
        conversation cache of :meth:`generate` is left as it was unless the batch needs its blocks;
        with retrieval attention each sequence has its own long-context cache (its index, its
        share of ``--kv-dram-budget``) and the conversation cache is emptied first (its share of
        the budget goes to the batch)."""
        c = self.engine_config
        if not prompts:
            return []
        encoded = [self.encode(p) for p in prompts]
        if max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be >= 1 for generate_batch, got {max_new_tokens}")
        me = threading.get_ident()
        if self._lock_owner == me:
            raise BusyError("a stream of this model is still open on this thread: close it before generate_batch")
        with BatchSession(self, len(encoded)) as session:
            if c.threads is not None:
                torch.set_num_threads(c.threads)
            requests = [(ids, max_new_tokens, sampling, (), ignore_eos) for ids in encoded]
            t0 = time.perf_counter()
            admitted = session.admit_many(requests)
            prefill_s = time.perf_counter() - t0
            for b, result in enumerate(admitted):
                if isinstance(result, Exception) and not isinstance(result, KVBudgetFull):
                    raise InputError(f"prompt {b}: {result}") from result
            # prompts the KV budget cannot hold beside the running ones join as those finish
            waiting = [b for b, r in enumerate(admitted) if isinstance(r, KVBudgetFull)]
            waited = len(waiting)
            seqs: list[BatchSequence | None] = [None if b in waiting else r[0] for b, r in enumerate(admitted)]  # type: ignore[index]
            t1, steps = time.perf_counter(), 0
            tried_with = len(session.active)
            while True:
                if waiting and (len(session.active) < tried_with or not session.active):  # blocks were freed
                    joined = session.admit_many([requests[b] for b in waiting])
                    for b, result in zip(list(waiting), joined):
                        if isinstance(result, KVBudgetFull):
                            if not session.active:
                                raise result
                            continue
                        if isinstance(result, Exception):
                            raise InputError(f"prompt {b}: {result}") from result
                        seqs[b] = result[0]
                        waiting.remove(b)
                tried_with = len(session.active)
                if session.step():
                    steps += 1
                elif not waiting:
                    break
            decode_s = time.perf_counter() - t1
        total = sum(len(seq.text.tokens) - 1 for seq in seqs)
        results = []
        for b, seq in enumerate(seqs):
            stats = {"prompt_tokens": len(seq.ids), "generated_tokens": len(seq.text.tokens), "batch_size": len(seqs),
                     "batch_prefill_s": round(prefill_s, 6), "batch_decode_s": round(decode_s, 6),
                     "batch_decode_steps": steps,
                     "batch_waited_for_kv": waited,
                     "batch_decode_tok_s": round(total / decode_s, 3) if decode_s > 0 else 0.0,
                     "finish_reason": seq.stats.finish_reason}
            text = self.tokenizer.decode(seq.text.tokens) if self.tokenizer is not None else ""
            results.append(GenerationResult(list(seq.text.tokens), text, seq.stats.finish_reason, stats))
        return results

    async def astream(self, prompt: str | Sequence[int] | None = None, **kwargs: Any) -> AsyncIterator[TokenEvent]:
        """Async generator over :meth:`stream`, run on a worker thread; closing it cancels."""
        loop = asyncio.get_running_loop()
        it = self.stream(prompt, **kwargs)
        done = object()
        try:
            while True:
                ev = await loop.run_in_executor(None, next, it, done)
                if ev is done:
                    return
                yield ev  # type: ignore[misc]
        finally:
            await loop.run_in_executor(None, it.close)

    # ---------------------------------------------------------------- reporting
    def _io_counters(self) -> dict[str, float]:
        report = getattr(self.weights, "stats", None)
        if report is None:
            return {}
        r = report()
        return {k: float(r[k]) for k in ("bytes_read_storage", "io_wait_s") if k in r}

    def stats_dict(self, stats: GenerationStats) -> dict[str, Any]:
        """The statistics object of ``--json``: speed, memory, and what the weight accessor reports."""
        d: dict[str, Any] = {
            "prompt_tokens": stats.prompt_tokens,
            "cached_prompt_tokens": stats.cached_prompt_tokens,
            "generated_tokens": stats.generated_tokens,
            "prefill_s": round(stats.prefill_s, 6),
            "decode_s": round(stats.decode_s, 6),
            "prefill_tok_s": round(stats.prefill_tok_s, 3),
            "decode_tok_s": round(stats.decode_tok_s, 3),
            "load_s": round(self.load_s, 3),
            "peak_rss_bytes": peak_rss_bytes(),
            "kv_bytes": self.cache.nbytes(),
            "finish_reason": stats.finish_reason,
            "matvec_kernel": {"native": "native-bf16", "numba": "numba-bf16"}.get(self.linear.kernel, "torch"),
        }
        if getattr(self.checkpoint, "is_gguf", False):
            from flashtier.runtime.quant_kernels import native_available

            d["weights_format"] = "gguf"
            d["weight_types"] = self.checkpoint.type_counts()
            d["quantized_matvec_kernel"] = "native" if native_available() else "numpy"
            d["activations"] = self.engine_config.activations
        d.update(stats.extra)
        if self.prompt_cache is not None:
            d.update(self.prompt_cache.report())
        for part in (self.weights, self.cache):
            report = getattr(part, "stats", None)
            if report is not None:
                d.update(report())
        start = stats.decode_start_counters
        steps = max(stats.generated_tokens - 1, 0)
        if "bytes_read_storage" in start and steps:
            d["bytes_per_token_storage"] = int((d["bytes_read_storage"] - start["bytes_read_storage"]) / steps)
        if "io_wait_s" in start and stats.decode_s > 0:
            d["io_wait_fraction"] = round((d["io_wait_s"] - start["io_wait_s"]) / stats.decode_s, 4)
        return d

    def memory_report(self) -> dict[str, Any]:
        """What lives where: resident weight bytes per tier, KV bytes, process peak RSS, and
        ``store``: the tiered store's own account per tier and arena (streamed weights, expert
        caches, neuron windows, host KV blocks: every page it holds; see
        :meth:`TieredStore.memory_report`), when the model has one."""
        report = getattr(self.weights, "memory_report", None)
        tiers = report() if report is not None else {"host": {"resident_bytes": self.weights.resident_bytes()}}  # type: ignore[attr-defined]
        out: dict[str, Any] = {"tiers": tiers, "kv_bytes": self.cache.nbytes(), "peak_rss_bytes": peak_rss_bytes()}
        store = getattr(self.weights, "store", None) or getattr(getattr(self.cache, "host", None), "store", None)
        if store is not None:
            out["store"] = store.memory_report()
        return out


class TextStream:
    """The text of one generation, token by token: what each token adds, with a split UTF-8
    character held back until it is whole and a possible start of a stop string held back until
    it is decided; ``push`` reports when a stop string appeared (the text stops before it)."""

    def __init__(self, tokenizer: Tokenizer | None, stop: Sequence[str]) -> None:
        self.tokenizer, self.stop = tokenizer, tuple(stop)
        self.tokens: list[int] = []
        self.emitted = ""

    def push(self, token: int) -> tuple[TokenEvent, bool]:
        """The event of ``token`` and whether a stop string ended the text."""
        self.tokens.append(token)
        if self.tokenizer is None:
            return TokenEvent(token, ""), False
        text = self.tokenizer.decode(self.tokens)
        if text.endswith("\ufffd"):
            return TokenEvent(token, ""), False  # a multi-byte character is split across tokens
        hit = _find_stop(text, self.stop, len(self.emitted))
        if hit is not None:
            event = TokenEvent(token, text[len(self.emitted):hit])
            self.emitted = text[:hit]
            return event, True
        safe = len(text) - _stop_prefix_overlap(text, self.stop)  # hold back a possible stop start
        event = TokenEvent(token, text[len(self.emitted):safe])
        self.emitted = text[:safe]
        return event, False

    def flush(self) -> TokenEvent | None:
        """The held-back text once the generation ended without a stop string, if any."""
        if self.tokenizer is None or not self.tokens:
            return None
        text = self.tokenizer.decode(self.tokens)
        return TokenEvent(None, text[len(self.emitted):]) if len(text) > len(self.emitted) else None


@dataclass(eq=False)
class BatchSequence:
    """One request in a :class:`BatchSession`: its tokens so far, statistics and state."""

    ids: list[int]
    max_new_tokens: int
    sampler: Sampler
    stop_ids: frozenset[int]
    text: TextStream
    cache: KVCache
    stats: GenerationStats
    finished: bool = False
    prefilled: int = 0
    """Prompt positions in ``cache`` (the prompt is complete once this is ``len(ids)``)."""


class _ReleasedCache:
    """The cache of a sequence that left its batch (its KV was given back)."""

    length = 0

    def __getattr__(self, name: str) -> Any:
        raise InputError("this sequence left its batch: its KV cache was released")


_RELEASED: Any = _ReleasedCache()


class _EmptiedCache:
    """The conversation cache while a batch session with retrieval attention holds its share of
    the KV budgets: empty (reports 0 bytes, has no statistics); the session puts a new one back."""

    length = 0

    def nbytes(self) -> int:
        return 0

    def close(self) -> None:
        pass


class BatchSession:
    """Continuous batching on one :class:`Model`: sequences join (``admit``: their prompt is
    prefilled and the first token sampled) and leave (finished or ``drop``) at token boundaries,
    and every ``step`` decodes all of them (and prefills a chunk of each joining one) in one
    :meth:`Transformer.forward_groups` pass (each weight fetched once per step). Full attention:
    the sequences' blocks come from the model's pool (shared prompt prefixes held once); retrieval
    attention: each sequence has a long-context cache of its own with 1/kv_sequences of the KV
    budgets. Each sequence's tokens are the tokens :meth:`Model.stream` gives it alone (batch
    invariance). Holds the model's lock from ``open`` to ``close``; one thread drives it."""

    def __init__(self, model: Model, max_batch: int) -> None:
        c = model.engine_config
        if max_batch < 1:
            raise ConfigError(f"max batch must be >= 1, got {max_batch}")
        self.model, self.max_batch = model, max_batch
        self.active: list[BatchSequence] = []
        self.prefilling: list[BatchSequence] = []
        """Sequences admitted with ``interleave``: one prefill chunk of each per :meth:`step`."""
        self._retrieval = c.attention == "retrieval"
        self._held = 0
        """Retrieval caches alive (each holds 1/kv_sequences of the KV budgets)."""

    def __enter__(self) -> BatchSession:
        m = self.model
        m._lock.acquire()
        if self._retrieval:  # its share of --kv-dram-budget goes to the batch's sequences
            close = getattr(m.cache, "close", None)
            if close is not None:
                close()
            m.cache, m._cached_ids = _EmptiedCache(), []
        return self

    def __exit__(self, *exc: object) -> None:
        m = self.model
        try:
            if self._retrieval:
                for seq in self.active + self.prefilling:
                    self._release(seq)
                m.cache, m._cached_ids = m._new_cache(), []
        finally:
            m._lock.release()

    def _new_cache(self) -> KVCache:
        """A new sequence's KV cache: blocks of the model's pool (full attention), or a long-context
        cache of its own with 1/kv_sequences of the KV budgets (retrieval attention)."""
        m = self.model
        c = m.engine_config
        if not self._retrieval:
            return m.transformer.new_cache(c.kv_block_size)
        if c.retrieval.kv_dram_budget is not None and self._held >= c.kv_sequences:
            raise KVBudgetFull(f"the {c.kv_sequences} sequence(s) of --kv-sequences hold --kv-dram-budget; "
                               "this one waits until one finishes")
        from flashtier.runtime.kv.retrieval import retrieval_cache  # long-context subsystem

        cache = retrieval_cache(m.transformer, c, getattr(m.weights, "store", None), share=c.kv_sequences)
        self._held += 1
        return cache

    def _release(self, seq: BatchSequence) -> None:
        """Give back ``seq``'s KV now (its blocks to the pool; a long-context cache's host arena
        and spill files), not when the caller lets go of ``seq``."""
        cache, seq.cache = seq.cache, _RELEASED
        if cache is not _RELEASED and self._retrieval:
            cache.close()
            self._held -= 1

    def admit(self, ids: Sequence[int], max_new_tokens: int, sampling: SamplingConfig, stop: Sequence[str] = (),
              ignore_eos: bool = False) -> tuple[BatchSequence, list[TokenEvent]]:
        """Prefill ``ids`` into a new sequence's KV and sample its first token: the sequence and
        its first events (it may already be finished). InputError for a bad request."""
        (result,) = self.admit_many([(ids, max_new_tokens, sampling, stop, ignore_eos)])
        if isinstance(result, Exception):
            raise result
        return result

    def admit_many(self, requests: Sequence[tuple[Sequence[int], int, SamplingConfig, Sequence[str], bool]],
                   interleave: bool = False) -> list[tuple[BatchSequence, list[TokenEvent]] | Exception]:
        """Prefill several prompts together, one pass over the weights per prefill chunk
        (:meth:`Transformer.forward_groups`: each prompt computed as alone), and sample each one's
        first token. ``requests``: ``(ids, max_new_tokens, sampling, stop, ignore_eos)``. Returns,
        per request, its sequence and first events, or the InputError of a bad request (the
        others go on). With ``interleave`` nothing is prefilled here: each following :meth:`step`
        prefills one chunk of every joining prompt before the decode step of the running ones, so
        a long prompt does not stall them, and a prompt's first events come from the step that
        completes it (its chunks are the same, so are its tokens)."""
        from flashtier.runtime.generate import check_request

        m = self.model
        chunk = m.engine_config.prefill_chunk
        results: list[tuple[BatchSequence, list[TokenEvent]] | Exception] = []
        pending: list[tuple[int, BatchSequence]] = []
        deferred: KVBudgetFull | None = None
        for ids, max_new_tokens, sampling, stop, ignore_eos in requests:
            try:
                check_request(m.config, ids, max_new_tokens, m.context_limit)
            except InputError as e:
                results.append(e)
                continue
            if deferred is not None:  # first come, first served: no later request overtakes a waiting one
                results.append(deferred)
                continue
            stats = GenerationStats(prompt_tokens=len(ids))
            try:
                cache = self._new_cache()
            except KVBudgetFull as e:
                deferred = KVBudgetFull(str(e))  # a fresh error: see below
                results.append(deferred)
                continue
            seq = BatchSequence(list(ids), max_new_tokens, Sampler(sampling),
                                frozenset(() if ignore_eos else m.stop_ids()), TextStream(m.tokenizer, stop),
                                cache, stats)
            try:
                self._reserve(seq, len(ids) + max_new_tokens)  # shares a running sequence's prefix blocks first
            except KVBudgetFull as e:
                # kept in the results: a fresh error, without the traceback (and cause) whose frames
                # would keep this frame's locals, earlier requests' caches, and so their KV alive
                deferred = KVBudgetFull(str(e))
                results.append(deferred)
                self._release(seq)  # its cache gives back the blocks it shared, now
                continue
            except BudgetError as e:  # a long-context cache whose budget share cannot hold this context
                self._release(seq)
                n = m.engine_config.kv_sequences
                results.append(InputError(f"{e} (with --kv-sequences {n} each batched sequence gets 1/{n} of "
                                          "--kv-dram-budget)" if n > 1 else str(e)))
                continue
            results.append((seq, []))
            if max_new_tokens == 0:
                seq.finished = True
                continue
            if interleave:
                self.prefilling.append(seq)
            else:
                pending.append((len(results) - 1, seq))
        t0 = time.perf_counter()
        last: dict[int, torch.Tensor] = {}
        try:
            with torch.inference_mode():
                for s0 in range(0, max((len(seq.ids) for _, seq in pending), default=0), chunk):
                    part = [(k, seq) for k, seq in pending if seq.prefilled <= s0 < len(seq.ids)]
                    if not part:  # every prompt's chunks up to here were copied from another sequence
                        continue
                    logits = m.transformer.forward_groups(
                        [torch.tensor(seq.ids[s0:s0 + chunk], dtype=torch.long) for _, seq in part],
                        [seq.cache for _, seq in part], [s0] * len(part))
                    for (k, _), y in zip(part, logits):
                        last[k] = y
        except BaseException:
            for _, seq in pending:  # they never joined: their KV (a long-context cache's arena) goes back now
                seq.finished = True
                self._release(seq)
            raise
        dt = time.perf_counter() - t0
        for k, seq in pending:
            seq.prefilled = len(seq.ids)
            seq.stats.prefill_s = seq.stats.first_token_s = dt
            seq.stats.generated_tokens = 1
            self.active.append(seq)
            results[k] = (seq, self._take(seq, seq.sampler(last[k][-1])))
        return results

    def _reserve(self, seq: BatchSequence, positions: int) -> None:
        """Room for ``positions`` in ``seq``'s new cache: first the blocks of the longest prompt
        prefix it shares with a running sequence (referenced, not copied: see :meth:`_reuse_prefix`),
        then fresh blocks from the model's KV budget for the rest.

        KVBudgetFull when the running sequences hold the budget (the request waits for one to
        finish: callers keep it queued); with none running the conversation cache of
        :meth:`Model.generate` gives its blocks back first, and a request that still does not fit
        gets the error (it cannot: each request fits ``--max-context`` by its checks)."""
        m = self.model
        shared = self._reuse_prefix(seq)
        for attempt in range(2):
            try:
                seq.cache.reserve(positions)
                break
            except KVBudgetFull:
                if attempt or self.active or self.prefilling:
                    raise
                m.cache, m._cached_ids = m._new_cache(), []  # the conversation's blocks go back to the budget
        if shared is not None:
            donor, best = shared
            with torch.inference_mode():  # the positions of the shared prefix past its last whole block
                for layer in range(seq.cache.num_layers):
                    k, v = donor.cache.read(layer, best)  # [H_kv, best, D] each
                    seq.cache.write(layer, k[:, seq.cache.length:], v[:, seq.cache.length:], seq.cache.length)
                seq.cache.length = best

    def step(self) -> list[tuple[BatchSequence, list[TokenEvent]]]:
        """One prefill chunk of every joining sequence (``admit_many(interleave=True)``; those it
        completes give their first events) and one decode step of every sequence that was running
        before it, in ONE pass over the weights (under a budget the weights stream once per step,
        joiners or not): each one's new events. Each group is computed as alone (the prefill
        chunks at a whole-prompt prefill's boundaries, each decode row by the one-row operations),
        so tokens do not depend on who joins when."""
        live = [s for s in self.active if not s.finished]
        part = list(self.prefilling)
        if not live and not part:
            return []
        m = self.model
        chunk = m.engine_config.prefill_chunk
        groups = [torch.tensor(seq.ids[seq.prefilled:seq.prefilled + chunk], dtype=torch.long) for seq in part]
        groups += [torch.tensor([s.text.tokens[-1]], dtype=torch.long) for s in live]
        caches = [seq.cache for seq in part] + [s.cache for s in live]
        starts = [seq.prefilled for seq in part] + [len(s.ids) + len(s.text.tokens) - 1 for s in live]
        saved = torch.get_num_threads()
        if not part and m.linear.kernel == "native":
            torch.set_num_threads(1)  # as Model.stream's decode steps
        t0 = time.perf_counter()
        try:
            with torch.inference_mode():
                logits = m.transformer.forward_groups(groups, caches, starts)  # each group's last [1, V]
        finally:
            torch.set_num_threads(saved)
        dt = time.perf_counter() - t0
        out = self._prefilled(part, logits[: len(part)], dt)  # first tokens: sampled as after a prefill
        if m.linear.kernel == "native":  # decode tokens: sampled at Model.stream's decode thread count,
            torch.set_num_threads(1)     # so no operation on a token's path runs at another count alone
        try:
            for seq, y in zip(live, logits[len(part):]):
                seq.stats.decode_s += dt
                seq.stats.generated_tokens += 1
                out.append((seq, self._take(seq, seq.sampler(y[-1]))))
        finally:
            torch.set_num_threads(saved)
        return out

    def _reuse_prefix(self, seq: BatchSequence) -> tuple[BatchSequence, int] | None:
        """Give ``seq``'s empty cache the KV of the longest prompt prefix it shares with a sequence of
        this session, in whole prefill chunks from position 0 (bit-identical to prefilling them: a
        shared system prompt is prefilled once per session, not once per request), leaving at least
        one chunk for ``seq`` to prefill (its last logits). Its whole blocks are *shared* (the same
        blocks of the pool, copied only if one of the two writes into one: copy on write), so a
        common prefix is held once; returns the donor and the prefix length when the positions after
        the last whole block remain to be copied (by the caller, once it has the blocks)."""
        if self.model.config.sliding_window is not None or self._retrieval:
            return None  # a window-only cache has nothing to copy from; long-context caches share no blocks
        chunk = self.model.engine_config.prefill_chunk
        best, donor = 0, None
        for other in self.active + self.prefilling:
            n = _reusable_prefix(other.ids[: other.prefilled], seq.ids, chunk)
            if n > best:
                best, donor = n, other
        if donor is None:
            return None
        shared = seq.cache.share(donor.cache, best)  # type: ignore[attr-defined]
        seq.prefilled = seq.stats.cached_prompt_tokens = best
        return (donor, best) if shared < best else None

    def _prefilled(self, part: list[BatchSequence], logits: list[torch.Tensor], dt: float
                   ) -> list[tuple[BatchSequence, list[TokenEvent]]]:
        """After a pass that prefilled the next chunk of each of ``part``: completed prompts sample
        their first token (from their last logits ``[1, V]``) and join the running sequences."""
        chunk = self.model.engine_config.prefill_chunk
        out = []
        for seq, y in zip(part, logits):
            seq.prefilled = min(len(seq.ids), seq.prefilled + chunk)
            seq.stats.prefill_s += dt
            if seq.prefilled < len(seq.ids):
                continue
            self.prefilling.remove(seq)
            seq.stats.first_token_s = seq.stats.prefill_s
            seq.stats.generated_tokens = 1
            self.active.append(seq)
            out.append((seq, self._take(seq, seq.sampler(y[-1]))))
        return out

    def drop(self, seq: BatchSequence) -> None:
        """Remove a sequence (finished, or its client went away); frees its KV."""
        seq.finished = True
        self.active = [s for s in self.active if s is not seq]
        self.prefilling = [s for s in self.prefilling if s is not seq]
        self._release(seq)

    def _take(self, seq: BatchSequence, token: int) -> list[TokenEvent]:
        event, stopped = seq.text.push(token)
        events = [event]
        if stopped:
            seq.stats.finish_reason = "stop"
        elif token in seq.stop_ids:
            seq.stats.finish_reason = "stop"
        elif len(seq.text.tokens) >= seq.max_new_tokens:
            seq.stats.finish_reason = "length"
        else:
            return events
        if not stopped:
            tail = seq.text.flush()
            if tail is not None:
                events.append(tail)
        self.drop(seq)
        return events


def _check_gguf_options(checkpoint: Any, config: EngineConfig) -> None:
    """Refuse, in one line, what the runtime does not do with quantized GGUF weights yet."""
    if not getattr(checkpoint, "is_gguf", False):
        return
    if config.sparse_ffn is not None:
        raise ConfigError("--sparse-ffn reads FFN neurons from row-column bundles of a Hugging Face checkpoint; "
                          "it does not run on GGUF files (run the safetensors folder instead)")


def _default_weights_factory(config: EngineConfig) -> WeightsFactory:
    if config.sparse_ffn is not None:  # opt-in approximation: predicted FFN neurons from bundles
        from flashtier.runtime.weights.sparse_ffn import sparse_ffn_weights

        return sparse_ffn_weights
    if config.dram_budget is None and config.device_budget is None:
        return in_memory_weights
    from flashtier.runtime.weights.paged import paged_weights  # the tiered store, when a budget is set

    def budgeted(checkpoint: Checkpoint, cfg: EngineConfig) -> WeightAccessor:
        if checkpoint.config.is_moe and cfg.experts is not None:
            from flashtier.runtime.weights.experts import expert_weights  # per-layer expert caches

            return expert_weights(checkpoint, cfg)
        return paged_weights(checkpoint, cfg)

    return budgeted


def open_model(model_dir: str | Path, **options: Any) -> Model:
    """Open a checkpoint folder; keyword options are flat option names
    (:meth:`EngineConfig.from_options`: the config's fields and its sections' fields; sizes may be
    strings like ``"1G"``). An unknown option is a ConfigError naming the valid ones."""
    return Model(model_dir, EngineConfig.from_options(**options))


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _reusable_prefix(cached: Sequence[int], ids: Sequence[int], chunk: int) -> int:
    """Positions of ``ids`` whose KV may be taken from a cache holding the prefill of ``cached``:
    the shared prefix in whole prefill chunks from position 0 (bit-identical to prefilling them),
    leaving at least one token to prefill (the last logits)."""
    return min(_common_prefix(cached, ids), len(ids) - 1) // chunk * chunk


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _stop_prefix_overlap(text: str, stops: Sequence[str]) -> int:
    """Length of the longest tail of ``text`` that is a proper prefix of some stop string."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


def _find_stop(text: str, stops: Sequence[str], emitted: int) -> int | None:
    """Index where the earliest stop string begins, searching only where it could be new."""
    best = None
    for s in stops:
        if not s:
            continue
        i = text.find(s, max(0, emitted - len(s) + 1))
        if i != -1 and (best is None or i < best):
            best = i
    return best
