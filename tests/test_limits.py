"""Pre-work limits (processing/limits.py): the token count from an image's size alone equals what the image
processor makes; a request that cannot fit is refused before its images are decoded or cropped; text that
cannot fit or cannot be encoded is refused before it is tokenized."""

from __future__ import annotations

import io
import random
import threading
from unittest import mock

import pytest
from PIL import Image

from phi3v.processing import image as image_mod
from phi3v.processing.image import ImageProcessor, tokens_for_size
from phi3v.processing.image_io import ImageInputError
from phi3v.processing.limits import Cancelled, check_text

from engine_common import CKPT as TINY


def test_tokens_from_size_match_the_processor() -> None:
    proc = ImageProcessor()
    rng = random.Random(0)
    sizes = [(1, 1), (1000, 2), (2, 1000), (336, 336), (337, 336), (672, 335), (10, 500), (6000, 1)]
    sizes += [(rng.randint(1, 1500), rng.randint(1, 1500)) for _ in range(6)]
    for w, h in sizes:
        for nc in (1, 3, 7):  # grids 1x1 .. 3x2 / 2x3 and the uneven ones between
            got = proc.preprocess(Image.new("RGB", (w, h)), nc).num_tokens
            assert tokens_for_size(w, h, nc) == got, (w, h, nc)
    for w, h in [(900, 100), (100, 900)]:  # the checkpoint default, 16 (large canvases: few)
        assert tokens_for_size(w, h, 16) == proc.preprocess(Image.new("RGB", (w, h)), 16).num_tokens, (w, h)


def test_check_text() -> None:
    check_text("hello", 5)
    with pytest.raises(ValueError, match="6 characters"):
        check_text("hello!", 5)
    with pytest.raises(ValueError, match="surrogate .*U\\+D800.* at character 1"):
        check_text("a\ud800b", 100)


@pytest.fixture(scope="module")
def llm():
    from phi3v.api import LLM

    return LLM(TINY, device="cpu", dtype="fp32", max_num_seqs=2, max_model_len=1024)


def _png(w: int, h: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (10, 20, 30)).save(buf, format="PNG")
    return buf.getvalue()


def test_images_over_the_context_refused_before_decode_or_crop(llm) -> None:
    big = _png(2000, 2000)  # 16 crops: 2509 tokens, over 1024 by itself
    prompt = "<|user|>\n<|image_1|>\n<|image_2|>\nhi<|end|>\n<|assistant|>\n"
    with mock.patch.object(Image.Image, "load", side_effect=AssertionError("decoded")), \
         mock.patch.object(image_mod, "hd_resized", side_effect=AssertionError("cropped")):
        with pytest.raises(ImageInputError, match="image 1 .*2000x2000.* context holds 1024"):
            llm.prepare(prompt, [big, big], num_crops=16)
    p = llm.prepare(prompt, [_png(40, 30), _png(30, 40)], num_crops=1)  # fits: ids laid out as before
    assert sum(1 for i in p.prompt_ids if i == -1) == tokens_for_size(40, 30, 1)
    assert sum(1 for i in p.prompt_ids if i == -2) == tokens_for_size(30, 40, 1)


def test_huge_and_invalid_text_refused_before_tokenizing(llm) -> None:
    with mock.patch.object(llm.tokenizer._tok, "encode", side_effect=AssertionError("tokenized")):
        with pytest.raises(ValueError, match="characters"):
            llm.prepare("x" * (1024 * llm.tokenizer.max_token_chars + 1))
        with pytest.raises(ValueError, match="surrogate"):
            llm.prepare_chat([{"role": "system", "content": "be \udfff nice"}, {"role": "user", "content": "hi"}])
    with pytest.raises(ValueError, match="surrogate"):
        llm.tokenizer.encode("\ud800")


def test_cancel_stops_preparation(llm) -> None:
    ev = threading.Event()
    ev.set()
    with pytest.raises(Cancelled):
        llm.prepare("<|user|>\n<|image_1|>\nhi<|end|>\n<|assistant|>\n", [_png(40, 30)], num_crops=1, cancel=ev)
