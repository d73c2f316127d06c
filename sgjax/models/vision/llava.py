"""LLaVA-1.5 and LLaVA-NeXT image side: CLIP tiles (models/vision/clip.py) -> the hidden states of
`vision_feature_layer` (several: concatenated), the class token dropped ("default") or kept ("full") -> the
2-layer MLP projector to the decoder's width -> each image's rows in placeholder order.

LLaVA-1.5 has one tile per image, and its rows are the tile's in order. LLaVA-NeXT ("anyres", when the config has
`image_grid_pinpoints`) has the whole image as tile 0 and a grid of tiles of the resized image after it
(multimodal/clip_processor.py); an image's rows are tile 0's, then the grid's feature map (the tiles' patches
side by side) with the rows and columns of the processor's black bars cut off ("unpad"), each of its rows
followed by the learned `image_newline`. The per-call `gather` index (`llava_metadata`) makes that order from the
projected tile rows, so the tower has one program per tile count.
Module and parameter names mirror Hugging Face's (`vision_tower.*`, `multi_modal_projector.*`, `image_newline`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from sgjax.models.config import DTYPES
from sgjax.models.layers import COLUMN, ROW, Linear
from sgjax.models.loader import CheckpointTensors
from sgjax.models.vision.clip import ClipConfig, ClipVisionTransformer
from sgjax.models.vision.qwen2_vl import ACTIVATIONS
from sgjax.models.vision.spec import VisionSpec
from sgjax.models.vision.weights import load_module_weights
from sgjax.multimodal.clip_processor import (
    ClipImageConfig,
    preprocess_image,
    select_best_resolution,
)

ARCHITECTURES = {"llava", "llava_next"}


@dataclasses.dataclass(frozen=True)
class LlavaVisionConfig:
    clip: ClipConfig
    feature_layers: tuple[int, ...]  # hidden states read (0: the embeddings, k: after layer k), concatenated
    keep_class_token: bool  # vision_feature_select_strategy "full" (else "default": dropped)
    out_hidden_size: int  # the decoder's hidden size
    projector_act: str = "gelu"
    projector_bias: bool = True
    grid_pinpoints: tuple[tuple[int, int], ...] = ()  # LLaVA-NeXT's anyres resolutions; (): LLaVA-1.5
    dtype: str = "float32"

    @property
    def anyres(self) -> bool:
        return bool(self.grid_pinpoints)

    @property
    def tile_tokens(self) -> int:
        """Projected rows per tile."""
        return self.clip.num_patches + self.keep_class_token

    @property
    def input_dim(self) -> int:
        """Values per tile of pixel_values: [C, S, S] flattened."""
        return self.clip.num_channels * self.clip.image_size**2

    @property
    def smallest_bucket(self) -> int:
        return 1

    def output_rows(self, num_tiles: int) -> int:
        """Rows a call over `num_tiles` tiles returns: anyres adds at most one newline per patch row of a tile."""
        return num_tiles * (self.tile_tokens + (self.clip.side if self.anyres else 0))

    @property
    def jnp_dtype(self):
        return DTYPES[self.dtype]

    @classmethod
    def from_hf(cls, config: Mapping, dtype: str = "float32") -> LlavaVisionConfig:
        """From a LLaVA or LLaVA-NeXT config.json's dict."""
        arch = config.get("model_type")
        if arch not in ARCHITECTURES:
            raise ValueError(f"model_type {arch!r} is not LLaVA (supported: {sorted(ARCHITECTURES)})")
        v = config["vision_config"]
        depth = v["num_hidden_layers"]
        layers = config.get("vision_feature_layer", -2)
        layers = (layers,) if isinstance(layers, int) else tuple(layers)
        if any(not -depth - 1 <= k <= depth for k in layers):
            raise ValueError(f"vision_feature_layer {layers} is outside the tower's {depth + 1} hidden states")
        layers = tuple(k % (depth + 1) for k in layers)
        strategy = config.get("vision_feature_select_strategy", "default")
        if strategy not in ("default", "full"):
            raise ValueError(f"vision_feature_select_strategy {strategy!r} is not 'default' or 'full'")
        pinpoints = tuple(tuple(p) for p in config.get("image_grid_pinpoints") or ()) if arch == "llava_next" else ()
        if pinpoints and strategy == "full":
            raise ValueError("LLaVA-NeXT lays out each tile's patches as a square: strategy 'full' does not fit it")
        act = config.get("projector_hidden_act", "gelu")
        if act not in ACTIVATIONS:
            raise ValueError(f"projector activation {act!r} is not supported (supported: {sorted(ACTIVATIONS)})")
        text = config["text_config"]
        return cls(clip=ClipConfig.from_hf(v, max(layers), dtype), feature_layers=layers,
                   keep_class_token=strategy == "full", out_hidden_size=text["hidden_size"], projector_act=act,
                   projector_bias=config.get("multimodal_projector_bias", True), grid_pinpoints=pinpoints,
                   dtype=dtype)


# --- host side: which projected row each output row is ------------------------------------------------------------

@jax.tree_util.register_dataclass
@dataclasses.dataclass
class LlavaMetadata:
    gather: jax.Array  # [output_rows(tiles)] int32: a projected tile row, or tiles * tile_tokens (image_newline)


def anyres_layout(height: int, width: int, cfg: LlavaVisionConfig) -> tuple[int, int, slice, slice]:
    """(grid rows, grid columns) of tiles, and the kept (rows, columns) of the grid's feature map, for an image of
    this size: the processor's pinpoint, and transformers' unpad_image."""
    best_h, best_w = select_best_resolution(height, width, cfg.grid_pinpoints)
    grid_h, grid_w = best_h // cfg.clip.image_size, best_w // cfg.clip.image_size
    rows, cols = grid_h * cfg.clip.side, grid_w * cfg.clip.side
    if width / height > cols / rows:
        padding = (rows - int(round(height * (cols / width), 7))) // 2
        return grid_h, grid_w, slice(padding, rows - padding), slice(0, cols)
    padding = (cols - int(round(width * (rows / height), 7))) // 2
    return grid_h, grid_w, slice(0, rows), slice(padding, cols - padding)


def image_gather(grid: Sequence[int], cfg: LlavaVisionConfig, first_tile: int, newline: int) -> np.ndarray:
    """One image's output rows, as indices into the projected rows of the call (its tiles from `first_tile` on);
    `newline`: the index of image_newline."""
    tiles, height, width = grid
    per_tile = cfg.tile_tokens
    if not cfg.anyres:
        return first_tile * per_tile + np.arange(tiles * per_tile)
    base = first_tile * per_tile + np.arange(per_tile)  # the whole image's tile
    if tiles == 1:
        return np.concatenate([base, [newline]])
    grid_h, grid_w, keep_rows, keep_cols = anyres_layout(height, width, cfg)
    if grid_h * grid_w != tiles - 1:
        raise ValueError(f"an image of {height}x{width} has {grid_h}x{grid_w} anyres tiles; {tiles - 1} were given")
    side = cfg.clip.side
    r, c = np.meshgrid(np.arange(grid_h * side), np.arange(grid_w * side), indexing="ij")
    index = (first_tile + 1 + (r // side) * grid_w + c // side) * per_tile + (r % side) * side + c % side
    index = index[keep_rows, keep_cols]
    index = np.concatenate([index, np.full((index.shape[0], 1), newline)], axis=1)
    return np.concatenate([base, index.reshape(-1)])


def num_tokens(grid: Sequence[int], cfg: LlavaVisionConfig) -> int:
    """Placeholder tokens of an image with this grid (tiles, height, width)."""
    return len(image_gather(grid, cfg, 0, -1))


def llava_metadata(grids: Sequence[Sequence[int]], cfg: LlavaVisionConfig, num_tiles: int) -> LlavaMetadata:
    """The gather index of a call over images of these grids, padded to `num_tiles` tiles."""
    total = sum(g[0] for g in grids)
    if total > num_tiles:
        raise ValueError(f"{num_tiles} tiles cannot hold the images' {total}")
    newline = num_tiles * cfg.tile_tokens
    pieces, tile = [], 0
    for grid in grids:
        pieces.append(image_gather(grid, cfg, tile, newline))
        tile += grid[0]
    gather = np.zeros(cfg.output_rows(num_tiles), np.int32)  # padding rows: any row (their output is dropped)
    used = np.concatenate(pieces or [np.zeros(0, np.int64)])
    gather[:len(used)] = used
    return LlavaMetadata(gather=gather)


# --- device side ------------------------------------------------------------------------------------------------

class LlavaProjector(nnx.Module):
    def __init__(self, cfg: LlavaVisionConfig, rngs: nnx.Rngs):
        width, out, dt = cfg.clip.hidden_size * len(cfg.feature_layers), cfg.out_hidden_size, cfg.jnp_dtype
        self.linear_1 = Linear(width, out, bias=cfg.projector_bias, axes=COLUMN, dtype=dt, rngs=rngs)
        self.linear_2 = Linear(out, out, bias=cfg.projector_bias, axes=ROW, dtype=dt, rngs=rngs)
        self.act = ACTIVATIONS[cfg.projector_act]

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.linear_2(self.act(self.linear_1(x)))


class LlavaVisionTower(nnx.Module):
    """pixel_values [tiles, C * S * S] -> image embeddings [output_rows(tiles), out_hidden_size], each image's
    rows in placeholder order."""

    def __init__(self, cfg: LlavaVisionConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        self.vision_tower = ClipVisionTransformer(cfg.clip, rngs)
        self.multi_modal_projector = LlavaProjector(cfg, rngs)
        self.image_newline = (nnx.Param(jax.random.normal(rngs.params(), (cfg.out_hidden_size,), cfg.jnp_dtype),
                                        axes=(None,)) if cfg.anyres else None)

    def __call__(self, pixel_values: jax.Array, meta: LlavaMetadata) -> jax.Array:
        cfg = self.config
        c, s = cfg.clip.num_channels, cfg.clip.image_size
        states = self.vision_tower(pixel_values.reshape(-1, c, s, s))
        features = jnp.concatenate([states[k] for k in cfg.feature_layers], axis=-1)
        if not cfg.keep_class_token:
            features = features[:, 1:]
        rows = self.multi_modal_projector(features).reshape(-1, cfg.out_hidden_size)
        if self.image_newline is not None:
            rows = jnp.concatenate([rows, self.image_newline[...][None].astype(rows.dtype)])
        return jnp.take(rows, meta.gather, axis=0)


# --- weights ----------------------------------------------------------------------------------------------------

# Each of our top modules' tensors, under the names transformers 5's save_pretrained, the llava-hf checkpoints
# (CLIPVisionModel's `vision_model.`) and in-memory state dicts give them
CHECKPOINT_PREFIXES = {
    "vision_tower.": ("vision_tower.", "vision_tower.vision_model.", "model.vision_tower.",
                      "model.vision_tower.vision_model."),
    "multi_modal_projector.": ("multi_modal_projector.", "model.multi_modal_projector."),
    "image_newline": ("image_newline", "model.image_newline"),
}


def load_llava_tower(source: str | Mapping[str, np.ndarray], mesh: Mesh, *, cfg: LlavaVisionConfig) -> LlavaVisionTower:
    """The tower with weights on `mesh`, from a model folder's safetensors or a state dict of numpy arrays."""
    tensors = CheckpointTensors(source) if isinstance(source, str) else source
    where = repr(source) if isinstance(source, str) else "the state dict"

    def name_of(key: str) -> str | None:
        ours = next(p for p in CHECKPOINT_PREFIXES if key.startswith(p))
        names = [theirs + key[len(ours):] for theirs in CHECKPOINT_PREFIXES[ours]]
        return next((n for n in names if n in tensors), names[0])

    return load_module_weights(lambda: LlavaVisionTower(cfg, rngs=nnx.Rngs(0)), tensors, name_of, mesh,
                               cfg.jnp_dtype, where=where, what="LLaVA vision tower")


# --- the engine's interface (models/vision/spec.py) ---------------------------------------------------------------

def processor_config(model_path: str, cfg: LlavaVisionConfig) -> ClipImageConfig:
    """The checkpoint's preprocessor_config.json, with the model's pinpoints; its tiles must be the tower's size."""
    processor = dataclasses.replace(ClipImageConfig.from_pretrained(model_path), grid_pinpoints=cfg.grid_pinpoints)
    size = cfg.clip.image_size
    if processor.tile_size != (size, size):
        raise ValueError(f"the image processor makes {processor.tile_size} tiles; the vision tower takes "
                         f"{size}x{size}")
    return processor


def max_tiles(processor: ClipImageConfig) -> int:
    """Tiles of the largest image: one, or the whole image and the largest pinpoint's grid."""
    tile_h, tile_w = processor.tile_size
    return 1 + max(((h // tile_h) * (w // tile_w) for h, w in processor.grid_pinpoints), default=0)


SPEC = VisionSpec(
    config=LlavaVisionConfig.from_hf, tower=LlavaVisionTower, load_tower=load_llava_tower, metadata=llava_metadata,
    processor=processor_config, preprocess=preprocess_image, num_tokens=num_tokens, max_rows=max_tiles,
)
