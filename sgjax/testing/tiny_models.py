"""Tiny random Hugging Face checkpoints of each supported family, made offline with transformers.

Tests load them into sgjax and compare with the same transformers model (the oracle); the README's
main job uses one to run end to end without a model hub. Needs torch (`pip install torch==2.13.0`).
"""

from __future__ import annotations

import os

# Every family: several layers, GQA (8 query / 4 KV heads), and the family's own quirks switched on.
BASE = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
            num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=512,
            initializer_range=0.2, rms_norm_eps=1e-6)
FAMILIES = {
    # Llama 3.1 rope scaling with a short original context, so the scaling changes the result.
    "llama": ("LlamaConfig", dict(rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                                     high_freq_factor=4.0, original_max_position_embeddings=64),
                                  rope_theta=500000.0, attention_bias=True)),
    "mistral": ("MistralConfig", dict(sliding_window=8)),
    "qwen2": ("Qwen2Config", dict(tie_word_embeddings=True)),
    # head_dim 32 != hidden/heads (8): any head_dim works.
    "qwen3": ("Qwen3Config", dict(head_dim=32)),
    "gemma2": ("Gemma2Config", dict(head_dim=16, sliding_window=8, query_pre_attn_scalar=24,
                                    attn_logit_softcapping=1.0, final_logit_softcapping=0.5,
                                    hidden_activation="gelu_pytorch_tanh")),
}
CHAT_TEMPLATE = (
    "{% if tools %}<|system|>You may call: {{ tools | tojson }}<|end|>{% endif %}"
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello, my name is sgjax and I serve language models on JAX.",
    "def main():\n    print('hello world')\n",
    '{"name": "Widget", "price": 12.5, "tags": ["a", "b"]}',
    "Once upon a time there was a radix tree that shared prefixes between requests.",
]


def make_hf_config(family: str, **overrides):
    """The transformers config of a tiny model of `family` (overrides win)."""
    import transformers

    class_name, extra = FAMILIES[family]
    return getattr(transformers, class_name)(**{**BASE, **extra, **overrides})


def make_tokenizer(vocab_size: int):
    """A byte-level BPE tokenizer trained on a few sentences, with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|bos|>", "<|eos|>", "<|pad|>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|eos|>",
                                   pad_token="<|pad|>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def make_tiny_model(path: str, family: str = "llama", *, seed: int = 0, max_shard_size: str = "100KB",
                    **overrides):
    """Save a random `family` model (sharded safetensors + tokenizer) to `path`; return the torch model."""
    import torch
    import transformers

    cfg = make_hf_config(family, **overrides)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").float().eval()
    with torch.no_grad():  # HF zero-initialises biases and sets norms to 1: randomise so they matter
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_((0.0 if family == "gemma2" else 1.0) + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.2 * torch.randn_like(p))
        if family == "gemma2":  # its scaled, tied embedding would otherwise drown the layers' output
            model.model.embed_tokens.weight.mul_(0.1)
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path, max_shard_size=max_shard_size, safe_serialization=True)
    make_tokenizer(cfg.vocab_size).save_pretrained(path)
    return model
