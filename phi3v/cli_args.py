"""The command line's arguments: every subcommand's parser, without importing torch (so that `phi3v --help` and
`phi3v --version` answer at once). Part of the CLI: the only other module besides phi3v/cli.py that reads
environment variables (PHI3V_MODEL, and `serve`'s PHI3V_<FLAG> defaults). Each subcommand's function is named
as "module:function" and imported when the command runs (phi3v.cli.main)."""

from __future__ import annotations

import argparse
import os
import sys
from importlib import metadata
from typing import Any

import phi3v
from phi3v.engine.config import KV_CACHE_DTYPES, QUANT_METHODS
from phi3v.hub import DEFAULT_MODEL

QUANT_HELP = ("decoder weights: none (the checkpoint's), fp8 (e4m3 + per-channel scales, GPU of compute capability "
              ">= 8.9) or int4 (weight-only, groups of 128), quantized at load time")
KV_HELP = ("KV cache storage, auto or fp8: auto = the model's dtype (outputs as the reference's); fp8 = e4m3, half the KV "
           "memory, changed numerics")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, unless it is None/False (nothing to show) or the help already says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default is None or action.default is False or action.default == argparse.SUPPRESS:
            return text
        if action.option_strings or action.nargs in (argparse.OPTIONAL, argparse.ZERO_OR_MORE):
            return text + " (default: %(default)s)"
        return text


def _sub(sub: Any, name: str, help: str, fn: str) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help, description=help, formatter_class=HelpFormatter)
    p.set_defaults(fn=fn)
    return p


def version_string() -> str:
    """`phi3v --version`: phi3v's, and PyTorch's as installed (read from its metadata, not imported)."""
    try:
        torch_v = metadata.version("torch")
    except metadata.PackageNotFoundError:
        torch_v = "not installed"
    py = ".".join(map(str, sys.version_info[:3]))
    return f"phi3v {phi3v.__version__} (torch {torch_v}, Python {py})"


def common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=os.environ.get("PHI3V_MODEL", DEFAULT_MODEL),
                   help="Hugging Face repo id or local checkpoint folder (env PHI3V_MODEL)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda if available)")
    p.add_argument("--dtype", default=None, help="auto, bf16, fp16, fp32 (default: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--num-crops", type=int, default=None, help="336px crops per image (default: the checkpoint's)")
    p.add_argument("--max-tokens", type=int, default=512, help="most tokens to generate")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: keep the most likely tokens up to this "
                                                            "probability mass")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0: all)")
    p.add_argument("--seed", type=int, default=None,
                   help="seed of the sampling (temperature > 0); without it every run draws a fresh one")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeated tokens")
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    p.add_argument("--json-schema", metavar="FILE", default=None,
                   help="answer with JSON valid against the JSON Schema in FILE (constrained decoding)")
    p.add_argument("--json-object", action="store_true", help="answer with a JSON object (any)")
    p.add_argument("--kv-cache-dtype", default="auto", help=KV_HELP)
    add_quant_args(p)
    add_lora_arg(p)


LORA_HELP = ("LoRA adapter, a PEFT folder (adapter_config.json + adapter_model.safetensors or .bin): PATH merges it "
             "into the weights at load (no cost per token); NAME=PATH (repeatable) loads it to be chosen per request "
             "(serve: the request's model field NAME or BASE:NAME; batch: a record's \"lora\": NAME; run/chat: the "
             "one named adapter answers)")


def add_lora_arg(p: Any, default: list[str] | None = None) -> None:
    p.add_argument("--lora", action="append", default=default, metavar="[NAME=]PATH", help=LORA_HELP)


def add_quant_args(p: argparse.ArgumentParser, env: dict[str, Any] | None = None) -> None:
    env = env or {}
    p.add_argument("--quantization", default=env.get("QUANTIZATION", "none"), choices=("none",) + QUANT_METHODS,
                   help=QUANT_HELP)
    p.add_argument("--quantize-lm-head", action="store_true", default=env.get("QUANTIZE_LM_HEAD", False),
                   help="quantize lm_head too (with --quantization; default: kept in bf16)")


def video_args(p: argparse.ArgumentParser, first: str) -> None:
    p.add_argument("--video", action="append", metavar="FILE",
                   help=f"video file or URL: --frames frames sampled evenly, sent as images {first} (repeatable; "
                        "needs the extra phi3v[video])")
    p.add_argument("--frames", type=int, default=8, help="frames sampled from each --video")


def serve_env_lists(a: argparse.Namespace) -> argparse.Namespace:
    """`serve`'s repeatable flags (--lora, --cors-origin) from PHI3V_LORA / PHI3V_CORS_ORIGIN (comma-separated) when
    the flag is not given: an `append` default would be extended by the flags, where every other PHI3V_<FLAG> is
    replaced by its flag."""
    for attr, var in (("lora", "LORA"), ("cors_origin", "CORS_ORIGIN")):
        if getattr(a, attr, None) is None:
            setattr(a, attr, [v for v in (_env(var) or "").split(",") if v] or None)
    return a


def _env(name: str, default: Any = None, flag: bool = False) -> Any:
    """Default of a `serve` flag from PHI3V_<NAME>; argparse converts (and checks) string defaults itself."""
    raw = os.environ.get("PHI3V_" + name)
    if raw is None or raw == "":
        return default
    return raw.strip().lower() in ("1", "true", "yes", "on") if flag else raw


def serve_parser(sub: Any) -> None:
    s = _sub(sub, "serve", "OpenAI-compatible HTTP server (every flag also reads PHI3V_<FLAG>)", "phi3v.cli:cmd_serve")
    s.add_argument("--model", default=_env("MODEL", DEFAULT_MODEL),
                   help="repo id or local folder")
    s.add_argument("--host", default=_env("HOST", "127.0.0.1"), help="bind address")
    s.add_argument("--port", type=int, default=_env("PORT", 8000), help="TCP port")
    s.add_argument("--served-model-name", default=_env("SERVED_MODEL_NAME"),
                   help="model id clients use (default: --model)")
    s.add_argument("--api-key", default=_env("API_KEY"), help="require 'Authorization: Bearer KEY' on /v1/*")
    s.add_argument("--allow-url-images", action="store_true", default=_env("ALLOW_URL_IMAGES", False, flag=True),
                   help="fetch http(s) image and video URLs (public addresses only)")
    s.add_argument("--allowed-media-dir", default=_env("ALLOWED_MEDIA_DIR"),
                   help="local image and video paths are allowed under this folder")
    s.add_argument("--max-num-seqs", type=int, default=_env("MAX_NUM_SEQS", 32), help="requests decoded at once")
    s.add_argument("--max-model-len", type=int, default=_env("MAX_MODEL_LEN", None), help="context per request")
    s.add_argument("--max-queue", type=int, default=_env("MAX_QUEUE", 256), help="waiting requests before 429")
    s.add_argument("--max-images-per-request", type=int, default=_env("MAX_IMAGES_PER_REQUEST", 8),
                   help="images per request (each frame of a video counts as one)")
    s.add_argument("--max-image-pixels", type=int, default=_env("MAX_IMAGE_PIXELS", 64 * 2**20),
                   help="pixels of one image or video frame (checked from its header, before decoding)")
    s.add_argument("--max-image-bytes", type=int, default=_env("MAX_IMAGE_BYTES", 20 * 2**20),
                   help="bytes of one encoded image or video (file, data URI or download)")
    s.add_argument("--image-timeout", type=float, default=_env("IMAGE_TIMEOUT", 10.0),
                   help="seconds per socket operation of an image download")
    s.add_argument("--image-fetch-deadline", type=float, default=_env("IMAGE_FETCH_DEADLINE", 30.0),
                   help="seconds for a whole image download, redirects included")
    s.add_argument("--image-min-rate", type=float, default=_env("IMAGE_MIN_RATE", 4096.0),
                   help="bytes/s an image download must average once --image-timeout has passed (0: off)")
    s.add_argument("--max-body-bytes", type=int, default=_env("MAX_BODY_BYTES", 100 * 2**20),
                   help="request body size (413 beyond it)")
    s.add_argument("--max-waiting-bytes", type=int, default=_env("MAX_WAITING_BYTES", 8 * 2**30),
                   help="bytes of prepared images held by requests not yet running (429 beyond it)")
    s.add_argument("--num-crops", type=int, default=_env("NUM_CROPS", None), help="default crops per image")
    s.add_argument("--device", default=_env("DEVICE"), help="cpu, cuda, cuda:N (default: cuda if available)")
    s.add_argument("--dtype", default=_env("DTYPE"), help="auto, bf16, fp16, fp32")
    s.add_argument("--kv-cache-dtype", default=_env("KV_CACHE_DTYPE", "auto"), help=KV_HELP)
    add_quant_args(s, {"QUANTIZATION": _env("QUANTIZATION", "none"),
                       "QUANTIZE_LM_HEAD": _env("QUANTIZE_LM_HEAD", False, flag=True)})
    add_lora_arg(s)  # PHI3V_LORA (comma-separated): cli.cmd_serve, when no --lora is given
    s.add_argument("--no-web-ui", action="store_true", default=_env("NO_WEB_UI", False, flag=True),
                   help="do not serve the browser chat page at / (the API is unchanged)")
    s.add_argument("--cors-origin", action="append", metavar="ORIGIN",
                   default=None,  # PHI3V_CORS_ORIGIN: cli.cmd_serve, when no --cors-origin is given
                   help="let browser pages from ORIGIN (e.g. http://localhost:3000, or *) call the API; repeatable "
                        "(PHI3V_CORS_ORIGIN: comma-separated); default: no CORS headers")
    s.add_argument("--replicas", type=int, default=_env("REPLICAS", None),
                   help="engine replicas (one GPU each) behind these routes, on Ray Serve (extra phi3v[ray])")
    s.add_argument("--ray", default=_env("RAY", None), metavar="ADDRESS",
                   help="with --replicas: local (default), auto (the running cluster) or an address")
    s.add_argument("--log-level", default=_env("LOG_LEVEL", "info"), choices=["debug", "info", "warning", "error"],
                   help="server log level")


def batch_parser(sub: Any) -> None:
    b = _sub(sub, "batch", "answer a folder, glob, JSONL, CSV, Parquet or saved dataset of requests, one record per "
                           "input (resumable)", "phi3v.cli:cmd_batch")
    common(b)
    b.add_argument("--input", required=True,
                   help="a folder of images (recursive), a glob, a JSONL file ({id, prompt|messages, images?, ...} per "
                        "line), a .csv or .parquet file, or a Hugging Face dataset saved with save_to_disk")
    b.add_argument("--output", required=True,
                   help="JSONL results, or Parquet when it ends in .parquet; inputs already there are skipped (resume)")
    b.add_argument("--prompt", default=None, help="the question for every image of a folder/glob (and every row "
                                                  "without --prompt-column)")
    b.add_argument("--image-column", default="image", help="CSV/Parquet/dataset column with the image: path, URL or "
                                                           "bytes")
    b.add_argument("--prompt-column", default=None, help="CSV/Parquet/dataset column with each row's question")
    b.add_argument("--id-column", default=None,
                   help="CSV/Parquet/dataset column with each row's id (default: the row number)")
    b.add_argument("--limit", type=int, default=None, help="only the first N inputs (try a few first)")
    b.add_argument("--batch-size", type=int, default=64,
                   help="requests decoded at once (KV memory permitting); more wait and join as others finish")
    b.add_argument("--image-dir", default=None, help="relative image paths are taken from here")
    b.add_argument("--fsync-interval", type=float, default=1.0,
                   help="seconds between fsyncs of the output (a crash loses at most this much; 0: every record)")
    b.add_argument("--ray", default=None, metavar="ADDRESS",
                   help="run on Ray Data: local (a Ray cluster on this machine), auto (the running one) or an address")
    b.add_argument("--num-replicas", type=int, default=None,
                   help="with --ray: engines (actors), one GPU each on CUDA (default: the cluster's GPUs)")
    b.add_argument("--quiet", action="store_true", help="no progress bar (the summary line stays)")
    b.add_argument("--ignore-eos", action="store_true",
                   help="generate --max-tokens whatever the model says (benchmarks)")




def bench_parser(sub: Any) -> None:
    b = _sub(sub, "bench", "measure decode tokens/s, time to first token, offline throughput, memory",
             "phi3v.bench:cmd_bench")
    b.add_argument("--model", default=None, help="checkpoint folder or repo id")
    b.add_argument("--random", default=None, metavar="CONFIG_DIR",
                   help="write a random-weight checkpoint with this folder's config.json first (full size)")
    b.add_argument("--tokenizer", default=None, help="folder with tokenizer.json etc. for --random")
    b.add_argument("--out-dir", default="/tmp/phi3v-random-checkpoint", help="where --random writes its checkpoint")
    b.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda if available)")
    b.add_argument("--dtype", default=None, help="auto, bf16, fp16, fp32")
    b.add_argument("--max-num-seqs", type=int, default=64, help="requests decoded at once")
    b.add_argument("--max-model-len", type=int, default=3072, help="context per request")
    b.add_argument("--decode-tokens", type=int, default=256, help="(a): tokens decoded")
    b.add_argument("--n-offline", type=int, default=64, help="(c): requests")
    b.add_argument("--offline-tokens", type=int, default=200, help="(c): tokens per request")
    b.add_argument("--parts", default="abc", help="which of (a) decode, (b) TTFT, (c) offline, (e) follow-up "
                   "question and second chat turn, (f) long prompts (--max-model-len 110000 or more) to run")
    b.add_argument("--prep-workers", type=int, default=None, help="(c): preparation threads (default min(8, cpus); 0: prepare all first)")
    b.add_argument("--profile-prefill", action="store_true", help="(c): time vision / embeds / decoder prefill "
                   "(adds syncs)")
    b.add_argument("--gpu-memory-utilization", type=float, default=0.9, help="of the free GPU memory")
    b.add_argument("--kv-cache-dtype", default="auto",
                   help=f"{' | '.join(KV_CACHE_DTYPES)}; fp8: e4m3 KV cache (changed numerics; not the reference's outputs)")
    add_quant_args(b)
    b.add_argument("--compare", default=None, help="JSON of the reference recipe's numbers: print ratios")
    b.add_argument("--json-out", default=None, help="also write the results to this JSON file")


def quantize_parser(sub: Any) -> None:
    q = _sub(sub, "quantize", "write a checkpoint with fp8 or int4 decoder weights (loads without bf16 files)",
             "phi3v.quantize:cmd_quantize")
    q.add_argument("--model", required=True, help="bf16 checkpoint: local folder or Hugging Face repo id")
    q.add_argument("--quantization", required=True, choices=QUANT_METHODS, help="fp8 or int4")
    q.add_argument("--output", required=True, help="folder to write")
    q.add_argument("--group-size", type=int, default=128, help="int4: weights per scale along K")
    q.add_argument("--quantize-lm-head", action="store_true", help="quantize lm_head too (default: kept bf16)")
    q.add_argument("--device", default=None, help="where to quantize (default: cuda if available)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="phi3v", description="Fast, faithful Phi-3-vision / Phi-3.5-vision inference",
                                 formatter_class=HelpFormatter)
    ap.add_argument("--version", action="version", version=version_string())
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = _sub(sub, "run", "answer one prompt about images (or video frames), streaming the answer", "phi3v.cli:cmd_run")
    common(r)
    r.add_argument("--image", action="append", help="image path or URL (repeatable)")
    video_args(r, "before the prompt")
    r.add_argument("--system", default=None, help="system message")
    r.add_argument("--json", action="store_true", help="print text, token ids, usage and timings as JSON")
    r.add_argument("prompt", help="the question")
    c = _sub(sub, "chat", "interactive multi-turn chat (/image PATH attaches an image, /help lists the commands)",
             "phi3v.chat_cli:cmd_chat")
    common(c)
    c.add_argument("--image", action="append", help="image attached to the first message (repeatable)")
    video_args(c, "with the first message")
    c.add_argument("--system", default=None, help="system message")
    batch_parser(sub)
    serve_parser(sub)
    bench_parser(sub)
    quantize_parser(sub)
    return ap
