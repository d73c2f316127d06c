"""The model runner: compiled programs for every shape a step can take, built at start-up.

A step is two programs: the forward pass (one per token-count bucket; decode-sized buckets also have a
variant for steps with groups of sequences behind shared prefixes) and sampling (one per
SamplerFeatures: filtering and penalties, top logprobs, grammar bitmasks, random draws, each only
where needed; and per row bucket: the step's sequences rounded up, see row_buckets).
Every step has the same batch dimension (`max_running_requests` rows of metadata and sampling
parameters) and page-table width (`context_length / page_size`), and a token count padded up to the
next bucket (token_buckets). A step's host arrays go to the device packed in two buffers
(host_inputs.py), padded to one size for all programs, sampling parameters first: the forward pass and
sampling both read them from the same device buffers. All programs are compiled ahead of time
(`jit(...).lower(...).compile()`), so serving calls only compiled executables and can never trigger a
compilation. The KV pool and the penalty counts are donated to the forward pass, so XLA updates them
in place; a small program clears the penalty counts of penalised requests as they are admitted.

The forward pass's only fresh output is written into a donated buffer (the previous step's hidden
rows, already consumed by its sampling): XLA runs a step as CUDA graphs and re-records every graph
node whose buffers moved since the last run, and it places temporaries (the residual stream, the
attention metadata) inside output buffers, which are new at every call. With a hidden-rows output
and sampling parameters handed on as outputs, each call re-recorded ~410 of the ~540 nodes of a
mixed step, 1-1.5 ms of host time (BENCHMARKS.md, session 17). For the same reason the step's packed
inputs, new device buffers at every call, are first copied into two donated resident buffers, and every
other node (and sampling) reads them there: only the copy then reads memory that moved.

`launch` only enqueues a forward pass, `sample` its sampling, `collect` waits for the results. A
token sampled by the step still running can be the next step's input: the host writes -(row + 1) and
the step reads that row of the previous step's output on the device, so the host schedules step N+1
while the device runs step N. Sampling is separate so that a step with constrained requests can run
its forward pass while the host learns step N's tokens and computes the masks that depend on them.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec
from tqdm.auto import tqdm

from sgjax.executor.batch import SeqChunk, make_batch
from sgjax.cache.kv_pool import KVPool
from sgjax.constrained.bitmask import allow_all
from sgjax.executor.host_inputs import PackedLayout, pack, unpack
from sgjax.executor.sampler import (
    TOP_LOGPROBS,
    PenaltyState,
    SamplerFeatures,
    SamplingBatch,
    clear_penalty_rows,
    logit_bias_arrays,
    sample,
    update_penalty_state,
)
from sgjax.kernels.gpu import greedy_head
from sgjax.kernels.metadata import AttentionMetadata, SharedPrefixes, token_positions
from sgjax.models.llama import logits_from_head
from sgjax.models.loader import LoadedModel

STAGING_BUFFERS = 4  # host buffers a step's inputs are packed into, used in turn (ModelRunner.prepare)
CLEAR_SLOTS = 8  # penalty-state rows one call of the clearing program zeroes
LINEAR_BUCKET_STEP = 256
DECODE_BUCKET_STEP = 128
BUCKET_GROWTH = 1.25
SMALLEST_ROW_BUCKET, ROW_BUCKET_GROWTH = 64, 2
HALFWAY_ROW_BUCKETS = True  # row_buckets: also the points halfway between the doublings (off: A/B runs)
FUSED_GREEDY_HEAD = True  # all-greedy sampling through kernels/gpu/greedy_head.py where given a kernel (off: A/B)
FILTER_CUT_KERNEL = True  # top-k / top-p cuts through kernels/gpu/filter_cut.py where given a kernel (off: A/B)


def token_buckets(smallest: int, largest: int, step: int = LINEAR_BUCKET_STEP, decode_rows: int = 0,
                  decode_step: int = DECODE_BUCKET_STEP) -> list[int]:
    """Token counts to compile for: powers of two from `smallest` up to `step`, every multiple of
    `decode_step` up to `decode_rows`, then multiples of `step` growing by at least one step and at
    most ~BUCKET_GROWTH, up to the first one >= `largest`.

    Above a few hundred tokens a step's matmuls are compute-bound, so its time grows with the padded
    token count: with doubling buckets, a step of 250 decodes plus a 450-token prompt chunk ran as
    1024 tokens (such mixed steps took half of a ShareGPT-like run, BENCHMARKS.md). Growing by 25% at
    most bounds that waste while large prefill budgets still compile few buckets (17 up to 8448).
    Decode steps (one token a row, up to `decode_rows` = max_running_requests) get the finer
    `decode_step` grid: the scheduler fills a prefill step's bucket with prompt tokens, but a decode
    step has only its rows (366 rows ran as 512 tokens, 40% more matmul work, BENCHMARKS.md session 12).
    `decode_rows` itself is a bucket too, so a decode step of all rows never has more tokens than rows:
    the attention kernels take a step with more tokens than rows for a possible prefill (query blocks of
    16 tokens, no context splits; one row under a 16-token bucket decoded 10% slower).
    """
    buckets = [smallest]
    while buckets[-1] < largest:
        b = buckets[-1]
        if b < step:
            b *= 2
        elif b < decode_rows:
            b = (b // decode_step + 1) * decode_step
        else:
            b = max(b + step, -(-int(b * BUCKET_GROWTH) // step) * step)
        buckets.append(b)
    if 0 < decode_rows < largest:
        buckets = sorted(set(buckets) | {decode_rows})
    return buckets


def bucket_for(buckets: list[int], num_tokens: int) -> int:
    """The smallest of the (ascending) token buckets that holds a step of `num_tokens` tokens."""
    for t in buckets:
        if t >= num_tokens:
            return t
    raise ValueError(f"step of {num_tokens} tokens exceeds the largest compiled bucket {buckets[-1]}")


def row_buckets(max_seqs: int) -> list[int]:
    """Row counts to compile sampling for: 64, 128, 256, then each power of two and the point halfway to
    the next (384, 512, 768, 1024, 1536, ...) below max_seqs, then max_seqs.

    Sampling computes logits over the whole vocabulary per row: at 1024 running requests that is
    ~2.5 ms a step on an H100 (BENCHMARKS.md) even when only a few requests are left, while up to
    64 rows cost about what one does (reading the LM head dominates). From 256 rows on the LM head's
    matmul is compute-bound, and its time follows the padded rows (greedy sampling of 256 / 384 / 512
    rows: 0.80 / 0.99 / 1.21 ms, BENCHMARKS.md session 22), hence the halfway buckets there; below, a
    192-row bucket was slower than 256 rows (0.87 ms)."""
    buckets, rows = [], SMALLEST_ROW_BUCKET
    while rows < max_seqs:
        buckets.append(rows)
        halfway = rows * 3 // 2
        if HALFWAY_ROW_BUCKETS and rows >= 4 * SMALLEST_ROW_BUCKET and halfway < max_seqs:
            buckets.append(halfway)
        rows *= ROW_BUCKET_GROWTH
    return buckets + [max_seqs]


class ModelRunner:
    def __init__(self, loaded: LoadedModel, pool: KVPool, *, max_seqs: int, max_pages_per_seq: int,
                 max_tokens: int, min_bucket: int = 16, enable_prompt_logprobs: bool = False,
                 max_prefix_groups: int = 0, triton_kernels: str | None = None):
        """`triton_kernels` ("gpu", or "interpret" for CPU tests; kernels.triton_kernel_mode): sampling of
        all-greedy rows computes the LM head, argmax and logsumexp in one kernel (kernels/gpu/greedy_head.py)
        instead of writing float32 logits and reading them back; sampled rows with top-k / top-p filters
        find their cut without sorting the vocabulary (kernels/gpu/filter_cut.py)."""
        self.pool = pool
        self.page_size = pool.config.page_size
        self.max_seqs, self.max_pages = max_seqs, max_pages_per_seq
        self.buckets = token_buckets(min_bucket, max_tokens, decode_rows=max_seqs)
        # Steps with groups of sequences behind a shared prefix (sgjax/executor/shared_prefix.py) have their own
        # programs, whose metadata describes up to max_prefix_groups groups, for backends that read each
        # prefix once: only for buckets of up to one token per sequence row (decode-heavy steps; larger
        # ones are prefill-heavy, where the GPU backend's prefill kernel serves them better). Separate
        # programs, because the grouped path costs a step without groups ~11 us a layer (an H100 at
        # batch 1: ~5% of a decode step), and choosing between the paths on the device cost more.
        self.max_prefix_groups = max_prefix_groups
        self.head_kernel = triton_kernels if FUSED_GREEDY_HEAD else None
        self.filter_kernel = triton_kernels if FILTER_CUT_KERNEL else None
        self.num_shared_prefix_steps = 0  # steps launched with a shared prefix to read once
        graphdef, state = nnx.split(loaded.model)
        # The programs take the weights as a flat list: flattening an nnx.State costs ~0.3 ms a call.
        self.weights, self.state_def = jax.tree.flatten(state)
        model_def = (graphdef, self.state_def)
        # Sampling takes only the LM head's matrix: every argument costs host time at each call.
        names = [".".join(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))
                 for path, _ in jax.tree_util.tree_flatten_with_path(state)[0]]
        self.head = self.weights[names.index(loaded.model.head_weight_name)]
        self.penalties = PenaltyState.zeros(max_seqs, loaded.config.vocab_size)
        self.prev_tokens = jax.numpy.zeros((max_seqs,), np.int32)  # the last launched step's samples
        # Steps that return prompt logprobs compute logits for every token, so they are separate
        # programs, compiled only when enabled.
        # Program keys: (bucket, with prompt logprobs, grouped).
        keys = [(t, False, False) for t in self.buckets]
        keys += [(t, False, True) for t in self.buckets if self.prefix_groups_for(t)]
        keys += [(t, True, False) for t in self.buckets if enable_prompt_logprobs]
        # A step's host arrays travel packed in two buffers (host_inputs.py), laid out per program and padded
        # to one size for all (sampling reads its parameters from the front of any program's buffers),
        # written into one of STAGING_BUFFERS preallocated pairs in turn (not allocated per step: at 1024
        # sequences the page table alone is megabytes). A pair is rewritten only STAGING_BUFFERS
        # prepares later, by when the engine (at most one step in flight while it prepares the next) has
        # collected the step that used it; where the platform lets a transfer alias host memory (CPU),
        # the step must not still be waiting to run.
        layouts = {key: PackedLayout.of(self._abstract_inputs(key[0], key[2])) for key in keys}
        most = tuple(max(layout.sizes[i] for layout in layouts.values()) for i in (0, 1))
        self.layouts = {key: dataclasses.replace(layout, sizes=most) for key, layout in layouts.items()}
        self.sampling_layout = PackedLayout.of(self._abstract_inputs(self.buckets[0], False)[0])
        leading = len(self.sampling_layout.leaves)
        if any(layout.leaves[:leading] != self.sampling_layout.leaves for layout in layouts.values()):
            raise AssertionError("sampling parameters must lead every program's packed buffers (_abstract_inputs)")
        self._staging = [(np.zeros(most[0], np.int32), np.zeros(most[1], np.float32)) for _ in range(STAGING_BUFFERS)]
        self._next_staging = 0
        self._page_table = np.empty((max_seqs, max_pages_per_seq), np.int32)  # make_batch's, packed at once
        # The hidden rows' buffer, donated to each forward pass and written by it (see the module docstring).
        replicated = NamedSharding(loaded.mesh, PartitionSpec())
        hidden = jax.ShapeDtypeStruct((max_seqs, loaded.config.hidden_size), loaded.config.jnp_dtype,
                                      sharding=replicated)
        self._hidden = jax.device_put(np.zeros(hidden.shape, hidden.dtype), replicated)
        self._input_sharding = replicated
        inputs = tuple(jax.ShapeDtypeStruct((n,), dtype, sharding=replicated) for n, dtype in zip(most, (np.int32,
                                                                                                      np.float32)))
        # The resident input buffers (see the module docstring): one element longer than a step's, so that
        # copying a step's inputs into them is not simplified away into reading the fresh buffers.
        # (Made on the device: on the CPU a buffer put there from numpy can alias the host array, and is
        # then copied instead of donated.)
        self._resident = tuple(jnp.zeros(n + 1, dtype, device=replicated) for n, dtype in zip(most, (np.int32,
                                                                                                  np.float32)))
        resident = tuple(jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated) for x in self._resident)
        self.compiled = {}
        lowered = {}
        for key in tqdm(keys, desc="compiling steps", unit="program"):
            forward = jax.jit(functools.partial(_forward, model_def, key[1], self.layouts[key], replicated),
                              donate_argnums=(1, 2, 3, 4), keep_unused=True)  # the hidden buffer is only written
            lowered[key] = forward.lower(self.weights, pool.caches, self.penalties, hidden, resident, *inputs,
                                         self.prev_tokens)
            self.compiled[key] = lowered[key].compile()
        # Sampling takes the penalty counts as they come out of the forward pass (shapes and shardings).
        # (From the lowered shapes and compiled shardings: the compiled out_info fails on programs with
        # host callbacks, as the TPU interpreter's.)
        first = keys[0]
        _, _, penalties, _ = jax.tree.map(
            lambda info, sharding: jax.ShapeDtypeStruct(info.shape, info.dtype, sharding=sharding),
            lowered[first].out_info, self.compiled[first].output_shardings)
        all_allowed, no_bias = allow_all(max_seqs, loaded.config.vocab_size), logit_bias_arrays([], max_seqs)
        mask, *bias = (jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (all_allowed, *no_bias))
        self.row_buckets = row_buckets(max_seqs)
        variants = [(f, r) for f in SamplerFeatures.all() for r in self.row_buckets]
        self.sampler = {
            (features, rows): jax.jit(functools.partial(_sample, loaded.config.final_logit_softcap,
                                                        self.head_kernel, self.filter_kernel, features, rows,
                                                        self.sampling_layout)).lower(
                self.head, hidden, *resident, penalties, *((mask, *bias) if features.masked else (None,) * 3)).compile()
            for features, rows in tqdm(variants, desc="compiling sampling", unit="variant")}
        # The masked variant's defaults, kept on the device (placed as that variant takes them): a step with
        # a grammar but no biases, or biases but no grammar, sends only what it has (at 1024 rows and a
        # 128k vocabulary the bias arrays are 2.4 MB, an allow-all mask 16 MB).
        masked = next(program for (features, _), program in self.sampler.items() if features.masked)
        mask_sharding, *bias_shardings = masked.input_shardings[0][-3:]
        self._allow_all = jax.device_put(all_allowed, mask_sharding)
        self._no_bias = tuple(jax.device_put(x, s) for x, s in zip(no_bias, bias_shardings))
        shardings = jax.tree.map(lambda x: x.sharding, penalties)
        self._clear_penalties = jax.jit(clear_penalty_rows, donate_argnums=0, out_shardings=shardings).lower(
            penalties, jax.ShapeDtypeStruct((CLEAR_SLOTS,), np.int32)).compile()

    def _abstract_inputs(self, num_tokens: int, grouped: bool) -> tuple:
        """Shapes of a step's host arrays: (sampling, input_ids, positions, meta, last_token_index, targets).
        Sampling first, so it lies at the same offsets in every program's buffers (sampling reads it there)."""
        i32 = lambda *shape: jax.ShapeDtypeStruct(shape, np.int32)  # noqa: E731
        b = self.max_seqs
        meta = AttentionMetadata(slot_mapping=i32(num_tokens), page_table=i32(b, self.max_pages),
                                 kv_lens=i32(b), query_start_loc=i32(b + 1))
        if grouped:
            meta.shared = SharedPrefixes(group_starts=i32(self.max_prefix_groups + 1), shared_pages=i32(b))
        padding = SamplingBatch.build([], [], [], [], [], b, self.spare_slot)  # shapes and dtypes only
        sampling = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), padding)
        return sampling, i32(num_tokens), i32(num_tokens), meta, i32(b), i32(num_tokens)

    def prefix_groups_for(self, num_tokens: int) -> int:
        """How many shared-prefix groups a step of `num_tokens` tokens can describe (0: none)."""
        return self.max_prefix_groups if self.bucket_for(num_tokens) <= self.max_seqs else 0

    def bucket_for(self, num_tokens: int) -> int:
        return bucket_for(self.buckets, num_tokens)

    @property
    def spare_slot(self) -> int:
        """The PenaltyState row that padding rows write to."""
        return self.max_seqs

    def prepare(self, chunks: list[SeqChunk], sampling: SamplingBatch, features: SamplerFeatures,
                prompt_targets: list[list[int]] | None = None, prefix_groups: list[int] = ()) -> "PreparedStep":
        """Host-side inputs of one step (no device work, so it can overlap the device's).

        A chunk token -(r + 1) stands for the token sampled in row r of the previously launched step.
        With `prompt_targets` (per chunk, the token that follows each of its tokens, -1 where none is
        wanted) the step also returns each token's logprob of its target and the top alternatives.
        `prefix_groups`: sizes of the leading groups of chunks that may share prefixes (order_by_first_page).
        """
        total = sum(len(c.tokens) for c in chunks)
        num_tokens = self.bucket_for(total)
        with_prompt = prompt_targets is not None
        batch = make_batch(chunks, self.page_size, num_tokens=num_tokens, num_seqs=self.max_seqs,
                           max_pages=self.max_pages, pool_pages=self.pool.config.num_pages,
                           max_prefix_groups=0 if with_prompt or not prefix_groups else self.prefix_groups_for(total),
                           prefix_groups=prefix_groups, page_table_out=self._page_table)
        if batch.meta.shared is not None and not batch.meta.shared.shared_pages.any():
            batch.meta.shared = None  # the groups share too little: the plain program
        key = (num_tokens, with_prompt, batch.meta.shared is not None)
        self.num_shared_prefix_steps += key[2]
        kv_tokens = int(batch.meta.kv_lens.sum())
        if key[2]:  # each group's prefix is read once
            starts, shared = batch.meta.shared.group_starts, batch.meta.shared.shared_pages
            firsts = starts[:-1][starts[1:] > starts[:-1]]
            kv_tokens -= int(shared.sum() - shared[firsts].sum()) * self.page_size
        targets = np.full(num_tokens, -1, np.int32)
        if with_prompt:
            if key not in self.compiled:
                raise ValueError("prompt logprobs are not enabled in this engine (enable_prompt_logprobs)")
            flat = [t for per_chunk in prompt_targets for t in per_chunk]
            targets[: len(flat)] = flat
        staging = self._staging[self._next_staging]
        self._next_staging = (self._next_staging + 1) % STAGING_BUFFERS
        ints, floats = pack((sampling, batch.input_ids, batch.positions, batch.meta, batch.last_token_index, targets),
                            self.layouts[key], staging)
        return PreparedStep(ints, floats, key, features, len(chunks), total, kv_tokens)

    def launch(self, step: "PreparedStep") -> "StepHandle":
        """Enqueue a prepared step's forward pass; after `sample`, `collect` gives for each chunk's last
        token the sampled next token."""
        ints, floats = jax.device_put((step.ints, step.floats), self._input_sharding)
        (hidden, *prompt_out), self.pool.caches, self.penalties, self._resident = self.compiled[step.program](
            self.weights, self.pool.caches, self.penalties, self._hidden, self._resident, ints, floats,
            self.prev_tokens)
        self._hidden = hidden  # the next forward pass writes its rows here, after this step's sampling read them
        return StepHandle(hidden, *self._resident, step.features, tuple(prompt_out), step.num_chunks,
                          step.num_tokens)

    def sample(self, handle: "StepHandle", bitmask: np.ndarray | None = None,
               bias: tuple[np.ndarray, np.ndarray] | None = None) -> None:
        """Enqueue the sampling of a launched step; `bitmask` [max_seqs, V/32] limits rows to grammars,
        `bias` (sampler.logit_bias_arrays of max_seqs rows) adds logit biases. Before the next launch:
        that forward pass writes its hidden rows over this step's."""
        features = dataclasses.replace(handle.features, masked=bitmask is not None or bias is not None)
        out = self.sampler_for(features, handle.num_chunks)(self.head, handle.hidden, handle.ints, handle.floats,
                                                            self.penalties, *self.mask_args(bitmask, bias))
        self.prev_tokens, packed = out
        handle.device_outputs = (packed, *handle.prompt_outputs)
        # The results' transfers to the host start now, behind the sampling on the device: `collect` then
        # finds them there instead of copying them one after another once the host asks, after launching
        # the next step (round trips on the host's path from one step's results to the next launch). The
        # results come in one array (see _sample): collecting four cost the host 0.56-0.59 ms a step, one
        # 0.32-0.45 ms (H100, BENCHMARKS.md session 23).
        for x in handle.device_outputs:
            x.copy_to_host_async()

    def clear_penalty_slots(self, slots: list[int]) -> None:
        """Zero the penalty counts of `slots`, for requests that start over in them; enqueued, so a step
        launched after this call counts its tokens from zero."""
        for i in range(0, len(slots), CLEAR_SLOTS):
            ids = np.full(CLEAR_SLOTS, self.spare_slot, np.int32)
            part = slots[i:i + CLEAR_SLOTS]
            ids[:len(part)] = part
            self.penalties = self._clear_penalties(self.penalties, ids)

    def mask_args(self, bitmask: np.ndarray | None, bias: tuple[np.ndarray, np.ndarray] | None = None) -> tuple:
        """A sampling program's last three arguments: (bitmask, bias ids, bias values) for the masked
        variant, which runs when either is given (the other: allow everything, add nothing), all None
        for the others."""
        if bitmask is None and bias is None:
            return (None,) * 3
        return (self._allow_all if bitmask is None else bitmask, *(bias or self._no_bias))

    def sampler_for(self, features: SamplerFeatures, num_rows: int):
        """The compiled sampling program for a step of `num_rows` sequences."""
        return self.sampler[features, next(r for r in self.row_buckets if r >= num_rows)]

    @staticmethod
    def collect(handle: "StepHandle") -> "StepOutput":
        """Wait for a launched step and bring its results to the host."""
        n, (packed, *prompt_out) = handle.num_chunks, handle.device_outputs
        packed = np.asarray(packed)[:n]
        if packed.shape[1] > 2:
            k = (packed.shape[1] - 2) // 2  # TOP_LOGPROBS, or the vocabulary if smaller
            top_logprobs, top_ids = packed[:, 2:2 + k].view(np.float32), packed[:, 2 + k:]
        else:  # the step's sampling did not compute them
            top_logprobs, top_ids = np.zeros((n, TOP_LOGPROBS), np.float32), np.zeros((n, TOP_LOGPROBS), np.int32)
        result = StepOutput(packed[:, 0], packed[:, 1].view(np.float32), top_logprobs, top_ids)
        if prompt_out:
            result.prompt_logprobs, result.prompt_top_logprobs, result.prompt_top_ids = (
                np.asarray(x)[: handle.num_tokens] for x in prompt_out)
        return result


@dataclasses.dataclass
class PreparedStep:
    ints: np.ndarray  # the step's int32 host arrays, packed (host_inputs.py): token ids, metadata, ...
    floats: np.ndarray  # its float32 ones: sampling parameters
    program: tuple[int, bool, bool]  # (token count it is padded to, with prompt logprobs, grouped)
    features: SamplerFeatures
    num_chunks: int
    num_tokens: int
    kv_tokens: int  # tokens of K/V its attention must read at least (contexts; a shared prefix once)


@dataclasses.dataclass
class StepHandle:
    hidden: jax.Array  # [max_seqs, H]: each chunk's last hidden state (donated to the next forward pass)
    ints: jax.Array  # the step's packed host arrays, in the resident buffers; sampling reads its parameters there
    floats: jax.Array  # (both donated to the next forward pass)
    features: SamplerFeatures
    prompt_outputs: tuple  # with prompt targets: their logprobs and top alternatives
    num_chunks: int
    num_tokens: int
    device_outputs: tuple = ()  # once sampled; still computing until collected


@dataclasses.dataclass
class StepOutput:
    tokens: np.ndarray  # [n] int32
    logprobs: np.ndarray  # [n] float32, of the sampled tokens
    top_logprobs: np.ndarray  # [n, TOP_LOGPROBS] float32, best first
    top_ids: np.ndarray  # [n, TOP_LOGPROBS] int32
    # With prompt targets, per token of the flat batch:
    prompt_logprobs: np.ndarray | None = None  # [T] float32: logprob of the token's target
    prompt_top_logprobs: np.ndarray | None = None  # [T, TOP_LOGPROBS]
    prompt_top_ids: np.ndarray | None = None  # [T, TOP_LOGPROBS]


def _merge(model_def, weights):
    graphdef, state_def = model_def
    return nnx.merge(graphdef, jax.tree.unflatten(state_def, weights))


def _forward(model_def, with_prompt, layout, rows_sharding, weights, kv_caches, penalties, hidden_rows, resident, ints,
             floats, prev_tokens):
    # Into the donated resident buffers first, and read from there (see the module docstring).
    # The barrier keeps XLA from reading slices of the copy from the fresh buffers instead (it did on a GPU).
    resident = jax.lax.optimization_barrier(
        tuple(jax.lax.dynamic_update_slice(buffer, step, (0,)) for buffer, step in zip(resident, (ints, floats))))
    sampling, input_ids, positions, meta, rows, targets = unpack(*resident, layout)
    from_previous = jnp.clip(-input_ids - 1, 0, prev_tokens.shape[0] - 1)
    input_ids = jnp.where(input_ids < 0, prev_tokens[from_previous], input_ids)
    model = _merge(model_def, weights)
    hidden, kv_caches = model(input_ids, positions, kv_caches, meta)
    token_rows, token_pos = token_positions(meta, input_ids.shape[0])
    valid = jnp.arange(input_ids.shape[0]) < meta.query_start_loc[-1]
    penalties = update_penalty_state(penalties, sampling, input_ids, token_rows, token_pos, valid)
    # Into the donated buffer (same shape, dtype and sharding): an output XLA cannot fill with temporaries.
    out = (jax.lax.with_sharding_constraint(hidden[rows].astype(hidden_rows.dtype), rows_sharding),)
    if with_prompt:
        logprobs = jax.nn.log_softmax(model.compute_logits(hidden), axis=-1)
        target_logprobs = jnp.take_along_axis(logprobs, jnp.maximum(targets, 0)[:, None], axis=-1)[:, 0]
        top = jax.lax.top_k(logprobs, min(TOP_LOGPROBS, logprobs.shape[-1]))
        out = (*out, target_logprobs, top[0], top[1].astype(jnp.int32))
    return out, kv_caches, penalties, resident


def _sample(softcap, head_kernel, filter_kernel, features, rows, sampling_layout, head, hidden, ints, floats,
            penalties, bitmask, bias_ids, bias_values):
    """Sampling of the first `rows` rows (the step's sequences, rounded up); the other rows' outputs are
    zeros, so every variant returns max_seqs rows, as the next forward pass reads its tokens. The sampling
    parameters lie at the front of the step's packed buffers (ModelRunner._abstract_inputs). All-greedy
    rows with a `head_kernel` take the fused LM head + argmax (ModelRunner's docstring).

    Returns the tokens (for the next forward pass) and, for the host, one int32 array [max_seqs, W]: per
    row its token, its logprob's bits, and with top logprobs the TOP_LOGPROBS best logprobs' bits and
    their token ids (W = 2 + 2 * TOP_LOGPROBS; else 2)."""
    sampling = unpack(ints, floats, sampling_layout)
    full = hidden.shape[0]
    bias = None if bitmask is None else (bias_ids, bias_values)
    if rows < full:
        hidden, sampling = hidden[:rows], jax.tree.map(lambda x: x[:rows], sampling)
        bitmask = None if bitmask is None else bitmask[:rows]
        bias = None if bias is None else (bias_ids[:rows], bias_values[:rows])
    tiles = greedy_head.tiles_for(rows, *head.shape) if head_kernel and features == SamplerFeatures() else None
    if tiles:
        tokens, logprobs = greedy_head.greedy_from_head(hidden, head, softcap, interpret=head_kernel == "interpret",
                                                        **tiles)
    else:
        tokens, logprobs, top_logprobs, top_ids = sample(logits_from_head(hidden, head, softcap), sampling,
                                                         penalties, bitmask, features, bias, filter_kernel)
    columns = [tokens[:, None], jax.lax.bitcast_convert_type(logprobs, jnp.int32)[:, None]]
    if features.top_logprobs:
        columns += [jax.lax.bitcast_convert_type(top_logprobs, jnp.int32), top_ids]
    padding = [(0, full - rows), (0, 0)]
    return jnp.pad(tokens, padding[:1]), jnp.pad(jnp.concatenate(columns, axis=1), padding)
