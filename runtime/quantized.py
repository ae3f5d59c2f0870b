"""Weights that stay in their ggml blocks (GGUF Q8_0, Q4_K, ...) from disk to the matrix product.

A :class:`QuantizedTensor` is the bytes of a ``[rows, cols]`` weight in one ggml block format plus
its logical shape. Weight accessors hand it to the forward like a torch tensor; the forward's
:class:`~flashtier.runtime.kernels.Linear` multiplies by it with :func:`quantized_linear`:

* one activation row (decode): the C kernel multiplies straight from the blocks (weights
  dequantized in registers, fp32 accumulation), so the bytes read per token are the quantized
  bytes;
* a few rows (up to :data:`ROWS_KERNEL_MAX`: a short prompt, the tokens one expert gets): the same
  kernels for every row in one call, the weight read once;
* more rows (prefill): tiles of the weight are dequantized to fp32 and multiplied with torch's
  GEMM, a few MiB at a time.

Both are exact with respect to the dequantized weights up to fp32 roundoff: nothing rounds the
activations beyond fp32 precision (the decode kernels may carry them as a 24-bit fixed point per 32
values, :func:`~flashtier.runtime.quant_kernels.split_activations`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from flashtier.checkpoint.ggml_types import GGMLType
from flashtier.checkpoint.quantized_tensor import QuantizedTensor  # noqa: F401  (re-exported)
from flashtier.runtime import quant_kernels as qk

if TYPE_CHECKING:
    from flashtier.storage_backends.safetensors_format import TensorInfo

DEVICE_TILE_BYTES = 256 << 20
"""fp32 bytes of dequantized weight per GEMM on an accelerator: whole weights in practice (each
dequantization is a few dozen small kernels: launches, not bytes, are what it costs there)."""
TILE_BYTES = 8 << 20
"""Most fp32 bytes of a dequantized weight tile in a prefill product."""


def _row_f32(x: torch.Tensor) -> torch.Tensor:
    """The one row of ``x`` ``[1, K]`` as a contiguous fp32 ``[K]`` (the native kernels' input)."""
    xr = x[0]
    return xr if xr.dtype == torch.float32 and xr.is_contiguous() else xr.float().contiguous()


def quantized_linear(x: torch.Tensor, w: QuantizedTensor, b: torch.Tensor | None = None,
                     threads: int | None = None, activations: str = "f32") -> torch.Tensor:
    """``x @ W.T (+ b)`` for ``x`` ``[T, K]`` and a quantized ``W`` ``[N, K]`` -> ``[T, N]`` in ``x.dtype``.

    ``activations``: for one row (decode), 'f32' is exact (fp32-accurate split activations on
    AVX-512 VNNI, 'f32-fma' the fp32-FMA kernels), 'q8' quantizes the row to int8 per 32 values
    (an approximation, see :func:`~flashtier.runtime.quant_kernels.qmatvec`). Up to
    :data:`ROWS_KERNEL_MAX` rows run through the same one-row kernels (the weight read once for
    all: exact, also with 'q8'); more rows (prefill) are dequantized tile by tile into fp32 GEMMs,
    always exact."""
    rows, cols = w.shape
    if x.shape[-1] != cols:
        raise ValueError(f"activation of width {x.shape[-1]} times a weight of shape {list(w.shape)}")
    if x.shape[0] == 1 and w.device.type == "cpu":
        xr = _row_f32(x)  # [K]
        native = qk._native_matvec
        if native is not None and w.array is not None and not xr.requires_grad:
            # the lean call: QuantizedTensor checked its geometry when it was made (decode makes
            # ~80 of these per token; qmatvec's argument checks cost ~20 us each)
            y = torch.empty(1, rows, dtype=torch.float32)  # [1, N]
            args = (int(w.qtype), w.array, xr.numpy(), y.numpy(), rows, cols, threads or torch.get_num_threads())
            native(*args, qk.ACT_CODES[activations])
        else:
            y = qk.qmatvec(int(w.qtype), w.data, xr, threads, activations=activations).unsqueeze(0)  # [1, N] fp32
    elif (2 <= x.shape[0] <= ROWS_KERNEL_MAX and w.device.type == "cpu"
          and (ys := quantized_linear_rows(list(x.float().split(1)), [w], [None], threads or torch.get_num_threads(),
                                           "f32" if activations == "q8" else activations)) is not None):
        # a few rows (a short prompt, a chat turn, the tokens routed to one expert): the decode
        # kernels for every row, the weight read once for all (dequantizing a whole weight costs
        # more than the rows' products below ~30 rows); each row as a one-row product computes it
        y = torch.cat([r[0] for r in ys]).float()  # [T, N]
    else:  # several rows, or blocks on an accelerator: dequantized there tile by tile, fp32 GEMMs
        xf = x.float()
        step = max(1, (TILE_BYTES if x.device.type == "cpu" else DEVICE_TILE_BYTES) // (4 * cols))
        y = torch.empty(x.shape[0], rows, dtype=torch.float32, device=x.device)
        for r0 in range(0, rows, step):
            r1 = min(rows, r0 + step)
            y[:, r0:r1] = F.linear(xf, w.dequantize(torch.float32, slice(r0, r1)))  # [T, r1-r0]
    if b is not None:
        y = y + b.float()
    return y.to(x.dtype)


MANY_MAX = 8
"""Most products :func:`quantized_linear_many` runs as one native call."""

ROWS_KERNEL_MAX = 16
"""Most rows :func:`quantized_linear` multiplies with the decode kernels (one native call, each
row as a one-row product) rather than by dequantized tiles and a GEMM. Measured ad hoc on this 2-core
CPU (Q4_K 5632x2048 / Q6_K 2048x5632, 2 threads): 16 rows 3.9 / 5.0 ms against 8.7 / 22 ms,
32 rows 7.6 / 9.9 against 11.5 / 9.0 ms per weight; a whole prompt of dense-fit (Q4_K_M, 16
layers) breaks even at ~24 tokens (4 tokens: 0.12 s to the first token instead of 0.32 s; 16:
0.39 s instead of 0.50 s). Smaller GEMM tiles than TILE_BYTES were slower (per-call overhead)."""

BATCH_MAX = 256
"""Most activation rows :func:`quantized_linear_rows` runs as one native call."""


def quantized_linear_many(x: torch.Tensor, ws: "list[QuantizedTensor]", bs: "list[torch.Tensor | None]",
                          threads: int, activations: str = "f32") -> "list[torch.Tensor] | None":
    """``[x @ W.T (+ b) for W, b in zip(ws, bs)]`` for one row ``x`` ``[1, K]`` as ONE native call (a layer's q, k, v;
    gate and up): x is prepared once per weight type, the rows of all products are split over the
    threads together and the caller waits once. Each output ``[1, N_i]`` (``x.dtype``) equals
    :func:`quantized_linear`'s bit for bit (the same row kernel computes every row). Returns None
    where it does not apply (several rows, no native kernels, a weight that is not contiguous
    CPU blocks of width K): then call :func:`quantized_linear` per weight."""
    if x.shape[0] != 1:
        return None
    rows = quantized_linear_rows([x], ws, bs, threads, activations)
    return None if rows is None else rows[0]


def quantized_linear_rows(xs: "list[torch.Tensor]", ws: "list[QuantizedTensor]", bs: "list[torch.Tensor | None]",
                          threads: int, activations: str = "f32") -> "list[list[torch.Tensor]] | None":
    """Batched decode: ``[[x @ W.T (+ b) for W, b in zip(ws, bs)] for x in xs]`` for one-row inputs
    ``[1, K]`` as ONE native call that reads each weight from memory once for all the rows (a block
    of weight rows is multiplied by every x while it sits in the CPU cache). Every output
    ``[1, N_i]`` (``x.dtype``) equals :func:`quantized_linear` of that x alone bit for bit (the same
    row kernel computes it): batch-invariant. None where it does not apply (see
    :func:`quantized_linear_many`)."""
    many = qk._native_matvec_many
    if (many is None or not xs or not 1 <= len(ws) <= MANY_MAX or len(xs) > BATCH_MAX
            or any(x.shape[0] != 1 or x.requires_grad or x.device.type != "cpu" for x in xs)):
        return None
    cols = xs[0].shape[1]
    if any(x.shape[1] != cols for x in xs) or any(w.shape[1] != cols or w.array is None for w in ws):
        return None
    outs = [torch.empty(len(xs), w.shape[0], dtype=torch.float32) for w in ws]  # [B, N_i] each
    specs = tuple((int(w.qtype), w.array, y.numpy(), w.shape[0]) for w, y in zip(ws, outs))
    act = qk.ACT_CODES[activations]
    if len(xs) == 1:
        many(_row_f32(xs[0]).numpy(), cols, threads, act, specs)
    else:
        xf = torch.cat(xs).float().contiguous()  # [B, K] fp32
        many(xf.numpy(), cols, threads, act, specs, len(xs))
    dtype = xs[0].dtype
    return [[(y[r:r + 1] if b is None else y[r:r + 1] + b.float()).to(dtype) for y, b in zip(outs, bs)]
            for r in range(len(xs))]


def page_format(info: "TensorInfo") -> tuple[torch.dtype, tuple[int, ...]]:
    """How a page holding tensor ``info`` is viewed: (torch dtype, shape); a quantized tensor is
    the uint8 ``[rows, row_bytes]`` of its blocks."""
    if info.quantized:
        rows = info.shape[0] if len(info.shape) == 2 else 1
        return torch.uint8, (rows, info.nbytes // rows)
    return {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}[info.dtype], tuple(info.shape)


def as_weight(page: torch.Tensor, info: "TensorInfo", compute_dtype: torch.dtype) -> "torch.Tensor | QuantizedTensor":
    """The weight the forward computes with from ``page`` (viewed per :func:`page_format`): a
    :class:`QuantizedTensor` over the same bytes, or the tensor in ``compute_dtype``."""
    if info.quantized:
        return QuantizedTensor(page.view(torch.uint8).reshape(page_format(info)[1]), GGMLType(info.ggml_type),
                               (page_format(info)[1][0], info.shape[-1]))
    return page if page.dtype == compute_dtype else page.to(compute_dtype)


def to_compute(t: "torch.Tensor | QuantizedTensor", compute_dtype: torch.dtype,
               device: torch.device | str = "cpu") -> "torch.Tensor | QuantizedTensor":
    """A weight read whole (``read_tensor``) made ready to compute with: quantized blocks stay
    blocks; plain tensors are cast to ``compute_dtype`` on ``device``."""
    if isinstance(t, QuantizedTensor):  # blocks stay blocks wherever they go
        return t if torch.device(device) == t.device else QuantizedTensor(t.data.to(device), t.qtype, t.shape)
    return t.to(device, compute_dtype)


def embedding_rows(table: "torch.Tensor | QuantizedTensor", tokens: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Rows ``tokens`` ``[T]`` of an embedding table -> ``[T, H]`` in ``dtype``."""
    if isinstance(table, QuantizedTensor):
        return table.take_rows(tokens, dtype)
    return F.embedding(tokens, table).to(dtype)


def weight_device(weight: "torch.Tensor | QuantizedTensor") -> torch.device:
    """Where a weight's bytes are (and so where products with it run)."""
    return weight.data.device if isinstance(weight, QuantizedTensor) else weight.device
