"""Issue 22's API points with the real `openai` client against the real server: tool calls (named, "required",
streamed; tool messages in the prompt), n choices, streamed logprobs, penalties and logit_bias, /v1/completions
with an image, unknown fields, /v1/models/{id}, /tokenize + /detokenize, /version, bare-string image_url, CORS."""

from __future__ import annotations

import json

import httpx
import pytest

from server_harness import (MODEL_ID, assert_openai_error, chat_body, data_uri, expected, image_bytes,
                            reference_llm, start_server, user)

openai = pytest.importorskip("openai")
jsonschema = pytest.importorskip("jsonschema")

WEATHER = {"type": "object", "properties": {
    "city": {"type": "string", "maxLength": 12}, "unit": {"enum": ["celsius", "fahrenheit"]},
    "days": {"type": "integer", "minimum": 1, "maximum": 7}},
    "required": ["city", "unit", "days"], "additionalProperties": False}
LOOKUP = {"type": "object", "properties": {"query": {"type": "string", "maxLength": 10}, "exact": {"type": "boolean"}},
          "required": ["query", "exact"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The forecast for a city",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "lookup", "description": "Search the notes", "parameters": LOOKUP}}]
SCHEMAS = {"get_weather": WEATHER, "lookup": LOOKUP}
ASK = [{"role": "user", "content": "What will the weather be in Paris this week?"}]


@pytest.fixture(scope="module")
def client(srv):
    return openai.OpenAI(base_url=srv.base_url, api_key="unused", max_retries=0, timeout=120)


def _create(client, messages, max_tokens=8, **kw):
    extra = kw.pop("extra_body", {})
    return client.chat.completions.create(model=MODEL_ID, messages=messages, max_tokens=max_tokens, temperature=0,
                                          extra_body={"num_crops": 1, **extra}, **kw)


def _check_call(call, allowed=("get_weather", "lookup")):
    assert call.type == "function" and call.id.startswith("call_") and call.function.name in allowed
    args = json.loads(call.function.arguments)
    jsonschema.validate(args, SCHEMAS[call.function.name])
    return call.function.name, args


# ---------------------------------------------------------------- tools


def test_tool_choice_named_function(client):
    r = _create(client, ASK, max_tokens=80, tools=TOOLS,
                tool_choice={"type": "function", "function": {"name": "get_weather"}})
    ch = r.choices[0]
    assert ch.finish_reason == "tool_calls" and ch.message.content is None and len(ch.message.tool_calls) == 1
    assert _check_call(ch.message.tool_calls[0], ("get_weather",))[0] == "get_weather"


def test_tool_choice_required_picks_one_of_the_tools(client):
    seen = set()
    for q in ("What will the weather be in Paris this week?", "Find my notes about the garden.", "hello"):
        r = _create(client, [{"role": "user", "content": q}], max_tokens=80, tools=TOOLS, tool_choice="required")
        ch = r.choices[0]
        assert ch.finish_reason == "tool_calls", ch
        seen.add(_check_call(ch.message.tool_calls[0])[0])
    assert seen <= {"get_weather", "lookup"}


def test_tool_call_streamed_equals_non_streamed(client):
    kw = dict(max_tokens=80, tools=TOOLS, tool_choice="required")
    want = _create(client, ASK, **kw).choices[0].message.tool_calls[0]
    chunks = list(_create(client, ASK, stream=True, **kw))
    calls = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert len(calls) == 1 and calls[0].index == 0 and calls[0].id.startswith("call_")
    assert (calls[0].function.name, calls[0].function.arguments) == (want.function.name, want.function.arguments)
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ""


def test_auto_and_none_answer_in_text_as_without_tools(client):
    plain = _create(client, ASK, max_tokens=6).choices[0]
    for choice in ("auto", "none", None):
        kw = {"tool_choice": choice} if choice else {}
        r = _create(client, ASK, max_tokens=6, tools=TOOLS, **kw).choices[0]
        assert r.message.content == plain.message.content and not r.message.tool_calls
        assert r.finish_reason == plain.finish_reason


def test_tool_messages_are_rendered_into_the_prompt(client):
    call = {"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius", "days": 2}'}}
    messages = ASK + [{"role": "assistant", "content": None, "tool_calls": [call]},
                      {"role": "tool", "tool_call_id": "call_1", "content": "Sunny, 22 C"}]
    r = _create(client, messages, max_tokens=6, tools=TOOLS)
    rendered = ASK + [{"role": "assistant", "content": '{"name": "get_weather", "arguments": '
                                                      '{"city": "Paris", "unit": "celsius", "days": 2}}'},
                      {"role": "user", "content": "Result of the function call call_1 (get_weather):\nSunny, 22 C"}]
    want = expected(rendered, 6)
    assert r.choices[0].message.content == want.text
    assert r.usage.prompt_tokens == want.usage["prompt_tokens"]


def test_bad_tool_requests_are_400(srv):
    url = srv.base_url + "/chat/completions"
    cases = [chat_body(ASK, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "nope"}}),
             chat_body(ASK, tool_choice="required"),
             chat_body(ASK, tools=TOOLS + TOOLS[:1], tool_choice="required"),
             chat_body(ASK, tools=[{"type": "function", "function": {"name": "bad name!"}}]),
             chat_body(ASK, tools=TOOLS, tool_choice="required", response_format={"type": "json_object"}),
             chat_body([{"role": "tool", "tool_call_id": "x", "content": [
                 {"type": "image_url", "image_url": {"url": data_uri(image_bytes("tiny_1x1.png"))}}]}])]
    for body in cases:
        assert_openai_error(httpx.post(url, json=body, timeout=60), 400)


# ---------------------------------------------------------------- n, logprobs, sampling


def test_n_choices(client):
    kw = dict(model=MODEL_ID, messages=ASK, max_tokens=6, temperature=1.5, seed=11, extra_body={"ignore_eos": True})
    r = client.chat.completions.create(n=3, **kw)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert len({c.message.content for c in r.choices}) == 3  # distinct draws per index
    one = client.chat.completions.create(**kw)
    assert one.choices[0].message.content == r.choices[0].message.content  # choice 0 keeps the seed
    assert r.usage.prompt_tokens == one.usage.prompt_tokens and r.usage.completion_tokens == 3 * 6
    chunks = list(client.chat.completions.create(n=3, stream=True, **kw))
    texts = {i: "".join(c.choices[0].delta.content or "" for c in chunks if c.choices and c.choices[0].index == i)
             for i in range(3)}
    assert [texts[i] for i in range(3)] == [c.message.content for c in r.choices]
    finals = sorted(c.choices[0].index for c in chunks if c.choices and c.choices[0].finish_reason)
    assert finals == [0, 1, 2]


def test_n_choices_whose_first_token_ends_them_do_not_hang(srv):
    """Choice 0 ends on its first token (max_tokens=1, or a stop string it matches at once): its siblings, which join
    after that token, still run while nothing else is in flight."""
    client = openai.OpenAI(base_url=srv.base_url, api_key="unused", max_retries=0, timeout=20)
    r = client.chat.completions.create(model=MODEL_ID, messages=ASK, max_tokens=1, n=3)
    assert [c.index for c in r.choices] == [0, 1, 2] and r.usage.completion_tokens == 3
    first = client.chat.completions.create(model=MODEL_ID, messages=ASK, max_tokens=1).choices[0].message.content
    r = client.completions.create(model=MODEL_ID, prompt="<|user|>\nHi<|end|>\n<|assistant|>\n", max_tokens=4, n=2,
                                  stop=[first[:1]] if first else None)
    assert [c.index for c in r.choices] == [0, 1]


def test_n_over_the_server_limit_is_400(srv):
    assert_openai_error(httpx.post(srv.base_url + "/chat/completions", json=chat_body(ASK, n=99)), 400)


def test_streamed_logprobs_equal_non_streamed(client):
    messages = user("Describe it.", data_uri(image_bytes("coffee.png")))
    full = _create(client, messages, max_tokens=10, logprobs=True, top_logprobs=3).choices[0].logprobs.content
    chunks = list(_create(client, messages, max_tokens=10, logprobs=True, top_logprobs=3, stream=True))
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert len(full) == 10
    assert [e.model_dump() for e in streamed] == [e.model_dump() for e in full]


def test_logit_bias_forces_a_token(client):
    tok = reference_llm().tokenizer
    target = tok.encode(" cat", add_bos=False)[-1]
    r = _create(client, ASK, max_tokens=4, logit_bias={str(target): 100})
    assert r.choices[0].message.content == tok.decode([target] * 4)
    from phi3v.sampling_params import SamplingParams

    plain = _create(client, ASK, max_tokens=4).choices[0].message.content
    first = reference_llm().chat(ASK, SamplingParams(max_tokens=4)).token_ids[0]
    banned = _create(client, ASK, max_tokens=4, logit_bias={str(first): -100}).choices[0].message.content
    assert banned != plain
    want = reference_llm().chat(ASK, SamplingParams(max_tokens=4, logit_bias={first: -100.0}))
    assert banned == want.text
    err = assert_openai_error(httpx.post(str(client.base_url) + "chat/completions", json=chat_body(
        ASK, logit_bias={"abc": 1})), 400)
    assert "logit_bias" in err["message"]


def test_penalties_are_applied_as_in_the_python_api(client):
    from phi3v.sampling_params import SamplingParams

    lift = {1000: 50.0, 3000: 50.0}
    kw = dict(presence_penalty=-2.0, frequency_penalty=-2.0)
    r = _create(client, ASK, max_tokens=8, logit_bias={str(k): v for k, v in lift.items()}, **kw)
    want = reference_llm().chat(ASK, SamplingParams(max_tokens=8, logit_bias=lift, **kw))
    plain = reference_llm().chat(ASK, SamplingParams(max_tokens=8, logit_bias=lift))
    assert r.choices[0].message.content == want.text != plain.text


# ---------------------------------------------------------------- fields


def test_unknown_fields_are_400_naming_them_and_routine_ones_accepted(srv, client):
    url = srv.base_url + "/chat/completions"
    err = assert_openai_error(httpx.post(url, json=chat_body(ASK, frobnicate=1, min_p=0.1)), 400)
    assert "frobnicate" in err["message"] and "min_p" in err["message"] and err["param"] == "frobnicate"
    r = _create(client, ASK, max_tokens=2, user="u1", store=False, metadata={"k": "v"}, service_tier="auto",
                parallel_tool_calls=False, stream_options=None)
    assert r.choices[0].finish_reason == "length"
    assert_openai_error(httpx.post(srv.base_url + "/completions", json={"model": MODEL_ID, "prompt": "x",
                                                                         "bogus": True}), 400)


def test_image_url_as_a_bare_string(client):
    src = data_uri(image_bytes("logo_RGBA.png"))
    r = _create(client, [{"role": "user", "content": [{"type": "image_url", "image_url": src},
                                                      {"type": "text", "text": "What is it?"}]}], max_tokens=5)
    want = expected(user("What is it?", src), 5)
    assert r.choices[0].message.content == want.text and r.usage.prompt_tokens == want.usage["prompt_tokens"]


# ---------------------------------------------------------------- completions


def test_completions_with_an_image(client):
    prompt = "<|user|>\n<|image_1|>\nWhat is in this picture?<|end|>\n<|assistant|>\n"
    src = data_uri(image_bytes("coffee.png"))
    from phi3v.sampling_params import SamplingParams

    want = reference_llm().generate(prompt, [src], SamplingParams(max_tokens=8, logprobs=2), num_crops=1)
    r = client.completions.create(model=MODEL_ID, prompt=prompt, max_tokens=8, temperature=0, logprobs=2,
                                  extra_body={"images": [src], "num_crops": 1})
    assert r.object == "text_completion" and r.choices[0].text == want.text
    assert r.usage.prompt_tokens == want.usage["prompt_tokens"] > 144
    lp = r.choices[0].logprobs
    assert lp.token_logprobs == pytest.approx([e["logprob"] for e in want.logprobs], abs=1e-4)
    assert len(lp.tokens) == len(lp.top_logprobs) == 8
    # vLLM's shape for the images, streaming, echo
    r2 = client.completions.create(model=MODEL_ID, prompt=prompt, max_tokens=8, temperature=0,
                                   extra_body={"multi_modal_data": {"image": src}, "num_crops": 1})
    assert r2.choices[0].text == want.text
    chunks = list(client.completions.create(model=MODEL_ID, prompt=prompt, max_tokens=8, temperature=0, stream=True,
                                            logprobs=2, extra_body={"images": [src], "num_crops": 1}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want.text
    streamed = [x for c in chunks if c.choices and c.choices[0].logprobs for x in c.choices[0].logprobs.token_logprobs]
    assert streamed == lp.token_logprobs
    echo = client.completions.create(model=MODEL_ID, prompt=prompt, max_tokens=8, temperature=0, echo=True,
                                     extra_body={"images": [src], "num_crops": 1})
    assert echo.choices[0].text == prompt + want.text


def test_completions_bad_input(srv):
    url = srv.base_url + "/completions"
    base = {"model": MODEL_ID, "prompt": "<|user|>\n<|image_1|>\nx<|end|>\n<|assistant|>\n", "max_tokens": 2}
    assert_openai_error(httpx.post(url, json=base), 400)  # a tag without its image
    assert_openai_error(httpx.post(url, json={**base, "prompt": ["a", "b"]}), 400)
    assert_openai_error(httpx.post(url, json={**base, "suffix": "x", "prompt": "hi"}), 400)
    assert_openai_error(httpx.post(url, json={**base, "model": "other"}), 404)


# ---------------------------------------------------------------- small routes


def test_models_by_id(srv):
    c = openai.OpenAI(base_url=srv.base_url, api_key="x", max_retries=0)
    m = c.models.retrieve(MODEL_ID)
    assert m.id == MODEL_ID and m.object == "model"
    with pytest.raises(openai.NotFoundError):
        c.models.retrieve("gpt-4o")
    assert_openai_error(httpx.get(srv.base_url + "/models/gpt-4o"), 404)


def test_tokenize_detokenize_round_trip_and_version(srv):
    text = "Hello, world! Caf\u00e9 \u2603 <|user|>"
    r = httpx.post(srv.url + "/tokenize", json={"model": MODEL_ID, "prompt": text}).json()
    assert r["tokens"] == reference_llm().tokenizer.encode(text) and r["count"] == len(r["tokens"])
    assert r["max_model_len"] == 4096 and r["tokens"][0] == reference_llm().tokenizer.bos_token_id
    back = httpx.post(srv.url + "/detokenize", json={"model": MODEL_ID, "tokens": r["tokens"][1:]}).json()
    assert back["prompt"] == text
    messages = [{"role": "user", "content": "Hello"}]
    chat = httpx.post(srv.url + "/tokenize", json={"model": MODEL_ID, "messages": messages}).json()
    assert chat["tokens"] == reference_llm().prepare_chat(messages).prompt_ids
    bare = httpx.post(srv.url + "/tokenize", json={"prompt": "hi", "add_special_tokens": False}).json()
    assert bare["tokens"] == reference_llm().tokenizer.encode("hi", add_bos=False)
    assert_openai_error(httpx.post(srv.url + "/detokenize", json={"model": MODEL_ID, "tokens": [10**9]}), 400)
    assert_openai_error(httpx.post(srv.url + "/tokenize", json={"model": MODEL_ID, "prompt": "x", "zz": 1}), 400)
    assert_openai_error(httpx.post(srv.url + "/tokenize", json={"model": "other", "prompt": "x"}), 404)
    from phi3v import __version__

    assert httpx.get(srv.url + "/version").json() == {"version": __version__}


def test_cors_only_when_enabled(srv):
    origin = "http://app.example"
    pre = {"Origin": origin, "Access-Control-Request-Method": "POST",
           "Access-Control-Request-Headers": "authorization,content-type"}
    off = httpx.options(srv.base_url + "/chat/completions", headers=pre)
    assert "access-control-allow-origin" not in off.headers
    assert "access-control-allow-origin" not in httpx.get(srv.base_url + "/models", headers={"Origin": origin}).headers
    h = start_server("cors", cors_origins=(origin,), api_key="sekret")
    ok = httpx.options(h.base_url + "/chat/completions", headers=pre)  # a preflight carries no API key
    assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == origin
    got = httpx.get(h.base_url + "/models", headers={"Origin": origin, "Authorization": "Bearer sekret"})
    assert got.status_code == 200 and got.headers["access-control-allow-origin"] == origin
    other = httpx.get(h.base_url + "/models", headers={"Origin": "http://evil.example",
                                                        "Authorization": "Bearer sekret"})
    assert "access-control-allow-origin" not in other.headers


def test_cors_origin_flag_and_env(monkeypatch):
    from phi3v.cli import build_parser
    from phi3v.cli_args import serve_env_lists

    def parse(*argv):
        return serve_env_lists(build_parser().parse_args(["serve", *argv]))

    monkeypatch.delenv("PHI3V_CORS_ORIGIN", raising=False)
    assert not parse().cors_origin
    a = parse("--cors-origin", "http://a.example", "--cors-origin", "http://b.example")
    assert a.cors_origin == ["http://a.example", "http://b.example"]
    monkeypatch.setenv("PHI3V_CORS_ORIGIN", "http://c.example,http://d.example")
    assert parse().cors_origin == ["http://c.example", "http://d.example"]
    assert parse("--cors-origin", "http://a.example").cors_origin == ["http://a.example"]  # the flag replaces it
