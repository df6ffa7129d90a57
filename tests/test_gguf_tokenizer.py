"""The tokenizer built from GGUF metadata gives llama.cpp's token ids.

llama.cpp's ids come from fixtures recorded by tests/fixtures/record_llamacpp.py (CI never builds
llama.cpp). Two more references need no fixture: the `sentencepiece` library for the `llama`
model type, and the `regex` module running llama.cpp's own pre-tokenizer patterns.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer, pre_tokenizers

from edgellm.errors import EdgeLLMError
from edgellm.export.sources.gguf_tokenizer import (
    LLAMA3_REGEX,
    PRE_TOKENIZERS,
    QWEN2_REGEX,
    tokenizer_from_gguf_metadata,
)

FIXTURES = Path(__file__).parent / "fixtures"
RECORD = json.loads((FIXTURES / "llamacpp_tokens.json").read_text(encoding="utf-8"))
CORPUS = RECORD["corpus"]


def build(meta: dict) -> Tokenizer:
    return Tokenizer.from_str(tokenizer_from_gguf_metadata(meta).tokenizer_json)


def mismatches(tokenizer: Tokenizer, expected_ids: list[list[int]]) -> list[str]:
    """One line per corpus string whose ids differ, so a failure shows every culprit at once."""
    lines = []
    for text, expected in zip(CORPUS, expected_ids, strict=True):
        got = tokenizer.encode(text).ids
        if got != expected:
            lines.append(f"{text!r}: llama.cpp {expected}, ours {got}")
    return lines


@pytest.fixture(scope="module")
def smollm(smollm2_gguf_metadata) -> Tokenizer:
    return build(smollm2_gguf_metadata)


# --- the real model (gpt2, pre "smollm") ----------------------------------------------------


def test_the_corpus_covers_the_scripts_and_shapes_that_break_tokenizers():
    assert len(CORPUS) >= 36 and "" in CORPUS
    assert any("<|im_start|>" in text for text in CORPUS)
    assert any("\u200d" in text for text in CORPUS)  # a ZWJ emoji sequence


def test_the_default_model_tokenizer_gives_llamacpp_ids_for_every_corpus_string(smollm):
    assert mismatches(smollm, RECORD["tokenizers"]["smollm"]["ids"]) == []


def test_the_bundle_tokenizer_file_writes_merges_as_strings_and_gives_the_same_ids(smollm2_gguf_metadata):
    from edgellm.export.exporter import fast_loading_tokenizer_json

    text = fast_loading_tokenizer_json(tokenizer_from_gguf_metadata(smollm2_gguf_metadata).tokenizer_json)
    merges = json.loads(text)["model"]["merges"]
    assert len(merges) > 40000 and all(isinstance(m, str) and m.count(" ") == 1 for m in merges)
    assert mismatches(Tokenizer.from_str(text), RECORD["tokenizers"]["smollm"]["ids"]) == []


def test_merges_holding_a_space_stay_pairs():
    from edgellm.export.exporter import fast_loading_tokenizer_json

    document = {"model": {"type": "BPE", "merges": [["a", "b"], ["a b", "c"]]}}
    assert json.loads(fast_loading_tokenizer_json(json.dumps(document))) == document


def test_decoding_the_default_model_ids_gives_back_the_text(smollm):
    for text in CORPUS:
        # SmolLM's vocabulary has no token for byte 0x1d: llama.cpp drops it too (see above)
        expected = text.replace("\x1d", "")
        assert smollm.decode(smollm.encode(text).ids, skip_special_tokens=False) == expected


def test_chat_markers_encode_to_their_single_control_token_ids(smollm):
    ids = smollm.encode("<|im_start|>user\nhi<|im_end|>").ids
    assert ids[0] == 1 and ids[-1] == 2
    assert smollm.token_to_id("<|im_start|>") == 1


def test_the_golden_text_gives_the_ids_the_llamacpp_logits_were_recorded_for(smollm):
    with np.load(FIXTURES / "llamacpp_logits.npz") as npz:  # lazy: only `ids` is decompressed
        recorded = npz["ids"]
    text = (FIXTURES / "golden_text.txt").read_text(encoding="utf-8")
    ids = smollm.encode(text).ids
    assert len(ids) >= 300
    assert ids[: len(recorded)] == recorded.tolist()


def test_the_default_model_spec_carries_its_special_tokens_and_template(smollm2_gguf_metadata):
    spec = tokenizer_from_gguf_metadata(smollm2_gguf_metadata)
    assert spec.bos_token_id == 1 and spec.eos_token_ids == [2]
    assert spec.add_bos_token is False  # the GGUF says so, and llama.cpp obeys it
    assert spec.special_tokens["bos_token"] == "<|im_start|>"
    assert spec.special_tokens["eos_token"] == "<|im_end|>"
    assert "<|im_start|>" in spec.chat_template


# --- other pre-tokenizers, on the same vocabulary relabelled ---------------------------------


@pytest.mark.parametrize("pre", ["default", "gpt-2", "llama-bpe", "qwen2"])
def test_each_pre_tokenizer_gives_llamacpp_ids_on_the_smollm_vocabulary(smollm2_gguf_metadata, pre):
    tokenizer = build({**smollm2_gguf_metadata, "tokenizer.ggml.pre": pre})
    assert mismatches(tokenizer, RECORD["tokenizers"][f"pre:{pre}"]["ids"]) == []


def tiny_byte_level_meta(pre: str) -> dict:
    """A gpt2 vocabulary of the 256 byte symbols and no merges: enough to see the splits."""
    symbols = pre_tokenizers.ByteLevel.alphabet()
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": sorted(symbols),
        "tokenizer.ggml.merges": [],
    }


def regex_split(text: str, patterns: list[str]) -> list[str]:
    """llama.cpp's unicode_regex_split: matches and the text between them, pattern after pattern."""
    regex = pytest.importorskip("regex")
    pieces = [text]
    for pattern in patterns:
        split = []
        for piece in pieces:
            at = 0
            for match in regex.finditer(pattern, piece):
                split += [piece[at : match.start()]] if match.start() > at else []
                split += [match.group()] if match.end() > match.start() else []
                at = match.end()
            split += [piece[at:]] if at < len(piece) else []
        pieces = split
    return pieces


TRICKY = [
    "I'M you're HE'LL they'VE she'D it'S we'Re",
    "1 12 123 1234 12345 1234567890 ١٢٣٤ ½",
    "x\r\ny\n\n  z  \n\t\tw   ",
    "!!!\n\n??? ...\r\n",
    "   leading and trailing   ",
    "e\u0301t\u00e9 na\u00efve \u00a0nbsp\u2009thin",
    "中文，日本語。한국어!",
    "emoji 👨‍👩‍👧 🇫🇷 1️⃣",
    "def f(x):\n    return x**2  # square\n",
    "'s's 's' ''",
]


@pytest.mark.parametrize("pre, pattern", [("llama-bpe", LLAMA3_REGEX), ("qwen2", QWEN2_REGEX)])
@pytest.mark.parametrize("text", TRICKY)
def test_the_pre_tokenizer_splits_like_llamacpps_regex(pre, pattern, text):
    ours = build(tiny_byte_level_meta(pre)).pre_tokenizer.pre_tokenize_str(text)
    to_bytes = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    expected = [to_bytes.pre_tokenize_str(piece)[0][0] for piece in regex_split(text, [pattern])]
    assert [piece for piece, _ in ours] == expected


def test_llama3_keeps_digits_in_threes_and_qwen2_alone():
    def pieces(pre):
        return [p for p, _ in build(tiny_byte_level_meta(pre)).pre_tokenizer.pre_tokenize_str("1234567")]

    assert pieces("llama-bpe") == ["123", "456", "7"]
    assert pieces("qwen2") == list("1234567")


def test_llama3_defaults_to_adding_bos_like_llamacpp():
    assert tokenizer_from_gguf_metadata(tiny_byte_level_meta("llama-bpe")).add_bos_token is True
    assert tokenizer_from_gguf_metadata(tiny_byte_level_meta("qwen2")).add_bos_token is False


# --- the llama (SentencePiece) model type ----------------------------------------------------


def test_a_sentencepiece_vocabulary_gives_llamacpp_ids_for_every_corpus_string():
    """The vocabulary is frozen in the fixture, so this needs neither llama.cpp nor sentencepiece."""
    spm = RECORD["tokenizers"]["spm"]
    assert mismatches(build(spm["metadata"]), spm["ids"]) == []


SPM_TRAINING_TEXT = """\
The harbour was quiet in the early morning, and the boats rocked gently at their moorings.
Fishermen checked their nets, counted the crates, and talked about the weather and the prices.
A small café near the pier served strong coffee, fresh bread and a soup of the day.
Der Hafen war am frühen Morgen ruhig, und die Boote schaukelten sanft an ihren Liegeplätzen.
Les pêcheurs vérifiaient leurs filets et parlaient du temps qu'il faisait et des prix du marché.
El puerto estaba tranquilo por la mañana y los barcos se mecían suavemente en el agua.
Порт был тихим ранним утром, и лодки мягко покачивались у причала.
港口在清晨很安静，渔船在码头边轻轻摇晃，渔民们在检查渔网。
朝の港は静かで、漁船は岸壁でゆっくりと揺れていました。
def count_boats(harbour):\n    return sum(1 for berth in harbour if berth.occupied)
Numbers: 12 boats, 340 crates, 7.5 tonnes, 2024-06-01, 08:30, 100% fresh.
"""

SPM_PROBES = [
    "",
    "a",
    " ",
    "  ",
    "The harbour was quiet.",
    "  two leading spaces",
    "trailing  ",
    "Boats\nand\tnets\n\n",
    "Fishermen counted 1234567 crates at 08:30.",
    "Der Hafen, les pêcheurs, el puerto, порт, 港口, 港.",
    "never seen: 🚀 ΩΨ ข้อความ 🏳️‍🌈 ⅛ \u00a0 \x01",  # absent from training: byte fallback
    "def count_boats(harbour):\n    return 0\n",
    "UPPER lower MiXeD don't café CAFÉ",
    "αβγ ∑∫√ ½",
]


@pytest.fixture(scope="module")
def trained_sentencepiece(tmp_path_factory):
    spm = pytest.importorskip("sentencepiece")
    folder = tmp_path_factory.mktemp("spm")
    (folder / "train.txt").write_text(SPM_TRAINING_TEXT * 3, encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(folder / "train.txt"),
        model_prefix=str(folder / "m"),
        model_type="bpe",
        vocab_size=400,
        byte_fallback=True,
        character_coverage=0.98,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        num_threads=1,
        minloglevel=2,
    )
    return spm.SentencePieceProcessor(model_file=str(folder / "m.model"))


def sentencepiece_meta(processor) -> dict:
    """The tokenizer.ggml.* fields convert_hf_to_gguf.py writes for a SentencePiece model."""

    def token_type(i: int) -> int:  # normal=1 unknown=2 control=3 user_defined=4 unused=5 byte=6
        for is_kind, kind in (
            (processor.is_unknown, 2),
            (processor.is_control, 3),
            (processor.is_unused, 5),
            (processor.is_byte, 6),
        ):
            if is_kind(i):
                return kind
        return 1

    n = processor.get_piece_size()
    return {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": [processor.id_to_piece(i) for i in range(n)],
        "tokenizer.ggml.scores": [processor.get_score(i) for i in range(n)],
        "tokenizer.ggml.token_type": [token_type(i) for i in range(n)],
        "tokenizer.ggml.bos_token_id": processor.bos_id(),
        "tokenizer.ggml.eos_token_id": processor.eos_id(),
        "tokenizer.ggml.unknown_token_id": processor.unk_id(),
    }


def test_a_trained_sentencepiece_model_and_ours_give_the_same_ids(trained_sentencepiece):
    tokenizer = build(sentencepiece_meta(trained_sentencepiece))
    for text in SPM_PROBES:
        assert tokenizer.encode(text).ids == trained_sentencepiece.encode(text), text


def test_characters_absent_from_training_fall_back_to_byte_tokens(trained_sentencepiece):
    tokenizer = build(sentencepiece_meta(trained_sentencepiece))
    pieces = tokenizer.encode("🚀").tokens
    assert pieces[-4:] == ["<0xF0>", "<0x9F>", "<0x9A>", "<0x80>"]


def test_sentencepiece_decoding_gives_back_the_text(trained_sentencepiece):
    tokenizer = build(sentencepiece_meta(trained_sentencepiece))
    for text in SPM_PROBES:
        assert tokenizer.decode(tokenizer.encode(text).ids) == text


def test_a_sentencepiece_spec_adds_bos_and_names_its_special_tokens(trained_sentencepiece):
    spec = tokenizer_from_gguf_metadata(sentencepiece_meta(trained_sentencepiece))
    assert spec.add_bos_token is True  # llama.cpp's default for the llama model type
    assert spec.special_tokens == {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    assert spec.eos_token_ids == [2] and spec.bos_token_id == 1 and spec.unk_token_id == 0


# --- metadata and errors --------------------------------------------------------------------


def test_end_of_turn_and_end_of_message_tokens_also_stop_generation():
    meta = {
        **tiny_byte_level_meta("gpt-2"),
        "tokenizer.ggml.eos_token_id": 5,
        "tokenizer.ggml.eot_token_id": 7,
        "tokenizer.ggml.eom_token_id": 5,
    }
    assert tokenizer_from_gguf_metadata(meta).eos_token_ids == [5, 7]


def test_an_unknown_tokenizer_model_fails_naming_the_supported_ones():
    with pytest.raises(EdgeLLMError, match="gpt2, llama"):
        tokenizer_from_gguf_metadata({**tiny_byte_level_meta("gpt-2"), "tokenizer.ggml.model": "bert"})


def test_an_unknown_pre_tokenizer_fails_naming_the_supported_ones():
    with pytest.raises(EdgeLLMError, match="unknown-pre") as error:
        tokenizer_from_gguf_metadata(tiny_byte_level_meta("unknown-pre"))
    assert all(name in str(error.value) for name in ("smollm", "llama-bpe", "qwen2", "default"))
    assert set(PRE_TOKENIZERS) >= {"smollm", "llama-bpe", "qwen2", "gpt-2", "default"}
