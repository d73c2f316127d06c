"""EngineArgs: every knob of the engine in one dataclass, parsed once and passed down."""

from __future__ import annotations

import dataclasses
import os


@dataclasses.dataclass
class EngineArgs:
    model_path: str
    mesh: str = "1x1"  # DATAxTENSOR
    dtype: str | None = None  # None: the checkpoint's dtype
    load_format: str = "auto"  # auto | safetensors | dummy
    attention_backend: str = "reference"
    page_size: int = 16  # tokens per KV page
    num_pages: int | None = None  # KV pool size; None: from mem_fraction_static
    mem_fraction_static: float = 0.85  # share of device memory for weights + KV pool
    context_length: int | None = None  # None: the model's max_position_embeddings
    max_running_requests: int = 32  # decode batch size, also the compiled batch dimension
    chunked_prefill_size: int = 512  # prompt tokens per step at most; 0 = whole prompts
    schedule_policy: str = "lpm"  # lpm (longest prefix match first) | fcfs
    disable_radix_cache: bool = False
    random_seed: int = 0
    # JAX's persistent compilation cache, so a restart loads the compiled steps; "" disables it.
    compilation_cache_dir: str = dataclasses.field(
        default_factory=lambda: os.path.join(os.path.expanduser("~"), ".cache", "sgjax", "xla"))
    min_token_bucket: int = 16  # smallest compiled token count; buckets double up to the max
    enable_prompt_logprobs: bool = False  # also compile steps that return prompt-token logprobs
    disable_overlap_schedule: bool = False  # wait for each step before scheduling the next

    def __post_init__(self):
        if self.schedule_policy not in ("lpm", "fcfs"):
            raise ValueError(f"schedule_policy must be 'lpm' or 'fcfs'; got {self.schedule_policy!r}")
        if self.max_running_requests < 1:
            raise ValueError("max_running_requests must be at least 1")
        if self.chunked_prefill_size < 0:
            raise ValueError("chunked_prefill_size must be >= 0 (0 disables chunking)")
        if not 0 < self.mem_fraction_static < 1:
            raise ValueError("mem_fraction_static must be between 0 and 1")
