"""Chat template rendering and image-tag prompt tokenization (reference goldens)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from phi3v.processing.chat import IMAGE_TAG, PromptError, render_chat, tokenize_prompt
from phi3v.processing.tokenizer import Tokenizer

DATA = os.path.join(os.path.dirname(__file__), "data")
GOLDEN = os.path.join(DATA, "golden")
with open(os.path.join(GOLDEN, "manifest.json"), encoding="utf-8") as _f:
    MANIFEST = json.load(_f)
MODEL_CASES = sorted(k for k, v in MANIFEST["model"].items() if "prompt" in v)


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.from_pretrained(os.path.join(DATA, "tiny-phi3v"))


def _case(key: str) -> tuple[dict, list[int], np.ndarray]:
    case = MANIFEST["model"][key]
    nc = case["effective_num_crops"]
    counts = [MANIFEST["preprocess"][name]["results"][f"nc{nc}"]["num_img_tokens"] for name in case["images"]]
    ids = np.load(os.path.join(GOLDEN, case["file"]))["input_ids"]
    return case, counts, ids


def _messages_for(prompt: str, images: list[str]) -> list[dict]:
    """The chat messages equivalent to a golden single-turn prompt, images as content parts."""
    head, tail = "<|user|>\n", "<|end|>\n<|assistant|>\n"
    assert prompt.startswith(head) and prompt.endswith(tail)
    body = prompt[len(head):-len(tail)]
    for k in range(1, len(images) + 1):
        assert body.startswith(f"<|image_{k}|>\n")
        body = body[len(f"<|image_{k}|>\n"):]
    parts = [{"type": "image", "image": name} for name in images] + [{"type": "text", "text": body}]
    return [{"role": "user", "content": parts}]


# ---------------------------------------------------------------- golden input_ids


def test_golden_cases_present() -> None:
    assert len(MODEL_CASES) >= 9
    assert any(not MANIFEST["model"][k]["images"] for k in MODEL_CASES)
    assert any(len(MANIFEST["model"][k]["images"]) == 2 for k in MODEL_CASES)


@pytest.mark.parametrize("key", MODEL_CASES)
def test_golden_input_ids(tok: Tokenizer, key: str) -> None:
    case, counts, ids = _case(key)
    assert ids.dtype == np.int64
    # the manifest's counts agree with the placeholders actually present
    assert counts == [int((ids == -k).sum()) for k in range(1, len(counts) + 1)]
    got = tokenize_prompt(tok, case["prompt"], counts)
    assert got == ids.tolist()
    assert len(got) == case["seq_len"] and sum(counts) == case["n_image_tokens"]


@pytest.mark.parametrize("key", MODEL_CASES)
def test_golden_prompt_from_messages(tok: Tokenizer, key: str) -> None:
    case, counts, ids = _case(key)
    messages = _messages_for(case["prompt"], case["images"])
    prompt, images = render_chat(messages)
    assert prompt == case["prompt"]
    assert images == case["images"]
    assert tokenize_prompt(tok, prompt, counts) == ids.tolist()
    # string content with the tags written by hand gives the same prompt
    assert render_chat([{"role": "user", "content": case["prompt"][len("<|user|>\n"):-len("<|end|>\n<|assistant|>\n")]}]) \
        == (case["prompt"], [])


def test_processor_example(tok: Tokenizer) -> None:
    with open(os.path.join(DATA, "tokenizer_checks.json"), encoding="utf-8") as f:
        ex = json.load(f)["processor_example"]
    a, b = ex["chunk_ids_add_special_tokens_true"]
    assert tokenize_prompt(tok, ex["prompt"], [5]) == a + [-1] * 5 + b


# ---------------------------------------------------------------- render_chat


def test_render_system_multiturn_images() -> None:
    messages = [
        {"role": "system", "content": "You are helpful."},
        {"role": "user", "content": [{"type": "image", "image": "cat.png"}, {"type": "text", "text": "What is this?"}]},
        {"role": "assistant", "content": "A cat."},
        {"role": "user", "content": [
            {"type": "text", "text": "And these?"},
            {"type": "image_url", "image_url": {"url": "http://x/dog.jpg"}},
            {"type": "image_url", "image_url": "data:image/png;base64,AAAA"},
        ]},
    ]
    prompt, images = render_chat(messages)
    assert prompt == ("<|system|>\nYou are helpful.<|end|>\n"
                      "<|user|>\n<|image_1|>\nWhat is this?<|end|>\n"
                      "<|assistant|>\nA cat.<|end|>\n"
                      "<|user|>\nAnd these?<|image_2|>\n<|image_3|>\n<|end|>\n"
                      "<|assistant|>\n")
    assert images == ["cat.png", "http://x/dog.jpg", "data:image/png;base64,AAAA"]


def test_render_matches_chat_template_for_strings(tok: Tokenizer) -> None:
    # the template from tokenizer_config.json, evaluated by hand for string contents
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                {"role": "user", "content": " two  spaces \n"}]
    expected = "".join("<|" + m["role"] + "|>" + "\n" + m["content"] + "<|end|>\n" for m in messages)
    assert render_chat(messages) == (expected + "<|assistant|>\n", [])
    assert render_chat(messages, add_generation_prompt=False) == (expected, [])
    assert "'<|' + message['role'] + '|>' + '\n' + message['content'] + '<|end|>\n'" in tok.chat_template


def test_render_equals_jinja_chat_template(tok: Tokenizer) -> None:
    jinja2 = pytest.importorskip("jinja2.sandbox")
    env = jinja2.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    template = env.from_string(tok.chat_template)
    convs = [
        [{"role": "user", "content": "<|image_1|>\nWhat is shown?"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
         {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "  again\n"}],
        [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}],
    ]
    for messages in convs:
        for gen in (True, False):
            assert render_chat(messages, add_generation_prompt=gen)[0] == \
                template.render(messages=messages, add_generation_prompt=gen)


def test_render_last_assistant_no_generation_prompt() -> None:
    prompt, _ = render_chat([{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}])
    assert prompt == "<|user|>\nQ<|end|>\n<|assistant|>\nA<|end|>\n"


def test_render_text_parts_and_objects() -> None:
    img = object()
    prompt, images = render_chat([{"role": "user", "content": [
        {"type": "text", "text": "one"}, {"type": "text", "text": "two"}, {"type": "image", "image": img}, "three"]}])
    assert prompt == "<|user|>\none\ntwo<|image_1|>\nthree<|end|>\n<|assistant|>\n"
    assert images[0] is img
    assert render_chat([{"role": "user", "content": []}])[0] == "<|user|>\n<|end|>\n<|assistant|>\n"


def test_render_string_content_keeps_literal_tags() -> None:
    prompt, images = render_chat([{"role": "user", "content": "<|image_1|>\nDescribe."}])
    assert prompt == "<|user|>\n<|image_1|>\nDescribe.<|end|>\n<|assistant|>\n" and images == []


@pytest.mark.parametrize("messages, match", [
    ([], "empty"),
    ("hello", "list"),
    (None, "list"),
    (["hi"], r"messages\[0\] must be a dict"),
    ([{"role": "bot", "content": "x"}], "unknown role 'bot'"),
    ([{"content": "x"}], "unknown role None"),
    ([{"role": "user"}], "no 'content'"),
    ([{"role": "user", "content": 5}], "content must be a string or a list"),
    ([{"role": "user", "content": None}], "content must be a string or a list"),
    ([{"role": "user", "content": [{"text": "x"}]}], "'type'"),
    ([{"role": "user", "content": [7]}], "'type'"),
    ([{"role": "user", "content": [{"type": "audio", "audio": "a.wav"}]}], "unsupported content part type 'audio'"),
    ([{"role": "user", "content": [{"type": "text", "text": 3}]}], "string 'text'"),
    ([{"role": "user", "content": [{"type": "image"}]}], "no 'image' field"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"link": "x"}}]}], "image_url"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": ""}]}], "image_url"),
    ([{"role": "user", "content": "<|image_1|>\nhi"},
      {"role": "user", "content": [{"type": "image", "image": "a.png"}]}], "literal <|image_N|> tag"),
    ([{"role": "user", "content": [{"type": "image", "image": "a.png"}, {"type": "text", "text": "<|image_2|>"}]}],
     "literal"),
])
def test_render_errors(messages, match: str) -> None:
    with pytest.raises(PromptError, match=match):
        render_chat(messages)


def test_prompt_error_is_value_error() -> None:
    assert issubclass(PromptError, ValueError)


# ---------------------------------------------------------------- tokenize_prompt


def test_tokenize_text_only(tok: Tokenizer) -> None:
    p = "<|user|>\nHello<|end|>\n<|assistant|>\n"
    assert tokenize_prompt(tok, p, []) == tok.encode(p)
    assert tokenize_prompt(tok, p, [])[0] == 1


def test_tokenize_bos_after_every_image(tok: Tokenizer) -> None:
    ids = tokenize_prompt(tok, "<|image_1|><|image_2|>\nHi", [3, 2])
    assert ids == [1, -1, -1, -1, 1, -2, -2] + tok.encode("\nHi")  # empty chunks are a lone BOS
    assert tok.encode("\nHi")[:3] == [1, 29871, 13]


def test_tokenize_out_of_order_and_repeated_tags(tok: Tokenizer) -> None:
    ids = tokenize_prompt(tok, "A<|image_2|>B<|image_1|>C", [2, 3])
    assert ids == tok.encode("A") + [-2] * 3 + tok.encode("B") + [-1] * 2 + tok.encode("C")
    ids = tokenize_prompt(tok, "<|image_1|>x<|image_1|>", [4])
    assert ids == [1] + [-1] * 4 + tok.encode("x") + [-1] * 4 + [1]
    assert tokenize_prompt(tok, "<|image_1|>", [np.int64(2)]) == [1, -1, -1, 1]


def test_image_tag_regex() -> None:
    assert [m.group(1) for m in IMAGE_TAG.finditer("<|image_1|><|image_12|><|image|><|image_x|>")] == ["1", "12"]


@pytest.mark.parametrize("prompt, counts, match", [
    ("<|image_3|> hi <|image_1|><|image_2|>", [5, 5], r"prompt references <\|image_3\|> but only 2 images were given"),
    ("<|image_2|>", [5], r"references <\|image_2\|> but only 1 image was given"),
    ("<|user|>\n<|image_1|>\nhi", [], r"references <\|image_1\|> but no images were given"),
    ("<|image_0|> <|image_1|>", [5], "numbered from 1"),
    ("<|image_1|> hi", [5, 5], r"2 images given but the prompt has no <\|image_2\|> tag"),
    ("no tags", [5], r"1 image given but the prompt has no <\|image_1\|> tag"),
    ("<|image_2|>", [5, 5], r"no <\|image_1\|> tag"),
    ("<|image_1|>", [0], r"num_img_tokens\[0\].*at least 1"),
    ("<|image_1|><|image_2|>", [4, -3], r"num_img_tokens\[1\].*at least 1"),
    ("<|image_1|>", [2.5], "must be an integer"),
    ("<|image_1|>", [True], "must be an integer"),
])
def test_tokenize_errors(tok: Tokenizer, prompt: str, counts: list, match: str) -> None:
    with pytest.raises(PromptError, match=match):
        tokenize_prompt(tok, prompt, counts)


def test_tokenize_prompt_type_error(tok: Tokenizer) -> None:
    with pytest.raises(PromptError, match="string"):
        tokenize_prompt(tok, None, [])  # type: ignore[arg-type]
