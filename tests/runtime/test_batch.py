"""Offline batched decode (``Model.generate_batch``): one weight fetch per step serves every
sequence, and each sequence's tokens are exactly its tokens alone (batch invariance), resident or
paged, bf16 or quantized, greedy or seeded sampling, with sequences finishing at different steps."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flashtier.errors import InputError
from flashtier.runtime.engine import EngineConfig, Model
from flashtier.runtime.sampling import SamplingConfig

ROOT = Path(__file__).parents[2]
PROMPTS = ["def fib(n):", "import os\n", "class Stack:\n    def push(self, x):", "# sort a list\n", "for i in"]


@pytest.fixture(scope="module")
def gguf(tmp_path_factory):
    out = tmp_path_factory.mktemp("batch") / "tiny-dense.gguf"
    p = subprocess.run([sys.executable, "-m", "flashtier", "quantize", str(ROOT / "models" / "tiny-dense"), str(out),
                        "--type", "q4_k_m"], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    return out


@pytest.mark.parametrize("model, options", [
    ("tiny-moe", {}),
    ("tiny-moe", {"dram_budget": "16M"}),
    ("tiny-dense", {"dram_budget": "12M"}),
    ("tiny-dense", {"compute_dtype": "float32"}),
    ("gguf", {}),
    ("gguf", {"activations": "q8"}),
])
def test_each_sequence_gets_its_tokens_alone(gguf, model, options):
    path = gguf if model == "gguf" else ROOT / "models" / model
    with Model(path, EngineConfig.from_options(kv_sequences=len(PROMPTS), **options)) as llm:  # KV for all five
        alone = [llm.generate(p, max_new_tokens=12, ignore_eos=True).tokens for p in PROMPTS]
        batch = llm.generate_batch(PROMPTS, max_new_tokens=12, ignore_eos=True)
        pair = llm.generate_batch(PROMPTS[1:3], max_new_tokens=12, ignore_eos=True)  # other neighbours
    assert [r.tokens for r in batch] == alone
    assert [r.tokens for r in pair] == alone[1:3]
    assert batch[0].stats["batch_size"] == 5 and batch[0].stats["batch_decode_steps"] == 11


@pytest.mark.parametrize("sequences", [1, 2])
def test_under_a_budget_sequences_share_the_planned_kv_and_wait_for_room(sequences):
    """With a budget the KV of ``kv_sequences`` contexts is planned inside it and every batched
    sequence's blocks come from that one arena of the store: the arena is never over its share
    (checked before and after every step), sequences that do not fit wait and join as others
    finish (in order), each one's tokens are its tokens alone, and finished ones give their blocks
    back at once."""
    from flashtier.runtime.engine import BatchSession
    from flashtier.runtime.kv.cache import KV_BLOCKS_ARENA

    with Model(ROOT / "models" / "tiny-dense", EngineConfig.from_options(dram_budget="12M", kv_sequences=sequences,
                                                                         kv_block_size=16, max_context=32)) as llm:
        alone = [llm.generate(p, max_new_tokens=12, ignore_eos=True).tokens for p in PROMPTS]
        store = llm.weights.store
        seen: list[int] = []
        step = BatchSession.step

        def checked_step(self):
            kv = store.memory_report()["host"][KV_BLOCKS_ARENA]
            assert kv["used_bytes"] <= kv["capacity_bytes"]
            out = step(self)
            seen.append(len([s for s in self.active if not s.finished]))
            store.check_invariants()
            return out

        BatchSession.step = checked_step
        try:
            batch = llm.generate_batch(PROMPTS, max_new_tokens=12, ignore_eos=True)
        finally:
            BatchSession.step = step
        kv = store.memory_report()["host"][KV_BLOCKS_ARENA]
    assert [r.tokens for r in batch] == alone
    c = llm.config  # each sequence <= 29 tokens: two 16-token blocks, a whole 32-token context
    assert kv["capacity_bytes"] == sequences * 32 * c.num_layers * 2 * c.num_kv_heads * c.head_dim * \
        llm.transformer.dtype.itemsize
    assert max(seen) == sequences and batch[0].stats["batch_decode_steps"] > 11  # the others waited
    assert batch[0].stats["batch_waited_for_kv"] == len(PROMPTS) - sequences
    pool = llm.cache.pool  # the model's block pool, fixed at the budget's share
    assert kv["used_bytes"] == pool.num_blocks * pool.block_bytes == kv["capacity_bytes"]
    assert pool.free_blocks == pool.num_blocks - len(llm.cache.block_table)  # finished sequences gave theirs back
    assert (pool.refs >= 0).all()


def test_sampling_with_a_seed_and_early_stops_are_per_sequence():
    sampling = SamplingConfig(temperature=0.9, top_p=0.95, seed=7)
    with Model(ROOT / "models" / "tiny-moe") as llm:
        alone = [llm.generate(p, max_new_tokens=40, sampling=sampling) for p in PROMPTS]
        batch = llm.generate_batch(PROMPTS, max_new_tokens=40, sampling=sampling)
    assert [r.tokens for r in batch] == [r.tokens for r in alone]
    assert [r.finish_reason for r in batch] == [r.finish_reason for r in alone]


def test_the_conversation_cache_is_left_alone():
    with Model(ROOT / "models" / "tiny-moe", EngineConfig(prefill_chunk=2)) as llm:  # chunks of 2: reuse is whole chunks
        prompt = llm.encode(PROMPTS[0])
        first = llm.generate(prompt, max_new_tokens=8, ignore_eos=True)
        llm.generate_batch(PROMPTS[1:], max_new_tokens=4, ignore_eos=True)
        follow = llm.generate(prompt + first.tokens + [10, 11], max_new_tokens=4, ignore_eos=True)
    assert follow.stats["cached_prompt_tokens"] == len(prompt) // 2 * 2 > 0


def test_retrieval_attention_sequences_have_their_own_caches_and_share_the_kv_budget(tmp_path):
    """Long-context batching: each sequence has its own retrieval cache (its index, 1/N of
    --kv-dram-budget), its tokens are its tokens alone, at most N run at once under the budget
    (the third waits), each cache is closed as its sequence finishes (its host arena and spill
    files gone), and the conversation cache comes back empty after the batch. The sequences decoding
    together search their indexes in one native call per layer (the same tokens as alone)."""
    from flashtier.retrieval.attention import RetrievalAttention
    from flashtier.runtime.engine import _RELEASED, BatchSession

    opts = dict(attention="retrieval", window=128, kv_block_size=32, prefill_chunk=64, kv_dram_budget="8600K",
                kv_sequences=2, kv_spill_dir=str(tmp_path))
    prompts = [list(range(1 + 7 * i, 400 + 7 * i)) for i in range(3)]  # > window: blocks demoted and searched
    made, alive, most = [], [0], [0]
    new_cache, release = BatchSession._new_cache, BatchSession._release
    search_many, joint = RetrievalAttention.search_many, []

    def spy_search(self, queries, offloaded, scale):
        found = search_many(self, queries, offloaded, scale)
        joint.append(None if found is None else len(found))
        return found

    def spy_new(self):
        cache = new_cache(self)
        made.append(cache)
        alive[0] += 1
        most[0] = max(most[0], alive[0])
        return cache

    def spy_release(self, seq):
        alive[0] -= seq.cache is not _RELEASED
        release(self, seq)

    with Model(ROOT / "models" / "tiny-moe-16k", EngineConfig.from_options(**opts)) as llm:
        alone = [llm.generate(p, max_new_tokens=8, ignore_eos=True).tokens for p in prompts]
        BatchSession._new_cache, BatchSession._release = spy_new, spy_release
        RetrievalAttention.search_many = spy_search
        try:
            batch = llm.generate_batch(prompts, max_new_tokens=8, ignore_eos=True)
        finally:
            BatchSession._new_cache, BatchSession._release = new_cache, release
            RetrievalAttention.search_many = search_many
        arenas = [a for a in llm.memory_report()["store"]["host"] if a.startswith("kv.")]
        spilled = [p for p in tmp_path.rglob("*") if p.is_file()]
        again = llm.generate(prompts[0], max_new_tokens=8, ignore_eos=True)
    assert [r.tokens for r in batch] == alone and again.tokens == alone[0]
    assert joint and all(n == 2 for n in joint)  # two sequences' searches per call, every call native
    assert len(made) == 3 and most[0] == 2 and batch[0].stats["batch_waited_for_kv"] == 1
    assert all(c.host.budget == (8600 << 10) // 2 and c.counters.searches > 0 for c in made)
    assert all(c.spill.counters.blocks_written > 0 for c in made)  # their share spilled to storage
    assert len(arenas) == 1  # the conversation cache's; the sequences' arenas were removed
    assert again.stats["cached_prompt_tokens"] == 0  # it came back empty
    assert spilled == []  # every sequence's spill files deleted as it finished


def test_a_kv_budget_share_too_small_for_a_prompt_is_one_error_and_the_model_goes_on():
    opts = dict(attention="retrieval", window=128, kv_block_size=32, prefill_chunk=64, kv_dram_budget="6M",
                kv_sequences=2)  # 6M holds one 400-token context's index, 3M does not
    prompts = [list(range(1 + 7 * i, 400 + 7 * i)) for i in range(2)]
    with Model(ROOT / "models" / "tiny-moe-16k", EngineConfig.from_options(**opts)) as llm:
        alone = llm.generate(prompts[0], max_new_tokens=4, ignore_eos=True).tokens
        with pytest.raises(InputError, match=r"prompt 0: host KV budget 3.0 MiB .*each batched sequence gets 1/2"):
            llm.generate_batch(prompts, max_new_tokens=4, ignore_eos=True)
        assert llm.generate(prompts[0], max_new_tokens=4, ignore_eos=True).tokens == alone


@pytest.mark.parametrize("options, prompts, error, message", [
    ({}, [[1, 2], [5, 10**7]], InputError, "prompt 1: .*token id 10000000 is outside the vocabulary"),
    ({"max_context": 32}, ["x" * 200], InputError, "prompt 0"),
])
def test_bad_batches_are_one_error(options, prompts, error, message):
    with Model(ROOT / "models" / "tiny-moe", EngineConfig.from_options(**options)) as llm:
        with pytest.raises(error, match=message):
            llm.generate_batch(prompts, max_new_tokens=8)
        assert llm.generate_batch([], max_new_tokens=8) == []


def test_a_long_prompt_joins_a_chunk_per_step_without_stalling_the_batch():
    """``admit_many(interleave=True)``: the running sequence gets a token every step while the
    joiner's 7 prefill chunks go through, each step one pass over the weights (the joiner's chunk
    and the running row together); both get exactly their tokens alone."""
    from flashtier.runtime.engine import BatchSession

    greedy = SamplingConfig(temperature=0.0)
    with Model(ROOT / "models" / "tiny-moe-16k", EngineConfig(prefill_chunk=16)) as llm:
        short, long = llm.encode(PROMPTS[0]), (llm.encode(PROMPTS[2]) * 12)[:100]
        alone = [llm.generate(ids, max_new_tokens=12, sampling=greedy, ignore_eos=True).tokens for ids in (short, long)]
        got: dict[int, list[int]] = {0: [], 1: []}
        with BatchSession(llm, max_batch=2) as session:
            (first, events), = session.admit_many([(short, 12, greedy, (), True)])
            got[0] += [e.token_id for e in events if e.token_id is not None]
            for _ in range(3):
                for seq, evs in session.step():
                    got[0] += [e.token_id for e in evs if e.token_id is not None]
            (joiner, events), = session.admit_many([(long, 12, greedy, (), True)], interleave=True)
            assert events == [] and session.prefilling == [joiner]
            steps_until_first = passes = 0
            forward_groups = llm.transformer.forward_groups

            def counted(*args, **kwargs):
                nonlocal passes
                passes += 1
                return forward_groups(*args, **kwargs)

            llm.transformer.forward_groups = counted
            while not first.finished or not joiner.finished:
                before = passes
                stepped = dict((id(seq), evs) for seq, evs in session.step())
                assert passes == before + 1
                if not got[1]:
                    steps_until_first += 1
                    if not first.finished:  # the running sequence is served while the joiner prefills
                        assert id(first) in stepped
                for key, seq in ((0, first), (1, joiner)):
                    got[key] += [e.token_id for e in stepped.get(id(seq), []) if e.token_id is not None]
    assert steps_until_first == 7  # 100 prompt tokens in chunks of 16
    assert got[0] == alone[0] and got[1] == alone[1]
    assert joiner.prefilled == len(long) and joiner.stats.generated_tokens == 12


def test_a_request_dropped_while_its_prompt_is_prefilled_leaves_the_others_alone():
    from flashtier.runtime.engine import BatchSession

    greedy = SamplingConfig(temperature=0.0)
    with Model(ROOT / "models" / "tiny-moe-16k", EngineConfig(prefill_chunk=16)) as llm:
        short, long = llm.encode(PROMPTS[1]), (llm.encode(PROMPTS[3]) * 20)[:90]
        alone = llm.generate(short, max_new_tokens=6, sampling=greedy, ignore_eos=True).tokens
        with BatchSession(llm, max_batch=2) as session:
            (a, ev_a), (b, ev_b) = session.admit_many([(short, 6, greedy, (), True), (long, 6, greedy, (), True)],
                                                      interleave=True)
            assert ev_a == ev_b == [] and session.prefilling == [a, b]
            tokens = []
            for seq, events in session.step():  # a's prompt fits one chunk: its first token
                assert seq is a
                tokens += [e.token_id for e in events if e.token_id is not None]
            session.drop(b)  # its client went away mid-prefill
            assert session.prefilling == [] and b.finished
            while not a.finished:
                for seq, events in session.step():
                    assert seq is a
                    tokens += [e.token_id for e in events if e.token_id is not None]
    assert tokens == alone


@pytest.mark.parametrize("interleave", [False, True])
def test_a_shared_prompt_prefix_is_prefilled_once_per_session(interleave):
    """A request whose prompt starts like a running one's copies that KV in whole prefill chunks
    (what prefilling them computes bit for bit) and prefills only the rest: same tokens as alone."""
    from flashtier.runtime.engine import BatchSession

    greedy = SamplingConfig(temperature=0.0)
    with Model(ROOT / "models" / "tiny-moe-16k", EngineConfig(prefill_chunk=16)) as llm:
        system = (llm.encode(PROMPTS[2]) * 5)[:40]
        first, second = system + llm.encode(PROMPTS[0]), system + llm.encode(PROMPTS[4])
        alone = [llm.generate(ids, max_new_tokens=8, sampling=greedy, ignore_eos=True).tokens for ids in (first, second)]
        got: dict[int, list[int]] = {}
        with BatchSession(llm, max_batch=2) as session:
            (a, events), = session.admit_many([(first, 8, greedy, (), True)], interleave=interleave)
            while a.prefilled < len(first):
                session.step()
            (b, events_b), = session.admit_many([(second, 8, greedy, (), True)], interleave=interleave)
            assert b.stats.cached_prompt_tokens == 32  # 40 shared tokens: two whole chunks of 16
            seqs = {id(a): 0, id(b): 1}
            got = {0: [], 1: [e.token_id for e in events_b if e.token_id is not None]}
            if not interleave:
                got[0] = [e.token_id for e in events if e.token_id is not None]
            while not (a.finished and b.finished):
                for seq, evs in session.step():
                    got[seqs[id(seq)]] += [e.token_id for e in evs if e.token_id is not None]
    assert got[1] == alone[1]


def test_blocks_are_shared_and_copied_on_write():
    """Two caches of one pool: the second references the first's full prefix blocks (no copy);
    a write into a shared block copies it first, so the first cache never sees the other's
    writes; dropped caches give their blocks back."""
    import gc

    from flashtier.runtime.kv.cache import BlockKVCache, KVBlockPool, KVCacheConfig

    g = torch.Generator().manual_seed(3)
    pool = KVBlockPool(2, 2, 8, 16, torch.float32)
    a = BlockKVCache(2, 2, 8, torch.float32, KVCacheConfig(16), pool=pool)
    keys, values = torch.randn(2, 2, 40, 8, generator=g), torch.randn(2, 2, 40, 8, generator=g)
    a.reserve(40)
    for layer in range(2):
        a.write(layer, keys[layer], values[layer], 0)
    b = BlockKVCache(2, 2, 8, torch.float32, KVCacheConfig(16), pool=pool)
    assert b.share(a, 39) == 32  # whole blocks only
    assert b.block_table == a.block_table[:2] and (pool.refs[a.block_table[:2]] == 2).all()
    used = pool.num_blocks - pool.free_blocks
    b.truncate(20)  # back into the second shared block, then write there: copy on write
    other = torch.randn(2, 2, 1, 8, generator=g)
    for layer in range(2):
        b.write(layer, other[layer], other[layer], 20)
    assert b.block_table[0] == a.block_table[0] and b.block_table[1] != a.block_table[1]
    assert pool.num_blocks - pool.free_blocks == used + 1
    for layer in range(2):
        k_a, v_a = a.read(layer, 40)
        assert torch.equal(k_a, keys[layer]) and torch.equal(v_a, values[layer])  # untouched by b
        k_b, _ = b.read(layer, 21)
        assert torch.equal(k_b[:, :20], keys[layer][:, :20]) and torch.equal(k_b[:, 20:], other[layer])
    del a, b
    gc.collect()
    assert pool.free_blocks == pool.num_blocks and (pool.refs == 0).all()


def test_a_batch_with_a_common_prefix_holds_it_once():
    """Requests that start with the same prompt prefix (a system prompt) share its blocks in the
    model's pool instead of holding a copy each; every answer equals its answer alone."""
    system = "You are a careful assistant who answers with Python code only. " * 3
    prompts = [system + tail for tail in ("Sort a list.", "Read a file.", "Merge two dicts.")]
    with Model(ROOT / "models" / "tiny-dense", EngineConfig.from_options(dram_budget="12M", kv_sequences=3,
                                                                         kv_block_size=16, prefill_chunk=16,
                                                                         max_context=128)) as llm:
        alone = [llm.generate(p, max_new_tokens=8, ignore_eos=True).tokens for p in prompts]
        from flashtier.runtime.engine import BatchSession

        with BatchSession(llm, 3) as session:
            first = session.admit(llm.encode(prompts[0]), 8, SamplingConfig(), (), True)[0]  # running: a donor
            admitted = session.admit_many([(llm.encode(p), 8, SamplingConfig(), (), True) for p in prompts[1:]])
            seqs = [first] + [r[0] for r in admitted]
            pool = seqs[0].cache.pool
            shared = set(seqs[0].cache.block_table) & set(seqs[1].cache.block_table) & set(seqs[2].cache.block_table)
            assert len(shared) >= 2 and all(pool.refs[b] == 3 for b in shared)
            assert seqs[1].stats.cached_prompt_tokens >= 32
            while session.step():
                pass
        assert [s.text.tokens for s in seqs] == alone


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("t", [1, 17])
def test_attention_over_a_view_or_a_gather_is_the_same(dtype, t):
    """A cache reads blocks that sit in order in the pool as a view and scattered ones as a gathered
    copy; batch invariance needs torch's attention to give the same bits for both (it does: same
    values, same order; this catches a torch that would not)."""
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(t)
    h, group, d, n, nblk, b = 4, 2, 64, 40, 30, 16
    k = torch.randn(h, n, b, d, generator=g).to(dtype)
    v = torch.randn(h, n, b, d, generator=g).to(dtype)
    end = nblk * b - 5
    view_k, view_v = (x[:, 3:3 + nblk].reshape(h, nblk * b, d)[:, :end] for x in (k, v))
    idx = torch.arange(3, 3 + nblk)
    copy_k, copy_v = (x.index_select(1, idx).reshape(h, nblk * b, d)[:, :end] for x in (k, v))
    q = torch.randn(h * group, t, d, generator=g).to(dtype)
    mask = None if t == 1 else torch.arange(end)[None, :] <= torch.arange(end - t, end)[:, None]
    a = F.scaled_dot_product_attention(q[None], view_k[None], view_v[None], attn_mask=mask, scale=d ** -0.5, enable_gqa=True)
    c = F.scaled_dot_product_attention(q[None], copy_k[None], copy_v[None], attn_mask=mask, scale=d ** -0.5, enable_gqa=True)
    assert torch.equal(a, c)


def test_a_prefill_that_fails_gives_back_the_long_context_caches(tmp_path, monkeypatch):
    """A pass that fails while prompts are prefilled (here: an injected error) leaves no cache of
    theirs behind: their caches are closed and the session can admit others."""
    from flashtier.runtime.engine import BatchSession

    opts = dict(attention="retrieval", window=64, kv_block_size=16, prefill_chunk=32, kv_dram_budget="32M",
                kv_sequences=2, kv_spill_dir=str(tmp_path))
    greedy = SamplingConfig(temperature=0.0)
    with Model(ROOT / "models" / "tiny-moe-16k", EngineConfig.from_options(**opts)) as llm:
        prompts = [list(range(1 + i, 150 + i)) for i in range(2)]
        alone = llm.generate(prompts[0], max_new_tokens=4, ignore_eos=True).tokens
        forward = llm.transformer.forward_groups
        with BatchSession(llm, max_batch=2) as session:
            def broken(*args, **kwargs):
                raise RuntimeError("injected")

            monkeypatch.setattr(llm.transformer, "forward_groups", broken)
            with pytest.raises(RuntimeError, match="injected"):
                session.admit_many([(p, 4, greedy, (), True) for p in prompts])
            assert session._held == 0  # both caches closed (their spill files too)
            assert [p for p in tmp_path.rglob("*") if p.is_file()] == []
            monkeypatch.setattr(llm.transformer, "forward_groups", forward)
            (seq, events), = session.admit_many([(prompts[0], 4, greedy, (), True)])
            got = [e.token_id for e in events if e.token_id is not None]
            while not seq.finished:
                for _, evs in session.step():
                    got += [e.token_id for e in evs if e.token_id is not None]
    assert got == alone


def test_kv_blocks_grown_during_a_forward_stay_writable_outside_it():
    """A pool that grows inside a pass (``torch.inference_mode``) keeps normal tensors: writes
    outside a pass (a prompt-cache load, a prefix copy) must not hit "inference tensor" errors."""
    with Model(ROOT / "models" / "tiny-moe", EngineConfig(kv_block_size=16)) as llm:
        cache = llm.transformer.new_cache(16)
        with torch.inference_mode():
            llm.transformer.forward(torch.arange(1, 100), cache, 0)  # 99 positions: the pool grows in the pass
        assert not cache.pool.k[0].is_inference()
        k = torch.ones(cache.num_kv_heads, 4, cache.head_dim, dtype=cache.dtype)
        cache.write(0, k, k, 99)
        assert torch.equal(cache.read(0, 103)[0][:, 99:], k)
