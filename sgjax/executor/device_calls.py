"""A model runner's device calls as records: what host 0's runner sends to the other hosts, and what they replay.

With the mesh across hosts every host must run the same programs, with the same inputs, in the same order (JAX
runs one program on all hosts' devices; a host that runs another one waits forever in its collectives). Host 0
schedules; its runner hands each device call, with every choice already made (the token bucket and the sampling
variant, which depend on which programs have finished compiling on that host), to `ModelRunner.mirror` before
enqueueing it. The other hosts run the same calls on their own runners through `Replayer`.
"""

from __future__ import annotations

import dataclasses
from typing import NoReturn, Protocol

import numpy as np

from sgjax.executor.step import PreparedStep


@dataclasses.dataclass
class Launch:
    step: PreparedStep
    index: int  # the runner's count of launches before this one: both hosts' runners count alike


@dataclasses.dataclass
class Sample:
    index: int  # the launch it samples (always the latest)
    variant: tuple  # (SamplerFeatures, rows): the program host 0 chose
    bitmask: np.ndarray | None
    bias: tuple[np.ndarray, np.ndarray] | None


@dataclasses.dataclass
class ClearPenalties:
    slots: list[int]


@dataclasses.dataclass
class EncodeImages:
    images: list[tuple[np.ndarray, tuple[int, ...], np.ndarray]]  # (pixel_values, grid, pool rows)


DeviceCall = Launch | Sample | ClearPenalties | EncodeImages


class Mirror(Protocol):
    """Where host 0's runner sends its device calls (engine/step_channel.py: StepSender)."""

    def send(self, call: DeviceCall) -> None: ...

    def lost_step(self, error: BaseException) -> NoReturn:
        """A call sent to the other hosts failed here: the hosts can no longer run in step."""


class Replayer:
    """Runs host 0's device calls on this host's runner (a ModelRunner built with the same shapes)."""

    def __init__(self, runner):
        self.runner = runner
        self.handle = None  # the latest launch's StepHandle, which the next Sample samples
        self.num_calls = 0

    def __call__(self, call: DeviceCall) -> None:
        self.num_calls += 1
        if isinstance(call, Launch):
            if call.index != self.runner.num_launches:
                raise RuntimeError(f"host 0's launch {call.index} arrived as this host's {self.runner.num_launches}: "
                                   "the hosts are out of step")
            self.handle = self.runner.launch(call.step)
        elif isinstance(call, Sample):
            if self.handle is None or call.index != self.handle.index:
                raise RuntimeError(f"host 0 samples launch {call.index}, which is not this host's latest")
            self.runner.sample(self.handle, call.bitmask, call.bias, variant=call.variant)
        elif isinstance(call, ClearPenalties):
            self.runner.clear_penalty_slots(call.slots)
        elif isinstance(call, EncodeImages):
            self.runner.images.encode(call.images)
        else:
            raise TypeError(f"not a device call: {call!r}")
