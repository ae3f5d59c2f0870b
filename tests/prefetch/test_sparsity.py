"""Low-rank activation predictors: training reaches its recall target, thresholds, save / load."""

from __future__ import annotations

import pytest
import torch

from flashtier.errors import CheckpointError, ConfigError
from flashtier.prefetch.sparsity import (
    AllNeurons,
    LowRankPredictor,
    PredictorSet,
    PredictorTraining,
    threshold_for_recall,
    train_layer,
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # small matrices: one thread is fastest on a busy machine
    yield
    torch.set_num_threads(before)


def synthetic(n=1500, h=32, i=96, rank=6, seed=0):
    """Inputs near a low-rank subspace (as FFN inputs are), with a mean, and a random gate."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(rank, h, generator=g)
    x = torch.randn(n, rank, generator=g) @ basis + 0.05 * torch.randn(n, h, generator=g) + torch.randn(h, generator=g)
    w = torch.randn(i, h, generator=g) / h**0.5
    return x, w


def test_threshold_for_recall_keeps_the_asked_share_of_positives():
    s = torch.arange(10.0)
    y = torch.tensor([0, 1, 0, 1, 1, 1, 1, 1, 1, 1], dtype=torch.bool)  # 8 positives
    t = threshold_for_recall(s, y, 0.75)  # 2 positives may fall below: scores 1, 3
    assert ((s > t) & y).sum() == 6
    assert ((s > threshold_for_recall(s, y, 1.0)) & y).sum() == 8


def test_training_reaches_the_target_recall_and_beats_reading_everything():
    x, w = synthetic()
    pred = train_layer(x, w, PredictorTraining(rank=8, steps=40, batch=256, target_recall=0.95))
    m = pred.metrics
    assert m["recall"] >= 0.94
    assert m["predicted_fraction"] < 0.9  # it does not just name every neuron
    assert pred.a.shape == (32, 8) and pred.b.shape == (8, 96)
    sel = pred.select(x[:1])
    assert len(set(sel.tolist())) == len(sel)
    scores = pred.scores(x[:1])[0]
    assert torch.all(scores[torch.as_tensor(sel)][:-1] >= scores[torch.as_tensor(sel)][1:])  # best first


def test_lower_threshold_reads_more():
    x, w = synthetic()
    pred = train_layer(x, w, PredictorTraining(rank=8, steps=0, target_recall=0.9))
    assert len(pred.select(x[:1], -2.0)) >= len(pred.select(x[:1])) >= len(pred.select(x[:1], 2.0))


def test_all_neurons_names_every_neuron():
    assert AllNeurons(7).select(torch.zeros(1, 4)).tolist() == list(range(7))


def test_save_load_round_trip_and_refusal_for_another_model(tmp_path):
    x, w = synthetic(n=400)
    pred = train_layer(x, w, PredictorTraining(rank=4, steps=0))
    fp = {"config_sha256": "abc", "tensor_probe_crc32": {"t": 1}}
    PredictorSet({3: pred}, fp, PredictorTraining(rank=4, steps=0)).save(tmp_path)
    back = PredictorSet.load(tmp_path, fp)
    assert torch.equal(back.layers[3].a, pred.a) and back.layers[3].threshold == pred.threshold
    assert back.layers[3].metrics["recall"] == pred.metrics["recall"]
    with pytest.raises(CheckpointError, match="another model"):
        PredictorSet.load(tmp_path, {**fp, "config_sha256": "other"})
    with pytest.raises(CheckpointError, match="flashtier calibrate"):
        PredictorSet.load(tmp_path / "nowhere", fp)


def test_cast_keeps_the_selection_close():
    x, w = synthetic(n=600)
    pred = train_layer(x, w, PredictorTraining(rank=8, steps=0))
    half = pred.cast(torch.bfloat16)
    assert half.nbytes * 2 == pred.nbytes
    a, b = set(pred.select(x[:1]).tolist()), set(half.select(x[:1]).tolist())
    assert len(a ^ b) <= max(2, len(a) // 10)


def test_training_config_is_validated():
    with pytest.raises(ConfigError, match="rank"):
        PredictorTraining(rank=0)
    with pytest.raises(ConfigError, match="target_recall"):
        PredictorTraining(target_recall=0.0)


def test_predictor_scores_have_shapes():
    p = LowRankPredictor(torch.zeros(4, 2), torch.zeros(2, 6), torch.arange(6.0), 2.5)
    assert p.scores(torch.zeros(3, 4)).shape == (3, 6)
    assert p.select(torch.zeros(1, 4)).tolist() == [5, 4, 3]


def test_a_flipped_bit_or_a_cut_in_the_predictor_file_is_refused(tmp_path):
    """Every byte of the predictor file is under its crc32: a flip in a tensor or in a threshold
    is an IntegrityError, a cut file one CheckpointError; never predictors that select wrongly."""
    import random

    from flashtier.errors import IntegrityError
    from flashtier.prefetch.sparsity import PREDICTOR_FILE

    x, w = synthetic(n=400)
    pred = train_layer(x, w, PredictorTraining(rank=4, steps=0))
    fp = {"config_sha256": "abc", "tensor_probe_crc32": {"t": 1}}
    path = PredictorSet({3: pred}, fp, PredictorTraining(rank=4, steps=0)).save(tmp_path)
    good = path.read_bytes()
    header_len = int.from_bytes(good[:8], "little")
    rng = random.Random(0)
    data_offsets = [8 + header_len + rng.randrange(len(good) - 8 - header_len) for _ in range(4)]
    threshold_at = good.index(repr(pred.threshold).encode(), 8)  # a digit of the threshold in the JSON header
    for offset in data_offsets + [threshold_at + 2]:
        bad = bytearray(good)
        bad[offset] ^= 1 << rng.randrange(8) if offset != threshold_at + 2 else 0x01  # '3' <-> '2' etc.
        path.write_bytes(bytes(bad))
        with pytest.raises((IntegrityError, CheckpointError), match=f"{PREDICTOR_FILE}.*(checksum mismatch|unreadable)"):
            PredictorSet.load(tmp_path, fp)
    path.write_bytes(good[: len(good) // 2])
    with pytest.raises(CheckpointError, match="unreadable predictor file.*flashtier calibrate"):
        PredictorSet.load(tmp_path, fp)
    path.write_bytes(good)
    assert torch.equal(PredictorSet.load(tmp_path, fp).layers[3].b, pred.b)
