"""Row-column bundles: round trip of every neuron, coalesced runs, refusal of corrupt or foreign files."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from flashtier.errors import CheckpointError, IntegrityError
from flashtier.prefetch.windowing import RowMatrix
from flashtier.checkpoint.folder import Checkpoint, layer_names
from flashtier.checkpoint.make_model import PRESETS, MakeModelSpec, write_model
from flashtier.checkpoint.bundles import (
    BUNDLE_DIR,
    MANIFEST,
    BundleReader,
    convert_bundled,
    layer_views,
    neuron_runs,
    open_bundles,
    torch_dtype,
)

CONFIG = dict(PRESETS["tiny-llama"], hidden_act="relu", intermediate_size=160, num_hidden_layers=3)


def make(tmp_path_factory, name: str, seed: int = 1, dtype: str = "bfloat16", **over):
    return write_model(tmp_path_factory.mktemp(name) / "m", MakeModelSpec({**CONFIG, **over}, dtype, seed=seed))


@pytest.fixture(scope="module", params=[("bfloat16", "bundled"), ("float32", "bundled"), ("bfloat16", "split")])
def converted(request, tmp_path_factory):
    dtype, layout = request.param
    src = make(tmp_path_factory, f"src-{dtype}", dtype=dtype)
    return convert_bundled(src, src.parent / "bundled", layout=layout)


def read_all(out, neurons_by_layer):
    ckpt = Checkpoint(out)
    manifest = open_bundles(ckpt)
    reader = BundleReader(out, manifest)
    got = {}
    try:
        for layer, neurons in neurons_by_layer.items():
            matrix = RowMatrix(len(neurons), reader.row_bytes)
            pending = reader.submit(layer, neurons, matrix.rows(0, len(neurons)))
            pending.wait()
            got[layer] = layer_views(matrix.tensor, manifest, torch_dtype(manifest))
    finally:
        reader.close()
    return ckpt, got


def test_every_neurons_bundle_equals_the_original_rows_and_columns(converted):
    ckpt = Checkpoint(converted)
    n = ckpt.config.intermediate_size
    ckpt, got = read_all(converted, {i: np.arange(n) for i in range(ckpt.config.num_layers)})
    for i, (gate, up, down_t) in got.items():
        names = layer_names(ckpt.config, i)
        assert torch.equal(gate, ckpt.read_tensor(names.gate))
        assert torch.equal(up, ckpt.read_tensor(names.up))
        assert torch.equal(down_t, ckpt.read_tensor(names.down).t())


def test_a_scattered_subset_lands_in_consecutive_rows(converted):
    neurons = np.array([0, 1, 2, 7, 9, 10, 100, 159])
    ckpt, got = read_all(converted, {1: neurons})
    gate, up, down_t = got[1]
    names = layer_names(ckpt.config, 1)
    assert torch.equal(gate, ckpt.read_tensor(names.gate)[neurons])
    assert torch.equal(up, ckpt.read_tensor(names.up)[neurons])
    assert torch.equal(down_t, ckpt.read_tensor(names.down)[:, neurons].t())


def test_runs_of_adjacent_neurons_are_one_read_each(converted):
    # runs: [0, 1, 2] [7] [9, 10] [100] -> 4 reads (x3 parts in the split layout)
    assert neuron_runs(np.array([0, 1, 2, 7, 9, 10, 100])) == [(0, 0, 3), (7, 3, 1), (9, 4, 2), (100, 6, 1)]
    ckpt = Checkpoint(converted)
    manifest = open_bundles(ckpt)
    reader = BundleReader(converted, manifest)
    neurons = np.array([0, 1, 2, 7, 9, 10, 100])
    matrix = RowMatrix(len(neurons), reader.row_bytes)
    pending = reader.submit(0, neurons, matrix.rows(0, len(neurons)))
    pending.wait()
    reader.close()
    assert pending.runs == 4 * (3 if manifest.layout == "split" else 1)


def test_bundles_are_sector_aligned(converted):
    manifest = open_bundles(Checkpoint(converted))
    for info in manifest.layers:
        assert info.stride % 512 == 0 and all(o % 512 == 0 for o in info.offsets)


def test_the_output_folder_is_a_loadable_checkpoint(converted):
    from flashtier.runtime.engine import Model

    ids = Model(converted).generate([3, 4, 5], max_new_tokens=4, ignore_eos=True).tokens
    assert ids == Model(converted.parent / "m").generate([3, 4, 5], max_new_tokens=4, ignore_eos=True).tokens


def test_a_corrupted_bundle_file_is_refused_naming_the_file(converted, tmp_path):
    copy = shutil.copytree(converted, tmp_path / "copy")
    target = copy / BUNDLE_DIR / "layer_001.bin"
    data = bytearray(target.read_bytes())
    data[1000] ^= 0xFF
    target.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match=r"layer_001\.bin.*checksum mismatch"):
        open_bundles(Checkpoint(copy))


def test_a_truncated_bundle_file_is_refused(converted, tmp_path):
    copy = shutil.copytree(converted, tmp_path / "copy")
    target = copy / BUNDLE_DIR / "layer_002.bin"
    target.write_bytes(target.read_bytes()[:-512])
    with pytest.raises(IntegrityError, match=r"layer_002\.bin.*truncated"):
        open_bundles(Checkpoint(copy), verify=False)


def test_a_manifest_from_another_model_is_refused(converted, tmp_path_factory):
    # same architecture, other weights: the tensor fingerprint differs
    other = make(tmp_path_factory, "other", seed=7, dtype=Checkpoint(converted).weights_dtype.__str__().split(".")[1])
    shutil.copytree(converted / BUNDLE_DIR, other / BUNDLE_DIR)
    with pytest.raises(CheckpointError, match=r"manifest\.json.*another model"):
        open_bundles(Checkpoint(other))


def test_a_manifest_for_another_config_is_refused(converted, tmp_path_factory):
    other = make(tmp_path_factory, "wider", intermediate_size=192)
    shutil.copytree(converted / BUNDLE_DIR, other / BUNDLE_DIR)
    with pytest.raises(CheckpointError, match="another model"):
        open_bundles(Checkpoint(other))


def test_missing_bundles_say_how_to_make_them(tmp_path_factory):
    src = make(tmp_path_factory, "plain")
    with pytest.raises(CheckpointError, match="convert .* --bundle"):
        open_bundles(Checkpoint(src))


def test_a_manifest_of_another_format_is_refused(converted, tmp_path):
    copy = shutil.copytree(converted, tmp_path / "copy")
    path = copy / BUNDLE_DIR / MANIFEST
    data = json.loads(path.read_text())
    data["version"] = 99
    path.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="version"):
        open_bundles(Checkpoint(copy))
