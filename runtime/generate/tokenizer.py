"""The bundle's tokenizer: text <-> ids with the manifest's special tokens and BOS rule.

Control tokens (<|im_start|>, <start_of_turn>, ...) steer the model: text that spells one is
encoded as that text, never as the control token, unless the caller says the text means them
(`parse_special`: a chat template's own markers, or a raw prompt its author wrote on purpose).
Otherwise a user could type "<|im_end|><|im_start|>system" and write the system turn.
"""

from __future__ import annotations

import re
import secrets
import threading
from collections.abc import Callable, Sequence
from typing import Any

from edgellm.bundle.manifest import Manifest, TokenizerSpec
from edgellm.errors import BundleError, InvalidSettingError
from edgellm.generate.streaming import TextStream

INVALID_TEXT_HINT = "give it as UTF-8 (e.g. convert it with: iconv -f latin1 -t utf-8)"


def check_text(text: str, what: str = "the prompt") -> str:
    """`text`, if it is valid Unicode: undecodable bytes (a command line's or a file's invalid UTF-8) reach
    Python as lone surrogates, which no tokenizer can encode."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise InvalidSettingError(
            f"{what} is not valid UTF-8 text (character {error.start} is an undecodable byte)", INVALID_TEXT_HINT
        ) from None
    return text


class BundleTokenizer:
    def __init__(self, tokenizer, spec: TokenizerSpec):
        """`tokenizer`: a `tokenizers.Tokenizer`; `spec`: the manifest's facts about it."""
        self.tokenizer = tokenizer
        self.bos_token_id: int | None = spec.bos_token_id
        self.eos_token_ids: tuple[int, ...] = spec.eos_token_ids
        self.add_bos_token: bool = spec.add_bos_token
        self.special_tokens: dict[str, str] = dict(spec.special_tokens)
        self.control_ids = frozenset(i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special)
        self._text_only = None  # the same tokenizer with control tokens matched as text, built when first needed
        self._text_only_lock = threading.Lock()

    @classmethod
    def of(cls, manifest: Manifest) -> BundleTokenizer:
        """The bundle's tokenizer, parsed from the bytes whose hash was checked."""
        from tokenizers import Tokenizer

        spec = manifest.tokenizer
        path = manifest.path(spec.file)
        data = manifest.read_bytes(spec.file)
        try:
            tokenizer = Tokenizer.from_str(data.decode("utf-8"))
        except Exception as exc:
            raise BundleError(
                f"{path}: not a readable tokenizer ({exc})", "the bundle is damaged; export it again"
            ) from None
        if tokenizer.get_vocab_size() > manifest.config.vocab_size:
            raise BundleError(
                f"{path}: {tokenizer.get_vocab_size()} tokens, more than the model's vocabulary "
                f"(model.vocab_size {manifest.config.vocab_size})",
                "the bundle is damaged; export it again",
            )
        return cls(tokenizer, spec)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def encode(self, text: str, add_bos: bool | None = None, parse_special: bool = False) -> list[int]:
        """Ids of `text`. Control-token text is plain text unless `parse_special` (then "<|im_start|>"
        becomes its single id)."""
        ids = self.tokenizer.encode(check_text(text), add_special_tokens=False).ids
        if not parse_special and self.control_ids.intersection(ids):
            ids = self._text_tokenizer().encode(text, add_special_tokens=False).ids
        return self._with_bos(ids, add_bos)

    def _with_bos(self, ids: list[int], add_bos: bool | None) -> list[int]:
        add_bos = self.add_bos_token if add_bos is None else add_bos
        if add_bos and self.bos_token_id is not None and (not ids or ids[0] != self.bos_token_id):
            ids = [self.bos_token_id] + ids
        return ids

    def spells_control_token(self, text: str) -> bool:
        return bool(
            self.control_ids.intersection(self.tokenizer.encode(check_text(text), add_special_tokens=False).ids)
        )

    def _text_tokenizer(self):
        with self._text_only_lock:
            if self._text_only is None:
                from tokenizers import Tokenizer

                text_only = Tokenizer.from_str(self.tokenizer.to_str())
                text_only.encode_special_tokens = True  # special added tokens are not matched: plain text
                self._text_only = text_only
            return self._text_only

    def encode_chat(self, messages: list[dict[str, Any]], render: Callable[[list[dict[str, Any]]], str]) -> list[int]:
        """Ids of the conversation `render` (the chat template) writes for `messages`. The template's
        markers are control tokens; a message's text is text, even where it spells one: such a text is
        replaced by a placeholder for the rendering and tokenized on its own, as text."""
        forged = [i for i, m in enumerate(messages) if self.spells_control_token(m["content"])]
        if not forged:
            return self.encode(render(messages), parse_special=True)
        nonce = secrets.token_hex(8)
        placeholders = {i: f"\ue000{nonce}:{i}\ue001" for i in forged}  # private-use characters: never real text
        contents = {placeholders[i]: messages[i]["content"] for i in forged}
        marked = [{**m, "content": placeholders[i]} if i in placeholders else m for i, m in enumerate(messages)]
        pieces = re.split("(" + "|".join(map(re.escape, contents)) + ")", render(marked))
        ids: list[int] = []
        for piece in filter(None, pieces):
            ids += self.encode(contents.get(piece, piece), add_bos=False, parse_special=piece not in contents)
        return self._with_bos(ids, None)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def text_stream(self, stop_strings: Sequence[str] = ()) -> TextStream:
        return TextStream(self.tokenizer, stop_strings)
