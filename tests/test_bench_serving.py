"""scripts/bench_serving.py's client: it keeps as many requests in flight as asked, against a stub server
that counts them (aiohttp's default connector once capped the benchmark at 100 connections)."""

import argparse
import asyncio
import json
import pathlib
import sys

from aiohttp import web

from sgjax.testing import workloads

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "scripts"))
import bench_serving  # noqa: E402


async def serve_and_drive(num_requests: int, max_concurrency: int, hold_s: float = 5.0) -> tuple[int, list[dict]]:
    """A server that holds every request open until `num_requests` are open at once (or `hold_s` pass), then
    streams each a two-token completion; returns the most requests it saw open at once, and the results."""
    open_now, peak, everyone = 0, 0, asyncio.Event()

    async def completions(request: web.Request) -> web.StreamResponse:
        nonlocal open_now, peak
        open_now += 1
        peak = max(peak, open_now)
        if open_now == num_requests:
            everyone.set()
        try:
            await asyncio.wait_for(everyone.wait(), hold_s)
        except asyncio.TimeoutError:
            pass
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for event in ({"choices": [{"text": "a"}]}, {"choices": [{"text": "b"}]},
                      {"choices": [], "usage": {"completion_tokens": 2}}):
            await response.write(f"data: {json.dumps(event)}\n\n".encode())
        await response.write(b"data: [DONE]\n\n")
        open_now -= 1
        return response

    app = web.Application()
    app.router.add_post("/v1/completions", completions)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    args = argparse.Namespace(backend="openai", base_url=f"http://127.0.0.1:{runner.addresses[0][1]}",
                              model="stub", api_key=None, max_concurrency=max_concurrency,
                              request_rate=float("inf"))
    try:
        results = await bench_serving.run(args, workloads.fixed(num_requests, 100, input_len=4, output_len=2))
    finally:
        await runner.cleanup()
    return peak, results


def test_all_requests_are_in_flight_at_once_beyond_100():
    peak, results = asyncio.run(serve_and_drive(150, max_concurrency=1000))
    assert peak == 150
    assert [r["out_tokens"] for r in results] == [2] * 150 and all(len(r["chunks"]) == 2 for r in results)


def test_max_concurrency_caps_the_requests_in_flight():
    peak, results = asyncio.run(serve_and_drive(40, max_concurrency=25, hold_s=1.0))
    assert peak == 25 and len(results) == 40 and not any(r.get("error") for r in results)
