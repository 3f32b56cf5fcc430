"""What a long job holds on to: prepared crops are let go once prefilled (a batch over thousands of
images must not keep every image's crops on the device), and keeping crops in the model's dtype
changes nothing the vision tower computes."""

from __future__ import annotations

import functools
import gc
import weakref

import torch

from phi3v import LLM, SamplingParams

from engine_common import image_path


def test_run_lets_go_of_each_requests_crops_once_prefilled(tiny_ckpt: str) -> None:
    llm = LLM(tiny_ckpt, device="cpu", dtype="fp32", max_num_seqs=2, max_model_len=2048)
    names = ["astronaut", "coffee", "page_L", "logo_RGBA", "astronaut", "coffee", "page_L", "logo_RGBA"]
    crops: list[weakref.ref] = []

    def prepare(i: int):
        r = llm.prepare("<|user|>\n<|image_1|>\nWhat is it?<|end|>\n<|assistant|>\n", [image_path(names[i])],
                        SamplingParams(max_tokens=3 + i % 3, ignore_eos=True), 1)
        if r.images[0].crops is not None:  # None: an image seen before, whose features the engine holds
            crops.append(weakref.ref(r.images[0].crops))
        return r

    finished = 0
    alive_at_end = None
    for _i, _delta, done in llm.run([functools.partial(prepare, i) for i in range(len(names))], workers=2):
        if done is not None:
            finished += 1
            if finished == len(names):
                gc.collect()
                alive_at_end = sum(r() is not None for r in crops)
    assert finished == len(names) and len(names) // 2 <= len(crops) <= len(names)
    assert alive_at_end == 0, f"{alive_at_end} requests' crops still held after every request was prefilled"


def test_crops_in_the_model_dtype_give_the_same_features(tiny_ckpt: str) -> None:
    llm = LLM(tiny_ckpt, device="cpu", dtype="bf16", max_num_seqs=1, max_model_len=2048)
    r = llm.prepare("<|user|>\n<|image_1|>\nHi<|end|>\n<|assistant|>\n", [image_path("coffee")], num_crops=4)
    img = r.images[0]
    assert img.crops.dtype == torch.bfloat16
    fp32 = llm.image_processor.preprocess(image_path("coffee"), 4).crops  # what the processor makes
    assert fp32.dtype == torch.float32 and torch.equal(fp32.to(torch.bfloat16), img.crops)
    with torch.inference_mode():
        a = llm.model.encode_images([fp32], [img.image_size])[0]
        b = llm.model.encode_images([img.crops], [img.image_size])[0]
    assert torch.equal(a, b)  # CLIP casts pixels to its weights' dtype first
