"""What the front end decides about a request before and right after its preparation: which thread pool
prepares it (so that one kind of work cannot starve another), and whether the memory held by requests that
wait (their prepared crops and ids) leaves room for it."""

from __future__ import annotations

import threading
from typing import Any

MAX_WAITING_BYTES = 8 * 2**30  # default bound on bytes held by accepted requests not yet prefilled


class QueueFull(Exception):
    """Too many requests (or too many bytes) are waiting; try again after `retry_after` seconds."""

    def __init__(self, retry_after: int = 1, why: str = "too many requests are waiting") -> None:
        super().__init__(f"the server is at capacity: {why}; retry later")
        self.retry_after = retry_after


class PreparationError(ValueError):
    """Preparation raised something unexpected: the request's input is blamed (400), the traceback logged."""

    code = "invalid_request"


def pool_kind(messages: list[dict[str, Any]]) -> str:
    """'fetch' when an image part is an http(s) URL (slow hosts wait on their own threads), 'images' for other
    image parts, 'text' when there is none (a text request never queues behind cropping)."""
    kind = "text"
    for m in messages:
        for p in m.get("content") if isinstance(m.get("content"), list) else ():
            if not isinstance(p, dict) or p.get("type") not in ("image_url", "image", "video_url", "video"):
                continue
            kind = "images"
            key = p["type"]
            url = (p.get(key) or {}).get("url", "") if key.endswith("_url") else p.get(key)
            if isinstance(url, str) and url[:8].lower().startswith(("http://", "https://")):
                return "fetch"
    return kind


def prepared_bytes(prep: Any) -> int:
    """Host or device bytes a prepared request holds until its prefill: crops (or the source an image prepared
    without them keeps for its loader) and prompt ids (8 bytes each as list slots; small ints are shared)."""
    return sum(img.nbytes for img in prep.images) + 8 * len(prep.prompt_ids)


class WaitingBytes:
    """The bytes held by prepared requests that have not been prefilled yet, bounded by `limit`. A request is
    always admitted when nothing else waits, so one large request is never refused forever."""

    def __init__(self, limit: int) -> None:
        self.limit, self.held = limit, 0
        self._lock = threading.Lock()

    def full(self) -> bool:
        return self.held >= self.limit

    def add(self, n: int) -> bool:
        with self._lock:
            if self.held > 0 and self.held + n > self.limit:
                return False
            self.held += n
            return True

    def release(self, n: int) -> None:
        with self._lock:
            self.held -= n

    def why(self) -> str:
        return (f"waiting requests hold {self.held} bytes of prepared images (limit {self.limit}, "
                "--max-waiting-bytes)")
