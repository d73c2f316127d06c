"""The CPU path against Hugging Face transformers on the same CPU, with the bundled SmolLM2-135M-Instruct.

For each dtype (bf16, fp32) and each side, one run measures: batch-1 decode tokens/s, time to first token of a
200-token prompt, and the aggregate output tokens/s of 1, 4 and 16 requests at once (transformers: a batched,
left-padded `generate`); then the sgjax server's start-up time until /health_generate answers, with an empty
compilation cache (cold) and with the one the cold start filled (warm). Greedy decoding, EOS ignored, the same
prompts on both sides.

    python scripts/bench_cpu.py [--new-tokens 64] [--dtypes bfloat16 bfloat16-weights float32] [--no-server]

`bfloat16` is sgjax's default for an asked-for bfloat16 model on a CPU (float32 arithmetic on weights rounded to
bfloat16, a bfloat16 KV cache); `bfloat16-weights` keeps the weights in bfloat16 (`cpu_bf16_weights`, half their
memory). transformers runs bfloat16 in both rows. The table gives each side's weight bytes.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

import jax

from bench_common import Table, run_header

PROMPT_TOKENS = 200
CONCURRENCY = (1, 4, 16)


def prompt_source(tokenizer, length: int):
    """fresh(n): n prompts of `length` tokens from a fixed English text, never the same twice in a run."""
    text = open(os.path.join(os.path.dirname(__file__), "data", "english.txt")).read()
    ids = tokenizer.encode(text)
    start = [0]

    def fresh(n: int) -> list[list[int]]:
        rows = []
        for _ in range(n):
            at = start[0] % (len(ids) - length)
            rows.append(ids[at:at + length])
            start[0] += 7  # a different first token: no cached prefix
        return rows

    return fresh


def figures(generate, fresh, new_tokens: int) -> dict:
    """The table's figures through `generate(prompts, n)` (blocking; n new tokens each), every timed call on
    prompts it has not seen (no prefix-cache hits): time to first token (median of 3 one-token requests),
    batch-1 decode tokens/s (new_tokens more tokens against one, on fresh prompts of the same length), and
    aggregate output tokens/s of 1, 4 and 16 requests at once (prefill included)."""
    def timed(n: int, tokens: int) -> float:
        t0 = time.perf_counter()
        generate(fresh(n), tokens)
        return time.perf_counter() - t0

    for n in CONCURRENCY:  # compiles the shapes the timed runs take (each at its first use on a CPU)
        generate(fresh(n), new_tokens)
    ttft = sorted(timed(1, 1) for _ in range(3))[1]
    out = {"ttft_s": ttft, "decode_1": new_tokens / (timed(1, new_tokens + 1) - ttft)}
    for n in CONCURRENCY:
        out[f"agg_{n}"] = n * new_tokens / timed(n, new_tokens)
    return out


def sgjax_generate(engine):
    greedy = {"temperature": 0, "ignore_eos": True}

    def generate(batch: list[list[int]], n: int):
        out = engine.generate(input_ids=batch, sampling_params={**greedy, "max_new_tokens": n})
        assert all(len(o["output_ids"]) == n for o in out)

    return generate


def transformers_generate(model, pad_id: int):
    import torch

    def generate(rows: list[list[int]], n: int):
        width = max(map(len, rows))
        ids = torch.tensor([[pad_id] * (width - len(r)) + r for r in rows])
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                                 do_sample=False, pad_token_id=pad_id)
        assert out.shape[1] == width + n

    return generate


def transformers_model(path: str, dtype):
    """transformers' model of the GGUF file in `dtype`, dequantized by transformers itself
    (`from_pretrained(gguf_file=)` does the same but insists on the `accelerate` package)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    folder, name = os.path.split(path)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder, gguf_file=name), dtype=dtype).eval()
    tensors = load_gguf_checkpoint(path, return_tensors=True, model_to_load=model)["tensors"]
    missing, unexpected = model.load_state_dict({k: v.to(dtype) for k, v in tensors.items()}, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    model.tie_weights()
    return model


def server_start_s(cache_dir: str) -> float:
    """Seconds from launching `python -m sgjax.server` (the bundled model) to /health_generate answering 200."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "sgjax.server", "--port", str(port),
                             "--compilation-cache-dir", cache_dir], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError("the server exited while starting")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health_generate", timeout=60) as r:
                    if r.status == 200:
                        return time.perf_counter() - t0
            except OSError:
                time.sleep(0.2)
    finally:
        proc.terminate()
        proc.wait(30)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--dtypes", nargs="+", default=["bfloat16", "bfloat16-weights", "float32"],
                   choices=("bfloat16", "bfloat16-weights", "float32"))
    p.add_argument("--no-server", action="store_true", help="skip the server start-up times")
    args = p.parse_args()

    import torch

    from sgjax.engine import Engine
    from sgjax.models.default_model import default_model_path

    path = default_model_path()
    print(run_header(device=False), f"| {os.cpu_count()} cores | torch threads {torch.get_num_threads()}")
    table = Table(("side", "<13"), ("dtype", "<16"), ("weights MB", ">10.0f"), ("decode b1 tok/s", ">15.1f"),
                  ("TTFT 200 tok s", ">14.3f"), *((f"agg tok/s x{n}", ">14.1f") for n in CONCURRENCY))
    print(table.header())
    ratios = []
    transformers_runs = {}  # torch dtype -> (weights MB, figures): one run serves both bfloat16 rows
    for name in args.dtypes:
        dtype = name.removesuffix("-weights")
        engine = Engine(path, dtype=dtype, cpu_bf16_weights=name.endswith("-weights"), context_length=1024,
                        max_running_requests=16)
        tokenizer = engine.tokenizer
        weights_mb = sum(w.nbytes for w in jax.tree.leaves(engine.loaded.model)) / 1e6
        ours = figures(sgjax_generate(engine), prompt_source(tokenizer, PROMPT_TOKENS), args.new_tokens)
        engine.shutdown()
        if dtype not in transformers_runs:
            model = transformers_model(path, getattr(torch, dtype))
            tensors = {t.data_ptr(): t for t in model.state_dict().values()}  # a tied head counted once
            model_mb = sum(t.numel() * t.element_size() for t in tensors.values()) / 1e6
            transformers_runs[dtype] = model_mb, figures(transformers_generate(model, tokenizer.pad_token_id or 0),
                                                         prompt_source(tokenizer, PROMPT_TOKENS), args.new_tokens)
            del model
        model_mb, theirs = transformers_runs[dtype]
        for side, mb, f in (("sgjax", weights_mb, ours), ("transformers", model_mb, theirs)):
            print(table.row(side, name, mb, f["decode_1"], f["ttft_s"], *(f[f"agg_{n}"] for n in CONCURRENCY)))
        ratios.append(f"{name}: decode b1 {ours['decode_1'] / theirs['decode_1']:.2f}x transformers'; x16 aggregate "
                      f"{ours['agg_16'] / theirs['decode_1']:.2f}x transformers' b1, "
                      f"{ours['agg_16'] / theirs['agg_16']:.2f}x its batched generate")
    print("\n".join(ratios))
    if not args.no_server:
        with tempfile.TemporaryDirectory() as cache:
            cold = server_start_s(cache)
            warm = server_start_s(cache)
        print(f"server start until /health_generate, default flags: cold cache {cold:.1f} s, warm cache {warm:.1f} s")


if __name__ == "__main__":
    main()
