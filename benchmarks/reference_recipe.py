"""The reference recipe, measured like `phi3v bench`: Microsoft's remote code for Phi-3-vision-128k-instruct
run through transformers 4.43 with eager attention, bf16, on one GPU.

The remote code is NOT part of this repository. It is read into the git-ignored folder `.ref/remote_code/`
(see benchmarks/fetch_reference.md) and checked here against the sha256 of the files that produced
tests/data/golden (manifest.json). transformers 4.43.4 + tokenizers 0.19.1 + huggingface_hub 0.24.7 travel
as wheels in the git-ignored `.wheels/` and are installed with `pip --target` into a folder that goes first on
PYTHONPATH, so torch/torchvision/numpy/pillow/safetensors come from the machine (benchmarks/README.md).

What it measures, on the same prompt and the same noise images as phi3v/bench.py (same JSON keys, so
`phi3v bench --compare THIS.json` prints the ratios):
  (a) batch-1 decode tokens/s with one 16-crop 1344x1344 image in context, eos ignored (median of reps;
      (n-1)/(t_last_token - t_first_token), as phi3v's `decode_tokens_per_s`);
  (b) time to first token at 16 and 4 crops, processor included (a new image each rep, median of reps[1:]);
  (c) offline throughput: N images of mixed sizes, one after the other (the recipe has no image batching),
      `--offline-tokens` new tokens each, image creation + processor included (images/s, tokens/s);
  (d) peak GPU memory (torch.cuda.max_memory_allocated over load + run).
It loads the model the model-card way: AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True,
torch_dtype=torch.bfloat16, _attn_implementation="eager").cuda() and
AutoProcessor.from_pretrained(folder, trust_remote_code=True, num_crops=k).

The checkpoint folder is never modified: the recipe reads a "view" folder (default: next to it, name + "-hfref")
that symlinks every file of the checkpoint and holds the five remote-code files and config copies whose
`auto_map` is completed if missing. With `--create` a missing full-size random checkpoint is first written by
phi3v (phi3v.models.weights.random_checkpoint, run in a child process without the carried PYTHONPATH).

`--verify-golden` first runs the recipe on tests/data/tiny-phi3v (fp32) and compares the greedy tokens with
tests/data/golden/model/tiny-phi3v__img1_astronaut_nc1__phi3v.npz (proof that the real reference runs). The tiny
checkpoint describes its small CLIP in config.json["img_processor"]["vision_config"], which the remote code
does not read (it hard-codes CLIP ViT-L/14-336); for that checkpoint only, a test shim swaps in the small CLIP
config and relaxes the `C == 1024` shape assert. The full-size run uses the remote code untouched.

Usage (device; see benchmarks/README.md for the full command):
  PYTHONPATH=/tmp/refpkgs python3 benchmarks/reference_recipe.py --model /tmp/phi3v-full-random --create \
      --verify-golden --json-out $OUT/reference.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REF_CODE = ROOT / ".ref" / "remote_code"
DATA = ROOT / "tests" / "data"
GOLDEN = DATA / "golden"
REAL_CONFIG = DATA / "real-configs" / "phi-3-vision-128k-instruct"
TOKENIZER_DIR = DATA / "tiny-phi3v"

# Microsoft's Phi-3-vision-128k-instruct remote code, as hashed in tests/data/golden/manifest.json.
REMOTE_CODE_SHA256 = {
    "configuration_phi3_v.py": "98087e2f3467072e8de80958f51019c0726da6bef418968949305de4cd170e26",
    "image_embedding_phi3_v.py": "a4a3ab2c86448b34e1402b7dac3ea17d074a7c5f86ad46c0047f2db6267808b2",
    "image_processing_phi3_v.py": "8470db7ad9c2483f60ca14ed84e5eba99be0ff15b66ef9958754879b85d492bc",
    "modeling_phi3_v.py": "b9caa24798d15931241b4aeeaf0624ab8d11f78ccffe79a0d2821da96ffff06b",
    "processing_phi3_v.py": "99d029093d9a99478fea4e6cea92b5ff47323903ca5e1af9cc441b0a64d126a8",
}
MODEL_AUTO_MAP = {"AutoConfig": "configuration_phi3_v.Phi3VConfig",
                  "AutoModelForCausalLM": "modeling_phi3_v.Phi3VForCausalLM"}
PROCESSOR_AUTO_MAP = {"AutoProcessor": "processing_phi3_v.Phi3VProcessor",
                      "AutoImageProcessor": "image_processing_phi3_v.Phi3VImageProcessor"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
VIEW_MARKER = ".reference-recipe-view"

# Same prompt, images and sizes as phi3v/bench.py (kept in sync by hand; this file must not import phi3v,
# whose process would then also see the carried transformers 4.43).
PROMPT = "<|user|>\n<|image_1|>\nDescribe the image in detail.<|end|>\n<|assistant|>\n"
MIXED_SIZES = [(1344, 1344), (1600, 900), (900, 1600), (800, 600), (2000, 500), (640, 640), (1024, 768), (500, 2000)]
GOLDEN_CASE = "tiny-phi3v/img1_astronaut_nc1/phi3v"


def log(*a: object) -> None:
    print("[reference_recipe]", *a, file=sys.stderr, flush=True)


def noise_image(w: int, h: int, seed: int):
    import numpy as np
    from PIL import Image

    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def check_remote_code(ref_dir: Path) -> dict[str, str]:
    missing = [f for f in REMOTE_CODE_SHA256 if not (ref_dir / f).is_file()]
    if missing:
        raise SystemExit(f"remote code missing in {ref_dir}: {missing} (see benchmarks/fetch_reference.md)")
    got = {f: sha256(ref_dir / f) for f in REMOTE_CODE_SHA256}
    bad = [f for f in got if got[f] != REMOTE_CODE_SHA256[f]]
    if bad:
        raise SystemExit(f"remote code in {ref_dir} differs from the golden reference files: {bad}")
    return got


# ---------------------------------------------------------------------------------------------------------
# checkpoint + view folder


def create_random_checkpoint(folder: str, config_dir: str, tokenizer_dir: str) -> float:
    """Write phi3v's full-size random checkpoint in a child process that does not see the carried packages."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    code = "\n".join([  # as phi3v.bench.write_random_checkpoint does it
        "import os, shutil, sys, torch",
        "sys.path.insert(0, sys.argv[1])",
        "from phi3v.config import Phi3VConfig",
        "from phi3v.models.weights import random_checkpoint",
        "cfg = Phi3VConfig.from_pretrained(sys.argv[2])",
        "random_checkpoint(cfg, sys.argv[4], device='cuda' if torch.cuda.is_available() else 'cpu', seed=0)",
        f"for fn in {TOKENIZER_FILES!r}:",
        "    shutil.copyfile(os.path.join(sys.argv[3], fn), os.path.join(sys.argv[4], fn))",
    ])
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", code, str(ROOT), config_dir, tokenizer_dir, folder], env=env, check=True)
    return time.perf_counter() - t


def _patched_json(src: Path, dst: Path, auto_map: dict[str, str]) -> None:
    d = json.loads(src.read_text(encoding="utf-8"))
    am = dict(d.get("auto_map") or {})
    for k, v in auto_map.items():
        am.setdefault(k, v)
    d["auto_map"] = am
    dst.write_text(json.dumps(d, indent=2), encoding="utf-8")


def make_view(model_dir: str, view_dir: str, ref_dir: Path) -> str:
    """A folder laid out as the HF repo: the checkpoint's files (symlinked) + the remote code (copied)."""
    src, view = Path(model_dir).resolve(), Path(view_dir)
    if not (src / "config.json").is_file():
        raise SystemExit(f"{src} has no config.json (use --create for a random full-size checkpoint)")
    if view.exists():
        if not (view / VIEW_MARKER).is_file():
            raise SystemExit(f"{view} exists and was not made by this script: give another --view-dir")
        shutil.rmtree(view)
    view.mkdir(parents=True)
    (view / VIEW_MARKER).write_text(f"HF view of {src} for benchmarks/reference_recipe.py\n", encoding="utf-8")
    for p in sorted(src.iterdir()):
        if not p.is_file() or p.suffix == ".py" or p.name in ("config.json", "preprocessor_config.json", VIEW_MARKER):
            continue
        os.symlink(p, view / p.name)
    _patched_json(src / "config.json", view / "config.json", MODEL_AUTO_MAP)
    pp = src / "preprocessor_config.json"
    if pp.is_file():
        _patched_json(pp, view / "preprocessor_config.json", PROCESSOR_AUTO_MAP)
    else:  # Phi-3-vision's own preprocessor_config.json
        _patched_json(REAL_CONFIG / "preprocessor_config.json", view / "preprocessor_config.json", PROCESSOR_AUTO_MAP)
    for fn in TOKENIZER_FILES:
        if not (view / fn).exists():
            shutil.copyfile(TOKENIZER_DIR / fn, view / fn)
    for fn in REMOTE_CODE_SHA256:
        shutil.copyfile(ref_dir / fn, view / fn)
    return str(view)


# ---------------------------------------------------------------------------------------------------------
# the recipe


def _tiny_clip_shim(view: str, cfg) -> bool:
    """Test-checkpoint shim (tiny-phi3v only): the remote code hard-codes CLIP ViT-L/14-336 and asserts C == 1024.
    The tiny checkpoint describes a small CLIP in img_processor.vision_config; swap it in before the model is built."""
    vc = (cfg.img_processor or {}).get("vision_config") if isinstance(cfg.img_processor, dict) else None
    if not vc:
        return False
    from transformers import CLIPVisionConfig
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    get_class_from_dynamic_module("modeling_phi3_v.Phi3VForCausalLM", view)  # imports image_embedding_phi3_v too
    mods = [m for n, m in list(sys.modules.items()) if n.endswith(".image_embedding_phi3_v")]
    if not mods:
        raise RuntimeError("image_embedding_phi3_v was not imported")
    for mod in mods:
        mod.CLIP_VIT_LARGE_PATCH14_336_CONFIG = CLIPVisionConfig(**vc)
        cls = mod.Phi3ImageEmbedding

        def reshape_hd_patches_2x2merge(self, image_features, h_crop, w_crop):  # the original, minus `C == 1024`
            N, L, C = image_features.shape
            assert L == 24 * 24 and C == self.image_dim_out and N % (h_crop * w_crop) == 0
            num_images = N // (h_crop * w_crop)
            H = int(L**0.5)
            return (image_features.reshape(N, H, H, C).reshape(N, H // 2, 2, H // 2, 2, C)
                    .permute(0, 1, 3, 2, 4, 5).reshape(N, -1, 4 * C)
                    .reshape(num_images, h_crop, w_crop, H // 2, H // 2, -1).permute(0, 1, 3, 2, 4, 5)
                    .reshape(num_images, h_crop * H // 2, w_crop * H // 2, 4 * C))

        cls.reshape_hd_patches_2x2merge = reshape_hd_patches_2x2merge
    return True


class StepTimer:
    """A generate() streamer that stamps the time each new token reaches the host (batch 1)."""

    def __init__(self) -> None:
        self.prompt_seen = False
        self.stamps: list[float] = []

    def put(self, value) -> None:
        if not self.prompt_seen:  # generate() first puts the prompt
            self.prompt_seen = True
            return
        self.stamps.append(time.perf_counter())

    def end(self) -> None:
        pass


class Recipe:
    def __init__(self, view: str, dtype: str = "bfloat16", device: str = "cuda", attn: str = "eager") -> None:
        import torch
        import transformers
        from transformers import AutoConfig, AutoModelForCausalLM

        self.torch, self.device, self.view = torch, device, view
        cfg = AutoConfig.from_pretrained(view, trust_remote_code=True)
        self.shim = _tiny_clip_shim(view, cfg)
        t = time.perf_counter()
        model, loading = AutoModelForCausalLM.from_pretrained(
            view, trust_remote_code=True, torch_dtype=getattr(torch, dtype), _attn_implementation=attn,
            output_loading_info=True)
        self.model = model.to(device) if device != "cpu" else model
        self.model.eval()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        self.load_s = time.perf_counter() - t
        names = {type(m).__name__ for m in self.model.modules()}
        attn_classes = sorted(n for n in names if n.startswith("Phi3") and "Attention" in n)
        self.info = {"transformers": transformers.__version__,
                     "attn_implementation": self.model.config._attn_implementation,
                     "attention_classes": attn_classes, "dtype": str(next(self.model.parameters()).dtype),
                     "model_class": f"{type(self.model).__module__}.{type(self.model).__name__}",
                     "params_b": sum(p.numel() for p in self.model.parameters()) / 1e9, "test_shim": self.shim,
                     "missing_keys": sorted(loading.get("missing_keys", []))[:20],
                     "unexpected_keys": sorted(loading.get("unexpected_keys", []))[:20],
                     "mismatched_keys": [str(k) for k in loading.get("mismatched_keys", [])][:20]}
        if self.info["attn_implementation"] != attn or (attn == "eager" and attn_classes != ["Phi3Attention"]):
            raise RuntimeError(f"expected eager Phi3Attention, got {self.info}")
        self.processors: dict[int, object] = {}

    def processor(self, num_crops: int):
        if num_crops not in self.processors:
            from transformers import AutoProcessor

            p = AutoProcessor.from_pretrained(self.view, trust_remote_code=True, num_crops=num_crops)
            if p.image_processor.num_crops != num_crops:
                raise RuntimeError(f"processor num_crops {p.image_processor.num_crops} != {num_crops}")
            self.processors[num_crops] = p
        return self.processors[num_crops]

    def sync(self) -> None:
        if self.device.startswith("cuda"):
            self.torch.cuda.synchronize()

    def generate(self, prompt: str, image, num_crops: int, max_new_tokens: int, timer: StepTimer | None = None):
        """The model-card call, greedy, eos ignored (eos_token_id=None: generation never stops early)."""
        inputs = self.processor(num_crops)(prompt, [image], return_tensors="pt").to(self.device)
        n_prompt = inputs["input_ids"].shape[1]
        out = self.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=None,
                                  streamer=timer)
        gen = out[0, n_prompt:].tolist()
        if len(gen) != max_new_tokens:
            raise RuntimeError(f"generated {len(gen)} tokens, asked for {max_new_tokens}")
        return gen, n_prompt


# ---------------------------------------------------------------------------------------------------------
# golden check on the tiny checkpoint


def verify_golden(view_root: Path, ref_dir: Path, device: str) -> dict:
    import torch

    view = make_view(str(DATA / "tiny-phi3v"), str(view_root / "tiny-phi3v-hfref"), ref_dir)
    tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # goldens are true fp32
    try:
        return _verify_golden(view, device)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32


def _verify_golden(view: str, device: str) -> dict:
    import numpy as np
    from PIL import Image
    import torch

    man = json.loads((GOLDEN / "manifest.json").read_text(encoding="utf-8"))
    case = man["model"][GOLDEN_CASE]
    z = np.load(GOLDEN / case["file"])
    r = Recipe(view, dtype="float32", device=device)
    img = Image.open(GOLDEN / "images" / "astronaut.png")
    proc = r.processor(case["num_crops"])
    inputs = proc(case["prompt"], [img], return_tensors="pt")
    ids_match = inputs["input_ids"][0].tolist() == z["input_ids"].tolist()
    gen, _ = r.generate(case["prompt"], img, case["num_crops"], len(z["gen_ids"]))
    want = z["gen_ids"].tolist()
    res = {"case": GOLDEN_CASE, "device": device, "input_ids_match": ids_match, "gen_ids_match": gen == want,
           "n_match": sum(a == b for a, b in zip(gen, want)), "n": len(want), "test_shim": r.shim}
    with torch.no_grad():
        inp = proc(case["prompt"], [img], return_tensors="pt").to(device)
        logits = r.model(**inp).logits[0, -1].float().cpu().numpy()
    res["last_logits_max_abs_diff"] = float(np.abs(logits - z["last_logits"]).max())
    del r
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return res


# ---------------------------------------------------------------------------------------------------------
# the benchmark


def run(r: Recipe, a: argparse.Namespace) -> dict:
    res: dict = {}
    img16 = noise_image(1344, 1344, 0)
    for nc in sorted({16, *a.crops}):
        r.processor(nc)  # built before any timing
    log(f"warm-up ({a.warmup_tokens} tokens)")
    r.generate(PROMPT, img16, 16, a.warmup_tokens)
    dec, ttft_a = [], []
    for i in range(a.decode_reps):
        timer = StepTimer()
        r.sync()
        t0 = time.perf_counter()
        gen, n_prompt = r.generate(PROMPT, img16, 16, a.decode_tokens, timer)
        st = timer.stamps
        dec.append((len(st) - 1) / (st[-1] - st[0]))
        ttft_a.append(st[0] - t0)
        log(f"(a) rep {i}: {dec[-1]:.2f} tok/s, first token after {1000 * ttft_a[-1]:.0f} ms, prompt {n_prompt}")
    res["a_decode_tok_s"] = statistics.median(dec)
    res["a_decode_tok_s_all"] = dec
    res["a_prompt_tokens"] = n_prompt
    res["a_sample_ids"] = gen[:16]
    res["x_a_first_token_ms"] = 1000 * statistics.median(ttft_a)
    for nc in a.crops:
        size = (1344, 1344) if nc >= 16 else (672, 672) if nc >= 4 else (336, 336)
        ttft = []
        for s in range(a.ttft_reps):
            img = noise_image(*size, 100 + s)
            r.sync()
            t = time.perf_counter()
            r.generate(PROMPT, img, nc, 1)
            r.sync()
            ttft.append(time.perf_counter() - t)
        res[f"b_ttft_ms_{nc}crop"] = 1000 * statistics.median(ttft[1:] or ttft)
        res[f"b_ttft_ms_{nc}crop_all"] = [1000 * x for x in ttft]
        log(f"(b) {nc} crops: {res[f'b_ttft_ms_{nc}crop']:.0f} ms")
    for nc in a.crops:
        if a.n_offline <= 0:
            break
        r.sync()
        t = time.perf_counter()
        n_tok = 0
        for i in range(a.n_offline):  # one request at a time: the recipe batches no images
            w, h = MIXED_SIZES[i % len(MIXED_SIZES)]
            gen, _ = r.generate(PROMPT, noise_image(w, h, 1000 + i), nc, a.offline_tokens)
            n_tok += len(gen)
        r.sync()
        dt = time.perf_counter() - t
        res[f"c_offline_{nc}crop_images_per_s"] = a.n_offline / dt
        res[f"c_offline_{nc}crop_tokens_per_s"] = n_tok / dt
        res[f"c_offline_{nc}crop_n_images"] = a.n_offline
        log(f"(c) {nc} crops: {a.n_offline} images in {dt:.1f} s")
    if r.device.startswith("cuda"):
        res["d_peak_mem_gib"] = r.torch.cuda.max_memory_allocated() / 2**30
        res["d_peak_reserved_gib"] = r.torch.cuda.max_memory_reserved() / 2**30
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="/tmp/phi3v-full-random", help="HF-layout checkpoint folder (not modified)")
    ap.add_argument("--create", action="store_true",
                    help="if --model has no config.json, write phi3v's full-size random checkpoint there first")
    ap.add_argument("--config-dir", default=str(REAL_CONFIG), help="config for --create")
    ap.add_argument("--view-dir", default=None, help="where the HF view of --model goes (default: MODEL-hfref)")
    ap.add_argument("--ref-code", default=str(REF_CODE), help="folder with the five remote-code files")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--verify-golden", action="store_true", help="first check the tiny checkpoint's golden tokens")
    ap.add_argument("--golden-only", action="store_true", help="only the golden check (CPU works)")
    ap.add_argument("--golden-device", default=None, help="device of the golden check (default: --device)")
    ap.add_argument("--warmup-tokens", type=int, default=16)
    ap.add_argument("--decode-tokens", type=int, default=256)
    ap.add_argument("--decode-reps", type=int, default=3)
    ap.add_argument("--ttft-reps", type=int, default=6)
    ap.add_argument("--crops", type=int, nargs="+", default=[16, 4])
    ap.add_argument("--n-offline", type=int, default=8, help="images per crop setting for (c); 0 skips (c)")
    ap.add_argument("--offline-tokens", type=int, default=200)
    ap.add_argument("--json-out", default=None)
    a = ap.parse_args()

    t_start = time.perf_counter()
    ref_dir = Path(a.ref_code)
    res: dict = {"recipe": "Microsoft remote code (Phi-3-vision-128k-instruct) + transformers, eager attention",
                 "date": time.strftime("%Y-%m-%d"), "command": " ".join([os.path.basename(sys.argv[0])] + sys.argv[1:]),
                 "remote_code_sha256": check_remote_code(ref_dir)}
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import torch
    import transformers

    res.update({"torch": torch.__version__, "transformers": transformers.__version__,
                "transformers_file": transformers.__file__})
    if a.device.startswith("cuda"):
        res["device"] = torch.cuda.get_device_name(0)
    view_root = Path(a.view_dir).parent if a.view_dir else Path(a.model).resolve().parent
    if a.verify_golden or a.golden_only:
        res["golden"] = verify_golden(view_root, ref_dir, a.golden_device or a.device)
        log("golden:", json.dumps(res["golden"]))
    if not a.golden_only:
        if a.create and not os.path.isfile(os.path.join(a.model, "config.json")):
            log(f"writing a random checkpoint (phi3v, config of {a.config_dir}) to {a.model}")
            res["create_checkpoint_s"] = create_random_checkpoint(a.model, a.config_dir, str(TOKENIZER_DIR))
        view = make_view(a.model, a.view_dir or str(Path(a.model).resolve()) + "-hfref", ref_dir)
        if a.device.startswith("cuda"):
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        r = Recipe(view, dtype=a.dtype, device=a.device)
        res["load_s"] = r.load_s
        res.update(r.info)
        res.update(run(r, a))
    res["wall_s"] = time.perf_counter() - t_start
    text = json.dumps(res, indent=1)
    print(text)
    if a.json_out:
        Path(a.json_out).write_text(text, encoding="utf-8")
    golden_ok = res.get("golden", {}).get("gen_ids_match", True)
    return 0 if golden_ok else 1


if __name__ == "__main__":
    sys.exit(main())
