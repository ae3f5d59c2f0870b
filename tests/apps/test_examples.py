"""``apps/examples/embed.py`` runs as documented: streams an answer, prints speed and memory."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[2] / "apps" / "examples" / "embed.py"


def load_example():
    spec = importlib.util.spec_from_file_location("flashtier_example_embed", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_embed_example_runs_as_a_script(chat_model_dir):
    r = subprocess.run([sys.executable, str(EXAMPLE), str(chat_model_dir), "--max-new-tokens", "6",
                        "--question", "Hello!"], capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr
    assert "tokens/s" in r.stdout
    report = json.loads(r.stdout.split("memory:", 1)[1])
    assert report["tiers"] and report["kv_bytes"] > 0


def test_embed_example_under_a_memory_budget(chat_model_dir, capsys):
    assert load_example().main([str(chat_model_dir), "--max-new-tokens", "4", "--dram-budget", "3M"]) == 0
    out = capsys.readouterr().out
    report = json.loads(out.split("memory:", 1)[1])
    assert "storage" in report["tiers"]  # weights are paged through the tiered store


def test_embed_example_reports_a_missing_model_in_one_line(tmp_path, capsys):
    assert load_example().main([str(tmp_path / "missing")]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "embed.py: error:" in err
