"""One interface for every vision-language family: a VisionSpec names what the engine needs to turn a request's
images into decoder inputs, and the engine picks it by the checkpoint's architecture (`vision_spec`), never naming
a family itself.

A family's module (models/vision/<family>.py) defines `SPEC = VisionSpec(...)` and is listed in `SPECS`:

- `config(hf_config: dict, dtype) -> VisionConfig`: from the full model's config.json dict (ModelConfig.vision).
  Whatever its fields, it has `input_dim` (values per row of pixel_values), `smallest_bucket` (the fewest rows a
  tower call is padded to; the larger buckets double it) and `output_rows(n)` (embedding rows a call over n input
  rows returns, padding included).
- `tower(cfg, rngs=...)`: the nnx module; `tower(pixel_values [n, input_dim], meta) -> [output_rows(n), hidden]`:
  each image's embedding rows (one per placeholder token) contiguous, images in the call's order, padding last.
- `load_tower(model_path, mesh, cfg=cfg)`: the tower with the checkpoint's weights, sharded on `mesh`.
- `metadata(grids, cfg, n) -> pytree of numpy arrays`: the per-call index arrays for images of these grids, padded
  to n input rows. Their shapes depend on n only (one compiled program per bucket); `grids` may be empty.
- `processor(model_path, cfg)`: the image processor's settings (preprocessor_config.json), made to agree with
  the tower's geometry.
- `preprocess(image: PIL.Image, processor) -> (pixel_values [rows, input_dim] float32, grid)`: as the HF image
  processor computes them; `grid` a tuple of ints, the image's layout as `metadata` and `num_tokens` read it.
- `num_tokens(grid, cfg) -> int`: placeholder tokens of an image with this grid.
- `max_rows(processor) -> int`: the most input rows one image can have (the largest bucket).
- `positions`: None for plain 1D positions (each token's index), or `(ids, grids, model_cfg) -> (positions [3, T],
  delta)` for M-RoPE-style positions: the prompt's table, and what every later token adds to its index.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from typing import Any

# architecture (config.json) -> "module:SPEC"
SPECS = {
    "Qwen2VLForConditionalGeneration": "sgjax.models.vision.qwen2_vl:SPEC",
    "Qwen2_5_VLForConditionalGeneration": "sgjax.models.vision.qwen2_vl:SPEC",
    "Glm4vForConditionalGeneration": "sgjax.models.vision.glm4v:SPEC",
    "Glm46VForConditionalGeneration": "sgjax.models.vision.glm4v:SPEC",
    "LlavaForConditionalGeneration": "sgjax.models.vision.llava:SPEC",
    "LlavaNextForConditionalGeneration": "sgjax.models.vision.llava:SPEC",
}


@dataclasses.dataclass(frozen=True)
class VisionSpec:
    config: Callable[..., Any]
    tower: Callable[..., Any]
    load_tower: Callable[..., Any]
    metadata: Callable[..., Any]
    processor: Callable[..., Any]
    preprocess: Callable[..., tuple[Any, tuple[int, ...]]]
    num_tokens: Callable[[tuple[int, ...], Any], int]
    max_rows: Callable[[Any], int]
    positions: Callable[..., tuple[Any, int]] | None = None

    @property
    def mrope(self) -> bool:
        """Whether positions are [3, T] (else [T], the tokens' indices)."""
        return self.positions is not None


def is_vision_language(architecture: str) -> bool:
    return architecture in SPECS


def vision_spec(architecture: str) -> VisionSpec:
    """The spec of a vision-language architecture (ValueError for any other)."""
    if architecture not in SPECS:
        raise ValueError(f"{architecture!r} has no vision tower here (vision-language models: {sorted(SPECS)})")
    module, name = SPECS[architecture].split(":")
    return getattr(importlib.import_module(module), name)
