"""Where an MoE expert that misses the device cache runs: copied to the device, or computed on the
CPU where its host copy is (the choice behind llama.cpp's ``--n-cpu-moe``, Fiddler and
KTransformers), decided per miss from measured speeds.

A decode product streams the expert's weight bytes once, whichever side computes it: over the host
link into device memory (then the GPU's product is nearly free), or through the CPU's product
kernel from host memory. So for a few rows the cheaper side is the faster byte stream; the CPU's
cost grows with the rows (a batch of prefill tokens is compute, not bytes), the copy's does not.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable, Literal

import torch

from flashtier.errors import ConfigError

Placement = Literal["auto", "gpu", "cpu"]
PLACEMENTS: tuple[str, ...] = ("auto", "gpu", "cpu")

ROWS_PER_PASS = 4
"""Rows the CPU's product kernel takes for the cost of one (its register tile): up to this many
rows the expert costs one pass over its bytes, beyond it one pass per this many rows."""


@dataclass(frozen=True, slots=True)
class PlacementCosts:
    """Measured speeds behind the per-miss choice (``choose``)."""

    link_bytes_per_s: float
    """Host -> device copies (pinned)."""
    cpu_bytes_per_s: float
    """Weight bytes the CPU's one-row product streams per second."""
    overhead_s: float = 50e-6
    """A CPU-computed expert's fixed cost: its input to the host, its output back, one sync."""

    def __post_init__(self) -> None:
        if self.link_bytes_per_s <= 0 or self.cpu_bytes_per_s <= 0 or self.overhead_s < 0:
            raise ConfigError(f"placement speeds must be positive, got {self}")

    def copy_s(self, nbytes: int) -> float:
        return nbytes / self.link_bytes_per_s

    def cpu_s(self, nbytes: int, rows: int) -> float:
        passes = max(1, -(-rows // ROWS_PER_PASS))
        return self.overhead_s + passes * nbytes / self.cpu_bytes_per_s

    def choose(self, mode: str, nbytes: int, rows: int) -> Literal["device", "host"]:
        """Where an expert of ``nbytes`` that is not on the device runs for ``rows`` rows:
        'device' (copied there) or 'host' (computed on the CPU)."""
        if mode == "gpu":
            return "device"
        if mode == "cpu":
            return "host"
        return "host" if self.cpu_s(nbytes, rows) < self.copy_s(nbytes) else "device"


def measure_link(device: torch.device, nbytes: int = 32 << 20, repeat: int = 3) -> float:
    """Bytes per second of a pinned host -> ``device`` copy (a host memcpy for the CPU stand-in)."""
    src = torch.ones(nbytes, dtype=torch.uint8, pin_memory=device.type == "cuda")
    dst = torch.zeros(nbytes, dtype=torch.uint8, device=device)  # touched: no first-use page faults timed
    dst.copy_(src)
    return nbytes / _median_time(lambda: dst.copy_(src, non_blocking=True), device, repeat)


def measure_cpu(product: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], dtype: torch.dtype,
                shape: tuple[int, int] = (2048, 4096), repeat: int = 3) -> float:
    """Weight bytes per second of ``product(x [1, K], w [N, K])`` on the CPU (the runtime's own
    decode product) over a fresh weight of ``shape`` in ``dtype``."""
    w = torch.randn(shape).to(dtype)
    x = torch.randn(1, shape[1]).to(dtype)
    product(x, w)  # warm
    return w.numel() * w.element_size() / _median_time(lambda: product(x, w), torch.device("cpu"), repeat)


def _median_time(fn: Callable[[], object], device: torch.device, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return max(statistics.median(times), 1e-9)
