"""Images of requests, and the image-embedding cache in front of the vision tower.

Features are cached by content key (the processor's `content_key` of the resized image and its
padding, which fixes num_crops too), so the same image asked about twice is encoded once. A step's missing images are encoded
together, in vision batches of at most `batch_crops` crops (bounding activation memory).
"""

from __future__ import annotations

import threading
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Any, Callable

import torch

from phi3v.device import to_device


@dataclass
class ImageInput:
    """One image of a request. `crops` may be None when the request was prepared without them (its image was
    recognised as one whose features the engine holds: a follow-up question); `load` then builds them, should the
    features have gone by the time they are needed."""

    crops: torch.Tensor | None  # (1 + h*w, 3, 336, 336): global view + sub-crops, no padding crops
    image_size: tuple[int, int]  # (H, W) of the padded HD canvas
    key: str | None = None  # content key for the caches (None: Engine.add_request hashes the crops)
    load: Callable[[], torch.Tensor] | None = None  # -> crops, for crops=None
    held: int = 0  # bytes `load` keeps alive (the encoded source), for memory accounting while it waits
    release: Callable[[], Any] | None = None  # drops the image-cache pin of a request prepared without crops

    @property
    def nbytes(self) -> int:
        """Bytes this image holds while its request waits: its crops and what its loader keeps."""
        return (self.crops.numel() * self.crops.element_size() if self.crops is not None else 0) + self.held

    def done(self) -> "ImageInput":
        """What a sequence keeps once its features are taken (or not needed): the size and key; the pin, if any,
        released now rather than when the caller's objects go."""
        if self.release is not None:
            self.release()
        return ImageInput(None, self.image_size, self.key)

    def __getstate__(self) -> dict[str, Any]:
        """Pickled with its crops (built first if need be): a loader is a closure over this process."""
        return {"crops": self.pixels() if self.load is not None else self.crops, "image_size": self.image_size,
                "key": self.key, "load": None, "held": 0, "release": None}

    def pixels(self) -> torch.Tensor:
        """The crops, built now by `load` if the request came without them."""
        if self.crops is None:
            if self.load is None:
                raise RuntimeError(f"image {self.key}: its crops were dropped and it has no loader")
            self.crops = self.load()
        return self.crops


class ImageFeatures:
    """Projected features (n_tokens, hidden) per image key: an LRU cache of `size` entries that never
    evicts an image the current step needs, nor one pinned by a request prepared without its crops."""

    def __init__(self, model: torch.nn.Module, tower: Any, device: torch.device, size: int = 32,
                 batch_crops: int = 128) -> None:
        self.model, self.tower, self.device = model, tower, device
        self.cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.size, self.batch_crops = size, batch_crops
        self.side = model.config.vision.image_size  # a crop's side in pixels: the canvas is a grid of them
        self.pins: dict[str, int] = {}  # key -> requests prepared without crops that wait for these features
        self._lock = threading.Lock()  # pins are taken on preparation threads, entries evicted on the engine's
        # released pins, counted down under the lock by the next pin() or eviction: a release may come from a
        # garbage collector's finalizer on any thread, even one inside `with self._lock` (no lock taken there)
        self._released: deque[str] = deque()

    def pin(self, key: str) -> bool:
        """Keep `key`'s features until `unpin(key)`: a request prepared without its crops waits for them. False
        (nothing pinned) when they are not cached, or `size` images are pinned already: the request then brings
        its crops, so pinned features never hold more than twice the cache's memory."""
        with self._lock:
            self._count_released()
            if key not in self.cache or (key not in self.pins and len(self.pins) >= self.size):
                return False
            self.pins[key] = self.pins.get(key, 0) + 1
            return True

    def pinned(self) -> dict[str, int]:
        """key -> pins held now (releases counted)."""
        with self._lock:
            self._count_released()
            return dict(self.pins)

    def unpin(self, key: str) -> None:
        """Release one pin of `key`. Takes no lock (see `_released`)."""
        self._released.append(key)

    def _count_released(self) -> None:
        # under self._lock
        while self._released:
            key = self._released.popleft()
            n = self.pins.get(key, 0) - 1
            if n > 0:
                self.pins[key] = n
            else:
                self.pins.pop(key, None)

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.cache[key]

    def __contains__(self, key: str) -> bool:
        return key in self.cache

    def num_crops(self, img: ImageInput) -> int:
        """1 + h*w: the global view and the sub-crops of its (H, W) canvas (known without its crops)."""
        return 1 + (img.image_size[0] // self.side) * (img.image_size[1] // self.side)

    def encode(self, images: list[ImageInput], stats: dict[str, Any]) -> None:
        """Make every image of `images` available, encoding those not cached (counted in `stats`)."""
        todo: dict[str, ImageInput] = {}
        needed: set[str] = set()
        for img in images:
            needed.add(img.key)
            if img.key in self.cache:
                self.cache.move_to_end(img.key)
                stats["image_cache_hits"] += 1
            elif img.key not in todo:
                todo[img.key] = img
        items = list(todo.items())
        while items:
            group, n = [], 0
            while items and (not group or n + self.num_crops(items[0][1]) <= self.batch_crops):
                group.append(items.pop(0))
                n += self.num_crops(group[-1][1])
            feats = self.model.encode_images([to_device(i.pixels(), self.device) for _, i in group],
                                             [i.image_size for _, i in group], tower=self.tower)
            stats["images_encoded"] += len(group)
            for (key, _), f in zip(group, feats):
                self.cache[key] = f
        # least recently used first, never one this step needs or one a waiting request pinned
        with self._lock:
            self._count_released()
            excess = len(self.cache) - self.size
            if excess > 0:
                for key in [k for k in self.cache if k not in needed and k not in self.pins][:excess]:
                    del self.cache[key]
