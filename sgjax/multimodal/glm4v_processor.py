"""GLM-4.1V / GLM-4.6V-Flash image preprocessing, equal to transformers' Glm4vImageProcessorPil.

Everything but the resize is Qwen2-VL's (multimodal/qwen2_vl_processor.py: RGB on white, bicubic resize, scale,
normalize, patches merge block by merge block, the still image repeated over the temporal patch). The resize differs
in two ways: a side shorter than one merge block is first scaled up (aspect kept) to reach it, and the pixel bounds
count the image once per temporal patch (a still image is a clip of temporal_patch_size frames), so an image keeps
half the pixels Qwen's bounds would leave it.
"""

from __future__ import annotations

import dataclasses
import math

from sgjax.multimodal.qwen2_vl_processor import Qwen2VLImageConfig


def glm4v_smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int,
                       frames: int = 2) -> tuple[int, int]:
    """The (height, width) an image is resized to: multiples of `factor`, `frames` x pixels within [min, max]."""
    if height < factor or width < factor:
        scale = max(factor / height, factor / width)
        height, width = int(height * scale), int(width * scale)
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"image is {width}x{height}; its aspect ratio must be below 200")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if frames * h_bar * w_bar > max_pixels:
        beta = math.sqrt(frames * height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif frames * h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (frames * height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


@dataclasses.dataclass(frozen=True)
class Glm4vImageConfig(Qwen2VLImageConfig):
    """Qwen2-VL's settings with GLM's defaults and resize (preprocessor_config.json's `size` spelling)."""

    min_pixels: int = 112 * 112
    max_pixels: int = 28 * 28 * 15000

    def resized(self, height: int, width: int) -> tuple[int, int]:
        return glm4v_smart_resize(height, width, self.factor, self.min_pixels, self.max_pixels,
                                  self.temporal_patch_size)

    @property
    def max_patches(self) -> int:
        return self.max_pixels // (self.temporal_patch_size * self.patch_size**2)
