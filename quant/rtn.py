"""Round-to-nearest (RTN) weight quantization with GPTQ's per-group quantizer.

The quantizer is the one GPTQ applies to each group of columns (Frantar et al., "GPTQ: Accurate
Post-Training Quantization for Generative Pre-trained Transformers", arXiv:2210.17323; code:
GPTQModel ``gptqmodel/quantization/quantizer.py`` ``find_params``/``quantize``, identical in
substance to AutoGPTQ's), applied without GPTQ's error feedback. Semantics, per output row and
group (``shared/reference/quant_formats.md`` section 1.4):

* ``maxq = 2**bits - 1``; ``xmin = min(0, min w)``, ``xmax = max(0, max w)`` (the range holds 0);
* sym: ``xmax = max(|xmin|, xmax)``, ``xmin = -xmax`` where ``xmin < 0``; both 0 -> ``(-1, 1)``;
* ``scale = (xmax - xmin) / maxq``; zero = ``2**(bits-1)`` (sym) or ``round(-xmin / scale)``;
* ``q = clamp(round(w / scale) + zero, 0, maxq)``; ``w_hat = scale * (q - zero)``.

Faithful quirk: with ``sym`` a group whose weights are all >= 0 keeps ``xmin = 0``, so its scale
covers ``[0, xmax]`` while the zero stays mid-range, and weights above ~``xmax/2`` clip. GPTQ does
the same; it is kept so our codes match GPTQModel's bit for bit.

Two deliberate additions: the scale is rounded to the stored scale dtype *before* the codes (and
the MSE search's errors) are computed, so dequantization reproduces exactly the weight that was
chosen; and the asymmetric zero point is clamped to ``[0, maxq]`` (a no-op unless that rounding
pushed ``-xmin/scale`` just past ``maxq``).

Shapes: K in features, N out features (float weight HF ``[N, K]``), G = K // group_size,
Kp padded K, S packed word rows.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.quant_matmul import layout
from quant.leaves import SCALE_DTYPES, QuantizedWeight, dtype_name, normalize_group_size, _check_bits_group

F32 = jnp.float32
CLIP_MODES = ("minmax", "mse")

# GPTQModel Quantizer.configure defaults for the `mse` range search.
MSE_NORM = 2.4
MSE_GRID = 100
MSE_MAXSHRINK = 0.8


def _round_scale(scale, scale_dtype):
    """Round to the stored dtype and back to float32. A scale that underflows to 0 (only possible
    for fp16/bf16 with a group of tiny weights) becomes the dtype's smallest normal so codes stay
    finite; that group then dequantizes to ~0, which is within one step of the truth."""
    s = scale.astype(scale_dtype).astype(F32)
    return jnp.where(s > 0, s, jnp.float32(jnp.finfo(scale_dtype).tiny))


def _div(a, b):
    """IEEE ``a / b`` as torch computes it. XLA's algebraic simplifier rewrites a division by a
    broadcast or a constant into a multiplication by its reciprocal, which is an ulp off often
    enough to flip exact ties: with ``sym`` the most negative weight of every group lands on
    ``-maxq/2`` (-7.5 at 4 bits), which true division rounds to -8 and the rewrite may not. An
    optimization barrier on the full-shape divisor keeps the true division."""
    b = jnp.broadcast_to(jnp.asarray(b, F32), jnp.broadcast_shapes(jnp.shape(a), jnp.shape(b)))
    return a / jax.lax.optimization_barrier(b)


def _codes(w, scale, zero, maxq):
    """GPTQ ``quantize`` without the dequantization: clamp(round(w / scale) + zero, 0, maxq)."""
    return jnp.clip(jnp.round(_div(w, scale)) + zero, 0, maxq)


def _range(w, sym: bool):
    """Per-(row, group) ``xmin``/``xmax`` of w ``[N, G, gs]`` -> ``[N, G, 1]`` each (GPTQ find_params)."""
    xmin = jnp.minimum(jnp.min(w, axis=-1, keepdims=True), 0.0)
    xmax = jnp.maximum(jnp.max(w, axis=-1, keepdims=True), 0.0)
    if sym:
        xmax = jnp.maximum(jnp.abs(xmin), xmax)
        xmin = jnp.where(xmin < 0, -xmax, xmin)
    dead = (xmin == 0) & (xmax == 0)
    return jnp.where(dead, -1.0, xmin), jnp.where(dead, 1.0, xmax)


def _params(xmin, xmax, *, maxq: int, sym: bool, scale_dtype):
    scale = _round_scale(_div(xmax - xmin, maxq), scale_dtype)
    if sym:
        zero = jnp.full_like(scale, (maxq + 1) / 2)
    else:
        zero = jnp.clip(jnp.round(_div(-xmin, scale)), 0, maxq)
    return scale, zero


def find_params(w, *, bits: int, sym: bool, clip: str = "minmax", scale_dtype="float32",
                norm: float = MSE_NORM, grid: int = MSE_GRID, maxshrink: float = MSE_MAXSHRINK):
    """Scales and zero points of GPTQ's quantizer for w ``[N, G, gs]`` (groups along the last
    axis): ``(scale, zero)`` float32 ``[N, G, 1]``, the scale already rounded to ``scale_dtype``.

    ``clip="mse"``: GPTQ's ``mse`` option. Shrink the range by ``p = 1 - i/grid`` for
    ``i < int(maxshrink * grid)`` and keep, per (row, group), the candidate of least
    ``sum |w_hat - w|**norm``; ties keep the wider range (strict ``<`` as in GPTQModel).
    """
    maxq = 2 ** bits - 1
    xmin, xmax = _range(w, sym)
    if clip == "minmax":
        return _params(xmin, xmax, maxq=maxq, sym=sym, scale_dtype=scale_dtype)
    if clip != "mse":
        raise ValueError(f"unknown clip mode {clip!r}; expected one of {CLIP_MODES}")
    # p as float32, as torch applies a Python-float factor to a float32 tensor
    shrink = jnp.asarray((1.0 - np.arange(int(maxshrink * grid)) / grid).astype(np.float32))

    def error(scale, zero):
        q = _codes(w, scale, zero, maxq)
        return jnp.sum(jnp.abs(scale * (q - zero) - w) ** norm, axis=-1, keepdims=True)

    def body(i, carry):
        best, scale, zero = carry
        s1, z1 = _params(shrink[i] * xmin, shrink[i] * xmax, maxq=maxq, sym=sym, scale_dtype=scale_dtype)
        err = error(s1, z1)
        better = err < best
        return jnp.minimum(err, best), jnp.where(better, s1, scale), jnp.where(better, z1, zero)

    # A loop, not a [candidates, N, K] batch: for a 27B MLP matrix the batch would need ~28 GB.
    init = (jnp.full(xmin.shape, jnp.inf, F32), jnp.zeros_like(xmin), jnp.zeros_like(xmin))
    _, scale, zero = jax.lax.fori_loop(0, shrink.shape[0], body, init)
    return scale, zero


@functools.partial(jax.jit, static_argnames=("bits", "group_size", "sym", "clip", "scale_dtype", "norm", "grid",
                                             "maxshrink"))
def _rtn_arrays(w, perm, *, bits, group_size, sym, clip, scale_dtype, norm, grid, maxshrink):
    """The jitted per-leaf work: w ``[N, K]`` -> (packed ``[S, N]``, scales ``[Gp, N]``, zeros
    ``[Gp, N]`` or None, finite flag). One compilation per (shape, dtype, settings)."""
    n, k = w.shape
    w32 = w.astype(F32)
    finite = jnp.all(jnp.isfinite(w32))
    if perm is not None:
        w32 = jnp.take(w32, perm, axis=1)  # quantize in stored (act-order) column order
    g = k // group_size
    wg = w32.reshape(n, g, group_size)
    scale, zero = find_params(wg, bits=bits, sym=sym, clip=clip, scale_dtype=scale_dtype, norm=norm, grid=grid,
                              maxshrink=maxshrink)
    codes = _codes(wg, scale, zero, 2 ** bits - 1).astype(jnp.uint32).reshape(n, k)
    packed = layout.pack(codes.T, bits, group_size)
    g_pad = layout.num_groups(k, bits, group_size) - g  # padding groups: scale 0 (and zero 0)
    scales = jnp.pad(scale[..., 0].T.astype(scale_dtype), ((0, g_pad), (0, 0)))
    zeros = None if sym else jnp.pad(zero[..., 0].T.astype(jnp.uint8), ((0, g_pad), (0, 0)))
    return packed, scales, zeros, finite


def check_weight_args(w, name: str, method: str, bits: int, group_size, clip: str) -> tuple[int, int, int]:
    """Shared argument checks of the weight quantizers: ``(N, K, group size)`` or a ValueError naming
    the parameter."""
    if getattr(w, "ndim", None) != 2:
        raise ValueError(f"{name}: {method} quantizes 2-D [out, in] weights, got shape {getattr(w, 'shape', None)}")
    n, k = w.shape
    gs = normalize_group_size(group_size, k)
    try:
        _check_bits_group(bits, gs, k)
    except ValueError as e:
        raise ValueError(f"{name} [{n}, {k}]: {e}") from None
    if clip not in CLIP_MODES:
        raise ValueError(f"{name}: unknown clip mode {clip!r}; expected one of {CLIP_MODES}")
    return n, k, gs


def rtn_quantize(w, *, bits: int = 4, group_size: int | None = 128, sym: bool = True, clip: str = "minmax",
                 scale_dtype=None, perm=None, norm: float = MSE_NORM, grid: int = MSE_GRID,
                 maxshrink: float = MSE_MAXSHRINK, name: str = "weight") -> QuantizedWeight:
    """Round-to-nearest quantization of a float weight w ``[N, K]`` (HF ``[out, in]``).

    bits: 2, 3, 4 or 8. group_size: columns per scale group; None or -1 = per-channel (K).
    sym: GPTQ symmetric (no stored zeros) or asymmetric (uint8 zero points).
    clip: "minmax" (the plain range) or "mse" (GPTQ's shrink-grid search; norm/grid/maxshrink).
    scale_dtype: float16, bfloat16 or float32; None = the weight's dtype (float32 for others).
    perm: optional ``[K]`` act-order permutation: columns are grouped in this order and the leaf
        stores it (see :class:`QuantizedWeight`).
    name: used in error messages (e.g. the parameter path).
    """
    n, k, gs = check_weight_args(w, name, "RTN", bits, group_size, clip)
    if scale_dtype is None:
        scale_dtype = dtype_name(w.dtype) if dtype_name(w.dtype) in SCALE_DTYPES else "float32"
    scale_dtype = dtype_name(scale_dtype)
    if scale_dtype not in SCALE_DTYPES:
        raise ValueError(f"{name}: scale dtype {scale_dtype} is not one of {SCALE_DTYPES}")
    if perm is not None:
        perm = jnp.asarray(perm, jnp.int32)
        if perm.shape != (k,) or not np.array_equal(np.sort(np.asarray(perm)), np.arange(k)):
            raise ValueError(f"{name}: perm must be a permutation of range({k})")
    packed, scales, zeros, finite = _rtn_arrays(
        w, perm, bits=bits, group_size=gs, sym=bool(sym), clip=clip, scale_dtype=scale_dtype, norm=float(norm),
        grid=int(grid), maxshrink=float(maxshrink))
    if not bool(finite):
        raise ValueError(f"{name}: the weight holds NaN or Inf values; refusing to quantize it")
    leaf = QuantizedWeight(packed, scales, zeros, perm, bits=bits, group_size=gs, in_features=k, out_features=n,
                           method="rtn", orig_dtype=dtype_name(w.dtype))
    return leaf.validate()
