"""KV blocks: reference counts, the prefix cache, and the hash chain that names a block's contents.

A block holding a full run of `block_size` prefilled tokens is registered under the hash of everything that
fixes its K/V: the previous block's hash, its token ids, for image placeholders the image's content key and
the offset within that image, the LongRoPE regime (short- and long-factor keys never mix) and the per-request
LoRA adapter (K/V computed with one adapter is never reused for another, nor for the base model). A later
sequence whose prompt starts with the same tokens takes those blocks (reference count + 1) instead of
computing them. A block nobody holds stays in the cache, and is reused for other contents only when no
never-cached free block is left, least recently released first.

Pure Python and numpy (no torch): tested on the CPU alone.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

import numpy as np


def block_hashes(ids: list[int], image_keys: list[str], block_size: int, long_rope: bool,
                 adapter: str | None = None) -> list[bytes]:
    """Hashes of the full blocks of `ids`, a chain (each covers every token before it).
    ids: token ids with image k's placeholders as -k (image_keys[k-1] names its content: the key fixes the
    resized image and its crop grid, so its token count too). adapter: the per-request LoRA adapter the K/V is
    computed with (None: the base model), part of the chain's root: no block is shared across adapters."""
    n_full = len(ids) // block_size
    if n_full == 0:
        return []
    arr = np.asarray(ids[: n_full * block_size], dtype=np.int64)
    # offset of each placeholder within its image's run (a run starts where the id changes)
    neg = arr < 0
    idx = np.arange(len(arr))
    run_start = np.maximum.accumulate(np.where(neg & np.r_[True, arr[1:] != arr[:-1]], idx, 0))
    pairs = np.stack([arr, np.where(neg, idx - run_start, 0)], 1).reshape(n_full, 2 * block_size)  # token, offset
    has_image = arr.reshape(n_full, block_size).min(1) < 0
    keys = [k.encode() for k in image_keys]
    h = (b"long" if long_rope else b"short") + (b"" if adapter is None else b"|lora:" + adapter.encode())
    out = []
    for b in range(n_full):
        d = hashlib.blake2b(h, digest_size=16)
        d.update(pairs[b].tobytes())
        if has_image[b]:
            for k in sorted(set(pairs[b, 0::2][pairs[b, 0::2] < 0].tolist()), reverse=True):
                d.update(keys[-k - 1])
        h = d.digest()
        out.append(h)
    return out


class BlockPool:
    def __init__(self, num_blocks: int, enable_caching: bool = True) -> None:
        self.num_blocks, self.enable_caching = num_blocks, enable_caching
        self.refs = [0] * num_blocks
        self.hash_of: list[bytes | None] = [None] * num_blocks
        self.cached: dict[bytes, int] = {}  # hash -> the block that holds those contents
        self.free_plain: list[int] = list(range(num_blocks - 1, -1, -1))  # pop() hands out low ids first
        self.free_cached: OrderedDict[int, None] = OrderedDict()  # free blocks with contents, oldest first
        self.hits = self.queries = 0  # tokens, for the hit rate

    @property
    def num_free(self) -> int:
        """Blocks that can be handed out now (never-cached ones, and cached ones nobody holds)."""
        return len(self.free_plain) + len(self.free_cached)

    @property
    def usage(self) -> float:
        """Fraction of blocks held by sequences."""
        return 1.0 - self.num_free / self.num_blocks

    def lookup(self, hashes: list[bytes]) -> list[int]:
        """The blocks of the longest cached prefix of `hashes` (not taken yet: see `take`)."""
        out = []
        if self.enable_caching:
            for h in hashes:
                b = self.cached.get(h)
                if b is None:
                    break
                out.append(b)
        return out

    def take(self, blocks: list[int]) -> None:
        """Hold cached blocks (a prefix hit): one more reference each."""
        for b in blocks:
            if self.refs[b] == 0:
                del self.free_cached[b]
            self.refs[b] += 1

    def allocate(self, n: int) -> list[int]:
        """n blocks for new contents: never-cached ones first, then the least recently released cached ones
        (their hashes forgotten). The caller checks num_free first."""
        if n > self.num_free:
            raise RuntimeError(f"{n} KV blocks asked for, {self.num_free} free")
        out = []
        for _ in range(n):
            if self.free_plain:
                b = self.free_plain.pop()
            else:
                b, _ = self.free_cached.popitem(last=False)
                del self.cached[self.hash_of[b]]  # type: ignore[index]
                self.hash_of[b] = None
            self.refs[b] = 1
            out.append(b)
        return out

    def release(self, blocks: list[int]) -> None:
        """Drop one reference of each block; a block nobody holds becomes free, keeping its contents in the
        cache if it has a hash. Given in table order, the last blocks of a sequence are reused first."""
        for b in reversed(blocks):
            self.refs[b] -= 1
            if self.refs[b] < 0:
                raise RuntimeError(f"KV block {b} released more often than taken")
            if self.refs[b] == 0:
                if self.hash_of[b] is not None:
                    self.free_cached[b] = None
                else:
                    self.free_plain.append(b)

    def register(self, block: int, h: bytes) -> None:
        """Offer a full, computed block to the cache under hash h (kept out if those contents are cached)."""
        if self.enable_caching and h not in self.cached and self.hash_of[block] is None:
            self.cached[h] = block
            self.hash_of[block] = h

    def reset_cache(self) -> None:
        """Forget every cached block's contents (e.g. the weights changed)."""
        for b in list(self.free_cached):
            self.free_plain.append(b)
        self.free_cached.clear()
        self.cached.clear()
        self.hash_of = [None] * self.num_blocks
