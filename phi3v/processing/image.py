"""Phi-3-vision image processor: the reference "HD transform", reproduced bit for bit without torchvision.

Pipeline for one image (what Microsoft's `image_processing_phi3_v.py` does, step by step):

1. `convert("RGB")` on every mode: RGBA/LA lose alpha with no compositing, P+tRNS uses the palette colours,
   CMYK uses Pillow's naive formula, I;16 is clipped by Pillow. EXIF orientation is deliberately IGNORED:
   the reference never calls `exif_transpose`, and the model was trained/evaluated on what it produces.
2. Portrait images (w < h) are transposed to landscape, processed, and transposed back at the end. This is
   not cosmetic: PIL resamples horizontally first (rounding to uint8) and then vertically, so resizing the
   transposed image is what gives bit-identical pixels.
3. The long side becomes `s*336`, `s` the largest integer with `s * ceil(s/ratio) <= num_crops`; the short side
   `int(s*336/ratio)` (float division, floored, exactly as the reference computes it). Resize = PIL BILINEAR
   (antialiased), which is what torchvision's `resize` runs on a PIL image when given an explicit [h, w].
4. White (255) padding, centred, of the short side up to a multiple of 336 (top gets the floor half).
5. `(uint8/255 - mean)/std` in float32, the 336x336 sub-crops in row-major order, and a global view:
   bicubic `interpolate` of the whole normalised canvas (white bars included, no antialias, no clamping).

336 = CLIP ViT-L/14-336 input side (24x24 patches of 14 px). Each crop's 576 patch features are merged 2x2
into 12x12 = 144 tokens; every row of 12 tokens gets one newline separator (`sub_GN`), hence the `12`s below.

Deviation (the reference crashes here): when the short side rounds to 0 px (e.g. 1000x2 at num_crops=1,
6000x1 at any num_crops) we clamp it to 1 px and go on; the result is a valid, mostly white canvas.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import numbers
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from phi3v.processing.image_io import ImageInputError, load_image

CROP = 336  # CLIP ViT-L/14-336 input side, in pixels
TOKENS_PER_CROP = 144  # (336/14 / 2)^2: 24x24 patches merged 2x2 -> 12x12 tokens
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def num_image_tokens(h: int, w: int, tokens_per_crop: int = TOKENS_PER_CROP) -> int:
    """Image tokens for an (h, w) grid of 336-crops: h*w sub-crops + 1 global view of `tokens_per_crop` each,
    one `glb_GN` separator, and one `sub_GN` newline per token row (h*12 sub-grid rows + 12 global rows)."""
    side = math.isqrt(tokens_per_crop)  # 12 tokens per row of a crop
    return (h * w + 1) * tokens_per_crop + 1 + (h + 1) * side


def _check_num_crops(num_crops: Any) -> int:
    if isinstance(num_crops, bool) or not isinstance(num_crops, numbers.Integral) or num_crops < 1:
        raise ValueError(f"num_crops must be an integer >= 1 (number of 336x336 sub-crops), got {num_crops!r}")
    return int(num_crops)


def hd_resize_size(width: int, height: int, num_crops: int) -> tuple[int, int]:
    """(new_w, new_h) for a LANDSCAPE image (width >= height) before padding, as the reference computes it."""
    ratio = width / height
    scale = 1
    while scale * math.ceil(scale / ratio) <= num_crops:
        scale += 1
    scale -= 1  # >= 1 always, since ceil(1/ratio) == 1 for ratio >= 1
    new_w = int(scale * CROP)
    new_h = int(new_w / ratio)  # floored float division; NOT new_w*height//width (that can differ by 1)
    return new_w, max(new_h, 1)  # clamp: the reference crashes on 0 here (documented deviation)


def tokens_for_size(width: int, height: int, num_crops: int) -> int:
    """The image tokens `preprocess` will give an image of this size, from the size alone (no pixel is touched):
    the grid of the HD canvas that `hd_resized` + padding would build, transposed for portrait images."""
    nc = _check_num_crops(num_crops)
    long, short = max(width, height), min(width, height)
    new_w, new_h = hd_resize_size(long, max(short, 1), nc)
    rows, cols = math.ceil(new_h / CROP), new_w // CROP  # of the landscape canvas
    return num_image_tokens(cols, rows) if width < height else num_image_tokens(rows, cols)


def hd_resized(img: Image.Image, num_crops: int) -> tuple[np.ndarray, int, bool]:
    """RGB PIL image -> (pixels, target_h, transposed): the resized image as LANDSCAPE (new_h, new_w, 3) uint8
    (read-only), the canvas height it is padded to (a multiple of 336), and whether the canvas is the transpose
    of the padded landscape image (portrait inputs). `hd_canvas` assembles the canvas from these."""
    width, height = img.size
    transposed = width < height
    if transposed:  # handle portrait images as landscape, exactly like the reference (see module doc, step 2)
        img = img.transpose(Image.Transpose.TRANSPOSE)
        width, height = height, width
    new_w, new_h = hd_resize_size(width, height, num_crops)
    if (new_w, new_h) != (width, height):  # at the same size PIL's resize is a copy: skipped
        img = img.resize((new_w, new_h), Image.Resampling.BILINEAR)
    return np.asarray(img), math.ceil(new_h / CROP) * CROP, transposed


def pad_canvas(pixels: np.ndarray, target_h: int, out: np.ndarray | None = None) -> np.ndarray:
    """(new_h, W, 3) uint8 -> (target_h, W, 3): white padding, centred (reference: top = int((tar - h)/2), the
    bottom gets the remainder). Written into `out` when given (e.g. pinned memory), else a new array."""
    new_h = pixels.shape[0]
    top = (target_h - new_h) // 2
    canvas = np.empty((target_h, *pixels.shape[1:]), dtype=np.uint8) if out is None else out
    canvas[:top] = 255
    canvas[top + new_h:] = 255
    canvas[top: top + new_h] = pixels
    return canvas


def hd_canvas(img: Image.Image, num_crops: int) -> np.ndarray:
    """RGB PIL image -> (H, W, 3) uint8 white-padded HD canvas, H and W multiples of 336."""
    pixels, target_h, transposed = hd_resized(img, num_crops)
    canvas = pad_canvas(pixels, target_h)
    return np.ascontiguousarray(canvas.transpose(1, 0, 2)) if transposed else canvas


_HASH_CHUNK = 1 << 20
_hash_pool: ThreadPoolExecutor | None = None
_hash_pool_lock = threading.Lock()


def content_key_later(pixels: np.ndarray | bytes, *meta: Any) -> Callable[[], str]:
    """Start hashing; the returned function gives the key. Buffers of several MB are hashed in chunks on threads
    (hashlib lets go of the GIL) and the chunk digests hashed together: a single-threaded sha256 of a 16-crop
    canvas (5.4 MB) sits on the path to the first token, 8 chunks take a fraction of it (docs/perf-log.md, fifth
    session); the caller does its device work while the chunks hash."""
    global _hash_pool
    h = hashlib.sha256(repr((getattr(pixels, "shape", len(pixels)), *meta)).encode())
    buf = memoryview(pixels).cast("B")
    n = min(8, os.cpu_count() or 1, len(buf) // _HASH_CHUNK)
    if n < 2:
        h.update(buf)
        digest = h.hexdigest()[:32]
        return lambda: digest
    with _hash_pool_lock:  # one pool, whichever preparation thread comes first
        if _hash_pool is None:
            _hash_pool = ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1), thread_name_prefix="phi3v-hash")
    step = -(-len(buf) // n)
    futs = [_hash_pool.submit(lambda i: hashlib.sha256(buf[i: i + step]).digest(), i) for i in range(0, len(buf), step)]

    done: list[str] = []

    def key() -> str:  # the same string however often it is asked for
        if not done:
            for f in futs:
                h.update(f.result())
            done.append(h.hexdigest()[:32])
        return done[0]

    return key


@dataclass
class ProcessedImage:
    crops: torch.Tensor  # (1 + h*w, 3, 336, 336) float32 (or as asked): global view, then row-major sub-crops; no padding
    image_size: tuple[int, int]  # (H, W) of the padded HD canvas in pixels, multiples of 336
    num_tokens: int  # num_image_tokens(h, w)
    grid: tuple[int, int]  # (h, w) = (H // 336, W // 336)
    key: str = ""  # content key (content_key_later) of the resized pixels + padding: the crops (so the features) are a function of it


@dataclass
class ImageBatch:
    pixel_values: torch.Tensor  # (n_images, num_crops + 1, 3, 336, 336) float32, zero crops pad the tail
    image_sizes: torch.Tensor  # (n_images, 2) int64: [H, W] of each HD canvas
    num_img_tokens: torch.Tensor  # (n_images,) int64


class ImageProcessor:
    """Phi-3-vision / Phi-3.5-vision image processor (both use the same code; only the default num_crops differs)."""

    def __init__(
        self,
        num_crops: int = 16,
        image_mean: Sequence[float] = OPENAI_CLIP_MEAN,
        image_std: Sequence[float] = OPENAI_CLIP_STD,
    ) -> None:
        self.num_crops = _check_num_crops(num_crops)
        if len(image_mean) != 3 or len(image_std) != 3:
            raise ValueError("image_mean and image_std must have 3 entries (R, G, B)")
        self.image_mean = tuple(float(m) for m in image_mean)
        self.image_std = tuple(float(s) for s in image_std)
        # uint8 -> normalised float32 lookup table, (3, 256). Built with the reference's exact op sequence
        # (ToTensor: float32(v) / 255; Normalize: (x - mean_f32) / std_f32), so the table entries are bit-exact and
        # normalising the canvas is one gather instead of three passes of float math.
        mean = torch.tensor(self.image_mean, dtype=torch.float32)[:, None]
        std = torch.tensor(self.image_std, dtype=torch.float32)[:, None]
        levels = torch.arange(256, dtype=torch.uint8).to(torch.float32).div(255)
        self._lut = levels[None, :].expand(3, 256).sub(mean).div(std).contiguous().reshape(-1)  # (768,)
        self._luts: dict[torch.device, torch.Tensor] = {}  # the table on each device it was used on

    @classmethod
    def from_config(cls, cfg: Any) -> "ImageProcessor":
        """Build from a `phi3v.config.Phi3VConfig` (fields num_crops, image_mean, image_std)."""
        return cls(num_crops=cfg.num_crops, image_mean=cfg.image_mean, image_std=cfg.image_std)

    def normalize(self, canvas: np.ndarray | torch.Tensor) -> torch.Tensor:
        """(H, W, 3) uint8 -> (3, H, W) float32 `(v/255 - mean)/std`, on the device the canvas is on."""
        u8 = torch.from_numpy(canvas) if isinstance(canvas, np.ndarray) else canvas
        idx = u8.permute(2, 0, 1).to(torch.int64)  # (3, H, W) in 0..255
        idx += torch.arange(0, 3 * 256, 256, dtype=torch.int64, device=idx.device)[:, None, None]  # channel c reads lut[c*256:]
        lut = self._luts.get(idx.device)
        if lut is None:
            lut = self._luts.setdefault(idx.device, self._lut.to(idx.device))
        return lut[idx]  # gather -> contiguous (3, H, W)

    def preprocess(self, image: Any, num_crops: int | None = None, device: torch.device | str | None = None,
                   device_lock: Any = None, dtype: torch.dtype = torch.float32) -> ProcessedImage:
        """One image (anything `load_image` accepts) -> global view + sub-crops, without padding crops.

        `device`: where the crops are built. The PIL resize runs on the CPU either way; on a GPU the padded
        canvas goes through pinned memory, the normalisation is the same table lookup (bit-exact) and the
        bicubic global view agrees with the CPU's to float32 rounding (~1e-6), far inside the reference
        tolerance of 1e-4. `device_lock` (a context manager) is held around the device work only. `dtype`:
        of the returned crops (the float32 crops, rounded; the engine keeps them in the model's dtype)."""
        nc = self.num_crops if num_crops is None else _check_num_crops(num_crops)
        if not isinstance(image, Image.Image):
            image = load_image(image)
        if image.width <= 0 or image.height <= 0:
            raise ImageInputError(f"image has zero width or height ({image.width}x{image.height}); provide a non-empty image")
        # No exif_transpose on purpose: parity with the reference (see module doc, step 1).
        rgb = image if image.mode == "RGB" else image.convert("RGB")  # convert() to the same mode is a copy
        pixels, target_h, transposed = hd_resized(rgb, nc)  # (new_h, new_w, 3) uint8, landscape
        H, W = (pixels.shape[1], target_h) if transposed else (target_h, pixels.shape[1])
        # content key for the image-embedding cache: the resized pixels and the padding fix exactly what the
        # vision tower sees, whatever the input format or num_crops (hashed while the device work is queued)
        key = content_key_later(pixels, target_h, transposed)
        gh, gw = H // CROP, W // CROP
        dev = torch.device(device) if device is not None else torch.device("cpu")
        on_gpu = dev.type != "cpu"
        with device_lock if device_lock is not None and on_gpu else contextlib.nullcontext():
            if on_gpu:  # padded into pinned memory (CUDA; no fresh pages to fault in), copied without blocking;
                # uint8 travels (4x fewer bytes than the normalised floats), the device normalises
                staged = torch.empty((target_h, pixels.shape[1], 3), dtype=torch.uint8, pin_memory=dev.type == "cuda")
                pad_canvas(pixels, target_h, out=staged.numpy())
                canvas = staged.to(dev, non_blocking=True)
                canvas = canvas.transpose(0, 1) if transposed else canvas
            else:
                canvas = pad_canvas(pixels, target_h)
                canvas = canvas.transpose(1, 0, 2) if transposed else canvas
            hd = self.normalize(canvas)  # (3, H, W) float32
            # Global view: bicubic resize of the whole normalised canvas; overshoot beyond the range is kept (no clamp).
            glob = F.interpolate(hd[None], size=(CROP, CROP), mode="bicubic", align_corners=False)  # (1, 3, 336, 336)
            # (3, gh, 336, gw, 336) -> (gh, gw, 3, 336, 336): row-major sub-crops
            subs = hd.reshape(3, gh, CROP, gw, CROP).permute(1, 3, 0, 2, 4).reshape(gh * gw, 3, CROP, CROP)
            crops = torch.cat([glob, subs], dim=0).to(dtype)
        return ProcessedImage(crops=crops, image_size=(H, W), num_tokens=num_image_tokens(gh, gw), grid=(gh, gw),
                              key=key())

    def __call__(self, images: Any, num_crops: int | None = None) -> ImageBatch:
        """One image or a list of images -> padded batch, shaped like the reference's `pixel_values`."""
        nc = self.num_crops if num_crops is None else _check_num_crops(num_crops)
        if not isinstance(images, (list, tuple)):
            images = [images]
        if len(images) == 0:
            raise ValueError("no images given; pass one image or a non-empty list")
        done = [self.preprocess(im, nc) for im in images]
        # Zero crops pad every image to num_crops + 1 (zeros in normalised space = the CLIP mean colour).
        pixel_values = torch.zeros(len(done), nc + 1, 3, CROP, CROP, dtype=torch.float32)
        for i, p in enumerate(done):
            pixel_values[i, : p.crops.shape[0]] = p.crops
        return ImageBatch(
            pixel_values=pixel_values,
            image_sizes=torch.tensor([p.image_size for p in done], dtype=torch.int64).reshape(-1, 2),
            num_img_tokens=torch.tensor([p.num_tokens for p in done], dtype=torch.int64),
        )
