"""What image_io.py and video.py share when a media source is a string: its URL scheme, a `data:` URI's payload,
and the local path a `file://` URI or a plain string names. Errors are ImageInputErrors naming the media kind."""

from __future__ import annotations

import base64
import binascii
import re
import urllib.parse
import urllib.request

from phi3v.processing.media_errors import ImageInputError, fmt_size, show

_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")


def scheme_of(src: str) -> str:
    """The lower-case URL scheme of `src` ("" for a plain path)."""
    m = _SCHEME_RE.match(src)
    return m.group(1).lower() if m else ""


def data_uri_payload(uri: str, kind: str, max_bytes: int, also: tuple[str, ...] = ()) -> bytes:
    """The decoded payload of a `data:<kind>/<type>;base64,<data>` URI (kind "image" or "video"; `also`: other
    media types accepted). The payload's size is checked against `max_bytes` before it is decoded."""
    form = f"data:{kind}/<type>;base64,<data>"
    head, sep, payload = uri.partition(",")
    if not sep:
        raise ImageInputError(f"data URI has no ',' separator; use {form}")
    params = head[5:].split(";")
    mediatype = params[0].strip().lower()
    if mediatype and not mediatype.startswith((f"{kind}/", *also)):
        raise ImageInputError(f"data URI media type {show(mediatype)} is not {'an' if kind == 'image' else 'a'} "
                              f"{kind}; use {form}")
    if "base64" not in (p.strip().lower() for p in params[1:]):
        raise ImageInputError(f"data URI is not base64-encoded; use {form}")
    payload = urllib.parse.unquote(payload)  # a copy only when it holds a '%'
    over = ImageInputError(f"{kind} data URI payload is over the limit of {fmt_size(max_bytes)}; use a smaller {kind}")
    if len(payload) // 4 * 3 > max_bytes + max_bytes // 16 + 3:  # before any pass over it; line breaks
        raise over  # (MIME wraps at 76 characters: +2.6 %) make a payload look longer than its bytes
    try:  # the usual payload, one line of base64: decoded and validated in one pass
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        # line-wrapped base64: whitespace out, then the same strict decode. A regex over megabytes is several
        # times the decode itself, so it runs only for payloads that need it.
        try:
            data = base64.b64decode(re.sub(r"\s+", "", payload), validate=True)
        except (binascii.Error, ValueError) as e:
            raise ImageInputError(f"data URI holds invalid base64 ({e}); re-encode the {kind} with standard "
                                  "base64") from None
    if len(data) > max_bytes:
        raise over
    return data


def local_path(src: str, scheme: str, kind: str, allow_paths: bool) -> str:
    """The local path a source string names that is neither a data URI nor http(s): a `file://` URI's path, or the
    string itself. ImageInputError for a remote file URI, another scheme, an empty path, or paths not allowed."""
    if scheme == "file":
        parts = urllib.parse.urlsplit(src)
        if parts.netloc not in ("", "localhost"):
            raise ImageInputError(f"file URI {show(src)} names a remote host; use file:///absolute/path")
        src = urllib.request.url2pathname(parts.path)
    elif scheme:
        raise ImageInputError(f"{kind} URL scheme {scheme!r} is not supported; use a local path, "
                              f"data:{kind}/...;base64, or http(s)")
    if not src:
        raise ImageInputError(f"{kind} path is empty; pass a file path, URL or {kind} data")
    if not allow_paths:
        raise ImageInputError(f"local {kind} paths are not allowed here; send the {kind} as base64 data instead")
    return src
