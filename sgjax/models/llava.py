"""LLaVA-1.5 / LLaVA-NeXT's language model: a Llama, Mistral or Qwen2 decoder whose image placeholder tokens take
the vision tower's rows (models/vision/llava.py), spliced in as Qwen2-VL's are (models/qwen2_vl.py), with plain 1D
positions.

The checkpoint nests the decoder: transformers 5 saves `language_model.model.*` and `language_model.lm_head.*`
(as the llava-hf checkpoints have them), its in-memory names are `model.language_model.*` and `lm_head.*`; the
loader reads our `model.*` / `lm_head.*` from whichever is there (`checkpoint_prefixes`).
"""

from __future__ import annotations

from typing import ClassVar

from sgjax.models.qwen2_vl import Qwen2VLForConditionalGeneration


class LlavaForConditionalGeneration(Qwen2VLForConditionalGeneration):
    checkpoint_prefixes: ClassVar[dict[str, tuple[str, ...]]] = {
        "model.": ("language_model.model.", "model.language_model."),
        "lm_head.": ("language_model.lm_head.", "lm_head."),
    }
