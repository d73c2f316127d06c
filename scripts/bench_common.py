"""What every benchmark here measures and prints the same way: timing loops, the device's limits, summaries,
tables and the header line that says where a figure came from.

Imported by the scripts as `from bench_common import ...` (Python puts a script's folder on the path); JAX is
imported only inside the functions that need it, so host-side scripts start without it.
"""

from __future__ import annotations

import shlex
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np


def run_header(device: bool = True) -> str:
    """Date, device, JAX version and command line of this run: what a figure needs to be traced back and
    re-run. `device=False` (host-side measurements) names the host's CPU instead of the accelerator."""
    parts = [time.strftime("%Y-%m-%d %H:%M %Z")]
    if device:
        import jax

        devices = jax.devices()
        parts += [f"{len(devices)} x {devices[0].device_kind}", f"jax {jax.__version__}"]
    else:
        parts.append(f"host {cpu_name()}")
    parts.append("command: " + shlex.join(["python", *sys.argv]))
    return " | ".join(parts)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        import platform

        return platform.machine()


# --- timing -------------------------------------------------------------------------------------------------

def synced_call_s(fn: Callable[[], Any], repeat: int, sync: bool = True) -> float:
    """Median seconds of `fn()`, each call waited for (jax.block_until_ready of its result) before the next:
    the latency of one call, host dispatch included. One call first compiles and warms up. `sync=False` for
    host work whose result must not be waited on (its transfers would be counted)."""
    import jax

    def call():
        out = fn()
        if sync:
            jax.block_until_ready(out)

    call()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def queued_call_s(fn: Callable, *args: Any, calls: int = 20, rounds: int = 5,
                  summary: Callable[[Sequence[float]], float] = np.median) -> float:
    """Seconds per call of `fn(*args)` with `calls` calls queued back to back (so host dispatch hides behind
    the device) and waited for together; `summary` (median, or min for a best case) over `rounds` rounds.
    One call first compiles and warms up."""
    import jax

    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(calls):
            out = fn(*args)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t0) / calls)
    return float(summary(times))


# --- the device's limits, measured in the same run as the figures compared with them ----------------------

def copy_bandwidth(nbytes: int = 4 << 30, calls: int = 10) -> float:
    """Bytes/s of a device-to-device copy, counting bytes read plus written: the ceiling of every floor here.

    32-bit words, copied back to back into the donated buffer and timed together. A bf16 `a + 1` timed one
    call at a time (copy_bandwidth_one_call) runs ~20% below the memory's rate in XLA and counts each call's
    launch and fresh output as copying: on an H200 2.8-2.9 TB/s, against 4.19 for this measure (4.18 in
    float32, 4.21-4.44 for a read-only sum; 3.32 for bf16 back to back), so floors taken with it were too
    lenient (docs/benchmark-history.md, "the copy bandwidth was mismeasured")."""
    import jax
    import jax.numpy as jnp

    x = jnp.ones((nbytes // 4,), jnp.uint32)
    copy = jax.jit(lambda a: a + 1, donate_argnums=0)  # a real read and write, in place
    x = copy(x).block_until_ready()
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(calls):
            x = copy(x)
        x.block_until_ready()
        times.append((time.perf_counter() - t0) / calls)
    return 2 * x.nbytes / min(times)


def copy_bandwidth_one_call(nbytes: int = 4 << 30) -> float:
    """The older, too low measure (bf16, one call at a time, fresh output), printed beside copy_bandwidth so
    that floors in older figures can be compared with today's."""
    import jax
    import jax.numpy as jnp

    x = jnp.ones((nbytes // 2,), jnp.bfloat16)
    copy = jax.jit(lambda a: a + 1)
    return 2 * x.nbytes / synced_call_s(lambda: copy(x), repeat=10)


def matmul_rate() -> float:
    """FLOP/s of a square 8192^3 bf16 matmul: the compute ceiling the floors use."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(1), (8192, 8192), jnp.bfloat16)
    b = jax.random.normal(jax.random.key(2), (8192, 8192), jnp.bfloat16)
    return 2 * 8192**3 / queued_call_s(jax.jit(lambda x, y: x @ y), a, b, calls=10)


def matmul_params(weights: Iterable, vocab_size: int) -> int:
    """Weights every prompt token is multiplied by: all but the input embedding (a row gather) and the LM
    head (only each sequence's last token goes through it), i.e. the arrays without a vocabulary dim."""
    return sum(x.size for x in weights if vocab_size not in x.shape)


def ratio_to_floor(floor_s: float, measured_s: float) -> float:
    """How close a measurement came to its physical floor: floor / measured, 1.0 (100%) at the limit."""
    return floor_s / measured_s


# --- summaries and tables -----------------------------------------------------------------------------------

def percentiles(values: Iterable[float], qs: Sequence[float] = (50, 90, 99), scale: float = 1.0) -> list[float]:
    """The `qs` percentiles of `values`, each times `scale` (1e3: seconds to ms)."""
    return [float(v) for v in np.percentile(np.asarray(values, np.float64) * scale, qs)]


def step_sizes(before: dict, after: dict) -> str:
    """Mean and standard deviation of the tokens of the steps between two Engine.timings()."""
    steps = max(after["steps"] - before["steps"], 1)
    mean = (after["step_tokens"] - before["step_tokens"]) / steps
    var = (after["step_tokens_sq"] - before["step_tokens_sq"]) / steps - mean * mean
    return f"{mean:.0f} +- {max(var, 0.0) ** 0.5:.0f} tokens a step"


class Table:
    """Columns of fixed width, each given as (title, format spec of its cells, e.g. ">8.2f"): the header and
    the rows take the width from the one spec, so they cannot drift apart. Rows come back as strings, to be
    printed as they are measured (a long sweep shows its progress).

    A title is aligned as the spec says, or, where it says nothing, to the right over numbers and to the
    left over text, as the cells below it."""

    def __init__(self, *columns: tuple[str, str], indent: str = "", sep: str = " "):
        self.columns, self.indent, self.sep = columns, indent, sep

    @staticmethod
    def _title_spec(spec: str) -> str:
        i = 0
        if len(spec) > 1 and spec[1] in "<>^=":
            align, i = spec[1], 2
        elif spec[:1] in ("<", ">", "^", "="):
            align, i = spec[0], 1
        else:
            align = ">" if spec.rstrip()[-1:] in tuple("bcdoxXneEfFgG%,_") else "<"
        width = ""
        while i < len(spec) and spec[i].isdigit():
            width += spec[i]
            i += 1
        return f"{align}{width}" if width else ""

    def header(self) -> str:
        return self.indent + self.sep.join(f"{title:{self._title_spec(spec)}}" for title, spec in self.columns)

    def row(self, *cells: Any) -> str:
        if len(cells) != len(self.columns):
            raise ValueError(f"{len(cells)} cells for {len(self.columns)} columns")
        return self.indent + self.sep.join(f"{cell:{spec}}" for cell, (_, spec) in zip(cells, self.columns))
