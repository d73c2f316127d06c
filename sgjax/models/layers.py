"""Building blocks shared by the decoder families: Linear, RMSNorm, RoPE, Attention, gated MLP.

Weights keep Hugging Face's layout and names ([out, in] for linear layers) so a checkpoint tensor
maps to a parameter by name alone and can be sliced straight onto its devices. The exceptions are the
fused projections (q/k/v, gate/up: one matmul instead of several), whose Params name the HF tensors
they are stacked from (`checkpoint_parts`). Each Param carries `axes`: the mesh axis each dimension is
split over (see sgjax/platform/mesh.py).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sgjax.kernels import AttentionMetadata, Kernels
from sgjax.platform.mesh import TENSOR
from sgjax.models.config import ModelConfig

COLUMN = (TENSOR, None)  # output features split over "tensor" (q/k/v, gate/up)
ROW = (None, TENSOR)  # input features split over "tensor" (o, down); XLA adds the all-reduce

KVCache = tuple[jax.Array, jax.Array]  # one layer's (k_pages, v_pages), [pages, page_size, KVH, D]

def project(x: jax.Array, weight: jax.Array, cpu: bool = False) -> jax.Array:
    """x [..., in] times weight [out, in] -> [..., out], in x's dtype.

    `cpu` (Kernels.cpu_matmuls): XLA's CPU dot converts a whole bfloat16 (or float16) weight to float32 at every
    call unless the product accumulates in float32 and has at least two rows; that convert cost SmolLM2 in
    bfloat16 7x its float32 decode time (a [1536, 576] weight: 0.2 GB/s read against 10 GB/s). So there a
    16-bit product asks for float32 and a single row is computed twice."""
    if not cpu or weight.dtype == jnp.float32:
        return jnp.einsum("...i,oi->...o", x, weight)
    rows = x.reshape(-1, x.shape[-1])
    single = rows.shape[0] == 1
    if single:
        rows = jnp.concatenate([rows, rows])
    y = jnp.einsum("ti,oi->to", rows, weight, preferred_element_type=jnp.float32)
    return (y[:1] if single else y).astype(x.dtype).reshape(*x.shape[:-1], weight.shape[0])


class Linear(nnx.Module):
    def __init__(self, in_features: int, out_features: int, *, bias: bool, axes, dtype, rngs: nnx.Rngs,
                 cpu: bool = False):
        init = jax.random.normal(rngs.params(), (out_features, in_features), dtype) * (in_features**-0.5)
        self.weight = nnx.Param(init.astype(dtype), axes=axes)
        self.bias = nnx.Param(jnp.zeros((out_features,), dtype), axes=(axes[0],)) if bias else None
        self.cpu = cpu  # Kernels.cpu_matmuls

    def __call__(self, x: jax.Array) -> jax.Array:
        y = project(x, self.weight[...], self.cpu)
        return y + self.bias[...] if self.bias is not None else y


class FusedLinear(nnx.Module):
    """Several Hugging Face projections of one input stacked into one weight, computed by one matmul
    (fewer kernel launches, and a wider matmul that runs closer to peak).

    weight is [*out_shape, in]; `parts` lists (HF module name, slots): each part's [out, in] matrix,
    reshaped, fills `slots` entries of `out_shape[part_axis]`, in order. The loader assembles the
    stack from the named tensors (Param metadata `checkpoint_parts`, `checkpoint_axis`). Empty `parts`: the
    checkpoint already has the stack under this module's own name (metadata `checkpoint_reshape`).
    """

    def __init__(self, in_features: int, out_shape: tuple[int, ...], parts: tuple[tuple[str, int], ...],
                 part_axis: int, *, bias: bool, axes, dtype, rngs: nnx.Rngs, cpu: bool = False):
        if parts and sum(n for _, n in parts) != out_shape[part_axis]:
            raise ValueError(f"parts {parts} do not fill axis {part_axis} of {out_shape}")
        # No parts: the checkpoint holds the stack itself, flattened to HF's [prod(out_shape), in]
        meta = {"checkpoint_parts": parts, "checkpoint_axis": part_axis} if parts else {"checkpoint_reshape": True}
        init = jax.random.normal(rngs.params(), (*out_shape, in_features), dtype) * (in_features**-0.5)
        self.weight = nnx.Param(init.astype(dtype), axes=(*axes, None), **meta)
        self.bias = nnx.Param(jnp.zeros(out_shape, dtype), axes=tuple(axes), **meta) if bias else None
        self.cpu = cpu  # Kernels.cpu_matmuls

    def __call__(self, x: jax.Array) -> jax.Array:
        """[..., in] -> [..., *out_shape]."""
        w = self.weight[...]
        if self.cpu:  # one 2-D matmul: XLA's CPU dot otherwise copies the weight into a transposed layout per call
            y = project(x, w.reshape(-1, w.shape[-1]), cpu=True).reshape(*x.shape[:-1], *w.shape[:-1])
        else:
            y = jnp.tensordot(x, w, axes=[[x.ndim - 1], [w.ndim - 1]])
        return y + self.bias[...] if self.bias is not None else y


class RMSNorm(nnx.Module):
    """Llama's RMSNorm (x_hat * w); with `offset` Gemma's (x_hat * (1 + w), all in float32)."""

    def __init__(self, dim: int, eps: float, dtype, offset: bool = False):
        self.weight = nnx.Param(jnp.zeros((dim,), dtype) if offset else jnp.ones((dim,), dtype), axes=(None,))
        self.eps, self.offset = eps, offset

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        if self.offset:
            return (x32 * (1.0 + self.weight[...].astype(jnp.float32))).astype(x.dtype)
        return self.weight[...] * x32.astype(x.dtype)

    def add_and_norm(self, x: jax.Array, h: jax.Array | None,
                     kernel: Callable | None = None) -> tuple[jax.Array, jax.Array]:
        """(x + h, self(x + h)): the residual stream and its normalised rows (h None: nothing to add).
        `kernel` (Kernels.add_rms_norm) computes both in one pass where it has a tiling; only Llama's norm."""
        if h is None:
            return x, self(x)
        if kernel is not None and not self.offset:
            fused = kernel(x, h, self.weight[...], self.eps)
            if fused is not None:
                return fused
        s = x + h
        return s, self(s)


@functools.lru_cache(maxsize=None)
def rope_inv_freq(head_dim: int, theta: float, scaling: tuple | None) -> np.ndarray:
    """Inverse frequencies of RoPE, with linear or Llama 3.1 ("llama3") scaling, or a divisor per frequency
    ("freq_factors": how GGUF files store Llama 3.1's scaling)."""
    inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    if not scaling:
        return inv_freq.astype(np.float32)
    s = dict(scaling)
    kind = s.get("rope_type", s.get("type"))
    if kind == "freq_factors":
        return (inv_freq / np.asarray(s["factors"], np.float64)).astype(np.float32)
    factor = s["factor"]
    if kind == "linear":
        return (inv_freq / factor).astype(np.float32)
    # llama3: leave high frequencies, divide low ones by `factor`, interpolate between.
    old_len = s["original_max_position_embeddings"]
    low, high = s["low_freq_factor"], s["high_freq_factor"]
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray,
               mrope_section: tuple[int, ...] = (), interleaved: bool = False) -> jax.Array:
    """Rotate [T, heads, D] by position. The first 2 * len(inv_freq) features turn (all of them unless the rotary
    is partial, as GLM-4's); they pair as (i, i + half) in HF's rotate-half layout, or, `interleaved`, as
    (2i, 2i + 1) (GLM-4's). With `mrope_section` (M-RoPE), positions are [3, T] (temporal, row, column) and
    section i of the frequencies turns with row i % 3 (transformers' apply_multimodal_rotary_pos_emb)."""
    if mrope_section:
        row = np.repeat(np.arange(len(mrope_section)) % 3, mrope_section)  # frequency -> its position row
        freqs = positions.astype(jnp.float32)[row].T * jnp.asarray(inv_freq)[None, :]
    else:
        freqs = positions.astype(jnp.float32)[:, None] * jnp.asarray(inv_freq)[None, :]
    rotary = 2 * freqs.shape[-1]
    x_rot, x_pass = x[..., :rotary], x[..., rotary:]
    if interleaved:
        freqs = jnp.repeat(freqs, 2, axis=-1)
        rotated = jnp.stack([-x_rot[..., 1::2], x_rot[..., ::2]], axis=-1).reshape(x_rot.shape)
    else:
        freqs = jnp.concatenate([freqs, freqs], -1)
        half = rotary // 2
        rotated = jnp.concatenate([-x_rot[..., half:], x_rot[..., :half]], axis=-1)
    cos = jnp.cos(freqs)[:, None, :].astype(x.dtype)
    sin = jnp.sin(freqs)[:, None, :].astype(x.dtype)
    out = x_rot * cos + rotated * sin
    return jnp.concatenate([out, x_pass], axis=-1) if x_pass.shape[-1] else out


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, kernels: Kernels, rngs: nnx.Rngs):
        h, d, dt = cfg.hidden_size, cfg.head_dim, cfg.jnp_dtype
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, d
        if cfg.fuse_qkv:
            # [KV head, its G query heads + k + v, D, hidden]: split over "tensor" by KV head, so each
            # device holds whole GQA groups (HF's query head h belongs to KV head h // G).
            group = cfg.num_heads // cfg.num_kv_heads
            self.qkv_proj = FusedLinear(h, (cfg.num_kv_heads, group + 2, d),
                                        (("q_proj", group), ("k_proj", 1), ("v_proj", 1)), part_axis=1,
                                        bias=cfg.qkv_bias, axes=(TENSOR, None, None), dtype=dt, rngs=rngs,
                                        cpu=kernels.cpu_matmuls)
            self.q_proj = self.k_proj = self.v_proj = None
        else:  # "tensor" does not divide the KV heads: q stays split by column, k and v replicated
            self.qkv_proj = None
            self.q_proj = Linear(h, cfg.num_heads * d, bias=cfg.qkv_bias, axes=COLUMN, dtype=dt, rngs=rngs,
                                 cpu=kernels.cpu_matmuls)
            self.k_proj = Linear(h, cfg.num_kv_heads * d, bias=cfg.qkv_bias, axes=COLUMN, dtype=dt, rngs=rngs,
                                 cpu=kernels.cpu_matmuls)
            self.v_proj = Linear(h, cfg.num_kv_heads * d, bias=cfg.qkv_bias, axes=COLUMN, dtype=dt, rngs=rngs,
                                 cpu=kernels.cpu_matmuls)
        self.o_proj = Linear(cfg.num_heads * d, h, bias=cfg.o_bias, axes=ROW, dtype=dt, rngs=rngs,
                             cpu=kernels.cpu_matmuls)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(d, cfg.rms_norm_eps, dt)
            self.k_norm = RMSNorm(d, cfg.rms_norm_eps, dt)
        else:
            self.q_norm = self.k_norm = None
        self.inv_freq_key = (cfg.rotary_dim or d, cfg.rope_theta, cfg.rope_scaling)
        self.mrope_section, self.rope_interleaved = cfg.mrope_section, cfg.rope_interleaved
        self.attention_kwargs = dict(
            scale=cfg.attention_scale,
            sliding_window=cfg.sliding_windows[layer_idx] if cfg.sliding_windows else None,
            softcap=cfg.attn_logit_softcap,
        )
        self.attend = kernels.attention

    def project_qkv(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """x [T, hidden] -> q [T, heads, D], k and v [T, KV heads, D]."""
        t = x.shape[0]
        if self.qkv_proj is not None:
            y = self.qkv_proj(x)  # [T, KV heads, G + 2, D]
            group = y.shape[2] - 2
            return y[:, :, :group].reshape(t, self.num_heads, self.head_dim), y[:, :, group], y[:, :, group + 1]
        return (self.q_proj(x).reshape(t, self.num_heads, self.head_dim),
                self.k_proj(x).reshape(t, self.num_kv_heads, self.head_dim),
                self.v_proj(x).reshape(t, self.num_kv_heads, self.head_dim))

    def __call__(self, x: jax.Array, positions: jax.Array, kv: KVCache, meta: AttentionMetadata):
        t = x.shape[0]
        q, k, v = self.project_qkv(x)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        inv_freq = rope_inv_freq(*self.inv_freq_key)
        q, k = (apply_rope(y, positions, inv_freq, self.mrope_section, self.rope_interleaved) for y in (q, k))
        out, k_pages, v_pages = self.attend(q, k, v, kv[0], kv[1], meta, **self.attention_kwargs)
        return self.o_proj(out.reshape(t, -1)), (k_pages, v_pages)


ACTIVATIONS = {
    "silu": jax.nn.silu,
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
}


class GatedMLP(nnx.Module):
    """down(act(gate(x)) * up(x)): SwiGLU for Llama, GeGLU for Gemma; gate and up as one [2, I, hidden]
    matmul, split over "tensor" along I."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, cpu: bool = False):
        h, i, dt, b = cfg.hidden_size, cfg.intermediate_size, cfg.jnp_dtype, cfg.mlp_bias
        if cfg.hidden_act not in ACTIVATIONS:
            raise ValueError(f"activation {cfg.hidden_act!r} is not supported (supported: {sorted(ACTIVATIONS)})")
        # Checkpoints keep gate and up as two tensors, or (GLM-4) as one [2I, hidden] `gate_up_proj`: gate first.
        parts = () if cfg.checkpoint_gate_up else (("gate_proj", 1), ("up_proj", 1))
        self.gate_up_proj = FusedLinear(h, (2, i), parts, part_axis=0, bias=b,
                                        axes=(None, TENSOR), dtype=dt, rngs=rngs, cpu=cpu)
        self.down_proj = Linear(i, h, bias=b, axes=ROW, dtype=dt, rngs=rngs, cpu=cpu)
        self.hidden_act = cfg.hidden_act

    def __call__(self, x: jax.Array) -> jax.Array:
        gate_up = self.gate_up_proj(x)  # [..., 2, I]
        return self.down_proj(ACTIVATIONS[self.hidden_act](gate_up[..., 0, :]) * gate_up[..., 1, :])


class Embedding(nnx.Module):
    """Token embedding, split over the vocabulary; its matrix doubles as the tied LM head."""

    def __init__(self, vocab_size: int, dim: int, dtype, rngs: nnx.Rngs):
        self.weight = nnx.Param(jax.random.normal(rngs.params(), (vocab_size, dim), dtype), axes=COLUMN)

    def __call__(self, ids: jax.Array) -> jax.Array:
        return jnp.take(self.weight[...], ids, axis=0)

