"""The per-layer retrieval benchmark (benchmarks/bench_retrieval_layer.py) runs end to end on a
small context and reports what its README table reads: a per-layer time, its parts, and the
streaming baseline of the same round."""

from __future__ import annotations

import json
import subprocess
import sys


def test_bench_retrieval_layer_runs_and_reports_its_columns(tmp_path):
    out = tmp_path / "layer.json"
    r = subprocess.run([sys.executable, "-m", "flashtier.benchmarks.bench_retrieval_layer", "--context", "3000",
                        "--layers", "1", "--steps", "3", "--warmup", "1", "--json", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    result = json.loads(out.read_text())
    assert result["context"] == 3000 and result["layers"] == 1 and len(result["rounds"]) == 1
    row = result["rounds"][0]
    assert row["layer_ms"] > 0 and row["search_ms"] > 0 and row["stream_gb_per_s"] > 0
    assert row["layer_ms"] >= row["search_ms"] + row["gather_ms"]  # the parts are inside the whole
    assert 0 < result["keys_scanned_fraction"] < 1 and result["step_bytes_per_layer"] > 0
