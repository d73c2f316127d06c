"""Configs of well-known checkpoints, so benchmarks can build real model shapes with dummy weights
and no download: `write_preset(name, folder)` writes the folder's config.json."""

from __future__ import annotations

PRESETS = {
    "llama-3-8b": ("LlamaConfig", dict(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192, rms_norm_eps=1e-5,
        rope_theta=500000.0, tie_word_embeddings=False, dtype="bfloat16")),
    "llama-3.2-1b": ("LlamaConfig", dict(
        vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
        num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=131072,
        rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=True, dtype="bfloat16",
        rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=8192))),
    "qwen2.5-7b": ("Qwen2Config", dict(
        vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
        num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=32768, rms_norm_eps=1e-6,
        rope_theta=1000000.0, tie_word_embeddings=False, dtype="bfloat16")),
    # Not a real checkpoint: a shape small enough to run the benchmark scripts on a CPU, to check them
    # before spending accelerator time.
    "tiny-llama": ("LlamaConfig", dict(
        vocab_size=1024, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192, rms_norm_eps=1e-5,
        tie_word_embeddings=False, dtype="float32")),
}


def write_preset(name: str, folder: str) -> str:
    """Write `folder/config.json` for preset `name`; return folder."""
    import transformers

    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose from {sorted(PRESETS)}")
    class_name, kwargs = PRESETS[name]
    architecture = class_name.removesuffix("Config") + "ForCausalLM"
    getattr(transformers, class_name)(architectures=[architecture], **kwargs).save_pretrained(folder)
    return folder
