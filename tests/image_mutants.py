"""Images that Pillow opens but fails to decode with an exception other than OSError/ValueError (found by flipping
one byte of a small valid file): what the isolation tests feed the server, the API and the batch job."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def decoder_mutant(fmt: str, kinds: tuple[str, ...]) -> bytes:
    """A one-byte mutant of a small `fmt` image whose decode raises one of the exception types named in `kinds`."""
    img = Image.fromarray(np.random.RandomState(0).randint(0, 255, (32, 48, 3), dtype=np.uint8))
    buf = io.BytesIO()
    (img.convert("P") if fmt == "BLP" else img).save(buf, format=fmt)
    data = buf.getvalue()
    for i in range(min(400, len(data))):
        b = bytearray(data)
        b[i] ^= 0xFF
        try:
            Image.open(io.BytesIO(bytes(b))).load()
        except Exception as e:  # noqa: BLE001
            if type(e).__name__ in kinds:
                return bytes(b)
    raise AssertionError(f"no {fmt} mutant raised {kinds}")
