"""The model runner: a scheduled step's tensors in, logits and sampled tokens out.

Owns the KV cache, the image features of running sequences, tensor preparation (embeddings, cache slots, block
tables), the prefill and decode forwards with their CUDA graphs, and sampling. It never decides who runs (the
scheduler) nor what a token means for a request (the engine's commit).

A failure is pinned on the sequences it belongs to: preparing one sequence (its images, its embeddings) fails
that sequence alone, and a batched prefill that fails is retried one sequence at a time, so that only the
culprit fails. A failing decode forward fails its rows (nothing narrower can be known).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

from phi3v.config import Phi3VConfig
from phi3v.device import to_device
from phi3v.engine.config import EngineConfig
from phi3v.engine.grammar import Grammars
from phi3v.engine.graphs import DecodeRunner, PrefillRunner, SuffixRunner, VisionRunner
from phi3v.engine.images import ImageFeatures
from phi3v.engine.kv_cache import DecodeKernelOptions, KVCache, PrefillKernelOptions
from phi3v.engine.prefill import Prefiller
from phi3v.engine.sampler import SamplingTensors, sample, top_logprobs
from phi3v.engine.scheduler import PrefillChunk
from phi3v.engine.sequence import Sequence, Status
from phi3v.kernels import available, paged_prefill

log = logging.getLogger("phi3v.engine")


@dataclass
class Sampled:
    """A step's sampled tokens: on the device (fed to a run-ahead step) and on their way to the host."""

    rows: list[Sequence]
    tokens: torch.Tensor  # (n,) on the device
    host_tokens: torch.Tensor  # (n,) pinned CPU (or the device tensor off CUDA)
    host_logprobs: torch.Tensor | None  # (n, 1+k, 2) logprob / id of the sampled and top tokens
    done: torch.cuda.Event | None  # recorded after the copies (CUDA)

    def read(self) -> tuple[list[int], torch.Tensor | None]:
        if self.done is not None:
            self.done.synchronize()
        return self.host_tokens.tolist(), None if self.host_logprobs is None else self.host_logprobs.cpu()


class ModelRunner:
    def __init__(self, model: torch.nn.Module, config: Phi3VConfig, options: EngineConfig, cache: KVCache,
                 max_blocks: int, stats: dict[str, Any], grammars: Grammars | None) -> None:
        self.model, self.cfg, self.cache, self.stats, self.grammars = model, config, cache, stats, grammars
        self.lora = model.loras is not None  # per-request LoRA adapters: rows carry their index
        self.device = cache.k.device
        cuda = self.device.type == "cuda"
        model.set_kernels(fused=options.fused_kernels and available(self.device), pdl=options.pdl)
        kernel = DecodeKernelOptions(pdl=options.pdl, attn_configs=dict(options.attn_configs))
        self.decoder = DecodeRunner(model, cache, max_blocks, options.cuda_graphs, kernel)
        self.prefill_graphs = PrefillRunner(model, cache, self.decoder.use_graphs)
        self.suffix = SuffixRunner(model, cache, max_blocks, self.decoder.use_graphs)
        vision_graphs = (cuda if options.cuda_graphs is None else options.cuda_graphs) and options.vision_graphs
        self.vision = VisionRunner(model.model.vision_embed_tokens.img_processor, self.device, vision_graphs)
        self.images = ImageFeatures(model, self.vision, self.device, options.image_cache_size)
        self.prefill_kernel = PrefillKernelOptions(options.paged_prefill, dict(options.prefill_attn_configs))
        self.prefiller = Prefiller(model, cache, self.prefill_graphs, options.prefill_chunk, stats, self.prefill_kernel,
                                   options.long_prefill_chunk, self.suffix if self._suffix_graphs(options) else None)
        self.time_phases = False  # benchmarks: sync around the prefill phases and add their times to stats
        self._bt_cache: tuple[tuple[tuple[Sequence, int, int], ...], torch.Tensor] | None = None
        self._samp_cache: tuple[Any, ...] | None = None

    def _suffix_graphs(self, options: EngineConfig) -> bool:
        """Whether a short chunk after cached positions replays as a SuffixRunner graph: it needs the Triton kernels
        (and a prefix cache to make such chunks common); per-request LoRA adapters and the paged prefill kernel
        switched off keep every such chunk eager."""
        return (self.cache.triton and options.enable_prefix_caching and options.paged_prefill != "off"
                and not self.lora)

    # ---------------------------------------------------------------- prefill
    def prefill(self, chunks: list[PrefillChunk]) -> tuple[list[Sequence], torch.Tensor | None, dict[Sequence, str]]:
        """Run the chunks. Returns (the sequences whose prefill ends here, their last logits (n, V), failures)."""
        failed: dict[Sequence, str] = {}
        self._phase("vision_s", lambda: self._features([c.seq for c in chunks if c.start < c.seq.image_end], failed))
        for c in chunks:
            if c.start >= c.seq.image_end:
                self._keep_cached_features(c.seq)
        embs = {}
        for c in chunks:
            if c.seq not in failed:
                self._guard(c.seq, failed, lambda c=c: embs.__setitem__(c.seq, self._embeds(c)))
        ok = [c for c in chunks if c.seq not in failed]
        whole = [c for c in ok if c.start == 0 and c.last]
        logits: dict[Sequence, torch.Tensor] = {}

        def run() -> None:
            if whole:
                self._prefill_whole([c.seq for c in whole], [embs[c.seq] for c in whole], logits, failed)
            for c in ok:
                if not (c.start == 0 and c.last):
                    self._guard(c.seq, failed, lambda c=c: self._store(
                        logits, c.seq, self.prefiller.prefill_range(c.seq, embs[c.seq], c.start, c.last)))

        self._phase("decoder_prefill_s", run)
        rows = [c.seq for c in ok if c.last and c.seq in logits]
        return rows, (torch.cat([logits[s] for s in rows], 0) if rows else None), failed

    def _prefill_whole(self, seqs: list[Sequence], embs: list[torch.Tensor], logits: dict, failed: dict) -> None:
        def together() -> None:
            for s, lg in zip(seqs, self.prefiller.prefill_many(seqs, embs)):
                logits[s] = lg[None]

        alone = dict(zip(seqs, embs))
        self._together_or_alone(seqs, failed, together,
                                lambda s: self._store(logits, s, self.prefiller.prefill_range(s, alone[s], 0, True)))

    def _together_or_alone(self, seqs: list[Sequence], failed: dict[Sequence, str], together: Callable[[], Any],
                           alone: Callable[[Sequence], Any]) -> None:
        """`together()` does the work of all `seqs` at once; if it raises, `alone(s)` redoes it for each, so that a
        failure is pinned on its own sequence (a single sequence fails at once)."""
        if len(seqs) == 1:
            self._guard(seqs[0], failed, together)
            return
        try:
            together()
        except Exception as e:  # noqa: BLE001 - pinned on a sequence below
            log.warning("work of %d sequences failed together (%s): retrying one at a time", len(seqs), _describe(e))
            for s in seqs:
                self._guard(s, failed, lambda s=s: alone(s))

    @staticmethod
    def _store(logits: dict, seq: Sequence, lg: torch.Tensor | None) -> None:
        if lg is not None:
            logits[seq] = lg

    def _features(self, seqs: list[Sequence], failed: dict[Sequence, str]) -> None:
        """Projected features of every image of `seqs` that holds none yet (encoded together, cache first);
        each sequence holds its own until it finishes, so that a recompute never needs the crops again. `seqs`:
        those with image tokens left to compute (a prefix-cache hit past the last image needs no features)."""
        todo = [s for s in seqs if s.features is None and s.images]
        if not todo:
            return

        def together() -> None:
            self.images.encode([i for s in todo for i in s.images], self.stats)
            for s in todo:
                self._take_features(s)

        # each takes its features right after its own encode: a later one may evict what this one made
        self._together_or_alone(todo, failed, together,
                                lambda s: (self.images.encode(s.images, self.stats), self._take_features(s)))

    def _take_features(self, s: Sequence) -> None:
        s.features = [self.images[i.key] for i in s.images]
        s.images = [i.done() for i in s.images]  # the crops are never read again: their memory goes

    def _keep_cached_features(self, s: Sequence) -> None:
        """A sequence whose images the prefix cache covered needs no features now, but a recompute (preempted, its
        blocks evicted) would: it takes them if the image cache has them, and lets its crops go; else it keeps
        its crops (or the loader of an image prepared without them)."""
        if s.features is None and s.images and all(i.key in self.images for i in s.images):
            self._take_features(s)

    def _embeds(self, c: PrefillChunk) -> torch.Tensor:
        """(end-start, hidden) input embeddings of the chunk. A sequence prefilled in several chunks keeps its
        embeddings from `embeds_from` on until its last chunk."""
        s = c.seq
        if s.embeds is None or c.start < s.embeds_from:  # (the latter: preempted mid-prompt, its cached prefix gone)
            # from the first position computed on when no image token lies past it (a prefix-cache hit that
            # covers the images: no features needed), else from 0 (placeholders are numbered per prompt)
            s.embeds_from = c.start if c.start >= s.image_end else 0
            ids = torch.tensor(s.all_ids[s.embeds_from:])  # on the CPU: placeholder bookkeeping without a device sync
            feats = (s.features or []) if s.embeds_from == 0 else []
            full = self._phase("embeds_s", lambda: self.model.embed(ids, feats))  # (num_tokens - embeds_from, hidden)
            if c.start == s.embeds_from and c.last:
                return full
            s.embeds = full
        part = s.embeds[c.start - s.embeds_from: c.end - s.embeds_from]
        if c.last:
            s.embeds = None
        return part

    def _guard(self, seq: Sequence, failed: dict[Sequence, str], fn: Callable[[], Any]) -> None:
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - the sequence fails, the step goes on
            log.warning("request %s failed in the engine: %s", seq.rid, _describe(e), exc_info=True)
            failed[seq] = _describe(e)

    def _phase(self, name: str, fn: Callable[[], Any]) -> Any:
        if not self.time_phases:
            return fn()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        t = time.perf_counter()
        out = fn()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.stats[name] = self.stats.get(name, 0.0) + time.perf_counter() - t
        return out

    # ---------------------------------------------------------------- decode
    def decode(self, rows: list[Sequence], ahead: torch.Tensor | None = None) -> torch.Tensor:
        """One token for each row (in order). Returns logits (n, V).

        `ahead`: the (n,) device tokens of a step not yet committed on the host; this step then feeds them,
        one position further than the host state says."""
        d = 0 if ahead is None else 1
        # one host-to-device copy of the step's inputs: (3, n) int64 = last token, position, long flag
        # (+ each row's LoRA adapter when per-request adapters are loaded)
        host = [[s.output_ids[-1] if d == 0 else 0 for s in rows], [s.num_tokens - 1 + d for s in rows],
                [int(s.long_rope) for s in rows]] + ([[s.lora for s in rows]] if self.lora else [])
        dev = to_device(torch.tensor(host, dtype=torch.long), self.device)
        tokens = dev[0] if ahead is None else ahead
        logits = self.decoder.decode(tokens, dev[1], dev[2].bool(), self._block_table(rows),
                                     max(s.num_tokens for s in rows) + d, dev[3] if self.lora else None)
        self.stats["decode_steps"] += 1
        self.stats["decode_rows"] += len(rows)
        return logits

    def _block_table(self, rows: list[Sequence]) -> torch.Tensor:
        """(n, max_blocks) int32 on the device; rebuilt only when the rows or their block tables change (a table
        only grows, until it is dropped whole: its epoch and length name it)."""
        key = tuple((s, s.blocks_epoch, len(s.blocks)) for s in rows)
        if self._bt_cache is None or self._bt_cache[0] != key:
            bt = torch.full((len(rows), self.decoder.max_blocks), self.cache.scratch, dtype=torch.int32)
            for i, s in enumerate(rows):
                bt[i, : len(s.blocks)] = torch.tensor(s.blocks, dtype=torch.int32)
            self._bt_cache = (key, to_device(bt, self.device))
        return self._bt_cache[1]

    # ---------------------------------------------------------------- sampling
    def sample(self, rows: list[Sequence], logits: torch.Tensor) -> Sampled:
        """Sample on the device and start the copy of the tokens (and logprobs) to the host. The host state
        of `rows` is up to date here (a run-ahead step runs only the forward early), so grammar masks and
        penalties see every earlier token. Rows finished since the forward was launched are sampled without
        constraints and dropped at commit."""
        params = [s.params for s in rows]
        constrained = [(i, s.grammar) for i, s in enumerate(rows) if s.grammar is not None
                       and s.status is Status.RUNNING]
        if not constrained and all(p.plain_argmax for p in params):
            tokens = logits.argmax(dim=-1)  # the common case: no parameter tensors to build
        else:
            # structured output: the constrained rows' allowed-token masks, filled on the CPU first,
            # while the device still runs the forward (the parameter tensors below wait for it)
            masks = self.grammars.fill_masks(constrained, len(rows), self.device) if constrained else None
            t, steps = self._sampling_tensors(rows)
            seen = torch.stack([self._seen(s) for s in rows]) if t.any_penalty else None
            counts = torch.stack([self._counts(s) for s in rows]) if t.any_counts else None
            tokens = sample(logits, t, steps, seen, masks, counts)
        want_lp = any(p.logprobs is not None for p in params)
        packed = top_logprobs(logits, tokens, max((p.logprobs or 0) for p in params)) if want_lp else None
        if self.device.type != "cuda":
            return Sampled(rows, tokens, tokens, packed, None)
        # non-blocking copies into pinned memory + an event: the host waits for this step only,
        # not for a step launched after it
        host_tok = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True).copy_(tokens, non_blocking=True)
        host_lp = None if packed is None else torch.empty(packed.shape, pin_memory=True).copy_(packed, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        return Sampled(rows, tokens, host_tok, host_lp, done)

    def _sampling_tensors(self, rows: list[Sequence]) -> tuple[SamplingTensors, torch.Tensor]:
        """Per-row parameter tensors, rebuilt only when the batch changes; the per-row step counters then
        advance on the device (no host-to-device copy in a steady decode)."""
        key = tuple(rows)
        steps_now = [len(s.output_ids) for s in rows]
        cached = self._samp_cache
        if cached is not None and cached[0] == key and cached[3] == [n - 1 for n in steps_now]:
            t, steps = cached[1], cached[2].add_(1)
        else:
            t = SamplingTensors.build([s.params for s in rows], [s.seed for s in rows], self.device)
            steps = to_device(torch.tensor(steps_now, dtype=torch.int64), self.device)
        self._samp_cache = (key, t, steps, steps_now)
        return t, steps

    def _seen(self, seq: Sequence) -> torch.Tensor:
        if seq.status is not Status.RUNNING:  # a finished row of a run-ahead step: its sample is dropped
            return torch.zeros(self.cfg.vocab_size, dtype=torch.bool, device=self.device)
        if seq.seen is None:
            seen = torch.zeros(self.cfg.vocab_size, dtype=torch.bool, device=self.device)
            ids = [i for i in seq.all_ids if i >= 0]
            seen[to_device(torch.tensor(ids, dtype=torch.long), self.device)] = True
            seq.seen = seen
        return seq.seen

    def _counts(self, seq: Sequence) -> torch.Tensor:
        """(vocab,) float32 counts of the generated tokens (presence / frequency penalties), kept up to date by
        Engine._commit once made."""
        if seq.status is not Status.RUNNING:
            return torch.zeros(self.cfg.vocab_size, dtype=torch.float32, device=self.device)
        if seq.counts is None:
            ids = torch.tensor(seq.output_ids, dtype=torch.long)
            seq.counts = to_device(torch.bincount(ids, minlength=self.cfg.vocab_size).float(), self.device)
        return seq.counts

    def forget(self) -> None:
        """Drop per-batch caches (after a failed step: nothing of it may be reused)."""
        self._bt_cache = self._samp_cache = None

    # ---------------------------------------------------------------- warm-up
    def capture_graphs(self, max_num_seqs: int) -> int:
        """Capture every CUDA graph the runner may need (decode batch buckets, prefill length buckets,
        vision chunk sizes). Returns how many were captured (0 without graphs)."""
        n = self.decoder.warmup(max_num_seqs)
        n += self.prefill_graphs.warmup(self.cfg.hidden_size, self.model.dtype)
        if self.prefiller.suffix is not None:
            n += self.suffix.warmup(self.cfg.hidden_size, self.model.dtype)
        vc = self.cfg.vision
        crop = torch.zeros(1, vc.num_channels, vc.image_size, vc.image_size, dtype=self.model.dtype,
                           device=self.device)
        n += self.vision.warmup(crop)  # crop: one crop's shape and dtype
        if self.cache.triton and self.device.type == "cuda" and self.prefill_kernel.mode != "off":
            # the paged prefill kernel's Triton compile, not the first long prompt's
            paged_prefill.warmup(self.cache.k[0], self.cache.v[0], self.cfg.num_attention_heads, self.model.dtype,
                                 self.prefill_kernel.configs)
        return n


def _describe(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"
