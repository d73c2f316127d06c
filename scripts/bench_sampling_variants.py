"""What each sampling variant costs a step and what it costs to compile: the figures issue 57's item 3 weighs
(merge a variant into a more general one where it saves less a step than its compile costs a start).

Every (SamplerFeatures, row bucket) program of a dummy-weight engine of a real shape, called back to back on
random hidden rows (integer inputs zero: every row greedy), ms a call; then each variant compiled once more at
the largest row bucket, without the persistent cache, s. Printed: one row per feature combination.

    python scripts/bench_sampling_variants.py [--model llama-3-8b] [--max-running-requests 512]
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time

from bench_common import Table, queued_call_s, run_header


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="llama-3-8b")
    p.add_argument("--max-running-requests", type=int, default=512)
    args = p.parse_args()

    import jax
    import jax.numpy as jnp

    from sgjax.engine import Engine
    from sgjax.executor.sampler import SamplerFeatures
    from sgjax.models.presets import write_preset

    folder = write_preset(args.model, tempfile.mkdtemp())
    engine = Engine(folder, load_format="dummy", compilation_cache_dir="", context_length=4096,
                    max_running_requests=args.max_running_requests)
    runner = engine.runner
    runner.wait_until_compiled()
    key = jax.random.PRNGKey(0)

    def inputs(program) -> list:
        """Arguments shaped as the program takes them: random floats (hidden rows), zero integers."""
        def make(info):
            a = info._aval
            return (jax.random.normal(key, a.shape, a.dtype) if jnp.issubdtype(a.dtype, jnp.floating)
                    else jnp.zeros(a.shape, a.dtype))

        positional, _ = program.args_info  # a tree: the mask arguments of unmasked variants are None
        out = list(jax.tree.map(make, positional, is_leaf=lambda x: hasattr(x, "_aval")))
        out[0] = runner.head  # the real head: its shape and sharding are the program's
        return out

    print(run_header())
    print(f"{args.model}, dummy weights, row buckets {runner.row_buckets}")
    table = Table(("features", "<40"), *((f"{n} rows ms", ">11.3f") for n in runner.row_buckets),
                  ("compile s", ">9.2f"))
    print(table.header())
    for features in SamplerFeatures.all():
        times = []
        for rows in runner.row_buckets:
            _, program = runner.sampler_for(features, rows)
            times.append(queued_call_s(program, *inputs(program)) * 1e3)
        started = time.perf_counter()
        runner._compile_sampler(features, runner.row_buckets[-1])  # noqa: SLF001 (a fresh compile, timed)
        name = ",".join(f.name for f in dataclasses.fields(features) if getattr(features, f.name)) or "greedy"
        print(table.row(name, *times, time.perf_counter() - started), flush=True)
    engine.shutdown()


if __name__ == "__main__":
    main()
