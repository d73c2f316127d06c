"""The device side of an engine, built the same way on every host: the model, the KV pool's size, the runner.

One host's engine (core.py) builds all of it; across hosts, host 0's engine decides the pool's size (it depends
on the memory each host sees) and the other hosts (follower.py) build the same runner from that size, so every
host's programs have the same shapes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax

from sgjax import kernels
from sgjax.cache.kv_pool import KVPool, KVPoolConfig
from sgjax.cache.page_allocator import pages_for
from sgjax.cache.pool_sizing import check_pool_fits, pages_from_memory
from sgjax.config import KV_CACHE_DTYPES, EngineArgs
from sgjax.engine.image_inputs import max_image_patches
from sgjax.executor.buckets import shape_policy
from sgjax.executor.model_runner import ModelRunner
from sgjax.models.loader import LoadedModel, load_model
from sgjax.platform.compile_cache import enable_compile_cache
from sgjax.platform.mesh import make_mesh


def load(args: EngineArgs, kernel_options: dict | None = None) -> LoadedModel:
    """The model on its mesh, with the kernels its steps use. `kernel_options`: keywords for kernels.select."""
    enable_compile_cache(args.compilation_cache_dir)
    # The fused residual add + norm made the ShareGPT-like run 0.5% faster with a bf16 pool but 3.5% slower
    # with an fp8 one (four A/B pairs on one H100; the cause is not known): fp8 pools keep the plain add
    # and norm.
    chosen = kernels.select(args.attention_backend, args.page_size,
                            **{"fused_norm": not args.kv_cache_dtype.startswith("fp8"), **(kernel_options or {})})
    return load_model(args.model_path, make_mesh(args.mesh), dtype=args.dtype, load_format=args.load_format,
                      kernels=chosen, cpu_bf16_weights=args.cpu_bf16_weights)


def kv_dtype(args: EngineArgs, loaded: LoadedModel) -> str | None:
    """The KV pool's dtype: --kv-cache-dtype, else the loaded model's (None: its compute dtype)."""
    return KV_CACHE_DTYPES[args.kv_cache_dtype] or loaded.kv_dtype


def pool_pages(args: EngineArgs, loaded: LoadedModel, context_length: int) -> int:
    """The KV pool's pages: --num-pages, or what fits in memory after the weights."""
    if args.num_pages is not None:  # a pool asked for by size may be small on purpose: longer requests fail each
        return args.num_pages
    max_pages_per_seq = pages_for(context_length, args.page_size)
    page_cfg = KVPoolConfig.for_model(loaded.config, 2, args.page_size, kv_dtype(args, loaded))
    num_pages = pages_from_memory(page_cfg, loaded.mesh, args.mem_fraction_static,
                                  useful_pages=1 + args.max_running_requests * max_pages_per_seq,
                                  context_pages=max_pages_per_seq)
    check_pool_fits(num_pages, context_length, args.page_size, page_cfg.bytes_per_page)
    return num_pages


def make_runner(args: EngineArgs, loaded: LoadedModel, num_pages: int, context_length: int,
                on_compiling: Callable[[], None] = lambda: None) -> ModelRunner:
    """The KV pool of `num_pages` pages and the model runner over it, its programs compiled or queued;
    `on_compiling` is called once the pool is allocated, as compiling begins (start-up progress)."""
    cfg = loaded.config
    pool = KVPool(KVPoolConfig.for_model(cfg, num_pages, args.page_size, kv_dtype(args, loaded),
                                         loaded.kernels.bf16_pool_as_bits), loaded.mesh)
    on_compiling()
    shapes = shape_policy(args.shape_policy, jax.default_backend())
    if args.min_token_bucket:
        shapes = dataclasses.replace(shapes, min_token_bucket=args.min_token_bucket)
    return ModelRunner(loaded, pool, max_seqs=args.max_running_requests,
                       max_pages_per_seq=pages_for(context_length, args.page_size),
                       max_tokens=prefill_budget(args, context_length) + args.max_running_requests,
                       shapes=shapes, enable_prompt_logprobs=args.enable_prompt_logprobs,
                       max_prefix_groups=args.shared_prefix_groups if loaded.kernels.reads_shared_prefixes else 0,
                       **_image_pool_size(args, cfg))


def prefill_budget(args: EngineArgs, context_length: int) -> int:
    """Prompt tokens one step may take."""
    return args.chunked_prefill_size or context_length


def _image_pool_size(args: EngineArgs, cfg) -> dict:
    """A vision-language model's image embedding pool: rows, and the patches of the largest image."""
    if not cfg.is_multimodal:
        return {}
    patches = max_image_patches(args.model_path, cfg)
    largest = cfg.vision.output_rows(patches)  # one image's tokens (at most): the pool holds at least one
    rows = max(args.image_pool_rows or 4 * largest, largest)
    return {"image_pool_rows": rows, "max_image_patches": patches}
