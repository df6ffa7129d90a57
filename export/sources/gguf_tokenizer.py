"""A Hugging Face `tokenizers` JSON built from GGUF tokenizer metadata, giving llama.cpp's ids.

llama.cpp is the reference: a GGUF file carries no tokenizer.json, only a vocabulary and a
pre-tokenizer *name*, and llama.cpp decides what that name means (`src/llama-vocab.cpp`).
This module rebuilds the same tokenizer with `tokenizers` building blocks:

  gpt2   byte-level BPE. llama.cpp's regex list for the `pre` name becomes a chain of
         "isolated" Split pre-tokenizers (llama.cpp keeps the text between matches too, and
         each regex splits the pieces of the one before), then the byte-to-unicode mapping.
  llama  SentencePiece BPE with byte fallback. llama.cpp merges the adjacent pair whose
         concatenation is the highest-scoring vocabulary entry, so the merges are every way of
         cutting a vocabulary entry into two entries, ranked by the entry's score.

In both, tokens of type CONTROL, USER_DEFINED and UNKNOWN are added tokens matched on the raw
text before anything else, as llama.cpp does with parse_special=True (USER_DEFINED ones are
matched even without it, so they are not `special`).

Known differences from llama.cpp (none shows up in the corpus tests):
  * when two added tokens overlap ("ab" and "bcd" in "abcd") llama.cpp takes the longer token
    first, `tokenizers` the leftmost;
  * SentencePiece merges of equal score are ordered by token id here, by position in
    llama.cpp (real SentencePiece vocabularies have distinct scores);
  * llama.cpp's per-model lstrip/rstrip token attributes (phi-3, jina) and its decode-side
    `clean_spaces` are not reproduced; decoding here round-trips the text instead, except
    that with SentencePiece the text after an added token gains the space llama.cpp put there,
    and a byte the vocabulary cannot spell is dropped on encoding (llama.cpp drops it too);
  * llama.cpp also promotes some NORMAL tokens to CONTROL by their text ("<|im_end|>" and the
    like, when a converter mislabelled them); here only the GGUF token types count.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from edgellm.errors import EdgeLLMError
from edgellm.export.canonical import TokenizerSpec

# GGUF token types (gguf-py `TokenType`)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

SPM_SPACE = "\u2581"  # "▁", SentencePiece's visible space

# llama.cpp's pre-tokenizer regexes (src/llama-vocab.cpp, llm_tokenizer_bpe), copied verbatim.
GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
# Llama 3's tokenizer.json has (?i:'s|...); llama.cpp spells the case-insensitivity out.
LLAMA3_REGEX = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
    r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Qwen2 is Llama 3 with single digits.
QWEN2_REGEX = LLAMA3_REGEX.replace(r"\p{N}{1,3}", r"\p{N}")


@dataclass(frozen=True)
class PreTokenizerRule:
    regexes: tuple[str, ...]  # applied in order, each to the pieces the previous one left
    ignore_merges: bool = False  # a piece that is a whole vocabulary entry is taken as is
    add_bos: bool = False  # llama.cpp's default when the GGUF has no add_bos_token


_DEFAULT = PreTokenizerRule((r"[\p{P}\$\+<=>\^~\|]+", GPT2_REGEX, r"\p{N}+", r"[0-9][0-9][0-9]"))
_GPT2 = PreTokenizerRule((GPT2_REGEX,))
_SMOLLM = PreTokenizerRule((r"\p{N}", GPT2_REGEX))  # StarCoder's: every digit alone
_LLAMA3 = PreTokenizerRule((LLAMA3_REGEX,), ignore_merges=True, add_bos=True)
_QWEN2 = PreTokenizerRule((QWEN2_REGEX,))

# `tokenizer.ggml.pre` name -> rule; names grouped as llama.cpp groups them.
PRE_TOKENIZERS: dict[str, PreTokenizerRule] = {
    "default": _DEFAULT,
    **dict.fromkeys(("gpt-2", "phi-2", "mpt", "olmo"), _GPT2),
    **dict.fromkeys(("smollm", "starcoder", "refact", "command-r", "codeshell"), _SMOLLM),
    **dict.fromkeys(("llama-bpe", "llama3", "llama-v3", "falcon3"), _LLAMA3),
    **dict.fromkeys(("dbrx", "smaug-bpe"), PreTokenizerRule((LLAMA3_REGEX,))),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "stablelm2", "megrez"), _QWEN2),
}

SUPPORTED_MODELS = ("gpt2", "llama")


def tokenizer_from_gguf_metadata(meta: dict[str, Any]) -> TokenizerSpec:
    """The tokenizer a GGUF file describes, as llama.cpp would run it."""
    model = meta.get("tokenizer.ggml.model")
    if model not in SUPPORTED_MODELS:
        raise EdgeLLMError(
            f"GGUF tokenizer model {model!r} is not supported",
            f"supported tokenizer.ggml.model values: {', '.join(SUPPORTED_MODELS)}",
        )
    tokens = _token_texts(meta)
    types = list(meta.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens))
    if len(types) < len(tokens):
        raise EdgeLLMError(
            f"GGUF has {len(tokens)} tokens but {len(types)} token types",
            "the file is inconsistent; convert the model again",
        )

    if model == "gpt2":
        rule = _pre_tokenizer_rule(meta.get("tokenizer.ggml.pre"))
        tokenizer = _byte_level_bpe(meta, tokens, rule)
        default_ids = {}  # llama.cpp's gpt2 defaults (bos = eos = 11) fit no model we know
        default_add_bos = rule.add_bos
    else:
        tokenizer = _sentencepiece_bpe(meta, tokens, types)
        default_ids = {"bos": 1, "eos": 2, "unknown": 0}  # llama.cpp's SPM defaults
        default_add_bos = True
    _add_special_tokens(tokenizer, tokens, types)

    def token_id(name: str) -> int | None:
        value = meta.get(f"tokenizer.ggml.{name}_token_id", default_ids.get(name))
        return value if value is not None and 0 <= value < len(tokens) else None

    bos, eos, unk, pad = token_id("bos"), token_id("eos"), token_id("unknown"), token_id("padding")
    eos_ids = [i for i in (eos, token_id("eot"), token_id("eom")) if i is not None]
    special_tokens = {
        name: tokens[i]
        for name, i in (("bos_token", bos), ("eos_token", eos), ("unk_token", unk), ("pad_token", pad))
        if i is not None
    }
    return TokenizerSpec(
        tokenizer_json=tokenizer.to_str(),
        bos_token_id=bos,
        eos_token_ids=list(dict.fromkeys(eos_ids)),
        pad_token_id=pad,
        unk_token_id=unk,
        add_bos_token=bool(meta.get("tokenizer.ggml.add_bos_token", default_add_bos)),
        chat_template=meta.get("tokenizer.chat_template"),
        special_tokens=special_tokens,
    )


def _token_texts(meta: dict[str, Any]) -> list[str]:
    tokens = meta.get("tokenizer.ggml.tokens")
    if not tokens:
        raise EdgeLLMError("GGUF has no tokenizer.ggml.tokens", "the file carries no vocabulary")
    # llama.cpp renames empty tokens so that every id keeps a distinct text
    tokens = [t if t else f"[EMPTY_{i}]" for i, t in enumerate(tokens)]
    if len(set(tokens)) != len(tokens):
        raise EdgeLLMError("GGUF vocabulary has duplicate tokens", "llama.cpp refuses this file too")
    return tokens


def _pre_tokenizer_rule(pre: str | None) -> PreTokenizerRule:
    if not pre:  # llama.cpp warns and falls back to its default regexes
        return _DEFAULT
    if pre not in PRE_TOKENIZERS:
        raise EdgeLLMError(
            f"GGUF pre-tokenizer {pre!r} is not supported",
            f"supported tokenizer.ggml.pre values: {', '.join(sorted(PRE_TOKENIZERS))}",
        )
    return PRE_TOKENIZERS[pre]


def _byte_level_bpe(meta: dict[str, Any], tokens: list[str], rule: PreTokenizerRule):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    vocab = {t: i for i, t in enumerate(tokens)}
    merges = []
    for merge in meta.get("tokenizer.ggml.merges") or []:
        cut = merge.find(" ", 1)  # as llama.cpp: the first space after the first character
        left, right = merge[:cut], merge[cut + 1 :]
        # `tokenizers` needs every merge to make a vocabulary entry; llama.cpp would make a
        # symbol it then spells in bytes. Only a broken file has such merges.
        if cut > 0 and left in vocab and right in vocab and left + right in vocab:
            merges.append((left, right))
    tokenizer = Tokenizer(models.BPE(vocab, merges, ignore_merges=rule.ignore_merges))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in rule.regexes]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _sentencepiece_bpe(meta: dict[str, Any], tokens: list[str], types: list[int]):
    from tokenizers import Tokenizer, decoders, models, normalizers

    scores = meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
    vocab = {t: i for i, t in enumerate(tokens)}
    unk = meta.get("tokenizer.ggml.unknown_token_id", 0)
    tokenizer = Tokenizer(
        models.BPE(
            vocab,
            _merges_by_score(tokens, scores),
            byte_fallback=True,
            fuse_unk=False,
            unk_token=tokens[unk] if 0 <= unk < len(tokens) and types[unk] == UNKNOWN else None,
        )
    )

    # llama.cpp puts a space before every piece of text that starts the input or follows an
    # added token; `tokenizers` runs the normalizer on exactly those pieces.
    steps = [normalizers.Replace(" ", SPM_SPACE)]
    add_space_prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    if add_space_prefix:
        steps.insert(0, normalizers.Prepend(SPM_SPACE))
    tokenizer.normalizer = normalizers.Sequence(steps)
    decode = [decoders.Replace(SPM_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_space_prefix:
        decode.append(decoders.Strip(" ", 1, 0))
    tokenizer.decoder = decoders.Sequence(decode)
    return tokenizer


def _merges_by_score(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """Every (left, right) whose concatenation is a token, best-scoring concatenation first.

    This is llama.cpp's SPM loop in rank form: it repeatedly merges the adjacent pair whose
    concatenation is in the vocabulary with the highest score.
    """
    ids = {t: i for i, t in enumerate(tokens)}
    ranked = []
    for i, token in enumerate(tokens):
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in ids and right in ids:
                ranked.append((-scores[i], i, cut, left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def _add_special_tokens(tokenizer, tokens: list[str], types: list[int]) -> None:
    from tokenizers import AddedToken

    added = [
        AddedToken(tokens[i], special=types[i] != USER_DEFINED, normalized=False)
        for i in range(len(tokens))
        if types[i] in (CONTROL, USER_DEFINED, UNKNOWN)
    ]
    if added:
        tokenizer.add_tokens(added)
