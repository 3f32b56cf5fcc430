"""Structured output on the tiny random checkpoint (whose free output is gibberish): every completed
answer parses and validates against its schema, whatever the seed; free rows of a mixed batch get
exactly their solo tokens; bad schemas are clear errors; max_tokens inside the JSON is "length"."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
import torch

from phi3v import LLM, SamplingParams
from phi3v.cli import main
from phi3v.engine.grammar import Grammars
from phi3v.engine.sampler import apply_token_bitmask

PROMPT = "<|user|>\nRead the cover: title and author as JSON.<|end|>\n<|assistant|>\n"
SEEDS = 30

BOOK = {"type": "object", "properties": {"title": {"type": "string", "maxLength": 10},
                                         "author": {"type": "string", "maxLength": 10}},
        "required": ["title", "author"], "additionalProperties": False}
NESTED = {"type": "object", "properties": {
    "person": {"type": "object", "properties": {"name": {"type": "string", "minLength": 1, "maxLength": 6},
                                                "age": {"type": "integer", "minimum": 0, "maximum": 120}},
               "required": ["name", "age"], "additionalProperties": False},
    "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "minItems": 1, "maxItems": 3}},
    "required": ["person", "tags"], "additionalProperties": False}
NUMBERS = {"type": "array", "items": {"type": "number", "minimum": -10, "maximum": 10}, "minItems": 1, "maxItems": 4}
ENUMS = {"type": "object", "properties": {"kind": {"enum": ["receipt", "invoice", "other"]},
                                          "paid": {"type": "boolean"}, "currency": {"const": "EUR"},
                                          "total": {"type": "integer", "minimum": -999, "maximum": 999}},
         "required": ["kind", "paid", "total"], "additionalProperties": False}
RECEIPT = {"type": "object", "properties": {"items": {"type": "array", "minItems": 1, "maxItems": 2, "items": {
    "type": "object", "properties": {"name": {"type": "string", "maxLength": 5},
                                     "qty": {"type": "integer", "minimum": 1, "maximum": 99}},
    "required": ["name", "qty"], "additionalProperties": False}}, "note": {"type": ["string", "null"], "maxLength": 4}},
    "required": ["items", "note"], "additionalProperties": False}
SCHEMAS = {"book": BOOK, "nested": NESTED, "numbers": NUMBERS, "enums": ENUMS, "receipt": RECEIPT}


@pytest.fixture(scope="module")
def llm(tiny_ckpt: str) -> LLM:
    return LLM(tiny_ckpt, device="cpu", dtype="fp32", max_num_seqs=SEEDS + 2, max_model_len=1024)


@pytest.mark.parametrize("name", SCHEMAS)
def test_every_completed_output_validates(llm: LLM, name: str) -> None:
    schema = SCHEMAS[name]
    params = [SamplingParams(max_tokens=80, json_schema=schema)]  # greedy
    params += [SamplingParams(max_tokens=80, temperature=1.0, seed=s, json_schema=schema) for s in range(SEEDS)]
    outs = llm.generate_many([llm.prepare(PROMPT, [], p) for p in params])
    stopped = [o for o in outs if o.finish_reason == "stop"]
    assert len(stopped) >= 0.9 * len(outs), [o.finish_reason for o in outs]
    for o in stopped:
        jsonschema.validate(json.loads(o.text), schema)
        assert not set(o.token_ids) & set(llm.config.eos_token_ids)  # ends when the JSON does
    assert len({o.text for o in outs}) > 3  # the seeds do sample different answers


def test_json_object_gives_objects_and_length_when_cut(llm: LLM) -> None:
    params = [SamplingParams(max_tokens=24, temperature=1.0, seed=s, json_object=True) for s in range(SEEDS)]
    outs = llm.generate_many([llm.prepare(PROMPT, [], p) for p in params])
    assert {o.finish_reason for o in outs} <= {"stop", "length"}
    assert any(o.finish_reason == "stop" for o in outs)
    for o in outs:
        if o.finish_reason == "stop":
            assert isinstance(json.loads(o.text), dict)
        else:
            assert o.text.startswith("{") and len(o.token_ids) == 24


def test_max_tokens_inside_the_json_is_length(llm: LLM) -> None:
    c = llm.generate(PROMPT, [], SamplingParams(max_tokens=3, json_schema=BOOK))
    assert c.finish_reason == "length" and len(c.token_ids) == 3 and c.text.startswith('{"')
    with pytest.raises(json.JSONDecodeError):
        json.loads(c.text)
    # ignore_eos does not run past the end of the JSON
    c = llm.generate(PROMPT, [], SamplingParams(max_tokens=80, json_schema=ENUMS, ignore_eos=True))
    assert c.finish_reason == "stop"
    jsonschema.validate(json.loads(c.text), ENUMS)


def test_mixed_batch_free_rows_get_their_solo_tokens(llm: LLM) -> None:
    free = [SamplingParams(max_tokens=20, ignore_eos=True),
            SamplingParams(max_tokens=20, ignore_eos=True, temperature=0.9, top_p=0.8, seed=7),
            SamplingParams(max_tokens=20, ignore_eos=True, repetition_penalty=1.3)]
    reqs = [llm.prepare(PROMPT, [], p) for p in free]
    alone = [llm.generate_many([r])[0].token_ids for r in reqs]
    cons = [llm.prepare(PROMPT, [], SamplingParams(max_tokens=40, temperature=1.0, seed=s, json_schema=NESTED))
            for s in range(3)]
    mixed = llm.generate_many([cons[0], reqs[0], cons[1], reqs[1], reqs[2], cons[2]])
    assert [mixed[i].token_ids for i in (1, 3, 4)] == alone
    # constrained rows arriving while free rows decode (prefill and decode batches), through the engine
    eng, got = llm.engine, {}
    rids = [eng.add_request(r.prompt_ids, r.images, r.params) for r in reqs]
    for _ in range(4):
        for o in eng.step():
            got.setdefault(o.rid, []).extend(o.token_ids)
    crids = [eng.add_request(r.prompt_ids, r.images, r.params) for r in cons]
    for rid, ids in eng.run_to_completion().items():
        got.setdefault(rid, []).extend(ids)
    assert [got[r] for r in rids] == alone
    assert [got[r] for r in crids] == [mixed[i].token_ids for i in (0, 2, 5)]
    assert eng.num_running == 0 and eng.sched.all_free


def test_masks_leave_free_rows_exact_and_never_allow_ids_past_the_tokenizer(llm: LLM) -> None:
    g: Grammars = llm.engine.grammars
    m = g.matcher(SamplingParams(json_schema=BOOK))
    assert m.consume_tokens(llm.tokenizer.encode('\n{"title": "', add_bos=False)[2:])  # inside a string
    masks = g.fill_masks([(1, m)], 3, torch.device("cpu")).clone()
    allowed = torch.tensor([(int(w) >> j) & 1 for w in masks[1] for j in range(32)], dtype=torch.bool)
    V, n_tok = llm.config.vocab_size, len(llm.tokenizer)
    assert allowed.sum() > 30000 and not allowed[n_tok:V].any()
    special = llm.tokenizer.special_ids | set(llm.config.eos_token_ids)
    assert not any(allowed[i] for i in special)
    assert (masks[0] == -1).all() and (masks[2] == -1).all()
    logits = torch.randn(3, V)
    out = apply_token_bitmask(logits, masks)
    assert torch.equal(out[0], logits[0]) and torch.equal(out[2], logits[2])
    assert torch.equal(out[1] > float("-inf"), allowed[:V])


def test_schema_compiled_once(llm: LLM) -> None:
    g = llm.engine.grammars
    g.matcher(SamplingParams(json_schema=BOOK))
    n, template = len(g._compiled), g._compiled[json.dumps(BOOK, separators=(",", ":"))]
    g.matcher(SamplingParams(json_schema=json.dumps(BOOK)))  # the same schema as text
    assert len(g._compiled) == n and g._compiled[json.dumps(BOOK, separators=(",", ":"))] is template


@pytest.mark.parametrize("kw, msg", [
    (dict(json_schema={"type": "foo"}), "Invalid type: foo"),
    (dict(json_schema={"type": "string", "minLength": 5, "maxLength": 2}), "minLength"),
    (dict(json_schema={"$ref": "#/$defs/missing"}), "does not exist"),
    (dict(json_schema={"type": "string", "pattern": "[a-"}), "regex"),
    (dict(json_schema="{not json"), "not valid JSON"),
    (dict(json_schema=[1, 2]), "must be a JSON object"),
    (dict(json_schema={"name": "book", "schema": BOOK}), "wrapper"),
    (dict(json_schema=BOOK, json_object=True), "not both"),
    (dict(json_object="yes"), "json_object"),
])
def test_invalid_schema_is_a_clear_value_error(kw: dict, msg: str) -> None:
    with pytest.raises(ValueError, match="invalid sampling parameter") as e:
        SamplingParams(**kw)
    assert msg in str(e.value)


def test_cli_json_schema_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str], tiny_ckpt: str) -> None:
    path = tmp_path / "book.json"
    path.write_text(json.dumps(BOOK))
    base = ["run", "--model", tiny_ckpt, "--device", "cpu", "--max-tokens", "60"]
    assert main(base + ["--json-schema", str(path), "--temperature", "1", "--seed", "3", "Read the cover."]) == 0
    jsonschema.validate(json.loads(capsys.readouterr().out), BOOK)
    assert main(base + ["--json-object", "--json", "Read the cover."]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["finish_reason"] == "stop" and isinstance(json.loads(out["text"]), dict)
    path.write_text('{"type": "foo"}')
    assert main(base + ["--json-schema", str(path), "Read."]) == 2
    assert "Invalid type: foo" in capsys.readouterr().err
    assert main(base + ["--json-schema", str(tmp_path / "missing.json"), "Read."]) == 2
    assert "cannot read --json-schema" in capsys.readouterr().err


def test_batch_lines_may_carry_a_schema(tmp_path: Path, tiny_ckpt: str) -> None:
    lines = [{"id": "a", "prompt": "Read the cover.", "json_schema": BOOK, "max_tokens": 60},
             {"id": "b", "prompt": "Receipt?", "json_object": True, "max_tokens": 2},
             {"id": "c", "prompt": "Read.", "json_schema": {"type": "foo"}},
             {"id": "d", "prompt": "Free.", "max_tokens": 5}]
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in lines))
    assert main(["batch", "--model", tiny_ckpt, "--device", "cpu", "--input", str(src), "--output", str(dst)]) == 0
    out = {r["id"]: r for r in map(json.loads, dst.read_text().splitlines())}
    jsonschema.validate(json.loads(out["a"]["text"]), BOOK)
    assert out["b"]["finish_reason"] == "length" and out["b"]["text"].startswith("{")
    assert "Invalid type: foo" in out["c"]["error"] and out["d"]["usage"]["completion_tokens"] <= 5


def test_run_ahead_schedule_keeps_constraints_exact(llm: LLM) -> None:
    """The CUDA schedule (next forward launched before the host reads the tokens; masks filled
    after), forced on here: constrained and free rows give the same tokens as the plain schedule."""
    params = [SamplingParams(max_tokens=40, temperature=1.0, seed=s, json_schema=BOOK) for s in range(3)]
    params += [SamplingParams(max_tokens=12, ignore_eos=True), SamplingParams(max_tokens=30, json_object=True)]
    reqs = [llm.prepare(PROMPT, [], p) for p in params]
    results = []
    for ahead in (False, True):
        llm.engine.run_ahead = ahead
        try:
            results.append([c.token_ids for c in llm.generate_many(reqs)])
        finally:
            llm.engine.run_ahead = False
    assert results[0] == results[1]
    for p, ids in zip(params, results[1]):
        if p.json_schema is not None:
            text = llm.tokenizer.decode(ids)
            jsonschema.validate(json.loads(text), BOOK)
