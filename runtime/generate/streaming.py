"""Generated token ids -> text chunks that are safe to show: whole characters, never a stop string.

Two hold-backs, both here and nowhere else:

1. Whole characters (`_Detokenizer`). A token can end in the middle of a UTF-8 character
   (byte-level BPE: "東" is two tokens) or be a single byte of one (SentencePiece byte fallback:
   `<0xE6>` `<0x9D>` `<0xB1>`). Text is released only at a token boundary where it can no longer
   change: the window decoded so far does not end in U+FFFD (a character the next token may
   complete), the last token is not a byte-fallback token (`tokenizers` decodes a whole run of
   byte tokens at once, and one incomplete character turns the *whole run* into U+FFFD), and
   not a skipped special token (it vanishes, and the byte runs on either side of it join).
   Each release decodes a small window with the tokenizer's own decoder: the tokens released
   last time, as context, plus the new ones; the new text is what the window adds to the
   context. The context makes SentencePiece's leading-space rule come out as in a one-shot
   decode: only the first token of the whole output loses its "▁" space.

   Why not `tokenizers.decoders.DecodeStream`: it has no flush (a trailing incomplete
   character is never released), and a byte-fallback run that ends in an incomplete character
   makes it raise "Invalid prefix". It is otherwise the same windowed-decode idea.

2. Stop strings (`_StopStrings`). Text whose end could still be the start of a stop string is
   held back. When a stop string completes, the text before it is released and the rest is
   dropped for good; if several have completed, the one that starts first wins.

The contract, for any token ids: the chunks joined (pushes, then `flush`) equal
`tokenizer.decode(ids, skip_special_tokens=...)`, truncated at the first occurrence of a stop
string if one completed (ids pushed after that do not count).
"""

from __future__ import annotations

import operator
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING

from edgellm.errors import InvalidSettingError

if TYPE_CHECKING:
    import tokenizers

REPLACEMENT_CHARACTER = "\ufffd"
_BYTE_FALLBACK_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")  # SentencePiece's spelling of one byte


class TextStream:
    """Push generated token ids one at a time; get back text that is safe to show now.

    `push` returns "" while it holds text back: an incomplete character, a byte-fallback run
    that has not ended, or text that may be the start of a stop string. `flush` ends the
    stream and releases what is held: an incomplete trailing character comes out as U+FFFD,
    as `tokenizer.decode` gives for the same ids (one per invalid byte sequence with
    byte-level BPE, one per byte of the run with SentencePiece byte fallback).

    Stop strings are matched on the decoded text, after special tokens are skipped (or not,
    as `skip_special_tokens` says). Once one completes `stopped` is True, the text from its
    start on is never returned, and further `push`/`flush` calls return "".

    Chunks are whole code points, not whole grapheme clusters: a ZWJ emoji sequence or a
    letter with a combining accent can arrive in two chunks.
    """

    def __init__(
        self, tokenizer: tokenizers.Tokenizer, stop_strings: Sequence[str] = (), skip_special_tokens: bool = True
    ):
        self._detokenizer = _Detokenizer(tokenizer, skip_special_tokens)
        self._stops = _StopStrings(stop_strings)
        self._chunks: list[str] = []
        self._flushed = False

    def push(self, token_id: int) -> str:
        """Add the next generated token; return the text that can be shown now (maybe "")."""
        if self._flushed:
            raise RuntimeError("TextStream.push after flush: the stream has ended; start a new one")
        if self._stops.stopped:
            return ""
        return self._emit(self._stops.feed(self._detokenizer.push(operator.index(token_id))))

    @property
    def stopped(self) -> bool:
        """A stop string completed: stop generating; nothing from its start on is ever emitted."""
        return self._stops.stopped

    def flush(self) -> str:
        """Generation ended without a stop: release everything held back (idempotent)."""
        if self._flushed or self._stops.stopped:
            self._flushed = True
            return ""
        self._flushed = True
        return self._emit(self._stops.feed(self._detokenizer.flush(), final=True))

    @property
    def text(self) -> str:
        """Everything emitted so far."""
        return "".join(self._chunks)

    def _emit(self, chunk: str) -> str:
        if chunk:
            self._chunks.append(chunk)
        return chunk


class _Detokenizer:
    """Token ids -> text that no later token can change (hold-back 1 in the module docstring)."""

    def __init__(self, tokenizer: tokenizers.Tokenizer, skip_special_tokens: bool):
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._vanishing_ids = (
            frozenset(token_id for token_id, token in tokenizer.get_added_tokens_decoder().items() if token.special)
            if skip_special_tokens
            else frozenset()
        )
        self._window: list[int] = []  # context tokens (released last time), then pending ones
        self._context_len = 0
        self._context_text = ""  # decode of the context tokens alone

    def push(self, token_id: int) -> str:
        self._window.append(token_id)
        if token_id in self._vanishing_ids or self._is_byte_fallback(token_id):
            return ""
        text = self._decode(self._window)
        if text.endswith(REPLACEMENT_CHARACTER):  # perhaps a character the next token completes
            return ""
        new_text = self._new_text(text)
        # Release only when the text grows, so a context never decodes to "": decoded after
        # such a context, a SentencePiece "▁b" would lose its space as if it began the output.
        if new_text:
            self._window = self._window[self._context_len :]
            self._context_len = len(self._window)
            self._context_text = self._decode(self._window)
        return new_text

    def flush(self) -> str:
        new_text = self._new_text(self._decode(self._window))
        self._window, self._context_len, self._context_text = [], 0, ""
        return new_text

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special_tokens)

    def _is_byte_fallback(self, token_id: int) -> bool:
        return _BYTE_FALLBACK_TOKEN.fullmatch(self._tokenizer.id_to_token(token_id) or "") is not None

    def _new_text(self, text: str) -> str:
        if not text.startswith(self._context_text):
            # Every decoder `tokenizers` builds for byte-level BPE and SentencePiece extends its
            # text at the boundaries released here; a custom one might not.
            raise RuntimeError(
                f"the tokenizer's decoder rewrote text it had already produced "
                f"({self._context_text!r} became {text!r}); it cannot be streamed exactly"
            )
        return text[len(self._context_text) :]


class _StopStrings:
    """Text -> text with no stop string in it (hold-back 2 in the module docstring)."""

    def __init__(self, stop_strings: Sequence[str]):
        if isinstance(stop_strings, str):
            raise InvalidSettingError(
                f"stop_strings must be a list of strings, got the string {stop_strings!r}",
                f"wrap it in a list: [{stop_strings!r}]",
            )
        stops = tuple(dict.fromkeys(stop_strings))
        for stop in stops:
            if not isinstance(stop, str) or not stop:
                raise InvalidSettingError(
                    f"stop string {stop!r} is not a non-empty string",
                    "remove empty stop strings; an empty one would match before any text",
                )
        self._stops = stops
        self._longest = max((len(stop) for stop in stops), default=0)
        self._held = ""  # text after what was released; its end may start a stop string
        self.stopped = False

    def feed(self, text: str, final: bool = False) -> str:
        """Add decoded text; return what can be released. `final`: no more text will come."""
        if self.stopped:
            return ""
        held = self._held + text
        starts = [at for at in (held.find(stop) for stop in self._stops) if at >= 0]
        if starts:
            self.stopped, self._held = True, ""
            return held[: min(starts)]
        cut = len(held) if final else self._partial_stop_start(held)
        self._held = held[cut:]
        return held[:cut]

    def _partial_stop_start(self, text: str) -> int:
        """Where the earliest tail of `text` that begins some stop string starts (len if none)."""
        for at in range(max(0, len(text) - self._longest + 1), len(text)):
            tail = text[at:]
            if any(stop.startswith(tail) for stop in self._stops):
                return at
        return len(text)
