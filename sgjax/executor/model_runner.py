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
compilation; on a CPU (ShapePolicy.lazy, executor/buckets.py) each is compiled at its first step
instead. The KV pool and the penalty counts are donated to the forward pass, so XLA updates them in place;
a small program clears the penalty counts of penalised requests as they are admitted.

The forward pass's only fresh output is written into a donated buffer (the previous step's hidden
rows, already consumed by its sampling): XLA runs a step as CUDA graphs and re-records every graph
node whose buffers moved since the last run, and it places temporaries (the residual stream, the
attention metadata) inside output buffers, which are new at every call. With a hidden-rows output
and sampling parameters handed on as outputs, each call re-recorded ~410 of the ~540 nodes of a
mixed step, 1-1.5 ms of host time. For the same reason the step's packed
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
import logging
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec
from tqdm.auto import tqdm

from sgjax.cache.kv_pool import KVPool
from sgjax.constrained.bitmask import allow_all
from sgjax.executor.batch import SeqChunk, make_batch
from sgjax.executor.buckets import ACCELERATOR, ShapePolicy, bucket_for, row_buckets, token_buckets
from sgjax.executor.compile_queue import CacheCounter, CompileQueue, default_workers
from sgjax.executor.device_calls import ClearPenalties, DeviceCall, EncodeImages, Launch, Mirror, Sample
from sgjax.executor.host_inputs import PackedLayout, pack
from sgjax.executor.image_embeddings import ImageEmbeddingPool
from sgjax.executor.programs import forward, sample_step
from sgjax.executor.sampler import (
    PenaltyState,
    SamplerFeatures,
    SamplingBatch,
    clear_penalty_rows,
    logit_bias_arrays,
)
from sgjax.executor.step import PreparedStep, StepHandle, StepOutput
from sgjax.kernels.metadata import AttentionMetadata, SharedPrefixes
from sgjax.models.loader import LoadedModel
from sgjax.models.vision.spec import vision_spec

logger = logging.getLogger(__name__)

STAGING_BUFFERS = 4  # host buffers a step's inputs are packed into, used in turn (ModelRunner.prepare)
CLEAR_SLOTS = 8  # penalty-state rows one call of the clearing program zeroes

class ModelRunner:
    def __init__(self, loaded: LoadedModel, pool: KVPool, *, max_seqs: int, max_pages_per_seq: int,
                 max_tokens: int, shapes: ShapePolicy = ACCELERATOR, enable_prompt_logprobs: bool = False,
                 max_prefix_groups: int = 0, image_pool_rows: int = 0, max_image_patches: int = 0):
        """With the model's kernels (LoadedModel.kernels, sgjax.kernels.select), where it has them, sampling of all-greedy rows
        computes the LM head, argmax and logsumexp in one kernel instead of writing float32 logits and
        reading them back, and sampled rows with top-k / top-p filters find their cut without sorting the
        vocabulary.

        `shapes`: the smallest token and row buckets, and whether each program is compiled at its first step
        instead of all at start-up (a CPU's choice, where compiling every shape of a 30-layer model took 43 s on
        2 cores; JAX's persistent cache then serves a restart).

        A vision-language model (LoadedModel.vision) gets an image embedding pool of `image_pool_rows` rows and
        tower programs for images of up to `max_image_patches` input rows (image_embeddings.py); its steps take
        each token's row in that pool, and [3, T] positions where its VisionSpec has M-RoPE positions."""
        self.pool = pool
        # Host 0 of several: each device call goes to the other hosts first (device_calls.py)
        self.mirror: Mirror | None = None
        self.num_launches = 0
        self.images, self.mrope = None, False
        if loaded.vision is not None:
            spec = vision_spec(loaded.config.architecture)
            self.mrope = spec.mrope
            self.images = ImageEmbeddingPool(loaded.vision, spec, loaded.mesh, num_rows=image_pool_rows,
                                             hidden_size=loaded.config.hidden_size, dtype=loaded.config.jnp_dtype,
                                             max_patches=max_image_patches, lazy=shapes.lazy)
        self.shapes = shapes
        self.page_size = pool.config.page_size
        self.max_seqs, self.max_pages = max_seqs, max_pages_per_seq
        self.buckets = token_buckets(shapes.min_token_bucket, max_tokens, shapes.token_step, decode_rows=max_seqs)
        # Steps with groups of sequences behind a shared prefix (sgjax/executor/shared_prefix.py) have their own
        # programs, whose metadata describes up to max_prefix_groups groups, for backends that read each
        # prefix once: only for buckets of up to one token per sequence row (decode-heavy steps; larger
        # ones are prefill-heavy, where the GPU backend's prefill kernel serves them better). Separate
        # programs, because the grouped path costs a step without groups ~11 us a layer (an H100 at
        # batch 1: ~5% of a decode step), and choosing between the paths on the device cost more.
        self.max_prefix_groups = max_prefix_groups
        self.kernels = loaded.kernels
        self.num_shared_prefix_steps = 0  # steps launched with a shared prefix to read once
        graphdef, state = nnx.split(loaded.model)
        # The programs take the weights as a flat list: flattening an nnx.State costs ~0.3 ms a call.
        self.weights, self.state_def = jax.tree.flatten(state)
        model_def = (graphdef, self.state_def)
        # Sampling takes only the LM head's matrix: every argument costs host time at each call.
        names = [".".join(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))
                 for path, _ in jax.tree_util.tree_flatten_with_path(state)[0]]
        self.head = self.weights[names.index(loaded.model.head_weight_name)]
        if loaded.mesh.devices.flat[0].platform == "cpu" and self.head.dtype != jnp.float32:
            # A float32 copy for sampling: XLA's CPU dot of a bfloat16 [vocab, hidden] head into float32 logits
            # converts the whole head at every call (SmolLM2's, one row: 114 ms against 9.5 ms in float32).
            self.head = self.head.astype(jnp.float32)
        self.penalties = PenaltyState.zeros(max_seqs, loaded.config.vocab_size)
        self.prev_tokens = jax.numpy.zeros((max_seqs,), np.int32)  # the last launched step's samples
        # Steps that return prompt logprobs compute logits for every token, so they are separate programs:
        # compiled at start-up with enable_prompt_logprobs, else each at its first step (a loglikelihood
        # request then waits for its compile once; a server that never sees one compiles none).
        # Program keys: (bucket, with prompt logprobs, grouped).
        keys = [(t, False, False) for t in self.buckets]
        keys += [(t, False, True) for t in self.buckets if self.prefix_groups_for(t)]
        keys += [(t, True, False) for t in self.buckets]
        self.program_keys = [k for k in keys if enable_prompt_logprobs or not k[1]]  # compiled at start-up
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
        self.compiled, self.sampler = {}, {}

        def compile_forward(key):
            step = jax.jit(functools.partial(forward, model_def, key[1], self.layouts[key], replicated),
                           donate_argnums=(1, 2, 3, 4), keep_unused=True)  # the hidden buffer is only written
            lowered = step.lower(self.weights, pool.caches, self.penalties, hidden, resident, *inputs, self.prev_tokens,
                                 *self._image_pool())
            self.compiled[key] = lowered.compile()
            return lowered

        self._compile_forward = compile_forward
        # Sampling takes the penalty counts as they come out of the forward pass (shapes and shardings).
        # (From the lowered shapes and compiled shardings: the compiled out_info fails on programs with
        # host callbacks, as the TPU interpreter's.)
        first = keys[0]
        # On a CPU the start compiles only these two programs; the bar says what the wait is.
        first_programs = tqdm(total=2, desc="compiling the first step programs", unit="program", disable=not shapes.lazy)
        _, _, penalties, _ = jax.tree.map(
            lambda info, sharding: jax.ShapeDtypeStruct(info.shape, info.dtype, sharding=sharding),
            compile_forward(first).out_info, self.compiled[first].output_shardings)
        all_allowed, no_bias = allow_all(max_seqs, loaded.config.vocab_size), logit_bias_arrays([], max_seqs)
        mask, *bias = (jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (all_allowed, *no_bias))
        self.row_buckets = row_buckets(max_seqs, shapes.min_row_bucket)

        def compile_sampler(features, rows):
            # Replicated results (what XLA chose anyway on the meshes tried): every host can read them, host 0
            # among them when the mesh spans several
            self.sampler[features, rows] = jax.jit(functools.partial(
                sample_step, loaded.config.final_logit_softcap, self.kernels.greedy_head,
                self.kernels.top_k_top_p_keep, features, rows, self.sampling_layout),
                out_shardings=replicated).lower(
                self.head, hidden, *resident, penalties, *((mask, *bias) if features.masked else (None,) * 3)).compile()

        self._compile_sampler = compile_sampler
        first_programs.update()
        masked_variant = (SamplerFeatures(masked=True), self.row_buckets[0])
        compile_sampler(*masked_variant)
        first_programs.update()
        first_programs.close()
        self.queue = None if shapes.lazy else self._compile_in_background(masked_variant)
        # The masked variant's defaults, kept on the device (placed as that variant takes them): a step with
        # a grammar but no biases, or biases but no grammar, sends only what it has (at 1024 rows and a
        # 128k vocabulary the bias arrays are 2.4 MB, an allow-all mask 16 MB).
        masked = self.sampler[masked_variant]
        mask_sharding, *bias_shardings = masked.input_shardings[0][-3:]
        self._allow_all = jax.device_put(all_allowed, mask_sharding)
        self._no_bias = tuple(jax.device_put(x, s) for x, s in zip(no_bias, bias_shardings))
        shardings = jax.tree.map(lambda x: x.sharding, penalties)
        self._clear_penalties = jax.jit(clear_penalty_rows, donate_argnums=0, out_shardings=shardings).lower(
            penalties, jax.ShapeDtypeStruct((CLEAR_SLOTS,), np.int32)).compile()

    def _compile_in_background(self, done_variant) -> CompileQueue:
        """Queue every other start-up program on a pool of threads (compile_queue.py) and wait only for those
        that let any step run: the largest token bucket (a stand-in for every smaller one) and greedy and
        all-feature sampling of the most rows (stand-ins for every variant). The rest compile while the
        server serves: each row bucket's greedy sampling and each token bucket in ascending order first
        (decodes and short prompts), then the shared-prefix programs and the other sampling variants."""
        started, counter = time.perf_counter(), CacheCounter()
        queue = CompileQueue(default_workers())
        largest_rows = self.row_buckets[-1]
        every_feature = SamplerFeatures(filtered=True, top_logprobs=True, masked=True, sampled=True)
        plain = [k for k in self.program_keys if not k[1] and not k[2]]
        needed = [("forward", plain[-1]), ("sampler", (SamplerFeatures(), largest_rows)),
                  ("sampler", (every_feature, largest_rows))]
        later = [("sampler", (SamplerFeatures(), r)) for r in self.row_buckets]
        later += [("forward", k) for k in plain] + [("forward", k) for k in self.program_keys if k[2]]
        later += [("sampler", (f, r)) for f in SamplerFeatures.all() for r in self.row_buckets]
        later += [("forward", k) for k in self.program_keys if k[1]]  # prompt logprobs: wait for theirs
        done = {("forward", self.program_keys[0]), ("sampler", done_variant)}

        def submit(items):
            for kind, key in items:
                if (kind, key) not in done:
                    queue.submit((kind, key), functools.partial(self._compile_forward, key) if kind == "forward"
                                 else functools.partial(self._compile_sampler, *key))

        # The rest only once these are done: tracing holds the GIL, and with every program queued at once the
        # first ones shared it with all the others (a warm Llama-3-8B start waited 30 s for 3 cached programs).
        submit(needed)
        for item in tqdm(needed, desc="compiling the first step programs", unit="program"):
            queue.wait(item)
        ready = len(queue) + len(done)
        submit(later)
        total = len(queue) + len(done)
        logger.info("%d of %d step programs ready in %.1f s (%s); the rest compile in the background",
                    ready, total, time.perf_counter() - started, counter.summary())

        def log_when_done(_):
            if queue.pending() == 0 and counter.stop():
                logger.info("all %d step programs compiled %.1f s after the start (%s)", total,
                            time.perf_counter() - started, counter.summary())

        queue.add_done_callback(log_when_done)
        return queue

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
        positions = i32(3, num_tokens) if self.mrope else i32(num_tokens)
        if self.images is not None:  # and each token's image embedding row
            return sampling, i32(num_tokens), positions, meta, i32(b), i32(num_tokens), i32(num_tokens)
        return sampling, i32(num_tokens), positions, meta, i32(b), i32(num_tokens)

    def _image_pool(self) -> tuple:
        """The forward pass's last argument: the image embedding pool, for vision-language models only."""
        return () if self.images is None else (self.images.pool,)

    def prefix_groups_for(self, num_tokens: int) -> int:
        """How many shared-prefix groups a step of `num_tokens` tokens can describe (0: none)."""
        return self.max_prefix_groups if self.bucket_for(num_tokens) <= self.max_seqs else 0

    def bucket_for(self, num_tokens: int) -> int:
        return bucket_for(self.buckets, num_tokens)

    def _compiled_bucket(self, num_tokens: int) -> int:
        """The token bucket a plain step of `num_tokens` runs in: its own, or while that one still compiles in
        the background, the smallest larger one that is ready (the largest always is)."""
        bucket = self.bucket_for(num_tokens)
        if self.queue is None or (bucket, False, False) in self.compiled:
            return bucket
        return next((b for b in self.buckets if b >= bucket and (b, False, False) in self.compiled), bucket)

    @property
    def spare_slot(self) -> int:
        """The PenaltyState row that padding rows write to."""
        return self.max_seqs

    def prepare(self, chunks: list[SeqChunk], sampling: SamplingBatch, features: SamplerFeatures,
                prompt_targets: list[list[int]] | None = None, prefix_groups: list[int] = ()) -> PreparedStep:
        """Host-side inputs of one step (no device work, so it can overlap the device's).

        A chunk token -(r + 1) stands for the token sampled in row r of the previously launched step.
        With `prompt_targets` (per chunk, the token that follows each of its tokens, -1 where none is
        wanted) the step also returns each token's logprob of its target and the top alternatives.
        `prefix_groups`: sizes of the leading groups of chunks that may share prefixes (order_by_first_page).
        """
        total = sum(len(c.tokens) for c in chunks)
        with_prompt = prompt_targets is not None
        num_tokens = self.bucket_for(total) if with_prompt else self._compiled_bucket(total)
        # a shared-prefix program still compiling in the background: the plain one instead (on a CPU: at first use)
        grouped = (not with_prompt and bool(prefix_groups)
                   and (self.queue is None or (num_tokens, False, True) in self.compiled))
        batch = make_batch(chunks, self.page_size, num_tokens=num_tokens, num_seqs=self.max_seqs,
                           max_pages=self.max_pages, pool_pages=self.pool.config.num_pages,
                           max_prefix_groups=self.prefix_groups_for(total) if grouped else 0,
                           prefix_groups=prefix_groups, page_table_out=self._page_table,
                           images=self.images is not None, mrope=self.mrope)
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
            flat = [t for per_chunk in prompt_targets for t in per_chunk]
            targets[: len(flat)] = flat
        staging = self._staging[self._next_staging]
        self._next_staging = (self._next_staging + 1) % STAGING_BUFFERS
        inputs = (sampling, batch.input_ids, batch.positions, batch.meta, batch.last_token_index, targets)
        if self.images is not None:
            inputs += (batch.image_rows,)
        ints, floats = pack(inputs, self.layouts[key], staging)
        return PreparedStep(ints, floats, key, features, len(chunks), total, kv_tokens)

    def launch(self, step: PreparedStep) -> StepHandle:
        """Enqueue a prepared step's forward pass; after `sample`, `collect` gives for each chunk's last
        token the sampled next token."""
        handle = self._run(Launch(step, self.num_launches), self._launch, step)
        self.num_launches += 1
        return handle

    def _launch(self, step: PreparedStep) -> StepHandle:
        ints, floats = jax.device_put((step.ints, step.floats), self._input_sharding)
        if step.program not in self.compiled:  # lazy (a CPU, or prompt logprobs): its first step
            self._compile_lazily(f"the forward pass of {step.program[0]} tokens", ("forward", step.program),
                                 self._compile_forward, step.program)
        (hidden, *prompt_out), self.pool.caches, self.penalties, self._resident = self.compiled[step.program](
            self.weights, self.pool.caches, self.penalties, self._hidden, self._resident, ints, floats,
            self.prev_tokens, *self._image_pool())
        self._hidden = hidden  # the next forward pass writes its rows here, after this step's sampling read them
        return StepHandle(hidden, *self._resident, step.features, tuple(prompt_out), step.num_chunks,
                          step.num_tokens, index=self.num_launches)

    def sample(self, handle: StepHandle, bitmask: np.ndarray | None = None,
               bias: tuple[np.ndarray, np.ndarray] | None = None, variant: tuple | None = None) -> None:
        """Enqueue the sampling of a launched step; `bitmask` [max_seqs, V/32] limits rows to grammars,
        `bias` (sampler.logit_bias_arrays of max_seqs rows) adds logit biases. Before the next launch:
        that forward pass writes its hidden rows over this step's. `variant`: the (features, rows) program
        host 0 chose (device_calls.py); else chosen here (sampler_for)."""
        if variant is None:
            features = dataclasses.replace(handle.features, masked=bitmask is not None or bias is not None)
            variant, _ = self.sampler_for(features, handle.num_chunks)
        self._run(Sample(handle.index, variant, bitmask, bias), self._sample, handle, variant, bitmask, bias)

    def _sample(self, handle: StepHandle, variant: tuple, bitmask: np.ndarray | None,
                bias: tuple[np.ndarray, np.ndarray] | None) -> None:
        out = self._sampler(variant)(self.head, handle.hidden, handle.ints, handle.floats, self.penalties,
                                     *self.mask_args(bitmask, bias, variant[0].masked))
        self.prev_tokens, packed = out
        handle.device_outputs = (packed, *handle.prompt_outputs)
        # The results' transfers to the host start now, behind the sampling on the device: `collect` then
        # finds them there instead of copying them one after another once the host asks, after launching
        # the next step (round trips on the host's path from one step's results to the next launch). The
        # results come in one array (see _sample): collecting four cost the host 0.56-0.59 ms a step, one
        # 0.32-0.45 ms (H100).
        for x in handle.device_outputs:
            x.copy_to_host_async()

    def clear_penalty_slots(self, slots: list[int]) -> None:
        """Zero the penalty counts of `slots`, for requests that start over in them; enqueued, so a step
        launched after this call counts its tokens from zero."""
        self._run(ClearPenalties(list(slots)), self._clear_penalty_slots, slots)

    def _clear_penalty_slots(self, slots: list[int]) -> None:
        for i in range(0, len(slots), CLEAR_SLOTS):
            ids = np.full(CLEAR_SLOTS, self.spare_slot, np.int32)
            part = slots[i:i + CLEAR_SLOTS]
            ids[:len(part)] = part
            self.penalties = self._clear_penalties(self.penalties, ids)

    def encode_images(self, images: list[tuple[np.ndarray, tuple[int, ...], np.ndarray]]) -> None:
        """Enqueue the vision tower on images (ImageEmbeddingPool.encode): their rows land in the image pool."""
        self._run(EncodeImages(images), self.images.encode, images)

    def _run(self, call: DeviceCall, enqueue, *args):
        """Enqueue a device call here, sent to the other hosts first where there are any: they start on it while
        this host does (on a CPU, compiling its program at its first step)."""
        if self.mirror is None:
            return enqueue(*args)
        self.mirror.send(call)
        try:
            return enqueue(*args)
        except BaseException as e:  # the other hosts run it: this host can never be in step with them again
            self.mirror.lost_step(e)
            raise

    def mask_args(self, bitmask: np.ndarray | None, bias: tuple[np.ndarray, np.ndarray] | None = None,
                  masked: bool | None = None) -> tuple:
        """A sampling program's last three arguments: (bitmask, bias ids, bias values) for the masked
        variant, which runs when either is given or `masked` says so (what is not given: allow everything,
        add nothing), all None for the others."""
        if not masked and bitmask is None and bias is None:
            return (None,) * 3
        return (self._allow_all if bitmask is None else bitmask, *(bias or self._no_bias))

    def _compile_lazily(self, what: str, queued: tuple, compile_fn, *key) -> None:
        """Compile a program at its first step, saying so: the step waits for it (seconds on a CPU, unless
        JAX's persistent cache has it from an earlier start). One the background queue has (`queued`) is
        waited for instead."""
        started = time.perf_counter()
        if self.queue is not None and queued in self.queue:
            self.queue.wait(queued)
            logger.info("waited %.1f s for %s, compiling in the background", time.perf_counter() - started, what)
            return
        compile_fn(*key)
        logger.info("compiled %s at its first step in %.1f s", what, time.perf_counter() - started)

    def wait_until_compiled(self) -> None:
        """Block until every program queued at start-up has compiled (tests, benchmarks)."""
        if self.queue is not None:
            self.queue.wait_all()

    def sampler_for(self, features: SamplerFeatures, num_rows: int) -> tuple[tuple, object]:
        """(variant, compiled sampling program) for a step of `num_rows` sequences with `features`: the
        step's own variant or, while it compiles in the background, a ready one with more rows and every
        feature the step uses (its results are the same: greedy rows take the argmax in every variant)."""
        variant = (features, next(r for r in self.row_buckets if r >= num_rows))
        if variant in self.sampler:
            return variant, self.sampler[variant]
        if self.queue is not None:
            stand_ins = [v for v in list(self.sampler) if v[1] >= variant[1] and _covers(v[0], features)]
            if stand_ins:
                best = min(stand_ins, key=lambda v: (v[1], sum(dataclasses.astuple(v[0]))))
                return best, self.sampler[best]
        return variant, self._sampler(variant)

    def _sampler(self, variant: tuple):
        """The compiled sampling program of `variant`, compiled now if it is not yet (a CPU's first use)."""
        if variant not in self.sampler:
            self._compile_lazily(f"sampling of {variant[1]} rows ({variant[0]})", ("sampler", variant),
                                 self._compile_sampler, *variant)
        return self.sampler[variant]

    @staticmethod
    def collect(handle: StepHandle) -> StepOutput:
        """Wait for a launched step and bring its results to the host."""
        return StepOutput.of(handle)


def _covers(have: SamplerFeatures, need: SamplerFeatures) -> bool:
    return all(h or not n for h, n in zip(dataclasses.astuple(have), dataclasses.astuple(need)))
