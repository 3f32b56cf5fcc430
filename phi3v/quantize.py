"""`phi3v quantize`: write a pre-quantized checkpoint (fp8 or int4 decoder weights) that loads without the
bf16 files.

The output folder has the source's config.json with a `quantization_config` added (phi3v.models.quant.
QuantSpec.to_config), its tokenizer / preprocessor / generation files, and safetensors holding every parameter
of the loaded model: the quantized layers' tensors under their checkpoint names (`...qkv_proj.weight` e4m3 +
`.weight_scale`, or `.qweight` + `.scales` + `.mins`), everything else (embeddings, norms, vision tower, an
unquantized lm_head) in bf16.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil

import torch
from safetensors.torch import save_file

from phi3v.models.quant import QuantSpec

COPIED = ("preprocessor_config.json", "generation_config.json", "processor_config.json", "tokenizer.json",
          "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "added_tokens.json")
SHARD_BYTES = 4 * 1024**3


def save_quantized(model: torch.nn.Module, spec: QuantSpec, src: str, out: str, shard_bytes: int = SHARD_BYTES) -> str:
    """Write `model` (loaded from the checkpoint folder `src` with `spec`) to the folder `out`; returns `out`."""
    if os.path.abspath(src) == os.path.abspath(out):
        raise ValueError("--output must differ from the source checkpoint folder")
    os.makedirs(out, exist_ok=True)
    for fn in os.listdir(out):  # stale weights of an earlier call would confuse the loader
        if fn.endswith(".safetensors") or fn == "model.safetensors.index.json":
            os.remove(os.path.join(out, fn))
    with open(os.path.join(src, "config.json"), encoding="utf-8") as f:
        cfg = json.load(f)
    cfg["quantization_config"] = spec.to_config()
    with open(os.path.join(out, "config.json"), "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=2)
    for fn in COPIED:
        if os.path.isfile(os.path.join(src, fn)):
            shutil.copyfile(os.path.join(src, fn), os.path.join(out, fn))

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, p in model.named_parameters():  # a tied lm_head is deduplicated away, as in HF checkpoints
        t = p.detach().to("cpu").contiguous()
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
        return out
    weight_map: dict[str, str] = {}
    for i, shard in enumerate(shards):
        fn = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(out, fn), metadata={"format": "pt"})
        weight_map.update({n: fn for n in shard})
    total = sum(t.numel() * t.element_size() for s in shards for t in s.values())
    with open(os.path.join(out, "model.safetensors.index.json"), "w", encoding="utf-8") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return out


def cmd_quantize(a: argparse.Namespace) -> int:
    from phi3v.config import Phi3VConfig
    from phi3v.hub import resolve_model
    from phi3v.models.weights import checkpoint_quantization, load_model

    spec = QuantSpec(a.quantization, a.group_size, a.quantize_lm_head)
    src = resolve_model(a.model, None)
    if checkpoint_quantization(src) is not None:
        raise ValueError(f"{a.model} is quantized already: quantize the bf16 checkpoint")
    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    old_gpu = device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9)
    if a.device is None and spec.method == "fp8" and old_gpu:
        device = torch.device("cpu")  # quantizing needs no FP8 GEMM; this GPU could not run one (the loader refuses)
    config = Phi3VConfig.from_pretrained(src)
    model = load_model(src, config, device, torch.bfloat16, spec)
    save_quantized(model, spec, src, a.output)
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    print(f"phi3v: wrote {spec.method} checkpoint to {a.output} ({nbytes / 2**30:.2f} GiB of weights)")
    return 0
