"""Qwen2-VL / Qwen2.5-VL image preprocessing, equal to transformers' Qwen2VLImageProcessorPil.

An image is composited onto white if it has transparency, resized (bicubic) so both sides are multiples of
patch_size * merge_size with the pixel count within [min_pixels, max_pixels], scaled to [0, 1], normalized, and
cut into patches. Each patch row holds C x temporal_patch_size x P x P values (the still image repeated over the
temporal patch), rows ordered merge block by merge block, so the tower's PatchMerger finds each block's
merge_size**2 patches adjacent.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os

import numpy as np
import PIL.Image

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def read_preprocessor_config(model_path: str) -> dict | None:
    """The model folder's preprocessor_config.json, or None without one (the processor's defaults apply)."""
    path = os.path.join(model_path, "preprocessor_config.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


@dataclasses.dataclass(frozen=True)
class Qwen2VLImageConfig:
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    image_mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    image_std: tuple[float, ...] = OPENAI_CLIP_STD
    rescale_factor: float = 1 / 255

    @classmethod
    def from_pretrained(cls, model_path: str) -> Qwen2VLImageConfig:
        """Read preprocessor_config.json (either the `min_pixels`/`max_pixels` or the `size` spelling)."""
        raw = read_preprocessor_config(model_path)
        return cls() if raw is None else cls.from_dict(raw)

    @classmethod
    def for_tower(cls, model_path: str, tower) -> Qwen2VLImageConfig:
        """The checkpoint's preprocessor_config.json, with the patch geometry of its tower (which must agree)."""
        return dataclasses.replace(cls.from_pretrained(model_path), patch_size=tower.patch_size,
                                   temporal_patch_size=tower.temporal_patch_size, merge_size=tower.spatial_merge_size)

    @classmethod
    def from_dict(cls, raw: dict) -> Qwen2VLImageConfig:
        size = raw.get("size") or {}
        values = dict(
            patch_size=raw.get("patch_size"), temporal_patch_size=raw.get("temporal_patch_size"),
            merge_size=raw.get("merge_size"),
            min_pixels=raw.get("min_pixels", size.get("shortest_edge", size.get("min_pixels"))),
            max_pixels=raw.get("max_pixels", size.get("longest_edge", size.get("max_pixels"))),
            image_mean=tuple(raw["image_mean"]) if "image_mean" in raw else None,
            image_std=tuple(raw["image_std"]) if "image_std" in raw else None,
            rescale_factor=raw.get("rescale_factor"),
        )
        return cls(**{k: v for k, v in values.items() if v is not None})

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    def resized(self, height: int, width: int) -> tuple[int, int]:
        """The (height, width) an image of this size is resized to."""
        return smart_resize(height, width, self.factor, self.min_pixels, self.max_pixels)

    @property
    def max_patches(self) -> int:
        """The most patches one image can become (its pixels are at most max_pixels after resizing)."""
        return self.max_pixels // self.patch_size**2


@dataclasses.dataclass
class ProcessedImages:
    pixel_values: np.ndarray  # [sum of patches, C * temporal_patch_size * patch_size**2] float32
    image_grid_thw: np.ndarray  # [images, 3] int64: (1, patch rows, patch columns) per image

    def num_tokens(self, merge_size: int) -> list[int]:
        """Placeholder tokens each image takes in the prompt (its merged patches)."""
        return [int(t * h * w) // merge_size**2 for t, h, w in self.image_grid_thw]


def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56,
                 max_pixels: int = 28 * 28 * 1280) -> tuple[int, int]:
    """The (height, width) an image is resized to: multiples of `factor`, pixels within [min, max], aspect kept."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"image is {width}x{height}; its aspect ratio must be below 200")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def to_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
    """RGB, transparency composited onto white (as transformers does; a plain convert would turn it black)."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return PIL.Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def preprocess_image(image: PIL.Image.Image, cfg: Qwen2VLImageConfig) -> tuple[np.ndarray, tuple[int, int, int]]:
    """One image -> (patches [grid_h * grid_w, C*T*P*P] float32, (1, grid_h, grid_w))."""
    image = to_rgb(image)
    height, width = cfg.resized(image.height, image.width)
    image = image.resize((width, height), resample=PIL.Image.Resampling.BICUBIC)
    # Same arithmetic as transformers: scale in float64, then float32 for the normalization.
    pixels = (np.asarray(image).astype(np.float64) * cfg.rescale_factor).astype(np.float32)
    pixels = (pixels - np.asarray(cfg.image_mean, np.float32)) / np.asarray(cfg.image_std, np.float32)
    pixels = pixels.transpose(2, 0, 1)  # [C, H, W]
    p, m, t = cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size
    channels, grid_h, grid_w = pixels.shape[0], height // p, width // p
    patches = pixels.reshape(channels, grid_h // m, m, p, grid_w // m, m, p)
    patches = patches.transpose(1, 4, 2, 5, 0, 3, 6)  # [block row, block col, row in block, col in block, C, P, P]
    patches = np.broadcast_to(patches[:, :, :, :, :, None], (*patches.shape[:5], t, p, p))
    return np.ascontiguousarray(patches).reshape(grid_h * grid_w, channels * t * p * p), (1, grid_h, grid_w)


def preprocess_images(images: list[PIL.Image.Image], cfg: Qwen2VLImageConfig) -> ProcessedImages:
    """Images -> the tower's input: patches of all images concatenated, and each image's (t, h, w) grid."""
    if not images:
        raise ValueError("no images to preprocess")
    results = [preprocess_image(image, cfg) for image in images]
    return ProcessedImages(np.concatenate([r[0] for r in results]), np.array([r[1] for r in results], np.int64))
