"""OpenAI-compatible HTTP server: `phi3v serve` (needs the `serve` extra: fastapi, uvicorn, prometheus_client)."""

from __future__ import annotations

__all__ = ["Settings", "create_app"]


def __getattr__(name: str):  # keep `import phi3v.server` cheap; FastAPI loads on first use
    if name in __all__:
        from phi3v.server import app

        return getattr(app, name)
    raise AttributeError(name)
