"""TextStream: chunk by chunk, the same text as a one-shot decode, cut before the first stop string.

Two real tokenizers: SmolLM2's byte-level BPE (a CJK character or an emoji is split across
tokens) and a frozen SentencePiece vocabulary of 600 tokens (almost every non-Latin character
falls back to `<0x..>` byte tokens, and the first token loses its "▁" space).
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
from tokenizers import Tokenizer

from edgellm.errors import InvalidSettingError
from edgellm.export.sources.gguf_tokenizer import tokenizer_from_gguf_metadata
from edgellm.generate.streaming import TextStream

FIXTURES = Path(__file__).parent / "fixtures"
REPLACEMENT = "\ufffd"


@pytest.fixture(scope="module")
def smollm(smollm2_gguf_metadata) -> Tokenizer:
    spec = tokenizer_from_gguf_metadata(smollm2_gguf_metadata)
    return Tokenizer.from_str(spec.tokenizer_json)


@pytest.fixture(scope="module")
def spm() -> Tokenizer:
    record = json.loads((FIXTURES / "llamacpp_tokens.json").read_text(encoding="utf-8"))
    spec = tokenizer_from_gguf_metadata(record["tokenizers"]["spm"]["metadata"])
    return Tokenizer.from_str(spec.tokenizer_json)


@pytest.fixture(params=["smollm", "spm"])
def tokenizer(request) -> Tokenizer:
    return request.getfixturevalue(request.param)


def run(tokenizer: Tokenizer, ids: list[int], stops=(), skip_special_tokens=True):
    """Push ids until the stream stops; returns (chunks incl. flush, stream, ids consumed)."""
    stream = TextStream(tokenizer, stops, skip_special_tokens=skip_special_tokens)
    chunks, consumed = [], 0
    for token_id in ids:
        chunks.append(stream.push(token_id))
        consumed += 1
        if stream.stopped:
            break
    chunks.append(stream.flush())
    assert stream.text == "".join(chunks)
    return chunks, stream, consumed


def truncate_at_first_stop(text: str, stops) -> str:
    starts = [text.find(stop) for stop in stops if stop in text]
    return text[: min(starts)] if starts else text


def assert_every_chunk_is_whole_text(chunks: list[str], one_shot: str) -> None:
    """Each chunk is valid UTF-8 on its own and has U+FFFD only where the one-shot decode has it."""
    at = 0
    for chunk in chunks:
        assert chunk.encode("utf-8").decode("utf-8", errors="strict") == chunk
        for offset, char in enumerate(chunk):
            if char == REPLACEMENT:
                assert one_shot[at + offset] == REPLACEMENT, f"U+FFFD at {at + offset} in chunk {chunk!r}"
        at += len(chunk)


def tokens_spanned(tokenizer: Tokenizer, text: str, part: str) -> list[str]:
    """The tokens of `text` that overlap the first occurrence of `part`."""
    start = text.index(part)
    end = start + len(part)
    encoding = tokenizer.encode(text)
    return [token for token, (a, b) in zip(encoding.tokens, encoding.offsets, strict=True) if a < end and b > start]


TEXTS = {
    "chinese": "人工智能正在改变世界，边缘设备上的语言模型越来越重要。",
    "japanese": "東京は日本の首都です。ひらがなとカタカナ、そして漢字。",
    "korean": "안녕하세요, 세계! 한국어 토큰화 테스트입니다.",
    "emoji": "emoji 😀🎉🚀 thumbs 👍🏽👋🏿 family 👨‍👩‍👧‍👦 rainbow 🏳️‍🌈 flags 🇫🇷🇯🇵🇧🇷 keycap 1️⃣ ❤️",
    "math": "∀x ∈ ℝ: x² ≥ 0, ∑ᵢ aᵢ ≈ ∫₀^∞ f(x) dx, √2 ≠ π, a ≤ b ⇒ α→β, ∂f/∂x ∇·E = ρ/ε₀",
    "json": '{"name": "edgellm", "tags": ["小", "🚀"], "ok": true, "ratio": 0.75, "nested": {"a": [1, 2, null]}}',
    "code": "def fib(n: int) -> int:\n    if n < 2:\n        return n\n\treturn fib(n - 1) + fib(n - 2)  # tab\n\n"
    '\t\tprint("∑")\n',
    "mixed": '  Crème brûlée → 東京 🍣, ½ ≈ 0.5; {"k": "한"}\n\tend 👨🏽‍💻',
}


# --- whole characters: chunks joined equal a one-shot decode ---------------------------------


@pytest.mark.parametrize("name", TEXTS)
def test_chunks_joined_equal_the_one_shot_decode_and_each_chunk_is_whole_text(tokenizer, name):
    ids = tokenizer.encode(TEXTS[name]).ids
    chunks, stream, _ = run(tokenizer, ids)
    one_shot = tokenizer.decode(ids)
    assert "".join(chunks) == one_shot
    assert REPLACEMENT not in one_shot and not stream.stopped
    assert_every_chunk_is_whole_text(chunks, one_shot)


def test_the_texts_really_split_characters_across_tokens(smollm, spm):
    """Without this, the test above could pass with a stream that holds nothing back."""
    for name in ("chinese", "japanese", "korean", "emoji", "math"):
        ids = smollm.encode(TEXTS[name]).ids
        assert any(REPLACEMENT in smollm.decode([token_id]) for token_id in ids), name
        assert any(token.startswith("<0x") for token in spm.encode(TEXTS[name]).tokens), name


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_special_tokens_are_skipped_or_kept_as_a_one_shot_decode_does(smollm, skip_special_tokens):
    ids = smollm.encode("<|im_start|>assistant\n東京 🚀<|im_end|>\n<|endoftext|>").ids
    chunks, _, _ = run(smollm, ids, skip_special_tokens=skip_special_tokens)
    assert "".join(chunks) == smollm.decode(ids, skip_special_tokens=skip_special_tokens)
    assert ("<|im_end|>" in "".join(chunks)) is not skip_special_tokens


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_a_special_token_inside_a_byte_run_is_decoded_as_a_one_shot_decode_does(spm, skip_special_tokens):
    byte = lambda value: spm.token_to_id(f"<0x{value:02X}>")  # noqa: E731
    ids = [byte(0xE3), spm.token_to_id("<s>"), byte(0x81), byte(0x82), spm.token_to_id("▁a")]
    chunks, _, _ = run(spm, ids, skip_special_tokens=skip_special_tokens)
    one_shot = spm.decode(ids, skip_special_tokens=skip_special_tokens)
    assert one_shot == ("あ a" if skip_special_tokens else "�<s>�� a")
    assert "".join(chunks) == one_shot


def test_only_the_first_sentencepiece_token_loses_its_space(spm):
    ids = spm.encode("Hello world").ids
    assert spm.encode("Hello world").tokens[:2] == ["▁H", "e"]
    chunks, _, _ = run(spm, ids)
    assert chunks[0] == "H" and " w" in chunks and "".join(chunks) == "Hello world"


@pytest.mark.parametrize("text", ["  two leading spaces", " one", "a\n\n  b", "▁ literal"])
def test_leading_spaces_come_out_as_in_a_one_shot_sentencepiece_decode(spm, text):
    ids = spm.encode(text).ids
    assert "".join(run(spm, ids)[0]) == spm.decode(ids)


def test_a_token_that_decodes_to_nothing_does_not_cost_the_next_token_its_space():
    """Text is released only when it grows, so the decode window never starts at such a token
    (decoded alone after it, "▁b" would lose its space as if it started the output)."""
    from tokenizers import decoders, models

    tokenizer = Tokenizer(models.BPE({"▁a": 0, "": 1, "▁b": 2}, [], byte_fallback=True))
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    stream = TextStream(tokenizer)
    assert [stream.push(token_id) for token_id in (0, 1, 2)] == ["a", "", " b"]
    assert stream.text == tokenizer.decode([0, 1, 2]) == "a b"


def test_byte_fallback_tokens_stream_whole_characters(spm):
    text = "Hello 🚀 東京 world"
    encoding = spm.encode(text)
    assert encoding.tokens[5:9] == ["<0xF0>", "<0x9F>", "<0x9A>", "<0x80>"]
    stream = TextStream(spm)
    chunks = [stream.push(token_id) for token_id in encoding.ids] + [stream.flush()]
    assert "".join(chunks) == text
    # the byte tokens are held, and the token that ends the run releases the whole character
    assert chunks[5:10] == ["", "", "", "", "🚀 "]
    assert_every_chunk_is_whole_text(chunks, text)


def test_a_character_split_across_tokens_is_held_back_until_it_completes(smollm):
    ids = smollm.encode("東").ids
    assert len(ids) == 2 and smollm.decode(ids[:1]) == REPLACEMENT
    stream = TextStream(smollm)
    assert stream.push(ids[0]) == ""
    assert stream.push(ids[1]) == "東"


def test_flush_releases_a_trailing_incomplete_character_as_a_one_shot_decode_does(smollm):
    ids = smollm.encode("ok 東").ids[:-1]
    stream = TextStream(smollm)
    assert "".join(stream.push(token_id) for token_id in ids) == "ok"
    assert stream.flush() == " " + REPLACEMENT == smollm.decode(ids)[2:]
    assert stream.flush() == ""


@pytest.mark.parametrize(
    "byte_values, expected",
    [
        ([0x41, 0xE3], "��"),  # tokenizers replaces the whole run, even its valid "A"
        ([0xE3, 0x81, 0x82, 0xE3], "����"),
        ([0xE3, 0x81, 0x82], "あ"),
        ([0x81], "�"),
    ],
)
def test_a_byte_fallback_run_ending_mid_character_decodes_as_a_one_shot_decode_does(spm, byte_values, expected):
    ids = [spm.token_to_id(f"<0x{value:02X}>") for value in byte_values]
    assert spm.decode(ids) == expected
    chunks, _, _ = run(spm, ids)
    assert "".join(chunks) == expected
    chunks, _, _ = run(spm, ids + spm.encode("ok").ids)  # the run ends at a normal token
    assert "".join(chunks) == expected + " ok" == spm.decode(ids + spm.encode("ok").ids)


def test_push_accepts_numpy_integers_and_refuses_after_flush(smollm):
    np = pytest.importorskip("numpy")
    stream = TextStream(smollm)
    assert stream.push(np.int64(smollm.token_to_id("Hello"))) == "Hello"
    stream.flush()
    with pytest.raises(RuntimeError, match="after flush"):
        stream.push(smollm.token_to_id("Hello"))


# --- stop strings ----------------------------------------------------------------------------

CHAT = "The answer is 42.\nUser: thanks a lot\nAssistant: you're welcome"


def stream_text(tokenizer: Tokenizer, text: str, stops):
    ids = tokenizer.encode(text).ids
    chunks, stream, consumed = run(tokenizer, ids, stops)
    for stop in stops:  # no stop string, nor its start once it completed, leaks into any chunk
        assert all(stop not in chunk for chunk in chunks)
        assert stop not in stream.text
    return chunks, stream, consumed, ids


@pytest.mark.parametrize("stop, n_tokens", [(" answer", 1), ("User:", 2), (" is 42.", 5)])
def test_a_stop_string_spanning_n_tokens_cuts_the_text_before_it(smollm, stop, n_tokens):
    assert len(tokens_spanned(smollm, CHAT, stop)) == n_tokens
    assert "".join(tokens_spanned(smollm, CHAT, stop)).replace("Ġ", " ") == stop
    chunks, stream, consumed, ids = stream_text(smollm, CHAT, [stop])
    assert stream.stopped and stream.text == CHAT[: CHAT.index(stop)]
    assert smollm.decode(ids[:consumed]).endswith(stop)  # stopped on the token that completed it


def test_a_stop_string_starting_mid_token_cuts_inside_that_token(smollm):
    assert tokens_spanned(smollm, CHAT, "swer is") == ["Ġanswer", "Ġis"]
    _, stream, _, _ = stream_text(smollm, CHAT, ["swer is"])
    assert stream.stopped and stream.text == "The an"


def test_text_after_a_stop_string_in_the_same_token_is_dropped(smollm):
    assert tokens_spanned(smollm, CHAT, " ans") == ["Ġanswer"]
    chunks, stream, consumed, _ = stream_text(smollm, CHAT, [" ans"])
    assert stream.stopped and stream.text == "The" and consumed == 2
    assert all("wer" not in chunk for chunk in chunks)


def test_the_earliest_stop_string_wins_whatever_its_place_in_the_list(smollm):
    _, stream, _, _ = stream_text(smollm, CHAT, ["Assistant:", "User:"])
    assert stream.stopped and stream.text == "The answer is 42.\n"


def test_of_two_stop_strings_completing_together_the_one_starting_first_wins(smollm):
    assert tokens_spanned(smollm, CHAT, "42.") == ["4", "2", "."]
    _, stream, _, _ = stream_text(smollm, CHAT, ["2.", "42."])
    assert stream.stopped and stream.text == "The answer is "


def test_text_that_looks_like_a_stop_string_is_held_back_then_released(smollm):
    text = "Use the force. User: hi"
    ids = smollm.encode(text).ids
    assert smollm.encode(text).tokens[:2] == ["Use", "Ġthe"]
    stream = TextStream(smollm, ["User:"])
    assert stream.push(ids[0]) == ""  # "Use" may be the start of "User:"
    assert stream.push(ids[1]) == "Use the"
    for token_id in ids[2:]:
        stream.push(token_id)
    assert stream.stopped and stream.text == "Use the force. "


def test_held_back_text_is_released_by_flush_when_no_stop_completes(smollm):
    ids = smollm.encode("I will Use").ids
    stream = TextStream(smollm, ["User:"])
    assert "".join(stream.push(token_id) for token_id in ids) == "I will "
    assert stream.flush() == "Use" and not stream.stopped and stream.text == "I will Use"


@pytest.mark.parametrize("stop", ["東京", "京で", "→∑"])
def test_a_stop_string_with_multibyte_characters_cuts_before_it(tokenizer, stop):
    text = "答えは東京です。東京へ行く→∑ then more"
    assert len(tokens_spanned(tokenizer, text, stop)) >= 2  # its characters span several tokens
    chunks, stream, _, _ = stream_text(tokenizer, text, [stop])
    assert stream.stopped and stream.text == text[: text.index(stop)]
    assert_every_chunk_is_whole_text(chunks, text)


def test_after_a_stop_pushes_and_flush_return_nothing(smollm):
    stream = TextStream(smollm, ["42"])
    outputs = [stream.push(token_id) for token_id in smollm.encode(CHAT).ids] + [stream.flush()]
    assert stream.stopped and "".join(outputs) == stream.text == "The answer is "
    assert outputs[6:] == [""] * (len(outputs) - 6)


def test_a_stop_string_in_a_sentencepiece_byte_run_is_found_once_the_run_ends(spm):
    _, stream, _, _ = stream_text(spm, "Hello 🚀 東京 world", ["🚀"])
    assert stream.stopped and stream.text == "Hello "


def test_a_stop_string_completed_only_by_flush_still_cuts(spm):
    ids = spm.encode("ok 東").ids  # ends in a byte run: held until the run ends, here at flush
    stream = TextStream(spm, ["東"])
    pushed = "".join(stream.push(token_id) for token_id in ids)
    assert pushed == "ok " and not stream.stopped
    assert stream.flush() == "" and stream.stopped and stream.text == "ok "


# --- random sequences ------------------------------------------------------------------------


def random_cases(tokenizer: Tokenizer, seed: int, n: int = 200):
    """Random id sequences (half uniform over the vocabulary, half slices of real multilingual
    text) with stop strings cut from their decoded text, plus one that probably never occurs."""
    rng = random.Random(seed)
    vocab_size = tokenizer.get_vocab_size()
    real = [tokenizer.encode(text).ids for text in TEXTS.values()]
    for _ in range(n):
        if rng.random() < 0.5:
            ids = [rng.randrange(vocab_size) for _ in range(rng.randint(1, 40))]
        else:
            source = rng.choice(real)
            start = rng.randrange(len(source))
            ids = source[start : start + rng.randint(1, 40)]
        skip = rng.random() < 0.8
        text = tokenizer.decode(ids, skip_special_tokens=skip)
        stops = []
        for _ in range(rng.randint(0, 3) if text else 0):
            start = rng.randrange(len(text))
            stops.append(text[start : start + rng.randint(1, 6)])
        if rng.random() < 0.3:
            stops.append("".join(rng.choice("ab東🚀\n ") for _ in range(3)))
        yield ids, stops, skip


@pytest.mark.parametrize("name, seed", [("smollm", 20240601), ("spm", 7)])
def test_random_sequences_stream_as_the_one_shot_decode_cut_at_the_first_stop(request, name, seed):
    tokenizer = request.getfixturevalue(name)
    n_stopped = 0
    for ids, stops, skip in random_cases(tokenizer, seed):
        chunks, stream, consumed = run(tokenizer, ids, stops, skip_special_tokens=skip)
        one_shot = tokenizer.decode(ids[:consumed], skip_special_tokens=skip)
        expected = truncate_at_first_stop(one_shot, stops)
        assert "".join(chunks) == expected, (ids, stops, skip)
        assert stream.stopped == any(stop in one_shot for stop in stops)
        assert_every_chunk_is_whole_text(chunks, one_shot)
        n_stopped += stream.stopped
    assert n_stopped > 50  # the stop strings were really exercised


# --- settings and imports --------------------------------------------------------------------


def test_an_empty_stop_string_is_refused_with_a_hint(smollm):
    with pytest.raises(InvalidSettingError, match="non-empty") as error:
        TextStream(smollm, ["###", ""])
    assert error.value.hint


def test_a_bare_string_as_stop_strings_is_refused_rather_than_split_into_characters(smollm):
    with pytest.raises(InvalidSettingError, match=r"\['###'\]"):
        TextStream(smollm, "###")


def test_the_streaming_module_imports_without_the_export_packages():
    code = (
        "import sys, edgellm.generate.streaming; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & "
        "{'onnx', 'gguf', 'torch', 'transformers', 'safetensors', 'numpy'}))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
