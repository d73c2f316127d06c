"""Counters of the engine thread, for benchmarks and profiling: how many steps ran, how long the thread
waited on the device (device-bound) or not (host-bound), where the host's time went, how even the steps were."""

from __future__ import annotations

import collections
import dataclasses
import time

HOST_BOUND_WAIT_S = 0.5e-3  # a step whose results came this soon after the engine thread asked was host-bound


@dataclasses.dataclass(slots=True)
class StepRecord:
    """One launched step, for benchmarks' timelines and floors (EngineStats.step_log)."""

    launched: float  # perf_counter at launch
    decodes: int  # rows decoding one token
    prefill_tokens: int  # tokens of prompt chunks
    kv_tokens: int  # tokens of K/V its attention must read (a shared prefix once)
    waited: float = 0.0  # seconds the engine thread then waited for its results (0: the host was slower)


class EngineStats:
    """Written by the engine thread only; `timings()` may be read from any thread."""

    def __init__(self):
        self.num_steps = 0
        self.device_wait_s = 0.0  # engine thread blocked on step results: the device was the bottleneck
        self.num_host_bound_steps = 0  # steps whose results were ready (nearly) as soon as the thread asked
        self.step_tokens = self.step_tokens_sq = 0  # the steps' token counts (not padded), summed and squared
        self.busy_s = 0.0  # seconds from a first launch to the end of the last step of the run it began
        self._busy_since: float | None = None  # when the current run of steps began (None: idle)
        # Engine-thread seconds by phase: every phase present from the start, because timings() copies the
        # counter from another thread and a key added meanwhile would break that copy.
        self.host_s: collections.Counter[str] = collections.Counter(schedule=0.0, enqueue=0.0, process=0.0, masks=0.0)
        # Set to a list to record a StepRecord per step (benchmarks' timelines and floors)
        self.step_log: list[StepRecord] | None = None

    def launched(self, started: float, tokens: int, decodes: int, kv_tokens: int) -> StepRecord | None:
        """Count a step launched by work that began at `started`; its record if a log is kept."""
        if self._busy_since is None:
            self._busy_since = started
        self.num_steps += 1
        self.step_tokens += tokens
        self.step_tokens_sq += tokens * tokens
        if self.step_log is None:
            return None
        record = StepRecord(time.perf_counter(), decodes, tokens - decodes, kv_tokens)
        self.step_log.append(record)
        return record

    def collected(self, waited: float, record: StepRecord | None) -> None:
        """Count the seconds the thread waited for a step's results."""
        self.device_wait_s += waited
        self.num_host_bound_steps += waited < HOST_BOUND_WAIT_S
        if record is not None:
            record.waited = waited

    def idle(self) -> None:
        """The run of steps ended (nothing in flight)."""
        if self._busy_since is not None:
            self.busy_s += time.perf_counter() - self._busy_since
            self._busy_since = None

    def timings(self) -> dict:
        """The counters so far (benchmarks take differences): steps, host-bound steps, seconds busy (with steps
        to run: a served run's stepping span), the steps' tokens summed and squared (how even they were),
        seconds waited on the device, host seconds by phase."""
        busy, since = self.busy_s, self._busy_since  # in this order: a run ending meanwhile is not counted twice
        busy += time.perf_counter() - since if since is not None else 0.0
        return dict(steps=self.num_steps, host_bound_steps=self.num_host_bound_steps, busy_s=busy,
                    step_tokens=self.step_tokens, step_tokens_sq=self.step_tokens_sq,
                    device_wait_s=self.device_wait_s, host_s=dict(self.host_s))
