"""Streaming through the real decode loop: a tiny model is forced through chosen token sequences
(the real backend runs and fills its cache; only the logits it returns are pinned to the next
scripted token), so the text, stop strings and finish reasons are checked end to end."""

import asyncio
import threading

import numpy as np
import pytest

import edgellm
from edgellm.errors import EdgeLLMError

TEXTS = {
    "chinese": "我们在边缘设备上运行语言模型，速度很快。",
    "japanese": "こんにちは世界。東京は日本の首都です。",
    "emoji": "Launch 🚀 then ❤️ and 👍🏽, family 👨‍👩‍👧 flag 🇫🇷!",
    "math": "∑ x² + ∫ f(x) dx ≤ √2 · π ≈ 3.14159, α β γ ≠ ±∞",
    "json": '{"name": "edgellm", "tags": ["tiny", "test"], "ok": true, "n": 1.5e-3}',
    "code": "def forward(x):\n\treturn rms_norm(x) * weight  # (seq, hidden)\n",
}


class ForcedLogits:
    """Wraps a backend: runs it for real, but its logits always point at the next scripted token."""

    def __init__(self, backend, script):
        self.backend, self.script, self.step = backend, list(script), 0

    def __getattr__(self, name):
        return getattr(self.backend, name)

    def forward(self, token_ids, all_logits=False):
        logits = self.backend.forward(token_ids, all_logits)
        forced = np.full(logits.shape[-1], -1e9, np.float32)
        forced[self.script[min(self.step, len(self.script) - 1)]] = 0.0
        self.step += 1
        return forced


@pytest.fixture(scope="module")
def model(tiny_llama_bundle):
    with edgellm.load(tiny_llama_bundle, context_length=256) as m:
        yield m


def forced_stream(model, script, **kwargs):
    real = model.generator.backend
    model.generator.backend = ForcedLogits(real, script)
    try:
        return list(model.stream([1, 5, 9], temperature=0, **kwargs))
    finally:
        model.generator.backend = real


def no_partial_characters(chunks):
    for chunk in chunks:
        assert "\ufffd" not in chunk.text
        chunk.text.encode("utf-8", errors="strict")


@pytest.mark.parametrize("kind", sorted(TEXTS))
def test_streamed_chunks_join_to_the_one_shot_decode_and_never_split_a_character(model, kind):
    script = model.encode(TEXTS[kind])
    chunks = forced_stream(model, script, max_tokens=len(script), stop_token_ids=())
    assert "".join(c.text for c in chunks) == model.tokenizer.decode(script) == TEXTS[kind]
    no_partial_characters(chunks)
    assert chunks[-1].finish_reason == "length"
    assert sum(1 for c in chunks if c.token_id is not None) == len(script)


def test_a_character_split_across_tokens_arrives_whole(model):
    script = model.encode("東京")
    assert len(script) > 2  # the tiny vocabulary spells these characters in several byte tokens
    chunks = forced_stream(model, script, max_tokens=len(script), stop_token_ids=())
    assert "".join(c.text for c in chunks) == "東京"
    assert all(c.text in ("", "東", "京", "東京") for c in chunks)  # never a fragment of either
    no_partial_characters(chunks)


def stop_string_of(model, text: str, n_tokens: int) -> tuple[list[int], str, str]:
    """A script for `text` and a stop string covering exactly `n_tokens` of its tokens, from token 3."""
    script = model.encode(text)
    stop = model.tokenizer.decode(script[3 : 3 + n_tokens])
    assert len(model.encode(stop)) >= 1 and stop and stop in text
    return script, stop, text[: text.index(stop)]


@pytest.mark.parametrize("n_tokens", [1, 2, 5])
def test_stop_strings_end_generation_and_never_appear(model, n_tokens):
    script, stop, expected = stop_string_of(
        model, "The quick brown fox jumps over the lazy dog again and again.", n_tokens
    )
    chunks = forced_stream(model, script + [7] * 20, max_tokens=60, stop=[stop], stop_token_ids=())
    text = "".join(c.text for c in chunks)
    assert text == expected
    assert all(stop not in c.text for c in chunks)
    assert chunks[-1].finish_reason == "stop"
    assert chunks[-1].stats.generated_tokens <= 3 + n_tokens


def test_a_stop_string_spanning_multibyte_characters_never_leaks(model):
    text = "价格是 ¥100，然后 🚀 起飞了，好的。"
    chunks = forced_stream(model, model.encode(text), max_tokens=80, stop=["🚀 起"], stop_token_ids=())
    assert "".join(c.text for c in chunks) == "价格是 ¥100，然后 "
    assert chunks[-1].finish_reason == "stop"
    no_partial_characters(chunks)


def test_the_end_of_sequence_token_stops_with_reason_stop_and_is_not_shown(model):
    script = model.encode("Hello world") + [2]  # 2 = <|im_end|>, the tiny model's eos
    chunks = forced_stream(model, script, max_tokens=50)
    assert "".join(c.text for c in chunks) == "Hello world"
    assert chunks[-1].finish_reason == "stop"
    assert chunks[-1].stats.generated_tokens == len(script) - 1


def test_max_tokens_ends_with_reason_length(model):
    chunks = list(model.stream("Hello", max_tokens=5, temperature=0, stop_token_ids=()))
    assert chunks[-1].finish_reason == "length"
    assert chunks[-1].stats.generated_tokens == 5


def test_setting_cancel_ends_with_reason_cancelled_and_keeps_the_text(model):
    cancel = threading.Event()
    seen = []
    for chunk in model.stream("Hello", max_tokens=50, temperature=0, stop_token_ids=(), cancel=cancel):
        seen.append(chunk)
        if len(seen) == 3:
            cancel.set()
    assert seen[-1].finish_reason == "cancelled"
    assert 3 <= seen[-1].stats.generated_tokens <= 4


def test_closing_a_stream_frees_the_model_and_keeps_the_cache_consistent(model):
    first = model.stream("Hello there", max_tokens=50, temperature=0, stop_token_ids=())
    next(first)
    next(first)
    with pytest.raises(EdgeLLMError, match="already generating"):
        next(model.stream("another", max_tokens=2))
    first.close()
    assert model.backend.position == len(model.generator.cached_ids)
    a = model.generate("Hello there", max_tokens=8, temperature=0, stop_token_ids=())
    model.generator.cached_ids.clear()
    model.backend.reset()
    b = model.generate("Hello there", max_tokens=8, temperature=0, stop_token_ids=())
    assert a == b


def test_seeded_sampling_repeats_exactly_and_seeds_differ(model):
    runs = [
        model.generate("Once", max_tokens=20, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=s, stop_token_ids=())
        for s in (3, 3, 4)
    ]
    assert runs[0] == runs[1] != runs[2]


def test_async_stream_yields_the_same_chunks_and_cancels_when_abandoned(model):
    async def collect(limit=None):
        out = []
        async for chunk in model.astream("Hello", max_tokens=12, temperature=0, stop_token_ids=()):
            out.append(chunk)
            if limit and len(out) == limit:
                break
        return out

    sync = list(model.stream("Hello", max_tokens=12, temperature=0, stop_token_ids=()))
    got = asyncio.run(collect())
    assert [c.text for c in got] == [c.text for c in sync]
    asyncio.run(collect(limit=2))  # abandoned early: the model must be free again
    assert model.generate("Hello", max_tokens=3, temperature=0) is not None
