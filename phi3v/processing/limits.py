"""Limits checked before any expensive work on a request: its text length, its image count and the
image tokens its images will take, computed from each image's header size before a pixel is decoded
or a crop is made. Every refusal is a ValueError (a 400 in the server, one line in the CLI).

Why a character bound is sound: no token of the vocabulary stands for more characters than its
longest piece (17 for Phi-3's, `<|placeholder..|>`), so a text longer than max_model_len times that
cannot fit the context whatever its tokens; refusing it costs one len() instead of a tokenization
that grows with the text (a 10 MB prompt took seconds of a worker thread).
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass, field

from phi3v.processing.image import tokens_for_size
from phi3v.processing.image_io import ImageInputError

_SURROGATE = re.compile("[\ud800-\udfff]")


class Cancelled(Exception):
    """The request's client went away while it was being prepared (not an input error)."""


def check_text(text: str, max_chars: int, what: str = "the prompt") -> None:
    """Refuse text that cannot fit the context, and text with lone surrogates (not encodable as UTF-8:
    a JSON `\\ud800` escape decodes to one)."""
    if len(text) > max_chars:
        raise ValueError(f"{what} is {len(text)} characters, more than any prompt that fits the context can have "
                         f"({max_chars}: max_model_len x the longest token); shorten it")
    m = _SURROGATE.search(text)
    if m is not None:
        raise ValueError(f"{what} contains a lone UTF-16 surrogate (U+{ord(m.group()):04X}) at character "
                         f"{m.start()}; send valid Unicode text")


def check_image_count(n: int, max_images: int | None) -> None:
    if max_images is not None and n > max_images:
        raise ValueError(f"the request has {n} images but this server accepts at most {max_images} per request "
                         "(--max-images-per-request)")


@dataclass
class TokenBudget:
    """Image tokens of a request, counted from header sizes as its images are opened; refuses the request as
    soon as the images alone fill the context. `cancel` (set when the client leaves) stops it as well."""

    context: int
    num_crops: int
    cancel: threading.Event | None = None
    text_tokens: int = 0
    used: int = 0
    counts: list[int] = field(default_factory=list)

    def check_cancel(self) -> None:
        if self.cancel is not None and self.cancel.is_set():
            raise Cancelled("the client went away")

    def add_image(self, width: int, height: int) -> None:
        """`load_image`'s check_size hook: runs before the image is decoded."""
        self.check_cancel()
        n = tokens_for_size(width, height, self.num_crops)
        self.used += n
        self.counts.append(n)
        if self.used + self.text_tokens >= self.context:
            raise ImageInputError(
                f"image {len(self.counts)} ({width}x{height} at num_crops={self.num_crops}) brings the prompt to at "
                f"least {self.used + self.text_tokens} tokens ({self.used} of them image tokens) but the context "
                f"holds {self.context}: use fewer images, fewer crops (num_crops) or a shorter prompt")
