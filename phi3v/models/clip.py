"""CLIP ViT vision tower (ViT-L/14-336 in both real models), feature extractor only.

Parameter names follow Hugging Face's `CLIPVisionModel` (`vision_model.embeddings.patch_embedding`,
`vision_model.pre_layrnorm` (sic), `vision_model.encoder.layers.{i}....`), which is how the Phi-3-vision
checkpoint stores them under `model.vision_embed_tokens.img_processor.`.

Phi-3-vision takes `hidden_states[layer_idx]` (-2 by default) and drops CLS. `hidden_states[0]` is the
pre-layernormed embedding and `hidden_states[i]` the output of layer i-1, so only the first
`vision.num_layers_used` layers ever run; the last layer and `post_layernorm` are loaded (they are in
the checkpoint) but never executed.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from phi3v.config import VisionConfig
from phi3v.kernels import fused as kernels
from phi3v.models.phi3 import KernelSwitches

__all__ = ["CLIPVisionModel", "activation"]


def _quick_gelu(x: Tensor) -> Tensor:
    return x * torch.sigmoid(1.702 * x)


def activation(name: str):
    """The CLIP MLP activation by its HF name."""
    if name == "quick_gelu":
        return _quick_gelu
    if name == "gelu":
        return F.gelu
    if name in ("gelu_new", "gelu_pytorch_tanh"):
        return lambda x: F.gelu(x, approximate="tanh")
    raise ValueError(f"unsupported CLIP hidden_act {name!r}")


class CLIPEmbeddings(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        c = cfg.hidden_size
        self.class_embedding = nn.Parameter(torch.zeros(c))
        self.patch_embedding = nn.Conv2d(cfg.num_channels, c, cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.position_embedding = nn.Embedding(cfg.num_patches + 1, c)

    def forward(self, pixels: Tensor) -> Tensor:
        # The reference casts pixel_values to the conv weight dtype (fp32 pixels, bf16 model).
        w = self.patch_embedding.weight
        patches = self.patch_embedding(pixels.to(w.dtype))  # (N, C, 24, 24)
        patches = patches.flatten(2).transpose(1, 2)  # (N, 576, C), row-major patch order
        cls = self.class_embedding.to(patches.dtype).expand(patches.shape[0], 1, -1)  # (N, 1, C)
        x = torch.cat([cls, patches], dim=1)  # (N, 577, C)
        return x + self.position_embedding.weight[None]


class CLIPAttention(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        c = cfg.hidden_size
        self.n_heads = cfg.num_attention_heads
        self.head_dim = cfg.head_dim
        self.q_proj = nn.Linear(c, c)
        self.k_proj = nn.Linear(c, c)
        self.v_proj = nn.Linear(c, c)
        self.out_proj = nn.Linear(c, c)

    def forward(self, x: Tensor) -> Tensor:
        n, t, c = x.shape

        def heads(y: Tensor) -> Tensor:  # (N, T, C) -> (N, H, T, Dh)
            return y.view(n, t, self.n_heads, self.head_dim).transpose(1, 2)

        q, k, v = heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x))
        # Bidirectional attention over the 577 positions; scale 1/sqrt(Dh) as the reference.
        o = F.scaled_dot_product_attention(q, k, v, scale=1.0 / math.sqrt(self.head_dim))  # (N, H, T, Dh)
        return self.out_proj(o.transpose(1, 2).reshape(n, t, c))


class AddLayerNorm(KernelSwitches, nn.LayerNorm):
    """nn.LayerNorm (same parameters) with the residual add before it: `add`."""

    def add(self, x: Tensor, residual: Tensor | None) -> tuple[Tensor, Tensor]:
        """(normed, new_residual): new_residual = residual + x (or x alone), normed = LayerNorm(new_residual).
        Fused, one pass over the (crops*577, C) stream instead of an add and a norm."""
        if self.fused:
            return kernels.add_layer_norm(x, residual, self.weight, self.bias, self.eps)
        r = x if residual is None else residual + x
        return self(r), r


class CLIPMLP(KernelSwitches, nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.act = activation(cfg.hidden_act)

    def forward(self, x: Tensor) -> Tensor:
        h = self.fc1(x)  # (N, T, intermediate)
        if self.fused and self.act is _quick_gelu:
            return self.fc2(kernels.quick_gelu(h))
        return self.fc2(self.act(h))


class CLIPEncoderLayer(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.layer_norm1 = AddLayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = CLIPAttention(cfg)
        self.layer_norm2 = AddLayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = CLIPMLP(cfg)

    def forward(self, h: Tensor, residual: Tensor) -> tuple[Tensor, Tensor]:
        """h = layer_norm1(residual) -> (mlp output, residual stream after the attention block); the caller
        adds them (inside the next layer's layer_norm1 when there is one)."""
        h, residual = self.layer_norm2.add(self.self_attn(h), residual)
        return self.mlp(h), residual


class CLIPEncoder(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(cfg) for _ in range(cfg.num_hidden_layers))


class CLIPVisionTransformer(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.embeddings = CLIPEmbeddings(cfg)
        self.pre_layrnorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)  # sic: HF's name
        self.encoder = CLIPEncoder(cfg)
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)  # loaded, never run


class CLIPVisionModel(nn.Module):
    """`img_processor` of the image embedding: pixels -> patch features of hidden_states[layer_idx]."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.vision_model = CLIPVisionTransformer(cfg)

    def forward(self, pixels: Tensor) -> Tensor:
        """pixels (N, 3, 336, 336) -> features (N, 576, C) without CLS, in the tower's dtype."""
        vm = self.vision_model
        x = vm.pre_layrnorm(vm.embeddings(pixels))  # (N, 577, C) = hidden_states[0]
        layers = vm.encoder.layers[: self.cfg.num_layers_used]
        # the reference's x = x + attn(ln1(x)); x = x + mlp(ln2(x)), each add inside the norm after it
        h, x = layers[0].layer_norm1.add(x, None)
        for i, layer in enumerate(layers):
            m, x = layer(h, x)
            if i + 1 == len(layers):
                x = x + m  # hidden_states[num_layers_used]: no norm follows here
            else:
                h, x = layers[i + 1].layer_norm1.add(m, x)
        return x[:, 1:]
