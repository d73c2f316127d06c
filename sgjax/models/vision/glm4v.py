"""GLM-4.1V / GLM-4.6V-Flash vision tower: patches -> learned position embeddings resized to each image's grid ->
ViT blocks with 2D rotary -> a strided conv over each merge block -> a SwiGLU merger -> image embeddings.

transformers' Glm4vVisionModel, step by step: the Conv3d patch embedding (a matmul, with bias), an RMSNorm; a
table of (image_size / patch_size)**2 learned position embeddings, resampled bicubically (grid_sample: align_corners
False, border padding) to the image's patch grid and added; blocks of RMSNorm, attention with Qwen2-VL's 2D rotary
and a SwiGLU MLP (its width is out_hidden_size, as HF builds it); an RMSNorm; a Conv2d whose kernel and stride are
the merge size (one output row per merge block); then proj, LayerNorm, GELU and a SwiGLU MLP.

The bicubic resampling is separable and depends only on each patch's (row, column) and its image's grid: the host
computes each patch's weights over the table's rows and over its columns (`glm4v_vision_metadata`), and the device
applies them as one matmul against the table. Images share one call as one flat sequence, attention masked to each
image (the processor's patch order, merge block by merge block, needs no reordering); shapes depend only on the
number of patches, so the executor buckets that and pads (padding is its own segment, and ignored).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from sgjax.models.layers import COLUMN, ROW, Linear, RMSNorm
from sgjax.models.vision.qwen2_vl import (
    ACTIVATIONS,
    LayerNorm,
    PatchTowerConfig,
    apply_rotary,
    rotary_cos_sin,
    segment_attention,
)
from sgjax.models.vision.spec import VisionSpec
from sgjax.models.vision.weights import load_visual_tower
from sgjax.multimodal.glm4v_processor import Glm4vImageConfig
from sgjax.multimodal.mrope import prompt_mrope_positions
from sgjax.multimodal.qwen2_vl_processor import preprocess_image
from sgjax.platform.mesh import TENSOR

# GLM-4.6V's configs (Glm46VForConditionalGeneration) wrap the same tower and, for GLM-4.6V-Flash, the same decoder
MODEL_TYPES = {"glm4v", "glm46v"}


@dataclasses.dataclass(frozen=True)
class Glm4vVisionConfig(PatchTowerConfig):
    depth: int
    hidden_size: int  # the tower's width
    num_heads: int
    intermediate_size: int  # the merger's SwiGLU width
    out_hidden_size: int  # the decoder's hidden size: what the merger outputs (and the blocks' MLP width)
    hidden_act: str = "silu"
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    in_channels: int = 3
    image_size: int = 336  # the position table covers (image_size / patch_size)**2 patches
    rms_norm_eps: float = 1e-5
    attention_bias: bool = False
    rope_theta: float = 10000.0
    dtype: str = "float32"
    architecture: str = "glm4v"

    @property
    def position_side(self) -> int:
        """Rows (and columns) of the learned position table."""
        return self.image_size // self.patch_size

    @classmethod
    def from_hf(cls, config: Mapping, dtype: str = "float32") -> Glm4vVisionConfig:
        """From a Hugging Face config.json's dict (the full model's, with `vision_config`)."""
        if config.get("model_type") not in MODEL_TYPES:
            raise ValueError(f"model_type {config.get('model_type')!r} has no GLM-4.1V vision tower "
                             f"(supported: {sorted(MODEL_TYPES)})")
        v = config["vision_config"]
        return cls(
            depth=v["depth"], hidden_size=v["hidden_size"], num_heads=v["num_heads"],
            intermediate_size=v["intermediate_size"], out_hidden_size=v["out_hidden_size"],
            hidden_act=v.get("hidden_act", "silu"), patch_size=v.get("patch_size", 14),
            temporal_patch_size=v.get("temporal_patch_size", 2), spatial_merge_size=v.get("spatial_merge_size", 2),
            in_channels=v.get("in_channels", 3), image_size=v.get("image_size", 336), rms_norm_eps=v.get("rms_norm_eps", 1e-5),
            attention_bias=bool(v.get("attention_bias", False)),
            rope_theta=float((v.get("rope_parameters") or {}).get("rope_theta", 10000.0)), dtype=dtype,
        )


# --- host side: per-call index arrays ---------------------------------------------------------------------------

@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Glm4vVisionMetadata:
    """Per-call arrays for N patches (from `glm4v_vision_metadata`), numpy on the host."""
    positions: jax.Array  # [N, 2] int32 (row, column) of each patch in its image
    segments: jax.Array  # [N] int32: which image frame each patch belongs to; padding: -1
    table_rows: jax.Array  # [N, S] float32: each patch's bicubic weights over the position table's S rows
    table_cols: jax.Array  # [N, S] float32: ... and over its S columns


CUBIC_A = np.float32(-0.75)  # torch's bicubic kernel


def _cubic_near(x: np.ndarray) -> np.ndarray:
    """The cubic convolution kernel at distances |x| <= 1."""
    a = CUBIC_A
    return ((a + 2) * x - (a + 3)) * x * x + 1


def _cubic_far(x: np.ndarray) -> np.ndarray:
    """... and at 1 < |x| < 2."""
    a = CUBIC_A
    return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a


def bicubic_weights(coords: np.ndarray, grid: int, side: int) -> np.ndarray:
    """[len(coords), side] weights that resample a `side`-long axis at the centres of `grid` cells (coords: the
    cells' indices), as torch's grid_sample does along one axis (bicubic, A = -0.75, align_corners=False, border
    padding: taps beyond the edge read the edge), in float32 like it."""
    f32 = np.float32
    normed = (coords.astype(f32) + f32(0.5)) / f32(grid) * f32(2) - f32(1)
    source = ((normed + f32(1)) * f32(side) - f32(1)) / f32(2)
    base = np.floor(source)
    t = source - base
    taps = np.stack([_cubic_far(t + 1), _cubic_near(t), _cubic_near(1 - t), _cubic_far(2 - t)], axis=-1)
    index = np.clip(base.astype(np.int64)[:, None] + np.arange(-1, 3), 0, side - 1)
    out = np.zeros((len(coords), side), f32)
    np.add.at(out, (np.arange(len(coords))[:, None], index), taps)
    return out


def glm4v_vision_metadata(grid_thw: np.ndarray | Sequence[Sequence[int]], cfg: Glm4vVisionConfig,
                          num_patches: int | None = None) -> Glm4vVisionMetadata:
    """Arrays for images of the given (t, h, w) patch grids, padded to `num_patches` rows if given."""
    grid_thw = np.asarray(grid_thw, np.int64).reshape(-1, 3)
    m, unit, side = cfg.spatial_merge_size, cfg.merge_unit, cfg.position_side
    total = int(np.prod(grid_thw, axis=1).sum())
    num_patches = total if num_patches is None else num_patches
    if num_patches < total or num_patches % unit:
        raise ValueError(f"{num_patches} patch rows cannot hold {total} patches in whole merge blocks of {unit}")
    if np.any(grid_thw[:, 1:] % m):
        raise ValueError(f"image grids {grid_thw.tolist()} are not multiples of the merge size {m}")
    pad = num_patches - total
    positions, segments, rows, cols = [], [], [], []
    frame = 0
    for t, h, w in grid_thw.tolist():
        # (row, column) of each patch, merge block by merge block (the processor's patch order)
        r, c = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        r, c = (a.reshape(h // m, m, w // m, m).transpose(0, 2, 1, 3).reshape(-1) for a in (r, c))
        positions.append(np.tile(np.stack([r, c], -1), (t, 1)))
        segments.append(np.repeat(np.arange(frame, frame + t), h * w))
        rows.append(np.tile(bicubic_weights(r, h, side), (t, 1)))
        cols.append(np.tile(bicubic_weights(c, w, side), (t, 1)))
        frame += t
    return Glm4vVisionMetadata(
        positions=np.concatenate(positions + [np.zeros((pad, 2), np.int64)]).astype(np.int32),
        segments=np.concatenate(segments + [np.full(pad, -1)]).astype(np.int32),
        table_rows=np.concatenate(rows + [np.zeros((pad, side), np.float32)]),
        table_cols=np.concatenate(cols + [np.zeros((pad, side), np.float32)]),
    )


# --- device side ------------------------------------------------------------------------------------------------

class PatchEmbed(nnx.Module):
    """The Conv3d whose stride equals its kernel: each flattened patch times the [E, C*T*P*P] kernel, plus bias."""

    def __init__(self, cfg: Glm4vVisionConfig, rngs: nnx.Rngs):
        shape = (cfg.hidden_size, cfg.in_channels, cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size)
        init = jax.random.normal(rngs.params(), shape, cfg.jnp_dtype) * cfg.patch_dim**-0.5
        self.proj = nnx.Dict(weight=nnx.Param(init, axes=(None,) * 5),
                             bias=nnx.Param(jnp.zeros((cfg.hidden_size,), cfg.jnp_dtype), axes=(None,)))

    def __call__(self, pixels: jax.Array) -> jax.Array:
        w = self.proj["weight"][...]
        return jnp.einsum("nk,ek->ne", pixels.astype(w.dtype), w.reshape(w.shape[0], -1)) + self.proj["bias"][...]


class PositionEmbedding(nnx.Module):
    """The learned [S * S, E] table, resampled to each patch's place in its image by its metadata's weights."""

    def __init__(self, cfg: Glm4vVisionConfig, rngs: nnx.Rngs):
        init = jax.random.normal(rngs.params(), (cfg.position_side**2, cfg.hidden_size), cfg.jnp_dtype)
        self.position_embedding = nnx.Dict(weight=nnx.Param(init, axes=(None, None)))

    def __call__(self, table_rows: jax.Array, table_cols: jax.Array) -> jax.Array:
        table = self.position_embedding["weight"][...]
        n, side = table_rows.shape
        weights = (table_rows[:, :, None] * table_cols[:, None, :]).reshape(n, side * side)
        out = jnp.matmul(weights, table.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
        return out.astype(table.dtype)  # float32 arithmetic, as grid_sample's


class SwiGLU(nnx.Module):
    """down(act(gate(x)) * up(x)), no biases: the blocks' MLP and the merger's tail."""

    def __init__(self, dim: int, hidden: int, act: str, dtype, rngs: nnx.Rngs):
        if act not in ACTIVATIONS:
            raise ValueError(f"vision activation {act!r} is not supported (supported: {sorted(ACTIVATIONS)})")
        self.gate_proj = Linear(dim, hidden, bias=False, axes=COLUMN, dtype=dtype, rngs=rngs)
        self.up_proj = Linear(dim, hidden, bias=False, axes=COLUMN, dtype=dtype, rngs=rngs)
        self.down_proj = Linear(hidden, dim, bias=False, axes=ROW, dtype=dtype, rngs=rngs)
        self.act = ACTIVATIONS[act]

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class VisionAttention(nnx.Module):
    def __init__(self, cfg: Glm4vVisionConfig, rngs: nnx.Rngs):
        e, h, d, dt = cfg.hidden_size, cfg.num_heads, cfg.head_dim, cfg.jnp_dtype
        # HF's qkv is [3 * E, E], rows ordered (q/k/v, head, D); kept as [3, heads, D, E] so "tensor" splits heads.
        init = jax.random.normal(rngs.params(), (3, h, d, e), dt) * e**-0.5
        self.qkv = nnx.Dict(weight=nnx.Param(init, axes=(None, TENSOR, None, None), checkpoint_reshape=True))
        if cfg.attention_bias:
            self.qkv["bias"] = nnx.Param(jnp.zeros((3, h, d), dt), axes=(None, TENSOR, None), checkpoint_reshape=True)
        self.proj = Linear(e, e, bias=False, axes=ROW, dtype=dt, rngs=rngs)
        self.scale = d**-0.5

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, segments: jax.Array) -> jax.Array:
        qkv = jnp.einsum("ne,shde->nshd", x, self.qkv["weight"][...])
        if "bias" in self.qkv:
            qkv = qkv + self.qkv["bias"][...]
        q, k = apply_rotary(qkv[:, 0], cos, sin), apply_rotary(qkv[:, 1], cos, sin)
        out = segment_attention(q, k, qkv[:, 2], segments, self.scale)
        return self.proj(out.reshape(x.shape[0], -1))


class VisionBlock(nnx.Module):
    def __init__(self, cfg: Glm4vVisionConfig, rngs: nnx.Rngs):
        e, dt = cfg.hidden_size, cfg.jnp_dtype
        self.norm1 = RMSNorm(e, cfg.rms_norm_eps, dt)
        self.attn = VisionAttention(cfg, rngs)
        self.norm2 = RMSNorm(e, cfg.rms_norm_eps, dt)
        self.mlp = SwiGLU(e, cfg.out_hidden_size, cfg.hidden_act, dt, rngs)

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, segments: jax.Array) -> jax.Array:
        x = x + self.attn(self.norm1(x), cos, sin, segments)
        return x + self.mlp(self.norm2(x))


class Downsample(nnx.Module):
    """The Conv2d whose kernel and stride are the merge size: each merge block's m*m patches (adjacent, row by row
    within the block) -> one row of out_hidden_size."""

    def __init__(self, cfg: Glm4vVisionConfig, rngs: nnx.Rngs):
        m, e, o, dt = cfg.spatial_merge_size, cfg.hidden_size, cfg.out_hidden_size, cfg.jnp_dtype
        init = jax.random.normal(rngs.params(), (o, e, m, m), dt) * (e * m * m) ** -0.5
        self.weight = nnx.Param(init, axes=(None,) * 4)
        self.bias = nnx.Param(jnp.zeros((o,), dt), axes=(None,))
        self.m = m

    def __call__(self, x: jax.Array) -> jax.Array:
        blocks = x.reshape(-1, self.m, self.m, x.shape[-1])
        return jnp.einsum("nije,oeij->no", blocks, self.weight[...]) + self.bias[...]


class PatchMerger(SwiGLU):
    """proj, LayerNorm, GELU, then the SwiGLU (HF keeps its projections on the merger itself: merger.gate_proj)."""

    def __init__(self, cfg: Glm4vVisionConfig, rngs: nnx.Rngs):
        o, dt = cfg.out_hidden_size, cfg.jnp_dtype
        super().__init__(o, cfg.intermediate_size, cfg.hidden_act, dt, rngs)
        self.proj = Linear(o, o, bias=False, axes=(None, None), dtype=dt, rngs=rngs)
        self.post_projection_norm = LayerNorm(o, 1e-5, dt)  # torch's LayerNorm default eps

    def __call__(self, x: jax.Array) -> jax.Array:
        return super().__call__(jax.nn.gelu(self.post_projection_norm(self.proj(x)), approximate=False))


class Glm4vVisionTower(nnx.Module):
    """pixel_values [N, C*T*P*P] (rows as the processor lays them out) -> image embeddings
    [N // merge_unit, out_hidden_size], one row per placeholder token, images in order."""

    def __init__(self, cfg: Glm4vVisionConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        self.patch_embed = PatchEmbed(cfg, rngs)
        self.post_conv_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.jnp_dtype)
        self.embeddings = PositionEmbedding(cfg, rngs)
        self.blocks = nnx.List([VisionBlock(cfg, rngs) for _ in range(cfg.depth)])
        self.post_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.jnp_dtype)
        self.downsample = Downsample(cfg, rngs)
        self.merger = PatchMerger(cfg, rngs)

    def __call__(self, pixel_values: jax.Array, meta: Glm4vVisionMetadata) -> jax.Array:
        cfg = self.config
        x = self.post_conv_layernorm(self.patch_embed(pixel_values))
        x = x + self.embeddings(meta.table_rows, meta.table_cols)
        cos, sin = rotary_cos_sin(meta.positions, cfg.head_dim, cfg.rope_theta)
        for block in self.blocks:
            x = block(x, cos, sin, meta.segments)
        return self.merger(self.downsample(self.post_layernorm(x)))


def load_glm4v_tower(source: str | Mapping[str, np.ndarray], mesh: Mesh, *, cfg: Glm4vVisionConfig | None = None,
                     dtype: str = "float32") -> Glm4vVisionTower:
    """A Glm4vVisionTower with weights on `mesh`, from a model folder (config.json + safetensors; `dtype` for the
    config read from it) or a state dict of numpy arrays under HF names (then `cfg` is required)."""
    if cfg is None:
        if not isinstance(source, str):
            raise ValueError("loading a vision tower from a state dict needs its config (cfg=...)")
        cfg = Glm4vVisionConfig.from_pretrained(source, dtype)
    return load_visual_tower(lambda: Glm4vVisionTower(cfg, rngs=nnx.Rngs(0)), source, mesh, cfg.jnp_dtype,
                             what="glm4v vision tower")


# --- the engine's interface (models/vision/spec.py) ---------------------------------------------------------------

SPEC = VisionSpec(
    config=Glm4vVisionConfig.from_hf, tower=Glm4vVisionTower, load_tower=load_glm4v_tower,
    metadata=glm4v_vision_metadata, processor=Glm4vImageConfig.for_tower, preprocess=preprocess_image,
    num_tokens=lambda grid, cfg: int(np.prod(grid)) // cfg.merge_unit,
    max_rows=lambda processor: processor.max_patches,
    positions=prompt_mrope_positions,  # GLM's get_rope_index lays out images as Qwen2-VL's does
)
