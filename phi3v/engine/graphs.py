"""The hot paths replayed as CUDA graphs: decode steps, short prefills and the vision tower.

A decode step is ~15 small kernels per layer (~500 for Phi-3-vision); at batch 1 launching them
costs more than running them. Each batch bucket is captured once into a CUDA graph over static
input buffers (tokens, positions, LongRoPE flags, block tables); a step copies its inputs in and replays. On the
CPU (and with graphs off) the same function runs eagerly.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Callable

import torch

from phi3v.engine.kv_cache import DecodeAttention, DecodeKernelOptions, KVCache, PrefillAttention, SuffixAttention
from phi3v.kernels.paged_attention import num_splits

# Held while a CUDA graph is captured. Other threads that launch GPU work (image preprocessing on
# the API's or the server's worker threads) take it too: CUDA work from another thread during a
# capture invalidates the capture.
CAPTURE_LOCK = threading.Lock()
log = logging.getLogger("phi3v.engine")


def capture_graph(fn: Callable[[], Any], pool: Any) -> tuple[torch.cuda.CUDAGraph, Any]:
    """Warm `fn` up twice on a side stream (allocator, cuBLAS handles), then capture it into a CUDA
    graph sharing `pool`, holding CAPTURE_LOCK throughout. Returns (graph, fn's output buffers)."""
    with CAPTURE_LOCK:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            out = fn()
    return graph, out


def cached_graph(runner: Any, key: Any, capture: Callable[[], Any], what: str) -> Any | None:
    """runner.graphs[key], captured on first use; None when the capture fails, after which the
    runner stays eager (a failed capture must not fail requests)."""
    if key not in runner.graphs:
        try:
            runner.graphs[key] = capture()
        except RuntimeError as e:
            log.warning("CUDA graph capture failed (%s): %s runs without graphs", e, what)
            runner.use_graphs = False
            return None
    return runner.graphs[key]


def capture_all(runner: Any, keys: Any, capture: Callable[[Any], Any], what: str) -> int:
    """Capture runner's graph for each of `keys` not captured yet (capture(key) builds one); stops when a
    capture fails (graphs are then off). Returns how many were captured."""
    n = 0
    for key in keys:
        if runner.use_graphs and key not in runner.graphs:
            n += cached_graph(runner, key, lambda k=key: capture(k), what) is not None
    return n


BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)


class DecodeRunner:
    """Decode steps for rows 0..n-1, each a sequence with its own block table and length.

    With the Triton attention kernel the graph's shape depends on the batch bucket alone (the
    kernel reads each row's length on the device); padding rows write into the scratch block."""

    def __init__(self, model: torch.nn.Module, cache: KVCache, max_blocks: int, use_graphs: bool | None = None,
                 kernel: DecodeKernelOptions | None = None) -> None:
        self.model, self.cache, self.max_blocks = model, cache, max_blocks
        self.kernel = kernel or DecodeKernelOptions()
        self.device = cache.k.device
        self.n_heads = model.config.num_key_value_heads  # decode-attention programs per row and split
        # graphs need the kernel: the gather fallback's shapes follow the longest row
        self.use_graphs = (self.device.type == "cuda" and cache.triton) if use_graphs is None else use_graphs
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, dict[str, torch.Tensor]]] = {}
        self.pool = None

    def warmup(self, max_batch: int) -> int:
        """Capture the graph of every batch bucket up to max_batch's now (a capture also compiles the
        Triton kernels for its bucket's KV split count: seconds on a fresh machine), so that a batch
        that shrinks or grows mid-run does not stall on it. Returns how many graphs were captured."""
        last = next((i for i, b in enumerate(BATCH_BUCKETS) if b >= max_batch), len(BATCH_BUCKETS) - 1)
        return capture_all(self, BATCH_BUCKETS[: last + 1], self._capture, "decode")

    def _forward(self, tokens: torch.Tensor, lengths: torch.Tensor, flags: torch.Tensor, block_table: torch.Tensor,
                 width: int, nsplit: int, lora: torch.Tensor | None = None) -> torch.Tensor:
        x = self.model.model.embed_tokens(tokens)[:, None]  # (n, 1, hidden)
        attn = DecodeAttention(self.cache, lengths, block_table, width, nsplit, self.kernel)
        h = self.model(x, lengths[:, None], flags, attn, lora)
        return self.model.logits(h[:, 0])  # (n, V) float32

    def decode(self, tokens: torch.Tensor, lengths: torch.Tensor, flags: torch.Tensor, block_table: torch.Tensor,
               width: int, lora: torch.Tensor | None = None) -> torch.Tensor:
        """tokens, lengths (n,) int64, flags (n,) bool, block_table (n, max_blocks) int32, all on the
        device; row b's new token goes to position lengths[b]. width: host-side bound on
        lengths+1 (for the gather fallback). lora (n,) int64: each row's per-request LoRA adapter (0 = base),
        given when the model has adapters loaded (then a static input of the graphs). Returns logits (n, V)."""
        n = tokens.shape[0]
        bucket = next((b for b in BATCH_BUCKETS if b >= n), None)
        if not self.use_graphs or bucket is None:
            return self._forward(tokens, lengths, flags, block_table, width, num_splits(n, self.n_heads), lora)
        entry = cached_graph(self, bucket, lambda: self._capture(bucket), "decode")
        if entry is None:
            return self._forward(tokens, lengths, flags, block_table, width, num_splits(n, self.n_heads), lora)
        graph, io = entry
        io["tokens"][:n].copy_(tokens)
        io["lengths"][:n].copy_(lengths)
        io["flags"][:n].copy_(flags)
        io["block_table"][:n].copy_(block_table)
        if "lora" in io:
            io["lora"][:n].copy_(lora)
        if bucket > n:  # padding rows: token 0 at position 0 of the scratch block (base model)
            io["tokens"][n:].zero_()
            io["lengths"][n:].zero_()
            io["block_table"][n:].fill_(self.cache.scratch)
            if "lora" in io:
                io["lora"][n:].zero_()
        graph.replay()
        return io["logits"][:n]

    def _capture(self, bucket: int) -> tuple[torch.cuda.CUDAGraph, dict[str, torch.Tensor]]:
        # the warm-up runs for real: every row points at the scratch block
        io = {"tokens": torch.zeros(bucket, dtype=torch.long, device=self.device),
              "lengths": torch.zeros(bucket, dtype=torch.long, device=self.device),
              "flags": torch.zeros(bucket, dtype=torch.bool, device=self.device),
              "block_table": torch.full((bucket, self.max_blocks), self.cache.scratch, dtype=torch.int32,
                                        device=self.device)}
        if self.model.loras is not None:  # each row's adapter: an input of the graph
            io["lora"] = torch.zeros(bucket, dtype=torch.long, device=self.device)
        nsplit = num_splits(bucket, self.n_heads)
        graph, io["logits"] = capture_graph(
            lambda: self._forward(io["tokens"], io["lengths"], io["flags"], io["block_table"], 0, nsplit,
                                  io.get("lora")), self.pool)
        self.pool = graph.pool()
        return graph, io


PREFILL_BUCKETS = tuple(range(128, 1025, 128))  # prompt lengths replayed as graphs (4 crops: ~790 tokens)


class PrefillRunner:
    """One short prompt's prefill (T <= 1024 tokens, from position 0) replayed as a CUDA graph per
    length bucket. Such a prefill is launch-bound (~500 kernels for ~10 ms of math at 790 tokens).
    Padding tokens follow the real ones (causal attention keeps them out of every real query) and
    store their K/V in the scratch block."""

    def __init__(self, model: torch.nn.Module, cache: KVCache, use_graphs: bool) -> None:
        self.model, self.cache, self.use_graphs = model, cache, use_graphs
        self.device = cache.k.device
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, dict[str, torch.Tensor]]] = {}
        self.pool = None

    def bucket(self, n: int) -> int | None:
        if not self.use_graphs:
            return None
        return next((b for b in PREFILL_BUCKETS if b >= n), None)

    def warmup(self, hidden: int, dtype: torch.dtype) -> int:
        """Capture every length bucket's graph now (a capture mid-run stalled the offline job ~0.5 s).
        Returns how many were captured."""
        like = torch.empty(1, hidden, dtype=dtype, device=self.device)
        return capture_all(self, PREFILL_BUCKETS, lambda b: self._capture(b, like), "prefill")

    def _forward(self, io: dict[str, torch.Tensor]) -> torch.Tensor:
        attn = PrefillAttention(self.cache, io["blk"], io["off"], 0)
        h = self.model(io["x"], io["pos"], io["flag"], attn, io.get("lora"))  # (1, Tb, hidden)
        return self.model.logits(h[0, io["last"]])  # (1, V)

    def run(self, embeds: torch.Tensor, flag: torch.Tensor, blk: torch.Tensor, off: torch.Tensor,
            lora: torch.Tensor | None = None) -> torch.Tensor | None:
        """embeds (T, hidden), flag (1,) bool, blk/off (T,) cache places, lora (1,) int64 (the adapter, when the
        model has per-request adapters) -> last logits (1, V), or None when there is no graph for this length (the
        caller runs it unpadded)."""
        T = embeds.shape[0]
        b = self.bucket(T)
        if b is None:
            return None
        entry = cached_graph(self, b, lambda: self._capture(b, embeds), "prefill")
        if entry is None:
            return None
        graph, io = entry
        io["x"][0, :T].copy_(embeds)
        io["x"][0, T:].zero_()
        io["flag"].copy_(flag)
        io["blk"][:T].copy_(blk)
        io["blk"][T:].fill_(self.cache.scratch)
        io["off"][:T].copy_(off)
        io["off"][T:].copy_(torch.arange(T, b, device=self.device) % self.cache.block_size)
        io["last"].fill_(T - 1)
        if "lora" in io:
            io["lora"].copy_(lora)
        graph.replay()
        return io["logits"].clone()  # the static buffer is the next replay's: a step may hold several results

    def _buffers(self, b: int, like: torch.Tensor) -> dict[str, torch.Tensor]:
        """The static inputs of bucket b's graph (`like`: a (., hidden) tensor of the activations' dtype)."""
        dev = self.device
        return {"x": torch.zeros(1, b, like.shape[1], dtype=like.dtype, device=dev),
                "pos": torch.arange(b, device=dev)[None],
                "flag": torch.zeros(1, dtype=torch.bool, device=dev),
                "blk": torch.full((b,), self.cache.scratch, dtype=torch.long, device=dev),
                "off": torch.arange(b, device=dev) % self.cache.block_size,
                "last": torch.zeros(1, dtype=torch.long, device=dev),
                **({"lora": torch.zeros(1, dtype=torch.long, device=dev)}
                   if self.model.loras is not None else {})}

    def _capture(self, b: int, like: torch.Tensor) -> tuple[torch.cuda.CUDAGraph, dict[str, torch.Tensor]]:
        io = self._buffers(b, like)
        graph, io["logits"] = capture_graph(lambda: self._forward(io), self.pool)
        self.pool = graph.pool()
        return graph, io


# New tokens after a cached prefix (a follow-up question, the next chat turn), replayed as a CUDA graph per length
# bucket: eager, such a prefill is launch-bound (~400 kernels for a few ms of math)
SUFFIX_BUCKETS = (16, 32, 64, 128)


class SuffixRunner:
    """One sequence's T <= 128 new tokens at positions start.. after its cached prefix, replayed as a CUDA graph
    of its length bucket (SuffixAttention: the paged prefill kernel reads start and T on the device). Padding
    tokens follow the real ones, store their K/V in the scratch block and are masked out of the attention."""

    def __init__(self, model: torch.nn.Module, cache: KVCache, max_blocks: int, use_graphs: bool) -> None:
        self.model, self.cache, self.max_blocks, self.use_graphs = model, cache, max_blocks, use_graphs
        self.device = cache.k.device
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, dict[str, torch.Tensor]]] = {}
        self.pool = None

    def bucket(self, n: int) -> int | None:
        return next((b for b in SUFFIX_BUCKETS if b >= n), None) if self.use_graphs else None

    def warmup(self, hidden: int, dtype: torch.dtype) -> int:
        like = torch.empty(1, hidden, dtype=dtype, device=self.device)
        return capture_all(self, SUFFIX_BUCKETS, lambda b: self._capture(b, like), "suffix prefill")

    def run(self, embeds: torch.Tensor, rows: torch.Tensor, flag: torch.Tensor, table: torch.Tensor) -> torch.Tensor | None:
        """embeds (T, hidden); rows (3, T) int64 on the device: position, cache block and offset of each token;
        flag (1,) bool; table (max_blocks,) int32: the sequence's blocks. Returns the last token's logits (1, V),
        or None without a graph for T (the caller prefills eagerly)."""
        T = embeds.shape[0]
        b = self.bucket(T)
        entry = None if b is None else cached_graph(self, b, lambda: self._capture(b, embeds), "suffix prefill")
        if entry is None:
            return None
        graph, io = entry
        fill_suffix_inputs(io, embeds, rows, flag, table, self.cache)
        graph.replay()
        return io["logits"].clone()  # the static buffer is the next replay's: a step may hold several results

    def forward(self, io: dict[str, torch.Tensor]) -> torch.Tensor:
        """The step on buffers `io` (buffers(), fill_suffix_inputs): the last real token's logits (1, V)."""
        attn = SuffixAttention(self.cache, io["blk"], io["off"], io["table"], io["lens"])
        h = self.model(io["x"][None], io["pos"][None], io["flag"], attn)  # (1, Tb, hidden)
        return self.model.logits(h[0, io["last"]])  # (1, V)

    def buffers(self, b: int, like: torch.Tensor) -> dict[str, torch.Tensor]:
        dev, c = self.device, self.cache
        return {"x": torch.zeros(b, like.shape[-1], dtype=like.dtype, device=dev),
                "pos": torch.arange(b, device=dev), "blk": torch.full((b,), c.scratch, dtype=torch.long, device=dev),
                "off": torch.arange(b, device=dev) % c.block_size, "flag": torch.zeros(1, dtype=torch.bool, device=dev),
                "table": torch.full((self.max_blocks,), c.scratch, dtype=torch.int32, device=dev),
                "lens": torch.tensor([0, b], dtype=torch.int32, device=dev),  # [start, T]
                "last": torch.zeros(1, dtype=torch.long, device=dev)}

    def _capture(self, b: int, like: torch.Tensor) -> tuple[torch.cuda.CUDAGraph, dict[str, torch.Tensor]]:
        io = self.buffers(b, like)  # the warm-up runs for real, into the scratch block
        graph, io["logits"] = capture_graph(lambda: self.forward(io), self.pool)
        self.pool = graph.pool()
        return graph, io


def fill_suffix_inputs(io: dict[str, torch.Tensor], x: torch.Tensor, rows: torch.Tensor, flag: torch.Tensor,
                       table: torch.Tensor, cache: KVCache) -> None:
    """Copy one suffix's inputs (SuffixRunner.run's arguments) into the buffers of a bucket >= T."""
    T, b = x.shape[0], io["x"].shape[0]
    io["x"][:T].copy_(x)
    io["x"][T:].zero_()
    io["pos"][:T].copy_(rows[0])
    io["pos"][T:].copy_(rows[0, -1].expand(b - T))  # padding: the last real position (in range; masked out)
    io["blk"][:T].copy_(rows[1])
    io["off"][:T].copy_(rows[2])
    io["blk"][T:].fill_(cache.scratch)
    io["off"][T:].copy_(torch.arange(T, b, device=x.device) % cache.block_size)
    io["flag"].copy_(flag)
    io["table"].copy_(table)
    io["lens"][0].copy_(rows[0, 0])
    io["lens"][1].fill_(T)
    io["last"].fill_(T - 1)


# 1 + h*w crops: nc=1 -> 2, nc=4 -> <=5, nc=16 -> <=17. The tower runs in chunks of at most 17 crops (one
# 16-crop image), each replayed as a CUDA graph of exactly its crop count: 17 graphs, no padding crops, and no
# shape first seen mid-run. Eager, every new crop count cost ~65 ms on the H200 (cuDNN builds an attention graph
# per shape: benchmarks/cold_shapes.py), and small counts are launch-bound (~300 kernels for 5 crops). The tower
# is compute-bound from ~9 crops: per crop, 17 at a time costs within ~2 % of 128 at a time (vision_buckets.py).
VISION_CHUNK = 17


class VisionRunner:
    """The CLIP tower over N crops: chunks of at most VISION_CHUNK crops, each a CUDA graph of exactly its size
    (captured on first use, or all at `warmup`). Without graphs (the CPU) the tower runs once over all N."""

    def __init__(self, tower: torch.nn.Module, device: torch.device, use_graphs: bool | None = None) -> None:
        self.tower, self.device = tower, device
        self.use_graphs = (device.type == "cuda") if use_graphs is None else use_graphs
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}
        self.pool = None

    def warmup(self, like: torch.Tensor) -> int:
        """Capture the graph of every chunk size now; like: (1, 3, 336, 336) in the tower's dtype. Returns how
        many were captured."""
        return capture_all(self, range(1, VISION_CHUNK + 1), lambda n: self._capture(n, like), "the vision tower")

    def _chunk(self, pixels: torch.Tensor) -> torch.Tensor | None:
        """(n <= VISION_CHUNK, 3, 336, 336) -> a view of graph n's output (n, 576, C), or None (graphs off)."""
        n = pixels.shape[0]
        entry = cached_graph(self, n, lambda: self._capture(n, pixels), "the vision tower") if self.use_graphs else None
        if entry is None:
            return None
        graph, x, y = entry
        x.copy_(pixels)
        graph.replay()
        return y

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        n = pixels.shape[0]  # pixels (n, 3, 336, 336) -> (n, 576, C)
        if n <= VISION_CHUNK:
            y = self._chunk(pixels)
            return self.tower(pixels) if y is None else y  # a graph's output: consumed before the next replay
        if not self.use_graphs:
            return self.tower(pixels)
        out = None
        for s in range(0, n, VISION_CHUNK):
            part = pixels[s: s + VISION_CHUNK]
            y = self._chunk(part)
            y = self.tower(part) if y is None else y
            if out is None:
                out = y.new_empty((n, *y.shape[1:]))
            out[s: s + part.shape[0]] = y  # copied out before the same graph replays again
        return out

    def _capture(self, n: int, like: torch.Tensor) -> tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]:
        x = torch.zeros((n, *like.shape[1:]), dtype=like.dtype, device=self.device)
        graph, y = capture_graph(lambda: self.tower(x), self.pool)
        self.pool = graph.pool()
        return graph, x, y
