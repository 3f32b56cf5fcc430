"""The server's backlog keeps its crops off the GPU: past `device_waiting` accepted requests that are not
running, the front end moves a new request's crops to host memory (PreparedRequest.to_host). In-process,
with the engine thread not started, so that every request stays waiting."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from phi3v import LLM, SamplingParams
from phi3v.api import PreparedRequest
from phi3v.server.frontend import Frontend

@pytest.fixture(scope="module")
def img(golden_dir: Path) -> Path:
    return golden_dir / "images" / "astronaut.png"


@pytest.fixture(scope="module")
def llm(tiny_ckpt: str) -> LLM:
    return LLM(tiny_ckpt, device="cpu", max_num_seqs=2, max_model_len=512)


def test_requests_beyond_the_device_backlog_move_their_crops_to_the_host(llm: LLM, img: Path, monkeypatch) -> None:
    moved: list[int] = []
    orig = PreparedRequest.to_host
    monkeypatch.setattr(PreparedRequest, "to_host", lambda self: (moved.append(moved_from[-1]), orig(self)))
    fe = Frontend(llm, max_queue=8, load_kwargs={"allow_paths": True, "allowed_dir": str(img.parent)})
    fe.device_waiting = 2
    moved_from: list[int] = []

    async def submit_all() -> None:
        for i in range(5):
            moved_from.append(i)
            msgs = [{"role": "user", "content": [{"type": "image", "image": str(img)}, {"type": "text", "text": "Hi"}]}]
            await fe.submit(f"r{i}", msgs, SamplingParams(max_tokens=2), num_crops=1, n_images=1)

    try:
        asyncio.run(submit_all())
    finally:
        for pool in fe._pools.values():
            pool.shutdown(wait=True)
    assert fe.num_waiting == 5
    assert moved == [2, 3, 4]  # requests 0 and 1 are the 2 allowed to wait on the device; 2, 3 and 4 are moved


def test_to_host_keeps_the_values_and_the_tokens(llm: LLM, img: Path) -> None:
    """On the CPU there is nothing to move (the crops stay where they are); the request still runs to the
    same tokens as one that was never touched."""
    params = SamplingParams(max_tokens=6)
    a = llm.prepare("<|user|>\n<|image_1|>\nWhat is this?<|end|>\n<|assistant|>\n", [str(img)], params, 1)
    b = llm.prepare("<|user|>\n<|image_1|>\nWhat is this?<|end|>\n<|assistant|>\n", [str(img)], params, 1)
    crops = b.images[0].pixels()  # (built now if the image's features were cached: an earlier test's image)
    b.to_host()
    assert b.images[0].crops is crops and torch.equal(a.images[0].pixels(), b.images[0].crops)
    ta, tb = (c.token_ids for c in llm.generate_many([a, b]))
    assert ta == tb and len(ta) == 6
