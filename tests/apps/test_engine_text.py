"""Text streaming of the engine on a model with a real tokenizer: every token id is reported."""

from __future__ import annotations

from flashtier.runtime import SamplingConfig, open_model


def test_every_generated_token_is_reported_even_when_its_text_is_held_back(chat_model_dir):
    with open_model(chat_model_dir) as llm:
        for seed in range(3):
            r = llm.generate("def f(x):", max_new_tokens=40, ignore_eos=True,
                             sampling=SamplingConfig(temperature=1.0, seed=seed), stop=["\n\n"])
            assert len(r.tokens) == r.stats["generated_tokens"]
            assert "\n\n" not in r.text
        free = llm.generate("def f(x):", max_new_tokens=40, ignore_eos=True, sampling=SamplingConfig(temperature=1.0, seed=7))
        assert len(free.tokens) == free.stats["generated_tokens"] == 40
        assert free.text == llm.tokenizer.decode(free.tokens)
