"""`phi3v run | chat | batch`: the command line. Errors are one line on stderr and exit 2."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Callable

from phi3v.api import DEFAULT_MODEL
from phi3v.engine.sampler import SamplingParams


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
                          json_schema=schema, json_object=a.json_object)


def _load(a: argparse.Namespace) -> Any:
    from phi3v.api import LLM

    return LLM(a.model, device=a.device, dtype=a.dtype)


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
    from phi3v.batch import run_batch

    return run_batch(a, _params(a), _load)


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
    b = sub.add_parser("batch", help="run a JSONL file of requests, writing one JSONL result per request")
    _common(b)
    b.add_argument("--input", required=True, help="JSONL: {id, prompt|messages, images?, max_tokens?, ...} per line")
    b.add_argument("--output", required=True, help="JSONL results; requests already there are skipped (resume)")
    b.add_argument("--batch-size", type=int, default=8, help="requests sent to the engine at once")
    b.add_argument("--image-dir", default=None, help="relative image paths are taken from here")
    b.set_defaults(fn=cmd_batch)
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
