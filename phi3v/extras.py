"""What to run for a missing optional dependency. phi3v is installed from its checkout (it is not on PyPI), so
installing `phi3v[serve]` by name cannot work: the hint names the checkout's editable install, and the packages."""

from __future__ import annotations

PACKAGES = {"serve": "fastapi uvicorn pydantic prometheus_client", "ray": "'ray[data,serve]' pyarrow datasets tqdm",
            "video": "av"}


def install_hint(extra: str) -> str:
    """`pip install -e '.[extra]'` from the phi3v checkout, or the extra's packages alone."""
    return (f"pip install -e '.[{extra}]' in the phi3v checkout (phi3v is not on PyPI), "
            f"or pip install {PACKAGES[extra]}")
