"""Matrix-vector products for single-token decode on the CPU.

Decode multiplies one activation row by every weight matrix, so it is bound by how fast the
weights stream from memory. torch's CPU kernel for a bf16 weight and one row streams about
12 GB/s on one core of this machine (16-18 GB/s on two), against 29 GB/s for fp16. Two kernels
widen each bf16 weight to fp32 in registers (a 16-bit shift) and accumulate in fp32:

  * ``native``: the C extension ``flashtier._native`` (built at install, AVX-512 / AVX2 / baseline
    chosen at load; its own small thread pool). No runtime cost beyond the module: used by
    default everywhere, under memory budgets too.
  * ``numba``: the same loop JIT-compiled by numba, for installs without a C compiler. numba and
    LLVM add ~120 MiB of RSS, so ``auto`` uses it only without a memory budget.

Both stream 28-37 GB/s on this machine (``benchmarks/bench_matvec.py``). The
weights stay the checkpoint's bf16 bytes (no conversion, nothing approximated); the fp32 result
is rounded once to the activation dtype, as torch's kernel does. Accumulation order differs
from torch's, so results can differ from ``F.linear`` in the last bit of bf16, like any two
bf16 kernels; every weight accessor goes through the same :class:`Linear`, so paged and
in-memory runs stay identical.

Anything else (several rows, other dtypes, non-contiguous weights) goes to ``F.linear``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from flashtier.runtime.quantized import QuantizedTensor, quantized_linear, quantized_linear_many, quantized_linear_rows

MatVec = Callable[[np.ndarray, np.ndarray, np.ndarray], None]
"""``kernel(w_bits [N, K] uint16, x [K] float32, out [N] float32)``: ``out = bf16(w_bits) @ x``."""

_KERNEL: MatVec | None = None
_KERNEL_ERROR: str | None = None
_KERNEL_LOCK = threading.Lock()
_CALL_LOCK: threading.Lock | None = None
"""Set when numba runs on its ``workqueue`` threading layer, which aborts the process if two
threads launch parallel kernels at once (the ``omp`` and ``tbb`` layers are thread-safe)."""


def _define() -> MatVec:
    """Define the kernel (numba compiles it lazily; ``cache=True`` keeps the machine code on disk
    next to this module, or in numba's user cache when that is not writable)."""
    from llvmlite import ir
    from numba import njit, prange, types
    from numba.extending import intrinsic

    @intrinsic
    def _bits_as_f32(typingctx, bits):
        sig = types.float32(types.uint32)

        def codegen(context, builder, signature, args):
            return builder.bitcast(args[0], ir.FloatType())

        return sig, codegen

    @njit("void(uint16[:, ::1], float32[::1], float32[::1])", parallel=True, fastmath=True, nogil=True,
          cache=True)
    def bf16_matvec(w, x, out):  # w [N, K] bf16 bits, x [K] f32, out [N] f32
        n_rows, k_dim = w.shape
        n_blocks = (n_rows + 15) // 16
        for b in prange(n_blocks):  # 16 rows per task: fewer scheduling steps
            for n in range(b * 16, min(n_rows, b * 16 + 16)):
                acc = np.float32(0.0)
                for k in range(k_dim):
                    acc += _bits_as_f32(np.uint32(w[n, k]) << np.uint32(16)) * x[k]
                out[n] = acc

    return bf16_matvec


def bf16_matvec_kernel() -> MatVec | None:
    """The compiled kernel, or None when numba cannot build it here (then callers use torch).
    Compiled once per process (a few seconds), on first use."""
    global _KERNEL, _KERNEL_ERROR, _CALL_LOCK
    with _KERNEL_LOCK:
        if _KERNEL is None and _KERNEL_ERROR is None:
            try:
                kernel = _define()
                kernel(np.zeros((2, 16), np.uint16), np.zeros(16, np.float32), np.zeros(2, np.float32))  # load / compile now
                import numba

                if numba.threading_layer() == "workqueue":
                    _CALL_LOCK = threading.Lock()
                _KERNEL = kernel
            except Exception as exc:  # numba missing or failing on this platform: torch fallback
                _KERNEL_ERROR = f"{type(exc).__name__}: {exc}"
        return _KERNEL


def kernel_unavailable_reason() -> str | None:
    """Why the numba kernel could not be built (None if it was built or never tried)."""
    return _KERNEL_ERROR


def native_matvec() -> Callable[..., None] | None:
    """The C kernel ``bf16_matvec(w, x, out, rows, cols, threads)``, or None when the extension
    was not built (no C compiler at install)."""
    try:
        from flashtier._native import bf16_matvec
    except ImportError:
        return None
    return bf16_matvec


def _native_rows() -> Callable[..., None] | None:
    """The C kernel ``bf16_matvec_rows`` (several rows against one weight), or None when the
    extension was built before it existed."""
    try:
        from flashtier._native import bf16_matvec_rows
    except ImportError:
        return None
    return bf16_matvec_rows


KERNELS = ("native", "numba", "torch")


def choose_kernel(fast: bool | None, budgeted: bool) -> str:
    """Which kernel a model uses: ``fast`` False -> torch; otherwise the C kernel when built, else
    numba when asked for (True) or when no memory budget is set (None = auto), else torch."""
    if fast is False:
        return "torch"
    if native_matvec() is not None:
        return "native"
    return "numba" if fast or not budgeted else "torch"


class Linear:
    """``y = x @ w.T (+ b)`` with a fast decode kernel where it applies.

    ``fast``: use a bf16 kernel for one-row products with a contiguous bf16 weight on the CPU;
    ``kernel``: which ('native', 'numba'; default: native when built, else numba). ``threads``:
    kernel threads (None = torch's thread count for native, numba's default for numba). The
    object holds no weights; it is safe to share between passes of one model (not between
    threads running different models concurrently with different thread counts)."""

    def __init__(self, fast: bool = True, threads: int | None = None, kernel: str | None = None,
                 activations: str = "f32") -> None:
        if kernel is not None and kernel not in KERNELS:
            raise ValueError(f"matvec kernel {kernel!r} is unknown; choose one of {', '.join(KERNELS)}")
        if not fast or kernel == "torch":
            kernel = "torch"
        elif kernel is None:
            kernel = "native" if native_matvec() is not None else "numba"
        self._native = native_matvec() if kernel == "native" else None
        self._native_rows = _native_rows() if self._native is not None else None
        self._native_threads = max(1, threads or torch.get_num_threads())
        self._kernel = bf16_matvec_kernel() if kernel == "numba" else None
        self.kernel = "native" if self._native is not None else "numba" if self._kernel is not None else "torch"
        self.threads = threads
        self._numba = None  # numba's thread-count functions, when a count must be applied
        self._numba_threads = 0
        if self._kernel is not None and threads is not None:
            import numba

            self._numba, self._numba_threads = numba, min(threads, numba.config.NUMBA_NUM_THREADS)
        self.calls_fast = 0
        self.calls_torch = 0
        self.calls_quantized = 0
        self.activations = activations
        """'f32' (exact), 'f32-fma' (exact, fp32-FMA kernels only) or 'q8' (int8 activations) for one-row products with quantized weights."""

    @property
    def fast(self) -> bool:
        return self.kernel != "torch"

    @property
    def kernel_threads(self) -> int:
        """Threads of the native kernels (``threads``, or torch's count when the object was made)."""
        return self._native_threads

    def many(self, x: torch.Tensor, ws: "list[torch.Tensor | QuantizedTensor]",
             bs: "list[torch.Tensor | None] | None" = None) -> list[torch.Tensor]:
        """``[self(x, w, b) for w, b in zip(ws, bs)]``, the same tensors; one-row products with
        quantized weights run as one native call (see :func:`quantized_linear_many`)."""
        bs = bs if bs is not None else [None] * len(ws)
        if x.shape[0] == 1 and all(isinstance(w, QuantizedTensor) for w in ws):
            ys = quantized_linear_many(x, ws, bs, self._native_threads, self.activations)
            if ys is not None:
                self.calls_quantized += len(ws)
                return ys
        return [self(x, w, b) for w, b in zip(ws, bs)]

    def many_rows(self, xs: list[torch.Tensor], ws: "list[torch.Tensor | QuantizedTensor]",
                  bs: "list[torch.Tensor | None] | None" = None) -> list[list[torch.Tensor]]:
        """``[self.many(x, ws, bs) for x in xs]``, the same tensors: with quantized weights and
        one-row inputs, ONE native call reads each weight once for all the rows (batched decode);
        otherwise each weight over all rows at once (:meth:`rows`)."""
        bs = bs if bs is not None else [None] * len(ws)
        if all(isinstance(w, QuantizedTensor) for w in ws):
            ys = quantized_linear_rows(xs, ws, bs, self._native_threads, self.activations)
            if ys is not None:
                self.calls_quantized += len(ws) * len(xs)
                return ys
            return [self.many(x, ws, bs) for x in xs]
        per_weight = [self.rows(xs, w, b) for w, b in zip(ws, bs)]
        return [list(row) for row in zip(*per_weight)]

    def rows(self, xs: list[torch.Tensor], w: "torch.Tensor | QuantizedTensor",
             b: torch.Tensor | None = None) -> list[torch.Tensor]:
        """``[self(x, w, b) for x in xs]`` for one-row inputs ``[1, K]``, the same tensors; with the
        C bf16 kernel, one call computes every row (each exactly as the one-row kernel does) and
        reads the weight from memory once instead of once per row (batched decode)."""
        if len(xs) >= 2 and isinstance(w, QuantizedTensor):
            ys = quantized_linear_rows(xs, [w], [b], self._native_threads, self.activations)
            if ys is not None:
                self.calls_quantized += len(xs)
                return [y[0] for y in ys]
        if (len(xs) < 2 or self._native_rows is None or isinstance(w, QuantizedTensor) or w.dtype != torch.bfloat16
                or w.device.type != "cpu" or not w.is_contiguous()
                or any(x.shape[0] != 1 or x.dtype != torch.bfloat16 or x.requires_grad for x in xs)):
            return [self(x, w, b) for x in xs]
        self.calls_fast += len(xs)
        n_rows, cols = w.shape
        out = np.empty((len(xs), n_rows), np.float32)
        xf = torch.cat(xs).float().contiguous().numpy()  # [B, K] f32 (exact widening of bf16)
        bits = w.view(torch.int16).numpy().view(np.uint16)
        self._native_rows(bits, xf, out, n_rows, cols, len(xs), self._native_threads)
        ys = []
        for row in out:
            y = torch.from_numpy(row)
            if b is not None:
                y = y + b.float()
            ys.append(y.to(xs[0].dtype).unsqueeze(0))  # [1, N]
        return ys

    def __call__(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` ``[T, K]``, ``w`` ``[N, K]`` (a tensor or a quantized GGUF weight), ``b`` ``[N]``
        -> ``[T, N]`` in ``x.dtype``."""
        if isinstance(w, QuantizedTensor):
            self.calls_quantized += 1
            return quantized_linear(x, w, b, self._native_threads, self.activations)
        kernel = self._kernel
        if (self.kernel == "torch" or x.shape[0] != 1 or w.dtype != torch.bfloat16 or x.dtype != torch.bfloat16
                or w.device.type != "cpu" or not w.is_contiguous() or x.requires_grad):
            self.calls_torch += 1
            return F.linear(x, w, b)
        self.calls_fast += 1
        n_rows = w.shape[0]
        out = np.empty(n_rows, np.float32)
        xf = x[0].float().contiguous().numpy()  # [K] f32 (exact widening of bf16)
        bits = w.view(torch.int16).numpy().view(np.uint16)  # [N, K] the bf16 bytes, no copy
        if self._native is not None:
            self._native(bits, xf, out, n_rows, w.shape[1], self._native_threads)
        else:
            if self._numba is not None and self._numba.get_num_threads() != self._numba_threads:
                self._numba.set_num_threads(self._numba_threads)  # per calling thread, like OpenMP's
            if _CALL_LOCK is None:
                kernel(bits, xf, out)
            else:
                with _CALL_LOCK:
                    kernel(bits, xf, out)
        y = torch.from_numpy(out)
        if b is not None:
            y = y + b.float()
        return y.to(x.dtype).unsqueeze(0)  # [1, N]
