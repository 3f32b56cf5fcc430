"""Phi-3(.5)-vision chat format and the processor's image-tag tokenization.

`render_chat` produces exactly what the model's `chat_template` produces
(`<|role|>\\n` + content + `<|end|>\\n` per message, then `<|assistant|>\\n`), turning image parts
into numbered `<|image_k|>` tags. `tokenize_prompt` lays out ids like the reference
`Phi3VProcessor`: every text chunk between tags is tokenized on its own with BOS, and tag k becomes
`num_img_tokens[k-1]` copies of the placeholder id -k.
"""

from __future__ import annotations

import operator
import re
from typing import Any, Sequence

from phi3v.processing.tokenizer import Tokenizer
from phi3v.processing.video import DEFAULT_FRAMES, VideoFrame, VideoSource, check_num_frames

__all__ = ["PromptError", "IMAGE_TAG", "ROLES", "expand_placeholders", "render_chat", "tokenize_prompt"]


class PromptError(ValueError):
    """The messages or the prompt cannot be turned into model inputs."""


IMAGE_TAG = re.compile(r"<\|image_(\d+)\|>")
ROLES = ("system", "user", "assistant")


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _image_source(part: dict, where: str) -> Any:
    """The image source of an image part ({"type":"image"} or {"type":"image_url"})."""
    if part["type"] == "image":
        if part.get("image") is None:
            raise PromptError(f"{where}: image part has no 'image' field (expected a path, URL, "
                              "data URI, bytes, PIL image or array)")
        return part["image"]
    value = part.get("image_url")
    if isinstance(value, dict):
        value = value.get("url")
    if not isinstance(value, str) or not value:
        raise PromptError(f"{where}: image_url part needs 'image_url': {{'url': '...'}} or "
                          "'image_url': '...' with a non-empty string")
    return value


def _video_source(part: dict, where: str) -> VideoSource:
    """A video part ({"type": "video", "video": src} or {"type": "video_url", "video_url": {"url": src}}, each with
    an optional "num_frames") -> its VideoSource."""
    value = part.get(part["type"])
    n = part.get("num_frames")
    if part["type"] == "video_url":
        if isinstance(value, dict):
            n = value.get("num_frames", n)
            value = value.get("url")
        if not isinstance(value, str) or not value:
            raise PromptError(f"{where}: video_url part needs 'video_url': {{'url': '...'}} with a non-empty string")
    elif value is None:
        raise PromptError(f"{where}: video part has no 'video' field (expected a path, URL, data URI or bytes)")
    try:
        return VideoSource(value, check_num_frames(DEFAULT_FRAMES if n is None else n, f"{where}.num_frames"))
    except ValueError as e:
        raise PromptError(str(e)) from None


def render_chat(
    messages: Sequence[dict], *, add_generation_prompt: bool = True
) -> tuple[str, list]:
    """Render chat messages to the Phi-3-vision prompt text and the list of images it references.

    messages: [{"role": "system"|"user"|"assistant", "content": str | list[part]}], where a part is
    {"type": "text", "text": str}, {"type": "image", "image": <source>},
    {"type": "image_url", "image_url": {"url": str} | str}, {"type": "video", "video": <source>, "num_frames": N}
    or {"type": "video_url", "video_url": {"url": str, "num_frames": N}} (N frames, default 8, each an image).
    Image parts are numbered 1..n in order of appearance over all messages and each becomes
    `<|image_k|>\\n` at its place (a video part: one such tag per frame, its frames `VideoFrame`s in the list);
    consecutive text parts are joined with "\\n". String content is kept verbatim (it may carry its own
    `<|image_k|>` tags for images passed separately), but literal tags may not be mixed with image parts.
    `<|assistant|>\\n` is appended when add_generation_prompt is set and the last message is not from the assistant.
    Returns (prompt, images), images being the sources in tag order.
    """
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise PromptError(f"messages must be a list of {{'role', 'content'}} dicts, got {type(messages).__name__}")
    if not messages:
        raise PromptError("messages is empty: at least one message is needed")
    pieces: list[str] = []
    images: list = []
    literal_tag_at: str | None = None
    for m_idx, msg in enumerate(messages):
        where = f"messages[{m_idx}]"
        if not isinstance(msg, dict):
            raise PromptError(f"{where} must be a dict with 'role' and 'content', got {type(msg).__name__}")
        role = msg.get("role")
        if role not in ROLES:
            raise PromptError(f"{where}: unknown role {role!r}; expected one of {', '.join(ROLES)}")
        if "content" not in msg:
            raise PromptError(f"{where} ({role}) has no 'content'")
        content = msg["content"]
        if isinstance(content, str):
            text = content
            if IMAGE_TAG.search(text) and literal_tag_at is None:
                literal_tag_at = where
        elif isinstance(content, (list, tuple)):
            text = ""
            prev_text = False
            for p_idx, part in enumerate(content):
                pwhere = f"{where}.content[{p_idx}]"
                if isinstance(part, str):  # tolerated shorthand for a text part
                    part = {"type": "text", "text": part}
                if not isinstance(part, dict) or "type" not in part:
                    raise PromptError(f"{pwhere}: a content part must be a dict with a 'type' key")
                ptype = part["type"]
                if ptype == "text":
                    if not isinstance(part.get("text"), str):
                        raise PromptError(f"{pwhere}: text part needs a string 'text' field")
                    if IMAGE_TAG.search(part["text"]) and literal_tag_at is None:
                        literal_tag_at = pwhere
                    text += ("\n" if prev_text else "") + part["text"]
                    prev_text = True
                elif ptype in ("image", "image_url"):
                    images.append(_image_source(part, pwhere))
                    text += f"<|image_{len(images)}|>\n"
                    prev_text = False
                elif ptype in ("video", "video_url"):  # its frames, as images (Phi-3.5-vision's multi-frame prompt)
                    video = _video_source(part, pwhere)
                    for i in range(video.num_frames):
                        images.append(VideoFrame(video, i))
                        text += f"<|image_{len(images)}|>\n"
                    prev_text = False
                else:
                    raise PromptError(f"{pwhere}: unsupported content part type {ptype!r}; "
                                      "expected 'text', 'image', 'image_url', 'video' or 'video_url'")
        else:
            raise PromptError(f"{where} ({role}): content must be a string or a list of parts, "
                              f"got {type(content).__name__}")
        pieces.append(f"<|{role}|>\n{text}<|end|>\n")
    if images and literal_tag_at is not None:
        raise PromptError(f"{literal_tag_at} contains a literal <|image_N|> tag while other messages "
                          "pass images as content parts; use one way or the other")
    if add_generation_prompt and messages[-1]["role"] != "assistant":
        pieces.append("<|assistant|>\n")
    return "".join(pieces), images


def tokenize_prompt(tokenizer: Tokenizer, prompt: str, num_img_tokens: Sequence[int]) -> list[int]:
    """Token ids of a prompt with `<|image_k|>` tags, image k becoming `[-k] * num_img_tokens[k-1]`.

    As in the reference processor, the text around the tags is split into chunks, each tokenized
    separately with BOS (so a BOS follows every image block). Differences from the reference:
    tag k always refers to image k whatever the tag order, and a repeated tag repeats image k's
    placeholders. Raises PromptError for a tag outside 1..len(num_img_tokens), an image that no
    tag references, or a token count below 1.
    """
    if not isinstance(prompt, str):
        raise PromptError(f"prompt must be a string, got {type(prompt).__name__}")
    counts: list[int] = []
    for k, n in enumerate(num_img_tokens, 1):
        try:
            if isinstance(n, bool):
                raise TypeError
            counts.append(operator.index(n))  # int or numpy integer
        except TypeError:
            raise PromptError(f"num_img_tokens[{k - 1}] must be an integer, got {n!r}") from None
        if counts[-1] < 1:
            raise PromptError(f"num_img_tokens[{k - 1}] (image {k}) is {counts[-1]}; it must be at least 1")
    tags = [int(m.group(1)) for m in IMAGE_TAG.finditer(prompt)]
    for k in tags:
        if not 1 <= k <= len(counts):
            if k < 1:
                raise PromptError(f"prompt contains <|image_{k}|>: image tags are numbered from 1")
            n = len(counts)
            given = "no images were given" if n == 0 else f"only {_plural(n, 'image')} {'was' if n == 1 else 'were'} given"
            raise PromptError(f"prompt references <|image_{k}|> but {given}")
    missing = sorted(set(range(1, len(counts) + 1)) - set(tags))
    if missing:
        k = missing[0]
        raise PromptError(f"{_plural(len(counts), 'image')} given but the prompt has no <|image_{k}|> tag "
                          f"(each image needs its tag, e.g. '<|image_{k}|>\\n' before the question)")
    if not tags:
        return tokenizer.encode(prompt)
    chunks = IMAGE_TAG.split(prompt)[::2]  # split() also returns the captured numbers
    ids: list[int] = tokenizer.encode(chunks[0])
    for k, chunk in zip(tags, chunks[1:]):
        ids.extend([-k] * counts[k - 1])
        ids.extend(tokenizer.encode(chunk))
    return ids


def expand_placeholders(ids: Sequence[int], num_img_tokens: Sequence[int]) -> list[int]:
    """`tokenize_prompt(tok, prompt, [1] * n)` -> `tokenize_prompt(tok, prompt, num_img_tokens)` without tokenizing
    again: each placeholder -k becomes num_img_tokens[k-1] copies (the text tokens do not depend on the counts)."""
    out: list[int] = []
    for i in ids:
        if i < 0:
            out.extend([i] * num_img_tokens[-i - 1])
        else:
            out.append(i)
    return out
