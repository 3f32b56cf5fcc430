"""The Python API: `LLM(model).chat(messages)`, `.generate(prompt, images)`, `.stream(...)`.

Text and images are turned into token ids and crops here (processing/), the engine turns ids
into ids (engine/), and the text comes back through an incremental detokenizer that also
applies stop strings (the engine never sees text).
"""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Iterator, Sequence

import torch

from phi3v.config import Phi3VConfig
from phi3v.engine.engine import Engine
from phi3v.engine.config import EngineConfig
from phi3v.engine.grammar import Grammars
from phi3v.driver import RequestDriver
from phi3v.hub import DEFAULT_MODEL, resolve_model
from phi3v.lora_io import load_adapters
from phi3v.models.lora import attach_loras
from phi3v.models.quant import QuantSpec
from phi3v.models.weights import load_model
from phi3v.output import Completion
from phi3v.prepare import PreparedRequest, Preparer
from phi3v.processing.image import ImageProcessor
from phi3v.processing.tokenizer import Tokenizer
from phi3v.sampling_params import SamplingParams

__all__ = ["DEFAULT_MODEL", "LLM", "PreparedRequest", "Completion"]


def _dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if dtype is None or dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    table = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
             "half": torch.float16, "fp32": torch.float32, "float32": torch.float32, "float": torch.float32}
    if dtype not in table:
        raise ValueError(f"unknown dtype {dtype!r}: use one of auto, bf16, fp16, fp32")
    return table[dtype]


class LLM:
    """A loaded Phi-3-vision / Phi-3.5-vision model with its tokenizer, image processor and engine."""

    def __init__(self, model: str = DEFAULT_MODEL, device: str | torch.device | None = None,
                 dtype: str | torch.dtype | None = None, *, quantization: str | QuantSpec | None = None,
                 revision: str | None = None, allow_url_images: bool = False, lora: str | None = None,
                 loras: dict[str, str] | None = None, engine_config: EngineConfig | None = None,
                 **engine_options: Any) -> None:
        """quantization: the decoder's weights, None (the checkpoint's own: bf16, or what `phi3v quantize`
        wrote), "fp8" (e4m3, per-channel scales; a GPU of compute capability >= 8.9) or "int4" (weight-only,
        groups of 128), quantized at load time; a QuantSpec also sets int4's group size and lm_head
        (phi3v/models/quant.py: what each costs in fidelity).
        engine_options: fields of `EngineConfig` (max_num_seqs, max_model_len, gpu_memory_utilization,
        kv_block_size, kv_cache_dtype ("auto" keeps the KV cache in the model's dtype, outputs as the
        reference's; "fp8" stores it in e4m3: half the KV memory, at changed numerics), ...), or a whole
        `engine_config`.
        lora: a PEFT LoRA adapter folder merged into the weights at load (no cost per token); loras: {name: folder},
        adapters chosen per request (`SamplingParams(lora=name)`), rows of different adapters batched together
        (phi3v/lora_io.py: what each accepts)."""
        if engine_config is not None and engine_options:
            raise ValueError("pass engine options either as keyword arguments or as engine_config, not both")
        options = engine_config or EngineConfig.from_options(engine_options)  # bad options fail before loading
        quant = QuantSpec.parse(quantization)  # likewise a bad mode
        if device is None or device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        try:
            self.device = torch.device(device)
        except RuntimeError as e:
            raise ValueError(f"unknown device {device!r}: use cpu, cuda or cuda:N") from e
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("device cuda was asked for but PyTorch sees no CUDA GPU: use --device cpu")
        self.dtype = _dtype(dtype, self.device)
        self.folder = resolve_model(model, revision)
        self.model_name = model
        self.config = Phi3VConfig.from_pretrained(self.folder)
        self.tokenizer = Tokenizer.from_pretrained(self.folder)
        self.image_processor = ImageProcessor.from_config(self.config)
        merged, per_request = load_adapters(lora, loras, self.config, self.folder)  # checked before the weights
        self.model = load_model(self.folder, self.config, self.device, self.dtype, quant,
                                patch=merged.patch if merged is not None else None)
        if per_request:
            attach_loras(self.model, {n: a.layers for n, a in per_request.items()}, self.dtype)
        self.engine = Engine(self.model, self.config, options,
                             grammars=Grammars.from_tokenizer(self.tokenizer, self.config.vocab_size,
                                                              self.config.eos_token_ids))
        self.driver = RequestDriver(self.engine, self.tokenizer, self.config.eos_token_ids)
        self.preparer = Preparer(self.tokenizer, self.image_processor, self.device, self.dtype,
                                 self.engine.max_model_len, allow_url_images=allow_url_images,
                                 lora_index=self.engine.lora_index, pin=self.engine.pin_image,
                                 unpin=self.engine.unpin_image)
        self._lock = threading.Lock()

    def warmup(self) -> int:
        """Capture the engine's CUDA graphs now: decode at every batch size up to max_num_seqs, prefill
        at every length bucket, the vision tower at every chunk size; then, on CUDA, run a few blank
        requests through every step (the server and batch jobs do at start; otherwise the first step at
        each new shape pays its capture, Triton compiles and cuDNN plans mid-run, and the first request
        the first use of kernels no graph holds). Returns how many graphs were captured."""
        with self._lock:
            return self.engine.warmup()

    # ---------------------------------------------------------------- preparation
    @property
    def allow_url_images(self) -> bool:
        return self.preparer.allow_url_images

    @allow_url_images.setter
    def allow_url_images(self, value: bool) -> None:
        self.preparer.allow_url_images = value

    def prepare(self, prompt: str, images: list[Any] | None = None, sampling_params: SamplingParams | None = None,
                num_crops: int | None = None, *, cancel: threading.Event | None = None,
                **load_kwargs: Any) -> PreparedRequest:
        """Prompt text in the chat format + image sources -> ids and crops (`phi3v.prepare.Preparer.prepare`).
        Raises ValueError (also for a request that cannot fit the context, found before the work that costs), or
        limits.Cancelled once `cancel` is set. An image whose features the engine holds comes without crops."""
        images, sampling_params = _images_and_params(images, sampling_params)
        return self.preparer.prepare(prompt, images, sampling_params, num_crops, cancel=cancel, **load_kwargs)

    def prepare_chat(self, messages: list[dict[str, Any]], sampling_params: SamplingParams | None = None,
                     num_crops: int | None = None, *, cancel: threading.Event | None = None,
                     **load_kwargs: Any) -> PreparedRequest:
        return self.preparer.prepare_chat(messages, sampling_params, num_crops, cancel=cancel, **load_kwargs)

    # ---------------------------------------------------------------- running
    def run(self, requests: Sequence[PreparedRequest | Callable[[], PreparedRequest]],
            workers: int | None = None) -> Iterator[tuple[int, str, Completion | Exception | None]]:
        """Run requests concurrently through the engine. Yields (index, text delta, Completion when
        that request is done). A request with `n > 1` yields the deltas of its choices interleaved and n
        Completions (their `.index` tells them apart). An item may be a zero-argument callable that
        prepares its request (e.g. `functools.partial(llm.prepare, prompt, images)`): those run on a thread pool while the
        engine generates, and join the batch as they become ready, in order. At most max_num_seqs
        wait in the engine and 2 * max_num_seqs (at least 16) more are prepared ahead, so the crops
        of thousands of requests are never held at once. A callable may return an Exception instead of raising: that request
        is then yielded with the exception in place of its Completion and the others go on."""
        with self._lock:
            if all(isinstance(r, PreparedRequest) for r in requests):
                yield from self._run(list(requests))
                return
            n = workers or min(8, os.cpu_count() or 2)
            with ThreadPoolExecutor(max_workers=n, thread_name_prefix="phi3v-prep") as pool:
                futs = _Prefetch(pool, requests, max(16, 2 * self.engine.max_num_seqs))
                try:
                    yield from self._run(futs)
                finally:
                    futs.cancel()

    def _run(self, requests: list[Any]) -> Iterator[tuple[int, str, Completion | Exception | None]]:
        """`requests`: PreparedRequests, or futures of them (added to the engine once done, in order)."""
        drv, eng = self.driver, self.engine
        t0 = time.perf_counter()
        index: dict[str, int] = {}
        nxt = 0
        try:
            while True:
                # join while the engine's queue is short (prepared crops wait there, on the device)
                # and the next request is ready, or whenever the engine would otherwise idle
                while nxt < len(requests) and (not drv.has_unfinished() or (
                        eng.num_waiting < eng.max_num_seqs
                        and (not isinstance(requests[nxt], Future) or requests[nxt].done()))):
                    r = requests[nxt].result() if isinstance(requests[nxt], Future) else requests[nxt]
                    if isinstance(requests, _Prefetch):
                        requests.release(nxt)  # the engine holds what it needs (crops until prefilled)
                    if isinstance(r, Exception):  # a preparation that failed softly: reported, not raised
                        yield nxt, "", r
                    else:
                        index[drv.add(r, t0=t0)] = nxt
                    r = None  # nor does this frame keep the last one's crops
                    nxt += 1
                if not drv.has_unfinished():
                    break
                for ev in drv.step():
                    if ev.error is not None:
                        yield index[ev.rid], "", ev.error
                    elif ev.delta or ev.done:
                        yield index[ev.rid], ev.delta, ev.done
        finally:
            for rid in index:
                drv.abort(rid)

    def _one(self, req: PreparedRequest) -> Any:
        """The Completion; with params.n > 1 the list of the n Completions, in choice order."""
        n = req.params.n
        got: list[Completion | None] = [None] * n
        for _i, _delta, done in self.run([req]):
            if isinstance(done, Exception):
                raise done
            if done is not None:
                got[done.index] = done
        if any(c is None for c in got):
            raise RuntimeError("the engine finished without a result")  # unreachable: every request finishes
        return got[0] if n == 1 else got

    # ---------------------------------------------------------------- public calls
    def generate(self, prompt: str, images: list[Any] | None = None, sampling_params: SamplingParams | None = None,
                 num_crops: int | None = None) -> Any:
        """`prompt` already in the chat format with `<|image_N|>` tags, as the reference processor takes it.
        Returns a Completion, or a list of `n` Completions (choice order) when `sampling_params.n > 1`.
        `generate(prompt, SamplingParams(...))` (no images) works too."""
        images, sampling_params = _images_and_params(images, sampling_params)
        return self._one(self.prepare(prompt, images, sampling_params, num_crops))

    def chat(self, messages: list[dict[str, Any]], sampling_params: SamplingParams | None = None,
             num_crops: int | None = None) -> Any:
        """A Completion, or a list of `n` Completions when `sampling_params.n > 1` (see `generate`)."""
        return self._one(self.prepare_chat(messages, sampling_params, num_crops))

    def stream(self, prompt_or_messages: str | list[dict[str, Any]], images: list[Any] | None = None,
               sampling_params: SamplingParams | None = None, num_crops: int | None = None) -> Iterator[str]:
        """Text deltas as they are generated: a prompt string (with `images`) or chat messages (n = 1 only).
        `stream(messages, SamplingParams(...))` works: a SamplingParams in the place of `images` is taken as the
        sampling parameters."""
        images, sampling_params = _images_and_params(images, sampling_params)
        if sampling_params is not None and sampling_params.n != 1:
            raise ValueError("stream() generates one answer: use n=1 (chat/generate/run take n > 1)")
        if isinstance(prompt_or_messages, str):
            req = self.prepare(prompt_or_messages, images, sampling_params, num_crops)
        else:
            if images:
                raise ValueError("pass images inside the messages, not as `images`, when streaming a chat")
            req = self.prepare_chat(prompt_or_messages, sampling_params, num_crops)
        self.last_completion: Completion | None = None
        for _i, delta, done in self.run([req]):
            if isinstance(done, Exception):
                raise done
            if delta:
                yield delta
            if done is not None:
                self.last_completion = done

    def generate_many(self, requests: Sequence[PreparedRequest | Callable[[], PreparedRequest]],
                      workers: int | None = None) -> list[Completion]:
        """Several requests batched together by the engine; results in input order. Callables are
        prepared on a thread pool of `workers` threads while the engine runs (see `run`). A request that
        failed (its preparation returned an Exception, or the engine failed it) has that exception in place
        of its Completion; the others are unaffected. A request with `n > 1` has the list of its n Completions."""
        out: list[Any] = [None] * len(requests)
        for i, _delta, done in self.run(requests, workers):
            if isinstance(done, Completion) and (done.index > 0 or isinstance(out[i], list)):
                out[i] = out[i] if isinstance(out[i], list) else [out[i]]
                out[i].extend([None] * (done.index + 1 - len(out[i])))
                out[i][done.index] = done
            elif done is not None:
                out[i] = done
        return out



def _images_and_params(images: Any, params: SamplingParams | None) -> tuple[Any, SamplingParams | None]:
    """A SamplingParams passed positionally where `images` stands (`stream(messages, SamplingParams())`) is
    taken as the sampling parameters."""
    if isinstance(images, SamplingParams):
        if params is not None:
            raise TypeError("SamplingParams given twice: pass images as a list, or sampling_params once")
        return None, images
    return images, params


class _Prefetch:
    """A list-like view of `requests` as futures, submitting callables to `pool` only up to `window`
    items past the highest index asked for (preparation stays a bounded distance ahead)."""

    def __init__(self, pool: ThreadPoolExecutor, requests: Sequence[Any], window: int) -> None:
        self.pool, self.requests, self.window = pool, requests, window
        self.futs: list[Future] = []

    def __len__(self) -> int:
        return len(self.requests)

    def __getitem__(self, i: int) -> Future:
        while len(self.futs) < min(len(self.requests), i + 1 + self.window):
            r = self.requests[len(self.futs)]
            self.futs.append(self.pool.submit(r) if callable(r) else _done_future(r))
        return self.futs[i]

    def release(self, i: int) -> None:
        """Drop item i (consumed): over thousands of requests, the prepared crops must not pile up."""
        self.futs[i] = None  # type: ignore[call-overload]

    def cancel(self) -> None:
        for f in self.futs:
            if f is not None:
                f.cancel()


def _done_future(value: Any) -> Future:
    f: Future = Future()
    f.set_result(value)
    return f
