"""Tokenizer (ids equal to HF LlamaTokenizerFast) and streaming detokenisation."""

from __future__ import annotations

import json
import os
import random
import shutil

import pytest

from phi3v.processing.tokenizer import IncrementalDetokenizer, Tokenizer

DATA = os.path.join(os.path.dirname(__file__), "data")
TOK_DIR = os.path.join(DATA, "tiny-phi3v")
with open(os.path.join(DATA, "tokenizer_checks.json"), encoding="utf-8") as _f:
    CHECKS = json.load(_f)


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.from_pretrained(TOK_DIR)


# ---------------------------------------------------------------- encode


@pytest.mark.parametrize("section", ["ground_truth", "spm_sample", "special_token_cases"])
def test_checks_json_ids(tok: Tokenizer, section: str) -> None:
    cases = CHECKS[section]
    assert len(cases) > 100
    failures = []
    for i, case in enumerate(cases):
        add = None if case["add_special_tokens"] else False
        got = tok.encode(case["text"], add_bos=add)
        if got != case["expected_ids"]:
            failures.append((i, case["text"][:60], got[:12], case["expected_ids"][:12]))
    assert not failures, f"{len(failures)}/{len(cases)} mismatches, first: {failures[:3]}"


def test_total_check_count() -> None:
    n = sum(len(CHECKS[s]) for s in ("ground_truth", "spm_sample", "special_token_cases"))
    assert n == 1140


def test_processor_example_chunks(tok: Tokenizer) -> None:
    ex = CHECKS["processor_example"]
    got = [tok.encode(c) for c in ex["chunk_texts"]]
    assert got == ex["chunk_ids_add_special_tokens_true"]


def test_special_attributes(tok: Tokenizer) -> None:
    assert tok.bos_token_id == 1
    assert tok.eos_token_id == 32000 and tok.pad_token_id == 32000 and tok.unk_token_id == 0
    assert tok.vocab_size == 32045 == len(tok)
    assert {0, 1, 32000, 32007, 32010, 32001, 32044} <= tok.special_ids
    assert 2 not in tok.special_ids  # </s> is an added token but not special
    assert max(tok.special_ids) == 32044 and len(tok.special_ids) == 47
    assert tok.token_to_id("<|end|>") == 32007 and tok.token_to_id("<|image|>") == 32044
    assert tok.token_to_id("<|image_1|>") is None
    assert tok.id_to_token(32010) == "<|user|>" and tok.id_to_token(13) == "<0x0A>"
    assert tok.id_to_token(32050) is None and tok.id_to_token(-1) is None
    assert tok.add_bos_token and not tok.add_eos_token
    assert "<|assistant|>" in tok.chat_template


def test_encode_bos_switch(tok: Tokenizer) -> None:
    assert tok.encode("Hello") == [1, 15043]
    assert tok.encode("Hello", add_bos=True) == [1, 15043]
    assert tok.encode("Hello", add_bos=False) == [15043]
    assert tok.encode("") == [1]
    assert tok.encode("", add_bos=False) == []
    assert tok.encode("<|user|>\nHi", add_bos=False)[:3] == [32010, 29871, 13]
    # <|image_1|> is plain text to the tokenizer
    assert len(tok.encode("<|image_1|>", add_bos=False)) > 3
    with pytest.raises(TypeError):
        tok.encode(None)  # type: ignore[arg-type]


def test_decode(tok: Tokenizer) -> None:
    ids = tok.encode("<|user|>\nWhat is this?<|end|>\n<|assistant|>\n")
    assert tok.decode(ids) == "\nWhat is this? \n"  # strip of one leading space happens after skipping
    assert tok.decode(ids, skip_special_tokens=False) == "<s><|user|> \nWhat is this?<|end|> \n<|assistant|>"
    assert tok.decode([15043, 2]) == "Hello</s>"  # </s> is not special: kept, as in HF
    assert tok.decode([32050, 15043]) == "Hello"  # ids without a token are dropped
    with pytest.raises(ValueError):
        tok.decode([1, -1, 2])


def test_missing_tokenizer_json(tmp_path) -> None:
    with pytest.raises(ValueError, match="tokenizer.json"):
        Tokenizer.from_pretrained(str(tmp_path))


def test_config_add_bos_false_and_eos(tmp_path) -> None:
    shutil.copy(os.path.join(TOK_DIR, "tokenizer.json"), tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"add_bos_token": False, "add_eos_token": True, "eos_token": {"content": "<|end|>"}}))
    t = Tokenizer.from_pretrained(str(tmp_path))
    assert t.eos_token_id == 32007 and t.bos_token_id == 1 and t.pad_token_id is None
    assert t.encode("Hello") == [15043, 32007]
    assert t.encode("Hello", add_bos=True) == [1, 15043, 32007]
    assert t.encode("Hello", add_bos=False) == [15043]


def test_special_tokens_map_fallback(tmp_path) -> None:
    shutil.copy(os.path.join(TOK_DIR, "tokenizer.json"), tmp_path / "tokenizer.json")
    shutil.copy(os.path.join(TOK_DIR, "special_tokens_map.json"), tmp_path / "special_tokens_map.json")
    t = Tokenizer.from_pretrained(str(tmp_path))
    assert (t.bos_token_id, t.eos_token_id, t.pad_token_id) == (1, 32000, 32000)
    assert t.encode("Hi") == [1, 6324]


# ---------------------------------------------------------------- incremental detokenisation

TEXTS = [
    "Hello world! This is a test.",
    "  leading spaces and trailing  ",
    "Grüße aus Köln – naïve café, señor.",
    "日本語のテキストと中文文本，还有한국어 텍스트.",
    "Emoji: 😀🎉👍🏽 and flags 🇫🇷🇯🇵, family 👨‍👩‍👧.",
    "Math: ∑ x² ≤ ∞, arrows → ⇒, box ░▒▓.",
    "Русский текст и ελληνικά και עברית وعربي.",
    "Rare CJK: 𠀋𡈽𡌛 and symbols ꙮ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢.",
    "\n\nnew\tlines\r\n and tabs\t\t",
    "code:\n    def f(x):\n        return x ** 2  # ok",
    " ",
    "▁literal lower one eighth block",
]


def _stream(tok: Tokenizer, ids: list[int], skip: bool = True) -> tuple[list[str], str]:
    d = IncrementalDetokenizer(tok, skip_special_tokens=skip)
    deltas = [d.push(i) for i in ids]
    deltas.append(d.flush())
    assert d.text == "".join(deltas)
    return deltas, d.text


@pytest.mark.parametrize("text", TEXTS)
def test_stream_text_roundtrip(tok: Tokenizer, text: str) -> None:
    for ids in (tok.encode(text), tok.encode(text, add_bos=False),
                tok.encode("<|user|>\n" + text + "<|end|>\n<|assistant|>\n")):
        for skip in (True, False):
            deltas, out = _stream(tok, ids, skip)
            full = tok.decode(ids, skip_special_tokens=skip)
            assert out == full
            if "\ufffd" not in full:
                assert not any("\ufffd" in d for d in deltas), deltas


def test_stream_emoji_waits_for_whole_char(tok: Tokenizer) -> None:
    ids = tok.encode("a😀b", add_bos=False)
    assert sum(i in tok.byte_ids for i in ids) == 4  # emoji is 4 byte-fallback pieces
    d = IncrementalDetokenizer(tok)
    deltas = [d.push(i) for i in ids]
    assert "".join(deltas) + d.flush() == "a😀b"
    assert all(x in ("", "a", "😀b", "😀", "b") for x in deltas), deltas
    # a stream ending inside a byte run is completed by flush()
    d = IncrementalDetokenizer(tok)
    out = "".join(d.push(i) for i in tok.encode("ok 😀", add_bos=False))
    assert "\ufffd" not in out and out + d.flush() == "ok 😀"


def test_stream_leading_space_rules(tok: Tokenizer) -> None:
    # the decoder strips one leading space of the whole sequence only
    for ids in ([29871, 15043], [29871, 29871, 15043], [32010, 15043], [15043, 32007, 15043],
                [1, 29871, 13, 32007, 29871], [32007, 29871], [2, 15043]):
        for skip in (True, False):
            assert _stream(tok, ids, skip)[1] == tok.decode(ids, skip_special_tokens=skip)


def _random_ids(rng: random.Random, n: int) -> list[int]:
    out = []
    for _ in range(n):
        r = rng.random()
        if r < 0.3:
            out.append(rng.randint(3, 258))  # byte-fallback pieces, stress the UTF-8 handling
        elif r < 0.4:
            out.append(rng.choice([0, 1, 2, 13, 29871, 32000, 32001, 32007, 32010, 32044, 32050, 32063]))
        else:
            out.append(rng.randint(0, 32063))
    return out


def test_stream_random_ids(tok: Tokenizer) -> None:
    rng = random.Random(1234)
    for _ in range(800):
        ids = _random_ids(rng, rng.randint(0, 48))
        for skip in (True, False):
            deltas, out = _stream(tok, ids, skip)
            full = tok.decode(ids, skip_special_tokens=skip)
            assert out == full, ids
            if "\ufffd" not in full:
                assert not any("\ufffd" in d for d in deltas), ids


def test_stream_random_valid_utf8(tok: Tokenizer) -> None:
    rng = random.Random(99)
    alphabet = "ab €é日本😀🎉 \n" + "".join(chr(c) for c in (0x1F600, 0x20000, 0xA66E, 0x3042))
    for _ in range(200):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 30)))
        ids = tok.encode(text, add_bos=rng.random() < 0.5)
        deltas, out = _stream(tok, ids)
        assert out == tok.decode(ids) == text  # no literal U+2581 here, so decode inverts encode
        assert not any("\ufffd" in d for d in deltas)


def test_stream_window_bounded(tok: Tokenizer) -> None:
    ids = tok.encode("The quick brown fox jumps over the lazy dog. " * 200, add_bos=False)
    d = IncrementalDetokenizer(tok)
    longest = 0
    for i in ids:
        d.push(i)
        longest = max(longest, len(d._window))
    assert longest <= 3
    assert d.text + d.flush() == tok.decode(ids)


def test_stream_negative_id(tok: Tokenizer) -> None:
    with pytest.raises(ValueError):
        IncrementalDetokenizer(tok).push(-1)
