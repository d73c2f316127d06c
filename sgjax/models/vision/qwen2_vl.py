"""Qwen2-VL and Qwen2.5-VL vision towers: patches -> ViT blocks with 2D rotary -> PatchMerger -> image embeddings.

The two differ by config: Qwen2-VL has LayerNorm, a GELU MLP and full attention over each image in every block;
Qwen2.5-VL has RMSNorm, a SwiGLU MLP and attention inside windows of `window_size` pixels, except in the blocks
of `fullatt_block_indexes`. For windows the patches are reordered window by window (whole merge blocks move
together, so the merger still finds each block's patches adjacent), and the merged rows are put back in image order
at the end.

Several images run in one call as one flat sequence: attention is masked to pairs of patches with the same segment
id (the image, or the window), computed by blocks of queries so that a call's scores take O(block * N) memory a
head, not O(N^2) (the largest images are 16-32k patches: a dense mask would be tens of GB); it still computes the
masked pairs, which a segment-aware flash kernel in kernels/ would skip. The per-call index arrays come from `vision_metadata` on the host; shapes depend only
on the number of patches, so the executor can bucket that and pad (padding is its own segment, and ignored).
Module and parameter names mirror Hugging Face's `visual.*` tensors. The engine reaches all of it through `SPEC`
(models/vision/spec.py).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from sgjax.models.config import DTYPES
from sgjax.models.layers import COLUMN, ROW, Linear, RMSNorm
from sgjax.models.vision.spec import VisionSpec
from sgjax.models.vision.weights import load_visual_tower
from sgjax.multimodal.mrope import prompt_mrope_positions
from sgjax.multimodal.qwen2_vl_processor import Qwen2VLImageConfig, preprocess_image
from sgjax.platform.mesh import TENSOR

ARCHITECTURES = {"qwen2_vl", "qwen2_5_vl"}
SMALLEST_PATCH_BUCKET = 64


class PatchTowerConfig:
    """What a tower over a grid of patches merged m x m derives from its fields (hidden_size, num_heads,
    patch_size, temporal_patch_size, spatial_merge_size, in_channels, dtype); Qwen2-VL's and GLM-4.1V's configs
    (dataclasses) share it, and the engine reads the same names of both."""

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def merge_unit(self) -> int:
        """Patches merged into one output row (and one placeholder token)."""
        return self.spatial_merge_size**2

    @property
    def patch_dim(self) -> int:
        """Values per patch row of pixel_values."""
        return self.in_channels * self.temporal_patch_size * self.patch_size**2

    @property
    def input_dim(self) -> int:
        return self.patch_dim

    @property
    def smallest_bucket(self) -> int:
        """A tower call's fewest patch rows: whole merge blocks (the larger buckets double it)."""
        return max(SMALLEST_PATCH_BUCKET, self.merge_unit)

    def output_rows(self, num_patches: int) -> int:
        """Merged rows of a call over `num_patches` patch rows."""
        return num_patches // self.merge_unit

    @property
    def jnp_dtype(self):
        return DTYPES[self.dtype]

    @classmethod
    def from_pretrained(cls, model_path: str, dtype: str = "float32"):
        """From the model folder's config.json (`from_hf`)."""
        path = os.path.join(model_path, "config.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no config.json in model folder {model_path!r}")
        with open(path) as f:
            return cls.from_hf(json.load(f), dtype)


@dataclasses.dataclass(frozen=True)
class VisionConfig(PatchTowerConfig):
    architecture: str  # "qwen2_vl" or "qwen2_5_vl"
    depth: int
    hidden_size: int  # the tower's width
    num_heads: int
    intermediate_size: int
    out_hidden_size: int  # the decoder's hidden size: what the merger outputs
    hidden_act: str
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    in_channels: int = 3
    rope_theta: float = 10000.0
    window_size: int = 0  # pixels per window side (Qwen2.5-VL); 0: no windows, every block sees the whole image
    fullatt_block_indexes: tuple[int, ...] = ()  # blocks that see the whole image despite windows
    dtype: str = "float32"

    def uses_windows(self, block: int) -> bool:
        return self.window_size > 0 and block not in self.fullatt_block_indexes

    @classmethod
    def from_hf(cls, config: Mapping, dtype: str = "float32") -> VisionConfig:
        """From a Hugging Face config.json's dict (the full model's, with `vision_config`)."""
        arch = config.get("model_type")
        if arch not in ARCHITECTURES:
            raise ValueError(f"model_type {arch!r} has no vision tower here (supported: {sorted(ARCHITECTURES)})")
        v = config["vision_config"]
        common = dict(
            depth=v["depth"], num_heads=v["num_heads"],
            patch_size=v.get("patch_size", 14), temporal_patch_size=v.get("temporal_patch_size", 2),
            spatial_merge_size=v.get("spatial_merge_size", 2), in_channels=v.get("in_channels", v.get("in_chans", 3)),
            rope_theta=float((v.get("rope_parameters") or {}).get("rope_theta", 10000.0)), dtype=dtype,
        )
        if arch == "qwen2_vl":  # embed_dim is the tower's width; hidden_size the decoder's
            return cls(architecture=arch, hidden_size=v["embed_dim"],
                       intermediate_size=int(v["embed_dim"] * v.get("mlp_ratio", 4)), out_hidden_size=v["hidden_size"],
                       hidden_act=v.get("hidden_act", "quick_gelu"), **common)
        return cls(architecture=arch, hidden_size=v["hidden_size"], intermediate_size=v["intermediate_size"],
                   out_hidden_size=v["out_hidden_size"], hidden_act=v.get("hidden_act", "silu"),
                   window_size=v.get("window_size", 112),
                   fullatt_block_indexes=tuple(v.get("fullatt_block_indexes", (7, 15, 23, 31))), **common)


# --- host side: per-call index arrays ---------------------------------------------------------------------------

@jax.tree_util.register_dataclass
@dataclasses.dataclass
class VisionMetadata:
    """Index arrays for one call over N patches (from `vision_metadata`): int32, numpy on the host."""
    order: jax.Array  # [N] patch rows in the order the blocks see them (window by window)
    positions: jax.Array  # [N, 2] (row, column) of each patch in its image, in `order`
    image_segments: jax.Array  # [N] which image frame each patch (in `order`) belongs to; padding: -1
    window_segments: jax.Array  # [N] which window; equal to image_segments without windows
    restore: jax.Array  # [N // merge_unit] merged rows back to image order


def vision_metadata(grid_thw: np.ndarray | Sequence[Sequence[int]], cfg: VisionConfig,
                    num_patches: int | None = None) -> VisionMetadata:
    """Index arrays for images of the given (t, h, w) patch grids, padded to `num_patches` rows if given."""
    grid_thw = np.asarray(grid_thw, np.int64).reshape(-1, 3)
    m, unit = cfg.spatial_merge_size, cfg.merge_unit
    total = int(np.prod(grid_thw, axis=1).sum())
    num_patches = total if num_patches is None else num_patches
    if num_patches < total or num_patches % unit:
        raise ValueError(f"{num_patches} patch rows cannot hold {total} patches in whole merge blocks of {unit}")
    if np.any(grid_thw[:, 1:] % m):
        raise ValueError(f"image grids {grid_thw.tolist()} are not multiples of the merge size {m}")

    positions, units, frames, windows = [], [], [], []
    unit_offset = frame_offset = window_offset = 0
    for t, h, w in grid_thw.tolist():
        # (row, column) of each patch, merge block by merge block (the processor's patch order).
        rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        rows, cols = (a.reshape(h // m, m, w // m, m).transpose(0, 2, 1, 3).reshape(-1) for a in (rows, cols))
        positions.append(np.tile(np.stack([rows, cols], -1), (t, 1)))
        lh, lw = h // m, w // m  # merge blocks per column and row
        index = np.arange(t * lh * lw).reshape(t, lh, lw)
        if cfg.window_size:
            ws = cfg.window_size // m // cfg.patch_size  # window side in merge blocks
            nh, nw = -(-lh // ws), -(-lw // ws)
            padded = np.full((t, nh * ws, nw * ws), -1)
            padded[:, :lh, :lw] = index
            padded = padded.reshape(t, nh, ws, nw, ws).transpose(0, 1, 3, 2, 4).reshape(t, nh * nw, ws * ws)
            window_of = np.broadcast_to(np.arange(t * nh * nw).reshape(t, nh * nw, 1), padded.shape)
            keep = padded >= 0
            local, window = padded[keep], window_of[keep]
            num_windows = t * nh * nw
        else:
            local = index.reshape(-1)
            window, num_windows = local // (lh * lw), t
        units.append(local + unit_offset)
        frames.append(local // (lh * lw) + frame_offset)
        windows.append(window + window_offset)
        unit_offset += t * lh * lw
        frame_offset += t
        window_offset += num_windows

    units_order = np.concatenate(units or [np.zeros(0, np.int64)])  # no images: all padding (compiling a bucket)
    order = (units_order[:, None] * unit + np.arange(unit)).reshape(-1)
    pad = num_patches - total
    positions = np.concatenate(positions or [np.zeros((0, 2), np.int64)])
    frames, windows = (np.concatenate(a or [np.zeros(0, np.int64)]) for a in (frames, windows))
    return VisionMetadata(
        order=np.concatenate([order, np.arange(total, num_patches)]).astype(np.int32),
        positions=np.concatenate([positions[order], np.zeros((pad, 2), np.int64)]).astype(np.int32),
        image_segments=np.concatenate([np.repeat(frames, unit), np.full(pad, -1)]).astype(np.int32),
        window_segments=np.concatenate([np.repeat(windows, unit), np.full(pad, -1)]).astype(np.int32),
        restore=np.concatenate([np.argsort(units_order), np.arange(total // unit, num_patches // unit)]).astype(np.int32),
    )


# --- device side ------------------------------------------------------------------------------------------------

ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "silu": jax.nn.silu,
}


class LayerNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, dtype):
        self.weight = nnx.Param(jnp.ones((dim,), dtype), axes=(None,))
        self.bias = nnx.Param(jnp.zeros((dim,), dtype), axes=(None,))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * self.weight[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)).astype(x.dtype)


def make_norm(cfg: VisionConfig, dim: int):
    return LayerNorm(dim, 1e-6, cfg.jnp_dtype) if cfg.architecture == "qwen2_vl" else RMSNorm(dim, 1e-6, cfg.jnp_dtype)


class PatchEmbed(nnx.Module):
    """The Conv3d whose stride equals its kernel: one matmul of each flattened patch by the [E, C*T*P*P] kernel."""

    def __init__(self, cfg: VisionConfig, rngs: nnx.Rngs):
        shape = (cfg.hidden_size, cfg.in_channels, cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size)
        init = jax.random.normal(rngs.params(), shape, cfg.jnp_dtype) * cfg.patch_dim**-0.5
        self.proj = nnx.Dict(weight=nnx.Param(init, axes=(None,) * 5))

    def __call__(self, pixels: jax.Array) -> jax.Array:
        w = self.proj["weight"][...]
        return jnp.einsum("nk,ek->ne", pixels.astype(w.dtype), w.reshape(w.shape[0], -1))


def rotary_cos_sin(positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """2D rotary angles [N, head_dim]: a quarter of the frequencies per axis (row, then column), twice over for
    the rotate-half layout."""
    spatial = head_dim // 2
    inv_freq = 1.0 / (theta ** (np.arange(0, spatial, 2, dtype=np.float32) / spatial))
    freqs = positions.astype(jnp.float32)[:, :, None] * jnp.asarray(inv_freq, jnp.float32)  # [N, 2, D/4]
    freqs = freqs.reshape(positions.shape[0], -1)
    freqs = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(freqs), jnp.sin(freqs)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate [N, heads, D] in float32 (as transformers does for the tower)."""
    x32 = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    return (x32 * cos[:, None] + rotated * sin[:, None]).astype(x.dtype)


# Queries a block of segment_attention: its scores are heads x 1024 x N floats (16 heads of a 32k-patch image:
# 2 GiB, against 64 GiB for all queries at once)
QUERY_BLOCK = 1024


def segment_attention(q: jax.Array, k: jax.Array, v: jax.Array, segments: jax.Array, scale: float,
                      block: int = QUERY_BLOCK) -> jax.Array:
    """Bidirectional attention [N, heads, D] among rows of equal segment id (a block-diagonal mask), `block`
    queries at a time (each row's result is the same as all at once: it reads the same keys)."""
    n = q.shape[0]
    if n <= block:
        return _segment_rows(q, segments, k, v, segments, scale)
    pad = -n % block  # padding queries take the last row's segment (no row without a key) and are cut off
    q_blocks = jnp.pad(q, ((0, pad), (0, 0), (0, 0))).reshape(-1, block, *q.shape[1:])
    s_blocks = jnp.pad(segments, (0, pad), mode="edge").reshape(-1, block)
    out = jax.lax.map(lambda qs: _segment_rows(qs[0], qs[1], k, v, segments, scale), (q_blocks, s_blocks))
    return out.reshape(-1, *q.shape[1:])[:n]


def _segment_rows(q: jax.Array, q_segments: jax.Array, k: jax.Array, v: jax.Array, k_segments: jax.Array,
                  scale: float) -> jax.Array:
    scores = jnp.einsum("qhd,khd->hqk", q, k, preferred_element_type=jnp.float32) * scale
    scores = jnp.where(q_segments[None, :, None] == k_segments[None, None, :], scores, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("hqk,khd->qhd", probs, v)


class VisionAttention(nnx.Module):
    def __init__(self, cfg: VisionConfig, rngs: nnx.Rngs):
        e, h, d, dt = cfg.hidden_size, cfg.num_heads, cfg.head_dim, cfg.jnp_dtype
        # HF's qkv is [3 * E, E], rows ordered (q/k/v, head, D); kept as [3, heads, D, E] so "tensor" splits heads.
        init = jax.random.normal(rngs.params(), (3, h, d, e), dt) * e**-0.5
        self.qkv = nnx.Dict(
            weight=nnx.Param(init, axes=(None, TENSOR, None, None), checkpoint_reshape=True),
            bias=nnx.Param(jnp.zeros((3, h, d), dt), axes=(None, TENSOR, None), checkpoint_reshape=True),
        )
        self.proj = Linear(e, e, bias=True, axes=ROW, dtype=dt, rngs=rngs)
        self.scale = d**-0.5

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, segments: jax.Array) -> jax.Array:
        qkv = jnp.einsum("ne,shde->nshd", x, self.qkv["weight"][...]) + self.qkv["bias"][...]
        q, k = apply_rotary(qkv[:, 0], cos, sin), apply_rotary(qkv[:, 1], cos, sin)
        out = segment_attention(q, k, qkv[:, 2], segments, self.scale)
        return self.proj(out.reshape(x.shape[0], -1))


class VisionMLP(nnx.Module):
    """Qwen2-VL: fc2(act(fc1(x))); Qwen2.5-VL: down(act(gate(x)) * up(x)), all with biases."""

    def __init__(self, cfg: VisionConfig, rngs: nnx.Rngs):
        e, i, dt = cfg.hidden_size, cfg.intermediate_size, cfg.jnp_dtype
        if cfg.hidden_act not in ACTIVATIONS:
            raise ValueError(f"vision activation {cfg.hidden_act!r} is not supported (supported: {sorted(ACTIVATIONS)})")
        self.act = ACTIVATIONS[cfg.hidden_act]
        self.gated = cfg.architecture == "qwen2_5_vl"
        if self.gated:
            self.gate_proj = Linear(e, i, bias=True, axes=COLUMN, dtype=dt, rngs=rngs)
            self.up_proj = Linear(e, i, bias=True, axes=COLUMN, dtype=dt, rngs=rngs)
            self.down_proj = Linear(i, e, bias=True, axes=ROW, dtype=dt, rngs=rngs)
        else:
            self.fc1 = Linear(e, i, bias=True, axes=COLUMN, dtype=dt, rngs=rngs)
            self.fc2 = Linear(i, e, bias=True, axes=ROW, dtype=dt, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.gated:
            return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))
        return self.fc2(self.act(self.fc1(x)))


class VisionBlock(nnx.Module):
    def __init__(self, cfg: VisionConfig, rngs: nnx.Rngs):
        self.norm1 = make_norm(cfg, cfg.hidden_size)
        self.attn = VisionAttention(cfg, rngs)
        self.norm2 = make_norm(cfg, cfg.hidden_size)
        self.mlp = VisionMLP(cfg, rngs)

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, segments: jax.Array) -> jax.Array:
        x = x + self.attn(self.norm1(x), cos, sin, segments)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nnx.Module):
    """Norm each patch, concatenate each merge block's patches, then a GELU MLP to the decoder's width."""

    def __init__(self, cfg: VisionConfig, rngs: nnx.Rngs):
        width, dt = cfg.hidden_size * cfg.merge_unit, cfg.jnp_dtype
        self.ln_q = make_norm(cfg, cfg.hidden_size)
        self.mlp = nnx.Dict({  # HF's nn.Sequential(Linear, GELU, Linear): its tensors are mlp.0 and mlp.2
            "0": Linear(width, width, bias=True, axes=COLUMN, dtype=dt, rngs=rngs),
            "2": Linear(width, cfg.out_hidden_size, bias=True, axes=ROW, dtype=dt, rngs=rngs),
        })
        self.width = width

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.ln_q(x).reshape(-1, self.width)
        return self.mlp["2"](jax.nn.gelu(self.mlp["0"](x), approximate=False))


class VisionTower(nnx.Module):
    """pixel_values [N, C*T*P*P] (rows as the processor lays them out) -> image embeddings
    [N // merge_unit, out_hidden_size], one row per placeholder token, images in order."""

    def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        self.patch_embed = PatchEmbed(cfg, rngs)
        self.blocks = nnx.List([VisionBlock(cfg, rngs) for _ in range(cfg.depth)])
        self.merger = PatchMerger(cfg, rngs)

    def __call__(self, pixel_values: jax.Array, meta: VisionMetadata) -> jax.Array:
        cfg = self.config
        x = self.patch_embed(jnp.take(pixel_values, meta.order, axis=0))
        cos, sin = rotary_cos_sin(meta.positions, cfg.head_dim, cfg.rope_theta)
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, meta.window_segments if cfg.uses_windows(i) else meta.image_segments)
        return jnp.take(self.merger(x), meta.restore, axis=0)


# --- weights ----------------------------------------------------------------------------------------------------

def load_vision_tower(source: str | Mapping[str, np.ndarray], mesh: Mesh, *, cfg: VisionConfig | None = None,
                      dtype: str = "float32") -> VisionTower:
    """A VisionTower with weights on `mesh`, from a model folder (config.json + safetensors; `dtype` for the config
    read from it) or a state dict of numpy arrays under HF names (then `cfg` is required). Tensors may be named
    `visual.*` or `model.visual.*`."""
    if cfg is None:
        if not isinstance(source, str):
            raise ValueError("loading a vision tower from a state dict needs its VisionConfig (cfg=...)")
        cfg = VisionConfig.from_pretrained(source, dtype)
    return load_visual_tower(lambda: VisionTower(cfg, rngs=nnx.Rngs(0)), source, mesh, cfg.jnp_dtype,
                             what=f"{cfg.architecture} vision tower")


# --- the engine's interface (models/vision/spec.py) ---------------------------------------------------------------

SPEC = VisionSpec(
    config=VisionConfig.from_hf, tower=VisionTower, load_tower=load_vision_tower, metadata=vision_metadata,
    processor=Qwen2VLImageConfig.for_tower, preprocess=preprocess_image,
    num_tokens=lambda grid, cfg: int(np.prod(grid)) // cfg.merge_unit,
    max_rows=lambda processor: processor.max_patches,
    positions=prompt_mrope_positions,
)
