"""config.json `architectures[0]` -> model class."""

from __future__ import annotations

import importlib

# architecture name -> "module:Class"; Mistral and Qwen are Llama with different config flags.
ARCHITECTURES = {
    "LlamaForCausalLM": "sgjax.models.llama:LlamaForCausalLM",
    "MistralForCausalLM": "sgjax.models.llama:LlamaForCausalLM",
    "Qwen2ForCausalLM": "sgjax.models.llama:LlamaForCausalLM",
    "Qwen3ForCausalLM": "sgjax.models.llama:LlamaForCausalLM",
    "Gemma2ForCausalLM": "sgjax.models.gemma2:Gemma2ForCausalLM",
    "Qwen2VLForConditionalGeneration": "sgjax.models.qwen2_vl:Qwen2VLForConditionalGeneration",
    "Qwen2_5_VLForConditionalGeneration": "sgjax.models.qwen2_vl:Qwen2VLForConditionalGeneration",
    "Glm4vForConditionalGeneration": "sgjax.models.glm4v:Glm4vForConditionalGeneration",
    "Glm46VForConditionalGeneration": "sgjax.models.glm4v:Glm4vForConditionalGeneration",
    "LlavaForConditionalGeneration": "sgjax.models.llava:LlavaForConditionalGeneration",
    "LlavaNextForConditionalGeneration": "sgjax.models.llava:LlavaForConditionalGeneration",
}


def check_supported(architecture: str) -> None:
    if architecture not in ARCHITECTURES:
        raise ValueError(
            f"unknown architecture {architecture!r}; supported: {', '.join(sorted(ARCHITECTURES))}"
        )


def get_model_class(architecture: str) -> type:
    check_supported(architecture)
    module, name = ARCHITECTURES[architecture].split(":")
    return getattr(importlib.import_module(module), name)
