"""The bundle's tokenizer: text <-> ids with the manifest's special tokens and BOS rule."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from .bundle_format import TOKENIZER_FILE
from .errors import BundleError
from .streaming import TextStream


class BundleTokenizer:
    def __init__(self, bundle: Path, manifest: dict):
        from tokenizers import Tokenizer

        path = Path(bundle) / manifest["tokenizer"].get("file", TOKENIZER_FILE)
        try:
            self.tokenizer = Tokenizer.from_file(str(path))
        except Exception as exc:
            raise BundleError(f"{path}: not a readable tokenizer ({exc})", "the bundle is damaged; export it again") from None
        spec = manifest["tokenizer"]
        self.bos_token_id: int | None = spec.get("bos_token_id")
        self.eos_token_ids: tuple[int, ...] = tuple(spec.get("eos_token_ids") or ())
        self.add_bos_token: bool = bool(spec.get("add_bos_token"))
        self.special_tokens: dict[str, str] = dict(spec.get("special_tokens") or {})

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Ids of `text`; special-token text (e.g. <|im_start|>) becomes its single id."""
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        add_bos = self.add_bos_token if add_bos is None else add_bos
        if add_bos and self.bos_token_id is not None and (not ids or ids[0] != self.bos_token_id):
            ids = [self.bos_token_id] + ids
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def text_stream(self, stop_strings: Sequence[str] = ()) -> TextStream:
        return TextStream(self.tokenizer, stop_strings)
