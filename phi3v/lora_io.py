"""LoRA adapters as PEFT saves them: a folder with `adapter_config.json` and `adapter_model.safetensors` (or
`adapter_model.bin`, read with weights_only=True), checked against the model before any weight is read.

PEFT's layout for Phi-3-vision (the Hugging Face model class whose module names the checkpoint's parameter names
follow): `base_model.model.<module>.lora_A.weight` (r, in) and `.lora_B.weight` (out, r) for each targeted linear
layer `<module>` (e.g. `model.layers.3.self_attn.qkv_proj`, fused q|k|v rows as in the checkpoint;
`model.layers.3.mlp.gate_up_proj`; `model.vision_embed_tokens.img_projection.0`), and
`base_model.model.<parameter>` for the full weights of `modules_to_save` (e.g. `lm_head.weight`). The update of a
layer is W' = W + scale * B @ A with scale = lora_alpha / r (lora_alpha / sqrt(r) with `use_rslora`; per module
through `rank_pattern` / `alpha_pattern`).

`load_adapter` returns a `LoraAdapter` (A, B in fp32, per module) or raises one ValueError listing everything that
does not fit. Merged at load (`LoraAdapter.patch`, a hook of phi3v.models.weights.load_model) or stacked for
per-request use (phi3v.models.lora.attach_loras).
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Mapping

import torch
from torch import Tensor, nn

from phi3v.config import Phi3VConfig
from phi3v.models.lora import DECODER_MODULE, LoraLayer
from phi3v.models.phi3v import Phi3VForCausalLM
from phi3v.models.tensor_files import TensorFile
from phi3v.models.weights import checkpoint_quantization, param_name

__all__ = ["LoraLayer", "LoraAdapter", "load_adapter", "load_adapters", "parse_lora_args", "check_adapter_name",
           "ADAPTER_CONFIG"]

ADAPTER_CONFIG = "adapter_config.json"
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
_LORA_KEY = re.compile(r"^base_model\.model\.(.+)\.lora_([AB])(?:\.default)?\.weight$")
_PREFIX = "base_model.model."
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")


@dataclass
class LoraAdapter:
    name: str
    path: str
    layers: dict[str, LoraLayer]  # module name (the checkpoint's, without ".weight") -> its update
    saved: dict[str, Tensor] = field(default_factory=dict)  # modules_to_save: parameter name -> full weight

    def patch(self, name: str, t: Tensor) -> Tensor:
        """The load-time hook (phi3v.models.weights.load_model): checkpoint tensor `name` with this adapter merged,
        W + scale * B @ A computed in fp32 (cast to the model's dtype by the loader); a modules_to_save weight is
        replaced whole."""
        if name in self.saved:
            return self.saved[name]
        mod, _, leaf = name.rpartition(".")
        lay = self.layers.get(mod) if leaf == "weight" else None
        return t if lay is None else t.float() + lay.delta()


def check_adapter_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(f"adapter name {name!r}: use 1-64 letters, digits, '_', '.' or '-' (starting with a letter "
                         "or digit)")
    return name


def parse_lora_args(values: list[str] | None) -> tuple[str | None, dict[str, str]]:
    """`--lora` values -> (the path merged at load, {name: path} chosen per request). `NAME=PATH` names an adapter
    for per-request use; a bare `PATH` is merged (at most one)."""
    merged: list[str] = []
    named: dict[str, str] = {}
    for v in values or []:
        name, eq, path = v.partition("=")
        if eq and not _NAME.match(name) and not os.path.isdir(v):
            check_adapter_name(name)  # NAME=PATH with a bad name: say so, not "not an adapter folder"
        if eq and _NAME.match(name) and not os.path.isdir(v):
            if name in named:
                raise ValueError(f"--lora {name}=...: the name {name!r} is given twice")
            named[name] = path
        else:
            merged.append(v)
    if len(merged) > 1:
        raise ValueError(f"--lora: only one adapter can be merged at load (got {', '.join(merged)}); "
                         "name the others (--lora NAME=PATH) to choose them per request")
    return (merged[0] if merged else None), named


# ---------------------------------------------------------------------------------------------- the config
@dataclass
class _Config:
    r: int
    alpha: float
    rslora: bool
    targets: list[str] | str
    to_save: list[str]
    rank_pattern: dict[str, int]
    alpha_pattern: dict[str, float]

    def scale(self, module: str, rank: int) -> float:
        alpha = float(_pattern(self.alpha_pattern, module, self.alpha))
        return alpha / math.sqrt(rank) if self.rslora else alpha / rank

    def rank(self, module: str) -> int:
        return int(_pattern(self.rank_pattern, module, self.r))

    def targets_module(self, module: str) -> bool:
        t = self.targets
        if t == "all-linear":
            return module != "lm_head"
        if isinstance(t, str):
            return re.fullmatch(t, module) is not None
        return any(module == x or module.endswith("." + x) for x in t)


def _pattern(patterns: dict, module: str, default: float) -> float:
    for key, v in patterns.items():
        if re.fullmatch(rf"(.*\.)?{key}", module):
            return v
    return default


def _read_config(path: str) -> _Config:
    cfg_path = os.path.join(path, ADAPTER_CONFIG)
    if not os.path.isfile(cfg_path):
        raise ValueError(f"LoRA adapter {path}: no {ADAPTER_CONFIG} (a PEFT adapter folder holds it next to "
                         f"{' or '.join(WEIGHT_FILES)})")
    try:
        with open(cfg_path, encoding="utf-8") as f:
            c = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"LoRA adapter {path}: {ADAPTER_CONFIG} is not readable JSON: {e}") from None
    if not isinstance(c, dict):
        raise ValueError(f"LoRA adapter {path}: {ADAPTER_CONFIG} is not a JSON object")
    bad = []
    if c.get("peft_type", "LORA") not in ("LORA", "lora"):
        bad.append(f"peft_type {c.get('peft_type')!r} (only LORA adapters are supported)")
    if c.get("use_dora"):
        bad.append("use_dora: true (DoRA adapters are not supported)")
    if c.get("fan_in_fan_out"):
        bad.append("fan_in_fan_out: true (Conv1D layers; Phi-3-vision has none)")
    if c.get("bias", "none") != "none" or c.get("lora_bias"):
        bad.append(f"bias {c.get('bias')!r} (trained biases are not supported: Phi-3's linear layers have none)")
    r, alpha = c.get("r"), c.get("lora_alpha", c.get("r"))
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        bad.append(f"r must be a positive integer, got {r!r}")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
        bad.append(f"lora_alpha must be a number, got {alpha!r}")
    targets = c.get("target_modules")
    if not (isinstance(targets, str) or (isinstance(targets, list) and all(isinstance(t, str) for t in targets))):
        bad.append(f"target_modules must be a list of module names or a regular expression, got {targets!r}")
    to_save = c.get("modules_to_save") or []
    if not isinstance(to_save, list) or not all(isinstance(t, str) for t in to_save):
        bad.append(f"modules_to_save must be a list of module names, got {to_save!r}")
    if bad:
        raise ValueError(f"LoRA adapter {path}: {ADAPTER_CONFIG} is not usable: " + "; ".join(bad))
    return _Config(r, float(alpha), bool(c.get("use_rslora", False)), targets, to_save,
                   dict(c.get("rank_pattern") or {}), dict(c.get("alpha_pattern") or {}))


# ---------------------------------------------------------------------------------------------- the weights
def _model_shapes(config: Phi3VConfig) -> tuple[dict[str, tuple[int, int]], dict[str, tuple[int, ...]]]:
    """({linear module name: (out, in)}, {parameter name: shape}) of the model built from `config` (meta)."""
    with torch.device("meta"):
        model = Phi3VForCausalLM(config)
    linears = {n: (m.out_features, m.in_features) for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    return linears, {n: tuple(p.shape) for n, p in model.named_parameters()}


def _weight_file(path: str) -> str:
    for fn in WEIGHT_FILES:
        if os.path.isfile(os.path.join(path, fn)):
            return os.path.join(path, fn)
    raise ValueError(f"LoRA adapter {path}: no {' or '.join(WEIGHT_FILES)}")


def load_adapter(path: str, config: Phi3VConfig, name: str | None = None) -> LoraAdapter:
    """Read and check the PEFT adapter folder `path` against the model of `config`. Raises ValueError naming every
    key that does not fit (unknown modules, shapes, ranks, A without B, keys of no known kind)."""
    if not isinstance(path, str) or not os.path.isdir(path):
        raise ValueError(f"LoRA adapter {path!r} is not a folder (a PEFT adapter folder: {ADAPTER_CONFIG} + "
                         f"{' or '.join(WEIGHT_FILES)})")
    cfg = _read_config(path)
    wfile = _weight_file(path)
    linears, params = _model_shapes(config)
    problems: list[str] = []
    if isinstance(cfg.targets, list):
        problems += [f"target_modules entry {t!r}: no linear layer of the model has this name"
                     for t in cfg.targets if not any(m == t or m.endswith("." + t) for m in linears)]
    halves: dict[str, dict[str, Tensor]] = {}
    saved: dict[str, Tensor] = {}
    with TensorFile(wfile) as f:
        for key in f.keys():
            m = _LORA_KEY.match(key)
            if m:
                halves.setdefault(m.group(1), {})[m.group(2)] = f.get(key)
                continue
            pname = _saved_param(key, cfg.to_save, params)
            if pname is None and key.startswith(_PREFIX) and param_name(key[len(_PREFIX):]) is None:
                continue  # a known duplicate (the image embedder's second reference to embed_tokens)
            if pname is None:
                problems.append(f"{key}: not a LoRA weight (lora_A / lora_B) nor a modules_to_save weight")
            elif f.shape(key) != params[pname]:
                problems.append(f"{key}: shape {list(f.shape(key))}, the model's {pname} is {list(params[pname])}")
            else:
                saved[pname] = f.get(key)
    layers = {}
    for mod, ab in sorted(halves.items()):
        lay = _check_layer(mod, ab, cfg, linears, problems)
        if lay is not None:
            layers[mod] = lay
    if not halves and not saved:
        problems.append("no LoRA weights in the file")
    if problems:
        raise ValueError(f"LoRA adapter {path} does not fit the model ({len(problems)} problem"
                         f"{'s' if len(problems) > 1 else ''}):\n  " + "\n  ".join(problems))
    return LoraAdapter(name or os.path.basename(os.path.normpath(path)), path, layers, saved)


def _saved_param(key: str, to_save: list[str], params: dict[str, tuple[int, ...]]) -> str | None:
    """The model parameter a modules_to_save key replaces, or None."""
    if not key.startswith(_PREFIX):
        return None
    name = key[len(_PREFIX):].replace(".modules_to_save.default.", ".")
    mod = name.rpartition(".")[0]
    if name not in params or not any(mod == t or mod.endswith("." + t) for t in to_save):
        return None
    return name


def _check_layer(mod: str, ab: dict[str, Tensor], cfg: _Config, linears: dict[str, tuple[int, int]],
                 problems: list[str]) -> LoraLayer | None:
    key = f"{_PREFIX}{mod}.lora_"
    if mod not in linears:
        problems.append(f"{key}A/B: {mod} is not a linear layer of the model (unknown module)")
        return None
    if not cfg.targets_module(mod):
        problems.append(f"{key}A/B: {mod} is not among target_modules {cfg.targets!r}")
    if set(ab) != {"A", "B"}:
        problems.append(f"{key}{'B' if 'A' in ab else 'A'}.weight is missing (lora_A and lora_B come in pairs)")
        return None
    a, b = ab["A"], ab["B"]
    out_f, in_f = linears[mod]
    ok = True
    if a.dim() != 2 or a.shape[1] != in_f:
        problems.append(f"{key}A.weight: shape {list(a.shape)}, expected (r, {in_f}) for {mod} (in_features {in_f})")
        ok = False
    if b.dim() != 2 or b.shape[0] != out_f:
        problems.append(f"{key}B.weight: shape {list(b.shape)}, expected ({out_f}, r) for {mod} (out_features {out_f})")
        ok = False
    if ok and a.shape[0] != b.shape[1]:
        problems.append(f"{key}A/B: rank mismatch, lora_A has {a.shape[0]} rows and lora_B {b.shape[1]} columns")
        ok = False
    if ok and a.shape[0] != cfg.rank(mod):
        problems.append(f"{key}A/B: rank {a.shape[0]}, but {ADAPTER_CONFIG} says r = {cfg.rank(mod)}")
        ok = False
    if ok and not (torch.is_floating_point(a) and torch.is_floating_point(b)):
        problems.append(f"{key}A/B: not floating point ({a.dtype}, {b.dtype})")
        ok = False
    return LoraLayer(a.float(), b.float(), cfg.scale(mod, a.shape[0])) if ok else None


# ---------------------------------------------------------------------------------------------- what can combine
def load_adapters(merge: str | None, per_request: Mapping[str, str] | None, config: Phi3VConfig,
                  folder: str) -> tuple[LoraAdapter | None, dict[str, LoraAdapter]]:
    """Read and check every adapter before the model's weights are read: `merge` (a path merged into the weights at
    load) and `per_request` {name: path}. Raises ValueError for what cannot work:
    - merging into a checkpoint written by `phi3v quantize` (its weights are quantized already: merge into the bf16
      checkpoint and quantize at load, `quantization=...`, which merges first);
    - per-request adapters that target the vision tower or projector, or carry modules_to_save (both change what
      every request shares: image features are cached by image, one lm_head / embedding table serves the batch):
      serve those merged."""
    merged = None
    if merge is not None:
        merged = load_adapter(merge, config)
        saved_q = checkpoint_quantization(folder)
        if saved_q is not None:
            raise ValueError(f"LoRA adapter {merge} cannot be merged into {folder}: it holds {saved_q.method} weights "
                             "(written by `phi3v quantize`); merge into the bf16 checkpoint and quantize at load "
                             "(--quantization), or serve the adapter per request (NAME=PATH)")
        tied = [n for n in merged.saved if config.tie_word_embeddings and n in ("lm_head.weight",
                                                                              "model.embed_tokens.weight")]
        if tied:
            raise ValueError(f"LoRA adapter {merge}: modules_to_save replaces {tied[0]}, which this model ties to "
                             "the other of lm_head / embed_tokens; not supported")
    loaded: dict[str, LoraAdapter] = {}
    for name, path in (per_request or {}).items():
        check_adapter_name(name)
        a = load_adapter(path, config, name)
        other = sorted(m for m in a.layers if not re.fullmatch(DECODER_MODULE, m))
        if other or a.saved:
            what = (f"targets {other[0]}" + (f" and {len(other) - 1} more layers" if len(other) > 1 else "")
                    + " outside the decoder's linear layers") if other else \
                f"has modules_to_save ({', '.join(sorted(a.saved))})"
            raise ValueError(f"LoRA adapter {name!r} ({path}) {what}: per-request adapters change the decoder's "
                             "qkv/o/gate_up/down layers only; merge this one at load instead (lora=PATH / --lora PATH)")
        if not a.layers:
            raise ValueError(f"LoRA adapter {name!r} ({path}) has no LoRA layers")
        loaded[name] = a
    return merged, loaded


# ---------------------------------------------------------------------------------------------- the command line
def cli_loras(values: list[str] | None, one_request: bool) -> tuple[str | None, dict[str, str], str | None]:
    """`--lora` values -> (merged path, {name: path}, the adapter a `run`/`chat` request uses: `one_request`)."""
    merged, named = parse_lora_args(values)
    for path in ([merged] if merged else []) + list(named.values()):  # before the model loads (or a server starts)
        if not os.path.isfile(os.path.join(path, ADAPTER_CONFIG)):
            raise ValueError(f"--lora {path}: not a PEFT adapter folder (no {ADAPTER_CONFIG} in it)")
    if one_request and len(named) > 1:
        raise ValueError(f"--lora: run and chat answer with one adapter, got {len(named)} named ones "
                         f"({', '.join(named)}); name one, or merge it with --lora PATH")
    return merged, named, (next(iter(named)) if one_request and named else None)
