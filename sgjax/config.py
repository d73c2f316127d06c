"""EngineArgs: every knob of the engine in one dataclass, parsed once and passed down."""

from __future__ import annotations

import argparse
import dataclasses
import os

SCHEDULE_POLICIES = ("lpm", "fcfs", "lof")
# --kv-cache-dtype -> the KV pool's dtype (None: the model's). The fp8 formats halve the bytes each
# decode step's attention reads and double the tokens the pool holds; values are stored unscaled
# (scale 1, as SGLang and vLLM do when a checkpoint brings no KV scales), saturated at the format's range.
KV_CACHE_DTYPES = {"auto": None, "bfloat16": "bfloat16", "float16": "float16", "float32": "float32",
                   "fp8_e4m3": "float8_e4m3fn", "fp8_e5m2": "float8_e5m2"}


@dataclasses.dataclass
class EngineArgs:
    model_path: str
    mesh: str = "1x1"  # DATAxTENSOR
    dtype: str | None = None  # None: the checkpoint's dtype
    load_format: str = "auto"  # auto | safetensors | dummy
    attention_backend: str = "pallas"  # or "reference"; pallas falls back (warning) where it has no kernel
    page_size: int = 16  # tokens per KV page
    kv_cache_dtype: str = "auto"  # a key of KV_CACHE_DTYPES; auto: the model's dtype
    num_pages: int | None = None  # KV pool size; None: from mem_fraction_static
    mem_fraction_static: float = 0.85  # share of device memory for weights + KV pool
    context_length: int | None = None  # None: the model's max_position_embeddings
    max_running_requests: int = 32  # decode batch size, also the compiled batch dimension
    chunked_prefill_size: int = 512  # prompt tokens per step at most; 0 = whole prompts
    # lpm (longest prefix match first) | fcfs | lof (longest output first: for offline batches)
    schedule_policy: str = "lpm"
    # Prompt chunks fill a step up to this many tokens with its decodes (0: chunked_prefill_size alone
    # limits them). Near the size where a step's matmuls take as long as reading the weights (~384 on an
    # H100 for an 8B model), with `lof`, a batch's prefill runs inside its decode steps (scheduler.py).
    step_token_target: int = 0
    disable_radix_cache: bool = False
    random_seed: int = 0
    # JAX's persistent compilation cache, so a restart loads the compiled steps; "" disables it.
    compilation_cache_dir: str = dataclasses.field(
        default_factory=lambda: os.path.join(os.path.expanduser("~"), ".cache", "sgjax", "xla"))
    # Smallest compiled token count (max_running_requests, if smaller, gets a bucket too); see token_buckets.
    min_token_bucket: int = 16
    enable_prompt_logprobs: bool = False  # also compile steps that return prompt-token logprobs
    disable_overlap_schedule: bool = False  # wait for each step before scheduling the next
    # Constrained decoding: text a grammar forces is appended in one step (jump-forward) instead of
    # one decode step per token; the tokens are the same either way.
    disable_jump_forward: bool = False
    # Cascade attention: up to this many groups of a decode step's requests that share a cached prompt
    # prefix read it once per group instead of once per request (GPU Pallas backend); 0 turns it off.
    shared_prefix_groups: int = 32

    def __post_init__(self):
        if self.schedule_policy not in SCHEDULE_POLICIES:
            raise ValueError(f"schedule_policy must be one of {', '.join(SCHEDULE_POLICIES)}; "
                             f"got {self.schedule_policy!r}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}; got {self.kv_cache_dtype!r}")
        if self.step_token_target < 0:
            raise ValueError("step_token_target must be >= 0 (0 turns it off)")
        if self.max_running_requests < 1:
            raise ValueError("max_running_requests must be at least 1")
        if self.chunked_prefill_size < 0:
            raise ValueError("chunked_prefill_size must be >= 0 (0 disables chunking)")
        if self.shared_prefix_groups < 0:
            raise ValueError("shared_prefix_groups must be >= 0 (0 disables cascade attention)")
        if not 0 < self.mem_fraction_static < 1:
            raise ValueError("mem_fraction_static must be between 0 and 1")


@dataclasses.dataclass
class ServerArgs:
    host: str = "127.0.0.1"
    port: int = 30000
    api_key: str | None = None  # when set, every request needs "Authorization: Bearer <key>"
    served_model_name: str | None = None  # None: the model folder's name
    chat_template: str | None = None  # a Jinja template file overriding the tokenizer's
    log_level: str = "info"
    log_requests: bool = False
    enable_metrics: bool = False  # Prometheus /metrics, as SGLang's --enable-metrics
    # /generate streams each event's new text and output ids, not everything so far (SGLang's option of the
    # same name): the cumulative form costs the server O(n) a token, O(n^2) a request.
    incremental_streaming_output: bool = False
    # The Engine in a child process (sgjax/engine/engine_process.py), as SGLang splits its HTTP side from its
    # scheduler: the HTTP side's Python stops sharing the engine thread's GIL. On an H200 under 1000 streams
    # it served ~8% more output tokens/s through /v1/completions, 28% through /generate (BENCHMARKS.md
    # session 30); --no-engine-process keeps the engine in the server's process.
    engine_process: bool = True


def build_parser(description: str | None = None) -> argparse.ArgumentParser:
    """One CLI for the server and the scripts: every EngineArgs and ServerArgs field, SGLang's spelling."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--model-path", required=True)
    parser.add_argument("--mesh", default="1x1", help="DATAxTENSOR, e.g. 2x4")
    parser.add_argument("--tp", "--tp-size", type=int, default=None, help="tensor-parallel size (sets the mesh)")
    parser.add_argument("--dp", "--dp-size", type=int, default=None, help="data-parallel size (sets the mesh)")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--load-format", default="auto", choices=["auto", "safetensors", "dummy"])
    parser.add_argument("--attention-backend", default="pallas", choices=["pallas", "reference"])
    parser.add_argument("--page-size", type=int, default=16)
    parser.add_argument("--kv-cache-dtype", default="auto", choices=list(KV_CACHE_DTYPES),
                        help="KV pool dtype (auto: the model's; fp8_*: half the bytes, unscaled)")
    parser.add_argument("--mem-fraction-static", type=float, default=0.85)
    parser.add_argument("--context-length", type=int, default=None)
    parser.add_argument("--max-running-requests", type=int, default=32)
    parser.add_argument("--chunked-prefill-size", type=int, default=512)
    parser.add_argument("--schedule-policy", default="lpm", choices=SCHEDULE_POLICIES)
    parser.add_argument("--step-token-target", type=int, default=0)
    parser.add_argument("--disable-radix-cache", action="store_true")
    parser.add_argument("--disable-overlap-schedule", action="store_true")
    parser.add_argument("--enable-prompt-logprobs", action="store_true")
    parser.add_argument("--disable-jump-forward", action="store_true",
                        help="constrained decoding: one decode step per forced token")
    parser.add_argument("--shared-prefix-groups", type=int, default=32,
                        help="cascade attention: groups of requests sharing a cached prefix read it once (0: off)")
    parser.add_argument("--random-seed", type=int, default=0)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=30000)
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--served-model-name", default=None)
    parser.add_argument("--chat-template", default=None)
    parser.add_argument("--log-level", default="info")
    parser.add_argument("--log-requests", action="store_true")
    parser.add_argument("--enable-metrics", action="store_true", help="serve Prometheus metrics at /metrics")
    parser.add_argument("--incremental-streaming-output", action="store_true",
                        help="/generate streams only the new text and output ids in each event")
    parser.add_argument("--engine-process", action=argparse.BooleanOptionalAction, default=True,
                        help="run the engine in a child process, apart from the HTTP server's Python (default)")
    return parser


def args_from_cli(ns: argparse.Namespace) -> tuple[EngineArgs, ServerArgs]:
    mesh = ns.mesh
    if ns.tp is not None or ns.dp is not None:
        mesh = f"{ns.dp or 1}x{ns.tp or 1}"
    engine = EngineArgs(
        model_path=ns.model_path, mesh=mesh, dtype=ns.dtype, load_format=ns.load_format,
        attention_backend=ns.attention_backend, page_size=ns.page_size, kv_cache_dtype=ns.kv_cache_dtype,
        mem_fraction_static=ns.mem_fraction_static, context_length=ns.context_length,
        max_running_requests=ns.max_running_requests, chunked_prefill_size=ns.chunked_prefill_size,
        schedule_policy=ns.schedule_policy, step_token_target=ns.step_token_target,
        disable_radix_cache=ns.disable_radix_cache,
        disable_overlap_schedule=ns.disable_overlap_schedule, enable_prompt_logprobs=ns.enable_prompt_logprobs,
        disable_jump_forward=ns.disable_jump_forward, shared_prefix_groups=ns.shared_prefix_groups,
        random_seed=ns.random_seed)
    server = ServerArgs(host=ns.host, port=ns.port, api_key=ns.api_key, served_model_name=ns.served_model_name,
                        chat_template=ns.chat_template, log_level=ns.log_level, log_requests=ns.log_requests,
                        enable_metrics=ns.enable_metrics,
                        incremental_streaming_output=ns.incremental_streaming_output,
                        engine_process=ns.engine_process)
    return engine, server
