"""Turn any user-supplied image reference into a fully decoded PIL image, safely.

Accepted inputs (see `load_image`): PIL images, local paths / `file://` URIs, raw bytes, numpy arrays,
torch tensors, `data:image/...;base64,` URIs and (opt-in) `http(s)://` URLs. Every failure is an
`ImageInputError` (a `ValueError`) whose one-line message says what is wrong and what to do.

Safety: byte caps on every source, a pixel cap checked from the header BEFORE decoding (decompression
bombs), a forced full decode (truncated files fail here, not later inside the model), `allowed_dir`
confinement for paths, and SSRF protection for URLs: every hop (redirects are followed by hand) is
resolved, every address must be public, and the connection goes to the address that was checked
(no second DNS lookup, so DNS rebinding cannot swap in a private address).
"""

from __future__ import annotations

import base64
import binascii
import http.client
import io
import ipaddress
import os
import re
import socket
import ssl
import stat
import time
import urllib.parse
import urllib.request
import warnings
from typing import Any

import numpy as np
import torch
from PIL import Image

MAX_IMAGE_PIXELS = 64 * 2**20  # default pixel cap (w*h), checked from the header before any decoding
MAX_IMAGE_BYTES = 50 * 2**20  # default byte cap for files, bytes, data URIs and downloads
MAX_REDIRECTS = 5

_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")


class ImageInputError(ValueError):
    """The image input is unusable (missing, not an image, too large, forbidden source, ...)."""


def _fmt_size(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n} bytes"


def _show(s: str, limit: int = 120) -> str:
    """repr() for error messages, shortened so a pasted base64 blob cannot flood a one-line message."""
    r = repr(s)
    return r if len(r) <= limit else r[: limit - 5] + "...'"


def _check_pil(img: Image.Image, what: str, max_pixels: int) -> Image.Image:
    """Size checks on a (possibly still lazy) image, then a forced full decode."""
    w, h = img.size
    if w <= 0 or h <= 0:
        raise ImageInputError(f"{what} has zero width or height ({w}x{h}); provide a non-empty image")
    if w * h > max_pixels:
        raise ImageInputError(
            f"{what} is {w}x{h} = {w * h} pixels, over the limit of {max_pixels} (decompression-bomb guard); "
            "downscale it or raise max_pixels"
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img.load()  # force the full decode now: truncated/corrupt data must fail here
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageInputError(f"{what} looks like a decompression bomb ({e}); downscale it") from None
    except (OSError, SyntaxError, ValueError, EOFError, MemoryError) as e:
        raise ImageInputError(f"{what} could not be decoded, the data is truncated or corrupt ({e}); re-export the image") from None
    return img


def _decode_bytes(data: bytes, what: str, max_bytes: int, max_pixels: int) -> Image.Image:
    if len(data) == 0:
        raise ImageInputError(f"{what} is empty (0 bytes); provide a non-empty image file")
    if len(data) > max_bytes:
        raise ImageInputError(f"{what} is {_fmt_size(len(data))}, over the limit of {_fmt_size(max_bytes)}; use a smaller image")
    try:
        with warnings.catch_warnings():
            # Pillow's own guard (Image.MAX_IMAGE_PIXELS) fires inside open(); make its warning an error too.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))  # reads the header only
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageInputError(f"{what} looks like a decompression bomb ({e}); downscale it") from None
    except Image.UnidentifiedImageError:
        raise ImageInputError(f"{what} is not a recognised image format; provide a PNG, JPEG, WebP, GIF, BMP or TIFF") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageInputError(f"{what} could not be opened as an image ({e}); check the file") from None
    return _check_pil(img, what, max_pixels)


def _from_array(arr: Any, what: str, max_pixels: int) -> Image.Image:
    """HWC uint8 RGB/RGBA, HW uint8 grayscale (and HW1) -> PIL, exactly as `Image.fromarray` sees them."""
    arr = np.asarray(arr)
    if arr.dtype != np.uint8:
        raise ImageInputError(f"{what} has dtype {arr.dtype}; only uint8 arrays (values 0..255) are accepted, convert with .astype(np.uint8)")
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim == 3 and arr.shape[2] not in (3, 4) and arr.shape[0] in (3, 4):
        raise ImageInputError(f"{what} has shape {tuple(arr.shape)}, which looks channels-first; pass HWC (e.g. .transpose(1, 2, 0))")
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] in (3, 4))):
        raise ImageInputError(f"{what} has shape {tuple(arr.shape)}; expected (H, W) grayscale or (H, W, 3|4) RGB/RGBA uint8")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ImageInputError(f"{what} has zero width or height (shape {tuple(arr.shape)}); provide a non-empty image")
    if arr.shape[0] * arr.shape[1] > max_pixels:
        raise ImageInputError(f"{what} has {arr.shape[0] * arr.shape[1]} pixels, over the limit of {max_pixels}; downscale it")
    return Image.fromarray(np.ascontiguousarray(arr))


def _decode_data_uri(uri: str, max_bytes: int, max_pixels: int) -> Image.Image:
    head, sep, payload = uri.partition(",")
    if not sep:
        raise ImageInputError("data URI has no ',' separator; use data:image/<type>;base64,<data>")
    params = head[5:].split(";")
    mediatype = params[0].strip().lower()
    if mediatype and not mediatype.startswith("image/"):
        raise ImageInputError(f"data URI media type {_show(mediatype)} is not an image; use data:image/<type>;base64,<data>")
    if "base64" not in (p.strip().lower() for p in params[1:]):
        raise ImageInputError("data URI is not base64-encoded; use data:image/<type>;base64,<data>")
    payload = re.sub(r"\s+", "", urllib.parse.unquote(payload))
    if len(payload) // 4 * 3 > max_bytes + 3:
        raise ImageInputError(f"data URI payload is over the limit of {_fmt_size(max_bytes)}; use a smaller image")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ImageInputError(f"data URI holds invalid base64 ({e}); re-encode the image with standard base64") from None
    return _decode_bytes(data, "data URI image", max_bytes, max_pixels)


def _load_path(path: str, allowed_dir: str | None, max_bytes: int, max_pixels: int) -> Image.Image:
    if "\0" in path:
        raise ImageInputError("image path contains a NUL byte; pass a valid file path")
    real = os.path.realpath(path)  # resolves symlinks and '..' before the confinement check
    if allowed_dir is not None:
        root = os.path.realpath(allowed_dir)
        if os.path.commonpath([root, real]) != root:
            raise ImageInputError(f"image path {_show(path)} is outside the allowed directory {_show(allowed_dir)}; move the file there")
    try:
        st = os.stat(real)
    except FileNotFoundError:
        raise ImageInputError(f"image file not found: {_show(path)}; check the path") from None
    except OSError as e:
        raise ImageInputError(f"cannot access image file {_show(path)} ({e.strerror}); check the path and permissions") from None
    if stat.S_ISDIR(st.st_mode):
        raise ImageInputError(f"image path {_show(path)} is a directory; pass an image file")
    if not stat.S_ISREG(st.st_mode):
        raise ImageInputError(f"image path {_show(path)} is not a regular file; pass an image file")
    if st.st_size == 0:
        raise ImageInputError(f"image file {_show(path)} is empty (0 bytes); provide a non-empty image file")
    if st.st_size > max_bytes:
        raise ImageInputError(f"image file {_show(path)} is {_fmt_size(st.st_size)}, over the limit of {_fmt_size(max_bytes)}; use a smaller image")
    try:
        with open(real, "rb") as f:
            data = f.read(max_bytes + 1)  # cap even if the file grows after stat
    except OSError as e:
        raise ImageInputError(f"cannot read image file {_show(path)} ({e.strerror}); check permissions") from None
    return _decode_bytes(data, f"image file {_show(path)}", max_bytes, max_pixels)


# ---------------------------------------------------------------- URLs (SSRF-safe)


def _ip_is_blocked(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """True for every address a server-side fetch must never reach (metadata services, LAN, loopback)."""
    if isinstance(ip, ipaddress.IPv6Address):
        for embedded in (ip.ipv4_mapped, ip.sixtofour, ip.teredo[1] if ip.teredo else None):
            if embedded is not None and _ip_is_blocked(embedded):
                return True  # an IPv6 form that tunnels to a private IPv4 address
        if ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
    return (
        ip.is_loopback or ip.is_private or ip.is_link_local or ip.is_multicast
        or ip.is_reserved or ip.is_unspecified or not ip.is_global
    )


def _resolve_public(host: str, port: int) -> str:
    """Resolve `host` and return one address to connect to; refuse if ANY resolved address is non-public."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as e:
        raise ImageInputError(f"cannot resolve image URL host {_show(host)} ({e}); check the URL") from None
    addrs = [ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos]
    if not addrs:
        raise ImageInputError(f"image URL host {_show(host)} has no addresses; check the URL")
    for ip in addrs:
        if _ip_is_blocked(ip):
            raise ImageInputError(f"image URL host {_show(host)} resolves to non-public address {ip}; only public hosts may be fetched")
    return str(addrs[0])


class _PinnedHTTPConnection(http.client.HTTPConnection):
    """HTTP connection to a pre-checked IP; the Host header still names the original host."""

    def __init__(self, host: str, ip: str, **kw: Any) -> None:
        super().__init__(host, **kw)
        self._ip = ip

    def connect(self) -> None:
        self.sock = socket.create_connection((self._ip, self.port), self.timeout)


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    """HTTPS to a pre-checked IP; SNI and certificate verification use the original hostname."""

    def __init__(self, host: str, ip: str, **kw: Any) -> None:
        super().__init__(host, context=ssl.create_default_context(), **kw)
        self._ip = ip

    def connect(self) -> None:
        sock = socket.create_connection((self._ip, self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)


def _fetch_url(url: str, max_bytes: int, timeout: float) -> bytes:
    """GET `url` with redirects followed by hand (each hop re-checked). http.client (urllib's transport) is used
    directly so the socket goes to the checked IP; HTTP(S)_PROXY settings are therefore not used."""
    # each socket operation times out after `timeout`; the whole fetch (all hops, slow drip-feeds) after 3x that
    deadline = time.monotonic() + max(timeout, 0.001) * 3
    for _hop in range(MAX_REDIRECTS + 1):
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https"):
            raise ImageInputError(f"image URL scheme {parts.scheme!r} is not supported (redirect target {_show(url)}); use http(s)")
        host = parts.hostname
        if not host:
            raise ImageInputError(f"image URL {_show(url)} has no host; check the URL")
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError:
            raise ImageInputError(f"image URL {_show(url)} has an invalid port; check the URL") from None
        ip = _resolve_public(host, port)  # checked on every hop, before any connection
        cls = _PinnedHTTPSConnection if parts.scheme == "https" else _PinnedHTTPConnection
        conn = cls(host, ip, port=port, timeout=timeout)
        try:
            target = urllib.parse.urlunsplit(("", "", parts.path or "/", parts.query, ""))
            conn.request("GET", target, headers={"User-Agent": "phi3v-image-loader", "Accept": "image/*"})
            resp = conn.getresponse()
            if resp.status in (301, 302, 303, 307, 308):
                loc = resp.getheader("Location")
                if not loc:
                    raise ImageInputError(f"image URL {_show(url)} redirected without a Location header")
                url = urllib.parse.urljoin(url, loc)
                continue
            if resp.status != 200:
                raise ImageInputError(f"image URL {_show(url)} returned HTTP {resp.status}; check the URL")
            length = resp.getheader("Content-Length")
            if length and length.isdigit() and int(length) > max_bytes:
                raise ImageInputError(f"image URL {_show(url)} serves {_fmt_size(int(length))}, over the limit of {_fmt_size(max_bytes)}")
            chunks, total = [], 0
            while True:
                chunk = resp.read(min(65536, max_bytes + 1 - total))
                if not chunk:
                    break
                chunks.append(chunk)
                total += len(chunk)
                if total > max_bytes:
                    raise ImageInputError(f"image URL {_show(url)} serves more than {_fmt_size(max_bytes)}; use a smaller image")
                if time.monotonic() > deadline:
                    raise ImageInputError(f"image URL {_show(url)} took too long to download; try again or use a faster host")
            return b"".join(chunks)
        except (OSError, http.client.HTTPException) as e:
            raise ImageInputError(f"image URL {_show(url)} could not be fetched ({e}); check the URL and network") from None
        finally:
            conn.close()
    raise ImageInputError(f"image URL followed more than {MAX_REDIRECTS} redirects; use the final URL")


# ---------------------------------------------------------------- entry point


def load_image(
    src: Any,
    *,
    allowed_dir: str | None = None,
    allow_paths: bool = True,
    allow_urls: bool = False,
    max_bytes: int = MAX_IMAGE_BYTES,
    timeout: float = 10.0,
    max_pixels: int | None = None,
) -> Image.Image:
    """Return a fully loaded (decoded) PIL image for `src`; raise ImageInputError when unusable.

    `max_pixels=None` uses the module-level `MAX_IMAGE_PIXELS` (read at call time). The returned image keeps its
    original mode; colour conversion is the image processor's job. A PIL image is returned as is (after checks).
    """
    limit = MAX_IMAGE_PIXELS if max_pixels is None else int(max_pixels)
    if isinstance(src, Image.Image):
        return _check_pil(src, "image", limit)
    if isinstance(src, (bytes, bytearray, memoryview)):
        return _decode_bytes(bytes(src), "image bytes", max_bytes, limit)
    if isinstance(src, np.ndarray):
        return _from_array(src, "numpy image array", limit)
    if isinstance(src, torch.Tensor):
        if src.dtype != torch.uint8:
            raise ImageInputError(f"image tensor has dtype {src.dtype}; only torch.uint8 HWC tensors are accepted (values 0..255)")
        return _from_array(src.detach().cpu().numpy(), "image tensor", limit)
    if isinstance(src, os.PathLike):
        src = os.fsdecode(os.fspath(src))
        if not allow_paths:
            raise ImageInputError("local image paths are not allowed here; send the image as base64 data instead")
        return _load_path(src, allowed_dir, max_bytes, limit)
    if not isinstance(src, str):
        raise ImageInputError(f"unsupported image input type {type(src).__name__}; pass a PIL image, path, URL, bytes or uint8 array")
    if src[:5].lower() == "data:":
        return _decode_data_uri(src.strip(), max_bytes, limit)
    m = _SCHEME_RE.match(src)
    scheme = m.group(1).lower() if m else ""
    if scheme in ("http", "https"):
        if not allow_urls:
            raise ImageInputError("image URLs are disabled here; download the image and send it as base64 data")
        return _decode_bytes(_fetch_url(src, max_bytes, timeout), f"image from {_show(src)}", max_bytes, limit)
    if scheme == "file":
        parts = urllib.parse.urlsplit(src)
        if parts.netloc not in ("", "localhost"):
            raise ImageInputError(f"file URI {_show(src)} names a remote host; use file:///absolute/path")
        src = urllib.request.url2pathname(parts.path)
    elif scheme:
        raise ImageInputError(f"image URL scheme {scheme!r} is not supported; use a local path, data:image/...;base64, or http(s)")
    if not src:
        raise ImageInputError("image path is empty; pass a file path, URL or image data")
    if not allow_paths:
        raise ImageInputError("local image paths are not allowed here; send the image as base64 data instead")
    return _load_path(src, allowed_dir, max_bytes, limit)
