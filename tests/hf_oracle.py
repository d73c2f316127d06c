"""What transformers (PyTorch, CPU) says a model should output: the oracle for model numerics."""

import numpy as np
import torch
from transformers import DynamicCache


def hf_logits(model, prompt: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([prompt])).logits[0].float().numpy()


class RoundTripKVCache(DynamicCache):
    """A cache that stores K/V rounded through `dtype` (torch's cast: round to nearest), as a KV pool of
    that dtype holds them: attention then reads the rounded keys and values of every token, its own too."""

    def __init__(self, dtype: torch.dtype, **kwargs):
        super().__init__(**kwargs)
        self.round_dtype = dtype

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        def rounded(x):
            limit = torch.finfo(self.round_dtype).max
            return x.clamp(-limit, limit).to(self.round_dtype).to(x.dtype)

        return super().update(rounded(key_states), rounded(value_states), layer_idx, *args, **kwargs)


def hf_greedy(model, prompt: list[int], max_new_tokens: int, kv_dtype: torch.dtype | None = None) -> list[int]:
    """Greedy tokens, recomputing the whole sequence each step (no EOS stop); with `kv_dtype`, attention reads
    K/V rounded through that dtype (RoundTripKVCache), else no KV cache."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(max_new_tokens):
            cache = RoundTripKVCache(kv_dtype) if kv_dtype is not None else None
            logits = model(torch.tensor([ids]), past_key_values=cache, use_cache=cache is not None).logits
            ids.append(int(logits[0, -1].argmax()))
    return ids[len(prompt):]
