"""`phi3v run | chat | batch | serve | bench | quantize`: the command line. Errors are one line on stderr and exit 2.

The parsers live in phi3v/cli_args.py; this module and the commands import torch only once a command runs, so
`phi3v --help` and `phi3v --version` answer at once."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from typing import Any, Callable

from phi3v.cli_args import build_parser, serve_env_lists  # the parsers: no torch import
from phi3v.engine.config import KV_CACHE_DTYPES
from phi3v.extras import install_hint
from phi3v.sampling_params import SamplingParams


def cli_loras(values: list[str] | None, one_request: bool) -> tuple[str | None, dict[str, str], str | None]:
    from phi3v.lora_io import cli_loras as parse  # torch: only once a command runs

    return parse(values, one_request)


def quant_spec(a: argparse.Namespace) -> Any:
    """The QuantSpec of --quantization / --quantize-lm-head (None: none)."""
    from phi3v.models.quant import QuantSpec

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


def _user_message(text: str, images: list[str], videos: list[str] | None = None, frames: int = 8) -> dict[str, Any]:
    """A user message: the images, then each video's `frames` frames (as images), then the text."""
    parts: list[dict[str, Any]] = [{"type": "image", "image": i} for i in images]
    parts += [{"type": "video", "video": v, "num_frames": frames} for v in videos or []]
    parts.append({"type": "text", "text": text})
    return {"role": "user", "content": parts}


def check_frames(a: argparse.Namespace) -> None:
    """--frames, checked before the model loads."""
    from phi3v.processing.video import MAX_FRAMES

    if a.video and not 1 <= a.frames <= MAX_FRAMES:
        raise ValueError(f"--frames must be from 1 to {MAX_FRAMES}, got {a.frames}")


def cmd_run(a: argparse.Namespace) -> int:
    check_frames(a)
    params = _params(a)
    llm = _load(a)
    system = [{"role": "system", "content": a.system}] if a.system else []
    messages = system + [_user_message(a.prompt, a.image or [], a.video, a.frames)]
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


def cmd_serve(a: argparse.Namespace) -> int:
    import logging

    serve_env_lists(a)

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
                         + install_hint("serve")) from None
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
            raise ValueError(f"--replicas needs Ray Serve ({e.name} is missing): {install_hint('ray')}") from None

        return run_serve(s, a.replicas, a.ray or "local")
    uvicorn.run(create_app(s), host=a.host, port=a.port, log_level=a.log_level, access_log=False,
                timeout_graceful_shutdown=5, http=http_protocol())  # uvicorn's own 400s in the OpenAI shape
    return 0


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def _command(name: str) -> Callable[[argparse.Namespace], int]:
    """"module:function" -> the function (its module, and torch with it, imported only now)."""
    import importlib

    module, _, fn = name.partition(":")
    return getattr(importlib.import_module(module), fn)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _command(args.fn)(args)
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
