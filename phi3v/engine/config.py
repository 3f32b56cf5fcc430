"""EngineConfig: every switch of the engine in one object.

Nothing in the engine, the model or the kernels reads an environment variable; the CLI and the server build
this object from their flags (and their PHI3V_* variables, `phi3v.cli.engine_config`), and the Python API from
`LLM(...)`'s keyword arguments. Two engines in one process may differ in any of these.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

KV_CACHE_DTYPES = ("auto", "fp8")
QUANT_METHODS = ("fp8", "int4")  # decoder weight quantization (phi3v/models/quant.py)


@dataclass(frozen=True)
class EngineConfig:
    # ---- capacity
    max_num_seqs: int = 32  # rows of a decode batch
    max_model_len: int | None = None  # prompt + output tokens of one sequence (None: min(16384, the model's))
    gpu_memory_utilization: float = 0.9  # of the GPU memory free at start, taken for weights' activations and KV
    kv_budget_bytes: int | None = None  # KV cache size in bytes (None: from gpu_memory_utilization; 2 GiB on a CPU)
    kv_block_size: int = 64  # tokens per KV block
    kv_cache_dtype: str = "auto"  # "auto" = the model's dtype (exact); "fp8" = e4m3 (half the bytes, changed numerics)
    prefill_chunk: int = 4096  # prompts up to this long are batched / graphed whole; longer ones run in chunks of
    long_prefill_chunk: int = 16384  # tokens per forward (bigger chunks: fewer passes over the cached past)
    image_cache_size: int = 32  # projected image features kept for reuse (entries)
    enable_prefix_caching: bool = True  # reuse the KV blocks of an earlier request's identical prefix
    # PyTorch threads on a CPU device. None: 1 for decoders narrower than 256 (tiny ones, whose ops are too small to
    # split), all physical cores for wider ones (phi3v.device.default_cpu_threads), unless the user set a count
    # (torch.set_num_threads, OMP_NUM_THREADS / MKL_NUM_THREADS), which is then kept. Process-wide, like PyTorch's.
    cpu_threads: int | None = None
    # ---- speed switches (for debugging and A/B runs: each off gives the same tokens, slower)
    cuda_graphs: bool | None = None  # decode / short prefill / vision as CUDA graphs (None: on CUDA)
    vision_graphs: bool = True  # the vision tower's graphs (with cuda_graphs)
    fused_kernels: bool = True  # Triton norm/RoPE/SiLU/GEMV/quick-GELU kernels where Triton runs
    pdl: bool = True  # programmatic dependent launch of those kernels (Hopper and later)
    run_ahead: bool = True  # launch decode step t+1 before reading step t's tokens (CUDA)
    # (tile, warps, stages) of the decode-attention kernel per KV dtype ("bf16", "fp8"): tuning runs only
    attn_configs: dict[str, tuple[int, int, int]] = field(default_factory=dict)
    # prefill chunks that read the cached past with the paged prefill kernel: past | all | off (SDPA over a gather)
    paged_prefill: str = "past"
    prefill_attn_configs: dict[str, Any] = field(default_factory=dict)  # its PrefillConfig per KV storage: tuning

    def __post_init__(self) -> None:
        def bad(msg: str) -> None:
            raise ValueError(f"invalid engine option: {msg}")

        if not isinstance(self.max_num_seqs, int) or self.max_num_seqs < 1:
            bad(f"max_num_seqs must be an integer >= 1, got {self.max_num_seqs!r}")
        if self.max_model_len is not None and (not isinstance(self.max_model_len, int) or self.max_model_len < 2):
            bad(f"max_model_len must be an integer >= 2, got {self.max_model_len!r}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            bad(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization!r}")
        if not isinstance(self.kv_block_size, int) or self.kv_block_size < 1:
            bad(f"kv_block_size must be an integer >= 1, got {self.kv_block_size!r}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            bad(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, not {self.kv_cache_dtype!r}")
        for name in ("prefill_chunk", "long_prefill_chunk"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                bad(f"{name} must be an integer >= 1, got {v!r}")
        if self.paged_prefill not in ("past", "all", "off"):
            bad(f"paged_prefill must be past, all or off, not {self.paged_prefill!r}")
        if self.cpu_threads is not None and (not isinstance(self.cpu_threads, int) or self.cpu_threads < 1):
            bad(f"cpu_threads must be an integer >= 1 or None (automatic), got {self.cpu_threads!r}")
        if not isinstance(self.image_cache_size, int) or self.image_cache_size < 0:
            bad(f"image_cache_size must be an integer >= 0, got {self.image_cache_size!r}")

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    @classmethod
    def from_options(cls, options: dict) -> "EngineConfig":
        """EngineConfig(**options), with a ValueError naming unknown options."""
        unknown = sorted(set(options) - set(cls.names()))
        if unknown:
            raise ValueError(f"unknown engine option(s): {', '.join(unknown)} (known: {', '.join(cls.names())})")
        return cls(**options)
