"""The engine: token ids + image crops in, token ids out, many requests at once.

`step()` = `schedule()` (the Scheduler: which sequences prefill which token ranges, or decode, with which KV
blocks) -> execute (the ModelRunner: features, forwards, sampling on the device) -> `_commit` (tokens appended,
finishes, grammar state). Decode steps may run one ahead on CUDA (see `_step`). The engine never sees text or
PIL images: stop strings live in the request driver (phi3v/driver.py), which aborts a request when its text
hits one. docs/architecture.md follows a request through these types.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import time
from dataclasses import dataclass, field

import torch

from phi3v.config import Phi3VConfig
from phi3v.device import setup_cpu_threads
from phi3v.engine.config import EngineConfig
from phi3v.engine.grammar import Grammars
from phi3v.engine.images import ImageInput
from phi3v.engine.kv_cache import KVCache, kv_storage_dtype
from phi3v.engine.model_runner import ModelRunner, Sampled
from phi3v.engine.scheduler import Scheduler
from phi3v.engine.sequence import Sequence, Status
from phi3v.sampling_params import SamplingParams

log = logging.getLogger("phi3v.engine")


@dataclass
class StepOutput:
    rid: str
    token_ids: list[int]
    finished: bool = False
    finish_reason: str | None = None  # stop, length, abort, or error (then `error` says why)
    logprobs: list[tuple[int, float, list[tuple[int, float]]]] = field(default_factory=list)
    cached_tokens: int = 0  # prompt tokens the prefix cache supplied
    error: str | None = None


class Engine:
    def __init__(self, model: torch.nn.Module, config: Phi3VConfig, options: EngineConfig | None = None, *,
                 grammars: Grammars | None = None) -> None:
        """model: the loaded Phi3VForCausalLM; config: its configuration; options: the engine's switches;
        grammars: the token table for structured output (None: constrained requests are refused)."""
        self.model, self.cfg, self.grammars = model, config, grammars
        self.options = o = options or EngineConfig()
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        if self.device.type == "cpu":
            setup_cpu_threads(o.cpu_threads, config.hidden_size)
        max_len = min(o.max_model_len or 16384, config.max_position_embeddings)
        kv_dtype = kv_storage_dtype(o.kv_cache_dtype, self.dtype)
        bpt = KVCache.bytes_per_token(config.num_hidden_layers, config.num_key_value_heads, config.head_dim, kv_dtype)
        budget = o.kv_budget_bytes
        if budget is None:
            if self.device.type == "cuda":
                free, _total = torch.cuda.mem_get_info(self.device)
                budget = int(free * o.gpu_memory_utilization) - (2 << 30)  # headroom for activations
            else:
                budget = 2 << 30
        bs = o.kv_block_size
        max_blocks = -(-max_len // bs)  # block-table width: one sequence of max_len tokens
        # no more blocks than max_num_seqs full-length sequences can use
        n_blocks = min(budget // (bs * bpt), o.max_num_seqs * max_blocks)
        if n_blocks < max_blocks:
            raise ValueError(f"KV memory budget of {budget / 2**30:.2f} GiB does not fit one sequence of "
                             f"{max_len} tokens: lower max_model_len or raise gpu_memory_utilization")
        self.cache = KVCache(config.num_hidden_layers, n_blocks, bs, config.num_key_value_heads,
                             config.head_dim, self.device, self.dtype, kv_dtype)
        # launch decode step t+1 before reading step t's tokens (CUDA only). A step can run ahead only while every
        # row has a block for its next position: rows are given a block's worth of positions ahead whenever they
        # grow, so that the host resynchronises (to schedule) about once per block_size steps, not at every step
        # where some row crosses into a new block.
        self.run_ahead = self.device.type == "cuda" and o.run_ahead
        self.sched = Scheduler(o.max_num_seqs, max_len, n_blocks, bs, max_prefill_tokens=max(o.prefill_chunk, o.long_prefill_chunk),
                               enable_prefix_caching=o.enable_prefix_caching, lookahead=bs if self.run_ahead else 0,
                               long_rope_after=config.original_max_position_embeddings if config.rope_type else None)
        # host wall time per kind of step (prefill steps end with a sync, decode steps with the token copy)
        self.stats = {"image_cache_hits": 0, "images_encoded": 0, "prefill_tokens": 0, "decode_steps": 0,
                      "batched_prefills": 0, "prefill_steps": 0, "prefill_s": 0.0, "decode_s": 0.0, "decode_rows": 0}
        self.runner = ModelRunner(model, config, o, self.cache, max_blocks, self.stats, grammars)
        self._ahead: tuple[list[Sequence], torch.Tensor] | None = None  # rows, logits of a launched forward

    # ---------------------------------------------------------------- what callers read
    @property
    def max_model_len(self) -> int:
        return self.sched.max_model_len

    @property
    def max_num_seqs(self) -> int:
        return self.sched.max_num_seqs

    @property
    def num_running(self) -> int:
        return len(self.sched.running)

    @property
    def num_waiting(self) -> int:
        return len(self.sched.waiting)

    @property
    def kv_usage(self) -> float:
        """Fraction of KV blocks held by requests."""
        return self.sched.kv_usage

    @property
    def kv_tokens(self) -> int:
        """Tokens whose K/V running requests hold."""
        return sum(s.num_computed for s in self.sched.running)

    @property
    def prefix_cache_hit_rate(self) -> float:
        """Prompt tokens taken from the prefix cache / prompt tokens admitted, since start."""
        pool = self.sched.pool
        return pool.hits / pool.queries if pool.queries else 0.0

    @property
    def num_preemptions(self) -> int:
        return self.sched.num_preemptions

    def has_unfinished(self) -> bool:
        return self.sched.num_unfinished > 0

    def pin_image(self, key: str) -> bool:
        """Keep this image's features cached until `unpin_image` (a request prepared without its crops waits for
        them); False when they are not cached (or too many are pinned). Safe to call from another thread."""
        return self.runner.images.pin(key)

    def unpin_image(self, key: str) -> None:
        self.runner.images.unpin(key)

    def reset_prefix_cache(self) -> None:
        """Forget the prefix cache's contents (blocks held by running requests stay theirs)."""
        self.sched.pool.reset_cache()

    # ---------------------------------------------------------------- requests
    def add_request(self, prompt_ids: list[int], images: list[ImageInput] | None = None,
                    params: SamplingParams | None = None, rid: str | None = None) -> str:
        params = params or SamplingParams()
        images = list(images or [])
        n_img = len(images)
        for t in set(i for i in prompt_ids if i < 0):
            if -t > n_img:
                raise ValueError(f"prompt has placeholders for image {-t} but only {n_img} images were given")
        if any(i >= self.cfg.vocab_size for i in prompt_ids):
            raise ValueError(f"prompt has token ids >= vocab size {self.cfg.vocab_size}")
        params.check_vocab(self.cfg.vocab_size)
        for img in images:  # the prefix cache and the image cache name an image by its content
            if img.key is None:
                img.key = hashlib.blake2b(img.pixels().cpu().numpy().tobytes(), digest_size=16).hexdigest()
        rid = rid or self.sched.new_id()
        # unseeded sampling draws its seed from the OS: two runs of the same request differ (the seed is kept in
        # the Sequence, so a preempted request still resumes with the same tokens)
        seed = params.seed if params.seed is not None else secrets.randbits(63)
        seq = Sequence(rid=rid, prompt_ids=list(prompt_ids), params=params, images=images,
                       eos_ids=frozenset(self.cfg.eos_token_ids), seed=seed, lora=self.lora_index(params.lora))
        if params.constrained:
            if self.grammars is None:
                raise ValueError("structured output (json_schema / json_object) needs an engine built with a "
                                 "tokenizer's token table (Engine(..., grammars=Grammars.from_tokenizer(...)))")
            seq.grammar = self.grammars.matcher(params)
        self.sched.add(seq)
        return rid

    def lora_index(self, name: str | None) -> int:
        """The row index of per-request adapter `name` (0: the base model). ValueError for one not loaded."""
        loras = self.model.loras
        if name is not None and loras is None:
            raise ValueError(f"LoRA adapter {name!r} asked for, but no per-request adapters are loaded")
        return 0 if loras is None else loras.index(name)

    def abort(self, rid: str) -> bool:
        seq = self.sched.get(rid)
        if seq is None:
            return False
        self._free(seq, "abort")
        return True

    def _free(self, seq: Sequence, reason: str) -> None:
        # a run-ahead forward still in flight may write into these blocks: harmless, a new owner's
        # prefill is queued after it on the same stream (and decode positions are never in cached blocks)
        self.sched.finish(seq, reason)
        seq.images = [i.done() for i in seq.images]  # (pins of images never encoded released too)
        seq.features = seq.embeds = seq.seen = seq.counts = seq.grammar = None

    def _fail(self, seq: Sequence, error: str) -> StepOutput:
        seq.error = error
        self._free(seq, "error")
        return StepOutput(seq.rid, [], True, "error", error=error)

    # ---------------------------------------------------------------- warm-up
    @torch.inference_mode()
    def warmup(self) -> int:
        """Capture every CUDA graph the engine may need now (decode batch buckets up to max_num_seqs, prefill
        length buckets, vision chunk sizes), then on CUDA a few blank requests (`warmup_requests`), so that no
        request waits for a capture, a Triton compile, a cuDNN plan or a first kernel load mid-run. Returns how
        many graphs were captured (0 without graphs, e.g. on the CPU)."""
        n = self.runner.capture_graphs(self.sched.max_num_seqs)
        if self.device.type == "cuda":  # (on a CPU, 2,500 tokens of the real model take seconds)
            self.warmup_requests()
        return n

    def warmup_requests(self, grids: tuple[tuple[int, int], ...] = ((4, 4), (1, 2), (1, 2))) -> None:
        """Run a few blank requests through every step once (an image of each h x w crop grid, 2 tokens each):
        kernels that only real requests use (the projector, the embedding merge, eager and batched prefill,
        sampling) are loaded here, not by the first user, whose first token would otherwise wait for them
        (docs/perf-log.md). Leaves no trace: the blocks, the prefix and image caches and the stats are as
        before."""
        if self.has_unfinished():
            raise RuntimeError("warm-up requests need an idle engine")
        stats, pool = dict(self.stats), self.sched.pool
        caching, pool.enable_caching = pool.enable_caching, False
        counts = pool.hits, pool.queries
        vc = self.cfg.vision
        s = vc.image_size
        imgs = [ImageInput(torch.zeros(1 + h * w, vc.num_channels, s, s, dtype=self.dtype, device=self.device),
                           (h * s, w * s), f"phi3v-warmup-{h}x{w}") for h, w in grids]
        try:
            self.runner.images.encode(imgs, self.stats)
            params = SamplingParams(max_tokens=2, ignore_eos=True)
            for i, img in enumerate(imgs):  # <s> image tokens "\n": what the chat template gives, give or take text
                n = self.runner.images[img.key].shape[0]
                if n + 4 <= self.max_model_len:
                    self.add_request([1] + [-1] * n + [13], [img], params, rid=f"phi3v-warmup-{i}")
            self.run_to_completion()
        finally:
            pool.enable_caching = caching
            pool.hits, pool.queries = counts
            for img in imgs:
                self.runner.images.cache.pop(img.key, None)
            self.stats.clear()
            self.stats.update(stats)

    # ---------------------------------------------------------------- the step
    def step(self) -> list[StepOutput]:
        """Advance every running request by one token, or prefill scheduled chunks. A sequence whose work
        fails finishes with finish_reason "error"; the others go on. A step that raises (a bug) leaves
        nothing in flight, so the caller can fail its requests and go on."""
        t = time.perf_counter()
        try:
            out, kind = self._step()
            self.stats[kind] += time.perf_counter() - t
            return out
        except BaseException:
            self._ahead = None
            self.runner.forget()
            raise

    @torch.inference_mode()
    def _step(self) -> tuple[list[StepOutput], str]:
        """One step; see `step`. Returns the outputs and the stats key of the step's kind.

        Run ahead: before the host reads decode step t's tokens (the step's one device-to-host copy), the
        forward of step t+1 is already launched with those tokens still on the device, so the GPU does not
        idle while the host does its bookkeeping (grammar masks included: step t+1 is sampled only in the
        next call, once the host has seen token t). A request that finishes at step t has computed one
        wasted forward row, which is dropped."""
        if self._ahead is not None:
            rows, logits = self._ahead
            self._ahead = None
            sampled = self.runner.sample(rows, logits)
            self._maybe_run_ahead(sampled)
            return self._commit(sampled), "decode_s"
        batch = self.sched.schedule()
        if batch.prefills:
            self.stats["prefill_steps"] += 1
            rows, logits, failed = self.runner.prefill(batch.prefills)
            for c in batch.prefills:
                if c.seq not in failed:
                    self.sched.computed(c)
            outs = [self._fail(s, err) for s, err in failed.items()]
            if rows:
                outs += self._commit(self.runner.sample(rows, logits))
            return outs, "prefill_s"
        if not batch.decodes:
            return [], "decode_s"
        rows = batch.decodes
        try:
            logits = self.runner.decode(rows)
        except Exception as e:  # noqa: BLE001 - a batched forward: its rows fail, the engine goes on
            self.runner.forget()
            return [self._fail(s, f"{type(e).__name__}: {e}") for s in rows], "decode_s"
        sampled = self.runner.sample(rows, logits)
        self._maybe_run_ahead(sampled)
        return self._commit(sampled), "decode_s"

    def _maybe_run_ahead(self, sampled: Sampled) -> None:
        """Launch the next decode forward now, feeding `sampled`'s device tokens, when nothing can change the
        batch before it: the same rows still decode, nothing waits for a prefill, and every row has room
        (a block for the next position, not its last token, no LongRoPE recompute due)."""
        rows = sampled.rows
        if not self.run_ahead or rows != [s for s in self.sched.running if s.decoding] or self.sched.has_prefill_work():
            return
        bs, cross = self.sched.block_size, self.sched.long_rope_after
        for s in rows:
            if s.num_tokens + 2 >= s.max_len or len(s.blocks) * bs <= s.num_tokens:
                return
            if cross is not None and not s.long_rope and s.num_tokens + 1 > cross:
                return
        try:
            self._ahead = (rows, self.runner.decode(rows, sampled.tokens))
        except Exception:  # noqa: BLE001 - the next step's own decode redoes it from the host state, isolated
            log.warning("a run-ahead decode could not be launched: resynchronising", exc_info=True)
            self.runner.forget()

    def _commit(self, sampled: Sampled) -> list[StepOutput]:
        """The host side of a step: read the tokens, append, finish. Rows that finished or were aborted since
        the step was launched are skipped."""
        toks, packed = sampled.read()
        outs = []
        for i, (seq, tok) in enumerate(zip(sampled.rows, toks)):
            if seq.status is not Status.RUNNING:
                continue
            seq.num_computed = seq.num_tokens  # the forward computed the last position's K/V
            seq.output_ids.append(tok)
            if seq.seen is not None:
                seq.seen[tok] = True
            if seq.counts is not None:
                seq.counts[tok] += 1
            out = StepOutput(seq.rid, [tok], cached_tokens=seq.num_cached)
            if seq.params.logprobs is not None:
                lp = packed[i]
                top = [(int(lp[j, 1]), float(lp[j, 0])) for j in range(1, 1 + seq.params.logprobs)]
                out.logprobs.append((tok, float(lp[0, 0]), top))
            m = seq.grammar
            reason = "stop" if m is not None and self.grammars.accept(m, tok) else seq.check_finish()
            if reason:
                out.finished, out.finish_reason = True, reason
                self._free(seq, reason)
            outs.append(out)
        return outs

    # ---------------------------------------------------------------- convenience
    def run_to_completion(self) -> dict[str, list[int]]:
        """Drive all requests to the end; return generated ids per request id."""
        done: dict[str, list[int]] = {}
        while self.has_unfinished():
            for o in self.step():
                done.setdefault(o.rid, []).extend(o.token_ids)
        return done
