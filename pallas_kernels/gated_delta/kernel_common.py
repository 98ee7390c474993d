"""Helpers shared by the gated-delta Pallas kernels (Triton lowering on GPU, interpret mode on CPU).

The kernels are written for the Triton lowering of `pl.pallas_call`: every value inside a kernel
has power-of-two dimensions, dots are 2-D with every dimension >= 16, and refs are whole arrays
indexed with `pl.ds` (no BlockSpecs), with masked loads/stores at ragged edges.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.triton_ops import interleave

try:  # the Triton-specific API moved between jax releases; guard both names
    from jax.experimental.pallas import triton as _plt
except ImportError:  # pragma: no cover - very old jax
    _plt = None

F32 = jnp.float32

# In-kernel dot arithmetic for products that involve the fp32 state (or other fp32 values).
# "bf16x3" splits each fp32 operand x into bf16 hi = bf16(x) and lo = bf16(x - hi) and sums
# hi*hi + hi*lo + lo*hi on the bf16 tensor cores (done by hand in `mm`, so it is the same on every
# backend): ~2^-16 relative error per product, and an operand that is already bf16 (q, k, v of a
# bf16 model) is exact, so its products take 2 passes, not 3. "tf32x3" is Triton's 3-pass TF32
# (fp32-level accuracy, each pass at half the bf16 rate). "tf32" is one TF32 pass (~5e-4 relative
# per product). "float32" is IEEE fp32 on the SIMT cores. Triton's own BF16 presets are not used:
# the lowering runs them as one plain bf16 pass, which would round the fp32 state to bf16.
PRECISIONS = ("bf16x3", "tf32x3", "tf32", "float32")
_SPLIT = "bf16x3"


def compiler_params(num_warps: int, num_stages: int | None = None):
    """Triton compiler parameters (the class name differs between jax versions)."""
    if _plt is None:  # pragma: no cover
        return None
    cls = getattr(_plt, "CompilerParams", None) or getattr(_plt, "TritonCompilerParams")
    return cls(num_warps=num_warps, num_stages=num_stages)


def load(ref, *, mask=None, other=None):
    """Masked load (Triton `tl.load` semantics: masked-off lanes read `other`, never memory)."""
    if mask is None:
        return ref[...]
    if _plt is not None and hasattr(_plt, "load"):
        return _plt.load(ref, mask=mask, other=other)
    return pl.load(ref, (), mask=mask, other=other)  # pragma: no cover - older jax


def store(ref, val, *, mask=None):
    """Masked store: lanes where `mask` is False are not written."""
    if mask is None:
        ref[...] = val
        return
    if _plt is not None and hasattr(_plt, "store"):
        _plt.store(ref, val, mask=mask)
        return
    pl.store(ref, (), val, mask=mask)  # pragma: no cover - older jax


def dot_precision(name: str, interpret: bool):
    """The `precision=` of an fp32 in-kernel dot for `mm`. Interpret mode computes in fp32, except
    for "bf16x3", whose splitting `mm` does itself (so CPU tests run that arithmetic too)."""
    if name not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS} for the Pallas kernels, got {name!r}")
    if name == _SPLIT:
        return _SPLIT
    if interpret:
        return lax.Precision.HIGHEST
    return {
        "float32": lax.DotAlgorithmPreset.F32_F32_F32,
        "tf32x3": lax.DotAlgorithmPreset.TF32_TF32_F32_X3,
        "tf32": lax.DotAlgorithmPreset.TF32_TF32_F32,
    }[name]


def split_bf16(x):
    """(hi, lo) bf16 with hi + lo = x to ~2^-17 relative; a bf16 x is its own single part, and a
    tuple is taken as parts already split (a kernel can store them so and load them as bf16)."""
    if isinstance(x, tuple):
        return x
    if x.dtype == jnp.bfloat16:
        return (x,)
    x = x.astype(F32)
    hi = x.astype(jnp.bfloat16)
    return hi, (x - hi.astype(F32)).astype(jnp.bfloat16)


def to_half(x):
    """x rounded to fp16 (one part: 11 significant bits against bf16's 8, so 2^-11 relative per
    rounding, but only fp16's range: |x| >= 65520 becomes inf, and |x| < 6.1e-5 keeps fewer bits
    as a subnormal; the state pass rescales v for it, `kernel_chunked.fp16_scale`). A (hi, lo) bf16
    pair is summed in fp32 first; a bf16 value in fp16's normal range converts exactly."""
    if isinstance(x, tuple):
        total = x[0].astype(F32)
        for part in x[1:]:
            total = total + part.astype(F32)
        x = total
    return x.astype(jnp.float16)


def mm_fused(pairs, *, trans_a=False, trans_b=False, acc=None):
    """sum_i a_i @ b_i over bf16 (a_i, b_i) pairs (2 or 4; same shapes) as ONE dot of depth
    len(pairs) * K: the a_i interleaved along their contraction axis (`triton_ops.interleave`), the
    b_i alike, so both long axes pair a_i with b_i at the same positions. One dot is one
    tensor-core group and one wait in Triton, where separate dots of a chain each wait for the last."""
    if len(pairs) not in (2, 4):
        raise ValueError(f"mm_fused takes 2 or 4 operand pairs, got {len(pairs)}")
    n = len(pairs)

    def along(parts, axis):  # interleave 2-D parts along `axis` (the Triton join makes a last axis)
        if axis == 1:
            return interleave(parts).reshape(parts[0].shape[0], n * parts[0].shape[1])
        return along([x.T for x in parts], 1).T

    a_axis, b_axis = (0 if trans_a else 1), (1 if trans_b else 0)
    a = along([p[0] for p in pairs], a_axis)
    b = along([p[1] for p in pairs], b_axis)
    out = lax.dot_general(a, b, (((a_axis,), (b_axis,)), ((), ())), preferred_element_type=F32)
    return out if acc is None else out + acc


def mm_wide(a, b, *, trans_a=False, acc=None):
    """acc + (a^T if trans_a) @ b in bf16x3 with b's two bf16 parts side by side along N: one dot
    of a_hi with [b_hi, b_lo] (their columns interleaved by a join, the result's halves separated
    by a split and added), plus a_lo @ b_hi when a is split too. The same products as `mm` in 2
    dots instead of 3 (1 instead of 2 when a is exact in bf16); Triton waits for each dot of a chain
    before the next, so fewer dots are fewer waits. b must be split (fp32 or a (hi, lo) pair)."""
    a_parts, b_parts = split_bf16(a), split_bf16(b)
    if len(b_parts) != 2:
        raise ValueError("mm_wide needs a right operand with two bf16 parts (fp32 or a (hi, lo) pair)")
    dims = (((0 if trans_a else 1,), (0,)), ((), ()))
    rows = a_parts[0].shape[1 if trans_a else 0]
    depth, cols = b_parts[0].shape
    side_by_side = interleave(list(b_parts)).reshape(depth, 2 * cols)
    both = lax.dot_general(a_parts[0], side_by_side, dims, preferred_element_type=F32)
    hi_part, lo_part = jnp.split(both.reshape(rows, cols, 2), 2, axis=-1)
    out = lo_part.reshape(rows, cols) + hi_part.reshape(rows, cols)
    if len(a_parts) > 1:
        out = lax.dot_general(a_parts[1], b_parts[0], dims, preferred_element_type=F32) + out
    return out if acc is None else out + acc


def mm(a, b, precision, *, trans_a=False, trans_b=False, acc=None, fuse=False):
    """2-D matmul with fp32 accumulation: acc + (a^T if trans_a) @ (b^T if trans_b).

    Two bf16 (or two fp16) operands multiply natively (their products are exact in fp32). Otherwise
    `precision` (from `dot_precision`) decides: "bf16x3" sums the bf16 parts (see PRECISIONS),
    anything else is one fp32 dot at that precision (the Triton dot needs equal element types).

    An operand may be a (hi, lo) tuple of bf16 parts (see `split_bf16`), with precision "bf16x3".
    `acc` (fp32, the result's shape) is added as `dot + acc`, one product at a time, which Triton's
    combine pass folds into the dot's accumulator: no second result tile stays live in registers.
    """
    dims = (((0 if trans_a else 1,), (1 if trans_b else 0,)), ((), ()))

    def dot(x, y, prec=None):
        return lax.dot_general(x, y, dims, precision=prec, preferred_element_type=F32)

    def add(product, total):
        return product if total is None else product + total

    if isinstance(a, tuple) or isinstance(b, tuple):
        if precision != _SPLIT:
            raise ValueError(f"operands split into bf16 parts need precision {_SPLIT!r}, got {precision!r}")
    elif a.dtype == b.dtype and a.dtype in (jnp.bfloat16, jnp.float16):
        return add(dot(a, b), acc)
    if precision == _SPLIT:
        a_parts, b_parts = split_bf16(a), split_bf16(b)
        if fuse and len(a_parts) * len(b_parts) > 1:
            # the same products in one dot (both operands split: lo*lo too, a 4th product that
            # only adds accuracy, so the depth stays a power of two)
            pairs = [(x, y) for x in a_parts for y in b_parts]
            return mm_fused(pairs, trans_a=trans_a, trans_b=trans_b, acc=acc)
        # The small cross terms first, the large hi*hi product last (the same three products as
        # before `acc` existed, summed in another order: fp32 rounding differences only).
        if len(b_parts) > 1:
            acc = add(dot(a_parts[0], b_parts[1]), acc)
        if len(a_parts) > 1:
            acc = add(dot(a_parts[1], b_parts[0]), acc)
        return add(dot(a_parts[0], b_parts[0]), acc)
    return add(dot(a.astype(F32), b.astype(F32), precision), acc)


def is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def pow2_at_least(n: int, floor: int = 16) -> int:
    return max(floor, 1 << (int(n) - 1).bit_length())


def pad_axis(x, axis: int, size: int):
    """Zero-pads axis `axis` of x to `size` (no-op when already that size)."""
    if x.shape[axis] == size:
        return x
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, pad)
