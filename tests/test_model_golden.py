"""Model parity with Microsoft's reference (tests/data/golden/model/*.npz, see tests/data/golden/README.md),
plus the model API contracts the engine relies on (attention backend, per-row LongRoPE, embed validation)
and checkpoint loading (error listing, sharded == single file, bf16, tied embeddings).

Everything runs on CPU in float32 with the no-cache path (attn=None) unless said otherwise.
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from phi3v.config import Phi3VConfig
from phi3v.models.phi3 import causal_attention
from phi3v.models.phi3v import Phi3VForCausalLM
from phi3v.models.weights import load_model, random_checkpoint
from phi3v.processing import ImageProcessor

HERE = os.path.dirname(__file__)
GOLDEN = os.path.join(HERE, "data", "golden")
TINY = os.path.join(HERE, "data", "tiny-phi3v")
MANIFEST = json.load(open(os.path.join(GOLDEN, "manifest.json"), encoding="utf-8"))
CASES = sorted(k for k, v in MANIFEST["model"].items() if isinstance(v, dict) and v.get("status") == "ok")

TOL_LOGITS = 1e-3
TOL_EMBEDS = 1e-4


@pytest.fixture(scope="module")
def cfg() -> Phi3VConfig:
    return Phi3VConfig.from_pretrained(TINY)


@pytest.fixture(scope="module")
def model(cfg) -> Phi3VForCausalLM:
    torch.manual_seed(0)
    return load_model(TINY, cfg, "cpu", torch.float32)


def _golden(case: str) -> tuple[dict, dict[str, np.ndarray]]:
    meta = MANIFEST["model"][case]
    with np.load(os.path.join(GOLDEN, meta["file"])) as z:
        return meta, {k: z[k] for k in z.files}


def _images(meta: dict) -> list:
    proc = ImageProcessor(num_crops=meta["effective_num_crops"])
    return [proc.preprocess(Image.open(os.path.join(GOLDEN, "images", f"{n}.png"))) for n in meta["images"]]


def _prefill_logits(model: Phi3VForCausalLM, x: torch.Tensor, long_rope: bool) -> torch.Tensor:
    t = x.shape[0]
    with torch.no_grad():
        h = model(x[None], torch.arange(t)[None], torch.tensor([long_rope]))
        return model.logits(h)[0]  # (T, vocab) float32


@pytest.mark.parametrize("case", CASES)
def test_golden_prefill(model, cfg, case):
    meta, g = _golden(case)
    ids = torch.from_numpy(g["input_ids"])
    imgs = _images(meta)
    feats = model.encode_images([p.crops for p in imgs], [p.image_size for p in imgs])
    if imgs:
        assert [list(p.image_size) for p in imgs] == g["image_sizes"].tolist()
        assert [f.shape[0] for f in feats] == [p.num_tokens for p in imgs]
        assert sum(p.num_tokens for p in imgs) == meta["n_image_tokens"]
    x = model.embed(ids, feats)  # (T, hidden)
    assert x.shape == (meta["seq_len"], cfg.hidden_size)

    if imgs:
        d = (x[ids < 0] - torch.from_numpy(g["image_embeds"])).abs().max().item()
        assert d <= TOL_EMBEDS, f"image_embeds max|d| {d:.2e}"
        clip = model.model.vision_embed_tokens.img_processor(imgs[0].crops[:2])  # (2, 576, C)
        for j in (0, 1):
            d = (clip[j] - torch.from_numpy(g[f"clip_layer_m2_img0_crop{j}"])).abs().max().item()
            assert d <= TOL_EMBEDS, f"clip crop{j} max|d| {d:.2e}"

    # Reference rule for the prefill regime: long iff max(position) + 1 > original_max.
    long_rope = ids.numel() > cfg.original_max_position_embeddings
    logits = _prefill_logits(model, x, long_rope)
    d_last = (logits[-1] - torch.from_numpy(g["last_logits"])).abs().max().item()
    assert d_last <= TOL_LOGITS, f"last_logits max|d| {d_last:.2e}"
    d = (logits.max(-1).values - torch.from_numpy(g["max_all"])).abs().max().item()
    assert d <= TOL_LOGITS, f"max_all max|d| {d:.2e}"
    d = (logits.logsumexp(-1) - torch.from_numpy(g["logsumexp_all"])).abs().max().item()
    assert d <= TOL_LOGITS, f"logsumexp_all max|d| {d:.2e}"
    clear = torch.from_numpy(g["top2_gap_all"]) > 1e-3
    wrong = (logits.argmax(-1) != torch.from_numpy(g["argmax_all"]).long()) & clear
    assert not wrong.any(), f"argmax differs at positions {wrong.nonzero().flatten().tolist()[:10]}"


def test_long_factors_matter(model):
    """The long prompt only matches with long factors: the regime flag is really used."""
    _, g = _golden("tiny-phi3v/text_long_prefill/phi3v")
    x = model.embed(torch.from_numpy(g["input_ids"]), [])
    d = (_prefill_logits(model, x, False)[-1] - torch.from_numpy(g["last_logits"])).abs().max().item()
    assert d > 1e-2


def test_per_row_long_rope_flags(model, cfg):
    """A batch with one short-regime and one long-regime row equals the two rows run alone."""
    _, g = _golden("tiny-phi3v/text_cross/phi3v")
    ids = torch.from_numpy(g["input_ids"])[:40]
    x = model.embed(ids, [])
    pos = torch.arange(40)[None]
    with torch.no_grad():
        both = model(torch.stack([x, x]), pos.expand(2, -1), torch.tensor([False, True]))
        short = model(x[None], pos, torch.tensor([False]))
        long = model(x[None], pos, torch.tensor([True]))
    torch.testing.assert_close(both[0], short[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(both[1], long[0], atol=1e-5, rtol=0)
    assert (short - long).abs().max() > 1e-3


class DenseCache:
    """Minimal AttentionBackend for one sequence: append k/v, attend over everything cached."""

    def __init__(self, n_layers: int) -> None:
        self.k: list[torch.Tensor | None] = [None] * n_layers
        self.v: list[torch.Tensor | None] = [None] * n_layers

    def __call__(self, layer_idx, q, k, v):
        if self.k[layer_idx] is None:
            self.k[layer_idx], self.v[layer_idx] = k, v
            return causal_attention(q, k, v)
        self.k[layer_idx] = torch.cat([self.k[layer_idx], k], dim=2)
        self.v[layer_idx] = torch.cat([self.v[layer_idx], v], dim=2)
        # One new token attends to every cached token (no mask needed for T == 1).
        assert q.shape[2] == 1
        return torch.nn.functional.scaled_dot_product_attention(q, self.k[layer_idx], self.v[layer_idx])


def test_attention_backend_decode_matches_reference_greedy(model, cfg):
    """Prefill + cached decode through the AttentionBackend reproduces the reference greedy tokens."""
    _, g = _golden("tiny-phi3v/img1_astronaut_nc1/phi3v")
    meta = MANIFEST["model"]["tiny-phi3v/img1_astronaut_nc1/phi3v"]
    imgs = _images(meta)
    ids = torch.from_numpy(g["input_ids"])
    x = model.embed(ids, model.encode_images([p.crops for p in imgs], [p.image_size for p in imgs]))
    cache, n, steps = DenseCache(cfg.num_hidden_layers), ids.numel(), 8
    flag = torch.tensor([False])
    out = []
    with torch.no_grad():
        h = model(x[None], torch.arange(n)[None], flag, cache)
        logits = model.logits(h[:, -1])  # (1, vocab)
        for t in range(steps):
            assert abs(logits.max().item() - g["gen_top_logits"][t, 0]) <= TOL_LOGITS
            tok = logits.argmax(-1)  # (1,)
            out.append(int(tok))
            h = model(model.model.embed_tokens(tok)[None], torch.tensor([[n + t]]), flag, cache)
            logits = model.logits(h[:, -1])
    assert out == g["gen_ids"][:steps].tolist()


def test_embed_placeholders(model, cfg):
    hid = cfg.hidden_size
    f1, f2 = torch.randn(3, hid), torch.randn(2, hid)
    # Tags out of order: -2's block comes first and still gets image 2; a repeated -1 block gets image 1 again.
    ids = torch.tensor([1, -2, -2, 5, -1, -1, -1, 7, -1, -1, -1, 9])
    x = model.embed(ids, [f1, f2])
    torch.testing.assert_close(x[1:3], f2)
    torch.testing.assert_close(x[4:7], f1)
    torch.testing.assert_close(x[8:11], f1)
    text = ids >= 0
    torch.testing.assert_close(x[text], model.model.embed_tokens(ids[text]))
    with pytest.raises(ValueError, match="multiple of 3"):
        model.embed(torch.tensor([1, -1, -1, 2, -2, -2]), [f1, f2])
    with pytest.raises(ValueError, match="only 1 image"):
        model.embed(torch.tensor([1, -1, -1, -1, -2]), [f1])
    with pytest.raises(ValueError, match="no placeholder"):
        model.embed(torch.tensor([1, -1, -1, -1, 2]), [f1, f2])
    with pytest.raises(ValueError, match="out of range"):
        model.embed(torch.tensor([1, cfg.vocab_size]), [])


def test_encode_images_validates_crops(model):
    crops = torch.zeros(3, 3, 336, 336)
    with pytest.raises(ValueError, match="expected"):
        model.encode_images([crops], [(672, 672)])  # a 2x2 grid needs 5 crops
    with pytest.raises(ValueError, match="multiple of 336"):
        model.encode_images([crops], [(336, 700)])
    assert model.encode_images([], []) == []


# ---------------------------------------------------------------------------------- loading
def _tiny_tensors() -> dict[str, torch.Tensor]:
    return load_file(os.path.join(TINY, "model.safetensors"))


def _write_ckpt(folder: str, tensors: dict[str, torch.Tensor]) -> str:
    os.makedirs(folder, exist_ok=True)
    save_file(tensors, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    return folder


def test_load_errors_list_keys(tmp_path, cfg):
    t = _tiny_tensors()
    t.pop("model.layers.1.mlp.down_proj.weight")
    t["model.layers.0.self_attn.qkv.weight"] = t.pop("model.layers.0.self_attn.qkv_proj.weight")
    t["model.norm.weight"] = torch.ones(cfg.hidden_size + 1, dtype=torch.bfloat16)
    folder = _write_ckpt(str(tmp_path / "bad"), t)
    with pytest.raises(ValueError) as e:
        load_model(folder, cfg, "cpu", torch.float32)
    msg = str(e.value)
    assert "missing keys (2)" in msg
    assert "model.layers.1.mlp.down_proj.weight" in msg and "model.layers.0.self_attn.qkv_proj.weight" in msg
    assert "unexpected keys (1)" in msg and "model.layers.0.self_attn.qkv.weight" in msg
    assert "shape mismatches (1)" in msg and "model.norm.weight: checkpoint [65], model [64]" in msg
    with pytest.raises(ValueError, match="neither model.safetensors"):
        load_model(str(tmp_path), cfg)


def test_load_ignores_wte_duplicate(tmp_path, cfg, model):
    t = _tiny_tensors()
    t["model.vision_embed_tokens.wte.weight"] = t["model.embed_tokens.weight"].clone()
    m = load_model(_write_ckpt(str(tmp_path / "wte"), t), cfg, "cpu", torch.float32)
    torch.testing.assert_close(m.model.embed_tokens.weight, model.model.embed_tokens.weight, atol=0, rtol=0)


def test_sharded_equals_single_file(tmp_path, cfg):
    single = random_checkpoint(cfg, str(tmp_path / "single"), seed=3)
    sharded = random_checkpoint(cfg, str(tmp_path / "sharded"), seed=3, shard_bytes=1 << 20)
    assert os.path.isfile(os.path.join(single, "model.safetensors"))
    index = json.load(open(os.path.join(sharded, "model.safetensors.index.json"), encoding="utf-8"))
    assert len(set(index["weight_map"].values())) > 1
    assert not os.path.exists(os.path.join(sharded, "model.safetensors"))
    # config.json is copied from the source checkpoint
    assert Phi3VConfig.from_pretrained(sharded) == dataclasses.replace(cfg, name_or_path=sharded)
    a = load_model(single, cfg, "cpu", torch.float32)
    b = load_model(sharded, cfg, "cpu", torch.float32)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    x = a.embed(torch.arange(1, 9), [])
    h = a(x[None], torch.arange(8)[None], torch.tensor([False]))
    assert torch.isfinite(a.logits(h)).all()


def test_random_checkpoint_without_source_and_tied(tmp_path, cfg):
    tied = dataclasses.replace(cfg, tie_word_embeddings=True, name_or_path="")
    folder = random_checkpoint(tied, str(tmp_path / "tied"), seed=1)
    back = Phi3VConfig.from_pretrained(folder)  # config.json written from the dataclass
    assert dataclasses.replace(back, name_or_path="") == tied
    assert "lm_head.weight" not in load_file(os.path.join(folder, "model.safetensors"))
    m = load_model(folder, back, "cpu", torch.float32)
    assert m.lm_head.weight is m.model.embed_tokens.weight


@pytest.mark.parametrize("case", ["tiny-phi3v/text_short/phi3v", "tiny-phi3v/img1_astronaut_nc1/phi3v"])
def test_bf16_load(cfg, case):
    m = load_model(TINY, cfg, "cpu", torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in m.parameters())
    meta, g = _golden(case)
    imgs = _images(meta)
    ids = torch.from_numpy(g["input_ids"])
    x = m.embed(ids, m.encode_images([p.crops for p in imgs], [p.image_size for p in imgs]))
    assert x.dtype == torch.bfloat16
    logits = _prefill_logits(m, x, False)
    assert logits.dtype == torch.float32
    ref_last = torch.from_numpy(g["last_logits"])
    # README suggests 0.5 (measured on another machine). On CPU, bf16 text_short lands at ~0.69, and the
    # reference's own eager bf16 attention at ~0.79 (this tiny random model amplifies rounding: hidden 64,
    # logits ~25), so the bound here is 1.0; the top-5 and argmax-agreement checks carry the weight.
    assert (logits[-1] - ref_last).abs().max().item() <= 1.0
    assert int(logits[-1].argmax()) in ref_last.topk(5).indices.tolist()
    agree = (logits.argmax(-1) == torch.from_numpy(g["argmax_all"]).long()).float().mean().item()
    assert agree >= 0.9, agree
