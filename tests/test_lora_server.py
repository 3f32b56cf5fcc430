"""`phi3v serve` with per-request LoRA adapters, through the real `openai` client: /v1/models lists them, the `model`
field routes a request to one (its name or BASE:NAME), answers equal the hand-merged checkpoint's, unknown names 404."""

from __future__ import annotations

import math

import pytest

from lora_common import merged_checkpoint, random_layers, write_adapter
from server_harness import MODEL_ID, start_server

openai = pytest.importorskip("openai")

MESSAGES = [{"role": "user", "content": "Name three colours."}]


@pytest.fixture(scope="module")
def lora_srv(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora_srv")
    l1 = random_layers(["qkv_proj", "o_proj", "gate_up_proj", "down_proj"], 4, 11)
    l2 = random_layers(["down_proj"], 2, 12)
    dirs = {"a1": write_adapter(str(root / "a1"), l1, 4, 8, "all-linear"),
            "a2": write_adapter(str(root / "a2"), l2, 2, 2, ["down_proj"], rslora=True)}
    merged = {"a1": merged_checkpoint(str(root / "m1"), l1, 2.0),
              "a2": merged_checkpoint(str(root / "m2"), l2, 2 / math.sqrt(2))}
    return start_server("lora", loras=dirs), dirs, merged


def _client(h):
    return openai.OpenAI(base_url=h.base_url, api_key="unused", max_retries=0, timeout=60)


def _answer(client, model: str) -> tuple[str, str]:
    r = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=8, temperature=0)
    return r.choices[0].message.content, r.model


def test_models_lists_the_adapters(lora_srv) -> None:
    h, dirs, _ = lora_srv
    cards = {m.id: m for m in _client(h).models.list().data}
    assert set(cards) == {MODEL_ID, "a1", "a2"}
    assert cards["a1"].parent == MODEL_ID and cards["a1"].root == dirs["a1"] and cards["a2"].root == dirs["a2"]
    assert getattr(cards[MODEL_ID], "parent", None) is None


def test_model_field_routes_to_the_adapter(lora_srv) -> None:
    from phi3v import LLM, SamplingParams

    h, _, merged = lora_srv
    client = _client(h)
    params = SamplingParams(max_tokens=8)
    for name in ("a1", "a2"):
        want = LLM(merged[name], device="cpu", dtype="fp32", max_model_len=2048).chat(MESSAGES, params).text
        assert _answer(client, name) == (want, name)
        assert _answer(client, f"{MODEL_ID}:{name}") == (want, name)  # answered as the adapter (as vLLM does)
    base, _ = _answer(client, MODEL_ID)
    assert len({base, _answer(client, "a1")[0], _answer(client, "a2")[0]}) == 3
    chunks = list(client.chat.completions.create(model="a2", messages=MESSAGES, max_tokens=8, temperature=0,
                                                 stream=True))
    assert {c.model for c in chunks} == {"a2"}
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == _answer(client, "a2")[0]


@pytest.mark.parametrize("model", ["a3", f"{MODEL_ID}:a3", "other:a1", f"{MODEL_ID}:"])
def test_unknown_models_are_404(lora_srv, model) -> None:
    h, _, _ = lora_srv
    with pytest.raises(openai.NotFoundError) as e:
        _answer(_client(h), model)
    assert e.value.status_code == 404 and "'a1', 'a2'" in str(e.value)


def test_adapter_names_are_checked_at_start() -> None:
    from phi3v.server.app import Settings

    with pytest.raises(ValueError, match="cannot be named as the served model"):
        Settings(model="m", served_model_name=MODEL_ID, loras={MODEL_ID: "/x"})
    with pytest.raises(ValueError, match="adapter name 'a:b'"):
        Settings(model="m", loras={"a:b": "/x"})
