"""Constrained (JSON schema) decoding on a GPU: jump-forward speed-up and the cost of grammar masks.

One engine (dummy weights of a real shape, a trained tokenizer of the real vocabulary size, see
sgjax/testing/bench_tokenizer.py) runs the same batch three ways:
  jump-forward   JSON schema with long fixed keys, forced text appended in one step;
  step-by-step   the same schema, forced tokens one decode step each (--disable-jump-forward):
                 the same tokens as jump-forward, so the ratio is jump-forward's speed-up;
  free           no constraint, each request generating as many tokens as it did constrained: the
                 ratio step-by-step / free is the overhead of computing and applying masks.
Most of that schema's text is forced, so most of its steps force one token and fill no mask. Two more
modes time the case where every row fills a full mask every step:
  free-text      a schema whose only field is a free string ({"notes": "..."}), --free-text-tokens
                 tokens per request, nearly all inside the string;
  free-text-free no constraint, the same lengths: the ratio is the overhead of a full mask per row.

    python scripts/bench_constrained.py --model llama-3-8b --num-requests 64
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import tempfile
import time

import numpy as np
from bench_common import Table, run_header

from sgjax.config import add_engine_arguments, engine_args_from_namespace
from sgjax.engine import Engine
from sgjax.models.presets import PRESETS, write_preset
from sgjax.testing.bench_tokenizer import train_bench_tokenizer


def long_key_schema(num_fields: int) -> dict:
    """Long fixed keys with short values: most of each output is text the schema forces."""
    keys = [f"customer_account_record_field_number_{i}_with_a_long_descriptive_name" for i in range(num_fields)]
    values = [{"type": "integer", "minimum": 0, "maximum": 999}, {"type": "boolean"},
              {"enum": ["active", "suspended", "closed"]}]
    return {"type": "object", "properties": {k: values[i % 3] for i, k in enumerate(keys)},
            "required": keys, "additionalProperties": False}


def run(engine: Engine, prompts: list[list[int]], params: list[dict]) -> dict:
    requests = [r for p, sp in zip(prompts, params) for r in engine.make_requests(input_ids=p, sampling_params=sp)]
    stats = engine.stats
    steps, host, waited = stats.num_steps, stats.host_s.copy(), stats.device_wait_s
    t0 = time.perf_counter()
    asyncio.run(engine.run_to_end(requests))
    elapsed = time.perf_counter() - t0
    tokens = sum(len(r.output_ids) for r in requests)
    num_steps = stats.num_steps - steps
    host = {k: (stats.host_s[k] - host[k]) / num_steps * 1e3 for k in ("schedule", "enqueue", "process", "masks")}
    host["wait"] = (stats.device_wait_s - waited) / num_steps * 1e3
    return dict(elapsed=elapsed, tokens=tokens, tps=tokens / elapsed, steps=num_steps, host=host,
                lengths=[len(r.output_ids) for r in requests], texts=[r.text for r in requests],
                ids=[list(r.output_ids) for r in requests])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama-3-8b", choices=sorted(PRESETS))
    p.add_argument("--tokenizer", default=None, help="folder with a tokenizer; default: train one (minutes)")
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--num-fields", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=128)
    add_engine_arguments(p, only=("mesh", "max_running_requests", "context_length", "attention_backend"),
                         defaults={"max_running_requests": 64, "context_length": 2048})
    p.add_argument("--free-text-tokens", type=int, default=200)
    p.add_argument("--repeats", type=int, default=5, help="runs of each mode; the median run is reported")
    args = p.parse_args()
    print(run_header())

    folder = tempfile.mkdtemp()
    write_preset(args.model, folder)
    vocab = PRESETS[args.model][1]["vocab_size"]
    if args.tokenizer:
        for name in os.listdir(args.tokenizer):
            if name.startswith(("tokenizer", "special_tokens")):
                shutil.copy(os.path.join(args.tokenizer, name), folder)
    else:
        train_bench_tokenizer(folder, vocab)
    engine = Engine(args=engine_args_from_namespace(args, model_path=folder, load_format="dummy"))
    schema = json.dumps(long_key_schema(args.num_fields))
    rng = np.random.default_rng(0)
    prompts = [rng.integers(100, min(20000, vocab), args.prompt_len).tolist() for _ in range(args.num_requests)]
    constrained = [{"json_schema": schema, "temperature": 0, "max_new_tokens": 1500}] * args.num_requests

    notes = json.dumps({"type": "object", "properties": {"notes": {"type": "string"}}, "required": ["notes"],
                        "additionalProperties": False})
    # sampled, so a dummy model's string does not close at once; its free twin samples too
    # (seeded: the same lengths every run, which the twin copies)
    free_text = [{"json_schema": notes, "temperature": 1.0, "max_new_tokens": args.free_text_tokens, "seed": i}
                 for i in range(args.num_requests)]
    run(engine, prompts[:2], constrained[:2])  # warm-up: compile the schemas, touch every program
    run(engine, prompts[:2], free_text[:2])
    params = {"jump-forward": constrained, "step-by-step": constrained, "free": None,
              "free-text": free_text, "free-text-free": None}
    runs = {mode: [] for mode in params}
    for _ in range(args.repeats):  # the modes interleaved, so drift in the device's speed hits each alike
        for mode in runs:
            engine.flush_cache()
            # read by the engine thread each step; the engine is idle here
            engine.args.disable_jump_forward = mode == "step-by-step"
            runs[mode].append(run(engine, prompts, params[mode]))
            if mode in ("jump-forward", "free-text") and len(runs[mode]) == 1:  # the free twin's lengths
                params["free" if mode == "jump-forward" else "free-text-free"] = [
                    {"temperature": params[mode][0]["temperature"], "ignore_eos": True, "max_new_tokens": n,
                     "seed": i} for i, n in enumerate(runs[mode][0]["lengths"])]
    engine.shutdown()
    results = {mode: sorted(rs, key=lambda r: r["tps"])[len(rs) // 2] for mode, rs in runs.items()}  # medians

    valid = sum(json.loads(t) is not None for t in results["jump-forward"]["texts"])
    same = sum(a == b for a, b in zip(results["jump-forward"]["ids"], results["step-by-step"]["ids"]))
    print(f"model {args.model}, {args.num_requests} requests, prompt {args.prompt_len} tokens, "
          f"{args.num_fields} long-key fields, vocabulary {vocab}; median of {args.repeats} runs per mode")
    for mode, rs in runs.items():
        print(f"  {mode} tok/s over the runs: " + " ".join(f"{r['tps']:.0f}" for r in rs))
    print(f"valid JSON: {valid}/{args.num_requests}; requests with identical tokens jump-forward / step-by-step: "
          f"{same}/{args.num_requests} (bf16: a chunk and single decode steps may round differently)")
    phases = ("schedule", "enqueue", "process", "masks", "wait")
    print(f"(the last {len(phases)} columns: the engine thread's ms a step by phase)")
    table = Table(("mode", "14s"), ("tokens", "8d"), ("steps", "6d"), ("seconds", "8.2f"), ("tok/s", "9.0f"),
                  ("ms/step", "8.2f"), *((phase, "8.2f") for phase in phases))
    print(table.header())
    for name, r in results.items():
        print(table.row(name, r["tokens"], r["steps"], r["elapsed"], r["tps"], r["elapsed"] / r["steps"] * 1e3,
                        *(r["host"][phase] for phase in phases)))
    jf, sbs, fr = (results[k]["tps"] for k in ("jump-forward", "step-by-step", "free"))
    ft, ftf = (results[k]["tps"] for k in ("free-text", "free-text-free"))
    print(f"jump-forward speed-up (medians): {jf / sbs:.2f}x; constraint overhead (step-by-step vs free): "
          f"{(fr / sbs - 1) * 100:.1f}%; with a full mask per row every step (free-text vs its free twin): "
          f"{(ftf / ft - 1) * 100:.1f}%")


if __name__ == "__main__":
    main()
