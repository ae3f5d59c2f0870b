"""The sparse FFN accessor: exact with every neuron selected, opt-in only, budgets, stats, faults."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from flashtier.errors import CheckpointError, ConfigError, StorageError
from flashtier.prefetch.sparsity import AllNeurons, PredictorTraining
from flashtier.runtime.calibrate import CalibrationText, calibrate
from flashtier.checkpoint.folder import Checkpoint, layer_names
from flashtier.runtime.engine import EngineConfig, Model, open_model
from flashtier.checkpoint.make_model import PRESETS, MakeModelSpec, write_model
from flashtier.runtime.model import Transformer
from flashtier.runtime.weights.paged import PagedWeights
from flashtier.runtime.planner import PlanRequest, make_plan
from flashtier.runtime.options import SparseFFNConfig
from flashtier.runtime.weights import sparse_ffn as sparse_mod
from flashtier.runtime.weights.sparse_ffn import SparseFFNWeights
from flashtier.runtime.weights.base import InMemoryWeights
from flashtier.checkpoint.bundles import BUNDLE_DIR, convert_bundled

CONTEXT = 64
CONFIG = dict(PRESETS["tiny-llama"], hidden_act="relu", intermediate_size=160, num_hidden_layers=4,
              vocab_size=300, tie_word_embeddings=True)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is fastest on a busy machine
    yield
    torch.set_num_threads(before)


def budget_for(model_dir: Path, resident_ffn_layers: int) -> int:
    """Smallest budget whose plan keeps ``resident_ffn_layers`` FFN layers resident."""
    ckpt = Checkpoint(model_dir)
    sizes = {n: t.nbytes for n, t in ckpt.tensors.items()}

    def resident(b: int) -> int:
        try:
            plan = make_plan(ckpt.config, sizes, PlanRequest(dram_budget=b, context=CONTEXT, kv_dtype_bytes=4,
                                                             streamed_unit="layer"))  # as the sparse FFN plans
        except Exception:
            return -1
        return sum(plan.placement[layer_names(ckpt.config, i).gate] != "storage" for i in range(ckpt.config.num_layers))

    lo, hi = 1 << 16, 4 * sum(sizes.values())
    while hi - lo > 256:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if resident(mid) >= resident_ffn_layers else (mid, hi)
    return hi


def write_tokenizer(out: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=290, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["def f(x):\n    return x + 1\n" * 20], trainer)
    tok.save(str(out / "tokenizer.json"))


@pytest.fixture(scope="module")
def bundled(tmp_path_factory) -> Path:
    """A float32 ReLU model (tied head, like tiny-dense) with bundles, predictors and a tokenizer."""
    src = write_model(tmp_path_factory.mktemp("sparse") / "src", MakeModelSpec(CONFIG, "float32", seed=5))
    out = convert_bundled(src, src.parent / "bundled")
    write_tokenizer(out)
    rng = np.random.default_rng(0)
    calibrate(out, rng.integers(3, 290, 1024).tolist(), PredictorTraining(rank=8, steps=30, batch=256),
              CalibrationText(max_tokens=1024, seq=64))
    return out


def decode_logits(accessor, ckpt: Checkpoint, prompt: list[int], steps: int) -> list[torch.Tensor]:
    """Logits of a prefill of ``prompt`` then ``steps`` greedy single-token passes."""
    tf = Transformer(ckpt.config, accessor, set(ckpt.tensors))
    cache = tf.new_cache(16)
    logits = [tf.forward(torch.tensor(prompt), cache, 0)]
    pos = len(prompt)
    for _ in range(steps):
        tok = int(logits[-1][0].argmax())
        logits.append(tf.forward(torch.tensor([tok]), cache, pos))
        pos += 1
    return logits


def test_with_every_neuron_selected_the_output_equals_the_dense_output(bundled):
    ckpt = Checkpoint(bundled)
    budget = budget_for(bundled, 2)  # FFN layers 2 and 3 stream
    ref = decode_logits(InMemoryWeights(ckpt), ckpt, list(range(3, 23)), 12)
    sparse_layers = [2, 3]
    acc = SparseFFNWeights(ckpt, budget, kv_tokens=CONTEXT, config=SparseFFNConfig(window_k=2),
                           selectors={i: AllNeurons(CONFIG["intermediate_size"]) for i in sparse_layers})
    try:
        assert sorted(acc.layers) == sparse_layers
        got = decode_logits(acc, ckpt, list(range(3, 23)), 12)
        stats = acc.stats()
    finally:
        acc.close()
    for a, b in zip(got, ref):  # prefill (chunked exact) and every decode step
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert stats["ffn_neurons_computed_fraction"] == 1.0
    # the windows hold what the budget allows; the rest of each token's neurons streamed through
    caps = acc.capacities
    assert all(0 < c < CONFIG["intermediate_size"] for c in caps.values())
    assert stats["ffn_neurons_overflow"] == 12 * sum(CONFIG["intermediate_size"] - c for c in caps.values())


def test_sparse_generation_reports_its_statistics(bundled):
    budget = budget_for(bundled, 1)
    with open_model(bundled, dram_budget=budget, max_context=CONTEXT, kv_block_size=16, sparse_ffn=True,
                    sparse_ffn_window_k=2, sparse_ffn_audit=True) as llm:
        assert isinstance(llm.weights, SparseFFNWeights)
        stats = llm.generate(list(range(3, 20)), max_new_tokens=12, ignore_eos=True).stats
    assert stats["sparse_ffn_layers"] == [1, 2, 3] and stats["window_k"] == 2
    assert stats["decode_tokens_counted"] == 11  # the first token comes from the prefill pass
    assert stats["bytes_read_storage"] > 0 and 0 < stats["bytes_per_token_storage"]
    assert 0 < stats["ffn_neurons_loaded_fraction"] <= stats["ffn_neurons_computed_fraction"] <= 1
    assert 0 < stats["predictor_recall"] <= 1
    assert stats["predictor_recall_source"] == "audit"
    json.dumps(stats)


def test_recall_comes_from_calibration_without_audit(bundled):
    with open_model(bundled, dram_budget=budget_for(bundled, 1), max_context=CONTEXT, sparse_ffn=True) as llm:
        stats = llm.generate([5, 6, 7], max_new_tokens=3, ignore_eos=True).stats
    assert stats["predictor_recall_source"] == "calibration" and 0 < stats["predictor_recall"] <= 1


def test_the_budget_pays_for_resident_weights_windows_and_predictors(bundled):
    ckpt = Checkpoint(bundled)
    budget = budget_for(bundled, 1)
    acc = SparseFFNWeights(ckpt, budget, kv_tokens=CONTEXT)
    try:
        plan = acc.paged.plan
        store_window = plan.stream_window_bytes - acc.paged.external_window_bytes
        kv = sum(plan.kv_bytes.values())
        assert plan.resident_bytes["host"] + store_window + acc.memory_bytes + kv <= budget
        assert max(acc.capacities.values()) < CONFIG["intermediate_size"]  # the budget, not the layer, sets it
        # the windows and chunk buffers are working pages of one arena of the weights' store
        windows = acc.paged.store.memory_report()["host"]["ffn_windows"]
        assert windows["pages"] == len(acc.layers) + 2 and windows["used_bytes"] == windows["capacity_bytes"]
        assert acc.memory_bytes - windows["used_bytes"] == sum(getattr(sl.selector, "nbytes", 0) for sl in acc.layers.values())
        for sl in acc.layers.values():  # each window is the store's memory (rows land in place)
            page = acc.paged.store.location(("ffn_window", sl.layer))
            assert page.resident and page.tier == "host"
    finally:
        acc.close()


def test_window_rows_follow_each_layers_demand():
    from flashtier.runtime.weights.sparse_ffn import split_rows

    assert split_rows(100, {2: 0.1, 3: 0.3}, 1000) == {2: 25, 3: 75}
    assert split_rows(100, {2: 0.1, 3: 0.9}, 60) == {2: 40, 3: 60}  # 3 is capped: 2 gets the rest
    equal = split_rows(10, {2: 1.0, 3: 1.0, 4: 1.0}, 100)
    assert sum(equal.values()) == 10 and set(equal.values()) == {3, 4}


def test_without_the_flag_the_engine_stays_exact(bundled):
    ref = Model(bundled).generate([4, 5, 6], max_new_tokens=8, ignore_eos=True).tokens
    with Model(bundled, EngineConfig(dram_budget=budget_for(bundled, 1), max_context=CONTEXT)) as llm:
        assert isinstance(llm.weights, PagedWeights)
        assert llm.generate([4, 5, 6], max_new_tokens=8, ignore_eos=True).tokens == ref


def test_sparse_ffn_needs_a_budget(bundled):
    with pytest.raises(ConfigError, match="--dram-budget"):
        open_model(bundled, sparse_ffn=True)


def test_a_non_relu_model_is_refused(tmp_path):
    src = write_model(tmp_path / "silu", MakeModelSpec({**CONFIG, "hidden_act": "silu"}, "float32"))
    with pytest.raises(ConfigError, match="ReLU"):
        open_model(src, dram_budget=budget_for(src, 1), max_context=CONTEXT, sparse_ffn=True)


def test_missing_bundles_or_predictors_say_what_to_run(bundled, tmp_path):
    with pytest.raises(CheckpointError, match="--bundle"):
        open_model(bundled.parent / "src", dram_budget=budget_for(bundled, 1), max_context=CONTEXT, sparse_ffn=True)
    no_pred = convert_bundled(bundled.parent / "src", tmp_path / "nopred")
    with pytest.raises(CheckpointError, match="flashtier calibrate"):
        open_model(no_pred, dram_budget=budget_for(bundled, 1), max_context=CONTEXT, sparse_ffn=True)


def test_a_failed_bundle_read_fails_the_pass_and_the_next_one_recovers(bundled, tmp_path):
    import shutil

    copy = Path(shutil.copytree(bundled, tmp_path / "copy"))
    target = copy / BUNDLE_DIR / "layer_003.bin"
    good = target.read_bytes()
    with open_model(copy, dram_budget=budget_for(copy, 1), max_context=CONTEXT, sparse_ffn=True,
                    sparse_ffn_window_k=1) as llm:
        expected = llm.generate([7, 8, 9], max_new_tokens=6, ignore_eos=True).tokens
        os.truncate(target, 512)
        with pytest.raises(StorageError, match="layer_003.bin"):
            llm.generate([7, 8, 9], max_new_tokens=6, ignore_eos=True)
        target.write_bytes(good)
        assert llm.generate([7, 8, 9], max_new_tokens=6, ignore_eos=True).tokens == expected


def test_cli_calibrate_then_generate_sparse(bundled, tmp_path, capsys):
    from flashtier.apps.cli import main

    text = tmp_path / "calib.txt"
    text.write_text("def f(x):\n    return x + 1\n" * 200)
    assert main(["calibrate", str(bundled), "--text", str(text), "--rank", "4", "--steps", "5",
                 "--max-tokens", "256", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report["layers"]) == {"0", "1", "2", "3"}
    assert main(["generate", str(bundled), "--prompt-ids", "5,6,7", "--max-new-tokens", "4", "--greedy",
                 "--ignore-eos", "--json", "--dram-budget", str(budget_for(bundled, 1)), "--max-context",
                 str(CONTEXT), "--sparse-ffn", "--window-k", "3"]) == 0
    stats = json.loads(capsys.readouterr().out)["stats"]
    for key in ("bytes_per_token_storage", "ffn_neurons_loaded_fraction", "predictor_recall", "bytes_read_storage"):
        assert key in stats
    assert stats["window_k"] == 3
    assert main(["generate", str(bundled), "--prompt-ids", "5", "--window-k", "3"]) == 1  # needs --sparse-ffn


# ---------------------------------------------------------------- several sequences in one pass

def _prefilled(tf: Transformer, prompts: list[list[int]]) -> tuple[list, list[int]]:
    """A fresh cache per prompt, prefilled; each prompt's greedy first token."""
    caches = [tf.new_cache(16) for _ in prompts]
    firsts = [int(tf.forward(torch.tensor(p), c, 0)[0].argmax()) for p, c in zip(prompts, caches)]
    return caches, firsts


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("capacity,chunk", [(1.0, 64), (0.2, 16)])
def test_a_rows_logits_do_not_depend_on_the_batch_or_on_earlier_tokens(bundled, dtype, capacity, chunk, native):
    """Bitwise: each decode row alone (the windows holding what earlier rows left) equals the same
    row in batches of 1-5 sequences, with windows roomy or too small for the union (overflow read
    into the chunk buffer) and selections spanning one or several chunks."""
    if native and sparse_mod._native_rows is None:
        pytest.skip("the C extension is not built")
    ckpt = Checkpoint(bundled)
    config = SparseFFNConfig(window_k=2, max_capacity_fraction=capacity, prefill_chunk_neurons=chunk, native=native)
    acc = SparseFFNWeights(ckpt, budget_for(bundled, 1), compute_dtype=dtype, kv_tokens=CONTEXT, config=config)
    try:
        tf = Transformer(ckpt.config, acc, set(ckpt.tensors))
        prompts = [list(range(3 + 7 * b, 14 + 7 * b)) for b in range(5)]
        caches, firsts = _prefilled(tf, prompts)
        alone = [tf.forward(torch.tensor([t]), c, len(p)) for t, c, p in zip(firsts, caches, prompts)]
        for size in (1, 2, 5):
            rows = list(range(5))[-size:]  # a different window history each time
            caches, _ = _prefilled(tf, [prompts[b] for b in rows])
            got = tf.forward_groups([torch.tensor([firsts[b]]) for b in rows], caches, [len(prompts[b]) for b in rows])
            for b, logits in zip(rows, got):
                assert torch.equal(logits, alone[b]), (size, b)
        stats = acc.stats()
    finally:
        acc.close()
    if capacity < 1.0:
        assert stats["ffn_neurons_overflow"] > 0  # the small windows took the overflow path
    assert 0 < stats["ffn_neurons_computed_fraction"] < 1


@pytest.mark.parametrize("native", [True, False])
def test_a_batch_reads_each_bundle_once_for_all_its_rows(bundled, native):
    """Rows share the window's reads (their union is read once). What the union holds beyond the
    window's room (overflow: this budget's windows hold a fraction of a layer) is read once for the
    batch by the native kernel's path, once per row by the torch path."""
    if native and sparse_mod._native_rows is None:
        pytest.skip("the C extension is not built")
    ckpt = Checkpoint(bundled)
    acc = SparseFFNWeights(ckpt, budget_for(bundled, 1), kv_tokens=CONTEXT,
                           config=SparseFFNConfig(window_k=2, native=native))
    try:
        tf = Transformer(ckpt.config, acc, set(ckpt.tensors))
        prompt = list(range(5, 17))

        def step(rows: int) -> tuple[int, int]:
            """Bundle bytes read by one decode step of ``rows`` equal rows, and their overflow."""
            caches, firsts = _prefilled(tf, [prompt] * rows)
            acc.abort()  # empty windows: the step reads everything it needs

            def bundle_bytes() -> tuple[int, int]:  # every byte read, less the dense weights' (embedding rows)
                s = acc.stats()
                return s["bytes_read_storage"] - acc.paged.stats()["bytes_read_storage"], s["ffn_neurons_overflow"]

            before = bundle_bytes()
            tf.forward_groups([torch.tensor([firsts[0]])] * rows, caches, [len(prompt)] * rows)
            after = bundle_bytes()
            return after[0] - before[0], after[1] - before[1]

        (one, over), (three, over3) = step(1), step(3)
        row = acc.reader.row_bytes
        if native:
            assert over > 0 and over3 == over and three == one  # every bundle once for the batch
        else:
            assert over > 0 and over3 == 3 * over
            assert three - over3 * row == one - over * row > 0  # the window's part: read once for the batch
        assert acc.stats()["decode_tokens_counted"] == 4  # one row, then three
    finally:
        acc.close()


def test_generate_batch_runs_the_sparse_ffn_each_prompt_as_alone(bundled):
    prompts = [[5, 6, 7], [40, 41, 42, 43, 44], [9] * 20]
    options = dict(max_context=CONTEXT, kv_block_size=16, sparse_ffn=True, sparse_ffn_window_k=2)
    budget = budget_for(bundled, 1)
    kv_per_sequence = 2 * CONFIG["num_hidden_layers"] * CONFIG["num_key_value_heads"] * \
        (CONFIG["hidden_size"] // CONFIG["num_attention_heads"]) * CONTEXT * 4  # K and V, fp32
    with open_model(bundled, kv_sequences=len(prompts), dram_budget=budget + 2 * kv_per_sequence, **options) as llm:
        batch = llm.generate_batch(prompts, max_new_tokens=8, ignore_eos=True)
        stats = llm.weights.stats()
    with open_model(bundled, dram_budget=budget, **options) as llm:  # alone, in reverse order
        alone = [llm.generate(p, max_new_tokens=8, ignore_eos=True).tokens for p in reversed(prompts)][::-1]
    assert [r.tokens for r in batch] == alone
    assert stats["decode_tokens_counted"] >= len(prompts) * 6


def test_prompts_prefilled_in_one_pass_read_the_layer_once_and_equal_their_prefill_alone(bundled):
    ckpt = Checkpoint(bundled)
    acc = SparseFFNWeights(ckpt, budget_for(bundled, 1), kv_tokens=CONTEXT, config=SparseFFNConfig(window_k=2))
    try:
        tf = Transformer(ckpt.config, acc, set(ckpt.tensors))
        prompts = [list(range(3, 20)), list(range(40, 49))]

        def bundle_bytes() -> int:
            return acc.stats()["bytes_read_storage"] - acc.paged.stats()["bytes_read_storage"]

        alone, read_alone = [], []
        for p in prompts:
            before = bundle_bytes()
            alone.append(tf.forward(torch.tensor(p), tf.new_cache(16), 0))
            read_alone.append(bundle_bytes() - before)
        before = bundle_bytes()
        together = tf.forward_groups([torch.tensor(p) for p in prompts], [tf.new_cache(16) for _ in prompts], [0, 0])
        assert bundle_bytes() - before == read_alone[0] == read_alone[1] > 0  # every bundle once for both
        for a, b in zip(alone, together):
            assert torch.equal(a, b)
        assert acc.stats()["decode_tokens_counted"] == 0  # prompt passes are not decode tokens
    finally:
        acc.close()
