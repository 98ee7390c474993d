"""Decode state: per-layer caches as pytrees, KV-cache quantization, and memory accounting.

Every full-attention layer keeps a preallocated KV cache [B, KVH, S, Dh] (keys after k_norm and RoPE,
as transformers stores them; heads before slots so the decode GEMMs see (B, KVH) as leading batch dims
and read the cache in place: a [B, S, KVH, Dh] cache made XLA transpose the whole cache every step
once B > 1, 19 of 41 ms per step at batch 8 x 32k on the H200); every Gated DeltaNet layer keeps its
conv window (the last W-1 raw ``in_proj_qkv`` outputs, [B, W-1, C]) and its float32 recurrent state [B, Hv, K, V]. Slots of the KV
cache are token positions of the (left-padded) batch; ``DecodeState`` tracks, per row, how many slots
hold real tokens, so rows may advance by different amounts (speculative decoding).

KV-cache storage modes (``kv_dtype``): "bfloat16"/"float32" store as is; "int8" and "fp8" (E4M3) store
one scale per (token, head), the absmax over the head dimension, mirroring the Q8 cache mode of
ExLlamaV3 (the EXL3 seed's serving stack) and vLLM's fp8 KV cache.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from qwen35_jax.config import FULL_ATTENTION, ModelConfig, TextConfig

KV_DTYPES = ("bfloat16", "float32", "int8", "fp8")
_FP8 = jnp.float8_e4m3fn
_FP8_MAX = 448.0


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    """Keys/values of one attention layer. ``k``/``v`` are [B, KVH, S, Dh]; ``k_scale``/``v_scale`` are
    [B, KVH, S] float32 when the cache is quantized, else None."""

    k: jax.Array
    v: jax.Array
    k_scale: jax.Array | None = None
    v_scale: jax.Array | None = None

    @property
    def quantized(self) -> bool:
        return self.k_scale is not None


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DeltaNetCache:
    """conv: the last W-1 raw inputs of the depthwise conv [B, W-1, C]; recurrent: [B, Hv, K, V] f32."""

    conv: jax.Array
    recurrent: jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DecodeState:
    """layers: one cache per decoder layer (KVCache or DeltaNetCache, by layer type).
    pad: [B] int32 left-padding slots of each row; length: [B] int32 slots written so far (the next
    token of row b goes to slot length[b] and has RoPE position length[b] - pad[b] + delta[b]);
    delta: [B] int32 mRoPE offset after images (transformers' ``rope_deltas``; 0 for text)."""

    layers: tuple
    pad: jax.Array
    length: jax.Array
    delta: jax.Array

    @property
    def max_len(self) -> int:
        for layer in self.layers:
            if isinstance(layer, KVCache):
                return layer.k.shape[2]
        raise ValueError("this model has no attention layer, so no KV cache length")

    def key_valid(self) -> jax.Array:
        """[B, S] bool: slots that hold real tokens."""
        slots = jnp.arange(self.max_len)[None, :]
        return (slots >= self.pad[:, None]) & (slots < self.length[:, None])

    def positions(self) -> jax.Array:
        """[B] RoPE position of each row's next token."""
        return self.length - self.pad + self.delta

    def replace(self, **changes) -> "DecodeState":
        return dataclasses.replace(self, **changes)


def _check_kv_dtype(kv_dtype: str) -> None:
    if kv_dtype not in KV_DTYPES:
        raise ValueError(f"kv_dtype must be one of {KV_DTYPES}, got {kv_dtype!r}")


def init_decode_state(cfg: ModelConfig | TextConfig, batch: int, max_len: int, *, dtype=jnp.bfloat16,
                      kv_dtype: str | None = None, layer_types: tuple[str, ...] | None = None) -> DecodeState:
    """Zeroed caches for ``batch`` sequences of up to ``max_len`` slots. ``dtype`` is the activation
    dtype (conv window); ``kv_dtype`` defaults to it. ``layer_types`` overrides the config's (the MTP
    head has one full-attention layer)."""
    c = cfg.text if isinstance(cfg, ModelConfig) else cfg
    kv_dtype = kv_dtype or jnp.dtype(dtype).name
    _check_kv_dtype(kv_dtype)
    if max_len <= 0 or batch <= 0:
        raise ValueError(f"batch and max_len must be positive, got batch={batch}, max_len={max_len}")
    layers = []
    for layer_type in layer_types or c.layer_types:
        if layer_type == FULL_ATTENTION:
            shape = (batch, c.num_key_value_heads, max_len, c.head_dim)
            if kv_dtype in ("int8", "fp8"):
                store = jnp.int8 if kv_dtype == "int8" else _FP8
                layers.append(KVCache(jnp.zeros(shape, store), jnp.zeros(shape, store),
                                      jnp.zeros(shape[:3], jnp.float32), jnp.zeros(shape[:3], jnp.float32)))
            else:
                layers.append(KVCache(jnp.zeros(shape, kv_dtype), jnp.zeros(shape, kv_dtype)))
        else:
            layers.append(DeltaNetCache(
                conv=jnp.zeros((batch, c.linear_conv_kernel_dim - 1, c.linear_conv_dim), dtype),
                recurrent=jnp.zeros((batch, c.linear_num_value_heads, c.linear_key_head_dim,
                                     c.linear_value_head_dim), jnp.float32),
            ))
    # one buffer per leaf: the jitted steps donate the state, and XLA refuses one buffer donated twice
    return DecodeState(layers=tuple(layers), pad=jnp.zeros((batch,), jnp.int32),
                       length=jnp.zeros((batch,), jnp.int32), delta=jnp.zeros((batch,), jnp.int32))


# --------------------------------------------------------------------------------------------------
# KV quantization
# --------------------------------------------------------------------------------------------------


def quantize_kv(x: jax.Array, kind) -> tuple[jax.Array, jax.Array]:
    """x [B, T, KVH, Dh] -> (codes, scale [B, T, KVH]) with one absmax scale per (token, head)."""
    x32 = x.astype(jnp.float32)
    amax = jnp.max(jnp.abs(x32), axis=-1)
    if kind == jnp.int8:
        scale = amax / 127.0
        codes = jnp.round(x32 / jnp.where(scale == 0, 1.0, scale)[..., None])
        return jnp.clip(codes, -127, 127).astype(jnp.int8), scale
    scale = amax / _FP8_MAX
    return (x32 / jnp.where(scale == 0, 1.0, scale)[..., None]).astype(_FP8), scale


def dequantize_kv(codes: jax.Array, scale: jax.Array, dtype) -> jax.Array:
    return (codes.astype(jnp.float32) * scale[..., None]).astype(dtype)


def write_kv(cache: KVCache, k: jax.Array, v: jax.Array, slots: jax.Array) -> KVCache:
    """Write k/v [B, T, KVH, Dh] at slots [B, T] (per-row positions) of the [B, KVH, S, Dh] cache,
    quantizing if the cache is."""
    rows = jnp.arange(k.shape[0])[:, None]

    def put(buf, val):
        # Slots past the end are dropped: only rows that already finished (and keep stepping in lockstep
        # with the others) can reach them, and what they hold is never read again.
        # buf[rows, :, slots] is [B, T, KVH(, Dh)]: the advanced indices' broadcast dims come first
        return buf.at[rows, :, slots].set(val.astype(buf.dtype), mode="drop")

    if cache.quantized:
        kc, ks = quantize_kv(k, cache.k.dtype)
        vc, vs = quantize_kv(v, cache.v.dtype)
        return KVCache(put(cache.k, kc), put(cache.v, vc), put(cache.k_scale, ks), put(cache.v_scale, vs))
    return KVCache(put(cache.k, k), put(cache.v, v))


def read_kv(cache: KVCache, dtype) -> tuple[jax.Array, jax.Array]:
    if cache.quantized:
        return dequantize_kv(cache.k, cache.k_scale, dtype), dequantize_kv(cache.v, cache.v_scale, dtype)
    return cache.k.astype(dtype), cache.v.astype(dtype)


# --------------------------------------------------------------------------------------------------
# Memory accounting
# --------------------------------------------------------------------------------------------------


def kv_bytes_per_token(cfg: ModelConfig | TextConfig, kv_dtype: str = "bfloat16") -> int:
    """Bytes of KV cache one context token costs, over all attention layers (and one sequence)."""
    c = cfg.text if isinstance(cfg, ModelConfig) else cfg
    _check_kv_dtype(kv_dtype)
    per_head = c.head_dim * {"bfloat16": 2, "float32": 4, "int8": 1, "fp8": 1}[kv_dtype]
    if kv_dtype in ("int8", "fp8"):
        per_head += 4  # the float32 scale
    return 2 * c.num_full_attention_layers * c.num_key_value_heads * per_head


def fixed_state_bytes(cfg: ModelConfig | TextConfig, dtype=jnp.bfloat16) -> int:
    """Bytes of DeltaNet state per sequence, independent of context length (conv window + fp32 state)."""
    c = cfg.text if isinstance(cfg, ModelConfig) else cfg
    conv = (c.linear_conv_kernel_dim - 1) * c.linear_conv_dim * jnp.dtype(dtype).itemsize
    recurrent = c.linear_num_value_heads * c.linear_key_head_dim * c.linear_value_head_dim * 4
    return c.num_linear_attention_layers * (conv + recurrent)


def memory_table(cfg: ModelConfig | TextConfig, *, batch: int = 1, kv_dtype: str = "bfloat16",
                 contexts=(4096, 32768, 131072, 262144), weights_bytes: int | None = None) -> str:
    """A markdown table: context length -> decode-state memory (and total with ``weights_bytes``)."""
    fixed = fixed_state_bytes(cfg)
    per_tok = kv_bytes_per_token(cfg, kv_dtype)
    lines = [f"| context | KV cache ({kv_dtype}) | DeltaNet state | state total (batch {batch}) |"
             + (" with weights |" if weights_bytes else ""), "|---|---|---|---|" + ("---|" if weights_bytes else "")]
    for ctx in contexts:
        kv = batch * ctx * per_tok
        total = kv + batch * fixed
        row = f"| {ctx:,} | {kv / 2**30:.2f} GiB | {batch * fixed / 2**20:.0f} MiB | {total / 2**30:.2f} GiB |"
        if weights_bytes:
            row += f" {(total + weights_bytes) / 2**30:.1f} GiB |"
        lines.append(row)
    return "\n".join(lines)


def state_bytes(state: DecodeState) -> int:
    return int(sum(np.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(state)))
