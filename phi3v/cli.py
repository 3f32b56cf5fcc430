"""`phi3v run | chat | batch`: the command line. Errors are one line on stderr and exit 2."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from typing import Any, Callable

from phi3v.api import DEFAULT_MODEL
from phi3v.engine.config import KV_CACHE_DTYPES
from phi3v.lora_io import add_lora_arg, cli_loras
from phi3v.models.quant import METHODS, QuantSpec
from phi3v.sampling_params import SamplingParams

QUANT_HELP = ("decoder weights: none (the checkpoint's), fp8 (e4m3 + per-channel scales, GPU of compute capability "
              ">= 8.9) or int4 (weight-only, groups of 128), quantized at load time (default: none)")
KV_HELP = ("KV cache storage, auto or fp8: auto = the model's dtype (outputs as the reference's); fp8 = e4m3, half the KV "
           "memory, changed numerics (default: auto)")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=os.environ.get("PHI3V_MODEL", DEFAULT_MODEL),
                   help="Hugging Face repo id or local checkpoint folder (default: %(default)s)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda if available)")
    p.add_argument("--dtype", default=None, help="auto, bf16, fp16, fp32 (default: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--num-crops", type=int, default=None, help="336px crops per image (default: the checkpoint's)")
    p.add_argument("--max-tokens", type=int, default=512)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    p.add_argument("--json-schema", metavar="FILE", default=None,
                   help="answer with JSON valid against the JSON Schema in FILE (constrained decoding)")
    p.add_argument("--json-object", action="store_true", help="answer with a JSON object (any)")
    p.add_argument("--kv-cache-dtype", default="auto", help=KV_HELP)
    add_quant_args(p)
    add_lora_arg(p)


def add_quant_args(p: argparse.ArgumentParser, env: dict[str, str] | None = None) -> None:
    env = env or {}
    p.add_argument("--quantization", default=env.get("QUANTIZATION", "none"), choices=("none",) + METHODS,
                   help=QUANT_HELP)
    p.add_argument("--quantize-lm-head", action="store_true", default=env.get("QUANTIZE_LM_HEAD", False),
                   help="quantize lm_head too (with --quantization; default: kept in bf16)")


def quant_spec(a: argparse.Namespace) -> QuantSpec | None:
    """The QuantSpec of --quantization / --quantize-lm-head."""
    if a.quantization in (None, "none"):
        if a.quantize_lm_head:
            raise ValueError("--quantize-lm-head needs --quantization fp8 or int4")
        return None
    return QuantSpec(a.quantization, lm_head=a.quantize_lm_head)


# The engine's speed switches, for debugging and A/B runs (each off gives the same tokens, slower): the only
# place they are read from the environment. PHI3V_ATTN_CONFIG="bf16=64,4,2;fp8=64,2,1" sets the decode
# attention kernel's (tile, warps, stages).
SWITCHES = {"PHI3V_FUSED": "fused_kernels", "PHI3V_PDL": "pdl", "PHI3V_RUN_AHEAD": "run_ahead",
            "PHI3V_VISION_GRAPHS": "vision_graphs", "PHI3V_CUDA_GRAPHS": "cuda_graphs",
            "PHI3V_PREFIX_CACHING": "enable_prefix_caching"}
# PHI3V_PAGED_PREFILL=past|all|off and PHI3V_PREFILL_ATTN_CONFIG="bf16=128,64,8,3": the paged prefill kernel.


def engine_switches(env: dict[str, str] | None = None) -> dict[str, Any]:
    """EngineConfig fields set by PHI3V_* variables (0/1), plus PHI3V_ATTN_CONFIG."""
    from phi3v.kernels.paged_attention import parse_configs

    env = os.environ if env is None else env
    out: dict[str, Any] = {}
    for var, name in SWITCHES.items():
        raw = env.get(var, "").strip().lower()
        if raw in ("0", "false", "no", "off"):
            out[name] = False
        elif raw in ("1", "true", "yes", "on"):
            out[name] = True
        elif raw:
            raise ValueError(f"{var}={raw!r}: expected 0 or 1")
    if env.get("PHI3V_ATTN_CONFIG"):
        out["attn_configs"] = parse_configs(env["PHI3V_ATTN_CONFIG"])
    if env.get("PHI3V_PAGED_PREFILL"):
        out["paged_prefill"] = env["PHI3V_PAGED_PREFILL"].strip().lower()
    if env.get("PHI3V_PREFILL_ATTN_CONFIG"):
        from phi3v.kernels import paged_prefill

        out["prefill_attn_configs"] = paged_prefill.parse_configs(env["PHI3V_PREFILL_ATTN_CONFIG"])
    return out


def _read_schema(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ValueError(f"cannot read --json-schema file {path!r}: {e.strerror or e}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"--json-schema file {path!r} is not valid JSON: {e}") from None


def _params(a: argparse.Namespace) -> SamplingParams:
    schema = _read_schema(a.json_schema) if a.json_schema else None
    return SamplingParams(max_tokens=a.max_tokens, temperature=a.temperature, top_p=a.top_p, top_k=a.top_k,
                          seed=a.seed, repetition_penalty=a.repetition_penalty, stop=a.stop,
                          json_schema=schema, json_object=a.json_object, lora=cli_loras(a.lora, a.cmd != "batch")[2])


def _load(a: argparse.Namespace) -> Any:
    from phi3v.api import LLM

    # the person at the command line names the images, URLs included (private addresses stay refused)
    # `batch` decodes up to --batch-size requests at once (KV memory permitting)
    merged, named, _ = cli_loras(a.lora, a.cmd != "batch")
    return LLM(a.model, device=a.device, dtype=a.dtype, quantization=quant_spec(a), allow_url_images=True, lora=merged,
               loras=named, max_num_seqs=getattr(a, "batch_size", 8), kv_cache_dtype=a.kv_cache_dtype, **engine_switches())


def _user_message(text: str, images: list[str]) -> dict[str, Any]:
    parts: list[dict[str, Any]] = [{"type": "image", "image": i} for i in images]
    parts.append({"type": "text", "text": text})
    return {"role": "user", "content": parts}


def cmd_run(a: argparse.Namespace) -> int:
    params = _params(a)
    llm = _load(a)
    messages = ([{"role": "system", "content": a.system}] if a.system else []) + [_user_message(a.prompt, a.image or [])]
    if a.json:
        c = llm.chat(messages, params, num_crops=a.num_crops)
        print(json.dumps({"text": c.text, "token_ids": c.token_ids, "finish_reason": c.finish_reason,
                          "usage": c.usage, "timings": c.timings}, ensure_ascii=False))
        return 0
    for delta in llm.stream(messages, sampling_params=params, num_crops=a.num_crops):
        sys.stdout.write(delta)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def cmd_chat(a: argparse.Namespace) -> int:
    params = _params(a)
    llm = _load(a)
    history: list[dict[str, Any]] = [{"role": "system", "content": a.system}] if a.system else []
    pending: list[str] = list(a.image or [])
    tty = sys.stdin.isatty()
    print("phi3v chat: /image PATH attaches an image, /reset clears the conversation, /quit leaves.", file=sys.stderr)
    while True:
        if tty:
            print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line:
            return 0
        line = line.strip()
        if not line:
            continue
        if line in ("/quit", "/exit"):
            return 0
        if line == "/reset":
            history, pending = history[:1] if a.system else [], []
            print("(conversation cleared)", file=sys.stderr)
            continue
        if line.startswith("/image"):
            path = line[len("/image"):].strip()
            if not path:
                print("usage: /image PATH", file=sys.stderr)
            elif not (os.path.isfile(path) or path.startswith(("http://", "https://", "data:"))):
                print(f"error: no such image file: {path}", file=sys.stderr)
            else:
                pending.append(path)
                print(f"(image {len(pending)} attached to your next message)", file=sys.stderr)
            continue
        msg = _user_message(line, pending)
        try:
            text = "".join(_echo(d) for d in llm.stream(history + [msg], sampling_params=params, num_crops=a.num_crops))
        except ValueError as e:
            print(f"error: {_one_line(e)}", file=sys.stderr)
            continue
        print()
        history += [msg, {"role": "assistant", "content": text}]
        pending = []


def _echo(d: str) -> str:
    sys.stdout.write(d)
    sys.stdout.flush()
    return d


def cmd_batch(a: argparse.Namespace) -> int:
    if a.limit is not None and a.limit < 1:
        raise ValueError(f"--limit must be at least 1, got {a.limit}")
    if a.num_replicas is not None and (a.num_replicas < 1 or not a.ray):
        raise ValueError("--num-replicas needs --ray and must be at least 1")
    params = dataclasses.replace(_params(a), ignore_eos=True) if a.ignore_eos else _params(a)
    if a.ray:
        from phi3v.distributed.ray_batch import run_ray_batch

        return run_ray_batch(a, params)
    from phi3v.batch import run_batch

    return run_batch(a, params, _load)


def _env(name: str, default: Any = None, flag: bool = False) -> Any:
    """Default of a `serve` flag from PHI3V_<NAME>; argparse converts (and checks) string defaults itself."""
    raw = os.environ.get("PHI3V_" + name)
    if raw is None or raw == "":
        return default
    return raw.strip().lower() in ("1", "true", "yes", "on") if flag else raw


def cmd_serve(a: argparse.Namespace) -> int:
    import logging

    for flag, value, low in (("--port", a.port, 0), ("--max-num-seqs", a.max_num_seqs, 1),
                             ("--max-queue", a.max_queue, 0), ("--max-images-per-request", a.max_images_per_request, 0),
                             ("--max-image-pixels", a.max_image_pixels, 1), ("--max-model-len", a.max_model_len, 2),
                             ("--num-crops", a.num_crops, 1), ("--max-body-bytes", a.max_body_bytes, 1),
                             ("--max-image-bytes", a.max_image_bytes, 1), ("--image-timeout", a.image_timeout, 0.001),
                             ("--image-fetch-deadline", a.image_fetch_deadline, 0.001),
                             ("--image-min-rate", a.image_min_rate, 0),
                             ("--max-waiting-bytes", a.max_waiting_bytes, 1)):
        if value is not None and value < low:
            raise ValueError(f"{flag} must be at least {low}, got {value}")
    if a.kv_cache_dtype not in KV_CACHE_DTYPES:  # before the server starts loading
        raise ValueError(f"--kv-cache-dtype must be one of {', '.join(KV_CACHE_DTYPES)}, got {a.kv_cache_dtype!r}")
    try:
        import uvicorn

        from phi3v.server.app import Settings, create_app
        from phi3v.server.http_errors import http_protocol
    except ImportError as e:
        raise ValueError(f"the server needs its extra dependencies ({e.name} is missing): "
                         "pip install 'phi3v[serve]'") from None
    if a.allowed_media_dir is not None and not os.path.isdir(a.allowed_media_dir):
        raise ValueError(f"--allowed-media-dir {a.allowed_media_dir!r} is not a directory")
    s = Settings(model=a.model, served_model_name=a.served_model_name, host=a.host, port=a.port, api_key=a.api_key,
                 allow_url_images=a.allow_url_images, allowed_media_dir=a.allowed_media_dir,
                 max_num_seqs=a.max_num_seqs, max_model_len=a.max_model_len, max_queue=a.max_queue,
                 max_images_per_request=a.max_images_per_request, max_image_pixels=a.max_image_pixels,
                 num_crops=a.num_crops, device=a.device, dtype=a.dtype, kv_cache_dtype=a.kv_cache_dtype,
                 max_body_bytes=a.max_body_bytes, max_image_bytes=a.max_image_bytes, image_timeout=a.image_timeout,
                 image_fetch_deadline=a.image_fetch_deadline, image_min_rate=a.image_min_rate,
                 max_waiting_bytes=a.max_waiting_bytes,
                 quantization=quant_spec(a), lora=cli_loras(a.lora, False)[0], loras=cli_loras(a.lora, False)[1],
                 engine_switches=engine_switches(), web_ui=not a.no_web_ui, cors_origins=tuple(a.cors_origin or ()))
    if a.host not in ("127.0.0.1", "localhost", "::1") and not a.api_key:
        print(f"phi3v: warning: listening on {a.host} without --api-key: anyone who can reach it can use it",
              file=sys.stderr)
    if not a.no_web_ui:
        shown = f"[{a.host}]" if ":" in a.host else a.host
        print(f"phi3v: chat page at http://{shown}:{a.port}/ (--no-web-ui turns it off)",
              file=sys.stderr)
    logging.basicConfig(level=a.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if a.replicas is not None:
        if a.replicas < 1:
            raise ValueError(f"--replicas must be at least 1, got {a.replicas}")
        try:
            from phi3v.distributed.ray_serve import run_serve
        except ImportError as e:
            raise ValueError(f"--replicas needs Ray Serve ({e.name} is missing): pip install 'phi3v[ray]'") from None

        return run_serve(s, a.replicas, a.ray or "local")
    uvicorn.run(create_app(s), host=a.host, port=a.port, log_level=a.log_level, access_log=False,
                timeout_graceful_shutdown=5, http=http_protocol())  # uvicorn's own 400s in the OpenAI shape
    return 0


def _serve_parser(sub: Any) -> None:
    s = sub.add_parser("serve", help="OpenAI-compatible HTTP server (every flag also reads PHI3V_<FLAG>)")
    s.add_argument("--model", default=_env("MODEL", DEFAULT_MODEL),
                   help="repo id or local folder (default: %(default)s)")
    s.add_argument("--host", default=_env("HOST", "127.0.0.1"), help="bind address (default: %(default)s)")
    s.add_argument("--port", type=int, default=_env("PORT", 8000))
    s.add_argument("--served-model-name", default=_env("SERVED_MODEL_NAME"),
                   help="model id clients use (default: --model)")
    s.add_argument("--api-key", default=_env("API_KEY"), help="require 'Authorization: Bearer KEY' on /v1/*")
    s.add_argument("--allow-url-images", action="store_true", default=_env("ALLOW_URL_IMAGES", False, flag=True),
                   help="fetch http(s) image URLs (public addresses only)")
    s.add_argument("--allowed-media-dir", default=_env("ALLOWED_MEDIA_DIR"),
                   help="local image paths are allowed under this folder")
    s.add_argument("--max-num-seqs", type=int, default=_env("MAX_NUM_SEQS", 32), help="requests decoded at once")
    s.add_argument("--max-model-len", type=int, default=_env("MAX_MODEL_LEN", None), help="context per request")
    s.add_argument("--max-queue", type=int, default=_env("MAX_QUEUE", 256), help="waiting requests before 429")
    s.add_argument("--max-images-per-request", type=int, default=_env("MAX_IMAGES_PER_REQUEST", 8))
    s.add_argument("--max-image-pixels", type=int, default=_env("MAX_IMAGE_PIXELS", 64 * 2**20))
    s.add_argument("--max-image-bytes", type=int, default=_env("MAX_IMAGE_BYTES", 20 * 2**20),
                   help="bytes of one encoded image (file, data URI or download)")
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
    add_lora_arg(s, [v for v in (_env("LORA") or "").split(",") if v] or None)  # PHI3V_LORA: comma-separated
    s.add_argument("--no-web-ui", action="store_true", default=_env("NO_WEB_UI", False, flag=True),
                   help="do not serve the browser chat page at / (the API is unchanged)")
    s.add_argument("--cors-origin", action="append", metavar="ORIGIN",
                   default=[o for o in (_env("CORS_ORIGIN") or "").split(",") if o] or None,
                   help="let browser pages from ORIGIN (e.g. http://localhost:3000, or *) call the API; repeatable "
                        "(PHI3V_CORS_ORIGIN: comma-separated); default: no CORS headers")
    s.add_argument("--replicas", type=int, default=_env("REPLICAS", None),
                   help="engine replicas (one GPU each) behind these routes, on Ray Serve (extra phi3v[ray])")
    s.add_argument("--ray", default=_env("RAY", None), metavar="ADDRESS",
                   help="with --replicas: local (default), auto (the running cluster) or an address")
    s.add_argument("--log-level", default=_env("LOG_LEVEL", "info"), choices=["debug", "info", "warning", "error"])
    s.set_defaults(fn=cmd_serve)


def _batch_parser(sub: Any) -> None:
    b = sub.add_parser("batch", help="answer a folder, glob, JSONL, CSV, Parquet or saved dataset of requests, "
                                     "one record per input (resumable)")
    _common(b)
    b.add_argument("--input", required=True,
                   help="a folder of images (recursive), a glob, a JSONL file ({id, prompt|messages, images?, ...} per "
                        "line), a .csv or .parquet file, or a Hugging Face dataset saved with save_to_disk")
    b.add_argument("--output", required=True,
                   help="JSONL results, or Parquet when it ends in .parquet; inputs already there are skipped (resume)")
    b.add_argument("--prompt", default=None, help="the question for every image of a folder/glob (and every row "
                                                  "without --prompt-column)")
    b.add_argument("--image-column", default="image", help="CSV/Parquet/dataset column with the image: path, URL or "
                                                           "bytes (default: %(default)s)")
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
    b.set_defaults(fn=cmd_batch)


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="phi3v", description="Fast, faithful Phi-3-vision / Phi-3.5-vision inference")
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="answer one prompt about images, streaming the answer")
    _common(r)
    r.add_argument("--image", action="append", help="image path or URL (repeatable)")
    r.add_argument("--system", default=None, help="system message")
    r.add_argument("--json", action="store_true", help="print text, token ids, usage and timings as JSON")
    r.add_argument("prompt")
    r.set_defaults(fn=cmd_run)
    c = sub.add_parser("chat", help="interactive multi-turn chat (/image PATH attaches an image)")
    _common(c)
    c.add_argument("--image", action="append", help="image attached to the first message (repeatable)")
    c.add_argument("--system", default=None)
    c.set_defaults(fn=cmd_chat)
    _batch_parser(sub)
    _serve_parser(sub)
    from phi3v.bench import add_parser as add_bench_parser
    from phi3v.quantize import add_parser as add_quantize_parser

    add_bench_parser(sub)
    add_quantize_parser(sub)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    fn: Callable[[argparse.Namespace], int] = args.fn
    try:
        return fn(args)
    except (ValueError, OSError) as e:
        print(f"phi3v: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("phi3v: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - the user gets one line, not a traceback
        print(f"phi3v: internal error: {type(e).__name__}: {_one_line(e)} (set PHI3V_DEBUG=1 for a traceback)", file=sys.stderr)
        if os.environ.get("PHI3V_DEBUG"):
            raise
        return 1


if __name__ == "__main__":
    sys.exit(main())
