"""Logprob entries (token ids, from the engine) -> the two OpenAI shapes: chat's `logprobs.content` and the legacy
completions' `{tokens, token_logprobs, top_logprobs, text_offset}`."""

from __future__ import annotations

import re
from typing import Any

from phi3v.server.protocol import ChoiceLogprobs, TokenLogprob, TopLogprob

_BYTE_TOKEN = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def token_text(tokenizer: Any, i: int) -> tuple[str, list[int]]:
    """A token's text and bytes (a byte-fallback token <0xNN> is that byte)."""
    piece = tokenizer.id_to_token(i) or ""
    m = _BYTE_TOKEN.match(piece)
    if m:
        b = bytes([int(m.group(1), 16)])
        return b.decode("utf-8", errors="replace"), list(b)
    text = piece.replace("\u2581", " ")
    return text, list(text.encode())


def choice_logprobs(tokenizer: Any, entries: list[dict[str, Any]] | None) -> ChoiceLogprobs | None:
    """`Completion.logprobs` (token ids) -> OpenAI's logprobs.content (token text and bytes)."""
    if entries is None:
        return None
    out = []
    for e in entries:
        tok, b = token_text(tokenizer, e["token_id"])
        top = [TopLogprob(token=t, logprob=x["logprob"], bytes=tb)
               for x in e["top_logprobs"] for t, tb in [token_text(tokenizer, x["token_id"])]]
        out.append(TokenLogprob(token=tok, logprob=e["logprob"], bytes=b, top_logprobs=top))
    return ChoiceLogprobs(content=out)


def legacy_logprobs(tokenizer: Any, entries: list[dict[str, Any]] | None, offset: int = 0) -> dict[str, Any] | None:
    """The completions API's logprobs: parallel lists, top_logprobs as {token text: logprob} per position,
    text_offset counted from `offset` (the characters already sent, when streaming)."""
    if entries is None:
        return None
    tokens, lps, tops, offsets = [], [], [], []
    for e in entries:
        tok, _ = token_text(tokenizer, e["token_id"])
        tokens.append(tok)
        lps.append(e["logprob"])
        tops.append({token_text(tokenizer, x["token_id"])[0]: x["logprob"] for x in e["top_logprobs"]})
        offsets.append(offset)
        offset += len(tok)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}
