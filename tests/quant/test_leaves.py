"""QuantizedWeight: packing, exact dequantization, act-order permutation, pytree behaviour, apply_linear,
and the bits-per-weight accounting (checked against hand computations)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import quant
from pallas_kernels.quant_matmul import layout
from quant import QuantizedWeight


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("k,group_size", [(96, 32), (7, 7), (50, 50), (144, 16), (33, 11)])
def test_pack_unpack_round_trip(bits, k, group_size):
    """Every bit width, odd K, per-channel (group_size == K) and groups, numpy and jnp alike."""
    rng = np.random.default_rng(bits * 1000 + k)
    codes = rng.integers(0, 2 ** bits, size=(k, 5)).astype(np.uint8)
    packed = layout.pack(codes, bits, group_size)
    s = layout.slab_rows(k, bits, group_size)
    assert packed.shape == (s, 5) and packed.dtype == np.uint32
    assert layout.padded_in_features(k, bits, group_size) == (32 // bits) * s >= k
    np.testing.assert_array_equal(layout.unpack(packed, bits, k), codes)
    np.testing.assert_array_equal(np.asarray(layout.pack(jnp.asarray(codes), bits, group_size)), packed)
    np.testing.assert_array_equal(np.asarray(layout.unpack(jnp.asarray(packed), bits, k)), codes)
    # padding rows are code 0
    assert not np.asarray(layout.unpack(packed, bits, (32 // bits) * s))[k:].any()


def _numpy_dequant(codes_kn, scales_gn, zeros_gn, perm, bits, gs):
    """w[perm[j], n] = (code[j, n] - zero[j // gs, n]) * scale[j // gs, n], as float32 [N, K]."""
    k = codes_kn.shape[0]
    g = np.arange(k) // gs
    z = np.float32(2 ** (bits - 1)) if zeros_gn is None else zeros_gn[g].astype(np.float32)
    w_stored = (codes_kn.astype(np.float32) - z) * scales_gn[g].astype(np.float32)
    w = np.empty_like(w_stored)
    w[perm if perm is not None else np.arange(k)] = w_stored
    return w.T


@pytest.mark.parametrize("bits,gs,asym,act_order,scale_dtype", [
    (4, 16, False, False, "float32"), (3, 16, True, True, "float16"), (8, None, True, False, "bfloat16"),
    (2, 24, False, True, "float32"),
])
def test_from_codes_dequantize_is_exact(bits, gs, asym, act_order, scale_dtype):
    rng = np.random.default_rng(bits)
    k, n = 48, 20
    g = 1 if gs is None else k // gs
    codes = rng.integers(0, 2 ** bits, size=(k, n)).astype(np.uint8)
    scales = (rng.random((g, n)) + 0.5).astype(scale_dtype)
    zeros = rng.integers(0, 2 ** bits, size=(g, n)).astype(np.uint8) if asym else None
    perm = rng.permutation(k).astype(np.int32) if act_order else None
    leaf = QuantizedWeight.from_codes(codes, scales, zeros, perm, bits=bits, group_size=gs, method="test",
                                      dtype=jnp.float32)
    assert leaf.shape == (n, k) and leaf.dtype == jnp.float32 and leaf.group_size == (gs or k)
    expect = _numpy_dequant(codes, np.asarray(scales, np.float32), zeros, perm, bits, gs or k)
    # exact: (code - zero) has <= 9 significant bits, the scale <= 24, so the float32 product is exact
    np.testing.assert_array_equal(np.asarray(leaf.dequantize()), expect)
    # padding groups carry scale 0 (so padded rows dequantize to 0 whatever x holds there)
    assert not np.asarray(leaf.scales)[g:].any()
    # apply_linear == x @ W.T; both accumulate the same float32 products, in different orders
    x = jnp.asarray(rng.standard_normal((2, 3, k)), jnp.float32)
    y = leaf.apply_linear(x)
    assert y.shape == (2, 3, n) and y.dtype == jnp.float32
    ref = np.einsum("abk,nk->abn", np.asarray(x, np.float64), expect.astype(np.float64))
    np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-5, atol=1e-5)  # f32 sums of 48 O(1) terms


def test_dequantize_returns_the_original_dtype():
    w = jnp.asarray(np.random.default_rng(0).standard_normal((8, 32)), jnp.bfloat16)
    leaf = quant.rtn_quantize(w, bits=8, group_size=16)
    assert leaf.dtype == jnp.bfloat16 and leaf.scales.dtype == jnp.bfloat16
    d = leaf.dequantize()
    assert d.dtype == jnp.bfloat16 and d.shape == (8, 32)
    x = jnp.ones((3, 32), jnp.bfloat16)
    assert leaf.apply_linear(x).dtype == jnp.bfloat16


def test_pytree_jit_and_static_validation():
    w = jnp.asarray(np.random.default_rng(1).standard_normal((16, 64)), jnp.float32)
    leaf = quant.rtn_quantize(w, bits=4, group_size=32, sym=False)
    leaves, treedef = jax.tree.flatten(leaf)
    assert len(leaves) == 3  # packed, scales, zeros (perm None is an empty subtree)
    back = jax.tree.unflatten(treedef, leaves)
    assert back.bits == 4 and back.group_size == 32 and back.method == "rtn"
    f = jax.jit(lambda q, x: q.apply_linear(x))
    x = jnp.ones((5, 64))
    np.testing.assert_array_equal(np.asarray(f(leaf, x)), np.asarray(leaf.apply_linear(x)))
    # abstract trees (eval_shape) keep the metadata
    abstract = jax.eval_shape(lambda q: q, leaf)
    assert isinstance(abstract, QuantizedWeight) and abstract.shape == (16, 64)
    with pytest.raises(ValueError, match="bit width 5"):
        QuantizedWeight(leaf.packed, leaf.scales, None, None, bits=5, group_size=32, in_features=64, out_features=16)
    with pytest.raises(ValueError, match="group size 24 does not divide in_features 64"):
        QuantizedWeight(leaf.packed, leaf.scales, None, None, bits=4, group_size=24, in_features=64, out_features=16)
    with pytest.raises(ValueError, match="packed has shape"):
        QuantizedWeight(leaf.packed[:-1], leaf.scales, None, None, bits=4, group_size=32, in_features=64,
                        out_features=16).validate()
    with pytest.raises(ValueError, match="scales must be"):
        QuantizedWeight.from_codes(np.zeros((64, 16), np.uint8), np.ones((3, 16), np.float32), bits=4,
                                   group_size=32, method="x", dtype=jnp.float32)
    with pytest.raises(ValueError, match="x has 63 features"):
        leaf.apply_linear(jnp.ones((2, 63)))


def test_average_bits_by_hand():
    """4-bit g32 sym on [N=8, K=64] with float32 scales: ceil(64/8) = 8 rows needed; the smallest
    multiple of 16 dividing the group size 32 is S = 16 word rows (Kp = 128, half padding at this tiny
    K), G = ceil(128/32) = 4 groups. codes 16*8*32 = 4096 bits, scales 4*8*32 = 1024 bits -> 5120 bits
    / 512 weights = 10 bits/weight.
    8-bit per-channel asym with act-order on [N=4, K=40] in float16 scales: S = ceil(10/16)*16 = 16,
    codes 16*4*32 = 2048, scales 1*4*16 = 64, zeros 1*4*8 = 32, perm 40*32 = 1280 -> 3424 bits / 160.
    Plus a float32 [10] vector and a bf16 [3, 4] matrix."""
    rng = np.random.default_rng(0)
    a = quant.rtn_quantize(jnp.asarray(rng.standard_normal((8, 64)), jnp.float32), bits=4, group_size=32)
    b = quant.rtn_quantize(jnp.asarray(rng.standard_normal((4, 40)), jnp.float32), bits=8, group_size=None,
                           sym=False, scale_dtype="float16", perm=rng.permutation(40))
    assert a.storage_bits() == 5120 and b.storage_bits() == 3424
    tree = {"a": a, "x": {"b": b, "v": jnp.zeros(10, jnp.float32), "m": jnp.zeros((3, 4), jnp.bfloat16)}}
    s = quant.average_bits(tree)
    assert (s.quantized_params, s.quantized_bits) == (512 + 160, 5120 + 3424)
    assert s.quantized_bits_per_weight == pytest.approx(8544 / 672)
    assert (s.total_params, s.total_bits) == (672 + 10 + 12, 8544 + 320 + 192)
    assert s.total_bits_per_weight == pytest.approx(9056 / 694)
