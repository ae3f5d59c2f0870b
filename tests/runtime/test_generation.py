"""Generation loop: sampling reproducibility, stop tokens, KV reuse across turns, bad input."""

from __future__ import annotations

import pytest
import torch

from flashtier.errors import BusyError, ConfigError, InputError
from flashtier.runtime import SamplingConfig
from flashtier.runtime.engine import Model, open_model, parse_bytes
from flashtier.checkpoint.make_model import PRESETS, MakeModelSpec, write_model
from flashtier.runtime.sampling import Sampler


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return Model(write_model(tmp_path_factory.mktemp("m") / "tiny", MakeModelSpec(PRESETS["tiny-llama"], "float32")))


def test_seeded_sampling_is_reproducible(tiny):
    s = SamplingConfig(temperature=1.0, top_p=0.9, top_k=50, seed=1234)
    a = tiny.generate([1, 2, 3], max_new_tokens=20, sampling=s, ignore_eos=True).tokens
    b = tiny.generate([1, 2, 3], max_new_tokens=20, sampling=s, ignore_eos=True).tokens
    c = tiny.generate([1, 2, 3], max_new_tokens=20, sampling=SamplingConfig(1.0, 50, 0.9, seed=99), ignore_eos=True).tokens
    assert a == b
    assert a != c


def test_top_k_one_is_greedy():
    logits = torch.tensor([0.1, 3.0, 2.9, -1.0])
    assert all(Sampler(SamplingConfig(temperature=2.0, top_k=1, seed=i))(logits) == 1 for i in range(20))


def test_top_p_keeps_only_the_nucleus():
    logits = torch.log(torch.tensor([0.6, 0.3, 0.05, 0.05]))
    picks = {Sampler(SamplingConfig(temperature=1.0, top_p=0.8, seed=i))(logits) for i in range(200)}
    assert picks == {0, 1}


def test_stop_token_ends_generation(tiny):
    free = tiny.generate([1, 2, 3], max_new_tokens=12, ignore_eos=True).tokens
    stop = free[4]
    first = free.index(stop)
    tiny_stop = tiny.stop_ids
    tiny.stop_ids = lambda: [stop]  # type: ignore[method-assign]
    try:
        r = tiny.generate([1, 2, 3], max_new_tokens=12)
    finally:
        tiny.stop_ids = tiny_stop  # type: ignore[method-assign]
    assert r.tokens == free[: first + 1] and r.finish_reason == "stop"


def test_continuing_a_conversation_reuses_whole_prefill_chunks(tiny):
    """Only the KV a fresh prefill would compute bit for bit is reused: the prompt's whole prefill
    chunks from position 0 (not its partial last chunk, not the decoded tokens)."""
    model = open_model(tiny.model_dir, prefill_chunk=3)
    first = model.generate([5, 6, 7, 8, 9, 10, 11], max_new_tokens=6, ignore_eos=True)
    follow = [5, 6, 7, 8, 9, 10, 11, *first.tokens, 9, 10]
    again = model.generate(follow, max_new_tokens=6, ignore_eos=True)
    assert again.stats["cached_prompt_tokens"] == 6  # 7 prompt tokens: two whole chunks of 3
    fresh = open_model(tiny.model_dir, prefill_chunk=3).generate(follow, max_new_tokens=6, ignore_eos=True)
    assert fresh.stats["cached_prompt_tokens"] == 0 and again.tokens == fresh.tokens
    same = model.generate(follow, max_new_tokens=6, ignore_eos=True)  # the very prompt again
    assert same.stats["cached_prompt_tokens"] == (len(follow) - 1) // 3 * 3 and same.tokens == fresh.tokens


def test_a_second_generation_while_a_stream_is_open_on_the_thread_is_refused(tiny):
    """Not a hang: the open stream holds the model, and this thread would wait for itself."""
    it = tiny.stream([1, 2, 3], max_new_tokens=20, ignore_eos=True)
    next(it)
    with pytest.raises(BusyError, match="still open on this thread"):
        tiny.generate([1, 2], max_new_tokens=3, ignore_eos=True)
    with pytest.raises(BusyError):
        next(tiny.stream([4, 5], max_new_tokens=3))
    rest = list(it)  # the open stream is unharmed
    assert len(rest) >= 1
    assert len(tiny.generate([1, 2], max_new_tokens=3, ignore_eos=True).tokens) == 3


def test_closing_the_stream_cancels_and_frees_the_model(tiny):
    it = tiny.stream([1, 2, 3], max_new_tokens=50, ignore_eos=True)
    next(it)
    it.close()
    assert len(tiny.generate([1, 2], max_new_tokens=3, ignore_eos=True).tokens) == 3


@pytest.mark.parametrize("prompt, kwargs, match", [
    ([1, 2, 256], {}, "outside the vocabulary"),
    ([-1], {}, "outside the vocabulary"),
    ([], {}, "empty"),
    ([1] * 4000, {"max_new_tokens": 200}, "exceeds the model's context"),
    ([1, 2], {"max_new_tokens": -1}, "max_new_tokens"),
])
def test_bad_requests_are_refused(tiny, prompt, kwargs, match):
    with pytest.raises(InputError, match=match):
        tiny.generate(prompt, **kwargs)


def test_bad_sampling_values_are_refused():
    for kw in ({"temperature": -1}, {"top_p": 0.0}, {"top_p": 1.5}, {"top_k": -2}):
        with pytest.raises(ConfigError):
            SamplingConfig(**kw)


def test_sizes_parse():
    assert parse_bytes("1G") == 1 << 30 and parse_bytes("700M") == 700 << 20 and parse_bytes("512") == 512
    assert parse_bytes("1.5GiB") == 3 << 29
    with pytest.raises(ConfigError, match="size"):
        parse_bytes("lots")
    for bad in ("nan", "inf", "-inf", "1e400", "1e30G", ""):
        with pytest.raises(ConfigError, match="size|finite"):
            parse_bytes(bad)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_corrupted_weight_is_an_error_naming_the_layer_not_an_empty_answer(tmp_path, bad):
    """An original checkpoint carries no checksum: a flipped exponent bit (here a NaN / inf in
    layer 1's attention output projection) must fail the forward, naming the layer."""
    import safetensors.torch as st

    from flashtier.errors import NonFiniteError

    path = write_model(tmp_path / "m", MakeModelSpec(PRESETS["tiny-llama"], "float32"))
    tensors = st.load_file(path / "model.safetensors")
    name = "model.layers.1.self_attn.o_proj.weight"
    tensors[name][3, 5] = bad
    st.save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    for cfg in ({}, {"dram_budget": "1M", "max_context": 64}):  # resident and streamed
        from flashtier.runtime.engine import open_model

        with open_model(path, **cfg) as llm, pytest.raises(NonFiniteError, match="layer 1 produced non-finite"):
            llm.generate([1, 2, 3], max_new_tokens=4, ignore_eos=True)


def test_deferred_finite_checks_name_the_first_failing_layer(tmp_path):
    """On an accelerator the per-layer checks are read once per pass (no host sync per layer):
    forced on the CPU here, a NaN in layer 1 still fails the pass naming layer 1, and a healthy
    model gives the same tokens either way."""
    import safetensors.torch as st

    from flashtier.errors import NonFiniteError
    from flashtier.runtime.engine import open_model

    path = write_model(tmp_path / "m", MakeModelSpec(PRESETS["tiny-llama"], "float32"))
    with open_model(path) as llm:
        want = llm.generate([1, 2, 3], max_new_tokens=6, ignore_eos=True).tokens
        llm.transformer.defer_finite_checks = True
        assert llm.generate([1, 2, 3], max_new_tokens=6, ignore_eos=True).tokens == want
    tensors = st.load_file(path / "model.safetensors")
    tensors["model.layers.1.self_attn.o_proj.weight"][3, 5] = float("nan")
    st.save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    with open_model(path) as llm:
        llm.transformer.defer_finite_checks = True
        with pytest.raises(NonFiniteError, match="layer 1 produced non-finite"):
            llm.generate([1, 2, 3], max_new_tokens=4, ignore_eos=True)
        llm.transformer.defer_finite_checks = None
        with pytest.raises(NonFiniteError, match="layer 1 produced non-finite"):  # and the next pass works as before
            llm.generate([1, 2, 3], max_new_tokens=4, ignore_eos=True)
