"""An image seen before is recognised before it is decoded (phi3v/prepare.py): a request about an image whose
features the engine holds comes without crops, gives the tokens of the slow reference generator, and builds its
crops after all (ImageInput.load) if the features are gone by the time it runs. A prefix-cache hit that covers
the images needs no features at all."""

from __future__ import annotations

import base64
import gc
import io
import os
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from phi3v import LLM, SamplingParams
from phi3v.prepare import ImageMemo, MemoEntry
from phi3v.processing.image_io import ImageInputError

from engine_common import CKPT, image_path, reference_tokens

# PHI3V_TEST_DEVICE=cuda runs these on the GPU (crops built there, CUDA graphs; device_call.sh gpu_tests)
DEVICE = os.environ.get("PHI3V_TEST_DEVICE", "cpu")


@pytest.fixture(scope="module")
def llm() -> LLM:
    """An engine of its own: these tests pin, clear and resize its image cache."""
    if DEVICE != "cpu":
        torch.backends.cuda.matmul.allow_tf32 = False  # the reference's numbers
        torch.backends.cudnn.allow_tf32 = False
    return LLM(CKPT, device=DEVICE, dtype="fp32", max_num_seqs=6, max_model_len=4096)


Q1 = "<|user|>\n<|image_1|>\nWhat is it?<|end|>\n<|assistant|>\n"
Q2 = "<|user|>\nLook: <|image_1|>\nAnd the colours?<|end|>\n<|assistant|>\n"  # differs before the image


def _data_uri(path: str) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode()


def _sources(path: str) -> dict[str, object]:
    data = Path(path).read_bytes()
    return {"path": path, "bytes": data, "data_uri": _data_uri(path), "pil": Image.open(io.BytesIO(data)).convert("RGB")}


@pytest.mark.parametrize("kind", ["path", "bytes", "data_uri", "pil"])
def test_an_image_seen_before_comes_without_crops_and_gives_the_reference_tokens(llm: LLM, kind: str) -> None:
    src = _sources(image_path("astronaut"))[kind]
    first = llm.prepare(Q1, [src], SamplingParams(max_tokens=5), 2)
    llm.generate_many([first])  # encodes the image: its features are in the engine's cache now
    again = llm.prepare(Q2, [src], SamplingParams(max_tokens=5), 2)
    img = again.images[0]
    assert img.crops is None and img.load is not None
    assert (img.key, img.image_size, again.prompt_ids.count(-1)) == (
        first.images[0].key, first.images[0].image_size, first.prompt_ids.count(-1))
    before = dict(llm.engine.stats)
    got = llm.generate_many([again])[0].token_ids
    assert llm.engine.stats["images_encoded"] == before["images_encoded"]  # the cached features served it
    assert got == reference_tokens(llm, llm.prepare(Q2, [src], SamplingParams(max_tokens=5), 2), 5)


def test_features_gone_before_the_run_are_rebuilt_from_the_source(llm: LLM) -> None:
    src = _data_uri(image_path("coffee"))
    llm.generate(Q1, [src], SamplingParams(max_tokens=2), 1)
    lazy = llm.prepare(Q2, [src], SamplingParams(max_tokens=6), 1)
    assert lazy.images[0].crops is None
    llm.engine.runner.images.cache.clear()  # evicted between preparation and the step that needs them
    llm.engine.reset_prefix_cache()
    before = llm.engine.stats["images_encoded"]
    got = llm.generate_many([lazy])[0].token_ids
    assert llm.engine.stats["images_encoded"] == before + 1
    assert got == reference_tokens(llm, lazy, 6)  # (the reference reads the crops the loader built)


def test_a_follow_up_covered_by_the_prefix_cache_needs_no_features(llm: LLM) -> None:
    src = image_path("page_L")
    q1 = ("<|user|>\n<|image_1|>\nWhat is it? Describe every detail you can see in this picture: the shapes, "
          "the colours, the text, and anything else of note.<|end|>\n<|assistant|>\n")  # full blocks past the image
    first = llm.generate(q1, [src], SamplingParams(max_tokens=3), 1)  # 1 crop: every length stays short-RoPE
    follow = q1 + first.text + "<|end|>\n<|user|>\nAnd the colours?<|end|>\n<|assistant|>\n"
    llm.engine.runner.images.cache.clear()  # neither features nor crops are needed: the blocks hold the image
    req = llm.prepare(follow, [src], SamplingParams(max_tokens=4), 1)
    assert req.images[0].crops is not None  # features not cached: prepared with its crops
    before = dict(llm.engine.stats)
    got = llm.generate_many([req])[0]
    assert got.usage["prompt_tokens_details"]["cached_tokens"] > req.prompt_ids.count(-1)
    assert llm.engine.stats["images_encoded"] == before["images_encoded"]
    assert llm.engine.stats["image_cache_hits"] == before["image_cache_hits"]
    assert got.token_ids == reference_tokens(llm, req, 4)


def test_a_changed_file_is_a_new_image(llm: LLM, tmp_path: Path) -> None:
    path = tmp_path / "img.png"
    shutil.copyfile(image_path("astronaut"), path)
    a = llm.generate(Q1, [str(path)], SamplingParams(max_tokens=2), 1)
    shutil.copyfile(image_path("logo_RGBA"), path)  # same name, other content
    req = llm.prepare(Q2, [str(path)], SamplingParams(max_tokens=2), 1)
    assert req.images[0].crops is not None and req.images[0].key != llm.prepare(
        Q1, [image_path("astronaut")], SamplingParams(max_tokens=2), 1).images[0].key
    assert a.token_ids  # (ran)


def test_limits_still_hold_for_an_image_seen_before(llm: LLM) -> None:
    src = image_path("astronaut")
    llm.generate(Q1, [src], SamplingParams(max_tokens=1), 4)  # 757 tokens at 4 crops; features cached
    assert llm.prepare(Q2, [src], SamplingParams(max_tokens=1), 4).images[0].crops is None  # a memo hit
    with pytest.raises(ImageInputError, match="over the limit"):
        llm.prepare(Q2, [src], SamplingParams(max_tokens=1), 4, max_pixels=100)  # pixel cap lowered since
    many = "<|user|>\n" + "".join(f"<|image_{k}|>\n" for k in range(1, 7)) + "Compare.<|end|>\n<|assistant|>\n"
    pins = llm.engine.runner.images.pinned()
    with pytest.raises(ImageInputError, match="context holds 4096"):  # 6 x 757: the budget from the memo's size
        llm.prepare(many, [src] * 6, SamplingParams(max_tokens=1), 4)
    gc.collect()
    assert llm.engine.runner.images.pinned() == pins  # a refused request holds no pin
    with pytest.raises(ImageInputError, match="not allowed"):
        llm.prepare(Q2, [src], SamplingParams(max_tokens=1), 4, allow_paths=False)  # policies before the memo


def test_image_memo_keeps_the_most_recent() -> None:
    memo = ImageMemo(size=2)
    e = MemoEntry("k", (336, 336), 157, (10, 10))
    memo.put("a", 1, e)
    memo.put("b", 1, e)
    assert memo.get("a", 1) is e  # a is now the most recent
    memo.put("c", 1, e)
    assert memo.get("b", 1) is None and memo.get("a", 1) is e and memo.get("c", 1) is e
    assert memo.get("a", 2) is None  # num_crops is part of the key
    assert memo.has_size((10, 10), 1) and not memo.has_size((10, 10), 2)
    memo.put("d", 1, MemoEntry("k", (336, 336), 157, (20, 10)))
    memo.put("e", 1, MemoEntry("k", (336, 336), 157, (20, 10)))  # evicts a and c: no entry of 10 x 10 is left
    assert not memo.has_size((10, 10), 1) and memo.has_size((20, 10), 1)


def test_a_digest_is_the_same_however_often_it_is_asked_for() -> None:
    from phi3v.processing.image_io import ImageSource

    d = ImageSource(bytes(range(256)) * 40_000, "image bytes").digest_later()  # 10 MB: hashed in chunks
    assert d() == d() == ImageSource(bytes(range(256)) * 40_000, "image bytes").digest_later()()


def test_palette_images_with_other_colours_are_other_images(llm: LLM) -> None:
    """Two palette images with the same indices but different palettes: different pixels once converted."""
    a = Image.new("P", (64, 64))
    a.putpalette([255, 0, 0] * 256)
    b = a.copy()
    b.putpalette([0, 0, 255] * 256)
    llm.generate(Q1, [a], SamplingParams(max_tokens=1), 1)
    ra, rb = (llm.prepare(Q2, [x], SamplingParams(max_tokens=1), 1) for x in (a, b))
    assert ra.images[0].crops is None  # a: seen
    assert rb.images[0].crops is not None and rb.images[0].key != ra.images[0].key


def test_an_image_changed_in_place_fails_its_request_not_the_caches(llm: LLM) -> None:
    img = Image.open(image_path("astronaut")).convert("RGB")
    llm.generate(Q1, [img], SamplingParams(max_tokens=1), 1)
    lazy = llm.prepare(Q2, [img], SamplingParams(max_tokens=3), 1)
    key = lazy.images[0].key
    img.paste((0, 255, 0), (0, 0, 200, 200))  # edited after the request was prepared
    llm.engine.runner.images.cache.clear()  # so its crops are built after all
    failed = llm.generate_many([lazy])[0]  # the request fails alone, with the reason
    assert isinstance(failed, Exception) and "changed after" in str(failed)
    assert key not in llm.engine.runner.images.cache
    fresh = llm.prepare(Q2, [img], SamplingParams(max_tokens=3), 1)  # the edited image: its own key, and it runs
    assert fresh.images[0].key != key and llm.generate_many([fresh])[0].token_ids


def test_pinned_features_outlive_the_cache_size_until_the_request_lets_go(llm: LLM) -> None:
    eng = llm.engine
    cache = eng.runner.images
    size = cache.size
    gc.collect()  # requests of earlier tests caught in reference cycles (tracebacks) let go of their pins
    try:
        cache.size = 1
        src = image_path("coffee")
        eng.reset_prefix_cache()  # (each image below must go through the image cache, not the prefix cache)
        llm.generate(Q1, [src], SamplingParams(max_tokens=1), 1)
        lazy = llm.prepare(Q2, [src], SamplingParams(max_tokens=3), 1)
        key = lazy.images[0].key
        assert lazy.images[0].crops is None and cache.pinned().get(key) == 1
        before = eng.stats["images_encoded"]
        for name in ("page_L", "logo_RGBA"):  # two other images through a cache of 1: coffee stays, pinned
            eng.reset_prefix_cache()
            llm.generate(Q1, [image_path(name)], SamplingParams(max_tokens=1), 1)
        assert eng.stats["images_encoded"] == before + 2 and key in cache.cache
        before = eng.stats["images_encoded"]
        assert llm.generate_many([lazy])[0].token_ids == reference_tokens(llm, llm.prepare(
            Q2, [src], SamplingParams(max_tokens=3), 1), 3)
        assert eng.stats["images_encoded"] == before  # served from the pinned features, no loader
        del lazy
        gc.collect()
        assert key not in cache.pinned()
    finally:
        cache.size = size


def test_a_request_prepared_without_crops_pickles_with_them_and_counts_what_it_holds(llm: LLM) -> None:
    import pickle

    from phi3v.server.admission import prepared_bytes

    from phi3v.bench import noise_image

    buf = io.BytesIO()
    noise_image(300, 200, 4242).save(buf, "PNG")  # an image no other test used: its features get cached here
    src = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    llm.generate(Q1, [src], SamplingParams(max_tokens=1), 1)
    lazy = llm.prepare(Q2, [src], SamplingParams(max_tokens=1), 1)
    img = lazy.images[0]
    assert img.crops is None and img.held == len(base64.b64decode(src.split(",", 1)[1]))
    assert prepared_bytes(lazy) >= img.held
    back = pickle.loads(pickle.dumps(lazy))
    assert back.images[0].crops is not None and back.images[0].key == img.key and back.images[0].load is None


def test_line_wrapped_base64_just_under_the_cap_is_accepted(llm: LLM) -> None:
    data = Path(image_path("astronaut")).read_bytes()
    b64 = base64.b64encode(data).decode()
    wrapped = "\n".join(b64[i: i + 76] for i in range(0, len(b64), 76))
    req = llm.prepare(Q1, ["data:image/png;base64," + wrapped], SamplingParams(max_tokens=1), 1,
                      max_bytes=len(data))
    assert req.prompt_ids.count(-1) > 0
    with pytest.raises(ImageInputError, match="over the limit"):
        llm.prepare(Q1, ["data:image/png;base64," + wrapped], SamplingParams(max_tokens=1), 1, max_bytes=len(data) - 1)


def test_images_encoded_one_sequence_at_a_time_keep_their_features(llm: LLM) -> None:
    """The batched vision call fails (out of memory, say): each sequence is encoded alone, and takes its features
    before the next one's encode can evict them (pins leave only the fresh entries to evict)."""
    cache, model = llm.engine.runner.images, llm.model
    size = cache.size
    gc.collect()
    try:
        cache.size = 2
        names = ["astronaut", "coffee"]
        for n in names:
            llm.engine.reset_prefix_cache()
            llm.generate(Q1, [image_path(n)], SamplingParams(max_tokens=1), 1)
        held = [llm.prepare(Q2, [image_path(n)], SamplingParams(max_tokens=1), 1) for n in names]
        assert all(h.images[0].crops is None for h in held) and len(cache.pinned()) == 2
        new = [llm.prepare(Q1, [Image.new("RGB", (300, 200), c)], SamplingParams(max_tokens=2), 1)
               for c in ((200, 10, 10), (10, 200, 10))]
        orig = model.encode_images

        def flaky(crops, sizes, tower=None):
            if len(crops) > 1:
                raise RuntimeError("CUDA out of memory (simulated)")
            return orig(crops, sizes, tower=tower)

        model.encode_images = flaky
        try:
            out = llm.generate_many(new)
        finally:
            del model.encode_images
        assert [o.token_ids for o in out] == [reference_tokens(llm, r, 2) for r in new]
        del held
        gc.collect()
    finally:
        cache.size = size


def test_pins_go_when_the_engine_has_the_features_and_never_block(llm: LLM) -> None:
    cache = llm.engine.runner.images
    gc.collect()
    src = image_path("logo_RGBA")
    llm.engine.reset_prefix_cache()
    llm.generate(Q1, [src], SamplingParams(max_tokens=1), 1)
    lazy = llm.prepare(Q2, [src], SamplingParams(max_tokens=2), 1)
    key = lazy.images[0].key
    assert cache.pinned().get(key) == 1
    llm.generate_many([lazy])  # the caller still holds `lazy`: the pin goes once the features are taken
    assert llm.prepare(Q2, [src], SamplingParams(max_tokens=2), 1).images[0].crops is None
    gc.collect()
    with cache._lock:  # a release from a finalizer on a thread inside the lock (a GC pass) must not block
        cache.unpin("never-pinned")
    assert cache.pin(key) and cache.pinned().get(key) == 1  # the next pin counts the releases first
    cache.unpin(key)
    cache.pin(key)
    cache.unpin(key)
    del lazy


def test_a_prepared_request_does_not_keep_its_engine_alive() -> None:
    import weakref as wr

    llm = LLM(CKPT, device="cpu", dtype="fp32", max_num_seqs=2, max_model_len=2048)
    src = image_path("coffee")
    kept = [llm.prepare(Q1, [src], SamplingParams(max_tokens=1), 1)]  # eager: an image not seen yet
    llm.generate(Q1, [src], SamplingParams(max_tokens=1), 1)
    kept.append(llm.prepare(Q2, [src], SamplingParams(max_tokens=1), 1))  # lazy: pinned, with a loader
    assert kept[0].images[0].load is None and kept[1].images[0].crops is None
    assert kept[1].images[0].held > 0  # its source, counted for the server's backlog
    engine = wr.ref(llm.engine)
    del llm
    gc.collect()
    assert engine() is None
    assert tuple(kept[1].images[0].pixels().shape) == tuple(kept[0].images[0].crops.shape)  # its loader still works


def test_the_choices_of_an_n_request_keep_the_pin_until_the_last_has_its_features(llm: LLM) -> None:
    cache, drv = llm.engine.runner.images, llm.driver
    gc.collect()
    src = image_path("astronaut")
    llm.engine.reset_prefix_cache()
    llm.generate(Q1, [src], SamplingParams(max_tokens=1), 2)
    prep = llm.prepare(Q2, [src], SamplingParams(max_tokens=3, n=3, temperature=1.0, seed=5), 2)
    key = prep.images[0].key
    assert prep.images[0].crops is None and cache.pinned().get(key) == 1
    drv.add(prep)
    del prep
    drv.step()  # choice 0 prefilled (its features taken); the others join after its first token
    assert cache.pinned().get(key) == 1
    while drv.has_unfinished():
        drv.step()
    gc.collect()
    assert key not in cache.pinned()


def test_a_preparer_takes_both_pin_and_unpin_or_neither(llm: LLM) -> None:
    from phi3v.prepare import Preparer

    with pytest.raises(ValueError, match="both pin and unpin"):
        Preparer(llm.tokenizer, llm.image_processor, llm.device, llm.dtype, 4096, pin=lambda k: True)
