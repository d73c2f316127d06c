"""A request's state as it moves waiting -> running -> finished (and back to waiting if preempted)."""

from __future__ import annotations

import collections
import dataclasses
import enum
from typing import Any

import numpy as np

from sgjax.engine.detokenizer import IncrementalDetokenizer
from sgjax.engine.sampling_params import SamplingParams
from sgjax.multimodal.inputs import MultimodalInputs


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclasses.dataclass(eq=False)
class Request:
    rid: str
    prompt_ids: list[int]
    params: SamplingParams
    seed: int
    detokenizer: IncrementalDetokenizer | None = None
    extra_key: Any = None  # requests with different extra keys never share cached prefixes
    group: str | None = None  # the n samples of one prompt: one prefills, the others reuse its pages
    wire_id: int = -1  # the caller side's handle (GenerateRequest.wire_id), named in its TokenDeltas
    matcher: Any = None  # llguidance.LLMatcher of the request's constraint, advanced token by token
    images: MultimodalInputs | None = None  # its images (vision-language models)
    # image index -> its rows in the runner's image embedding pool, while its tokens still have to run
    image_rows: dict[int, np.ndarray] = dataclasses.field(default_factory=dict)
    # Without jump-forward: the forced tokens still to emit one step each, as computed after the last
    # freely sampled token (None: not computed since then).
    forced_queue: collections.deque | None = None
    output_ids: list[int] = dataclasses.field(default_factory=list)
    output_logprobs: list[float] = dataclasses.field(default_factory=list)
    output_top_logprobs: list[list[tuple[float, int]]] = dataclasses.field(default_factory=list)
    output_ids_logprobs: list[list[tuple[float, int]]] = dataclasses.field(default_factory=list)  # token_ids_logprob's
    # prompt position -> (logprob of that prompt token, top alternatives, token_ids_logprob ids' logprobs)
    input_logprobs: dict[int, tuple[float, list, list]] = dataclasses.field(default_factory=dict)
    num_input_sent: int = 0  # prompt positions already reported in TokenDeltas
    status: Status = Status.WAITING
    # KV state: pages[:num_tree_pages] belong to the radix tree (held by a lock on `tree_node`),
    # the rest to this request. num_computed tokens of fill_ids have their K/V in `pages`. The list is
    # only ever appended to in place or replaced by another list (`page_array` relies on it).
    pages: list[int] = dataclasses.field(default_factory=list)
    num_tree_pages: int = 0
    tree_node: Any = None
    num_computed: int = 0
    # With overlap scheduling, tokens sampled by launched but unprocessed steps are not known on the
    # host yet: up to two (step N's, and N+1's which ran on N's). At a launch at most the previous
    # step's token is unknown, and unknown_row is its row there.
    num_unknown: int = 0
    unknown_row: int = -1
    slot: int = -1  # row in the sampler's penalty state while running
    cached_tokens: int = 0  # prompt tokens found in the radix cache on first admission
    admitted: bool = False
    admit_time: float | None = None  # time.monotonic() of its first admission: it queued until then
    finish_reason: dict | None = None
    text: str = ""
    regex_checked: int = 0  # characters of text already searched for a stop_regex match
    num_sent: int = 0  # output tokens already reported in TokenDeltas
    first_token_time: float | None = None

    _page_cache: tuple[list[int], np.ndarray] | None = dataclasses.field(default=None, repr=False)

    def page_array(self) -> np.ndarray:
        """`pages` as an int32 array, kept between steps: converting every running request's pages from
        Python ints each step cost ~0.5-5 ms of host time at 256-1024 requests of ~170 pages."""
        cached = self._page_cache
        if cached is None or cached[0] is not self.pages:
            array = np.asarray(self.pages, np.int32)
        elif len(cached[1]) < len(self.pages):  # pages appended since
            array = np.concatenate([cached[1], np.asarray(self.pages[len(cached[1]):], np.int32)])
        else:
            return cached[1]
        self._page_cache = (self.pages, array)
        return array

    @property
    def fill_ids(self) -> list[int]:
        """Every token whose K/V the request needs: the prompt, then all outputs so far."""
        return self.prompt_ids + self.output_ids

    @property
    def key(self) -> np.ndarray:
        """The radix cache's key of fill_ids: images' placeholders keyed by their content (multimodal/inputs.py)."""
        if self.images is not None:
            return np.concatenate([self.images.cache_key, np.asarray(self.output_ids, np.int32)])
        return np.asarray(self.fill_ids, dtype=np.int32)

    @property
    def num_pending(self) -> int:
        """Tokens to run before the next sample (the rest of the prompt, or the last sampled token)."""
        return len(self.prompt_ids) + len(self.output_ids) + self.num_unknown - self.num_computed

    def chunk_tokens(self, n: int) -> list[int]:
        """The next n tokens to run; the unknown token is written -(row + 1) (see ModelRunner.launch)."""
        start, end, p = self.num_computed, self.num_computed + n, len(self.prompt_ids)
        if start >= p:  # a decode: no copy of the whole sequence
            tokens = self.output_ids[start - p:end - p]
        else:
            tokens = self.prompt_ids[start:end] + self.output_ids[:max(end - p, 0)]
        if len(tokens) < n:
            tokens.append(-(self.unknown_row + 1))
        return tokens

    def surely_finishes(self, context_length: int) -> bool:
        """Whether the token in flight is the last one anyway (no point scheduling another step)."""
        total = len(self.output_ids) + self.num_unknown
        return self.num_unknown > 0 and (total >= self.params.max_new_tokens or
                                         len(self.prompt_ids) + total >= context_length)

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED
