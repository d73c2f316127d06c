"""Perplexity of a model on a fixed English text (scripts/data/english.txt) through sgjax and through transformers,
on the same file and the same CPU: the two must agree within 1% (both dequantize a GGUF file the same way).

    python scripts/perplexity.py                     # the bundled SmolLM2-135M-Instruct
    python scripts/perplexity.py --model-path FILE.gguf
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
from bench_common import run_header

from sgjax.engine.text_side import load_text_side
from sgjax.executor.greedy import forward_logits
from sgjax.models.default_model import default_model_path
from sgjax.models.loader import load_model
from sgjax.platform.mesh import make_mesh

TEXT = os.path.join(os.path.dirname(__file__), "data", "english.txt")


def perplexity(logits: np.ndarray, ids: list[int]) -> float:
    """exp of the mean negative log-likelihood of each token after the first, from the logits before it."""
    logits = logits[:-1].astype(np.float64)
    top = logits.max(axis=-1, keepdims=True)
    log_probs = logits - (top + np.log(np.exp(logits - top).sum(axis=-1, keepdims=True)))
    return float(np.exp(-log_probs[np.arange(len(ids) - 1), ids[1:]].mean()))


def transformers_logits(path: str, ids: list[int]) -> np.ndarray:
    """transformers' float32 model from the GGUF file (its own dequantization), logits of every position."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    folder, name = os.path.split(path)
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    model.load_state_dict(load_gguf_checkpoint(path, return_tensors=True, model_to_load=model)["tensors"], strict=False)
    model.tie_weights()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-path", default=None, help="a GGUF file (default: the bundled SmolLM2-135M-Instruct)")
    p.add_argument("--max-tokens", type=int, default=2048)
    args = p.parse_args()
    path = args.model_path or default_model_path()
    print(run_header())
    started = time.perf_counter()
    loaded = load_model(path, make_mesh("1x1"), dtype="float32")
    load_s = time.perf_counter() - started
    tokenizer, _, _ = load_text_side(path, "auto", loaded.config.vocab_size)
    with open(TEXT) as f:
        ids = tokenizer.encode(f.read())[: args.max_tokens]
    started = time.perf_counter()
    ours = perplexity(forward_logits(loaded, [ids])[0], ids)
    ours_s = time.perf_counter() - started
    started = time.perf_counter()
    theirs = perplexity(transformers_logits(path, ids), ids)
    theirs_s = time.perf_counter() - started
    print(f"{os.path.basename(path)}: {len(ids)} tokens of {os.path.relpath(TEXT)}; sgjax weights loaded in {load_s:.1f} s")
    print(f"perplexity sgjax {ours:.4f} ({ours_s:.1f} s), transformers {theirs:.4f} ({theirs_s:.1f} s, incl. loading); "
          f"ratio {ours / theirs:.5f}")


if __name__ == "__main__":
    main()
