"""How much memory this process may use: the tightest of its cgroup limit (v2 ``memory.max``, v1
``memory.limit_in_bytes``) and the memory the kernel reports available, so that a ``--dram-budget``
the process cannot hold is refused (or warned about) before a run thrashes for minutes.

The functions take the file locations as arguments (defaults: this process's), so tests can
point them at fake files; nothing here is read at import.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

RUNTIME_OVERHEAD = 300 << 20
"""Bytes flashtier's process needs beyond its budgets (Python, torch, tokenizer, buffers): the
README's stated overhead."""

_NO_LIMIT = 1 << 60  # cgroup v1 reports "no limit" as a huge number


@dataclass(frozen=True, slots=True)
class MemoryLimit:
    bytes: int
    source: str
    """What set it: 'cgroup memory.max', 'MemAvailable', ..."""


def _cgroup_limit(proc_cgroup: Path, cgroup_root: Path) -> MemoryLimit | None:
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hierarchy, controllers, rel = parts
        rel = rel.lstrip("/")
        if hierarchy == "0" and controllers == "":  # cgroup v2: walk up to the root, tightest wins
            best = None
            path = cgroup_root / rel
            while True:
                try:
                    text = (path / "memory.max").read_text().strip()
                    if text != "max":
                        value = int(text)
                        if best is None or value < best.bytes:
                            best = MemoryLimit(value, f"cgroup memory.max ({path / 'memory.max'})")
                except (OSError, ValueError):
                    pass
                if path == cgroup_root or path.parent == path:
                    break
                path = path.parent
            if best is not None:
                return best
        elif "memory" in controllers.split(","):  # cgroup v1
            f = cgroup_root / "memory" / rel / "memory.limit_in_bytes"
            try:
                value = int(f.read_text().strip())
            except (OSError, ValueError):
                continue
            if value < _NO_LIMIT:
                return MemoryLimit(value, f"cgroup memory.limit_in_bytes ({f})")
    return None


def _available(meminfo: Path) -> MemoryLimit | None:
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return MemoryLimit(int(line.split()[1]) * 1024, "MemAvailable in /proc/meminfo")
    except (OSError, ValueError, IndexError):
        return None
    return None


def memory_limit(proc_cgroup: Path = Path("/proc/self/cgroup"), cgroup_root: Path = Path("/sys/fs/cgroup"),
                 meminfo: Path = Path("/proc/meminfo")) -> MemoryLimit | None:
    """The tightest memory limit that applies to this process, or None where none can be read."""
    found = [m for m in (_cgroup_limit(proc_cgroup, cgroup_root), _available(meminfo)) if m is not None]
    return min(found, key=lambda m: m.bytes) if found else None


def check_budget(budget: int, limit: MemoryLimit | None, overhead: int = RUNTIME_OVERHEAD) -> str | None:
    """None when ``budget`` plus ``overhead`` fits ``limit``; a warning when only the budget fits.
    Raises BudgetError when the budget alone exceeds the limit (the run would thrash or be killed)."""
    from flashtier.errors import BudgetError

    if limit is None:
        return None
    mib = lambda n: f"{n / (1 << 20):.0f} MiB"
    if budget > limit.bytes:
        raise BudgetError(f"--dram-budget {mib(budget)} is more than this process may use: {mib(limit.bytes)} "
                          f"({limit.source}); give at most {mib(max(0, limit.bytes - overhead))} (the limit minus "
                          f"flashtier's ~{mib(overhead)} of runtime overhead)")
    if budget + overhead > limit.bytes:
        return (f"warning: --dram-budget {mib(budget)} plus flashtier's ~{mib(overhead)} of runtime overhead exceeds "
                f"the {mib(limit.bytes)} this process may use ({limit.source}); it may be killed or thrash: consider "
                f"--dram-budget {mib(max(0, limit.bytes - overhead))}")
    return None
