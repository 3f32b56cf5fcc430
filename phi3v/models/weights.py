"""Checkpoint I/O: load a Hugging Face Phi-3(.5)-vision folder, write random-weight checkpoints.

Loading builds the model on the `meta` device (no memory), checks every checkpoint name and shape
against the model before reading any data, then reads tensors one at a time (safetensors mmap) straight
to the target device and dtype, so at most one tensor is ever held twice.

Quantized weights (phi3v.models.quant): `quantization="fp8" | "int4"` quantizes the decoder's linear layers
as each bf16 tensor arrives (on the target device); a checkpoint written by `phi3v quantize` (config.json
has a `quantization_config`) holds the quantized tensors themselves and loads without any bf16 weights.
"""

from __future__ import annotations

from dataclasses import replace

import json
import os
import re
import shutil
from typing import Callable

import torch
from safetensors.torch import save_file
from torch import nn

from phi3v.config import Phi3VConfig
from phi3v.models.phi3v import Phi3VForCausalLM
from phi3v.models.quant import QuantLinear, QuantSpec, swap_linears
from phi3v.models.tensor_files import TensorFile

__all__ = ["load_model", "random_checkpoint", "checkpoint_files", "checkpoint_quantization", "check_quant_device",
           "param_name"]

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
BIN_SINGLE_FILE = "pytorch_model.bin"
BIN_INDEX_FILE = "pytorch_model.bin.index.json"

# Checkpoint name -> model name (None: known duplicate or stale buffer, skipped).
_RENAMES: list[tuple[re.Pattern[str], str | None]] = [
    # The reference's image embedder holds a second reference to embed_tokens.
    (re.compile(r"^model\.vision_embed_tokens\.wte\.weight$"), None),
    # Buffers that older transformers versions saved; recomputed here.
    (re.compile(r"\.embeddings\.position_ids$"), None),
    (re.compile(r"\.rotary_emb\.inv_freq$"), None),
]


def param_name(ckpt_name: str) -> str | None:
    """The model parameter a checkpoint name loads into (None: a known duplicate or stale buffer, skipped)."""
    for pat, repl in _RENAMES:
        if pat.search(ckpt_name):
            return None if repl is None else pat.sub(repl, ckpt_name)
    return ckpt_name


def checkpoint_files(folder: str) -> list[str]:
    """The weight files of a checkpoint folder: the shards of the index, or the single file; safetensors
    (`model*.safetensors`) first, else PyTorch pickles (`pytorch_model*.bin`, read with weights_only=True)."""
    for index_name, single_name in ((INDEX_FILE, SINGLE_FILE), (BIN_INDEX_FILE, BIN_SINGLE_FILE)):
        index = os.path.join(folder, index_name)
        if os.path.isfile(index):
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise ValueError(f"{index}: no weight_map")
            files = [os.path.join(folder, n) for n in sorted(set(weight_map.values()))]
            absent = [p for p in files if not os.path.isfile(p)]
            if absent:
                raise ValueError(f"{index} names shards that are missing: {', '.join(map(os.path.basename, absent))}")
            return files
        single = os.path.join(folder, single_name)
        if os.path.isfile(single):
            return [single]
    raise ValueError(f"{folder}: neither {SINGLE_FILE} nor {INDEX_FILE} found "
                     f"(nor {BIN_SINGLE_FILE} / {BIN_INDEX_FILE})")


def _listing(title: str, items: list[str], limit: int = 20) -> str:
    more = f" ... and {len(items) - limit} more" if len(items) > limit else ""
    return f"{title} ({len(items)}):\n  " + "\n  ".join(items[:limit]) + more


def _set_param(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    mod_name, _, attr = name.rpartition(".")
    mod = model.get_submodule(mod_name)
    mod._parameters[attr] = nn.Parameter(tensor, requires_grad=False)


def checkpoint_quantization(folder: str) -> QuantSpec | None:
    """The QuantSpec of a checkpoint written by `phi3v quantize` (its config.json's quantization_config)."""
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        qc = json.load(f).get("quantization_config")
    return None if qc is None else QuantSpec.from_config(qc)


def check_quant_device(spec: QuantSpec | None, device: torch.device) -> None:
    """fp8 needs FP8 tensor cores on a GPU (compute capability >= 8.9); on the CPU it runs the plain-torch
    emulation (slow, for tests). int4 runs anywhere (Triton kernels on CUDA, a dequantising fallback elsewhere)."""
    if spec is not None and spec.method == "fp8" and device.type == "cuda":
        cc = torch.cuda.get_device_capability(device)
        if cc < (8, 9):
            raise ValueError(f"quantization='fp8' needs an NVIDIA GPU of compute capability 8.9 or newer "
                             f"(Ada, Hopper) for its FP8 GEMMs; this one is {cc[0]}.{cc[1]}: use int4 or none")


def _quant_plan(model: Phi3VForCausalLM, folder: str, quantization: str | QuantSpec | None,
                ) -> tuple[QuantSpec | None, dict[str, QuantLinear], bool]:
    """Swap in the quantized layers; returns (spec, {module name: layer}, whether the checkpoint holds them
    quantized already). Raises ValueError when the asked-for mode and the checkpoint's disagree."""
    saved = checkpoint_quantization(folder)
    asked = QuantSpec.parse(quantization)
    if saved is not None and asked is not None and asked.method != saved.method:
        raise ValueError(f"{folder} holds {saved.method} weights (written by `phi3v quantize`); it cannot be "
                         f"loaded as {asked.method}: leave quantization unset or use the bf16 checkpoint")
    spec = saved if asked is None else replace(saved, decode_dot=asked.decode_dot) if saved else asked
    return spec, (swap_linears(model, spec) if spec else {}), saved is not None


def load_model(folder: str, config: Phi3VConfig, device: torch.device | str = "cpu",
               dtype: torch.dtype = torch.bfloat16,
               quantization: str | QuantSpec | None = None,
               patch: Callable[[str, torch.Tensor], torch.Tensor] | None = None) -> Phi3VForCausalLM:
    """Build `Phi3VForCausalLM` for `config` and fill it from the safetensors in `folder`.

    `quantization`: None (the checkpoint's own: bf16, or what `phi3v quantize` wrote), "fp8", "int4" or a
    QuantSpec (quantize the decoder's linear layers at load time). Raises ValueError listing missing keys,
    unexpected keys and shape mismatches (first 20 of each, with counts) before any tensor data is read.
    `patch(model name, tensor)`: each checkpoint tensor passes through it before it is cast or quantized (a LoRA
    adapter merged into the weights, phi3v.lora_io); it must keep the shape.
    """
    device = torch.device(device)
    with torch.device("meta"):
        model = Phi3VForCausalLM(config)
    spec, quant, prequantized = _quant_plan(model, folder, quantization)
    check_quant_device(spec, device)
    # named_parameters() drops the tied duplicate, so with tied embeddings lm_head.weight is not expected.
    expected = {n: tuple(p.shape) for n, p in model.named_parameters()}
    at_load: dict[str, QuantLinear] = {}  # checkpoint weight name -> layer to quantize it into
    if not prequantized:
        for name, mod in quant.items():
            for pname, _ in mod.named_parameters():
                del expected[f"{name}.{pname}"]
            expected[f"{name}.weight"] = (mod.out_features, mod.in_features)
            at_load[f"{name}.weight"] = mod
    tied = config.tie_word_embeddings

    where = _locate(folder, expected, tied)  # pass 1: headers only (names and shapes)

    # Pass 2: data, one tensor at a time, file by file.
    by_file: dict[str, list[tuple[str, str]]] = {}
    for name, (path, key) in where.items():
        by_file.setdefault(path, []).append((name, key))
    for path, entries in by_file.items():
        with TensorFile(path) as f:
            for name, key in entries:
                t = f.get(key) if patch is None else patch(name, f.get(key))
                if name in at_load:  # quantized on the device, from the checkpoint's dtype
                    at_load[name].quantize_(t.to(device))
                    continue
                mod, _, leaf = name.rpartition(".")
                cast = getattr(quant[mod], leaf).dtype if mod in quant else dtype  # quantized: as stored
                _set_param(model, name, t.to(device=device, dtype=cast))
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight
    for m in model.modules():
        if hasattr(m, "materialize_buffers"):
            m.materialize_buffers(device)
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:  # would be a bug here, not in the checkpoint
        raise RuntimeError(f"tensors left unmaterialised: {left[:20]}")
    return model.eval()


# ---------------------------------------------------------------------------- random checkpoints
def _hf_config_dict(config: Phi3VConfig) -> dict:
    """A config.json that `Phi3VConfig.from_pretrained` parses back into `config`."""
    v = config.vision
    rope = None
    if config.rope_type is not None:
        rope = {"type": "su", "short_factor": list(config.short_factor), "long_factor": list(config.long_factor)}
    return {
        "architectures": ["Phi3VForCausalLM"], "model_type": "phi3_v", "hidden_act": "silu",
        "vocab_size": config.vocab_size, "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size, "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads, "num_key_value_heads": config.num_key_value_heads,
        "rms_norm_eps": config.rms_norm_eps, "rope_theta": config.rope_theta, "rope_scaling": rope,
        "max_position_embeddings": config.max_position_embeddings,
        "original_max_position_embeddings": config.original_max_position_embeddings,
        "bos_token_id": config.bos_token_id, "eos_token_id": list(config.eos_token_ids),
        "pad_token_id": config.pad_token_id, "tie_word_embeddings": config.tie_word_embeddings,
        "sliding_window": config.sliding_window, "torch_dtype": "bfloat16",
        "embd_layer": {"embedding_cls": "image", "hd_transform_order": config.hd_transform_order,
                       "projection_cls": config.projection_cls, "use_hd_transform": config.use_hd_transform,
                       "with_learnable_separator": config.with_learnable_separator},
        "img_processor": {
            "image_dim_out": config.image_dim_out, "model_name": "openai/clip-vit-large-patch14-336",
            "name": "clip_vision_model", "num_img_tokens": config.num_img_tokens, "layer_idx": v.layer_idx,
            "vision_config": {"hidden_size": v.hidden_size, "intermediate_size": v.intermediate_size,
                              "num_hidden_layers": v.num_hidden_layers, "num_attention_heads": v.num_attention_heads,
                              "image_size": v.image_size, "patch_size": v.patch_size, "num_channels": v.num_channels,
                              "layer_norm_eps": v.layer_norm_eps, "hidden_act": v.hidden_act},
        },
    }

def _locate(folder: str, expected: dict[str, tuple[int, ...]], tied: bool) -> dict[str, tuple[str, str]]:
    """{model name: (file, checkpoint name)} from the checkpoint's headers; ValueError listing missing,
    unexpected, mismatched and duplicated keys before any tensor data is read."""
    where: dict[str, tuple[str, str]] = {}
    unexpected: list[str] = []
    mismatched: list[str] = []
    duplicated: list[str] = []
    for path in checkpoint_files(folder):
        with TensorFile(path) as f:
            for key in f.keys():
                name = param_name(key)
                if name is None or (tied and name == "lm_head.weight"):
                    continue
                if name not in expected:
                    unexpected.append(key)
                    continue
                if name in where:
                    duplicated.append(f"{key} (in {os.path.basename(where[name][0])} and {os.path.basename(path)})")
                    continue
                shape = f.shape(key)
                if shape != expected[name]:
                    mismatched.append(f"{key}: checkpoint {list(shape)}, model {list(expected[name])}")
                where[name] = (path, key)
    missing = sorted(n for n in expected if n not in where)
    if missing or unexpected or mismatched or duplicated:
        parts = [f"checkpoint {folder} does not match the model built from its config:"]
        for title, items in (("missing keys", missing), ("unexpected keys", sorted(unexpected)),
                             ("shape mismatches", mismatched), ("duplicated keys", duplicated)):
            if items:
                parts.append(_listing(title, items))
        raise ValueError("\n".join(parts))
    return where



def _random_tensor(name: str, shape: tuple[int, ...], gen: torch.Generator, device: str) -> torch.Tensor:
    """Scaled so that a full-size random model keeps sane activations (std-0.02 init, unit-ish norms)."""
    if name.endswith("norm.weight") or re.search(r"layer_?norm\d?\.weight$|pre_layrnorm\.weight$", name):
        return 1.0 + 0.1 * torch.randn(shape, generator=gen, device=device)
    return 0.02 * torch.randn(shape, generator=gen, device=device)


def random_checkpoint(config: Phi3VConfig, folder: str, dtype: torch.dtype = torch.bfloat16, seed: int = 0,
                      shard_bytes: int = 2 * 1024**3, device: str = "cpu") -> str:
    """Write a random-weight checkpoint of `config` in the exact Hugging Face layout; returns `folder`.

    config.json (and the preprocessor/generation/tokenizer files) are copied from `config.name_or_path`
    when it is a checkpoint folder, else written from `config`. Weights go to `model.safetensors`, or to
    `model-0000i-of-0000n.safetensors` + `model.safetensors.index.json` when they exceed `shard_bytes`.
    The values depend only on `seed` (not on sharding): the same seed gives the same weights.
    `device="cuda"` generates on the GPU (much faster for full-size configs).
    """
    os.makedirs(folder, exist_ok=True)
    src = config.name_or_path
    if src and os.path.isfile(os.path.join(src, "config.json")):
        for fn in ("config.json", "preprocessor_config.json", "generation_config.json", "processor_config.json",
                   "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model"):
            if os.path.isfile(os.path.join(src, fn)):
                shutil.copyfile(os.path.join(src, fn), os.path.join(folder, fn))
    else:
        with open(os.path.join(folder, "config.json"), "w", encoding="utf-8") as f:
            json.dump(_hf_config_dict(config), f, indent=2)
        with open(os.path.join(folder, "preprocessor_config.json"), "w", encoding="utf-8") as f:
            json.dump({"num_crops": config.num_crops, "num_img_tokens": config.num_img_tokens,
                       "image_mean": list(config.image_mean), "image_std": list(config.image_std),
                       "image_processor_type": "Phi3VImageProcessor"}, f, indent=2)
    for fn in os.listdir(folder):  # stale weights of an earlier call would confuse the loader
        if fn.endswith(".safetensors") or fn == INDEX_FILE:
            os.remove(os.path.join(folder, fn))

    with torch.device("meta"):
        model = Phi3VForCausalLM(config)
    gen = torch.Generator(device=device).manual_seed(seed)
    shards: list[list[str]] = [[]]  # names per shard, then written
    tmp_names: list[str] = []
    weight_map: dict[str, str] = {}
    current: dict[str, torch.Tensor] = {}
    size = total = 0

    def flush() -> None:
        nonlocal current, size
        tmp = f"tmp-{len(tmp_names):05d}.safetensors"
        save_file(current, os.path.join(folder, tmp), metadata={"format": "pt"})
        tmp_names.append(tmp)
        shards.append([])
        current, size = {}, 0

    for name, p in model.named_parameters():  # tied lm_head is deduplicated away, as in HF checkpoints
        t = _random_tensor(name, tuple(p.shape), gen, device).to(dtype).cpu().contiguous()
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > shard_bytes:
            flush()
        current[name] = t
        shards[-1].append(name)
        size += nbytes
        total += nbytes
    flush()
    shards.pop()
    n = len(tmp_names)
    if n == 1:
        os.replace(os.path.join(folder, tmp_names[0]), os.path.join(folder, SINGLE_FILE))
        return folder
    for i, (tmp, names) in enumerate(zip(tmp_names, shards)):
        final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        os.replace(os.path.join(folder, tmp), os.path.join(folder, final))
        weight_map.update({nm: final for nm in names})
    with open(os.path.join(folder, INDEX_FILE), "w", encoding="utf-8") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return folder
