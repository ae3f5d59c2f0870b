"""Broken checkpoints are refused with a message naming the file / tensor, never a traceback."""

from __future__ import annotations

import json
import struct

import pytest

from flashtier.errors import CheckpointError, UnsupportedModelError
from flashtier.checkpoint.folder import Checkpoint
from flashtier.checkpoint.make_model import PRESETS, MakeModelSpec, write_model


@pytest.fixture()
def made(tmp_path):
    return write_model(tmp_path / "m", MakeModelSpec(PRESETS["tiny-llama"], "float32"))


def test_missing_folder(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        Checkpoint(tmp_path / "nope")


def test_missing_config(made):
    (made / "config.json").unlink()
    with pytest.raises(CheckpointError, match="no config.json"):
        Checkpoint(made)


def test_unsupported_architecture_lists_supported(made):
    cfg = json.loads((made / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (made / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match="GPT2LMHeadModel.*supported: LlamaForCausalLM"):
        Checkpoint(made)


@pytest.mark.parametrize("field, value, expected", [
    ("num_key_value_heads", "two", "an integer"),
    ("max_position_embeddings", None, "an integer"),
    ("rms_norm_eps", "small", "a finite number"),
    ("rms_norm_eps", float("inf"), "a finite number"),
    ("hidden_size", True, "an integer"),
    ("num_hidden_layers", 2.5, "an integer"),
    ("tie_word_embeddings", "yes", "true or false"),
    ("intermediate_size", [128], "an integer"),
])
def test_config_fields_of_the_wrong_type_are_named(made, field, value, expected):
    cfg = json.loads((made / "config.json").read_text())
    cfg[field] = value
    (made / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=f"{field} is .*expected {expected}"):
        Checkpoint(made)


def test_missing_required_field_is_named(made):
    cfg = json.loads((made / "config.json").read_text())
    del cfg["vocab_size"]
    (made / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="missing field 'vocab_size'"):
        Checkpoint(made)


def test_missing_tensor_is_named(made):
    from safetensors.torch import load_file, save_file

    tensors = load_file(made / "model.safetensors")
    del tensors["model.layers.1.self_attn.k_proj.weight"]
    save_file(tensors, made / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.self_attn\.k_proj\.weight.*missing"):
        Checkpoint(made)


def test_wrong_shape_is_named(made):
    cfg = json.loads((made / "config.json").read_text())
    cfg["intermediate_size"] = 100
    (made / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"mlp\.gate_proj\.weight.*shape"):
        Checkpoint(made)


def test_truncated_file(made):
    f = made / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="outside the file|truncated"):
        Checkpoint(made)


def test_header_length_beyond_file(made):
    f = made / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[:8] = struct.pack("<Q", len(data) * 2)
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="header length .* runs past the end"):
        Checkpoint(made)


def test_garbage_header(made):
    f = made / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:20] = b"not json!!!!"
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="not valid JSON"):
        Checkpoint(made)


def test_tiny_file(made):
    (made / "model.safetensors").write_bytes(b"abc")
    with pytest.raises(CheckpointError, match="truncated"):
        Checkpoint(made)


def test_missing_shard(tmp_path):
    many = write_model(tmp_path / "many", MakeModelSpec(PRESETS["tiny-llama"], "float32", max_shard_bytes=50_000))
    next(many.glob("model-*.safetensors")).unlink()
    with pytest.raises(CheckpointError, match="missing"):
        Checkpoint(many)


@pytest.mark.parametrize("weight_map", [["x"], {"a": 1}, {"a": None}, {"a": "../../etc/passwd"}, {"a": ""}])
def test_malformed_shard_index_is_one_error(made, weight_map):
    """A shard named by a number, a list instead of a map, a path out of the folder: refused, named."""
    (made / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(CheckpointError, match="weight_map must map tensor names to shard file names"):
        Checkpoint(made)
