"""Helpers shared by the benchmarks: run a command (optionally under memcap), parse its JSON line
and memcap's peak, make models and GGUFs once, write result tables."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
MEMCAP = REPO.parent / "shared" / "tools" / "memcap.sh"
PY = sys.executable


def run_json(cmd: list[str], cap: str | None = None, timeout: int = 1800, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``cmd`` (under ``memcap.sh cap`` when given); return its last JSON line on stdout plus
    ``peak_cgroup_mib`` / ``rc`` / ``wall_s``. A failed run returns ``{"error": ...}``."""
    full = (["bash", str(MEMCAP), cap, "--"] if cap else []) + cmd
    t0 = time.perf_counter()
    p = subprocess.run(full, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})
    out: dict[str, Any] = {"rc": p.returncode, "wall_s": round(time.perf_counter() - t0, 1)}
    for line in reversed(p.stdout.strip().splitlines()):
        if line.startswith("{"):
            try:
                out.update(json.loads(line))
                break
            except json.JSONDecodeError:
                pass
    m = re.search(r"memcap: peak (\d+) MiB", p.stderr)
    if m:
        out["peak_cgroup_mib"] = int(m.group(1))
    if p.returncode != 0:
        out["error"] = (p.stderr.strip().splitlines() or ["?"])[-1][:300]
    return out


def ensure_model(path: Path, preset: str) -> Path:
    if not (path / "config.json").is_file():
        subprocess.run([PY, "-m", "flashtier", "make-model", str(path), "--preset", preset, "--force"], check=True)
    return path


def ensure_compressed(model_dir: Path) -> Path:
    """Write the model's lossless compressed copy (``flashtier compress``) unless it is there."""
    from flashtier.storage_backends.compressed_layout import load_index

    if load_index(model_dir) is None:
        subprocess.run([PY, "-m", "flashtier", "compress", str(model_dir)], check=True)
    return model_dir


def ensure_gguf(model_dir: Path, out: Path) -> Path:
    if not out.is_file():
        subprocess.run([PY, "-m", "flashtier.benchmarks.gguf_export", str(model_dir), str(out)], check=True)
    return out


def bench_io(directory: Path) -> dict[str, Any]:
    """Measure the disk now (same run as the benchmark) with flashtier bench-io."""
    return run_json([PY, "-m", "flashtier", "bench-io", "--json", "--dir", str(directory)])


def machine() -> str:
    import platform

    import psutil

    return f"{os.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB, {platform.processor() or platform.machine()}"


def write_results(name: str, results: dict[str, Any], table: str) -> Path:
    out_dir = REPO / "benchmarks" / "results"
    out_dir.mkdir(exist_ok=True)
    (out_dir / f"{name}.json").write_text(json.dumps(results, indent=2))
    (out_dir / f"{name}.md").write_text(table + "\n")
    return out_dir / f"{name}.md"


def publish(name: str, results: dict[str, Any], table: str) -> Path:
    """:func:`write_results`, then print the table and where it went."""
    path = write_results(name, results, table)
    print(table)
    print(f"\n(results: {path})")
    return path


def finish(result: dict[str, Any], json_path: Path | None, summary_skips: tuple[str, ...] = ("rows",)) -> int:
    """Write ``result`` to ``json_path`` (if given, parents created) and print it as one JSON line
    without the bulky ``summary_skips`` keys; the exit status of a benchmark's ``main``."""
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k not in summary_skips}))
    return 0


def thread_label(name: str, threads: int) -> str:
    """``"NAME, N thread(s)"``: the key of a result measured on ``threads`` threads (the tables of
    :func:`report_by_threads` split it back into two columns)."""
    return f"{name}, {threads} thread{'s' if threads > 1 else ''}"


def report_by_threads(name: str, results: dict[str, Any], caption: str, first_column: str, value_column: str) -> None:
    """Write ``results`` (whose ``gb_per_s`` is keyed by :func:`thread_label`) and its table under
    ``caption`` to ``benchmarks/results/NAME.{json,md}``, and print the table and the values."""
    lines = [caption, "", f"| {first_column} | threads | {value_column} |", "| --- | --- | --- |"]
    for key, value in results["gb_per_s"].items():
        label, threads = key.rsplit(", ", 1)
        lines.append(f"| {label} | {threads.split()[0]} | {value} |")
    table = "\n".join(lines)
    publish(name, results, table)
    print(json.dumps(results["gb_per_s"]))
