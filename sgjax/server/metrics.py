"""Prometheus metrics: request counts and latencies recorded as requests finish, engine gauges read
at scrape time."""

from __future__ import annotations

import time

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
# An aborted request's cause, from the start of its finish message (none: its client aborted it or hung up)
ABORT_CAUSES = (("engine error", "engine_error"), ("the request cannot run", "invalid"), ("constraint", "invalid"),
                ("the engine process", "engine_exit"), ("aborted before it started", "client"))


def abort_cause(reason: dict) -> str:
    message = reason.get("message")
    if not message:
        return "client"
    return next((cause for prefix, cause in ABORT_CAUSES if message.startswith(prefix)), "other")


class Metrics:
    def __init__(self):
        self.engine = None  # the engine's gauges are read at scrape time once it started (attach)
        self.registry = r = CollectorRegistry()
        self.requests = Counter("sgjax_requests", "Finished requests by finish reason", ["status"], registry=r)
        self.prompt_tokens = Counter("sgjax_prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.generation_tokens = Counter("sgjax_generation_tokens", "Generated tokens", registry=r)
        self.ttft = Histogram("sgjax_time_to_first_token_seconds", "Time to first token", registry=r,
                              buckets=LATENCY_BUCKETS)
        self.itl = Histogram("sgjax_inter_token_latency_seconds", "Mean time between output tokens", registry=r,
                             buckets=LATENCY_BUCKETS)
        self.e2e = Histogram("sgjax_e2e_request_latency_seconds", "Arrival to last token", registry=r,
                             buckets=LATENCY_BUCKETS)
        self.running = Gauge("sgjax_num_running_requests", "Requests in the running batch", registry=r)
        self.queued = Gauge("sgjax_num_queued_requests", "Requests waiting", registry=r)
        self.queue_time = Histogram("sgjax_queue_time_seconds", "Arrival to first scheduled", registry=r,
                                    buckets=LATENCY_BUCKETS)
        self.kv_usage = Gauge("sgjax_kv_cache_usage", "Share of KV pages held by running requests (not free and not "
                              "evictable cache)", registry=r)
        self.kv_pages = Gauge("sgjax_kv_pages", "KV pages by state: used (running requests), cached (evictable "
                              "prefix cache), free", ["state"], registry=r)
        self.preemptions = Counter("sgjax_preemptions", "Running requests preempted to free KV pages", registry=r)
        self._preemptions_seen = 0
        self.aborts = Counter("sgjax_aborted_requests", "Aborted requests by cause: client (abort_request or a "
                              "client that hung up), engine_error, engine_exit, invalid, other", ["cause"], registry=r)
        self.errors = Counter("sgjax_http_errors", "Error responses by status and error type", ["status", "type"],
                              registry=r)
        self.hit_rate = Gauge("sgjax_prefix_cache_hit_rate", "Prompt tokens found in the radix cache", registry=r)
        self.connections = Gauge("sgjax_open_connections", "Open HTTP connections (set by the server's listener)",
                                 registry=r)
        self.refused_connections = Counter("sgjax_refused_connections", "Connections answered 503 and closed at "
                                           "once: --max-connections were open", registry=r)

    def attach(self, engine) -> None:
        """Record the engine's finished requests, and read its gauges at each scrape."""
        self.engine = engine
        engine.finish_hooks.append(self.observe)

    def observe(self, req) -> None:
        """Record a finished request (called once per request)."""
        now = time.monotonic()
        reason = req.finish_reason or {}
        self.requests.labels(reason.get("type", "unknown")).inc()
        if reason.get("type") == "abort":
            self.aborts.labels(abort_cause(reason)).inc()
        self.prompt_tokens.inc(len(req.prompt_ids))
        self.generation_tokens.inc(len(req.output_ids))
        self.e2e.observe(now - req.arrival_time)
        if req.admit_time is not None:
            self.queue_time.observe(max(req.admit_time - req.arrival_time, 0.0))
        if req.first_token_time is not None:
            self.ttft.observe(req.first_token_time - req.arrival_time)
            if len(req.output_ids) > 1:
                self.itl.observe((now - req.first_token_time) / (len(req.output_ids) - 1))

    def render(self) -> bytes:
        if self.engine is None:  # starting: the counters only
            return generate_latest(self.registry)
        stats = self.engine.load_stats()
        self.running.set(stats["num_running_requests"])
        self.queued.set(stats["num_queued_requests"])
        free, cached = stats["free_pages"], stats.get("evictable_pages", 0)
        used = stats["num_pages"] - free - cached
        self.kv_usage.set(used / stats["num_pages"])
        for state, pages in (("used", used), ("cached", cached), ("free", free)):
            self.kv_pages.labels(state).set(pages)
        preemptions = stats.get("num_preemptions", 0)
        if preemptions > self._preemptions_seen:  # the engine keeps the total; a Counter takes increments
            self.preemptions.inc(preemptions - self._preemptions_seen)
            self._preemptions_seen = preemptions
        if stats["prefix_cache_hit_rate"] is not None:
            self.hit_rate.set(stats["prefix_cache_hit_rate"])
        return generate_latest(self.registry)
