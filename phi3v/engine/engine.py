"""The engine: token ids + image crops in, token ids out, many requests at once.

Data flow of one `step()`: the scheduler admits waiting requests whose KV blocks are free;
admitted requests are prefilled (vision tower batched over all their images not already in the
image-embedding cache, then the decoder over the prompts, similar lengths batched, long ones in
chunks) and sample their first token; otherwise every running request decodes one token in a
single batched forward, each row attending over its own blocks. Sampling runs on the device; the
only device-to-host copy of a step is the sampled ids (plus logprobs when asked). Finished
requests return their blocks. The engine never sees text or PIL images: stop strings live in the API layer,
which aborts a request when its text hits one.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from phi3v.config import Phi3VConfig
from phi3v.engine.grammar import Grammars
from phi3v.engine.images import ImageFeatures, ImageInput
from phi3v.engine.config import EngineConfig
from phi3v.engine.kv_cache import DecodeKernelOptions, KVCache, kv_storage_dtype
from phi3v.engine.prefill import Prefiller
from phi3v.engine.runner import DecodeRunner, PrefillRunner, VisionRunner
from phi3v.engine.sampler import SamplingTensors, sample, top_logprobs
from phi3v.sampling_params import SamplingParams
from phi3v.engine.scheduler import RUNNING, Scheduler, Sequence
from phi3v.device import to_device
from phi3v.kernels import available


@dataclass
class StepOutput:
    rid: str
    token_ids: list[int]
    finished: bool = False
    finish_reason: str | None = None
    logprobs: list[tuple[int, float, list[tuple[int, float]]]] = field(default_factory=list)


class Engine:
    def __init__(self, model: torch.nn.Module, config: Phi3VConfig, options: EngineConfig | None = None, *,
                 grammars: Grammars | None = None) -> None:
        """model: the loaded Phi3VForCausalLM; config: its configuration; options: the engine's switches;
        grammars: the token table for structured output (None: constrained requests are refused)."""
        self.model, self.cfg = model, config
        self.options = o = options or EngineConfig()
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
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
        block_size = o.kv_block_size
        max_blocks = -(-max_len // block_size)  # block-table width: one sequence of max_len tokens
        # no more blocks than max_num_seqs full-length sequences can use
        n_blocks = min(budget // (block_size * bpt), o.max_num_seqs * max_blocks)
        if n_blocks < max_blocks:
            raise ValueError(f"KV memory budget of {budget / 2**30:.2f} GiB does not fit one sequence of "
                             f"{max_len} tokens: lower max_model_len or raise gpu_memory_utilization")
        self.cache = KVCache(config.num_hidden_layers, n_blocks, block_size, config.num_key_value_heads,
                             config.head_dim, self.device, self.dtype, kv_dtype)
        self.sched = Scheduler(o.max_num_seqs, max_len, n_blocks, block_size)
        triton = available(self.device)
        model.set_kernels(fused=o.fused_kernels and triton, pdl=o.pdl)
        kernel = DecodeKernelOptions(pdl=o.pdl, attn_configs=dict(o.attn_configs))
        self.runner = DecodeRunner(model, self.cache, max_blocks, o.cuda_graphs, kernel)
        self._bt_cache: tuple[tuple[Sequence, ...], torch.Tensor] | None = None  # device block table of a batch
        vision_graphs = ((self.device.type == "cuda") if o.cuda_graphs is None else o.cuda_graphs) and o.vision_graphs
        self.prefill_runner = PrefillRunner(model, self.cache, self.runner.use_graphs)
        self.vision_runner = VisionRunner(model.model.vision_embed_tokens.img_processor, self.device, vision_graphs)
        # launch decode step t+1 before reading step t's tokens (CUDA only)
        self.run_ahead = self.device.type == "cuda" and o.run_ahead
        self._ahead: tuple[list[Sequence], torch.Tensor] | None = None  # rows, logits of a launched forward
        self._samp_cache: tuple[Any, ...] | None = None
        self._last_kind = "decode"
        self.images = ImageFeatures(model, self.vision_runner, self.device, o.image_cache_size)
        self.grammars = grammars
        # host wall time per kind of step (prefill steps end with a sync, decode steps with the token copy)
        self.stats = {"image_cache_hits": 0, "images_encoded": 0, "prefill_tokens": 0, "decode_steps": 0,
                      "batched_prefills": 0, "prefill_steps": 0, "prefill_s": 0.0, "decode_s": 0.0, "decode_rows": 0}
        self.prefiller = Prefiller(model, self.cache, self.prefill_runner, o.prefill_chunk, self.stats)

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
        rid = rid or self.sched.new_id()
        seed = params.seed if params.seed is not None else int.from_bytes(hashlib.blake2b(rid.encode(), digest_size=8).digest(), "little") >> 1
        seq = Sequence(rid=rid, prompt_ids=list(prompt_ids), params=params, images=images,
                       eos_ids=frozenset(self.cfg.eos_token_ids), seed=seed)
        if params.constrained:
            if self.grammars is None:
                raise ValueError("structured output (json_schema / json_object) needs an engine built with a "
                                 "tokenizer's token table (Engine(..., grammars=Grammars.from_tokenizer(...)))")
            seq.state["grammar"] = self.grammars.matcher(params)
        self.sched.add(seq)
        return rid

    def warmup(self) -> int:
        """Capture every CUDA graph the engine may need now (decode batch buckets up to max_num_seqs, prefill
        length buckets, vision chunk sizes), then on CUDA a few blank requests (`warmup_requests`), so that no
        request waits for a capture, a Triton compile, a cuDNN plan or a first kernel load mid-run. Returns how many graphs were
        captured (0 without graphs, e.g. on the CPU)."""
        n = self.runner.warmup(self.sched.max_num_seqs)
        n += self.prefill_runner.warmup(self.cfg.hidden_size, self.dtype)
        vc = self.cfg.vision
        crop = torch.zeros(1, vc.num_channels, vc.image_size, vc.image_size, dtype=self.dtype, device=self.device)
        n += self.vision_runner.warmup(crop)  # crop: one crop's shape and dtype
        if self.device.type == "cuda":  # (on a CPU, 2,500 tokens of the real model take seconds)
            self.warmup_requests()
        return n

    def warmup_requests(self, grids: tuple[tuple[int, int], ...] = ((4, 4), (1, 2), (1, 2))) -> None:
        """Run a few blank requests through every step once (an image of each h x w crop grid, 2 tokens each):
        kernels that only real requests use (the projector, the embedding merge, eager and batched prefill,
        sampling) are loaded here, not by the first user (on a fresh H200 the first 16-crop request after the
        graph warm-up took 164-174 ms to its first token, the next ones 50: `benchmarks/ttft_lengths.py`).
        Leaves no trace: the blocks, the image cache and the stats are as before."""
        if self.has_unfinished():
            raise RuntimeError("warm-up requests need an idle engine")
        stats = dict(self.stats)
        vc = self.cfg.vision
        s = vc.image_size
        imgs = [ImageInput(torch.zeros(1 + h * w, vc.num_channels, s, s, dtype=self.dtype, device=self.device),
                           (h * s, w * s), f"phi3v-warmup-{h}x{w}") for h, w in grids]
        self.images.encode(imgs, self.stats)
        params = SamplingParams(max_tokens=2, ignore_eos=True)
        for i, img in enumerate(imgs):  # <s> image tokens "\n": what the chat template gives, give or take text
            n = self.images[img.key].shape[0]
            if n + 4 <= self.sched.max_model_len:
                self.add_request([1] + [-1] * n + [13], [img], params, rid=f"phi3v-warmup-{i}")
        self.run_to_completion()
        for img in imgs:
            self.images.cache.pop(img.key, None)
        self.stats.clear()
        self.stats.update(stats)

    def abort(self, rid: str) -> bool:
        seq = self.sched.get(rid)
        if seq is None:
            return False
        self._free(seq, "abort")
        return True

    def has_unfinished(self) -> bool:
        return self.sched.num_unfinished > 0

    @property
    def num_running(self) -> int:
        return len(self.sched.running)

    @property
    def num_waiting(self) -> int:
        return len(self.sched.waiting)

    def _free(self, seq: Sequence, reason: str) -> None:
        # a run-ahead forward still in flight may write into these blocks: harmless, a new owner's
        # prefill is queued after it on the same stream
        self.sched.finish(seq, reason)
        seq.state.clear()

    # ---------------------------------------------------------------- images
    def _prompt_embeds(self, seq: Sequence) -> torch.Tensor:
        ids = torch.tensor(seq.prompt_ids)  # on the CPU: placeholder bookkeeping without a device sync
        feats = [self.images[i.key] for i in seq.images]
        return self.model.embed(ids, feats)  # (L, hidden)

    # ---------------------------------------------------------------- forward passes
    def _full_embeds(self, seq: Sequence) -> torch.Tensor:
        prompt = seq.state.get("prompt_embeds")
        if prompt is None:
            prompt = self._prompt_embeds(seq)
        if not seq.output_ids:
            return prompt
        out = self.model.model.embed_tokens(to_device(torch.tensor(seq.output_ids), self.device))
        return torch.cat([prompt, out.to(prompt.dtype)], dim=0)

    def _decode(self, seqs: list[Sequence], ahead: torch.Tensor | None = None) -> torch.Tensor:
        """One token for each running sequence (rows in `seqs` order). Returns logits (n, V).

        `ahead`: the (n,) device tokens of a step not yet committed on the host; this step then
        feeds them, one position further than the host state says (see `step`)."""
        d = 0 if ahead is None else 1
        orig = self.cfg.original_max_position_embeddings
        # LongRoPE crossing (Phi-3.5 fix): the first step whose length exceeds original_max
        # recomputes the sequence's whole cache with long factors.
        cross = [s for s in seqs if not s.long_rope and self.cfg.rope_type and s.num_tokens > orig]
        # one host-to-device copy of the step's inputs: (3, n) int64 = last token, position, long flag
        host = torch.tensor([[s.output_ids[-1] if d == 0 else 0 for s in seqs], [s.num_tokens - 1 + d for s in seqs],
                             [int(s.long_rope) for s in seqs]], dtype=torch.long)
        dev = to_device(host, self.device)
        tokens = dev[0] if ahead is None else ahead
        logits = self.runner.decode(tokens, dev[1], dev[2].bool(), self._block_table(seqs),
                                    max(s.num_tokens for s in seqs) + d)
        for i, s in enumerate(seqs):
            if s in cross:
                logits[i] = self.prefiller.prefill_one(s, self._full_embeds(s), True)[0]
            s.state.pop("prompt_embeds", None)
        self.stats["decode_steps"] += 1
        self.stats["decode_rows"] += len(seqs)
        return logits

    def _block_table(self, seqs: list[Sequence]) -> torch.Tensor:
        """(n, max_blocks) int32 on the device; rebuilt only when the batch changes (a sequence's
        blocks are fixed from admission to finish)."""
        key = tuple(seqs)
        if self._bt_cache is None or self._bt_cache[0] != key:
            bt = torch.full((len(seqs), self.runner.max_blocks), self.cache.scratch, dtype=torch.int32)
            for i, s in enumerate(seqs):
                bt[i, : len(s.blocks)] = torch.tensor(s.blocks, dtype=torch.int32)
            self._bt_cache = (key, to_device(bt, self.device))
        return self._bt_cache[1]

    # ---------------------------------------------------------------- the step
    def step(self) -> list[StepOutput]:
        """Advance every request by one token (or prefill newly admitted ones). A step that raises
        leaves nothing in flight, so the caller can fail its requests and go on."""
        t = time.perf_counter()
        try:
            out = self._step()
            self.stats["prefill_s" if self._last_kind == "prefill" else "decode_s"] += time.perf_counter() - t
            return out
        except BaseException:
            self._ahead, self._samp_cache = None, None
            raise

    @torch.inference_mode()
    def _step(self) -> list[StepOutput]:
        """One step; see `step`.

        Decode steps run one ahead on CUDA: before the host reads step t's tokens (the step's one
        device-to-host copy), the forward of step t+1 is already launched with those tokens still
        on the device, so the GPU does not idle while the host does its bookkeeping (grammar
        masks included: step t+1 is sampled only in the next call, once the host has seen token t).
        A request that finishes at step t has computed one wasted forward row, which is dropped."""
        if self._ahead is not None:
            rows, logits = self._ahead
            self._ahead = None
            pending = self._sample_device(rows, logits)
            if self._can_run_ahead(rows):
                self._ahead = (rows, self._decode(rows, pending[0]))
            return self._commit(rows, pending)
        self._last_kind = "decode"
        admitted = self.sched.admit()
        if admitted:
            self._last_kind = "prefill"
            self.stats["prefill_steps"] += 1
            self.images.encode([img for seq in admitted for img in seq.images], self.stats)
            orig = self.cfg.original_max_position_embeddings
            embs, longs = [], []
            for seq in admitted:
                emb = self._prompt_embeds(seq)
                long_rope = bool(self.cfg.rope_type) and len(seq.prompt_ids) > orig
                if not long_rope and self.cfg.rope_type and len(seq.prompt_ids) + seq.params.max_tokens > orig:
                    seq.state["prompt_embeds"] = emb  # kept for the recompute at the crossing
                embs.append(emb)
                longs.append(long_rope)
            logits = self.prefiller.prefill_many(admitted, embs, longs)
            for seq in admitted:  # the crops are never read again: let their memory go (keys stay)
                seq.images = [ImageInput(i.crops.new_empty((0, *i.crops.shape[1:])), i.image_size, i.key)
                              for i in seq.images]  # (a view, crops[:0], would keep the storage)
            return self._commit(admitted, self._sample_device(admitted, logits))
        if not self.sched.running:
            return []
        rows = list(self.sched.running)
        pending = self._sample_device(rows, self._decode(rows))
        if self._can_run_ahead(rows):
            self._ahead = (rows, self._decode(rows, pending[0]))
        return self._commit(rows, pending)

    def _can_run_ahead(self, rows: list[Sequence]) -> bool:
        """May the next decode be launched before `rows`' in-flight tokens reach the host?"""
        if not self.run_ahead or rows != self.sched.running:
            return False  # something finished, was aborted or admitted: resynchronise
        if self.sched.can_admit():
            return False  # admit first
        orig = self.cfg.original_max_position_embeddings
        for s in rows:
            if s.num_tokens + 2 >= s.max_len or (self.cfg.rope_type and not s.long_rope and s.num_tokens + 1 > orig):
                return False  # the reserved KV's end, or a LongRoPE recompute, is one step away
        return True

    def _sample_device(self, rows: list[Sequence], logits: torch.Tensor) -> tuple[Any, ...]:
        """Sample on the device and start the copy of the tokens (and logprobs) to the host.
        The host state of `rows` is up to date here (a run-ahead step runs only the forward early),
        so grammar masks and penalties see every earlier token. Rows finished since the forward
        was launched are sampled without constraints and dropped at commit."""
        params = [s.params for s in rows]
        constrained = [(i, s.state["grammar"]) for i, s in enumerate(rows) if "grammar" in s.state]
        if not constrained and all(p.greedy and p.repetition_penalty == 1.0 for p in params):
            tokens = logits.argmax(dim=-1)  # the common case: no parameter tensors to build
        else:
            # structured output: the constrained rows' allowed-token masks, filled on the CPU first,
            # while the device still runs the forward (the parameter tensors below wait for it)
            masks = self.grammars.fill_masks(constrained, len(rows), self.device) if constrained else None
            t, steps = self._sampling_tensors(rows)
            seen = torch.stack([self._seen(s) for s in rows]) if t.any_penalty else None
            tokens = sample(logits, t, steps, seen, masks)
        want_lp = any(p.logprobs is not None for p in params)
        packed = top_logprobs(logits, tokens, max((p.logprobs or 0) for p in params)) if want_lp else None
        if self.device.type != "cuda":
            return tokens, tokens, packed, None
        # non-blocking copies into pinned memory + an event: the host waits for this step only,
        # not for a step launched after it
        host_tok = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True).copy_(tokens, non_blocking=True)
        host_lp = None if packed is None else torch.empty(packed.shape, pin_memory=True).copy_(packed, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        return tokens, host_tok, host_lp, done

    def _sampling_tensors(self, rows: list[Sequence]) -> tuple[SamplingTensors, torch.Tensor]:
        """Per-row parameter tensors, rebuilt only when the batch changes; the per-row step
        counters then advance on the device (no host-to-device copy in a steady decode)."""
        key = tuple(s.rid for s in rows)
        steps_now = [len(s.output_ids) for s in rows]
        cached = self._samp_cache
        if cached is not None and cached[0] == key and cached[3] == [n - 1 for n in steps_now]:
            t, steps = cached[1], cached[2].add_(1)
        else:
            t = SamplingTensors.build([s.params for s in rows], [s.seed for s in rows], self.device)
            steps = to_device(torch.tensor(steps_now, dtype=torch.int64), self.device)
        self._samp_cache = (key, t, steps, steps_now)
        return t, steps

    def _commit(self, rows: list[Sequence], pending: tuple[Any, ...]) -> list[StepOutput]:
        """The host side of a step: read the tokens, append, finish. Rows that finished or were
        aborted since the step was launched are skipped."""
        _dev, host_tok, host_lp, done = pending
        if done is not None:
            done.synchronize()
        toks = host_tok.tolist()
        packed = None if host_lp is None else host_lp.cpu()
        outs = []
        for i, (seq, tok) in enumerate(zip(rows, toks)):
            if seq.status != RUNNING:
                continue
            seq.output_ids.append(tok)
            if "seen" in seq.state:
                seq.state["seen"][tok] = True
            out = StepOutput(seq.rid, [tok])
            if seq.params.logprobs is not None:
                lp = packed[i]
                top = [(int(lp[j, 1]), float(lp[j, 0])) for j in range(1, 1 + seq.params.logprobs)]
                out.logprobs.append((tok, float(lp[0, 0]), top))
            m = seq.state.get("grammar")
            reason = "stop" if m is not None and self.grammars.accept(m, tok) else seq.check_finish()
            if reason:
                out.finished, out.finish_reason = True, reason
                self._free(seq, reason)
            outs.append(out)
        return outs

    def _seen(self, seq: Sequence) -> torch.Tensor:
        if seq.status != RUNNING:  # a finished row of a run-ahead step: its sample is dropped
            return torch.zeros(self.cfg.vocab_size, dtype=torch.bool, device=self.device)
        if "seen" not in seq.state:
            seen = torch.zeros(self.cfg.vocab_size, dtype=torch.bool, device=self.device)
            ids = [i for i in seq.prompt_ids + seq.output_ids if i >= 0]
            seen[to_device(torch.tensor(ids, dtype=torch.long), self.device)] = True
            seq.state["seen"] = seen
        return seq.state["seen"]

    # ---------------------------------------------------------------- convenience
    def run_to_completion(self) -> dict[str, list[int]]:
        """Drive all requests to the end; return generated ids per request id."""
        done: dict[str, list[int]] = {}
        while self.has_unfinished():
            for o in self.step():
                done.setdefault(o.rid, []).extend(o.token_ids)
        return done

