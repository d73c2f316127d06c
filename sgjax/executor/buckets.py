"""The shapes steps are compiled for: token-count buckets of the forward pass and row buckets of sampling.

Every step runs a program compiled ahead of time for its padded shape, so these lists fix what start-up
compiles and how much padding a step carries.
"""

from __future__ import annotations

import dataclasses

LINEAR_BUCKET_STEP = 256
DECODE_BUCKET_STEP = 128
BUCKET_GROWTH = 1.25
SMALLEST_ROW_BUCKET, ROW_BUCKET_GROWTH = 64, 2
HALFWAY_ROW_BUCKETS = True  # row_buckets: also the points halfway between the doublings (off: A/B runs)


def token_buckets(smallest: int, largest: int, step: int = LINEAR_BUCKET_STEP, decode_rows: int = 0,
                  decode_step: int = DECODE_BUCKET_STEP) -> list[int]:
    """Token counts to compile for: powers of two from `smallest` up to `step`, every multiple of
    `decode_step` up to `decode_rows`, then multiples of `step` growing by at least one step and at
    most ~BUCKET_GROWTH, up to the first one >= `largest`.

    Above a few hundred tokens a step's matmuls are compute-bound, so its time grows with the padded
    token count: with doubling buckets, a step of 250 decodes plus a 450-token prompt chunk ran as
    1024 tokens (such mixed steps took half of a ShareGPT-like run). Growing by 25% at
    most bounds that waste while large prefill budgets still compile few buckets (17 up to 8448).
    Decode steps (one token a row, up to `decode_rows` = max_running_requests) get the finer
    `decode_step` grid: the scheduler fills a prefill step's bucket with prompt tokens, but a decode
    step has only its rows (366 rows ran as 512 tokens, 40% more matmul work).
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


def row_buckets(max_seqs: int, smallest: int = SMALLEST_ROW_BUCKET) -> list[int]:
    """Row counts to compile sampling for: `smallest` (64), then doublings up to 256, then each power of two
    and the point halfway to the next (384, 512, 768, 1024, 1536, ...) below max_seqs, then max_seqs.

    Sampling computes logits over the whole vocabulary per row: at 1024 running requests that is
    ~2.5 ms a step on an H100 even when only a few requests are left, while up to
    64 rows cost about what one does (reading the LM head dominates). From 256 rows on the LM head's
    matmul is compute-bound, and its time follows the padded rows (greedy sampling of 256 / 384 / 512
    rows: 0.80 / 0.99 / 1.21 ms), hence the halfway buckets there; below, a
    192-row bucket was slower than 256 rows (0.87 ms). On a CPU the head's matmul is compute-bound from one
    row on, so there the buckets start at 1 (`smallest`)."""
    buckets, rows = [], smallest
    while rows < max_seqs:
        buckets.append(rows)
        halfway = rows * 3 // 2
        if HALFWAY_ROW_BUCKETS and rows >= 4 * SMALLEST_ROW_BUCKET and halfway < max_seqs:
            buckets.append(halfway)
        rows *= ROW_BUCKET_GROWTH
    return buckets + [max_seqs]


@dataclasses.dataclass(frozen=True)
class ShapePolicy:
    """Which shapes a platform compiles steps for, and when."""

    min_token_bucket: int
    min_row_bucket: int
    lazy: bool  # compile a shape at its first step, not at start-up
    token_step: int = LINEAR_BUCKET_STEP  # token_buckets' `step`: their spacing past the powers of two


# On an accelerator a step of 16 tokens or 64 sampled rows costs what one does (reading the weights
# dominates), and every shape is compiled before serving. On a CPU matmuls are compute-bound from one
# row (a batch-1 decode padded to 16 tokens did 16x the work, a 200-token prompt padded to 256 28% more),
# and compiling every shape of a 30-layer model took 43 s on 2 cores: shapes start at 1, are 32 tokens
# apart, and compile at their first use, into JAX's persistent cache, which serves them at the next start.
ACCELERATOR = ShapePolicy(min_token_bucket=16, min_row_bucket=SMALLEST_ROW_BUCKET, lazy=False)
CPU = ShapePolicy(min_token_bucket=1, min_row_bucket=1, lazy=True, token_step=32)


SHAPE_POLICIES = {"accelerator": ACCELERATOR, "cpu": CPU}


def shape_policy(name: str, platform: str) -> ShapePolicy:
    """The ShapePolicy called `name` ("auto": the platform's, "cpu" or "accelerator")."""
    if name == "auto":
        return CPU if platform == "cpu" else ACCELERATOR
    if name not in SHAPE_POLICIES:
        raise ValueError(f"unknown shape policy {name!r}; choose from auto, {', '.join(SHAPE_POLICIES)}")
    return SHAPE_POLICIES[name]
