"""RTN against a small numpy re-derivation of GPTQ's quantizer (GPTQModel ``quantizer.py``
``find_params`` / ``quantize``, ``shared/reference/quant_formats.md`` section 1.4), the effect of
the scale dtype, and the group-size trend."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

import quant
from pallas_kernels.quant_matmul import layout


def gptq_numpy(x, bits, sym, mse=False, norm=2.4, grid=100, maxshrink=0.8):
    """GPTQ's per-row quantizer on x [rows, cols] (one group), in float32 like the torch original.
    Returns (codes, scale, zero) per row."""
    x = x.astype(np.float32)
    maxq = np.float32(2 ** bits - 1)
    xmin = np.minimum(x.min(1), 0).astype(np.float32)
    xmax = np.maximum(x.max(1), 0).astype(np.float32)
    if sym:
        xmax = np.maximum(np.abs(xmin), xmax)
        xmin = np.where(xmin < 0, -xmax, xmin)
    dead = (xmin == 0) & (xmax == 0)
    xmin, xmax = np.where(dead, np.float32(-1), xmin), np.where(dead, np.float32(1), xmax)

    def params(lo, hi):
        s = ((hi - lo) / maxq).astype(np.float32)
        z = np.full_like(s, (maxq + 1) / 2) if sym else np.round(-lo / s)
        return s, z

    def q(s, z):
        return np.clip(np.round(x / s[:, None]) + z[:, None], 0, maxq)

    scale, zero = params(xmin, xmax)
    if mse:
        best = np.full(x.shape[0], np.inf, np.float32)
        for i in range(int(maxshrink * grid)):
            p = np.float32(1 - i / grid)
            s1, z1 = params(p * xmin, p * xmax)
            err = (np.abs(s1[:, None] * (q(s1, z1) - z1[:, None]) - x) ** np.float32(norm)).sum(1)
            better = err < best
            best = np.where(better, err, best)
            scale, zero = np.where(better, s1, scale), np.where(better, z1, zero)
    return q(scale, zero).astype(np.uint8), scale, zero


def _rows(seed, n=6, k=64):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((n, k)).astype(np.float32)
    w[1] = np.abs(w[1])  # an all-positive row: GPTQ's sym quirk (xmin stays 0)
    w[2] = 0.0           # a dead row: range (-1, 1)
    w[3, :5] *= 20       # outliers
    return w


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("group_size", [None, 16])
def test_rtn_minmax_matches_gptq_quantizer(bits, sym, group_size):
    w = _rows(bits)
    leaf = quant.rtn_quantize(jnp.asarray(w), bits=bits, group_size=group_size, sym=sym, scale_dtype="float32")
    k = w.shape[1]
    gs = group_size or k
    codes = np.asarray(layout.unpack(np.asarray(leaf.packed), bits, k)).T  # [N, K]
    for g in range(k // gs):
        cols = slice(g * gs, (g + 1) * gs)
        c, s, z = gptq_numpy(w[:, cols], bits, sym)
        # same float32 ops in the same order: bit-identical
        np.testing.assert_array_equal(codes[:, cols], c)
        np.testing.assert_array_equal(np.asarray(leaf.scales)[g], s)
        if not sym:
            np.testing.assert_array_equal(np.asarray(leaf.zeros)[g], z.astype(np.uint8))
    assert (leaf.zeros is None) == sym


@pytest.mark.parametrize("bits,sym", [(4, True), (3, False), (8, True)])
def test_rtn_mse_matches_gptq_search(bits, sym):
    w = _rows(10 + bits, k=32)
    leaf = quant.rtn_quantize(jnp.asarray(w), bits=bits, group_size=None, sym=sym, clip="mse",
                              scale_dtype="float32")
    _, s_ref, _ = gptq_numpy(w, bits, sym, mse=True)
    # The 80 candidate errors are float32 sums of 32 terms: XLA and numpy may add them in different
    # orders (rel. diff ~1e-7), which could flip a near-tie between neighbouring candidates; the
    # chosen shrink factors (scale ratio steps of 1%) agree far inside that.
    np.testing.assert_allclose(np.asarray(leaf.scales)[0], s_ref, rtol=1e-6)
    minmax = quant.rtn_quantize(jnp.asarray(w), bits=bits, group_size=None, sym=sym, scale_dtype="float32")
    err = lambda q: np.abs(np.asarray(q.dequantize()) - w) ** 2.4  # noqa: E731
    assert (err(leaf).sum(1) <= err(minmax).sum(1) * (1 + 1e-6)).all()  # p = 1 is among the candidates
    if bits <= 4:  # coarse grids: shrinking the range pays off for some Gaussian rows
        assert (err(leaf).sum(1) < err(minmax).sum(1)).any()


def test_scales_are_rounded_before_codes():
    """bf16 scales: the codes must be the round-to-nearest codes for the *stored* scale, so every
    unclipped weight is within half a (stored) step of its dequantized value."""
    rng = np.random.default_rng(3)
    w = rng.standard_normal((16, 64)).astype(np.float32)
    leaf = quant.rtn_quantize(jnp.asarray(w), bits=4, group_size=16, scale_dtype="bfloat16", sym=False)
    assert leaf.scales.dtype == jnp.bfloat16
    scale = np.repeat(np.asarray(leaf.scales, np.float32)[:4], 16, axis=0).T  # [N, K]
    codes = np.asarray(layout.unpack(np.asarray(leaf.packed), 4, 64)).T
    inside = (codes > 0) & (codes < 15)
    err = np.abs(np.asarray(leaf.dequantize()) - w)
    # <= half a step, up to float32 rounding of w / scale (relative 2^-24 of a value <= 15 steps)
    assert (err[inside] <= scale[inside] * (0.5 + 1e-5)).all()


def test_int4_error_shrinks_with_group_size():
    w = np.random.default_rng(5).standard_normal((64, 256)).astype(np.float32)
    errs = []
    for gs in (None, 128, 64, 32, 16):
        d = np.asarray(quant.rtn_quantize(jnp.asarray(w), bits=4, group_size=gs).dequantize())
        errs.append(np.linalg.norm(d - w) / np.linalg.norm(w))
    # smaller groups have smaller ranges (max of fewer Gaussians): expected error falls ~5-10% per
    # halving, far above the sampling noise of 16k weights
    assert all(a > b for a, b in zip(errs, errs[1:])), errs


def test_rtn_errors_name_the_weight():
    w = jnp.ones((4, 32))
    with pytest.raises(ValueError, match="my.w: the weight holds NaN or Inf"):
        quant.rtn_quantize(w.at[1, 2].set(jnp.nan), bits=4, group_size=16, name="my.w")
    with pytest.raises(ValueError, match=r"my.w \[4, 32\]: group size 12 does not divide the input dim 32"):
        quant.rtn_quantize(w, bits=4, group_size=12, name="my.w")
    with pytest.raises(ValueError, match="unsupported bit width 5"):
        quant.rtn_quantize(w, bits=5, group_size=16)
    with pytest.raises(ValueError, match="unknown clip mode 'max'"):
        quant.rtn_quantize(w, bits=4, group_size=16, clip="max")
