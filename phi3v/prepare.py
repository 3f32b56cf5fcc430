"""Requests in, PreparedRequests out: prompt text and image sources -> token ids and crops, every limit checked
before the work that costs (what `LLM.prepare` runs; the server, the batch job and Ray's CPU workers call it too).

An image seen recently is recognised before it is decoded. `ImageMemo` maps a cheap digest of the source (its
encoded bytes: a file, a data URI, a download; or a given image's pixels) to what the HD transform made of it:
the content key of the crops, the canvas size and the token count. When the engine still holds that image's
features (`pin`: they then stay until the request lets go), the request goes without crops (`ImageInput.load`
builds them, should the features be gone after all) and skips the decode, the resize, the crops' hash and their
copy to the GPU: a follow-up question or the next chat turn about an image starts at once. The content key, not
the digest, stays what the caches are keyed by, so the memo changes no output.
"""

from __future__ import annotations

import functools
import inspect
import threading
import time
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable

import torch

from phi3v.engine.graphs import CAPTURE_LOCK
from phi3v.engine.images import ImageInput
from phi3v.processing.chat import expand_placeholders, render_chat, tokenize_prompt
from phi3v.processing.image import ImageProcessor, ProcessedImage
from phi3v.processing.image_io import MAX_IMAGE_PIXELS, ImageInputError, ImageSource, read_image_source
from phi3v.processing.limits import TokenBudget, check_text
from phi3v.processing.tokenizer import Tokenizer
from phi3v.processing.video import VideoFrame
from phi3v.sampling_params import SamplingParams

__all__ = ["ImageMemo", "PreparedRequest", "Preparer"]


@dataclass
class PreparedRequest:
    prompt_ids: list[int]
    images: list[ImageInput]
    params: SamplingParams
    preprocess_s: float = 0.0

    def to_host(self) -> None:
        """Move the crops from the GPU to pinned host memory, for a request that will wait: a server's
        backlog then holds no GPU memory (~12 MB per 16-crop image in bf16). The engine copies them back
        when it encodes them; the values are unchanged."""
        for img in self.images:
            if img.crops is not None and img.crops.is_cuda:
                with CAPTURE_LOCK:  # a copy from the GPU must not run during a graph capture
                    host = torch.empty(img.crops.shape, dtype=img.crops.dtype, pin_memory=True)
                    host.copy_(img.crops)  # synchronous: the device tensor can go
                img.crops = host


@dataclass(frozen=True)
class MemoEntry:
    key: str  # the crops' content key (ProcessedImage.key)
    image_size: tuple[int, int]  # (H, W) of the HD canvas
    num_tokens: int
    source_size: tuple[int, int]  # (width, height) of the decoded image: the token budget and pixel cap


class ImageMemo:
    """(source digest, num_crops) -> MemoEntry for the `size` most recent images (thread-safe: preparation runs
    on several threads)."""

    def __init__(self, size: int = 256) -> None:
        self.size = size
        self._entries: OrderedDict[tuple[str, int], MemoEntry] = OrderedDict()
        self._sizes: dict[tuple[tuple[int, int], int], int] = {}  # (source size, num_crops) -> entries with it
        self._lock = threading.Lock()

    def has_size(self, source_size: tuple[int, int], num_crops: int) -> bool:
        """Whether any entry is an image of this size: if not, a given image is certainly new, and its digest
        need not be waited for before it is processed."""
        return (source_size, num_crops) in self._sizes

    def get(self, digest: str, num_crops: int) -> MemoEntry | None:
        with self._lock:
            entry = self._entries.get((digest, num_crops))
            if entry is not None:
                self._entries.move_to_end((digest, num_crops))
            return entry

    def put(self, digest: str, num_crops: int, entry: MemoEntry) -> None:
        with self._lock:
            old = self._entries.pop((digest, num_crops), None)
            if old is not None:
                self._count(old.source_size, num_crops, -1)
            self._entries[(digest, num_crops)] = entry
            self._count(entry.source_size, num_crops, +1)
            while len(self._entries) > self.size:
                (_, nc), gone = self._entries.popitem(last=False)
                self._count(gone.source_size, nc, -1)

    def _count(self, source_size: tuple[int, int], num_crops: int, delta: int) -> None:
        k = (source_size, num_crops)
        n = self._sizes.get(k, 0) + delta
        if n:
            self._sizes[k] = n
        else:
            self._sizes.pop(k, None)


class Preparer:
    """Turns a prompt and image sources into a PreparedRequest for an engine of context `context` tokens.
    `lora_index` refuses an adapter that is not loaded; `pin(key)` keeps an image's features in the engine's cache
    for a request prepared without its crops, if they are there (`unpin(key)` once the request lets go; None:
    crops are always made, e.g. on Ray's CPU workers, whose requests are pickled)."""

    def __init__(self, tokenizer: Tokenizer, image_processor: ImageProcessor, device: torch.device,
                 dtype: torch.dtype, context: int, *, allow_url_images: bool = False,
                 lora_index: Callable[[str], int] | None = None, pin: Callable[[str], bool] | None = None,
                 unpin: Callable[[str], None] | None = None) -> None:
        self.tokenizer, self.image_processor = tokenizer, image_processor
        self.device, self.dtype, self.context = device, dtype, context
        self.allow_url_images = allow_url_images
        if (pin is None) != (unpin is None):
            raise ValueError("Preparer: pass both pin and unpin, or neither")
        self.lora_index, self.pin, self.unpin = lora_index, pin, unpin
        self.memo = ImageMemo()

    def prepare(self, prompt: str, images: list[Any] | None = None, sampling_params: SamplingParams | None = None,
                num_crops: int | None = None, *, cancel: threading.Event | None = None,
                **load_kwargs: Any) -> PreparedRequest:
        """Prompt text in the chat format + image sources -> ids and crops. Raises ValueError (also for a request
        that cannot fit the context, found before the work that costs: from the text's length, then from each
        image's header size, before it is decoded or cropped), or limits.Cancelled once `cancel` is set."""
        t0 = time.perf_counter()
        if not isinstance(prompt, str):
            raise ValueError(f"prompt must be a string, got {type(prompt).__name__}")
        params = sampling_params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise ValueError("sampling_params must be a phi3v.SamplingParams")
        if params.lora is not None and self.lora_index is not None:
            self.lora_index(params.lora)  # an adapter that is not loaded: refused before any work
        check_text(prompt, self.context * self.tokenizer.max_token_chars)
        images = list(images or [])
        layout = tokenize_prompt(self.tokenizer, prompt, [1] * len(images))  # one placeholder per tag
        nc = self.image_processor.num_crops if num_crops is None else num_crops
        budget = TokenBudget(self.context, nc, cancel, text_tokens=sum(1 for i in layout if i >= 0))
        load_kwargs.setdefault("allow_urls", self.allow_url_images)
        max_pixels = load_kwargs.pop("max_pixels", None)
        inputs, counts = [], []
        for src in images:
            img, n = self._image(src, nc, budget, max_pixels, load_kwargs)
            inputs.append(img)
            counts.append(n)
        ids = expand_placeholders(layout, counts)
        if len(ids) >= self.context:
            raise ValueError(f"the prompt is {len(ids)} tokens (images included) but the context holds "
                             f"{self.context}: use fewer images, fewer crops (num_crops) or a shorter prompt")
        return PreparedRequest(ids, inputs, params, time.perf_counter() - t0)

    def prepare_chat(self, messages: list[dict[str, Any]], sampling_params: SamplingParams | None = None,
                     num_crops: int | None = None, *, cancel: threading.Event | None = None,
                     **load_kwargs: Any) -> PreparedRequest:
        prompt, images = render_chat(messages)
        return self.prepare(prompt, images, sampling_params, num_crops, cancel=cancel, **load_kwargs)

    # ---------------------------------------------------------------- one image
    def _image(self, src: Any, nc: int, budget: TokenBudget, max_pixels: int | None,
               load_kwargs: dict[str, Any]) -> tuple[ImageInput, int]:
        """-> (the ImageInput, its token count)."""
        if isinstance(src, VideoFrame):  # a frame of a video part (decoded, with the same limits, once)
            pil = src.load(check_size=budget.add_image, max_pixels=max_pixels, **load_kwargs)
            proc = self._crops(pil, nc)
            return ImageInput(proc.crops, proc.image_size, proc.key), proc.num_tokens
        source = read_image_source(src, **load_kwargs)  # policies and byte caps; nothing decoded yet
        budget.check_cancel()
        limit = MAX_IMAGE_PIXELS if max_pixels is None else int(max_pixels)
        pil = None
        if source.size is not None:  # a given image or array: its checks and full decode come first, as ever
            pil = source.decode(limit, check_size=budget.add_image)
        counted = pil is not None  # in the token budget
        digest = source.digest_later() if self.pin is not None else None  # hashing on threads
        if digest is not None and (source.size is None or self.memo.has_size(source.size, nc)):
            hit = self.memo.get(digest(), nc)
            if hit is not None and hit.source_size[0] * hit.source_size[1] <= limit:
                if not counted:
                    budget.add_image(*hit.source_size)  # the same token check the header would get
                    counted = True
                unpin = self._weak_unpin()  # (before the pin: nothing may fail between it and its finalizer)
                if self.pin(hit.key):
                    img = ImageInput(None, hit.image_size, hit.key, held=source.nbytes,
                                     load=self._loader(source, nc, limit, hit.key))
                    # released by the engine once it has the features, or when the request's objects go
                    img.release = weakref.finalize(img, _call_unpin, unpin, hit.key)
                    return img, hit.num_tokens
        if pil is None:
            pil = source.decode(limit, check_size=None if counted else budget.add_image)
        budget.check_cancel()
        proc = self._crops(pil, nc)
        if digest is not None:  # (a new image of a size not seen: its digest was hashed meanwhile)
            self.memo.put(digest(), nc, MemoEntry(proc.key, proc.image_size, proc.num_tokens, pil.size))
        # no loader: a waiting request holds its crops, not its source as well (a server's backlog is bounded by
        # what requests hold)
        return ImageInput(proc.crops, proc.image_size, proc.key), proc.num_tokens

    def _crops(self, pil: Any, nc: int) -> ProcessedImage:
        # the GPU part must not overlap a CUDA-graph capture on the engine's thread; crops in the model's dtype:
        # what CLIP casts them to first anyway, at half the memory of fp32 crops waiting on the device
        return self.image_processor.preprocess(pil, nc, device=self.device, device_lock=CAPTURE_LOCK, dtype=self.dtype)

    def _weak_unpin(self) -> Callable[[], Callable[[str], None] | None]:
        """-> a function giving `unpin`, holding its engine weakly when it is a bound method (a prepared request
        must not keep the engine alive)."""
        if inspect.ismethod(self.unpin):
            return weakref.WeakMethod(self.unpin)
        fn = self.unpin
        return lambda: fn

    def _loader(self, source: ImageSource, nc: int, limit: int, key: str) -> Callable[[], torch.Tensor]:
        # a function of the processor alone: a prepared request must not keep the Preparer (nor the engine) alive
        return functools.partial(_load_crops, self.image_processor, self.device, self.dtype, source, nc, limit, key)


def _load_crops(processor: ImageProcessor, device: torch.device, dtype: torch.dtype, source: ImageSource, nc: int,
                limit: int, key: str) -> torch.Tensor:
    """The crops of an image prepared without them, should they be needed after all (its pinned features gone
    anyway). They must be the crops the key names: an image changed in place since (a PIL image or array the
    caller reused) fails its request instead of filling the caches under that key."""
    proc = processor.preprocess(source.decode(limit), nc, device=device, device_lock=CAPTURE_LOCK, dtype=dtype)
    if proc.key != key:
        raise ImageInputError("the image changed after its request was prepared (an image or array edited in "
                              "place?); prepare the request again")
    return proc.crops


def _call_unpin(unpin: Callable[[], Callable[[str], None] | None], key: str) -> None:
    fn = unpin()  # None once the engine is gone: nothing to release
    if fn is not None:
        fn(key)
