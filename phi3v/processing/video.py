"""Video input: N frames sampled evenly from a video file, which the model then sees as N images.

Phi-3.5-vision summarises a video (or a slide deck) from frames given as `<|image_1|>` ... `<|image_N|>`, each
tag on a line of its own before the question (the model card's multi-frame prompt). A `{"type": "video"}` or
`{"type": "video_url"}` content part (processing/chat.py) becomes N `VideoFrame`s there, in order.

Which frames: the video's F frames are cut into N equal runs and the middle frame of each is taken, frame
(2i + 1) * F // (2N) for i = 0..N-1 (a video shorter than N frames repeats some). F is counted from the
container's packets (no decoding); frames are then decoded in order up to the last one taken, and only those
are converted to images.

Sources and limits as for images (image_io.py): a local path (confined to `allowed_dir` without a race, media_path.py),
a `file://` URI, bytes, a `data:video/...;base64,` URI, or an http(s) URL when URLs are allowed (fetch.py);
`max_bytes` caps the file, `max_pixels` each frame (from the stream header before decoding, and again per decoded
frame), and `check_size(width, height)` runs once per sampled frame before any frame is decoded (the request's
token budget). Decoding uses PyAV (the optional extra `phi3v[video]`), imported on first use.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass, field
from typing import Any, Callable

from PIL import Image

from phi3v.extras import install_hint
from phi3v.processing.fetch import MIN_FETCH_RATE, FetchLimits, fetch_url
from phi3v.processing.media_errors import ImageInputError, fmt_size, show
from phi3v.processing.media_path import read_media_file
from phi3v.processing.media_source import data_uri_payload, local_path, scheme_of

__all__ = ["DEFAULT_FRAMES", "MAX_FRAMES", "MAX_VIDEO_BYTES", "VideoFrame", "VideoSource", "even_indices",
           "sample_frames"]

DEFAULT_FRAMES = 8  # frames per video when a part or the CLI gives no number
MAX_FRAMES = 64  # frames per video at most (each is an image of the prompt)
MAX_VIDEO_BYTES = 256 * 2**20  # default cap of one encoded video (the server passes its --max-image-bytes)
URL_HINT = ("enable them with LLM(..., allow_url_images=True) or `phi3v serve --allow-url-images`, or send the "
            "video as data:video/...;base64")
INSTALL_HINT = f"video input needs PyAV (the extra phi3v[video]): {install_hint('video')}"
SizeCheck = Callable[[int, int], None]


def even_indices(total: int, n: int) -> list[int]:
    """The middle frame of each of n equal runs of `total` frames (sorted; repeats when total < n)."""
    return [(2 * i + 1) * total // (2 * n) for i in range(n)]


def check_num_frames(n: Any, where: str = "num_frames") -> int:
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_FRAMES:
        raise ImageInputError(f"{where} must be an integer from 1 to {MAX_FRAMES}, got {n!r}")
    return n


def video_bytes(src: Any, *, allowed_dir: str | None = None, allow_paths: bool = True, allow_urls: bool = False,
                max_bytes: int = MAX_VIDEO_BYTES, timeout: float = 10.0, deadline: float | None = None,
                min_rate: float = MIN_FETCH_RATE) -> tuple[bytes, str]:
    """(the encoded video, how to name it in messages), under the same rules as images."""
    if isinstance(src, (bytes, bytearray, memoryview)):
        data, what = bytes(src), "video bytes"
    elif isinstance(src, os.PathLike) or isinstance(src, str):
        src = os.fsdecode(os.fspath(src)) if isinstance(src, os.PathLike) else src
        scheme = scheme_of(src)
        if src[:5].lower() == "data:":
            data, what = data_uri_payload(src.strip(), "video", max_bytes, ("application/octet-stream",)), "video data URI"
        elif scheme in ("http", "https"):
            if not allow_urls:
                raise ImageInputError(f"video URLs are disabled here: {URL_HINT}")
            data, what = fetch_url(src, FetchLimits(max_bytes, timeout, deadline, min_rate)), f"video from {show(src)}"
        else:
            src = local_path(src, scheme, "video", allow_paths)
            data, what = read_media_file(src, allowed_dir, max_bytes, kind="video"), f"video file {show(src)}"
    else:
        raise ImageInputError(f"unsupported video input type {type(src).__name__}; pass a path, URL, data URI or bytes")
    if not data:
        raise ImageInputError(f"{what} is empty (0 bytes); provide a non-empty video")
    if len(data) > max_bytes:
        raise ImageInputError(f"{what} is {fmt_size(len(data))}, over the limit of {fmt_size(max_bytes)}; "
                              "use a smaller video")
    return data, what


def _av() -> Any:
    try:
        import av
    except ImportError:
        raise ImageInputError(INSTALL_HINT) from None
    return av


def _check_pixels(w: int, h: int, what: str, max_pixels: int) -> None:
    if w * h > max_pixels:
        raise ImageInputError(f"{what} has frames of {w}x{h} = {w * h} pixels, over the limit of {max_pixels}; "
                              "downscale it")


def _pick(av: Any, data: bytes, indices: list[int], what: str, max_pixels: int) -> tuple[list[Image.Image], int]:
    """Decode in order up to the last index; (RGB images of `indices`, frames decoded)."""
    wanted: dict[int, int] = {}
    for i in indices:
        wanted[i] = wanted.get(i, 0) + 1
    out: list[Image.Image] = []
    n = 0
    with av.open(io.BytesIO(data), mode="r") as c:
        stream = c.streams.video[0]
        stream.thread_type = "AUTO"
        for frame in c.decode(stream):
            if n in wanted:
                _check_pixels(frame.width, frame.height, what, max_pixels)
                out += [frame.to_image().convert("RGB")] * wanted[n]
            n += 1
            if n > indices[-1]:
                break
    return out, n


def sample_frames(src: Any, num_frames: int, *, max_pixels: int | None = None, check_size: SizeCheck | None = None,
                  **source_kwargs: Any) -> list[Image.Image]:
    """`num_frames` RGB frames of the video `src`, sampled evenly (see the module's docstring)."""
    from phi3v.processing import image_io

    check_num_frames(num_frames)
    limit = image_io.MAX_IMAGE_PIXELS if max_pixels is None else int(max_pixels)
    data, what = video_bytes(src, **source_kwargs)
    av = _av()
    try:
        with av.open(io.BytesIO(data), mode="r") as c:
            if not c.streams.video:
                raise ImageInputError(f"{what} has no video stream")
            stream = c.streams.video[0]
            w, h = stream.codec_context.width, stream.codec_context.height
            _check_pixels(w, h, what, limit)
            total = sum(1 for p in c.demux(stream) if p.size)
        if total == 0:
            raise ImageInputError(f"{what} has no frames")
        if check_size is not None:
            for _ in range(num_frames):
                check_size(w, h)  # the token budget, before a frame is decoded
        frames, decoded = _pick(av, data, even_indices(total, num_frames), what, limit)
        if len(frames) < num_frames and decoded:  # fewer frames than packets: sample what decodes
            frames, _ = _pick(av, data, even_indices(decoded, num_frames), what, limit)
    except ImageInputError:
        raise
    except Exception as e:  # noqa: BLE001 - av.FFmpegError and whatever a demuxer raises: the input's problem
        raise ImageInputError(f"{what} could not be decoded as a video ({type(e).__name__}: "
                              f"{' '.join(str(e).split())[:200]}); check the file") from None
    if len(frames) != num_frames:
        raise ImageInputError(f"{what}: only {len(frames)} of {num_frames} frames could be decoded; check the file")
    return frames


@dataclass(eq=False)
class VideoSource:
    """One video of a request and its frame count; decodes once, when its first frame is asked for."""

    source: Any
    num_frames: int = DEFAULT_FRAMES
    _frames: list[Any] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        check_num_frames(self.num_frames)

    def frame(self, i: int, *, check_size: SizeCheck | None = None, **load_kwargs: Any) -> Image.Image:
        """Frame i of the sample. The first call decodes (calling `check_size` once per frame before it); each
        frame is handed out once and then dropped, so a prepared request does not hold the decoded video."""
        if self._frames is None:
            self._frames = list(sample_frames(self.source, self.num_frames, check_size=check_size, **load_kwargs))
        img, self._frames[i] = self._frames[i], None
        if img is None:
            raise ImageInputError(f"frame {i} of the video was already taken")
        return img


@dataclass(frozen=True, eq=False)
class VideoFrame:
    """Frame `index` of `video`: what an image slot of the prompt holds for a video part."""

    video: VideoSource
    index: int

    def load(self, **load_kwargs: Any) -> Image.Image:
        """The frame as a PIL image; takes `load_image`'s keyword arguments (the same limits as images)."""
        return self.video.frame(self.index, **load_kwargs)
