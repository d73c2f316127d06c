"""GGUF files for tests, written as llama.cpp's convert_hf_to_gguf.py writes them (transformers cannot write
GGUF), and transformers reading one back (the oracle for what a GGUF file means)."""

from __future__ import annotations

import contextlib
import functools
import math
import os

import numpy as np
import pytest
from gguf import MODEL_ARCH_NAMES, GGUFWriter, RopeScalingType, get_tensor_name_map
from gguf import GGMLQuantizationType as T
from gguf.quants import quantize

GGUF_ARCH = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma2": "gemma2"}  # HF model_type -> GGUF


def llama_cpp_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute: each head's rotate-half pairs (i, i + D/2) become neighbours."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama3_rope_factors(cfg) -> np.ndarray:
    """The rope_freqs tensor the converter writes for Llama 3.1 scaling: one divisor per RoPE frequency."""
    s = cfg.rope_parameters
    dim = cfg.head_dim
    freqs = 1.0 / (s["rope_theta"] ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    old, factor = s["original_max_position_embeddings"], s["factor"]
    low, high = s["low_freq_factor"], s["high_freq_factor"]
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, np.float32)


def write_gguf(path: str, hf_model, qtype: T = T.F32) -> str:
    """Write a transformers model as GGUF: matrices in `qtype` (F32 where rows do not fill its blocks), vectors
    in F32, names and metadata as llama.cpp's converter gives them."""
    cfg = hf_model.config
    arch = GGUF_ARCH[cfg.model_type]
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    w = GGUFWriter(path, arch)
    w.add_vocab_size(cfg.vocab_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    if (cfg.rope_parameters or {}).get("rope_type") == "linear":
        w.add_rope_scaling_type(RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(cfg.rope_parameters["factor"])
    if arch == "gemma2":
        w.add_attn_logit_softcapping(cfg.attn_logit_softcapping)
        w.add_final_logit_softcapping(cfg.final_logit_softcapping)
        w.add_sliding_window(cfg.sliding_window)
    arch_id = next(a for a, name in MODEL_ARCH_NAMES.items() if name == arch)
    names = get_tensor_name_map(arch_id, cfg.num_hidden_layers)
    for hf_name, tensor in hf_model.state_dict().items():
        if hf_name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        data = tensor.float().numpy()
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if arch == "llama" and ".attn_q." in name:
            data = llama_cpp_permute(data, cfg.num_attention_heads)
        if arch == "llama" and ".attn_k." in name:
            data = llama_cpp_permute(data, cfg.num_key_value_heads)
        if arch == "gemma2" and hf_name.endswith("norm.weight"):
            data = data + 1
        add_tensor(w, name, data, qtype if data.ndim == 2 else T.F32)
    if (cfg.rope_parameters or {}).get("rope_type") == "llama3":
        add_tensor(w, "rope_freqs.weight", llama3_rope_factors(cfg), T.F32)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def add_tensor(w: GGUFWriter, name: str, data: np.ndarray, qtype: T) -> None:
    from gguf import GGML_QUANT_SIZES

    if data.shape[-1] % GGML_QUANT_SIZES[qtype][0]:
        qtype = T.F32
    if qtype in (T.F32, T.F16):
        w.add_tensor(name, data.astype(np.float32 if qtype == T.F32 else np.float16))
    else:
        w.add_tensor(name, quantize(data.astype(np.float32), qtype), raw_dtype=qtype)


def transformers_from_gguf(path: str):
    """transformers' model (fp32) from a GGUF file: its config and its own dequantization and renaming
    (`from_pretrained(gguf_file=)` does the same but insists on `accelerate` being installed)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    folder, name = os.path.split(path)
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="eager").eval()
    tensors = load_gguf_checkpoint(path, return_tensors=True, model_to_load=model)["tensors"]
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    return model


@contextlib.contextmanager
def fast_transformers_gguf():
    """Speed up transformers' GGUF reading without changing what it reads: it parses the file with gguf's
    GGUFReader (three times for a tokenizer, config and weights), whose memmap views cost seconds for a 49k-token
    vocabulary (sgjax's reader subclass avoids them), and rebuilds gguf's tensor-name table once per module."""
    import gguf

    from sgjax.models.gguf import FastGGUFReader

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gguf, "GGUFReader", FastGGUFReader)
        mp.setattr(gguf, "get_tensor_name_map", functools.cache(gguf.get_tensor_name_map))
        yield
