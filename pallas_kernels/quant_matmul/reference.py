"""Plain-jnp reference of the weight-only quantized matmul (readable, fp32 accumulation).

Shapes: M rows of activations, K input features (``in_features``), Kp = K padded (see
``layout.padded_in_features``), S = Kp // p packed word rows (p = 32 // bits codes per word),
N output features, G = Kp // group_size groups (1 for per-channel).

The weight is ``w[k, n] = (code[k, n] - zero[g(k), n]) * scale[g(k), n]`` with ``g(k) = k //
group_size``; ``zero`` is ``2**(bits - 1)`` everywhere when no zero points are given (symmetric).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.quant_matmul import layout


def dequantize(packed, scales, zeros, *, bits: int, group_size: int, in_features: int):
    """Packed codes ``uint32 [S, N]`` + scales ``[G, N]`` (+ zeros ``uint8 [G, N]`` or None)
    -> weight ``float32 [K, N]`` (padding rows dropped)."""
    codes = layout.unpack(packed, bits, in_features).astype(jnp.float32)  # [K, N]
    scale_rows = layout.expand_groups(scales.astype(jnp.float32), group_size, in_features)
    if zeros is None:
        zero_rows = jnp.float32(2 ** (bits - 1))
    else:
        zero_rows = layout.expand_groups(zeros.astype(jnp.float32), group_size, in_features)
    return (codes - zero_rows) * scale_rows


def quant_matmul_reference(x, packed, scales, zeros, *, bits: int, group_size: int,
                           in_features: int):
    """``x [M, K] @ dequantize(...) [K, N] -> [M, N]`` in ``x.dtype``, accumulated in fp32.

    This is also the fall-back path of ``quant_matmul`` (shapes or bit widths the Pallas kernels
    do not cover), so it must stay jit-friendly: XLA fuses the dequantization into the dot's
    operand, at the cost of materialising nothing but the fp32 weight tile it streams.
    """
    w = dequantize(packed, scales, zeros, bits=bits, group_size=group_size,
                   in_features=in_features)
    out = jnp.dot(x.astype(jnp.float32), w, precision=jax.lax.Precision.HIGHEST,
                  preferred_element_type=jnp.float32)
    return out.astype(x.dtype)
