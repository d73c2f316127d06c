"""The typed messages between an engine's caller side (the Engine API, the server) and its core (the engine
thread, in this process or a child process). Neither side reads the other's objects: a request goes in as a
GenerateRequest, its progress comes back as TokenDeltas, the last of them Finished."""

from __future__ import annotations

import dataclasses

from sgjax.engine.sampling_params import SamplingParams
from sgjax.multimodal.inputs import MultimodalInputs


@dataclasses.dataclass(slots=True)
class GenerateRequest:
    """One sequence to generate (a prompt with n samples is n of these, sharing `group`)."""

    wire_id: int  # the caller side's handle, unique per engine
    rid: str  # the request id users see (abort_request)
    prompt_ids: list[int]
    params: SamplingParams
    seed: int
    group: str | None = None  # the n samples of one prompt: one prefills, the others reuse its pages
    images: MultimodalInputs | None = None  # its images (vision-language models)


@dataclasses.dataclass(slots=True)
class TokenDelta:
    """What one request gained in one step: its new text and tokens since the last delta."""

    wire_id: int
    text: str
    output_ids: list[int]
    output_logprobs: list[float]
    output_top_logprobs: list[list[tuple[float, int]]]
    first_token_time: float | None  # time.monotonic() of its first output token
    cached_tokens: int  # prompt tokens found in the prefix cache
    admit_time: float | None  # time.monotonic() when it was first scheduled (it queued until then)
    # per new output token, the logprobs of the request's token_ids_logprob ids
    output_ids_logprobs: list[list[tuple[float, int]]] = dataclasses.field(default_factory=list)
    # prompt logprobs computed since the last delta (they come with the first output token):
    # prompt position -> (logprob of that prompt token, top alternatives, token_ids_logprob ids' logprobs)
    input_logprobs: dict[int, tuple[float, list, list]] | None = None

    @property
    def finished(self) -> bool:
        return False


@dataclasses.dataclass(slots=True)
class Finished(TokenDelta):
    """A request's last delta: why it ended."""

    finish_reason: dict = dataclasses.field(default_factory=dict)

    @property
    def finished(self) -> bool:
        return True

    @classmethod
    def aborted(cls, wire_id: int, message: str) -> "Finished":
        """The delta that ends a request as aborted, with nothing gained."""
        return cls(wire_id, "", [], [], [], None, 0, None, finish_reason={"type": "abort", "message": message})


@dataclasses.dataclass(slots=True)
class Abort:
    """Stop a request (by the id users see) and release its KV pages."""

    rid: str


@dataclasses.dataclass(slots=True)
class Error:
    """The engine process could not start (its traceback)."""

    message: str


# The phases of an engine's start-up, in order, as EngineCore reports them (the last ends when it is ready)
STARTUP_PHASES = ("loading weights", "loading the tokenizer", "allocating the KV pool",
                  "compiling the first step programs")


@dataclasses.dataclass(slots=True)
class StartupPhase:
    """The engine's start-up entered a phase (sent before it is ready; /health shows the latest)."""

    name: str  # "loading weights", "allocating the KV pool", ...
    step: int  # this phase's number, from 1
    steps: int  # how many phases a start-up has
