"""M-RoPE positions of Qwen2-VL / Qwen2.5-VL prompts (transformers' `get_rope_index`).

Each token has three positions (temporal, row, column). A text token has its index thrice, counted on from where
the previous span ended. An image's placeholder tokens (one per merge block, in the tower's output order) share the
image's start as the temporal position and add their block's row and column to it; the text after the image starts
at that start plus the image's larger side in blocks. So a prompt ends at a position below its length, and every
later token (decode, or text appended in a later turn) is at its index plus `delta` = last position + 1 - length.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def mrope_positions(input_ids: Sequence[int] | np.ndarray, image_grid_thw: Sequence[Sequence[int]] | np.ndarray | None,
                    *, image_token_id: int, spatial_merge_size: int) -> tuple[np.ndarray, int]:
    """(positions [3, len(input_ids)] int64, delta) for a prompt whose images' placeholders appear in the order of
    `image_grid_thw`'s rows (the processor's (t, h, w) patch grids)."""
    ids = np.asarray(input_ids).reshape(-1)
    grids = np.zeros((0, 3), np.int64) if image_grid_thw is None else np.asarray(image_grid_thw, np.int64).reshape(-1, 3)
    m = spatial_merge_size
    is_image = ids == image_token_id
    expected = int((grids[:, 0] * (grids[:, 1] // m) * (grids[:, 2] // m)).sum())
    if int(is_image.sum()) != expected:
        raise ValueError(f"prompt has {int(is_image.sum())} image placeholder tokens; its {len(grids)} images "
                         f"need {expected}")
    pieces, start, i = [], 0, 0
    for t, h, w in grids.tolist():
        image_at = i + int(np.argmax(is_image[i:]))  # the next placeholder: this image's first
        pieces.append(np.broadcast_to(np.arange(start, start + image_at - i), (3, image_at - i)))
        start += image_at - i
        lt, lh, lw = t, h // m, w // m
        grid = np.stack(np.meshgrid(np.arange(lt), np.arange(lh), np.arange(lw), indexing="ij")).reshape(3, -1)
        if not is_image[image_at:image_at + grid.shape[1]].all():
            raise ValueError(f"image at token {image_at} needs {grid.shape[1]} consecutive placeholder tokens")
        pieces.append(grid + start)
        start += max(lh, lw)
        i = image_at + grid.shape[1]
    pieces.append(np.broadcast_to(np.arange(start, start + len(ids) - i), (3, len(ids) - i)))
    positions = np.concatenate(pieces, axis=1).astype(np.int64)
    delta = int(positions.max()) + 1 - len(ids) if len(ids) else 0
    return positions, delta


def mrope_text_positions(start: int, length: int, delta: int) -> np.ndarray:
    """[3, length] positions of text tokens at indices start..start+length-1 after a prompt with this `delta`
    (decode steps, or text-only continuations)."""
    return np.broadcast_to(np.arange(start, start + length, dtype=np.int64) + delta, (3, length)).copy()


def prompt_mrope_positions(ids: Sequence[int], grids: Sequence[Sequence[int]], model_cfg) -> tuple[np.ndarray, int]:
    """`mrope_positions` of a prompt for a model (a ModelConfig: its image token, its tower's merge size): the
    VisionSpec.positions of Qwen2-VL, Qwen2.5-VL and GLM-4.1V, whose images' positions are alike."""
    return mrope_positions(ids, list(grids), image_token_id=model_cfg.image_token_id,
                           spatial_merge_size=model_cfg.vision.spatial_merge_size)
