"""Selection policies: which positions each keeps, step by step."""

from __future__ import annotations

import pytest
import torch

from flashtier.errors import ConfigError
from flashtier.retrieval import make_policy, policy_names

D = 4


def test_registry() -> None:
    assert policy_names() == ["h2o", "retrieval", "streaming"]
    with pytest.raises(ConfigError, match="unknown selection policy 'snapkv'"):
        make_policy("snapkv", D)
    with pytest.raises(ConfigError, match="bad options"):
        make_policy("h2o", D, budget=3)
    with pytest.raises(ConfigError, match="heavy \\+ recent > 0"):
        make_policy("h2o", D, heavy=0, recent=0)


def test_streaming_keeps_sinks_and_window() -> None:
    policy = make_policy("streaming", D, sink_tokens=2, window=3)
    policy.append(torch.zeros(4, D))
    assert policy.select(torch.zeros(1, D)).tolist() == [0, 1, 2, 3]  # everything still fits
    policy.append(torch.zeros(6, D))  # positions 0..9
    assert policy.select(torch.zeros(1, D)).tolist() == [0, 1, 7, 8, 9]
    policy.observe(torch.tensor([0, 1, 7, 8, 9]), torch.full((1, 5), 0.2))  # attention changes nothing
    policy.append(torch.zeros(1, D))
    assert policy.select(torch.zeros(1, D)).tolist() == [0, 1, 8, 9, 10]


def test_h2o_evicts_lowest_accumulated_attention_outside_recent() -> None:
    policy = make_policy("h2o", D, heavy=2, recent=2)
    policy.append(torch.zeros(4, D))  # cache [0, 1, 2, 3]: at budget, nothing evicted
    assert policy.select(torch.zeros(2, D)).tolist() == [0, 1, 2, 3]
    # two query heads: position 1 is the heavy hitter, then 2, then 0, then 3
    policy.observe(torch.tensor([0, 1, 2, 3]), torch.tensor([[0.1, 0.6, 0.2, 0.1], [0.0, 0.5, 0.4, 0.1]]))
    policy.append(torch.zeros(1, D))  # + 4 -> over budget; recent = [3, 4]; evict lowest of [0, 1, 2] -> 0
    assert policy.select(torch.zeros(2, D)).tolist() == [1, 2, 3, 4]
    policy.observe(torch.tensor([1, 2, 3, 4]), torch.tensor([[0.1, 0.1, 0.1, 0.7], [0.1, 0.1, 0.1, 0.7]]))
    # scores: 1 -> 1.3, 2 -> 0.8, 3 -> 0.4, 4 -> 1.4
    policy.append(torch.zeros(2, D))  # + 5, 6; recent = [5, 6]; keep the 2 best of [1, 2, 3, 4] -> 1, 4
    assert policy.select(torch.zeros(2, D)).tolist() == [1, 4, 5, 6]
    policy.append(torch.zeros(1, D))  # + 7; recent = [6, 7]; candidates 1 (1.3), 4 (1.4), 5 (0) -> evict 5
    assert policy.select(torch.zeros(2, D)).tolist() == [1, 4, 6, 7]


def test_h2o_ties_evict_the_older_position() -> None:
    policy = make_policy("h2o", D, heavy=1, recent=1)
    policy.append(torch.zeros(3, D))  # no attention seen: keep the newest old one (1) and recent (2)
    assert policy.select(torch.zeros(1, D)).tolist() == [1, 2]


def test_retrieval_keeps_sinks_window_and_top_k() -> None:
    policy = make_policy("retrieval", D, sink_tokens=1, window=2, top_k=1, index="flat")
    keys = torch.zeros(8, D)
    keys[3] = torch.tensor([5.0, 0, 0, 0])  # the key the query looks for
    keys[5] = torch.tensor([0, 5.0, 0, 0])
    policy.append(keys[:5])  # positions 0..4: sink 0, window [3, 4], index holds [1, 2]
    assert policy.select(torch.tensor([[1.0, 0, 0, 0]])).tolist() == [0, 1, 3, 4]  # 1 wins ties with 2 (both 0)
    policy.append(keys[5:])  # positions 0..7: window [6, 7], index holds 1..5
    assert policy.select(torch.tensor([[1.0, 0, 0, 0]])).tolist() == [0, 3, 6, 7]
    assert policy.select(torch.tensor([[0, 1.0, 0, 0]])).tolist() == [0, 5, 6, 7]
    both = policy.select(torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0]]))  # a group: union of its top-k
    assert both.tolist() == [0, 3, 5, 6, 7]
    assert policy.last_keys_scanned == 5
