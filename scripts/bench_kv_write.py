"""The K/V write of a step alone: sgjax's scatter (unique slots promised) against the same scatter
without the promise, on a real pool shape; each against its bytes at the measured copy bandwidth.

    python scripts/bench_kv_write.py --model llama-3-8b --tokens 64,1024,8192

Per layer, per step: T tokens' K and V ([T, KV heads, head_dim]) scattered into the two page arrays
([KV heads, pages, page_size, head_dim]), donated so that XLA writes in place. Bytes: the K/V written
(and read from the step's projection), 2 x 2 x T x KVH x D x itemsize.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from bench_common import Table, copy_bandwidth, ratio_to_floor, run_header, synced_call_s

from sgjax.config import add_engine_arguments
from sgjax.executor.batch import PADDING_SLOT
from sgjax.kernels.reference import write_kv
from sgjax.models.presets import PRESETS


def write_kv_without_promise(k_pages, v_pages, k, v, slot_mapping):
    """The write without the promise that its slots are unique, padding slots in the null page: how the K/V write
    was made before PADDING_SLOT, kept as the baseline the promise is measured against."""
    kvh, pages, page_size, d = k_pages.shape
    flat = (kvh, pages * page_size, d)
    k_pages = k_pages.reshape(flat).at[:, slot_mapping].set(k.swapaxes(0, 1).astype(k_pages.dtype))
    v_pages = v_pages.reshape(flat).at[:, slot_mapping].set(v.swapaxes(0, 1).astype(v_pages.dtype))
    return k_pages.reshape(kvh, pages, page_size, d), v_pages.reshape(kvh, pages, page_size, d)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama-3-8b", choices=sorted(PRESETS))
    p.add_argument("--tokens", default="64,1024,8192", help="tokens written per step (the first 90%% real)")
    p.add_argument("--pages", type=int, default=16384, help="pages in the pool")
    add_engine_arguments(p, only=("page_size",))
    p.add_argument("--repeat", type=int, default=20)
    args = p.parse_args()
    print(run_header())

    cfg = PRESETS[args.model][1]
    kvh = cfg["num_key_value_heads"]
    d = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    dtype = jnp.dtype(cfg.get("dtype", "bfloat16"))
    shape = (kvh, args.pages, args.page_size, d)
    bandwidth = copy_bandwidth()
    print(f"{args.model}: pool {shape} {jnp.dtype(dtype).name}, copy bandwidth {bandwidth / 1e12:.2f} TB/s")
    table = Table(("tokens", ">7"), ("variant", "<26"), ("us", ">9.1f"), ("bytes floor us", ">15.1f"),
                  ("of floor", ">9.1%"))
    print(table.header())
    rng = np.random.default_rng(0)
    for t in (int(x) for x in args.tokens.split(",")):
        real = max(1, t * 9 // 10)
        slots = np.zeros(t, np.int64)
        slots[:real] = rng.choice(args.pages * args.page_size - args.page_size, real, replace=False) + args.page_size
        new_pad = PADDING_SLOT + np.arange(real, t)
        old_pad = np.arange(real, t) % args.page_size  # the null page, as make_batch padded before
        k = jnp.asarray(rng.standard_normal((t, kvh, d)), dtype)
        v = jnp.asarray(rng.standard_normal((t, kvh, d)), dtype)
        floor_us = 2 * 2 * t * kvh * d * jnp.dtype(dtype).itemsize / bandwidth * 1e6
        for name, fn, pad in (("unique slots (sgjax)", write_kv, new_pad),
                              ("without the promise", write_kv_without_promise, old_pad)):
            slot_mapping = jnp.asarray(np.concatenate([slots[:real], pad]).astype(np.int32))
            step = jax.jit(fn, donate_argnums=(0, 1))
            pool = [jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)]

            def call(step=step, pool=pool, slot_mapping=slot_mapping):
                pool[:] = step(pool[0], pool[1], k, v, slot_mapping)
                return pool

            us = synced_call_s(call, args.repeat) * 1e6
            print(table.row(t, name, us, floor_us, ratio_to_floor(floor_us, us)), flush=True)
            del pool[:]


if __name__ == "__main__":
    main()
