"""Weight-only quantized matmul: reference vs numpy, Pallas kernels (interpreted) vs reference,
validation errors; the `gpu`-marked tests run the compiled kernels on a GPU."""

import functools

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from pallas_kernels.quant_matmul import (dequantize, dequantize_then_dot, layout, quant_matmul,
                                        quant_matmul_reference)
from pallas_kernels.quant_matmul import kernel as qk
from pallas_kernels.quant_matmul.kernel import Config

# Kernel vs reference, both fed the same bf16 activations. Codes and (code - zero) are exact in
# every path; what differs is (a) the gemm path rounds each weight (code - zero) * scale once to
# bf16 (relative 2**-9 per element, random sign, so ~2**-9 / sqrt(#terms) on a dot product),
# (b) the bf16 output rounding (at most 2**-9 relative, ~0.1-0.2% norm-wise), (c) fp32 summation
# order (~1e-6 at these K). Expected norm-wise error is therefore ~2e-3 (measured 1.6e-3..2.4e-3);
# 1e-2 leaves margin, while any indexing/packing/scale bug gives O(1) errors. The max-element
# check (relative to the largest output) catches a single unwritten or misplaced tile.
REL_TOL = 1e-2
MAX_TOL = 2e-2

ON_GPU = jax.default_backend() == "gpu"


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


def _max_rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.abs(a - b).max() / np.abs(b).max()


def make_case(rng, k, n, bits, group_size, with_zeros, scale_dtype=jnp.bfloat16):
    """Random codes/scales/zeros packed as layout.py says; padding groups get scale 0."""
    codes = rng.integers(0, 2**bits, (k, n))
    packed = layout.pack(codes, bits, group_size)
    g = layout.num_groups(k, bits, group_size)
    scales = (rng.random((g, n)) * 0.05 + 0.005).astype(np.float32)
    if g > 1:  # groups made only of padding rows (start >= K): scale 0, as the layout specifies
        scales[np.arange(g) * group_size >= k] = 0.0
    zeros = rng.integers(0, 2**bits, (g, n)).astype(np.uint8) if with_zeros else None
    return (codes, jnp.asarray(packed), jnp.asarray(scales, scale_dtype),
            None if zeros is None else jnp.asarray(zeros))


def _np_dequant(codes, scales, zeros, bits, group_size, k):
    s = np.asarray(scales, np.float64)
    z = np.full_like(s, 2 ** (bits - 1)) if zeros is None else np.asarray(zeros, np.float64)
    gidx = np.zeros(k, int) if s.shape[0] == 1 else np.arange(k) // group_size
    return (codes - z[gidx]) * s[gidx]


# ---------------------------------------------------------------------------------------------
# Reference


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group", [32, "pc"])
@pytest.mark.parametrize("with_zeros", [False, True])
def test_dequantize_matches_numpy(rng, bits, group, with_zeros):
    k, n = 160, 24
    g = k if group == "pc" else group
    codes, packed, scales, zeros = make_case(rng, k, n, bits, g, with_zeros, jnp.float32)
    # numpy re-derivation goes through layout.unpack on the numpy array (independent of jnp).
    unpacked = layout.unpack(np.asarray(packed), bits, k)
    np.testing.assert_array_equal(unpacked, codes)
    want = _np_dequant(unpacked.astype(np.float64), scales, zeros, bits, g, k)
    got = dequantize(packed, scales, zeros, bits=bits, group_size=g, in_features=k)
    assert got.shape == (k, n) and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6, atol=1e-7)


def test_reference_matmul_matches_numpy(rng):
    k, n, bits, g = 160, 40, 4, 32
    codes, packed, scales, zeros = make_case(rng, k, n, bits, g, True, jnp.float32)
    x = rng.standard_normal((5, k)).astype(np.float32)
    want = x.astype(np.float64) @ _np_dequant(codes, scales, zeros, bits, g, k)
    got = quant_matmul_reference(jnp.asarray(x), packed, scales, zeros, bits=bits, group_size=g,
                                 in_features=k)
    assert got.dtype == jnp.float32
    assert _rel(got, want) < 1e-5  # fp32 HIGHEST dot over K=160: ~1e-7


# ---------------------------------------------------------------------------------------------
# Pallas kernels in interpret mode (tiny shapes: the interpreter is slow)

# (M, K, N, bits, group, zeros, scale dtype, config): non-multiple-of-block M, N and K, every
# mode, split-K, per-channel, zeros, and all bit widths.
INTERPRET_CASES = [
    (1, 160, 200, 4, 32, False, jnp.bfloat16, Config("gemv_dot", 16, 64, 16, splits=2)),
    (3, 160, 200, 8, "pc", True, jnp.float16, Config("gemv_dot", 16, 64, 16, splits=3)),
    (16, 384, 72, 4, 128, True, jnp.float32, Config("gemv_dot", 16, 32, 16, splits=4,
                                                    scale_after_dot=False)),
    (3, 160, 200, 4, 32, True, jnp.bfloat16, Config("gemv_fma", 16, 64, 16, splits=2)),
    (1, 160, 48, 8, "pc", False, jnp.bfloat16, Config("gemv_fma", 16, 16, 16)),
    (2, 160, 200, 4, 32, True, jnp.bfloat16, Config("gemv_fma2", 16, 64, 16, splits=2)),
    (1, 160, 48, 8, "pc", False, jnp.float16, Config("gemv_fma2", 16, 16, 16)),
    (17, 160, 200, 8, 32, True, jnp.bfloat16, Config("gemm", 16, 64, 16)),
    (130, 160, 200, 4, "pc", False, jnp.bfloat16, Config("gemm", 64, 64, 32)),
    (130, 384, 40, 4, 128, True, jnp.float16, Config("gemm", 32, 32, 32)),
    (3, 160, 40, 2, 32, True, jnp.bfloat16, Config("gemv_dot", 16, 32, 16)),
    (17, 96, 40, 3, 32, False, jnp.bfloat16, Config("gemm", 32, 32, 16)),
    # gemv_red / gemv_row (top-of-mantissa decode, offsets and scales on partial sums), with
    # ragged N, the slab that straddles K, split-K, zeros, per-channel, every bit width, prefetch
    (1, 160, 200, 4, 32, False, jnp.bfloat16, Config("gemv_red", 16, 64, 16, splits=2)),
    (3, 160, 200, 8, "pc", True, jnp.float16, Config("gemv_red", 16, 64, 16, splits=3)),
    (2, 384, 72, 4, 128, True, jnp.float32, Config("gemv_red", 16, 32, 8, prefetch=True)),
    (1, 160, 40, 2, 32, True, jnp.bfloat16, Config("gemv_red", 16, 32, 16)),
    (1, 160, 200, 4, 32, False, jnp.bfloat16, Config("gemv_row", 16, 64, 16, splits=2)),
    (3, 160, 200, 8, "pc", True, jnp.float16, Config("gemv_row", 16, 64, 8, splits=3,
                                                     prefetch=True)),
    (2, 384, 72, 4, 128, True, jnp.bfloat16, Config("gemv_row", 16, 32, 8, splits=2,
                                                    prefetch=True)),
    (2, 96, 40, 3, 32, False, jnp.bfloat16, Config("gemv_row", 16, 32, 16)),
    # two and three steps in flight (3 > the 2 steps of a split: the clamped loads re-read the last)
    (2, 384, 72, 4, 128, True, jnp.bfloat16, Config("gemv_row", 16, 32, 8, prefetch=2)),
    (1, 384, 72, 4, 128, False, jnp.bfloat16, Config("gemv_row", 16, 32, 8, splits=4, prefetch=3)),
    (1, 160, 48, 8, 32, False, jnp.bfloat16, Config("gemv_row", 16, 16, 16, splits=2)),
    # x_f32: fp32 zero-padded activations and their step sums from XLA (ragged N, the slab that
    # straddles K, split-K, zeros, per-channel, prefetch depth 2, f16)
    (1, 160, 200, 4, 32, False, jnp.bfloat16, Config("gemv_row", 16, 64, 16, splits=2, x_f32=True)),
    (3, 160, 200, 8, "pc", True, jnp.float16, Config("gemv_row", 16, 64, 8, splits=3, prefetch=True,
                                                     x_f32=True)),
    (2, 384, 72, 4, 128, True, jnp.bfloat16, Config("gemv_row", 16, 32, 8, prefetch=2, x_f32=True)),
    (2, 96, 40, 3, 32, False, jnp.bfloat16, Config("gemv_row", 16, 32, 16, x_f32=True)),
    # fma_asm (interpret mode computes a * b + c: the config is accepted and the rest of the path
    # runs; the inline PTX is checked by test_fma_asm_lowers_to_ptx_fma and on the GPU)
    (1, 160, 200, 4, 32, True, jnp.bfloat16, Config("gemv_row", 16, 64, 16, splits=2, x_f32=True,
                                                    prefetch=True, fma_asm=True)),
    # fast decode in the dot paths
    (3, 160, 200, 4, 32, True, jnp.bfloat16, Config("gemv_dot", 16, 64, 16, splits=2,
                                                    fast_decode=True)),
    (3, 160, 200, 8, "pc", True, jnp.bfloat16, Config("gemv_dot", 16, 64, 16, splits=3,
                                                      fast_decode=True, scale_after_dot=False)),
    (17, 160, 200, 8, 32, True, jnp.bfloat16, Config("gemm", 16, 64, 16, fast_decode=True)),
    (130, 160, 200, 4, "pc", False, jnp.bfloat16, Config("gemm", 64, 64, 32, fast_decode=True)),
    (17, 96, 40, 3, 32, False, jnp.float16, Config("gemm", 32, 32, 16, fast_decode=True)),
    # transposed gemm (decoded weights as the dot's first operand); ragged M and N
    (130, 160, 200, 4, 32, True, jnp.bfloat16, Config("gemm", 64, 64, 32, transposed=True)),
    (17, 160, 200, 8, "pc", False, jnp.bfloat16, Config("gemm", 32, 64, 16, transposed=True)),
    (33, 96, 40, 3, 32, True, jnp.float16, Config("gemm", 32, 32, 16, transposed=True)),
    # stacked: one dot per step over the interleaved slabs (activations reordered; K = 160 leaves
    # padding rows and, at int4 with S = 32, three slabs of padding only)
    (130, 160, 200, 4, 32, True, jnp.bfloat16, Config("gemm", 64, 64, 16, transposed=True, stacked=True)),
    (17, 160, 200, 8, "pc", False, jnp.bfloat16, Config("gemm", 32, 64, 16, transposed=True, stacked=True)),
    (9, 96, 40, 2, 32, True, jnp.float16, Config("gemm", 16, 32, 16, transposed=True, stacked=True)),
]


@pytest.mark.parametrize("case", INTERPRET_CASES, ids=lambda c: f"{c[7].mode}{'-fast' if c[7].fast_decode else ''}{'-pf' if c[7].prefetch is True else f'-pf{c[7].prefetch}' if c[7].prefetch else ''}{'-T' if c[7].transposed else ''}{'S' if c[7].stacked else ''}-M{c[0]}-K{c[1]}-N{c[2]}-b{c[3]}-g{c[4]}-z{int(c[5])}")
def test_kernel_matches_reference_interpret(rng, case):
    m, k, n, bits, group, with_zeros, sdt, cfg = case
    g = k if group == "pc" else group
    _, packed, scales, zeros = make_case(rng, k, n, bits, g, with_zeros, sdt)
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    out = qk.quant_matmul_pallas(x, packed, scales, zeros, bits=bits, group_size=g, in_features=k,
                                 interpret=True, config=cfg)
    ref = quant_matmul_reference(x.astype(jnp.float32), packed, scales, zeros, bits=bits,
                                 group_size=g, in_features=k)
    assert out.shape == (m, n) and out.dtype == jnp.bfloat16
    assert np.isfinite(np.asarray(out, np.float32)).all()
    assert _rel(out, ref) < REL_TOL
    assert _max_rel(out, ref) < MAX_TOL


@pytest.mark.parametrize("m", [1, 17])
def test_public_api_default_config_interpret(rng, m):
    k, n, bits, g = 128, 48, 4, 32
    _, packed, scales, zeros = make_case(rng, k, n, bits, g, False)
    x = jnp.asarray(rng.standard_normal((2, m, k)), jnp.bfloat16)  # leading dims are flattened
    kw = dict(bits=bits, group_size=g, in_features=k)
    out = quant_matmul(x, packed, scales, zeros, implementation="pallas_interpret", **kw)
    ref = quant_matmul_reference(x.reshape(-1, k).astype(jnp.float32), packed, scales, zeros, **kw)
    assert out.shape == (2, m, n)
    assert _rel(out.reshape(-1, n), ref) < REL_TOL


@pytest.mark.parametrize("xdt", [jnp.bfloat16, jnp.float16])
def test_xla_dequant_path_matches_reference(rng, xdt):
    k, n, bits, g = 160, 40, 8, 32
    _, packed, scales, zeros = make_case(rng, k, n, bits, g, True)
    x = jnp.asarray(rng.standard_normal((7, k)), xdt)
    kw = dict(bits=bits, group_size=g, in_features=k)
    out = quant_matmul(x, packed, scales, zeros, implementation="xla_dequant", **kw)
    ref = quant_matmul_reference(x.astype(jnp.float32), packed, scales, zeros, **kw)
    assert out.dtype == xdt and out.shape == (7, n)
    assert _rel(out, ref) < REL_TOL


DEQUANT_CASES = [  # (K, N, bits, group, zeros, out dtype): ragged N, K not a multiple of p * R
    (160, 200, 4, 32, True, jnp.bfloat16), (160, 200, 8, "pc", False, jnp.bfloat16),
    (96, 40, 3, 32, True, jnp.float16), (384, 72, 4, 128, False, jnp.bfloat16),
    (160, 48, 2, 32, False, jnp.bfloat16), (1280, 520, 8, 32, True, jnp.bfloat16),
]


@pytest.mark.parametrize("case", DEQUANT_CASES, ids=lambda c: f"K{c[0]}-N{c[1]}-b{c[2]}-g{c[3]}-z{int(c[4])}")
def test_dequantize_pallas_interpret(rng, case):
    """The Pallas dequantization pass against the exact weight rounded to the output dtype: the
    top-of-mantissa decode carries a relative error of ~1e-6 before that rounding, so an element
    may differ by one ulp of the output dtype (2**-7 relative for bf16, 2**-10 for f16) and no more,
    and only where the exact value lies within ~1e-6 of a rounding boundary (rare)."""
    k, n, bits, group, with_zeros, dt = case
    g = k if group == "pc" else group
    _, packed, scales, zeros = make_case(rng, k, n, bits, g, with_zeros, jnp.bfloat16)
    w = qk.dequantize_pallas(packed, scales, zeros, bits=bits, group_size=g, in_features=k, dtype=dt,
                             interpret=True)
    exact = dequantize(packed, scales, zeros, bits=bits, group_size=g, in_features=k)
    ref = np.asarray(exact.astype(dt), np.float32)
    got = np.asarray(w, np.float32)
    assert w.shape == (k, n) and w.dtype == dt
    ulp = np.abs(ref) * (2.0 ** -7 if dt == jnp.bfloat16 else 2.0 ** -10)
    assert (np.abs(got - ref) <= ulp).all()
    assert (got != ref).mean() < 1e-3


def test_dequantize_then_dot_pallas_pass_interpret(rng, monkeypatch):
    """dequantize_then_dot with the Pallas pass (as on a GPU) equals the reference matmul; a bad
    ``dequant`` name is an error."""
    k, n, bits, g = 160, 40, 4, 32
    _, packed, scales, zeros = make_case(rng, k, n, bits, g, True)
    x = jnp.asarray(rng.standard_normal((7, k)), jnp.bfloat16)
    kw = dict(bits=bits, group_size=g, in_features=k)
    real = qk.dequantize_pallas
    monkeypatch.setattr(qk, "dequantize_pallas", lambda *a, **k_: real(*a, interpret=True, **k_))
    out = dequantize_then_dot(x, packed, scales, zeros, dequant="pallas", **kw)
    ref = quant_matmul_reference(x.astype(jnp.float32), packed, scales, zeros, **kw)
    assert _rel(out, ref) < REL_TOL
    with pytest.raises(ValueError, match="dequant must be"):
        dequantize_then_dot(x, packed, scales, zeros, dequant="triton", **kw)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_field_plan_is_exact_and_in_window(bits):
    # Every field lands in the top-of-mantissa window, decodes to 1 + code * 2**(b - 23) exactly
    # for every code, and int4 / int8 need only 2 real shifts per word.
    plan = qk._field_plan(bits)
    assert len(plan) == 32 // bits
    top = 23 - bits
    for j, (d, b) in enumerate(plan):
        assert b == j * bits + d and top - qk.FIELD_SLACK <= b <= top
        codes = np.arange(2**bits, dtype=np.uint32)
        words = codes << np.uint32(j * bits)
        sh = words << np.uint32(d) if d >= 0 else words >> np.uint32(-d)
        f = ((sh & np.uint32(((1 << bits) - 1) << b)) | np.uint32(qk.ONE_BITS)).view(np.float32)
        np.testing.assert_array_equal(f, 1 + codes.astype(np.float64) * 2.0 ** (b - 23))
    if bits in (4, 8):
        assert len({d for d, _ in plan if d}) == 2


def test_gemv_red_fp32_accuracy(rng):
    # fp32 activations and output: the offset removed after the sums costs ~1e-5, far under the
    # bf16 rounding the other paths pay.
    k, n, bits, g = 384, 72, 4, 128
    _, packed, scales, zeros = make_case(rng, k, n, bits, g, True, jnp.float32)
    x = jnp.asarray(rng.standard_normal((2, k)), jnp.float32)
    kw = dict(bits=bits, group_size=g, in_features=k)
    ref = quant_matmul_reference(x, packed, scales, zeros, **kw)
    for mode in ("gemv_red", "gemv_row"):
        out = qk.quant_matmul_pallas(x, packed, scales, zeros, interpret=True,
                                     config=Config(mode, 16, 32, 16), **kw)
        assert _rel(out, ref) < 2e-4


def test_candidates_by_name_fit_shapes():
    # Every named candidate clamps to a valid config at the 27B shapes (what --sweep3 runs and
    # what _TABLE may name).
    for name, entry in qk.CANDIDATES.items():
        for k, n in [(5120, 34816), (17408, 5120), (5120, 10240), (6144, 5120)]:
            for bits, g in [(4, 128), (8, 32), (8, k)]:
                s = layout.slab_rows(k, bits, g)
                m = 512 if entry["mode"] == "gemm" else 1
                cfg = qk.choose_config(m, n, bits=bits, group_size=g, in_features=k,
                                       candidate=name)
                qk._check_config(cfg, m, n, s, g, k)
                assert cfg.mode == entry["mode"]
    for key, name in qk._TABLE.items():
        assert name in qk.CANDIDATES, key
    with pytest.raises(KeyError):
        qk.choose_config(1, 64, bits=4, group_size=32, in_features=160, candidate="nope")


def test_choose_config_fits_shapes():
    # The 27B shapes: rows divide S and the group, splits divide the steps, enough programs.
    for k, n in [(5120, 34816), (17408, 5120), (5120, 10240), (6144, 5120)]:
        for bits, g in [(4, 128), (8, 32), (8, k)]:
            s = layout.slab_rows(k, bits, g)
            for m in (1, 8, 512):
                cfg = qk.choose_config(m, n, bits=bits, group_size=g, in_features=k)
                qk._check_config(cfg, m, n, s, g, k)
                if m <= qk.DECODE_MAX_ROWS:
                    name = qk.table_entry(m, bits=bits, group_size=g, in_features=k)
                    target = qk.CANDIDATES[name].get("target", qk.DEFAULT_TARGET_PER_SM) * qk.NUM_SMS
                    assert (n // cfg.bn) * cfg.splits >= min(target, n // cfg.bn * (s // cfg.rows))


# ---------------------------------------------------------------------------------------------
# Validation


def _good(rng):
    k, n = 160, 32
    _, packed, scales, zeros = make_case(rng, k, n, 4, 32, True)
    x = jnp.ones((2, k), jnp.bfloat16)
    return x, packed, scales, zeros, dict(bits=4, group_size=32, in_features=k)


@pytest.mark.parametrize("mutate, match", [
    (lambda a, kw: (a[0].astype(jnp.int32),) + a[1:], "floating dtype"),
    (lambda a, kw: (a[0][:, :100],) + a[1:], r"x must be \[\.\.\., K=160\]"),
    (lambda a, kw: (a[0], a[1].astype(jnp.int32)) + a[2:], "packed must be uint32"),
    (lambda a, kw: (a[0], a[1][:-1]) + a[2:], "needs S="),
    (lambda a, kw: a[:2] + (a[2][:, :5], a[3]), "scales must be"),
    (lambda a, kw: a[:2] + (a[2].astype(jnp.int32), a[3]), "scales must be float16"),
    (lambda a, kw: a[:3] + (a[3].astype(jnp.int32),), "zeros must be uint8"),
    (lambda a, kw: a[:3] + (a[3][:1],), "zeros must be"),
])
def test_bad_inputs_raise(rng, mutate, match):
    x, packed, scales, zeros, kw = _good(rng)
    args = mutate((x, packed, scales, zeros), kw)
    with pytest.raises(ValueError, match=match):
        quant_matmul(*args, **kw)


def test_bad_static_args_raise(rng):
    x, packed, scales, zeros, kw = _good(rng)
    with pytest.raises(ValueError, match="unsupported bit width 5"):
        quant_matmul(x, packed, scales, zeros, **{**kw, "bits": 5})
    with pytest.raises(ValueError, match="group_size 48 must be positive and divide"):
        quant_matmul(x, packed, scales, zeros, **{**kw, "group_size": 48})
    with pytest.raises(ValueError, match="unknown implementation"):
        quant_matmul(x, packed, scales, zeros, implementation="cuda", **kw)
    with pytest.raises(TypeError, match="bits must be a Python int"):
        quant_matmul(x, packed, scales, zeros, **{**kw, "bits": 4.0})


def test_unsupported_shape_falls_back_or_raises(rng):
    k, n = 64, 8  # N below the smallest tensor-core tile
    _, packed, scales, zeros = make_case(rng, k, n, 4, 32, False)
    x = jnp.asarray(rng.standard_normal((3, k)), jnp.bfloat16)
    kw = dict(bits=4, group_size=32, in_features=k)
    with pytest.raises(ValueError, match="does not cover"):
        quant_matmul(x, packed, scales, zeros, implementation="pallas_interpret", **kw)
    out = quant_matmul(x, packed, scales, zeros, **kw)  # None: falls back to the reference
    ref = quant_matmul(x, packed, scales, zeros, implementation="reference", **kw)
    np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(ref, np.float32))


def test_config_errors():
    with pytest.raises(ValueError, match="must divide S"):
        qk._check_config(Config("gemv_dot", 16, 64, 64), 1, 64, 32, 32, 160)
    with pytest.raises(ValueError, match="power of 2"):
        qk._check_config(Config("gemm", 24, 64, 16), 17, 64, 32, 32, 160)
    with pytest.raises(ValueError, match="splits"):
        qk._check_config(Config("gemv_dot", 16, 64, 16, splits=3), 1, 64, 32, 32, 160)
    with pytest.raises(ValueError, match="transposed applies to the gemm mode only"):
        qk._check_config(Config("gemv_row", 16, 64, 16, transposed=True), 1, 64, 32, 32, 160)
    with pytest.raises(ValueError, match="x_f32 applies to the gemv_row mode only"):
        qk._check_config(Config("gemv_red", 16, 64, 16, x_f32=True), 1, 64, 32, 32, 160)
    with pytest.raises(ValueError, match="fma_asm applies to the gemv_row mode only"):
        qk._check_config(Config("gemv_red", 16, 64, 16, fma_asm=True), 1, 64, 32, 32, 160)
    with pytest.raises(ValueError, match="stacked needs the transposed gemm"):
        qk._check_config(Config("gemm", 16, 64, 16, stacked=True), 32, 64, 32, 32, 160)
    with pytest.raises(ValueError, match="power-of-2 number of codes"):
        qk._check_config(Config("gemm", 16, 64, 16, transposed=True, stacked=True), 32, 64, 32, 32, 160,
                         bits=3)


# ---------------------------------------------------------------------------------------------
# Compiled kernels on a GPU (same checks, realistic and odd shapes, the default block choice)

GPU_CASES = [
    # (M, K, N, bits, group, zeros)
    (1, 5120, 4096, 4, 128, False), (3, 5120, 4096, 8, 32, True), (16, 2048, 1024, 8, "pc", False),
    (1, 17408, 512, 4, 128, True), (8, 6144, 1024, 4, 128, False),
    (17, 160, 200, 4, 32, True), (130, 160, 200, 8, "pc", False), (512, 5120, 2048, 4, 128, True),
    (1000, 2048, 1536, 8, 32, False), (1, 160, 200, 2, 32, False), (5, 96, 40, 3, 32, True),
]


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU (compiled Pallas Triton kernels)")
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: f"M{c[0]}-K{c[1]}-N{c[2]}-b{c[3]}-g{c[4]}-z{int(c[5])}")
def test_kernel_matches_reference_gpu(rng, case):
    m, k, n, bits, group, with_zeros = case
    g = k if group == "pc" else group
    _, packed, scales, zeros = make_case(rng, k, n, bits, g, with_zeros)
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    kw = dict(bits=bits, group_size=g, in_features=k)
    out = jax.jit(lambda *a: quant_matmul(*a, implementation="pallas", **kw))(x, packed, scales, zeros)
    ref = quant_matmul_reference(x.astype(jnp.float32), packed, scales, zeros, **kw)
    assert out.shape == (m, n) and out.dtype == jnp.bfloat16
    assert np.isfinite(np.asarray(out, np.float32)).all()
    assert _rel(out, ref) < REL_TOL
    assert _max_rel(out, ref) < MAX_TOL


@pytest.mark.parametrize("candidate, has_fma", [("row_r16_bn128_w1_pf_t16_xf_fma", True),
                                                 ("row_r16_bn128_w1_pf_t16_xf", False)])
def test_fma_asm_lowers_to_ptx_fma(candidate, has_fma):
    """Config.fma_asm reaches the Triton kernel as inline PTX (lowered for CUDA on any machine)."""
    from jax import export

    k, n = 1024, 256
    s_rows = layout.slab_rows(k, 4, 128)
    cfg = qk.choose_config(1, n, bits=4, group_size=128, in_features=k, candidate=candidate)
    fn = functools.partial(qk.quant_matmul_pallas, zeros=None, bits=4, group_size=128, in_features=k,
                           config=cfg)
    specs = [jax.ShapeDtypeStruct((1, k), jnp.bfloat16), jax.ShapeDtypeStruct((s_rows, n), jnp.uint32),
             jax.ShapeDtypeStruct((k // 128, n), jnp.bfloat16)]
    text = export.export(jax.jit(fn), platforms=["cuda"], disabled_checks=[
        export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(*specs).mlir_module()
    assert text.count("__gpu$xla.gpu.triton") == 1
    assert ("fma.rn.f32" in text) == has_fma


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU (compiled Pallas Triton kernels)")
@pytest.mark.parametrize("mode", ["gemv_dot", "gemv_fma", "gemv_fma2", "gemv_red", "gemv_row",
                                  "gemv_row-pf", "gemv_row-pf2", "gemv_row-xf", "gemv_row-xfa", "gemv_dot-fast", "gemm-fast", "gemm-T", "gemm-S"])
@pytest.mark.parametrize("bits", [4, 8])
def test_decode_modes_gpu(rng, mode, bits):
    m, k, n, g = 2, 1024, 520, 128  # ragged N
    _, packed, scales, zeros = make_case(rng, k, n, bits, g, True)
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    kw = dict(bits=bits, group_size=g, in_features=k)
    mode, _, flag = mode.partition("-")
    cfg = Config(mode, 16, 128, 16 if mode in ("gemv_red", "gemv_row") else 64, splits=2,
                 fast_decode=flag == "fast", prefetch={"pf": True, "pf2": 2, "xf": True, "xfa": True}.get(flag, False),
                 x_f32=flag in ("xf", "xfa"), fma_asm=flag == "xfa")
    if mode == "gemm":
        cfg = Config("gemm", 64, 64, 32, fast_decode=True, transposed=flag in ("T", "S"), stacked=flag == "S")
    out = qk.quant_matmul_pallas(x, packed, scales, zeros, config=cfg, **kw)
    ref = quant_matmul_reference(x.astype(jnp.float32), packed, scales, zeros, **kw)
    assert _rel(out, ref) < REL_TOL


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU (compiled Pallas Triton kernels)")
@pytest.mark.parametrize("case", DEQUANT_CASES + [(5120, 4096, 4, 128, False, jnp.bfloat16)],
                         ids=lambda c: f"K{c[0]}-N{c[1]}-b{c[2]}-g{c[3]}-z{int(c[4])}")
def test_dequantize_pallas_gpu(rng, case):
    """Compiled: within one ulp of the rounded exact weight (see the interpret test)."""
    k, n, bits, group, with_zeros, dt = case
    g = k if group == "pc" else group
    _, packed, scales, zeros = make_case(rng, k, n, bits, g, with_zeros, jnp.bfloat16)
    w = jax.jit(lambda *a: qk.dequantize_pallas(*a, bits=bits, group_size=g, in_features=k, dtype=dt))(
        packed, scales, zeros)
    ref = np.asarray(dequantize(packed, scales, zeros, bits=bits, group_size=g, in_features=k).astype(dt),
                     np.float32)
    got = np.asarray(w, np.float32)
    ulp = np.abs(ref) * (2.0 ** -7 if dt == jnp.bfloat16 else 2.0 ** -10)
    assert (np.abs(got - ref) <= ulp).all()
    assert (got != ref).mean() < 1e-3
