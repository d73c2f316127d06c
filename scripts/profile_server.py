"""Where the server's event-loop thread spends its CPU under load, with the engine in a child process (the
default) or (with --no-engine-process) in this process.

With the engine in the server's process, the HTTP handlers and the engine thread share one GIL: every microsecond
the event loop spends on a streamed event is one the engine's host side may wait for (that way the server delivered
91% of the offline output tokens/s on an H200: docs/benchmark-history.md, "the server under load"). This starts
the Engine and the app in this process, drives them with bench_serving.py in a subprocess, and reports the CPU
seconds of the event loop and of the engine thread, the output events the client received, the loop's CPU per
event, and how long the requests took to reach the engine (first to last: a ramp-up the offline run does not
have); with --profile, a second run under cProfile lists the loop's top functions.

    python scripts/make_tiny_model.py /tmp/sgjax-tiny
    python scripts/profile_server.py --model-path /tmp/sgjax-tiny --attention-backend reference \\
        --backend openai --num-prompts 256 --input-len 32 --output-len 128 --profile [--no-engine-process]

By default the engine's CPU is its whole child process's (engine thread, pipe threads).
"""

from __future__ import annotations

import asyncio
import cProfile
import json
import os
import pstats
import sys
import tempfile
import time

import uvloop
from aiohttp import web
from bench_common import run_header, step_sizes

from sgjax.config import args_from_cli, build_parser
from sgjax.engine import Engine
from sgjax.server.app import make_app


def thread_cpu_s(thread) -> float:
    """CPU seconds a running thread has used (Linux: its POSIX CPU clock)."""
    return time.clock_gettime(time.pthread_getcpuclockid(thread.ident))


def engine_cpu_s(engine) -> float:
    """CPU seconds of the engine thread, or of the engine's child process (Linux: /proc/PID/stat)."""
    if not engine.in_process:
        with open(f"/proc/{engine.core._process.pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime
    return thread_cpu_s(engine.core._thread)


def step_figures(before: dict, after: dict) -> str:
    """The engine thread's steps between two Engine.timings(): how many, over how long, how many host-bound, and
    per step the time it waited on the device and its host time by phase."""
    steps = max(after["steps"] - before["steps"], 1)
    per_step = lambda a, b: f"{(a - b) / steps * 1e3:.2f}"  # noqa: E731
    host = ", ".join(f"{k} {per_step(v, before['host_s'].get(k, 0.0))}" for k, v in after["host_s"].items())
    return (f"{steps} steps over {after['busy_s'] - before['busy_s']:.2f} s busy, {step_sizes(before, after)}, "
            f"{(after['host_bound_steps'] - before['host_bound_steps']) / steps:.0%} host-bound; "
            f"ms a step: device wait {per_step(after['device_wait_s'], before['device_wait_s'])}, {host}")


async def drive(engine, server_args, client_args: list[str], profile: cProfile.Profile | None) -> dict:
    """Serve on a free port while bench_serving.py runs against it; the figures of that span."""
    runner = web.AppRunner(make_app(engine, server_args), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    # When each request reached the engine: the spread of a burst's arrivals is a ramp-up the offline run
    # does not have (its scheduler sees every request at its first step).
    submitted, submit = [], engine._submit

    def timed_submit(*args, **kwargs):
        submitted.append(time.perf_counter())
        return submit(*args, **kwargs)

    engine._submit = timed_submit
    with tempfile.NamedTemporaryFile(suffix=".jsonl") as out:
        command = [sys.executable, os.path.join(os.path.dirname(__file__), "bench_serving.py"),
                   "--base-url", f"http://127.0.0.1:{port}", "--output-json", out.name, *client_args]
        timings = engine.timings()
        loop_cpu, engine_cpu, start = time.thread_time(), engine_cpu_s(engine), time.perf_counter()
        if profile:
            profile.enable()
        client = await asyncio.create_subprocess_exec(*command, stdout=asyncio.subprocess.PIPE)
        printed, _ = await client.communicate()
        if profile:
            profile.disable()
        figures = {"wall_s": time.perf_counter() - start, "loop_cpu_s": time.thread_time() - loop_cpu,
                   "engine_cpu_s": engine_cpu_s(engine) - engine_cpu}
        figures["engine_thread"] = step_figures(timings, engine.timings())
        del engine._submit
        await runner.cleanup()
        lines = open(out.name).read().splitlines()
    if client.returncode or not lines:
        raise RuntimeError(f"bench_serving.py failed:\n{printed.decode()}")
    figures["client"] = json.loads(lines[-1])
    figures["intake_s"] = max(submitted) - min(submitted) if submitted else 0.0
    return figures


def main() -> None:
    parser = build_parser(__doc__)
    parser.add_argument("--backend", default="openai", choices=["openai", "sglang"])
    parser.add_argument("--dataset", default="fixed", choices=["fixed", "sharegpt"],
                        help="bench_serving.py's prompts: fixed lengths, or ShareGPT-like ones")
    parser.add_argument("--num-prompts", type=int, default=256)
    parser.add_argument("--input-len", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--request-rate", default="inf")
    parser.add_argument("--profile", action="store_true", help="a second run under cProfile: the loop's top functions")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--event-loop", default="asyncio", choices=["asyncio", "uvloop"])
    ns = parser.parse_args()
    print(run_header())
    engine_args, server_args = args_from_cli(ns)
    server_args.log_level = "warning"
    engine = Engine(args=engine_args, engine_process=server_args.engine_process)
    client_args = ["--backend", ns.backend, "--dataset", ns.dataset, "--num-prompts", str(ns.num_prompts),
                   "--input-len", str(ns.input_len), "--output-len", str(ns.output_len),
                   "--request-rate", ns.request_rate, "--max-concurrency", str(ns.num_prompts),
                   "--vocab-size", str(engine.config.vocab_size), "--flush-cache"]
    try:
        runs = [("plain", None)] + ([("cProfile", cProfile.Profile())] if ns.profile else [])
        for name, profile in runs:
            factory = uvloop.new_event_loop if ns.event_loop == "uvloop" else asyncio.new_event_loop
            with asyncio.Runner(loop_factory=factory) as runner:
                f = runner.run(drive(engine, server_args, client_args, profile))
            events, client = f["client"]["events"], f["client"]
            lengths = f"{ns.input_len} in / {ns.output_len} out" if ns.dataset == "fixed" else "ShareGPT-like lengths"
            print(f"{name}, {ns.event_loop}: {ns.backend}, {ns.num_prompts} requests of {lengths}, "
                  f"{client['out_tok_per_s']:,.0f} out tok/s, {events} output events in {f['wall_s']:.2f} s; "
                  f"event loop CPU {f['loop_cpu_s']:.2f} s = {f['loop_cpu_s'] / f['wall_s']:.0%} of the run, "
                  f"{f['loop_cpu_s'] / max(events, 1) * 1e6:.1f} us an event; engine "
                  f"{'process' if server_args.engine_process else 'thread'} CPU "
                  f"{f['engine_cpu_s']:.2f} s; the requests reached the engine over {f['intake_s']:.2f} s; "
                  f"engine thread: {f['engine_thread']}")
            if profile:
                pstats.Stats(profile).sort_stats("tottime").print_stats(ns.top)
    finally:
        engine.shutdown()


if __name__ == "__main__":
    main()
