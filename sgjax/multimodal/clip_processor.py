"""CLIP-style image preprocessing for LLaVA-1.5 and LLaVA-NeXT, equal to transformers' CLIPImageProcessorPil,
LlavaImageProcessorPil and LlavaNextImageProcessorPil.

A tile is made as CLIP's processor makes an image: converted to RGB (transparency onto white), resized (bicubic)
so its shorter side is `shortest_edge`, center-cropped to `crop_size` (zero-padded where smaller), scaled to [0, 1]
and normalized. LLaVA-1.5 makes one tile of the image (LlavaImageProcessor's `do_pad` first pads it to a square of
the mean color). LLaVA-NeXT ("anyres") picks the grid pinpoint that keeps most of the image, resizes the image into
it (aspect kept, black bars centered), cuts it into crop-sized tiles row by row, and puts the whole image squashed
to one tile first. An image's pixel values are its tiles, each flattened [C * H * W].
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import PIL.Image

from sgjax.multimodal.qwen2_vl_processor import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    read_preprocessor_config,
    to_rgb,
)

MAX_ASPECT_RATIO = 200


@dataclasses.dataclass(frozen=True)
class ClipImageConfig:
    shortest_edge: int | None = 224  # resize so the shorter side is this (None: to `size` exactly)
    size: tuple[int, int] | None = None  # (height, width) to resize to when there is no shortest_edge
    crop_size: tuple[int, int] = (224, 224)  # (height, width)
    do_resize: bool = True
    do_center_crop: bool = True
    do_rescale: bool = True
    do_normalize: bool = True
    rescale_factor: float = 1 / 255
    image_mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    image_std: tuple[float, ...] = OPENAI_CLIP_STD
    resample: int = PIL.Image.Resampling.BICUBIC
    pad_to_square: bool = False  # LlavaImageProcessor's do_pad: a square of the mean color before resizing
    grid_pinpoints: tuple[tuple[int, int], ...] = ()  # LLaVA-NeXT's (height, width) resolutions; (): one tile

    @classmethod
    def from_pretrained(cls, model_path: str) -> ClipImageConfig:
        """Read preprocessor_config.json (CLIP's defaults without one)."""
        raw = read_preprocessor_config(model_path)
        return cls() if raw is None else cls.from_dict(raw)

    @classmethod
    def from_dict(cls, raw: dict) -> ClipImageConfig:
        size, crop = raw.get("size", {"shortest_edge": 224}), raw.get("crop_size", {"height": 224, "width": 224})
        if isinstance(size, int):
            size = {"shortest_edge": size}
        if isinstance(crop, int):
            crop = {"height": crop, "width": crop}
        kind = raw.get("image_processor_type", "")
        values = dict(
            shortest_edge=size.get("shortest_edge"),
            size=(size["height"], size["width"]) if "height" in size else None,
            crop_size=(crop["height"], crop["width"]),
            do_resize=raw.get("do_resize"), do_center_crop=raw.get("do_center_crop"),
            do_rescale=raw.get("do_rescale"), do_normalize=raw.get("do_normalize"),
            rescale_factor=raw.get("rescale_factor"),
            image_mean=tuple(raw["image_mean"]) if "image_mean" in raw else None,
            image_std=tuple(raw["image_std"]) if "image_std" in raw else None,
            resample=raw.get("resample"),
            # LLaVA-NeXT's do_pad pads the tile count of a batch, which one image at a time never needs
            pad_to_square=bool(raw.get("do_pad")) and kind.startswith("LlavaImageProcessor"),
            grid_pinpoints=tuple(tuple(p) for p in raw["image_grid_pinpoints"]) if "image_grid_pinpoints" in raw
            else None,
        )
        if values["shortest_edge"] is None and values["size"] is None:
            raise ValueError(f"preprocessor size {size} has neither shortest_edge nor height and width")
        return cls(**{k: v for k, v in values.items() if v is not None or k == "shortest_edge"})

    @property
    def tile_size(self) -> tuple[int, int]:
        """(height, width) of every tile."""
        if self.do_center_crop:
            return self.crop_size
        if self.size is not None:
            return self.size
        raise ValueError("a shortest_edge resize without a center crop gives tiles of varying size")


def select_best_resolution(height: int, width: int, pinpoints) -> tuple[int, int]:
    """The (height, width) pinpoint that keeps the most of the image's pixels, then wastes the fewest."""
    best, best_effective, best_wasted = None, 0, math.inf
    for h, w in pinpoints:
        scale = min(w / width, h / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        wasted = w * h - effective
        if effective > best_effective or (effective == best_effective and wasted < best_wasted):
            best, best_effective, best_wasted = (h, w), effective, wasted
    return best


def _resize(image: PIL.Image.Image, height: int, width: int, cfg: ClipImageConfig) -> PIL.Image.Image:
    return image.resize((width, height), resample=cfg.resample)


def _center_crop(pixels: np.ndarray, height: int, width: int) -> np.ndarray:
    """[H, W, C] cropped to the center (height, width), zero-padded around where the image is smaller."""
    h, w = pixels.shape[:2]
    if h < height or w < width:
        padded = np.zeros((max(h, height), max(w, width), pixels.shape[2]), pixels.dtype)
        top, left = math.ceil((padded.shape[0] - h) / 2), math.ceil((padded.shape[1] - w) / 2)
        padded[top:top + h, left:left + w] = pixels
        pixels, h, w = padded, *padded.shape[:2]
    top, left = (h - height) // 2, (w - width) // 2
    return pixels[top:top + height, left:left + width]


def transform_tile(image: PIL.Image.Image, cfg: ClipImageConfig) -> np.ndarray:
    """One RGB image -> CLIP's pixel values [C, H, W] float32: resize, center crop, rescale, normalize."""
    if cfg.do_resize:
        if cfg.shortest_edge is not None:
            short, long = sorted((image.width, image.height))
            new_short, new_long = cfg.shortest_edge, int(cfg.shortest_edge * long / short)
            height, width = (new_long, new_short) if image.width <= image.height else (new_short, new_long)
        else:
            height, width = cfg.size
        if (height, width) != (image.height, image.width):
            image = _resize(image, height, width, cfg)
    pixels = np.asarray(image)
    if cfg.do_center_crop:
        pixels = _center_crop(pixels, *cfg.crop_size)
    if cfg.do_rescale:  # transformers' arithmetic: scale in float64, then float32
        pixels = (pixels.astype(np.float64) * cfg.rescale_factor).astype(np.float32)
    pixels = pixels.astype(np.float32)
    if cfg.do_normalize:
        pixels = (pixels - np.asarray(cfg.image_mean, np.float32)) / np.asarray(cfg.image_std, np.float32)
    return pixels.transpose(2, 0, 1)


def _pad_to_square(image: PIL.Image.Image, cfg: ClipImageConfig) -> PIL.Image.Image:
    side = max(image.size)
    if image.width == image.height:
        return image
    square = PIL.Image.new("RGB", (side, side), tuple(int(m * 255) for m in cfg.image_mean))
    square.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
    return square


def anyres_tiles(image: PIL.Image.Image, cfg: ClipImageConfig) -> list[PIL.Image.Image]:
    """LLaVA-NeXT's tiles of an RGB image: the whole image resized to one tile, then the best pinpoint's tiles."""
    tile_h, tile_w = cfg.tile_size
    best_h, best_w = select_best_resolution(image.height, image.width, cfg.grid_pinpoints)
    scale_w, scale_h = best_w / image.width, best_h / image.height
    if scale_w < scale_h:
        new_w, new_h = best_w, min(math.ceil(image.height * scale_w), best_h)
    else:
        new_h, new_w = best_h, min(math.ceil(image.width * scale_h), best_w)
    canvas = PIL.Image.new("RGB", (best_w, best_h))  # black bars: transformers pads the uint8 image with zeros
    canvas.paste(_resize(image, new_h, new_w, cfg), ((best_w - new_w) // 2, (best_h - new_h) // 2))
    tiles = [canvas.crop((x, y, x + tile_w, y + tile_h)) for y in range(0, best_h, tile_h)
             for x in range(0, best_w, tile_w)]
    base_h, base_w = cfg.size if cfg.size is not None else (cfg.shortest_edge, cfg.shortest_edge)
    return [_resize(image, base_h, base_w, cfg)] + tiles


def preprocess_image(image: PIL.Image.Image, cfg: ClipImageConfig) -> tuple[np.ndarray, tuple[int, int, int]]:
    """One image -> (its tiles' pixel values [tiles, C * H * W] float32, (tiles, image height, image width))."""
    if max(image.size) / min(image.size) > MAX_ASPECT_RATIO:  # its short side resized up would make a huge image
        raise ValueError(f"image is {image.width}x{image.height}; its aspect ratio must be below {MAX_ASPECT_RATIO}")
    image = to_rgb(image)
    if cfg.grid_pinpoints:
        tiles = anyres_tiles(image, cfg)
    else:
        tiles = [_pad_to_square(image, cfg) if cfg.pad_to_square else image]
    pixels = np.stack([transform_tile(tile, cfg) for tile in tiles])
    return pixels.reshape(len(tiles), -1), (len(tiles), image.height, image.width)
