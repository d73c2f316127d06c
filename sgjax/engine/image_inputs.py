"""A request's images, on the caller's side: decoded, preprocessed as the model's image processor does, hashed,
and their placeholders in the prompt expanded to the image's token count, with the prompt's M-RoPE positions where
the model has them. What is model-specific comes from its VisionSpec (models/vision/spec.py).

Everything wrong with a request's images raises an ImageInputError (a ValueError; a corrupt or oversized image an
ImageError from multimodal/image_io.py, also a ValueError) naming the problem: the server answers 400 with it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from sgjax.config import EngineArgs
from sgjax.models.config import ModelConfig
from sgjax.models.vision.spec import VisionSpec, vision_spec
from sgjax.multimodal.image_io import load_image
from sgjax.multimodal.inputs import (
    ImageInput,
    MultimodalInputs,
    content_hash,
    make_cache_key,
)


class ImageInputError(ValueError):
    """A request's images cannot be used as given."""


class ImagesNotSupportedError(ImageInputError):
    """Images sent to a text-only model."""


class TooManyImagesError(ImageInputError):
    """More images than a request may carry."""


class ImagePlaceholderError(ImageInputError):
    """The prompt's image placeholders do not match its images."""


def image_processor_config(model_path: str, cfg: ModelConfig) -> Any:
    """The checkpoint's image processor settings (preprocessor_config.json), agreeing with its tower."""
    return vision_spec(cfg.architecture).processor(model_path, cfg.vision)


def max_image_patches(model_path: str, cfg: ModelConfig) -> int:
    """The most tower input rows (patches, or tiles) one image can become."""
    return vision_spec(cfg.architecture).max_rows(image_processor_config(model_path, cfg))


class ImagePreprocessor:
    def __init__(self, cfg: ModelConfig, processor: Any, *, max_images: int, max_pixels: int):
        self.cfg, self.processor = cfg, processor
        self.spec: VisionSpec = vision_spec(cfg.architecture)
        self.max_images, self.max_pixels = max_images, max_pixels

    @classmethod
    def for_model(cls, args: EngineArgs, cfg: ModelConfig) -> ImagePreprocessor | None:
        """The model's preprocessor; None for a text-only model."""
        if not cfg.is_multimodal:
            return None
        return cls(cfg, image_processor_config(args.model_path, cfg), max_images=args.max_images_per_request,
                   max_pixels=args.max_image_pixels)

    def prepare(self, prompt_ids: list[int], images: list) -> tuple[list[int], MultimodalInputs]:
        """(prompt ids with each image's placeholder expanded, the request's MultimodalInputs). A placeholder is the
        image token once (as chat templates write it; images side by side make a run of them, one each), or already
        the image's token count in a row."""
        if len(images) > self.max_images:
            raise TooManyImagesError(f"request has {len(images)} images; at most {self.max_images} are allowed per "
                                     "request")
        token, spec = self.cfg.image_token_id, self.spec
        runs = _runs(prompt_ids, token)
        if not len(runs) <= len(images) <= sum(length for _, length in runs):
            raise ImagePlaceholderError(f"prompt has {len(runs)} image placeholders; {len(images)} images were given "
                                        f"(one image token {token} per image, where the image goes)")
        processed = []
        for k, source in enumerate(images):
            try:
                pixels, grid = spec.preprocess(load_image(source, max_pixels=self.max_pixels), self.processor)
            except ValueError as e:
                raise type(e)(f"image {k}: {e}") from None
            processed.append((pixels, tuple(grid), spec.num_tokens(tuple(grid), self.cfg.vision)))
        ids, inputs, done = [], [], 0
        for (start, length), (pixels, grid, n) in zip(_image_spans(runs, [n for _, _, n in processed]), processed):
            ids += prompt_ids[done:start]
            inputs.append(ImageInput(pixels, grid, content_hash(pixels, grid), len(ids), n))
            ids += [token] * n
            done = start + length
        ids += prompt_ids[done:]
        positions, delta = None, 0
        if spec.positions is not None:
            positions, delta = spec.positions(ids, [i.grid_thw for i in inputs], self.cfg)
            positions = positions.astype(np.int32)
        return ids, MultimodalInputs(inputs, positions, delta, make_cache_key(ids, inputs))


def _image_spans(runs: list[tuple[int, int]], num_tokens: list[int]) -> list[tuple[int, int]]:
    """Each image's placeholder (start, length) in the prompt: a run of the image token is the next image's
    expanded placeholder (as long as its token count), or one token for each of the next images."""
    spans = []
    for start, length in runs:
        k = len(spans)
        if k == len(num_tokens):
            raise ImagePlaceholderError(f"prompt has image placeholders past its {k} images (at token {start})")
        if length == num_tokens[k]:
            spans.append((start, length))
        elif k + length <= len(num_tokens):
            spans += [(start + j, 1) for j in range(length)]
        else:
            raise ImagePlaceholderError(f"image {k} takes {num_tokens[k]} placeholder tokens; the prompt has {length} "
                                        "in a row")
    if len(spans) != len(num_tokens):
        raise ImagePlaceholderError(f"prompt has placeholders for {len(spans)} images; {len(num_tokens)} images were "
                                    "given")
    return spans


def _runs(ids: list[int], token: int) -> list[tuple[int, int]]:
    """(start, length) of each maximal run of `token` in `ids`."""
    is_token = np.asarray(ids) == token
    edges = np.flatnonzero(np.diff(np.concatenate([[0], is_token.astype(np.int8), [0]])))
    return [(int(a), int(b - a)) for a, b in zip(edges[::2], edges[1::2])]
