"""Configuration of Phi-3-vision / Phi-3.5-vision, read from a checkpoint folder.

Reads `config.json` (text decoder, `img_processor`, `embd_layer`, LongRoPE `rope_scaling`),
`preprocessor_config.json` (num_crops, CLIP mean/std) and `generation_config.json` (eos ids, only
Phi-3.5-vision ships one). Every key the two real models use is read; derived numbers live in
`__post_init__` so that nothing downstream recomputes them.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

# Token ids of the Phi-3 tokenizer that the chat format relies on.
ENDOFTEXT_ID = 32000  # <|endoftext|>: eos of the model card, pad of Phi-3.5
END_ID = 32007  # <|end|>: every chat turn ends with it


@dataclass
class VisionConfig:
    """CLIP ViT. Defaults are ViT-L/14-336, the tower of both real models."""

    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    image_size: int = 336
    patch_size: int = 14
    num_channels: int = 3
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"
    layer_idx: int = -2  # features from hidden_states[-2]: the last layer is never run

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        self.grid = self.image_size // self.patch_size  # 24 patches a side at 336/14
        self.num_patches = self.grid * self.grid  # 576 (+1 CLS = 577 positions)
        self.head_dim = self.hidden_size // self.num_attention_heads
        # hidden_states[0] is the embedding output, [i] the output of layer i-1; so [-2] needs
        # layers 0..n-2 and the final layer (and post_layernorm) is dead weight.
        n_states = self.num_hidden_layers + 1
        idx = self.layer_idx if self.layer_idx >= 0 else n_states + self.layer_idx
        if not 0 < idx < n_states:
            raise ValueError(f"img_processor layer_idx {self.layer_idx} out of range for {self.num_hidden_layers} layers")
        self.num_layers_used = idx


@dataclass
class Phi3VConfig:
    vocab_size: int = 32064
    hidden_size: int = 3072
    intermediate_size: int = 8192
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_position_embeddings: int = 131072
    original_max_position_embeddings: int = 4096
    rope_type: str | None = "longrope"  # "su"/"longrope" are one scheme; None: plain RoPE
    short_factor: list[float] | None = None
    long_factor: list[float] | None = None
    bos_token_id: int = 1
    eos_token_ids: list[int] = field(default_factory=lambda: [ENDOFTEXT_ID, END_ID])
    pad_token_id: int = ENDOFTEXT_ID
    tie_word_embeddings: bool = False
    sliding_window: int | None = None
    # vision / embedding layer
    vision: VisionConfig = field(default_factory=VisionConfig)
    image_dim_out: int = 1024  # CLIP feature width the projector sees (x4 after the 2x2 merge)
    num_img_tokens: int = 144  # tokens per 336px crop after the 2x2 merge: (24/2)^2
    hd_transform_order: str = "sub_glb"
    projection_cls: str = "mlp"
    use_hd_transform: bool = True
    with_learnable_separator: bool = True
    # preprocessor_config.json
    num_crops: int = 16
    image_mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    image_std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
    name_or_path: str = ""

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError("hidden_size must be a multiple of num_attention_heads")
        self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
        if self.rope_type is not None:
            half = self.head_dim // 2
            for name in ("short_factor", "long_factor"):
                f = getattr(self, name)
                if f is None or len(f) != half:
                    raise ValueError(f"rope_scaling.{name} must have head_dim/2 = {half} entries, got {None if f is None else len(f)}")
        # LongRoPE multiplies cos and sin by this in both regimes (reference: `scaling_factor`).
        scale = self.max_position_embeddings / self.original_max_position_embeddings
        self.rope_mscale = 1.0 if scale <= 1.0 else math.sqrt(1 + math.log(scale) / math.log(self.original_max_position_embeddings))
        if self.hd_transform_order not in ("sub_glb", "glb_sub"):
            raise ValueError(f"unsupported hd_transform_order {self.hd_transform_order!r}")
        if self.projection_cls not in ("mlp", "linear"):
            raise ValueError(f"unsupported projection_cls {self.projection_cls!r}")
        if not self.use_hd_transform or not self.with_learnable_separator:
            raise ValueError("only the HD transform with learnable separators (both real models) is supported")
        if self.vision.grid % 2:
            raise ValueError("the 2x2 merge needs an even patch grid")
        self.num_img_tokens = (self.vision.grid // 2) ** 2
        self.merged_dim = 4 * self.image_dim_out  # 2x2 patches concatenated: 4096 for ViT-L

    @classmethod
    def from_dict(cls, cfg: dict[str, Any], preprocessor: dict[str, Any] | None = None,
                  generation: dict[str, Any] | None = None, name_or_path: str = "") -> "Phi3VConfig":
        preprocessor = preprocessor or {}
        generation = generation or {}
        rs = cfg.get("rope_scaling")
        rope_type = short = long = None
        if rs:
            rope_type = rs.get("type", rs.get("rope_type"))
            if rope_type not in ("su", "longrope"):
                raise ValueError(f"unsupported rope_scaling type {rope_type!r} (expected 'su' or 'longrope')")
            rope_type, short, long = "longrope", list(rs["short_factor"]), list(rs["long_factor"])
        ip = cfg.get("img_processor") or {}
        vc = dict(ip.get("vision_config") or {})
        vision = VisionConfig(
            hidden_size=vc.get("hidden_size", 1024),
            intermediate_size=vc.get("intermediate_size", 4096),
            num_hidden_layers=vc.get("num_hidden_layers", 24),
            num_attention_heads=vc.get("num_attention_heads", 16),
            image_size=vc.get("image_size", 336),
            patch_size=vc.get("patch_size", 14),
            num_channels=vc.get("num_channels", 3),
            layer_norm_eps=vc.get("layer_norm_eps", 1e-5),
            hidden_act=vc.get("hidden_act", "quick_gelu"),
            layer_idx=ip.get("layer_idx", -2),
        )
        if ip and ip.get("name", "clip_vision_model") != "clip_vision_model":
            raise ValueError(f"unsupported img_processor {ip.get('name')!r}")
        embd = cfg.get("embd_layer") or {}
        eos = generation.get("eos_token_id", cfg.get("eos_token_id"))
        eos_ids = [ENDOFTEXT_ID, END_ID]  # the model card's eos, and the end of a chat turn
        for e in (eos if isinstance(eos, list) else [eos] if eos is not None else []):
            if e not in eos_ids:
                eos_ids.append(int(e))
        return cls(
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_hidden_layers=cfg["num_hidden_layers"],
            num_attention_heads=cfg["num_attention_heads"],
            num_key_value_heads=cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-5),
            rope_theta=cfg.get("rope_theta", 10000.0),
            max_position_embeddings=cfg.get("max_position_embeddings", 131072),
            original_max_position_embeddings=cfg.get("original_max_position_embeddings",
                                                     cfg.get("max_position_embeddings", 4096)),
            rope_type=rope_type,
            short_factor=short,
            long_factor=long,
            bos_token_id=generation.get("bos_token_id", cfg.get("bos_token_id", 1)),
            eos_token_ids=eos_ids,
            pad_token_id=generation.get("pad_token_id", cfg.get("pad_token_id") or ENDOFTEXT_ID),
            tie_word_embeddings=cfg.get("tie_word_embeddings", False),
            sliding_window=cfg.get("sliding_window"),
            vision=vision,
            image_dim_out=ip.get("image_dim_out", vision.hidden_size),
            num_img_tokens=ip.get("num_img_tokens", 144),
            hd_transform_order=embd.get("hd_transform_order", "sub_glb"),
            projection_cls=embd.get("projection_cls", "mlp"),
            use_hd_transform=embd.get("use_hd_transform", True),
            with_learnable_separator=embd.get("with_learnable_separator", True),
            num_crops=preprocessor.get("num_crops", 16),
            image_mean=tuple(preprocessor.get("image_mean", (0.48145466, 0.4578275, 0.40821073))),
            image_std=tuple(preprocessor.get("image_std", (0.26862954, 0.26130258, 0.27577711))),
            name_or_path=name_or_path,
        )

    @classmethod
    def from_pretrained(cls, folder: str) -> "Phi3VConfig":
        def read(name: str) -> dict[str, Any] | None:
            p = os.path.join(folder, name)
            if not os.path.exists(p):
                return None
            with open(p, encoding="utf-8") as f:
                return json.load(f)

        cfg = read("config.json")
        if cfg is None:
            raise ValueError(f"{folder} has no config.json: is it a Phi-3-vision checkpoint folder?")
        mt = cfg.get("model_type")
        if mt not in ("phi3_v", None):
            raise ValueError(f"{folder}: model_type {mt!r} is not phi3_v (Phi-3-vision / Phi-3.5-vision)")
        return cls.from_dict(cfg, read("preprocessor_config.json"), read("generation_config.json"), folder)
