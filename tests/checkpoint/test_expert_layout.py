"""Expert extents: the converted layout (aligned, contiguous, checksummed, still a HF folder) and
refusal of converted folders that disagree with their manifest or fail a checksum."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from flashtier.errors import ConfigError, IntegrityError
from flashtier.checkpoint.folder import Checkpoint
from flashtier.runtime.engine import EngineConfig, Model
from flashtier.checkpoint.make_model import PRESETS, MakeModelSpec, write_model
from flashtier.checkpoint.expert_layout import (
    ALIGNMENT,
    MANIFEST_NAME,
    convert_experts,
    expert_layout,
    expert_names,
    verify_checksums,
)

PROMPT = list(range(3, 30))


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    cfg = dict(PRESETS["tiny-mixtral"], num_hidden_layers=3, vocab_size=512)
    return write_model(tmp_path_factory.mktemp("src") / "m", MakeModelSpec(cfg, "bfloat16", seed=5))


@pytest.fixture(scope="module")
def converted(source, tmp_path_factory):
    return convert_experts(source, tmp_path_factory.mktemp("conv") / "m")


def paged(path, **extra):
    return Model(path, EngineConfig.from_options(dram_budget=8 << 20, max_context=64, kv_block_size=16,
                                                 **{"expert_slots": 1, **extra}))


def tokens(path, **extra):
    with paged(path, **extra) as llm:
        return llm.generate(PROMPT, max_new_tokens=12, ignore_eos=True).tokens


def test_each_expert_is_one_aligned_extent_with_its_tensors_in_order(converted):
    ck = Checkpoint(converted)
    layout = expert_layout(ck)
    assert layout.kind == "converted" and layout.reads_per_expert() == 1
    for key, names in expert_names(ck.config).items():
        (extent,) = layout.experts[key]
        assert extent.offset % ALIGNMENT == 0
        offsets = [ck.tensors[n].offset for n in names]  # gate, up, down back to back
        assert offsets[0] == extent.offset
        assert offsets[1] == offsets[0] + ck.tensors[names[0]].nbytes
        assert offsets[2] == offsets[1] + ck.tensors[names[1]].nbytes
        assert extent.length == sum(ck.tensors[n].nbytes for n in names)
    assert verify_checksums(converted) == sum(x.length for xs in layout.experts.values() for x in xs)


def test_converted_folder_holds_the_same_tensors_and_loads_in_transformers(source, converted):
    import transformers
    from safetensors.torch import load_file

    a, b = load_file(source / "model.safetensors"), load_file(converted / "model.safetensors")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert (converted / "config.json").read_text() == (source / "config.json").read_text()
    model = transformers.AutoModelForCausalLM.from_pretrained(converted)
    assert type(model).__name__ == "MixtralForCausalLM"


def test_converted_and_original_give_the_same_tokens_as_in_memory(source, converted):
    expected = Model(source).generate(PROMPT, max_new_tokens=12, ignore_eos=True).tokens
    assert tokens(converted) == expected
    assert tokens(source) == expected
    with paged(converted) as llm:
        stats = llm.generate(PROMPT, max_new_tokens=4, ignore_eos=True).stats
    assert stats["expert_cache"]["layout"] == "converted" and stats["expert_cache"]["verified_bytes"] > 0


def test_padding_tensors_fill_gaps_when_extents_are_not_aligned(tmp_path):
    # 40 x 64 bf16 = 5120 bytes: an expert extent of 15360 bytes needs padding before the next one.
    cfg = dict(PRESETS["tiny-mixtral"], num_hidden_layers=2, vocab_size=256, intermediate_size=40)
    src = write_model(tmp_path / "src", MakeModelSpec(cfg, "bfloat16", seed=1))
    out = convert_experts(src, tmp_path / "out")
    header = json.loads((out / "model.safetensors").read_bytes()[8:8 + 65536].split(b"}}")[0] + b"}}")
    assert any(name.startswith("flashtier.pad.") for name in header)
    assert tokens(out) == Model(src).generate(PROMPT, max_new_tokens=12, ignore_eos=True).tokens
    import transformers

    transformers.AutoModelForCausalLM.from_pretrained(out)  # pads are ignored as unexpected keys


def test_sharded_output_has_an_index(source, tmp_path):
    out = convert_experts(source, tmp_path / "out", max_shard_bytes=200_000)
    assert len(list(out.glob("model-*.safetensors"))) > 1 and (out / "model.safetensors.index.json").is_file()
    assert expert_layout(Checkpoint(out)).reads_per_expert() == 1
    assert tokens(out) == tokens(source)


def test_manifest_that_disagrees_with_the_file_is_refused_naming_it(source, converted, tmp_path):
    bad = shutil.copytree(converted, tmp_path / "bad")
    manifest = json.loads((bad / MANIFEST_NAME).read_text())
    manifest["experts"][3]["offset"] += ALIGNMENT  # the extent moved
    (bad / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(IntegrityError, match=r"model\.safetensors.*disagrees with flashtier_experts\.json"):
        paged(bad)
    assert tokens(source) == Model(source).generate(PROMPT, max_new_tokens=12, ignore_eos=True).tokens


@pytest.mark.parametrize("edit", ["length", "tensor"])
def test_extent_of_the_wrong_size_or_contents_is_refused(converted, tmp_path, edit):
    bad = shutil.copytree(converted, tmp_path / "bad")
    weights = bad / "model.safetensors"
    manifest = json.loads((bad / MANIFEST_NAME).read_text())
    entry = manifest["experts"][-1]
    if edit == "length":
        entry["length"] += 10 * ALIGNMENT
    else:  # the manifest puts the down projection first
        names = list(entry["tensors"])
        entry["tensors"][names[0]], entry["tensors"][names[2]] = entry["tensors"][names[2]], entry["tensors"][names[0]]
    (bad / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(IntegrityError, match=rf"{weights}: expert \d+ of layer \d+ disagrees"):
        paged(bad)


def test_checksum_failure_is_refused_naming_the_file_and_the_original_still_works(source, converted, tmp_path):
    bad = shutil.copytree(converted, tmp_path / "bad")
    weights = bad / "model.safetensors"
    entry = json.loads((bad / MANIFEST_NAME).read_text())["experts"][0]
    with open(weights, "r+b") as f:  # flip one byte inside expert 0 of layer 0
        f.seek(entry["offset"] + 100)
        byte = f.read(1)
        f.seek(entry["offset"] + 100)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(IntegrityError, match=rf"{weights}.*checksum mismatch in expert 0 of layer 0"):
        verify_checksums(bad)
    # every expert gets read: the bad one is refused (at open when 4 slots hold every expert and
    # they are pinned; while decoding when the caches page them)
    with pytest.raises(IntegrityError, match=str(weights)):
        paged(bad, expert_slots=4)
    with paged(bad, expert_slots=4, expert_pin="off") as llm, pytest.raises(IntegrityError, match=str(weights)):
        llm.generate(PROMPT, max_new_tokens=4, ignore_eos=True)
    assert tokens(source) == Model(source).generate(PROMPT, max_new_tokens=12, ignore_eos=True).tokens


def test_dense_models_and_converting_in_place_are_refused(source, tmp_path):
    dense = write_model(tmp_path / "dense", MakeModelSpec(PRESETS["tiny-llama"], "bfloat16"))
    with pytest.raises(ConfigError, match="dense"):
        convert_experts(dense, tmp_path / "out")
    with pytest.raises(ConfigError, match="input folder"):
        convert_experts(source, source)


def test_convert_command_writes_the_layout(source, tmp_path):
    import subprocess
    import sys

    out = tmp_path / "cli"
    p = subprocess.run([sys.executable, "-m", "flashtier", "convert", str(source), str(out)],
                       capture_output=True, text=True, check=False)
    assert p.returncode == 0, p.stderr
    assert (out / MANIFEST_NAME).is_file() and expert_layout(Checkpoint(out)).kind == "converted"
