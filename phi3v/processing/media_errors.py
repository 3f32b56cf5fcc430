"""The error every unusable image input raises, and the helpers its messages use (shared by the loaders)."""

from __future__ import annotations


class ImageInputError(ValueError):
    """The image input is unusable (missing, not an image, too large, forbidden source, ...)."""


def fmt_size(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n} bytes"


def show(s: str, limit: int = 120) -> str:
    """repr() for error messages, shortened so a pasted base64 blob cannot flood a one-line message."""
    r = repr(s)
    return r if len(r) <= limit else r[: limit - 5] + "...'"
