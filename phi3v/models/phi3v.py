"""Phi-3-vision / Phi-3.5-vision: CLIP image embedding + Phi-3 decoder + LM head.

Parameter names match the Hugging Face checkpoint:
  model.embed_tokens, model.layers.*, model.norm, lm_head,
  model.vision_embed_tokens.{img_processor.vision_model.*, glb_GN, sub_GN, img_projection.{0,2}}.
The reference's `model.vision_embed_tokens.wte` is the same module as `model.embed_tokens` and is not
stored in the checkpoint, so it does not exist here.

Image path (reference `Phi3ImageEmbedding.hd_feature_transform`):
  crops (1 + h*w, 3, 336, 336) -> CLIP hidden_states[-2] without CLS (n, 576, C)
  -> 2x2 merge of the 24x24 patch grid: (n, 12, 12, 4C), channels ordered (row-in-pair, col-in-pair, C)
  -> sub-crops tiled row-major into an (h*12, w*12, 4C) grid, `sub_GN` appended to every row
  -> [sub grid, glb_GN, global view 12x12 with `sub_GN` after every row]   ("sub_glb" order)
  -> img_projection (Linear(4C, hidden), GELU, Linear(hidden, hidden)).
  Tokens per image: h*12*(w*12+1) + 1 + 12*13 = (h*w+1)*144 + 1 + (h+1)*12.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from phi3v.config import Phi3VConfig
from phi3v.models.clip import CLIPVisionModel
from phi3v.device import to_device
from phi3v.models.lora import LoraSet
from phi3v.models.phi3 import AttentionBackend, KernelSwitches, Phi3Model, proj

__all__ = ["Phi3ImageEmbedding", "Phi3VForCausalLM"]


class Phi3ImageEmbedding(nn.Module):
    """`model.vision_embed_tokens`: CLIP tower, HD separators and projector."""

    def __init__(self, config: Phi3VConfig) -> None:
        super().__init__()
        self.config = config
        self.img_processor = CLIPVisionModel(config.vision)
        d4 = config.merged_dim  # 4 * image_dim_out: a 2x2 block of patches concatenated
        self.glb_GN = nn.Parameter(torch.zeros(1, 1, d4))  # separator between sub grid and global view
        self.sub_GN = nn.Parameter(torch.zeros(1, 1, 1, d4))  # "newline" after every row of patches
        if config.projection_cls == "mlp":
            self.img_projection = nn.Sequential(
                nn.Linear(d4, config.hidden_size), nn.GELU(), nn.Linear(config.hidden_size, config.hidden_size))
        else:
            # The reference builds Linear(image_dim_out, hidden) here, which cannot take the 4C merged
            # features of the HD transform; 4C is the only width that works.
            self.img_projection = nn.Linear(d4, config.hidden_size)

    def merge2x2(self, feats: Tensor) -> Tensor:
        """(n, g*g, C) patch features -> (n, g/2, g/2, 4C): each 2x2 block concatenated."""
        n, _, c = feats.shape
        g = self.config.vision.grid  # 24
        x = feats.reshape(n, g // 2, 2, g // 2, 2, c)  # (n, 12, 2, 12, 2, C)
        x = x.permute(0, 1, 3, 2, 4, 5)  # (n, 12, 12, 2, 2, C)
        return x.reshape(n, g // 2, g // 2, 4 * c)

    def add_newline(self, grid: Tensor) -> Tensor:
        """(R, Cols, 4C) -> (R*(Cols+1), 4C): `sub_GN` after every row."""
        r, _, d = grid.shape
        nl = self.sub_GN.reshape(1, 1, d).expand(r, 1, d).to(grid.dtype)  # (R, 1, 4C)
        return torch.cat([grid, nl], dim=1).reshape(-1, d)

    def hd_transform(self, feats: Tensor, grids: list[tuple[int, int]]) -> list[Tensor]:
        """feats (sum_i (1 + h_i*w_i), 576, C), crops of all images in order -> per image (n_i, hidden)."""
        m = self.config.vision.grid // 2  # 12 merged patches a side per crop
        seqs: list[Tensor] = []
        off = 0
        for h, w in grids:
            glb = self.merge2x2(feats[off:off + 1])[0]  # (12, 12, 4C)
            sub = self.merge2x2(feats[off + 1:off + 1 + h * w])  # (h*w, 12, 12, 4C)
            off += 1 + h * w
            d = sub.shape[-1]
            # Crops are row-major over the (h, w) crop grid: tile them into one patch grid.
            sub = sub.reshape(h, w, m, m, d).permute(0, 2, 1, 3, 4).reshape(h * m, w * m, d)  # (h*12, w*12, 4C)
            sub_seq = self.add_newline(sub)  # (h*12*(w*12+1), 4C)
            glb_seq = self.add_newline(glb)  # (12*13, 4C)
            sep = self.glb_GN.reshape(1, d).to(sub.dtype)  # (1, 4C)
            if self.config.hd_transform_order == "sub_glb":
                seqs.append(torch.cat([sub_seq, sep, glb_seq]))
            else:
                seqs.append(torch.cat([glb_seq, sep, sub_seq]))
        # One projector call for all images (it is row-wise), in the projector's dtype as the reference.
        first = self.img_projection[0] if isinstance(self.img_projection, nn.Sequential) else self.img_projection
        proj = self.img_projection(torch.cat(seqs).to(first.weight.dtype))  # (sum n_i, hidden)
        return list(proj.split([s.shape[0] for s in seqs]))


class Phi3VForCausalLM(KernelSwitches, nn.Module):
    def __init__(self, config: Phi3VConfig) -> None:
        super().__init__()
        self.config = config
        self.model = Phi3Model(config)
        self.model.vision_embed_tokens = Phi3ImageEmbedding(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.loras: LoraSet | None = None  # per-request LoRA adapters (phi3v.models.lora.attach_loras)

    def set_kernels(self, fused: bool, pdl: bool = False) -> None:
        """Triton kernels where Triton runs (the caller checks): the decoder's norms, RoPE, SiLU and small-M GEMV;
        CLIP's add + LayerNorm and quick-GELU; `pdl`: launched with programmatic dependent launch."""
        for m in self.modules():
            if isinstance(m, KernelSwitches):
                m.fused, m.pdl = fused, pdl and fused

    # the embedding table: lm_head may hold quantized weights (phi3v.models.quant)
    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    # ------------------------------------------------------------------ images
    def _grid(self, i: int, crops: Tensor, size: tuple[int, int]) -> tuple[int, int]:
        s = self.config.vision.image_size
        hh, ww = int(size[0]), int(size[1])
        if hh <= 0 or ww <= 0 or hh % s or ww % s:
            raise ValueError(f"image {i + 1}: image_size {(hh, ww)} is not a positive multiple of {s} px")
        h, w = hh // s, ww // s
        expect = (1 + h * w, self.config.vision.num_channels, s, s)
        if tuple(crops.shape) != expect:
            raise ValueError(f"image {i + 1}: crops of shape {tuple(crops.shape)}, expected {expect} "
                             f"(global view + {h}x{w} sub-crops, no padding crops) for image_size {(hh, ww)}")
        return h, w

    @torch.no_grad()
    def encode_images(self, crops: list[Tensor], image_sizes: list[tuple[int, int]],
                      tower: Callable[[Tensor], Tensor] | None = None) -> list[Tensor]:
        """Image features for the placeholder tokens, one tensor (num_tokens_i, hidden) per image.

        crops[i]: (1 + h*w, 3, 336, 336), the global view then the row-major sub-crops of image i
        (no zero padding crops: the reference encodes and discards them). image_sizes[i] = (H, W) of
        the padded HD canvas in pixels, H = 336*h, W = 336*w.
        num_tokens_i = (h*w + 1)*144 + 1 + (h + 1)*12.
        `tower`: runs the CLIP tower in place of `img_processor` (the engine passes its CUDA-graph runner).
        """
        if len(crops) != len(image_sizes):
            raise ValueError(f"{len(crops)} crop tensors but {len(image_sizes)} image sizes")
        if not crops:
            return []
        grids = [self._grid(i, c, sz) for i, (c, sz) in enumerate(zip(crops, image_sizes))]
        emb = self.model.vision_embed_tokens
        pixels = torch.cat([c.to(self.device) for c in crops])  # (sum(1 + h*w), 3, 336, 336)
        feats = (tower or emb.img_processor)(pixels)  # (N, 576, C): CLIP runs once, batched over all crops
        return emb.hd_transform(feats, grids)

    # ------------------------------------------------------------- embeddings
    @torch.no_grad()
    def embed(self, input_ids: Tensor, image_features: list[Tensor]) -> Tensor:
        """input_ids (T,) with image k's placeholders as -k -> embeddings (T, hidden).

        Placeholders -k receive image k's features, in order. A block repeated (same tag twice) gets
        the same features again. Counts are validated: on the CPU when `input_ids` is a CPU tensor
        (what the engine passes: no device sync), else with a few host syncs.
        """
        if input_ids.dim() != 1:
            raise ValueError(f"input_ids must be 1-D (T,), got shape {tuple(input_ids.shape)}")
        ids = input_ids  # index math stays on the ids' device; only results move to the model's
        n = len(image_features)
        vocab = self.config.vocab_size
        if ids.numel() == 0:
            raise ValueError("empty input_ids")
        lo, hi = (int(v) for v in torch.stack([ids.min(), ids.max()]).tolist())
        if hi >= vocab:
            raise ValueError(f"token id {hi} out of range for vocab size {vocab}")
        if lo < -n:
            raise ValueError(f"placeholder id {lo} refers to image {-lo}, but only {n} image(s) were given")
        tok = self.model.embed_tokens(to_device(ids.clamp_min(0), self.device))  # (T, hidden)
        if n == 0:
            return tok
        neg = ids < 0
        img = torch.where(neg, -ids - 1, 0)  # (T,) 0-based image index (0 for text, masked below)
        counts = torch.bincount(img[neg], minlength=n).tolist()
        lens = [int(f.shape[0]) for f in image_features]
        for k, (c, ln) in enumerate(zip(counts, lens)):
            if c == 0:
                raise ValueError(f"image {k + 1} was given but input_ids hold no placeholder -{k + 1} for it")
            if c % ln:
                raise ValueError(f"image {k + 1}: {c} placeholder tokens (-{k + 1}) but its features have {ln} rows; "
                                 f"expected a multiple of {ln} (one full block per reference)")
        for k, f in enumerate(image_features):
            if f.dim() != 2 or f.shape[1] != tok.shape[1]:
                raise ValueError(f"image {k + 1}: features of shape {tuple(f.shape)}, expected (n, {tok.shape[1]})")
        table = torch.cat([f.to(device=tok.device, dtype=tok.dtype) for f in image_features])  # (sum n_k, hidden)
        lens_t = torch.tensor(lens, device=ids.device)
        offsets = lens_t.cumsum(0) - lens_t  # (n,) first row of image k in `table`
        onehot = F.one_hot(img, n) * neg[:, None]  # (T, n)
        rank = (onehot.cumsum(0) * onehot).sum(-1) - 1  # index of this token among image k's tokens
        src = offsets[img] + rank.clamp_min(0) % lens_t[img]  # (T,) row in `table`
        dev = tok.device
        return torch.where(to_device(neg, dev)[:, None], table[to_device(src, dev)], tok)

    # ---------------------------------------------------------------- decoder
    def forward(self, x: Tensor, positions: Tensor, long_rope: Tensor,
                attn: AttentionBackend | None = None, lora: Tensor | None = None) -> Tensor:
        """Decoder hidden states (B, T, hidden), final norm applied. See `Phi3Model.forward`. `lora` (B,) int64:
        the per-request adapter of each row (0 = base; needs `self.loras`), None: the base model."""
        if lora is None or self.loras is None:
            return self.model(x, positions, long_rope, attn)
        self.loras.select(lora)
        try:
            return self.model(x, positions, long_rope, attn)
        finally:
            self.loras.select(None)

    def logits(self, hidden: Tensor) -> Tensor:
        """(..., hidden) -> (..., vocab) float32 logits."""
        return proj(self.lm_head, hidden, self.fused, self.pdl).float()
