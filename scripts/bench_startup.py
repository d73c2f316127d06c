"""Engine start-up time on dummy weights of a real shape: cold (an empty persistent compilation cache) and
warm (the cache the cold start filled), each in a fresh process, with the step programs compiled on a pool of
threads in the background (the default) and, as the baseline, one after another with every program compiled
before the engine returns (--serial: one compile thread, waiting for all).

Printed per start: seconds until Engine() returns (weights loaded, the first programs ready: a server
answers /health_generate then), until a first request is answered, and until every step program is compiled,
with how many programs came from the persistent cache.

    python scripts/bench_startup.py --model llama-3-8b [--serial]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time

from bench_common import Table, run_header

ENGINE = dict(max_running_requests=512, context_length=4096, chunked_prefill_size=512)


def one_start(model: str, cache_dir: str, serial: bool) -> dict:
    """Runs in a child process: one engine start, timed."""
    started = time.perf_counter()
    from sgjax.engine import Engine
    from sgjax.executor import compile_queue, model_runner
    from sgjax.models.presets import write_preset

    hits = compile_queue.CacheCounter()
    if serial:
        model_runner.default_workers = lambda: 1
    folder = write_preset(model, tempfile.mkdtemp())
    engine = Engine(folder, load_format="dummy", compilation_cache_dir=cache_dir, **ENGINE)
    if serial:
        engine.runner.wait_until_compiled()
    ready = time.perf_counter() - started
    engine.generate(input_ids=list(range(1, 200)), sampling_params={"max_new_tokens": 8, "ignore_eos": True})
    first = time.perf_counter() - started
    engine.runner.wait_until_compiled()
    everything = time.perf_counter() - started
    programs = len(engine.runner.compiled) + len(engine.runner.sampler)
    engine.shutdown()
    return {"ready_s": ready, "first_request_s": first, "all_compiled_s": everything, "programs": programs,
            "cache_hits": hits.hits, "cache_requests": hits.requests}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="llama-3-8b")
    p.add_argument("--serial", action="store_true", help="also time starts compiling one program at a time")
    p.add_argument("--child", nargs=3, metavar=("CACHE_DIR", "SERIAL", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        # milliseconds since the child started on every line: where a start's seconds go, phase by phase
        logging.basicConfig(level=logging.INFO, format="%(relativeCreated)8.0f ms %(name)s: %(message)s")
        cache_dir, serial, out = args.child
        with open(out, "w") as f:
            json.dump(one_start(args.model, cache_dir, serial == "1"), f)
        return
    print(run_header())
    print(f"start-up of the engine, {args.model} (dummy weights), {ENGINE}")
    table = Table(("compiling", "<10"), ("cache", "<5"), ("ready s", ">8.1f"), ("1st request s", ">13.1f"),
                  ("all compiled s", ">14.1f"), ("programs", ">8"), ("from cache", ">10"))
    print(table.header())
    for serial in ([False, True] if args.serial else [False]):
        cache_dir = tempfile.mkdtemp(prefix="sgjax-xla-")
        for state in ("cold", "warm"):
            out = tempfile.mktemp(suffix=".json")
            subprocess.run([sys.executable, __file__, "--model", args.model, "--child", cache_dir,
                            "1" if serial else "0", out], check=True,
                           stderr=None if os.environ.get("SGJAX_BENCH_LOG") else subprocess.DEVNULL)
            r = json.load(open(out))
            print(table.row("serial" if serial else "parallel", state, r["ready_s"], r["first_request_s"],
                            r["all_compiled_s"], r["programs"], f"{r['cache_hits']}/{r['cache_requests']}"),
                  flush=True)


if __name__ == "__main__":
    main()
