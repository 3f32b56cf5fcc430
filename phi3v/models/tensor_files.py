"""Reading the tensors of a weight file, safetensors or PyTorch pickle (`.bin`), by name.

safetensors: memory-mapped, headers first (names and shapes without data). `.bin` (what `save_pretrained` wrote
before safetensors, and many fine-tuning scripts still do): `torch.load(weights_only=True)`, so that the file can
hold tensors and plain containers only, never code; memory-mapped where the file is in the zip format (every
torch >= 1.6), so reading the names does not read the data either.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from safetensors import safe_open

__all__ = ["TensorFile", "is_pickle"]


def is_pickle(path: str) -> bool:
    return path.endswith((".bin", ".pt", ".pth"))


class TensorFile:
    """`with TensorFile(path) as f:` f.keys(), f.shape(key), f.get(key) (a CPU tensor in the stored dtype)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._st: Any = None
        self._sd: dict[str, torch.Tensor] | None = None

    def __enter__(self) -> "TensorFile":
        if is_pickle(self.path):
            self._sd = _load_pickle(self.path)
        else:
            self._st = safe_open(self.path, framework="pt", device="cpu").__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._st is not None:
            self._st.__exit__(*exc)
        self._st = self._sd = None

    def keys(self) -> list[str]:
        return list(self._sd) if self._sd is not None else list(self._st.keys())

    def shape(self, key: str) -> tuple[int, ...]:
        if self._sd is not None:
            return tuple(self._sd[key].shape)
        return tuple(self._st.get_slice(key).get_shape())

    def get(self, key: str) -> torch.Tensor:
        return self._sd[key] if self._sd is not None else self._st.get_tensor(key)


def _load_pickle(path: str) -> dict[str, torch.Tensor]:
    name = os.path.basename(path)
    try:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:  # the legacy (pre zip) format cannot be memory-mapped: read it whole
            if "mmap" not in str(e) and "zip" not in str(e):
                raise
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - an unpickling error of weights_only is the caller's bad file
        raise ValueError(f"{name} cannot be read as a PyTorch state dict with weights_only=True "
                         f"(tensors only, no code): {type(e).__name__}: {' '.join(str(e).split())[:300]}") from None
    if not isinstance(sd, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items()):
        raise ValueError(f"{name} does not hold a state dict (a mapping of names to tensors)")
    return sd
