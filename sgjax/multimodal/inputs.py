"""A request's images as the engine carries them: each image's pixel rows, grid, content hash and placeholder span,
and the prompt's M-RoPE positions where the model has them.

The radix cache keys a prompt by its token ids, but every image's placeholder tokens are the same id. So the cache
key replaces an image's placeholders by an id derived from its content hash (as SGLang does with pad values): the
same image after the same text hits the cache, in a later turn or another request; a different image does not.
The key ids lie at or above 2**30, never a real token id.
"""

from __future__ import annotations

import dataclasses
import hashlib

import numpy as np

CACHE_KEY_BASE = 1 << 30


@dataclasses.dataclass
class ImageInput:
    pixel_values: np.ndarray  # [rows, the tower's input_dim] float32, as the processor lays them out
    grid_thw: tuple[int, ...]  # the image's layout for its tower (Qwen: t, patch rows, patch columns; VisionSpec)
    content_hash: int  # of the pixels and grid (content_hash)
    offset: int  # index of its first placeholder token in the prompt
    num_tokens: int  # its placeholder tokens: the tower's merged rows

    @property
    def end(self) -> int:
        return self.offset + self.num_tokens

    @property
    def cache_key_id(self) -> int:
        """The id its placeholder tokens have in the radix cache's key."""
        return CACHE_KEY_BASE | (self.content_hash & (CACHE_KEY_BASE - 1))


@dataclasses.dataclass
class MultimodalInputs:
    images: list[ImageInput]
    positions: np.ndarray | None  # [3, prompt length] int32 M-RoPE positions of the prompt; None: 1D, the indices
    position_delta: int  # a token after the prompt at index i has position i + delta (all three rows)
    cache_key: np.ndarray  # [prompt length] int32: the prompt ids, images' placeholders as their cache_key_id

    def chunk_positions(self, start: int, n: int) -> np.ndarray | None:
        """[3, n] positions of tokens start..start+n-1 (prompt tokens from the table, later ones by the delta);
        None for a model with 1D positions (the tokens' indices)."""
        if self.positions is None:
            return None
        in_prompt = max(0, min(self.positions.shape[1], start + n) - start)
        out = np.empty((3, n), np.int32)
        out[:, :in_prompt] = self.positions[:, start:start + in_prompt]
        out[:, in_prompt:] = np.arange(start + in_prompt, start + n, dtype=np.int32) + self.position_delta
        return out

    def images_in(self, start: int, end: int) -> list[int]:
        """Indices of the images with placeholder tokens in [start, end)."""
        return [i for i, image in enumerate(self.images) if image.offset < end and image.end > start]


def content_hash(pixel_values: np.ndarray, grid_thw) -> int:
    """A 63-bit hash of an image's processed pixels and grid (equal images processed alike hash equal)."""
    h = hashlib.blake2b(digest_size=8)
    h.update(np.asarray(grid_thw, np.int64).tobytes())
    h.update(np.ascontiguousarray(pixel_values, np.float32).tobytes())
    return int.from_bytes(h.digest(), "little") >> 1


def make_cache_key(prompt_ids, images: list[ImageInput]) -> np.ndarray:
    key = np.asarray(prompt_ids, np.int32).copy()
    for image in images:
        key[image.offset:image.end] = image.cache_key_id
    return key
