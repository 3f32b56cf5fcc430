"""Images of requests, and the image-embedding cache in front of the vision tower.

Features are cached by content key (the processor's `content_key` of the resized image and its
padding, which fixes num_crops too), so the same image asked about twice is encoded once. A step's missing images are encoded
together, in vision batches of at most `batch_crops` crops (bounding activation memory).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch

from phi3v.device import to_device


@dataclass
class ImageInput:
    crops: torch.Tensor  # (1 + h*w, 3, 336, 336): global view + sub-crops, no padding crops
    image_size: tuple[int, int]  # (H, W) of the padded HD canvas
    key: str | None = None  # content key for the caches (None: Engine.add_request hashes the crops)


class ImageFeatures:
    """Projected features (n_tokens, hidden) per image key: an LRU cache of `size` entries that never
    evicts an image the current step needs."""

    def __init__(self, model: torch.nn.Module, tower: Any, device: torch.device, size: int = 32,
                 batch_crops: int = 128) -> None:
        self.model, self.tower, self.device = model, tower, device
        self.cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.size, self.batch_crops = size, batch_crops

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.cache[key]

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
            while items and (not group or n + items[0][1].crops.shape[0] <= self.batch_crops):
                group.append(items.pop(0))
                n += group[-1][1].crops.shape[0]
            feats = self.model.encode_images([to_device(i.crops, self.device) for _, i in group],
                                             [i.image_size for _, i in group], tower=self.tower)
            stats["images_encoded"] += len(group)
            for (key, _), f in zip(group, feats):
                self.cache[key] = f
        # hits were moved to the end and new entries appended: the newest len(needed) are this step's
        while len(self.cache) > max(self.size, len(needed)):
            self.cache.popitem(last=False)
