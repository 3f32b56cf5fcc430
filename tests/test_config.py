"""Config parsing against the real models' files (every key they use) and the tiny checkpoint."""

import json
import math
from pathlib import Path

import pytest
import torch

from phi3v.config import Phi3VConfig

DATA = Path(__file__).parent / "data"
P3 = DATA / "real-configs" / "phi-3-vision-128k-instruct"
P35 = DATA / "real-configs" / "phi-3.5-vision-instruct"


@pytest.mark.parametrize("folder,num_crops", [(P3, 16), (P35, 4)])
def test_real_configs(folder: Path, num_crops: int) -> None:
    c = Phi3VConfig.from_pretrained(str(folder))
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.head_dim) == (3072, 32, 32, 96)
    assert c.num_crops == num_crops  # preprocessor_config.json: 16 for Phi-3-vision, 4 for 3.5
    assert c.original_max_position_embeddings == 4096 and c.max_position_embeddings == 131072
    assert c.rope_type == "longrope" and len(c.short_factor) == len(c.long_factor) == 48
    assert math.isclose(c.rope_mscale, math.sqrt(1 + math.log(32) / math.log(4096)))
    # CLIP ViT-L/14-336 by default, cut at hidden_states[-2]: 23 of 24 layers run
    v = c.vision
    assert (v.hidden_size, v.num_hidden_layers, v.grid, v.num_layers_used) == (1024, 24, 24, 23)
    assert c.num_img_tokens == 144 and c.merged_dim == 4096 and c.image_dim_out == 1024
    assert c.hd_transform_order == "sub_glb" and c.projection_cls == "mlp"
    assert {32000, 32007, 2} <= set(c.eos_token_ids)  # <|endoftext|>, <|end|>, config/generation eos


def test_full_size_skeleton_has_the_real_parameter_count() -> None:
    from phi3v.models.phi3v import Phi3VForCausalLM

    with torch.device("meta"):
        m = Phi3VForCausalLM(Phi3VConfig.from_pretrained(str(P3)))
    n = sum(p.numel() for p in m.parameters())
    assert 4.14e9 < n < 4.16e9  # 4.15 B, as the reference reports for the checkpoint


def test_longrope_spelling_and_errors(tmp_path: Path) -> None:
    cfg = json.loads((P35 / "config.json").read_text())
    cfg["rope_scaling"] = {**cfg["rope_scaling"], "type": "longrope"}
    a = Phi3VConfig.from_dict(cfg)
    assert a.rope_type == "longrope" and a.short_factor == cfg["rope_scaling"]["short_factor"]
    with pytest.raises(ValueError, match="rope_scaling type"):
        Phi3VConfig.from_dict({**cfg, "rope_scaling": {**cfg["rope_scaling"], "type": "yarn"}})
    bad = {**cfg, "rope_scaling": {**cfg["rope_scaling"], "short_factor": [1.0] * 3}}
    with pytest.raises(ValueError, match="short_factor"):
        Phi3VConfig.from_dict(bad)
    with pytest.raises(ValueError, match="config.json"):
        Phi3VConfig.from_pretrained(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "model_type": "llama"}))
    with pytest.raises(ValueError, match="phi3_v"):
        Phi3VConfig.from_pretrained(str(tmp_path))


def test_tiny_checkpoint_vision_override() -> None:
    c = Phi3VConfig.from_pretrained(str(DATA / "tiny-phi3v"))
    assert (c.vision.hidden_size, c.vision.num_hidden_layers, c.vision.num_layers_used) == (32, 3, 2)
    assert c.original_max_position_embeddings == 512 and c.num_crops == 16


def test_repo_id_downloads_only_the_needed_files(monkeypatch, tmp_path: Path) -> None:
    import huggingface_hub

    from phi3v.hub import resolve_model

    calls = {}

    def fake_snapshot_download(repo_id, revision=None, allow_patterns=None, **kw):
        calls.update(repo_id=repo_id, revision=revision, allow_patterns=allow_patterns)
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    assert resolve_model("microsoft/Phi-3.5-vision-instruct", "main") == str(tmp_path)
    assert calls["repo_id"] == "microsoft/Phi-3.5-vision-instruct" and calls["revision"] == "main"
    pats = calls["allow_patterns"]
    assert "*.safetensors" in pats and "*.json" in pats and not any(p.endswith(".py") or ".bin" in p for p in pats)
    with pytest.raises(ValueError, match="neither a checkpoint folder"):
        resolve_model("not a repo id")


def test_engine_config_validates_and_names_unknown_options() -> None:
    from phi3v.engine.config import EngineConfig

    assert EngineConfig.from_options({"max_num_seqs": 3}).max_num_seqs == 3
    with pytest.raises(ValueError, match="unknown engine option.*max_num_seq\\b"):
        EngineConfig.from_options({"max_num_seq": 3})
    for bad in ({"max_num_seqs": 0}, {"kv_cache_dtype": "int8"}, {"gpu_memory_utilization": 1.5},
                {"kv_block_size": 0}, {"max_model_len": 1}, {"prefill_chunk": 0}):
        with pytest.raises(ValueError, match="invalid engine option"):
            EngineConfig(**bad)


def test_engine_switches_are_read_from_the_environment_only_by_the_cli() -> None:
    from phi3v.cli import engine_switches

    assert engine_switches({}) == {}
    got = engine_switches({"PHI3V_FUSED": "0", "PHI3V_RUN_AHEAD": "off", "PHI3V_PDL": "1",
                           "PHI3V_ATTN_CONFIG": "bf16=32,2,1;fp8=64,4,3"})
    assert got == {"fused_kernels": False, "run_ahead": False, "pdl": True,
                   "attn_configs": {"bf16": (32, 2, 1), "fp8": (64, 4, 3)}}
    with pytest.raises(ValueError, match="PHI3V_FUSED"):
        engine_switches({"PHI3V_FUSED": "maybe"})
    with pytest.raises(ValueError, match="attention config"):
        engine_switches({"PHI3V_ATTN_CONFIG": "bf16=32,2"})
    with pytest.raises(ValueError, match="attention config"):
        engine_switches({"PHI3V_ATTN_CONFIG": "int4=32,2,1"})


def test_two_engines_in_one_process_keep_their_own_switches() -> None:
    """The switches live in each engine's config and model, not in module globals."""
    import torch

    from phi3v.engine.config import EngineConfig
    from phi3v.engine.engine import Engine
    from phi3v.models.weights import load_model

    folder = "tests/data/tiny-phi3v"
    cfg = Phi3VConfig.from_pretrained(folder)
    a = Engine(load_model(folder, cfg, "cpu", torch.float32), cfg,
               EngineConfig(max_model_len=256, pdl=False, attn_configs={"bf16": (32, 2, 1)}))
    b = Engine(load_model(folder, cfg, "cpu", torch.float32), cfg,
               EngineConfig(max_model_len=256, pdl=True, run_ahead=False, paged_prefill="off"))
    assert a.runner.decoder.kernel.pdl is False and b.runner.decoder.kernel.pdl is True
    assert a.runner.decoder.kernel.config(False) == (32, 2, 1) and b.runner.decoder.kernel.config(False) is None
    assert a.runner.prefill_kernel.mode == "past" and b.runner.prefill_kernel.mode == "off"
    assert not a.model.pdl and not b.model.pdl  # no Triton on this CPU: fused kernels (and so PDL) are off
