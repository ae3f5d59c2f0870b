"""The prompt cache on storage: a later Model (a later process) with the same prompt prefix loads
its KV blocks instead of prefilling them and computes exactly what a full prefill computes; a
shared part of a prompt is a partial hit; the folder stays within its budget; a corrupt, foreign
or half-written block is never used."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from flashtier.errors import ConfigError
from flashtier.runtime.engine import EngineConfig, Model
from flashtier.runtime.kv.prompt_cache import SUFFIX

ROOT = Path(__file__).parents[3]
MODEL = ROOT / "models" / "tiny-moe-16k"
PROMPT = (list(range(5, 400)) * 4)[:1100]  # 1100 tokens: 1024 loadable (two 512-token prefill chunks)


def run(model: Path, ids: list[int], folder: Path | None, **kw) -> tuple[list[int], list[torch.Tensor], dict]:
    config = EngineConfig.from_options(prompt_cache=str(folder) if folder else None, **kw)
    with Model(model, config) as llm:
        r = llm.generate(ids, max_new_tokens=6, ignore_eos=True)
        kv = [torch.cat(llm.cache.read(layer, len(ids))) for layer in range(llm.cache.num_layers)]
        return r.tokens, kv, r.stats


@pytest.fixture(scope="module")
def other(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Another model with the same KV format: tiny-dense, its context raised for this test (it
    ships declaring the 256 positions it was trained on; the prompt here is 1100 tokens)."""
    folder = tmp_path_factory.mktemp("other") / "tiny-dense-long"
    shutil.copytree(ROOT / "models" / "tiny-dense", folder)
    config = json.loads((folder / "config.json").read_text())
    config["max_position_embeddings"] = 16384
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def reference():
    return run(MODEL, PROMPT, None)


def same(a, b) -> bool:
    return a[0] == b[0] and all(torch.equal(x, y) for x, y in zip(a[1], b[1]))


def test_a_second_model_loads_the_prefix_and_computes_the_same(reference, tmp_path):
    first = run(MODEL, PROMPT, tmp_path)
    assert first[2]["prompt_cache_blocks_written"] == 1100 // 64 and "prompt_cache_tokens" not in first[2]
    second = run(MODEL, PROMPT, tmp_path)
    assert second[2]["prompt_cache_tokens"] == 1024 and second[2]["cached_prompt_tokens"] == 1024
    assert same(first, reference) and same(second, reference)  # every position's K/V and the tokens


def test_a_shared_beginning_is_a_partial_hit(reference, tmp_path):
    other = PROMPT[:600] + [7] * 500  # shares 600 tokens: 512 loadable
    run(MODEL, other, tmp_path)
    hit = run(MODEL, PROMPT, tmp_path)
    assert hit[2]["prompt_cache_tokens"] == 512
    assert same(hit, reference)


def test_the_folder_stays_within_its_budget(tmp_path):
    block = 128 << 10
    tokens, _, stats = run(MODEL, PROMPT, tmp_path, prompt_cache_budget=5 * block)
    files = list(tmp_path.glob(f"*{SUFFIX}"))
    assert sum(f.stat().st_size for f in files) <= 5 * block
    assert stats["prompt_cache_evicted"] > 0 and files
    with Model(MODEL, EngineConfig(prompt_cache=str(tmp_path))) as llm:  # what stays is a prefix's first blocks
        chain = llm.prompt_cache.block_hashes(PROMPT, len(files))
    assert {f.name for f in files} == {f"{h}{SUFFIX}" for h in chain}


def test_a_corrupt_block_is_dropped_and_recomputed(reference, tmp_path):
    run(MODEL, PROMPT, tmp_path)
    victim = sorted(tmp_path.glob(f"*{SUFFIX}"))[3]
    raw = bytearray(victim.read_bytes())
    raw[len(raw) // 2] ^= 0x10
    victim.write_bytes(bytes(raw))
    again = run(MODEL, PROMPT, tmp_path)
    assert again[2]["prompt_cache_dropped_corrupt"] == 1
    assert same(again, reference)  # never used: what follows it is prefilled
    assert victim.exists()  # stored again
    assert run(MODEL, PROMPT, tmp_path)[2]["prompt_cache_tokens"] == 1024


def test_another_models_blocks_are_refused(tmp_path, other):
    tokens, kv, _ = run(MODEL, PROMPT, tmp_path)
    with Model(other, EngineConfig(prompt_cache=str(tmp_path))) as llm:
        want = llm.prompt_cache.block_hashes(PROMPT, 1)[0]
    theirs = sorted(tmp_path.glob(f"*{SUFFIX}"))[0]
    (tmp_path / f"{want}{SUFFIX}").write_bytes(theirs.read_bytes())  # tiny-moe's block under tiny-dense's name
    ref = run(other, PROMPT, None)
    got = run(other, PROMPT, tmp_path)
    assert got[2]["prompt_cache_dropped_corrupt"] == 1 and "prompt_cache_tokens" not in got[2]
    assert same(got, ref)


def test_concurrent_writers_leave_only_complete_blocks(reference, tmp_path):
    errors = []

    def one():
        try:
            run(MODEL, PROMPT, tmp_path)
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=one) for _ in range(2)]
    for t in threads:
        t.start()
    p = subprocess.run([sys.executable, "-c", (
        "from flashtier.runtime.engine import EngineConfig, Model\n"
        f"m = Model({str(MODEL)!r}, EngineConfig(prompt_cache={str(tmp_path)!r}))\n"
        f"m.generate({PROMPT!r}, max_new_tokens=2, ignore_eos=True)\n")], capture_output=True, text=True)
    for t in threads:
        t.join()
    assert not errors and p.returncode == 0, (errors, p.stderr)
    assert not [f for f in tmp_path.iterdir() if not f.name.endswith(SUFFIX)]  # no temporary file left
    final = run(MODEL, PROMPT, tmp_path)
    assert final[2]["prompt_cache_tokens"] == 1024 and final[2]["prompt_cache_dropped_corrupt"] == 0
    assert same(final, reference)


@pytest.mark.parametrize("options, message", [
    ({"attention": "retrieval"}, "does not work with --attention retrieval"),
    ({"prompt_cache_budget": "0"}, "prompt_cache_budget must be positive"),
])
def test_bad_prompt_cache_options_are_one_error(tmp_path, options, message):
    with pytest.raises(ConfigError, match=message):
        EngineConfig.from_options(prompt_cache=str(tmp_path), **options)


def test_a_file_as_the_folder_is_one_error(tmp_path):
    f = tmp_path / "f"
    f.write_text("x")
    from flashtier.errors import StorageError

    with pytest.raises((ConfigError, StorageError), match=str(f)):
        Model(MODEL, EngineConfig(prompt_cache=str(f)))
