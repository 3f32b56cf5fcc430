"""Bad LoRA adapters: one ValueError naming every key that does not fit, before any weight of the model is read; the
CLI's one line and exit 2; `--lora` parsing."""

from __future__ import annotations

import json
import os
import pickle

import pytest
import torch

from engine_common import CKPT
from lora_common import CFG, H, I, PREFIX, random_layers, write_adapter
from phi3v.cli import main
from phi3v.lora_io import load_adapter, parse_lora_args


def _adapter(tmp_path, mutate=None, r: int = 4, targets=("qkv_proj", "down_proj"), **kw) -> str:
    layers = random_layers(list(targets), r, seed=5)
    if mutate:
        mutate(layers)
    return write_adapter(str(tmp_path / "bad"), layers, r, 8, list(targets), **kw)


def _error(path: str) -> str:
    with pytest.raises(ValueError) as e:
        load_adapter(path, CFG)
    return str(e.value)


def test_every_bad_key_is_named(tmp_path) -> None:
    def mutate(layers):
        a, b = layers["model.layers.0.self_attn.qkv_proj"]
        layers["model.layers.0.self_attn.qkv_proj"] = (a[:, : H - 1], b)  # wrong in_features
        a, b = layers["model.layers.1.mlp.down_proj"]
        layers["model.layers.1.mlp.down_proj"] = (a, b[:, :3])  # rank mismatch A 4 rows, B 3 columns
        a, b = layers["model.layers.1.self_attn.qkv_proj"]
        layers["model.layers.1.self_attn.qkv_proj"] = (a, b[: H])  # wrong out_features
        layers["model.layers.0.self_attn.q_proj"] = (torch.zeros(4, H), torch.zeros(H, 4))  # no such module

    msg = _error(_adapter(tmp_path, mutate))
    assert "(4 problems)" in msg
    assert f"{PREFIX}model.layers.0.self_attn.qkv_proj.lora_A.weight: shape [4, {H - 1}], expected (r, {H})" in msg
    assert f"{PREFIX}model.layers.1.mlp.down_proj.lora_A/B: rank mismatch, lora_A has 4 rows and lora_B 3" in msg
    assert f"{PREFIX}model.layers.1.self_attn.qkv_proj.lora_B.weight: shape [{H}, 4], expected ({3 * H}, r)" in msg
    assert "model.layers.0.self_attn.q_proj is not a linear layer of the model (unknown module)" in msg


def test_half_pairs_unknown_keys_and_config_rank(tmp_path) -> None:
    folder = _adapter(tmp_path, r=4, config={"r": 8})
    from safetensors.torch import load_file, save_file

    path = os.path.join(folder, "adapter_model.safetensors")
    sd = load_file(path)
    del sd[f"{PREFIX}model.layers.0.mlp.down_proj.lora_B.weight"]
    sd[f"{PREFIX}model.embed_tokens.lora_embedding_A"] = torch.zeros(4, CFG.vocab_size)
    save_file(sd, path)
    msg = _error(folder)
    assert f"{PREFIX}model.layers.0.mlp.down_proj.lora_B.weight is missing" in msg
    assert f"{PREFIX}model.embed_tokens.lora_embedding_A: not a LoRA weight" in msg
    assert "model.layers.1.mlp.down_proj.lora_A/B: rank 4, but adapter_config.json says r = 8" in msg


def test_targets_and_modules_to_save(tmp_path) -> None:
    head = {"lm_head.weight": torch.zeros(CFG.vocab_size, H + 1)}
    msg = _error(_adapter(tmp_path, targets=("qkv_proj",), saved=head,
                          config={"target_modules": ["qkv_proj", "c_attn"]}))
    assert "target_modules entry 'c_attn': no linear layer of the model has this name" in msg
    assert f"{PREFIX}lm_head.weight: shape [{CFG.vocab_size}, {H + 1}], the model's lm_head.weight is" in msg
    msg = _error(_adapter(tmp_path, targets=("qkv_proj", "o_proj"), config={"target_modules": ["qkv_proj"]}))
    assert "model.layers.0.self_attn.o_proj is not among target_modules ['qkv_proj']" in msg


@pytest.mark.parametrize("config,match", [
    ({"use_dora": True}, "DoRA adapters are not supported"),
    ({"r": 0}, "r must be a positive integer"),
    ({"peft_type": "IA3"}, "only LORA adapters"),
    ({"bias": "all"}, "trained biases are not supported"),
    ({"target_modules": 5}, "target_modules must be"),
])
def test_unusable_configs(tmp_path, config, match) -> None:
    assert match in _error(_adapter(tmp_path, config=config))


def test_missing_files_and_unsafe_pickles(tmp_path) -> None:
    assert "is not a folder" in _error(str(tmp_path / "nowhere"))
    folder = _adapter(tmp_path)
    os.remove(os.path.join(folder, "adapter_config.json"))
    assert "no adapter_config.json" in _error(folder)
    folder = _adapter(tmp_path)
    os.remove(os.path.join(folder, "adapter_model.safetensors"))
    assert "no adapter_model.safetensors or adapter_model.bin" in _error(folder)

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    with open(os.path.join(folder, "adapter_model.bin"), "wb") as f:
        pickle.dump({"x": Evil()}, f, protocol=2)
    assert "cannot be read as a PyTorch state dict with weights_only=True" in _error(folder)


def test_parse_lora_args(tmp_path) -> None:
    assert parse_lora_args(None) == (None, {})
    assert parse_lora_args(["/a", "x=/b", "y.2=/c"]) == ("/a", {"x": "/b", "y.2": "/c"})
    odd = tmp_path / "k=v"
    odd.mkdir()
    assert parse_lora_args([str(odd)]) == (str(odd), {})  # a folder whose path has '=' in it is a path
    with pytest.raises(ValueError, match="only one adapter can be merged"):
        parse_lora_args(["/a", "/b"])
    with pytest.raises(ValueError, match="given twice"):
        parse_lora_args(["x=/a", "x=/b"])


def test_cli_one_line_errors_and_a_named_adapter(tmp_path, capsys) -> None:
    bad = _adapter(tmp_path, lambda layers: layers.pop("model.layers.0.self_attn.qkv_proj"), config={"r": 3})
    common = ["run", "--model", CKPT, "--device", "cpu", "--dtype", "fp32", "--max-tokens", "4", "--json"]
    assert main(common + ["--lora", bad, "hi"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("phi3v: error: LoRA adapter") and err.count("\n") == 1 and "rank 4, but" in err
    good = write_adapter(str(tmp_path / "good"), random_layers(["o_proj"], 2, seed=6), 2, 4, ["o_proj"])
    assert main(common + ["--lora", f"g={good}", "--lora", f"h={good}", "hi"]) == 2
    assert "run and chat answer with one adapter" in capsys.readouterr().err
    assert main(common + ["--lora", f"g={good}", "hi"]) == 0
    named = json.loads(capsys.readouterr().out)["token_ids"]
    assert main(common + ["--lora", good, "hi"]) == 0
    assert json.loads(capsys.readouterr().out)["token_ids"] == named  # per request == merged
    assert main(common + ["hi"]) == 0
    assert json.loads(capsys.readouterr().out)["token_ids"] != named


def test_decoder_shapes_of_the_test_adapters_match_the_checkpoint() -> None:
    """The tests' own layout agrees with the checkpoint's tensors (qkv rows q|k|v, gate_up rows gate|up)."""
    from safetensors import safe_open

    with safe_open(os.path.join(CKPT, "model.safetensors"), "pt") as f:
        assert f.get_slice("model.layers.0.self_attn.qkv_proj.weight").get_shape() == [3 * H, H]
        assert f.get_slice("model.layers.0.mlp.gate_up_proj.weight").get_shape() == [2 * I, H]


def test_batch_records_choose_their_adapter(tmp_path, capsys) -> None:
    good = write_adapter(str(tmp_path / "good"), random_layers(["o_proj", "down_proj"], 2, seed=7), 2, 4,
                         ["o_proj", "down_proj"])
    inp = tmp_path / "in.jsonl"
    recs = [{"id": "base", "prompt": "hi"}, {"id": "g", "prompt": "hi", "lora": "g"}, {"id": "zz", "prompt": "hi", "lora": "zz"}]
    inp.write_text("\n".join(map(json.dumps, recs)) + "\n")

    def batch(out: str, *lora: str) -> dict:
        args = ["batch", "--model", CKPT, "--device", "cpu", "--dtype", "fp32", "--max-tokens", "6", "--ignore-eos",
                "--input", str(inp), "--output", str(tmp_path / out), "--quiet"]
        assert main(args + [x for v in lora for x in ("--lora", v)]) == 0
        return {r["id"]: r for r in map(json.loads, (tmp_path / out).read_text().splitlines())}

    named = batch("named.jsonl", f"g={good}")
    capsys.readouterr()
    assert "unknown LoRA adapter 'zz'; loaded: g" in named["zz"]["error"]
    merged = batch("merged.jsonl", good)  # merged at load: every record answers with it (one naming it fails)
    assert named["g"]["text"] == merged["base"]["text"] != named["base"]["text"]
