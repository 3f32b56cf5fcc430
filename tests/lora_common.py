"""LoRA adapters for the tests, written here in PEFT's own naming and layout (not by phi3v's code, so that a naming
slip in the loader cannot cancel out), and the hand-merged checkpoints they are checked against. No test here."""

from __future__ import annotations

import json
import os
import shutil

import torch
from safetensors.torch import load_file, save_file

from engine_common import CKPT
from phi3v.config import Phi3VConfig

CFG = Phi3VConfig.from_pretrained(CKPT)
H, I = CFG.hidden_size, CFG.intermediate_size
# the decoder's linear layers by their PEFT target name: (checkpoint module suffix, (out, in))
DECODER = {"qkv_proj": ("self_attn.qkv_proj", (3 * H, H)), "o_proj": ("self_attn.o_proj", (H, H)),
           "gate_up_proj": ("mlp.gate_up_proj", (2 * I, H)), "down_proj": ("mlp.down_proj", (H, I))}
PREFIX = "base_model.model."


def random_layers(targets: list[str], r: int, seed: int,
                  std: float = 0.3) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{checkpoint module name: (A (r, in), B (out, r))} for every decoder layer's `targets`. B is not zero (PEFT
    initialises it to zero; a trained adapter's is not)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i in range(CFG.num_hidden_layers):
        for t in targets:
            suffix, (o, n) = DECODER[t]
            a, b = torch.randn(r, n, generator=g) * std, torch.randn(o, r, generator=g) * std
            out[f"model.layers.{i}.{suffix}"] = (a, b)
    return out


def write_adapter(folder: str, layers: dict[str, tuple[torch.Tensor, torch.Tensor]], r: int, alpha: float,
                  targets: list[str] | str, *, rslora: bool = False, saved: dict[str, torch.Tensor] | None = None,
                  fmt: str = "safetensors", config: dict | None = None) -> str:
    """A PEFT adapter folder: adapter_config.json + adapter_model.safetensors (fmt "bin": adapter_model.bin)."""
    os.makedirs(folder, exist_ok=True)
    sd = {}
    for mod, (a, b) in layers.items():
        sd[f"{PREFIX}{mod}.lora_A.weight"] = a.contiguous()
        sd[f"{PREFIX}{mod}.lora_B.weight"] = b.contiguous()
    for name, t in (saved or {}).items():
        sd[PREFIX + name] = t.contiguous()
    if fmt == "bin":
        torch.save(sd, os.path.join(folder, "adapter_model.bin"))
    else:
        save_file(sd, os.path.join(folder, "adapter_model.safetensors"), metadata={"format": "pt"})
    to_save = sorted({n.rsplit(".", 1)[0].split(".")[-1] for n in saved or {}}) or None
    cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM",
           "base_model_name_or_path": "microsoft/Phi-3-vision-128k-instruct", "r": r, "lora_alpha": alpha,
           "lora_dropout": 0.05, "use_rslora": rslora, "bias": "none", "target_modules": targets,
           "modules_to_save": to_save, "fan_in_fan_out": False, "use_dora": False}
    cfg.update(config or {})
    with open(os.path.join(folder, "adapter_config.json"), "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=2)
    return folder


def merged_checkpoint(dst: str, layers: dict[str, tuple[torch.Tensor, torch.Tensor]], scale: float,
                      saved: dict[str, torch.Tensor] | None = None, fmt: str = "safetensors") -> str:
    """A copy of the tiny checkpoint with the adapter merged by hand: W + scale * (B @ A) in fp32 (stored in fp32),
    modules_to_save weights replaced. fmt "bin-shards": pytorch_model-0000i-of-00002.bin + its index."""
    os.makedirs(dst, exist_ok=True)
    for fn in os.listdir(CKPT):
        if not fn.endswith(".safetensors"):
            shutil.copyfile(os.path.join(CKPT, fn), os.path.join(dst, fn))
    sd = load_file(os.path.join(CKPT, "model.safetensors"))
    for mod, (a, b) in layers.items():
        sd[f"{mod}.weight"] = sd[f"{mod}.weight"].float() + scale * (b @ a)
    sd.update(saved or {})
    if fmt == "safetensors":
        save_file(sd, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
        return dst
    names = sorted(sd)
    half = len(names) // 2
    weight_map = {}
    for i, part in enumerate((names[:half], names[half:])):
        fn = f"pytorch_model-{i + 1:05d}-of-00002.bin"
        torch.save({n: sd[n] for n in part}, os.path.join(dst, fn))
        weight_map.update({n: fn for n in part})
    with open(os.path.join(dst, "pytorch_model.bin.index.json"), "w", encoding="utf-8") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    return dst
