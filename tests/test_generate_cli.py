"""The README's main job: python -m sgjax.generate on a tiny checkpoint."""

import subprocess
import sys

import numpy as np

from sgjax.executor.greedy import greedy_generate
from sgjax.platform.mesh import make_mesh
from sgjax.models.loader import load_model, load_tokenizer


def test_cli_prints_the_greedy_continuation(tiny_models):
    path, _ = tiny_models("llama")
    out = subprocess.run(
        [sys.executable, "-m", "sgjax.generate", "--model-path", path, "--prompt", "Hello, my name is",
         "--max-new-tokens", "8", "--dtype", "float32"],
        capture_output=True, text=True, check=True, env={"JAX_PLATFORMS": "cpu", "PATH": ""},
    ).stdout
    tokenizer = load_tokenizer(path)
    ids = greedy_generate(load_model(path, make_mesh("1x1"), dtype="float32"),
                          [tokenizer.encode("Hello, my name is")], 8)[0]
    assert f"'Hello, my name is' -> {tokenizer.decode(ids)!r}" in out


def test_batched_generation_equals_one_prompt_at_a_time(tiny_models):
    """Sequences in one flat batch do not see each other's pages."""
    path, _ = tiny_models("mistral")
    loaded = load_model(path, make_mesh("1x1"), dtype="float32")
    prompts = [np.random.default_rng(i).integers(0, 512, n).tolist() for i, n in enumerate((3, 30, 11))]
    together = greedy_generate(loaded, prompts, 12, page_size=4)
    alone = [greedy_generate(loaded, [p], 12, page_size=4)[0] for p in prompts]
    assert together == alone


def test_main_job_answers_a_chat_question_with_the_bundled_model():
    """README's main command: no --model-path runs the bundled SmolLM2-135M-Instruct, whose greedy answer names
    the capital (its tokens equal transformers' on the same file: tests/test_gguf.py)."""
    out = subprocess.run(
        [sys.executable, "-m", "sgjax.generate", "--chat", "What is the capital of France?", "--max-new-tokens", "12"],
        capture_output=True, text=True, check=True, env={"JAX_PLATFORMS": "cpu", "PATH": ""},
    ).stdout
    assert out.startswith("'What is the capital of France?' -> ") and "Paris" in out, out
