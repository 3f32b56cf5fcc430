"""Tokenizer for Phi-3(.5)-vision on top of the `tokenizers` package (no `transformers`).

`tokenizer.json` is used exactly as shipped (legacy Llama pipeline: Prepend/Replace normalizer,
BPE with byte fallback, Replace/ByteFallback/Fuse/Strip decoder). BOS/EOS are added here according
to `tokenizer_config.json`, which is what HF `LlamaTokenizerFast` does.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Iterable

from tokenizers import Tokenizer as _HFTokenizer

_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def _token_content(value: Any) -> str | None:
    """A special token in a config file is either a string or {"content": ...}."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    return data if isinstance(data, dict) else {}


class Tokenizer:
    """Text <-> ids, equal to HF `LlamaTokenizerFast` for the Phi-3-vision tokenizer files."""

    def __init__(
        self,
        tok: _HFTokenizer,
        *,
        add_bos_token: bool = True,
        add_eos_token: bool = False,
        bos_token: str | None = "<s>",
        eos_token: str | None = "</s>",
        pad_token: str | None = None,
        unk_token: str | None = "<unk>",
        chat_template: str | None = None,
    ) -> None:
        self._tok = tok
        # Padding/truncation settings stored in tokenizer.json would silently change encode().
        self._tok.no_padding()
        self._tok.no_truncation()
        self.add_bos_token = bool(add_bos_token)
        self.add_eos_token = bool(add_eos_token)
        self.bos_token, self.eos_token = bos_token, eos_token
        self.pad_token, self.unk_token = pad_token, unk_token
        self.chat_template = chat_template
        self.bos_token_id = self._required_id(bos_token, "bos_token") if bos_token else None
        self.eos_token_id = self.token_to_id(eos_token) if eos_token else None
        self.pad_token_id = self.token_to_id(pad_token) if pad_token else None
        self.unk_token_id = self.token_to_id(unk_token) if unk_token else None
        self.vocab_size: int = tok.get_vocab_size(with_added_tokens=True)
        decoder = tok.get_added_tokens_decoder()
        self.special_ids: set[int] = {i for i, t in decoder.items() if t.special}
        self.added_ids: set[int] = set(decoder)
        # Ids of byte-fallback pieces (<0x00> .. <0xFF>): their text depends on their neighbours.
        # no token stands for more characters than this (the longest piece, added tokens included): a text longer
        # than n times it cannot be n tokens or fewer (processing/limits.py bounds prompts with it)
        self.max_token_chars: int = max((len(p) for p in tok.get_vocab(with_added_tokens=True)), default=1)
        self.byte_ids: frozenset[int] = frozenset(
            i for p, i in tok.get_vocab(with_added_tokens=False).items() if _BYTE_PIECE.fullmatch(p)
        )

    def _required_id(self, token: str, name: str) -> int:
        i = self.token_to_id(token)
        if i is None:
            raise ValueError(f"{name} {token!r} is not in the vocabulary")
        return i

    @classmethod
    def from_pretrained(cls, folder: str) -> "Tokenizer":
        """Load `tokenizer.json` (+ `tokenizer_config.json`, `special_tokens_map.json`) from a folder."""
        path = os.path.join(folder, "tokenizer.json")
        if not os.path.isfile(path):
            raise ValueError(
                f"no tokenizer.json in {folder!r}: phi3v needs the fast-tokenizer file "
                "(tokenizer.json) shipped with the model"
            )
        tok = _HFTokenizer.from_file(path)
        config = _read_json(os.path.join(folder, "tokenizer_config.json"))
        special_map = _read_json(os.path.join(folder, "special_tokens_map.json"))

        def special(name: str, default: str | None) -> str | None:
            for source in (config, special_map):
                if name in source:
                    return _token_content(source[name])
            return default

        return cls(
            tok,
            add_bos_token=config.get("add_bos_token", True),
            add_eos_token=config.get("add_eos_token", False),
            bos_token=special("bos_token", "<s>"),
            eos_token=special("eos_token", "</s>"),
            pad_token=special("pad_token", None),
            unk_token=special("unk_token", "<unk>"),
            chat_template=config.get("chat_template") if isinstance(config.get("chat_template"), str) else None,
        )

    def __len__(self) -> int:
        return self.vocab_size

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Token ids of `text`.

        add_bos=None follows tokenizer_config.json (`add_bos_token`, `add_eos_token`), like HF with
        add_special_tokens=True. add_bos=True forces BOS; add_bos=False adds no special token at all
        (HF add_special_tokens=False). Added tokens written in the text (e.g. `<|user|>`) are always
        recognised, as in HF.
        """
        if not isinstance(text, str):
            raise TypeError(f"encode() expects str, got {type(text).__name__}")
        try:
            ids = self._tok.encode(text, add_special_tokens=False).ids
        except TypeError:  # `tokenizers` refuses a str it cannot encode as UTF-8 (a lone surrogate)
            raise ValueError("the text contains a lone UTF-16 surrogate; send valid Unicode text") from None
        bos = self.add_bos_token if add_bos is None else add_bos
        if bos:
            if self.bos_token_id is None:
                raise ValueError("this tokenizer has no bos_token")
            ids.insert(0, self.bos_token_id)
        if self.add_eos_token and add_bos is not False and self.eos_token_id is not None:
            ids.append(self.eos_token_id)
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids` (HF decode with clean_up_tokenization_spaces=False). Ids without a token are dropped."""
        ids = [int(i) for i in ids]
        for i in ids:
            if i < 0:
                raise ValueError(f"cannot decode negative id {i} (image placeholders are not text)")
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def to_json(self) -> str:
        """The tokenizer.json this tokenizer runs (padding and truncation off)."""
        return self._tok.to_str()

    def token_to_id(self, tok: str) -> int | None:
        return self._tok.token_to_id(tok)

    def id_to_token(self, i: int) -> str | None:
        if i < 0:
            return None
        return self._tok.id_to_token(int(i))


class IncrementalDetokenizer:
    """Streams text while ids arrive; "".join(deltas) + flush() == tokenizer.decode(all ids).

    Each push decodes a bounded window: the ids of the previous emitted step (context) plus those not
    yet emitted, and emits the difference. Two rules make the stream exact:
    - A fixed sentinel piece is decoded in front of every window, so the decoder's strip of one
      leading space only ever applies at the very start of the stream, as in a full decode.
    - Text is held back while the last id is a byte-fallback piece (<0x..>): the decoder turns a run
      of byte pieces into text only as a whole (a later byte can turn the whole run into U+FFFD), so
      a run is released when a non-byte piece follows it, or by flush(). No partial UTF-8 character
      is ever emitted.
    Ids that decode() drops (skipped special tokens, ids without a token) are ignored.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.text = ""
        self._window: list[int] = []  # context ids + ids not yet emitted
        self._read = 0  # ids before this index in _window were already emitted
        self._started = False  # True once the stream's leading-space strip has been applied
        sentinel = None
        for piece in ("a", "x", "."):
            sentinel = tokenizer.token_to_id(piece)
            if sentinel is not None and tokenizer.decode([sentinel]) == piece:
                break
            sentinel = None
        self._sentinel = sentinel

    def _decode_raw(self, ids: list[int]) -> str:
        """Text of ids inside a stream, without the start-of-sequence leading-space strip."""
        if self._sentinel is None:  # unusual vocabulary: plain decode (may strip a space)
            return self.tokenizer.decode(ids, self.skip_special_tokens)
        return self.tokenizer.decode([self._sentinel, *ids], self.skip_special_tokens)[1:]

    def _emit(self) -> str:
        window = self._window
        if not self._started:
            # Nothing emitted yet: the real decode (with its strip) of everything so far.
            delta = self.tokenizer.decode(window, self.skip_special_tokens)
            if not delta:
                return ""
            self._started = True
        else:
            prefix = self._decode_raw(window[: self._read])
            full = self._decode_raw(window)
            delta = full[len(prefix):]
        # Keep only the ids emitted by this step as context for the next window.
        self._window = window[self._read:]
        self._read = len(self._window)
        self.text += delta
        return delta

    def push(self, token_id: int) -> str:
        """Add one id; return the new text (possibly "")."""
        i = int(token_id)
        if i < 0:
            raise ValueError(f"cannot detokenize negative id {i} (image placeholder)")
        tok = self.tokenizer
        if (self.skip_special_tokens and i in tok.special_ids) or tok.id_to_token(i) is None:
            return ""
        self._window.append(i)
        if i in tok.byte_ids:
            return ""  # the byte run may continue; see class docstring
        return self._emit()

    def flush(self) -> str:
        """Emit whatever is held back (an unfinished byte run). Call once at the end of the stream."""
        if self._read >= len(self._window):
            return ""
        return self._emit()
