"""The CLI: --json output on stdout, one-line errors on stderr, non-zero exit codes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from flashtier.checkpoint.make_model import PRESETS, MakeModelSpec, write_model


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "flashtier", *args], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    return write_model(tmp_path_factory.mktemp("cli") / "m", MakeModelSpec(PRESETS["tiny-mixtral"], "float32"))


def test_generate_json(made):
    r = run_cli("generate", str(made), "--prompt-ids", "1,2,3", "--max-new-tokens", "5", "--greedy", "--json", "--ignore-eos")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert len(out["tokens"]) == 5 and isinstance(out["text"], str)
    for key in ("prefill_tok_s", "decode_tok_s", "peak_rss_bytes"):
        assert out["stats"][key] > 0


@pytest.mark.parametrize("args, message", [
    (["generate", "/nonexistent/model", "--prompt-ids", "1"], "does not exist"),
    (["generate", "{made}", "--prompt-ids", "1,2,100000"], "outside the vocabulary"),
    (["generate", "{made}", "--prompt-ids", "1,x"], "comma-separated integers"),
    (["generate", "{made}", "--prompt", "hello"], "no tokenizer.json"),
    (["generate", "{made}", "--prompt-ids", "1", "--dram-budget", "lots"], "cannot read 'lots' as a size"),
    (["generate", "{made}", "--prompt-ids", "1", "--device", "gpu"], "device must be 'cpu', 'cuda' or 'cuda:N'"),
    (["generate", "{made}", "--prompt-ids", "1", "--device", "cuda", "--dram-budget", "1G"], "needs --device-budget too"),
    (["generate", "{made}", "--prompt-ids", "1", "--expert-slot", "3"], "unrecognized arguments: --expert-slot"),
])
def test_errors_are_one_line(made, args, message):
    r = run_cli(*[a.replace("{made}", str(made)) for a in args])
    assert r.returncode != 0
    assert message in r.stderr
    assert "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert r.stdout == ""


def test_compress_then_generate_streams_the_compressed_copy(tmp_path):
    cfg = dict(PRESETS["tiny-llama"], num_hidden_layers=2, vocab_size=512)
    model = write_model(tmp_path / "m", MakeModelSpec(cfg, "bfloat16", seed=4))
    r = run_cli("compress", str(model))
    assert r.returncode == 0, r.stderr
    assert 0.6 < json.loads(r.stdout)["stored_fraction"] < 0.8
    outs = {}
    for mode in ("on", "off"):
        r = run_cli("generate", str(model), "--prompt-ids", "1,2,3", "--max-new-tokens", "6", "--greedy", "--json",
                    "--ignore-eos", "--dram-budget", "2M", "--compressed", mode)
        assert r.returncode == 0, r.stderr
        outs[mode] = json.loads(r.stdout)
    assert outs["on"]["tokens"] == outs["off"]["tokens"]
    assert outs["on"]["stats"]["weights_at_rest"] == "compressed"
    r = run_cli("compress", str(tmp_path / "nothing-here"))
    assert r.returncode != 0 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
