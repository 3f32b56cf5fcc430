"""Turn any user-supplied image reference into a fully decoded PIL image, safely.

Accepted inputs (see `load_image`): PIL images, local paths / `file://` URIs, raw bytes, numpy arrays,
torch tensors, `data:image/...;base64,` URIs and (opt-in) `http(s)://` URLs. Every failure is an
`ImageInputError` (a `ValueError`) whose one-line message says what is wrong and what to do.

Safety: byte caps on every source, a pixel cap checked from the header BEFORE decoding (decompression
bombs), a forced full decode (truncated files fail here, not later inside the model), race-free
`allowed_dir` confinement for paths (media_path.py), and SSRF protection plus whole-transfer deadlines
for URLs (fetch.py). Whatever a decoder raises (Pillow's plugins raise RuntimeError, NotImplementedError
subclasses, struct.error, ...) becomes an ImageInputError; an exception type not seen before is logged
once with its traceback, so a decoder bug is visible without an attacker filling the log.
"""

from __future__ import annotations

import io
import logging
import os
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image

from phi3v.processing.fetch import MIN_FETCH_RATE, FetchLimits, fetch_url
from phi3v.processing.media_errors import ImageInputError
from phi3v.processing.media_errors import fmt_size as _fmt_size
from phi3v.processing.media_errors import show as _show
from phi3v.processing.media_path import read_media_file
from phi3v.processing.media_source import data_uri_payload, local_path, scheme_of

__all__ = ["ImageInputError", "ImageSource", "MAX_IMAGE_BYTES", "MAX_IMAGE_PIXELS", "load_image", "read_image_source"]

log = logging.getLogger("phi3v.images")

MAX_IMAGE_PIXELS = 64 * 2**20  # default pixel cap (w*h), checked from the header before any decoding
MAX_IMAGE_BYTES = 50 * 2**20  # default byte cap for files, bytes, data URIs and downloads

_logged_types: set[str] = set()  # decoder exception types already logged with a traceback
SizeCheck = Callable[[int, int], None]  # called with (width, height) from the header, before the full decode


def _decoder_failed(e: BaseException, what: str, stage: str) -> ImageInputError:
    """An unexpected exception from a decoder -> ImageInputError; logged with its traceback the first time."""
    name = f"{type(e).__module__}.{type(e).__qualname__}"
    if name not in _logged_types:
        _logged_types.add(name)
        log.warning("image decoder raised %s while %s %s (logged once per exception type)", name, stage, what,
                    exc_info=e)
    else:
        log.info("image decoder raised %s while %s %s: %s", name, stage, what, e)
    return ImageInputError(f"{what} could not be decoded ({type(e).__name__}: {' '.join(str(e).split())[:200]}); "
                           "the data is corrupt or uses an unsupported variant of its format; re-export the image")


def _check_pil(img: Image.Image, what: str, max_pixels: int, check_size: SizeCheck | None = None) -> Image.Image:
    """Size checks on a (possibly still lazy) image, then a forced full decode."""
    w, h = img.size
    if w <= 0 or h <= 0:
        raise ImageInputError(f"{what} has zero width or height ({w}x{h}); provide a non-empty image")
    if w * h > max_pixels:
        raise ImageInputError(
            f"{what} is {w}x{h} = {w * h} pixels, over the limit of {max_pixels} (decompression-bomb guard); "
            "downscale it or raise max_pixels"
        )
    if check_size is not None:
        check_size(w, h)  # e.g. the request's token budget: refused before the pixels are decoded
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img.load()  # force the full decode now: truncated/corrupt data must fail here
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageInputError(f"{what} looks like a decompression bomb ({e}); downscale it") from None
    except (OSError, SyntaxError, ValueError, EOFError, MemoryError) as e:
        raise ImageInputError(f"{what} could not be decoded, the data is truncated or corrupt ({e}); re-export the image") from None
    except Exception as e:  # noqa: BLE001 - any decoder failure is the input's problem (RuntimeError from AVIF, ...)
        raise _decoder_failed(e, what, "decoding") from None
    return img


def _check_bytes(data: bytes, what: str, max_bytes: int) -> None:
    if len(data) == 0:
        raise ImageInputError(f"{what} is empty (0 bytes); provide a non-empty image file")
    if len(data) > max_bytes:
        raise ImageInputError(f"{what} is {_fmt_size(len(data))}, over the limit of {_fmt_size(max_bytes)}; use a smaller image")


def _decode_bytes(data: bytes, what: str, max_bytes: int, max_pixels: int,
                  check_size: SizeCheck | None = None) -> Image.Image:
    _check_bytes(data, what, max_bytes)
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
    except Exception as e:  # noqa: BLE001 - e.g. BLPFormatError (a NotImplementedError) from a header
        raise _decoder_failed(e, what, "opening") from None
    return _check_pil(img, what, max_pixels, check_size)


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


# ---------------------------------------------------------------- entry points


@dataclass
class ImageSource:
    """An image source read but not yet decoded: its encoded bytes (a file, a data URI, a download, bytes given
    as such), or the PIL image / uint8 array the caller gave. `digest_later()` names it cheaply, before any
    decode (the request preparer's memo of images already seen); `decode()` gives the checked PIL image."""

    data: bytes | Image.Image | np.ndarray
    what: str

    @property
    def size(self) -> tuple[int, int] | None:
        """(width, height) where known without decoding (a given image or array), else None."""
        d = self.data
        if isinstance(d, Image.Image):
            return d.size
        if isinstance(d, np.ndarray) and d.ndim >= 2:
            return int(d.shape[1]), int(d.shape[0])
        return None

    def digest_later(self) -> Callable[[], str]:
        """Start the sha256 of the encoded bytes, or of a given image's mode, size and pixels (a snapshot: the
        caller may change its image later), on threads; the returned function gives it."""
        from phi3v.processing.image import content_key_later  # image.py imports this module

        d = self.data
        if isinstance(d, bytes):
            return content_key_later(d, "bytes")
        if isinstance(d, Image.Image):  # what convert("RGB") reads: the raw bands, and a palette image's colours
            palette = bytes(d.getpalette() or b"") if d.mode in ("P", "PA") else b""
            return content_key_later(d.tobytes(), "pil", d.mode, d.size, palette, repr(d.info.get("transparency")))
        return content_key_later(np.ascontiguousarray(d), "array", d.dtype.str, d.shape)

    @property
    def nbytes(self) -> int:
        """Bytes the source holds: encoded bytes, or a given image's / array's pixels."""
        d = self.data
        if isinstance(d, bytes):
            return len(d)
        if isinstance(d, Image.Image):
            return d.width * d.height * len(d.getbands())
        return int(d.nbytes)

    def decode(self, max_pixels: int | None = None, check_size: SizeCheck | None = None) -> Image.Image:
        limit = MAX_IMAGE_PIXELS if max_pixels is None else int(max_pixels)
        d = self.data
        if isinstance(d, bytes):
            return _decode_bytes(d, self.what, len(d), limit, check_size)  # the byte cap was checked on reading
        if isinstance(d, Image.Image):
            return _check_pil(d, self.what, limit, check_size)
        img = _from_array(d, self.what, limit)
        if check_size is not None:
            check_size(*img.size)
        return img


def read_image_source(
    src: Any,
    *,
    allowed_dir: str | None = None,
    allow_paths: bool = True,
    allow_urls: bool = False,
    max_bytes: int = MAX_IMAGE_BYTES,
    timeout: float = 10.0,
    deadline: float | None = None,
    min_rate: float = MIN_FETCH_RATE,
) -> ImageSource:
    """Everything `load_image` does before decoding: the path, URL and byte-cap policies, a file read
    race-free under `allowed_dir`, a URL fetched, a data URI's base64 decoded. ImageInputError when refused."""
    if isinstance(src, Image.Image):
        return ImageSource(src, "image")
    if isinstance(src, (bytes, bytearray, memoryview)):
        data = bytes(src)
        _check_bytes(data, "image bytes", max_bytes)
        return ImageSource(data, "image bytes")
    if isinstance(src, torch.Tensor):
        if src.dtype != torch.uint8:
            raise ImageInputError(f"image tensor has dtype {src.dtype}; only torch.uint8 HWC tensors are accepted (values 0..255)")
        return ImageSource(src.detach().cpu().numpy(), "image tensor")
    if isinstance(src, np.ndarray):
        return ImageSource(src, "numpy image array")
    if isinstance(src, os.PathLike):
        src = os.fsdecode(os.fspath(src))
        if not allow_paths:
            raise ImageInputError("local image paths are not allowed here; send the image as base64 data instead")
        return _read_path(src, allowed_dir, max_bytes)
    if not isinstance(src, str):
        raise ImageInputError(f"unsupported image input type {type(src).__name__}; pass a PIL image, path, URL, bytes or uint8 array")
    if src[:5].lower() == "data:":
        return ImageSource(data_uri_payload(src.strip(), "image", max_bytes), "data URI image")
    scheme = scheme_of(src)
    if scheme in ("http", "https"):
        if not allow_urls:
            raise ImageInputError("image URLs are disabled here: enable them with LLM(..., allow_url_images=True) or "
                                  "`phi3v serve --allow-url-images`, or send the image as base64 data")
        return ImageSource(fetch_url(src, FetchLimits(max_bytes, timeout, deadline, min_rate)), f"image from {_show(src)}")
    return _read_path(local_path(src, scheme, "image", allow_paths), allowed_dir, max_bytes)


def _read_path(path: str, allowed_dir: str | None, max_bytes: int) -> ImageSource:
    return ImageSource(read_media_file(path, allowed_dir, max_bytes), f"image file {_show(path)}")


def load_image(src: Any, *, max_pixels: int | None = None, check_size: SizeCheck | None = None,
               **read: Any) -> Image.Image:
    """Return a fully loaded (decoded) PIL image for `src`; raise ImageInputError when unusable.

    `read`: `read_image_source`'s options (allowed_dir, allow_paths, allow_urls, max_bytes, timeout, deadline,
    min_rate). `max_pixels=None` uses the module-level `MAX_IMAGE_PIXELS` (read at call time). The returned image
    keeps its original mode; colour conversion is the image processor's job. A PIL image is returned as is (after
    checks). URLs: `timeout` bounds each socket operation, `deadline` the whole download (None: 3 x timeout), and
    a host slower than `min_rate` bytes/s on average is dropped after `timeout` seconds. With `allowed_dir`, a
    relative path is taken from that folder. `check_size(width, height)`, when given, runs on the header's size
    before the pixels are decoded (and may raise to refuse the image).
    """
    return read_image_source(src, **read).decode(max_pixels, check_size)
