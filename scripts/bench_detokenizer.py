"""Host time of incremental detokenization per token: the Rust stream against the window of Python decodes.

The engine thread detokenizes every running request's new token each step (a served ShareGPT-like run:
~190 a step), so its cost per token is host time the step loop must hide under the device's step.
Decodes Python standard-library source re-encoded by the tokenizer, token by token, both ways, and checks
both texts against decoding the whole.

    python scripts/bench_detokenizer.py --tokenizer DIR   # default: train a 128k-vocabulary one (a minute)
"""

from __future__ import annotations

import argparse
import inspect
import json
import tempfile
import time

from bench_common import run_header
from transformers import AutoTokenizer

from sgjax.engine import detokenizer
from sgjax.engine.detokenizer import IncrementalDetokenizer, stream_backend
from sgjax.testing.bench_tokenizer import train_bench_tokenizer


def per_token_us(tokenizer, ids: list[int], repeats: int) -> tuple[float, str]:
    """Best of `repeats` passes over `ids`: microseconds a token, and the text."""
    best = float("inf")
    for _ in range(repeats):
        detok = IncrementalDetokenizer(tokenizer)
        start = time.perf_counter()
        for i in ids:
            detok.add(i)
        detok.flush()
        best = min(best, time.perf_counter() - start)
    return best / len(ids) * 1e6, detok.text


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokenizer", default=None, help="folder with a tokenizer (default: train the bench one)")
    p.add_argument("--tokens", type=int, default=8000)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    print(run_header(device=False))
    folder = args.tokenizer or tempfile.mkdtemp()
    if not args.tokenizer:
        train_bench_tokenizer(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    text = (inspect.getsource(json) + inspect.getsource(argparse)) * 4
    ids = tokenizer.encode(text, add_special_tokens=False)[: args.tokens]
    whole = tokenizer.decode(ids, skip_special_tokens=True)
    stream_us, stream_text = per_token_us(tokenizer, ids, args.repeats)
    saved, detokenizer.DecodeStream = detokenizer.DecodeStream, None  # the window of Python decodes
    try:
        window_us, window_text = per_token_us(tokenizer, ids, args.repeats)
    finally:
        detokenizer.DecodeStream = saved
    print(f"{len(ids)} tokens, vocabulary {len(tokenizer)}: stream {stream_us:.2f} us a token "
          f"(used: {stream_backend(tokenizer) is not None}), window {window_us:.2f} us a token "
          f"({window_us / stream_us:.1f}x); both equal to decoding the whole: "
          f"{stream_text == whole and window_text == whole}")


if __name__ == "__main__":
    main()
