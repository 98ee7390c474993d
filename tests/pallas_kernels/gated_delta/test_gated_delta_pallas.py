"""Pallas gated delta rule kernels against the pure-JAX reference.

CPU: the kernels run in Pallas interpret mode (same kernel code, tiny shapes), and their Triton
lowering is checked at the 27B shapes (lowering needs no GPU). GPU (marker `gpu`): the compiled
Triton kernels at real head sizes, including T = 1000 and the 27B head counts.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.gated_delta import kernel_chunked as kcd
from pallas_kernels.gated_delta import kernel_common as kc
from pallas_kernels.gated_delta import (
    chunk_gated_delta_rule_pallas,
    default_implementation,
    gated_delta_recurrent,
    gated_delta_recurrent_pallas,
    gated_delta_rule,
    naive_recurrent_gated_delta_rule,
)

ON_GPU = jax.default_backend() == "gpu"
_skip_without_gpu = pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU: the Triton kernels only compile there")


def gpu(test):
    """The project's `gpu` marker, and a skip (with the reason) where there is none."""
    return pytest.mark.gpu(_skip_without_gpu(test))

# fp32 inputs, fp32 arithmetic on both sides (interpret mode computes its dots at HIGHEST; on the
# GPU tf32x3 keeps fp32-level accuracy): the two differ only by summation order and by the kernel
# taking decays as exp(gamma_i - gamma_j) of prefix sums rather than segment sums (|gamma| <= ~40
# within a chunk here, so ~40 * 6e-8 absolute error in an exponent). Measured 1e-7 to 7e-7; 1e-5
# leaves headroom while any real bug (head mapping, decay off by a token, a mixed-up chunk) gives
# errors of 1e-2 or more.
FP32_TOL = 1e-5
# bf16 inputs, fp32 state, bf16 o: both sides compute in fp32 from the same bf16 inputs and round o
# once; elements within ~1e-7 of a rounding boundary flip by one bf16 ulp (2^-8 relative). A single
# bf16 rounding of every element is ~2e-3 norm-wise, so 2e-3 is a bound the kernel can only exceed
# by computing something else. The state never passes through bf16: fp32 agreement, with the same
# headroom as FP32_TOL times 100 for the GPU's tensor-core passes (the bound is 1e-3).
BF16_O_TOL = 2e-3
BF16_STATE_TOL = 1e-3
# fp32 inputs through the compiled kernels on a GPU: measured 3e-5 to 6e-5 with tf32x3 on an H200
# (the token scan alone is ~1e-6 there), i.e. 50x the CPU's fp32 agreement, from the tensor-core
# passes and Triton's exp; "bf16x3" drops products of ~2^-16 relative (measured 7e-6 on the CPU).
# 1e-4 keeps a 2x margin and is still 100x below the error of a single misplaced token.
GPU_FP32_TOL = 1e-4
# "bf16x3" in interpret mode with fp32 inputs: ~2^-16 = 1.5e-5 relative per product, partly
# averaging out; measured 7e-6 (o) and 4e-6 (state).
BF16X3_FP32_TOL = 5e-5


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


def _l2norm(x):
    return x / np.sqrt((x * x).sum(-1, keepdims=True) + 1e-6)


def _inputs(seed, batch, t, hk, hv, kd, vd, *, dtype=jnp.float32, num_states=None):
    """Fresh random inputs shaped like the model's: l2-normalised q (scaled) and k, log-decays mostly
    in [-3, 0) with some near 0 (long memory) and a few -20 (state wiped out), beta in (0, 1)."""
    rng = np.random.default_rng(seed)
    q = _l2norm(rng.standard_normal((batch, t, hk, kd))) * kd**-0.5
    k = _l2norm(rng.standard_normal((batch, t, hk, kd)))
    v = rng.standard_normal((batch, t, hv, vd))
    g = -np.minimum(np.log1p(np.exp(rng.standard_normal((batch, t, hv)) * 2 - 1)), 3)
    u = rng.random(g.shape)
    g = np.where(u < 0.15, -1e-3 * rng.random(g.shape), g)
    g = np.where(u > 0.98, -20.0, g)
    beta = 1 / (1 + np.exp(-rng.standard_normal((batch, t, hv))))
    state = rng.standard_normal((num_states or batch, hv, kd, vd))
    cast = lambda x, dt=dtype: jnp.asarray(x.astype(np.float32), dt)  # noqa: E731
    return (cast(q), cast(k), cast(v), cast(g, jnp.float32), cast(beta)), cast(state, jnp.float32)


_naive = jax.jit(naive_recurrent_gated_delta_rule)


def _check(o, s, o_ref, s_ref, dtype, fp32_tol=FP32_TOL):
    assert o.shape == o_ref.shape and o.dtype == o_ref.dtype
    assert s.shape == s_ref.shape and s.dtype == jnp.float32
    assert np.all(np.isfinite(np.asarray(o, np.float32))) and np.all(np.isfinite(s))
    o_tol, s_tol = (fp32_tol, fp32_tol) if dtype == jnp.float32 else (BF16_O_TOL, BF16_STATE_TOL)
    assert _rel(o, o_ref) < o_tol, _rel(o, o_ref)
    assert _rel(s, s_ref) < s_tol, _rel(s, s_ref)


# ---- CPU: interpret mode, tiny shapes ------------------------------------------------------------

# (Hk, Hv, K, V): G = 2 or 3 value heads per key head; V = 24 and K = 8 exercise the zero-padding to
# Triton's power-of-two sizes.
SMALL = [(1, 2, 16, 16), (1, 3, 8, 24)]


@pytest.mark.parametrize("t, output_all_states", [(1, False), (1, True), (3, True)])
@pytest.mark.parametrize("heads", SMALL)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_recurrent_interpret_matches_reference(t, output_all_states, heads, dtype):
    (q, k, v, g, beta), state = _inputs(t + 100, 2, t, *heads, dtype=dtype)
    o_ref, s_ref = gated_delta_recurrent(q, k, v, g, beta, state, implementation="naive",
                                         output_all_states=output_all_states)
    o, s = gated_delta_recurrent(q, k, v, g, beta, state, implementation="pallas_interpret",
                                 output_all_states=output_all_states, block_v=16)
    _check(o, s, o_ref, s_ref, dtype)


@pytest.mark.parametrize("t, chunk_size, with_state", [(1, 64, True), (63, 64, False), (65, 64, True), (40, 16, True)])
def test_chunked_interpret_matches_reference(t, chunk_size, with_state):
    (q, k, v, g, beta), state = _inputs(t, 2, t, 1, 2, 16, 16)
    state = state if with_state else None
    o_ref, s_ref = _naive(q, k, v, g, beta, state)
    o, s = gated_delta_rule(q, k, v, g, beta, initial_state=state, implementation="pallas_interpret",
                            chunk_size=chunk_size, block_v=16)
    _check(o, s, o_ref, s_ref, jnp.float32)


@pytest.mark.parametrize("options", [{}, {"fuse_products": True}, {"fuse_products": "xv,update"},
                                     {"transposed": True}, {"wide_products": True}, {"stack_qk": True},
                                     {"stack_qk": True, "wide_products": "xv,pv,update"},
                                     {"stack_qk": True, "wide_products": "ks,qs,pv,update", "fuse_products": "xv"}])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_chunked_interpret_bf16x3(dtype, options):
    # The hand-split bf16 arithmetic runs the same on the CPU, so its accuracy is checked here.
    # Every option computes the same bf16 products (fuse_products adds lo*lo, which only adds
    # accuracy), in other dots or orders, so all share one bound: fuse_products as one dot per
    # product, transposed on transposed operands (S^T held), wide_products with the right operand's
    # parts side by side along N, stack_qk with K S and Q S in one dot of [k; q]. (Two heads of
    # one key head: the stacked rows are written by the first value head and read by both.)
    _check(*_interpret_bf16x3(dtype, options), dtype, fp32_tol=BF16X3_FP32_TOL)


def _interpret_bf16x3(dtype, options):
    """(o, s, o_ref, s_ref): bf16x3 in interpret mode with the state-pass `options`; T=150 (two
    chunks of 64 and a partial one), two value heads of one key head, an initial state.
    fp16_products is off unless `options` name it (with bf16 inputs it would default to on)."""
    (q, k, v, g, beta), state = _inputs(8, 1, 150, 1, 2, 32, 32, dtype=dtype)
    o_ref, s_ref = _naive(q, k, v, g, beta, state)
    o, s = gated_delta_rule(q, k, v, g, beta, initial_state=state, implementation="pallas_interpret",
                            precision="bf16x3", block_v=16, **{"fp16_products": False, **options})
    return o, s, o_ref, s_ref


@pytest.mark.parametrize("options", [{"bf16_products": "qs"},
                                     {"bf16_products": "qs", "wide_products": "xv,pv,update"}])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_chunked_interpret_bf16_products(dtype, options):
    # bf16_products="qs": Q S from S rounded to bf16 (q is exact in bf16 models), one rounding of
    # <= 2^-9 relative per element of S in the inter-chunk part of o only. Norm-wise that is at most
    # ~2^-9 of o (2e-3) and, for random data, ~1e-4; the state never sees it, so it keeps bf16x3's
    # bound. With fp32 inputs the error must also exceed bf16x3's (measured 7e-6; 5e-5 bounds it):
    # otherwise the option did not reach the kernel.
    o, s, o_ref, s_ref = _interpret_bf16x3(dtype, options)
    if dtype == jnp.float32:
        assert BF16X3_FP32_TOL < _rel(o, o_ref) < BF16_O_TOL, _rel(o, o_ref)
        assert _rel(s, s_ref) < BF16X3_FP32_TOL, _rel(s, s_ref)
    else:
        _check(o, s, o_ref, s_ref, dtype)


# fp16_products: every named product from operands rounded to fp16 (unit roundoff 2^-11 = 4.9e-4,
# 8x below bf16's 2^-8). All five with bf16 products measured 2.9e-3 on o and 2.3e-3 on the state
# (NOTES.md run 10: the rounding of S, V' and X compounds over the chunks), so fp16 predicts ~8x
# less, 3.6e-4 and 2.9e-4 (measured so at T=512 and at T=4096: the errors do not grow with T).
# 1e-3 gives a ~3x margin and is the issue's own bound on the state; a product left in bf16
# (2^-8) would exceed it. With fp32 inputs the error must also exceed bf16x3's bound, or the
# option never reached the kernel.
FP16_PRODUCTS_TOL = 1e-3


@pytest.mark.parametrize("products", [True, "xv,pv", "update"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_chunked_interpret_fp16_products(dtype, products):
    o, s, o_ref, s_ref = _interpret_bf16x3(dtype, {"fp16_products": products})
    assert np.all(np.isfinite(np.asarray(o, np.float32))) and np.all(np.isfinite(s))
    reaches_o = products is True or "pv" in products or "xv" in products
    if dtype == jnp.float32:
        assert (BF16X3_FP32_TOL < _rel(o, o_ref)) == reaches_o, _rel(o, o_ref)
        assert BF16X3_FP32_TOL < _rel(s, s_ref), _rel(s, s_ref)
        assert _rel(o, o_ref) < FP16_PRODUCTS_TOL, _rel(o, o_ref)
    else:  # o is rounded to bf16 on both sides: a difference of d before rounding flips elements
        # near a rounding boundary by one bf16 ulp, ~sqrt(d * 2^-8) norm-wise (1e-3 measured), so o
        # gets the bf16 bound (BF16_O_TOL); the fp32 state keeps the fp16 one
        assert _rel(o, o_ref) < BF16_O_TOL, _rel(o, o_ref)
    assert _rel(s, s_ref) < FP16_PRODUCTS_TOL, _rel(s, s_ref)


@pytest.mark.parametrize("scale", [1e-6, 1e6])
def test_chunked_interpret_fp16_products_any_scale(scale):
    """v and the initial state far outside fp16's range (or down in its subnormals): the state pass
    rescales them by a power of two (kernel_chunked.fp16_scale), so the error stays that of the
    fp16 roundings at unit scale (FP16_PRODUCTS_TOL), where unscaled operands would be inf (1e6)
    or lose most of their bits (1e-6)."""
    (q, k, v, g, beta), state = _inputs(9, 1, 80, 1, 2, 32, 32)
    v, state = v * scale, state * scale
    o_ref, s_ref = _naive(q, k, v, g, beta, state)
    o, s = gated_delta_rule(q, k, v, g, beta, initial_state=state, implementation="pallas_interpret",
                            block_v=16, fp16_products=True)
    assert _rel(o, o_ref) < FP16_PRODUCTS_TOL and _rel(s, s_ref) < FP16_PRODUCTS_TOL, (_rel(o, o_ref), _rel(s, s_ref))


def test_default_fp16_products_and_stages():
    """fp16_products=None / num_stages=None (kcd.default_fp16_products,
    default_num_stages): all five products in fp16 and 3 stages for 16-bit inputs at the default
    precision; none and 1 stage for fp32 inputs (whose tiles do not fit 2 stages on an H100);
    another precision or another per-product option keeps the products at `precision`."""
    bf, f16, f32 = jnp.bfloat16, jnp.float16, jnp.float32
    assert kcd.default_fp16_products((bf, bf, bf)) is True
    assert kcd.default_fp16_products((f16, f16, f16)) is True
    assert kcd.default_fp16_products((bf, bf, f32)) is False
    assert kcd.default_fp16_products((bf, bf, bf), "tf32x3") is False
    for other in ("fuse_products", "transposed", "wide_products", "stack_qk", "bf16_products"):
        assert kcd.default_fp16_products((bf, bf, bf), **{other: True}) is False, other
    assert kcd.default_num_stages((bf, bf, bf), True, 64) == 3
    assert kcd.default_num_stages((bf, bf, bf), "xv,pv", 64) == 2
    assert kcd.default_num_stages((bf, bf, bf), True, 128) == 2
    assert kcd.default_num_stages((bf, bf, bf), False, 64) == 2
    assert kcd.default_num_stages((f32, f32, f32), True, 64) == 1
    # resolve_defaults fills only what is None
    assert kcd.resolve_defaults((bf, bf, bf), "bf16x3", 64) == (True, 3)
    assert kcd.resolve_defaults((bf, bf, bf), "bf16x3", 64, fp16_products=False) == (False, 2)
    assert kcd.resolve_defaults((bf, bf, bf), "bf16x3", 64, num_stages=1) == (True, 1)


@pytest.mark.parametrize("dtype, fp16", [(jnp.bfloat16, True), (jnp.float32, False)])
def test_chunked_interpret_default_products(dtype, fp16):
    """The wrapper's defaults reach the kernels: with no option, the outputs are bit for bit those
    of the explicit setting (fp16 products for bf16 inputs, none for fp32), and differ from the
    other setting."""
    (q, k, v, g, beta), state = _inputs(10, 1, 70, 1, 2, 32, 32, dtype=dtype)
    run = functools.partial(gated_delta_rule, q, k, v, g, beta, initial_state=state,
                            implementation="pallas_interpret", precision="bf16x3", block_v=16)
    o, s = run()
    o_same, s_same = run(fp16_products=fp16)
    o_other, s_other = run(fp16_products=not fp16)
    np.testing.assert_array_equal(np.asarray(o, np.float32), np.asarray(o_same, np.float32))
    np.testing.assert_array_equal(s, s_same)
    assert not np.array_equal(s, s_other)


def test_fp16_scale():
    """A power of two that puts max(|v|, |h0|) in [8, 16); 1 for zeros or a non-finite maximum
    (an inf in v then reaches the outputs as it does in the reference)."""
    for m, want in ((10.0, 1.0), (16.0, 0.5), (1e-5, 2.0**20), (3e5, 2.0**-15)):
        v = jnp.asarray([[m / 3, -m]], jnp.float32)
        got = float(kcd.fp16_scale(v)[0])
        assert got == want and 8 <= m * got < 16, (m, got)
    assert float(kcd.fp16_scale(jnp.ones((2, 2)), 40.0 * jnp.ones((3,)))[0]) == 0.25
    assert float(kcd.fp16_scale(jnp.zeros((2, 2)))[0]) == 1.0
    assert float(kcd.fp16_scale(jnp.asarray([1.0, jnp.inf]))[0]) == 1.0


@pytest.mark.parametrize("trans_a, split_a", [(False, False), (False, True), (True, False), (True, True)])
def test_mm_wide_is_the_sum_of_its_products(trans_a, split_a):
    """mm_wide's side-by-side dot equals the separate bf16 products of `mm` (hi*hi + hi*lo, plus
    lo*hi when a is split): every product of two bf16 values is exact in fp32, so the two differ
    only in the order of fp32 additions over a depth of 32 (relative ~1e-7; 1e-5 bounds it, while
    a mispaired interleave or split swaps or mixes columns and errs by O(1))."""
    rng = np.random.default_rng(7)
    a = jnp.asarray(rng.standard_normal((32, 16) if trans_a else (16, 32)), jnp.float32)
    a = a if split_a else a.astype(jnp.bfloat16)
    b = jnp.asarray(rng.standard_normal((32, 64)), jnp.float32)
    acc = jnp.asarray(rng.standard_normal((16, 64)), jnp.float32)
    want = kc.mm(a, b, "bf16x3", trans_a=trans_a, acc=acc)
    got = kc.mm_wide(a, b, trans_a=trans_a, acc=acc)
    assert got.shape == want.shape == (16, 64) and got.dtype == jnp.float32
    assert _rel(got, want) < 1e-5, _rel(got, want)
    with pytest.raises(ValueError, match="two bf16 parts"):
        kc.mm_wide(a, b.astype(jnp.bfloat16))


@pytest.mark.parametrize("trans_a, trans_b", [(False, False), (True, False), (False, True)])
@pytest.mark.parametrize("n_pairs", [2, 4])
def test_mm_fused_is_the_sum_of_its_products(trans_a, trans_b, n_pairs):
    """One dot over the interleaved operands equals the sum of the separate bf16 dots: each product
    of two bf16 values is exact in fp32, so the two differ only in the order of fp32 additions over
    a depth of n_pairs * 32 (relative ~1e-6 of the sum's magnitude; 1e-5 bounds it, while a
    mispaired interleave mixes unrelated products and errs by O(1))."""
    rng = np.random.default_rng(n_pairs)
    shape_a, shape_b = ((32, 16) if trans_a else (16, 32)), ((64, 32) if trans_b else (32, 64))
    pairs = [(jnp.asarray(rng.standard_normal(shape_a), jnp.bfloat16),
              jnp.asarray(rng.standard_normal(shape_b), jnp.bfloat16)) for _ in range(n_pairs)]
    acc = jnp.asarray(rng.standard_normal((16, 64)), jnp.float32)
    dims = (((0 if trans_a else 1,), (1 if trans_b else 0,)), ((), ()))
    want = acc + sum(jax.lax.dot_general(a, b, dims, preferred_element_type=jnp.float32) for a, b in pairs)
    got = kc.mm_fused(pairs, trans_a=trans_a, trans_b=trans_b, acc=acc)
    assert got.shape == want.shape and got.dtype == jnp.float32
    assert _rel(got, want) < 1e-5, _rel(got, want)
    with pytest.raises(ValueError, match="2 or 4 operand pairs"):
        kc.mm_fused(pairs[:1])


def test_fuse_products_errors():
    (q, k, v, g, beta), _ = _inputs(1, 1, 16, 1, 2, 16, 16)
    with pytest.raises(ValueError, match="fuse_products needs precision 'bf16x3'"):
        gated_delta_rule(q, k, v, g, beta, implementation="pallas_interpret", precision="tf32x3",
                         block_v=16, fuse_products=True)
    with pytest.raises(ValueError, match=r"unknown product\(s\) \['xs'\]"):
        gated_delta_rule(q, k, v, g, beta, implementation="pallas_interpret", precision="bf16x3",
                         block_v=16, fuse_products="ks,xs")
    with pytest.raises(ValueError, match="fuse_products and transposed do not combine"):
        gated_delta_rule(q, k, v, g, beta, implementation="pallas_interpret", precision="bf16x3",
                         block_v=16, fuse_products=True, transposed=True)


@pytest.mark.parametrize("options, message", [
    ({"precision": "tf32x3", "wide_products": True}, "wide_products needs precision 'bf16x3'"),
    ({"wide_products": "update,kv"}, r"wide_products: unknown product\(s\) \['kv'\]"),
    ({"wide_products": True, "transposed": True}, "do not combine with transposed"),
    ({"stack_qk": True, "transposed": True}, "do not combine with transposed"),
    ({"wide_products": "xv,pv", "fuse_products": "pv"}, r"both fused and wide: \['pv'\]"),
    ({"stack_qk": True, "fuse_products": "ks"}, "'ks' and 'qs' cannot be fused"),
    ({"stack_qk": True, "wide_products": "qs"}, "wide together or not at all"),
    ({"bf16_products": "qs,kv"}, r"bf16_products: unknown product\(s\) \['kv'\]"),
    ({"bf16_products": "qs", "transposed": True}, "bf16_products and transposed do not combine"),
    ({"bf16_products": "qs", "wide_products": "qs,pv"}, r"both in bf16_products and in wide_products: \['qs'\]"),
    ({"bf16_products": "pv,xv", "fuse_products": "xv"}, r"both in bf16_products and in fuse_products: \['xv'\]"),
    ({"stack_qk": True, "bf16_products": "qs"}, "in bf16_products together or not at all"),
    ({"fp16_products": "xv,kv"}, r"fp16_products: unknown product\(s\) \['kv'\]"),
    ({"fp16_products": True, "transposed": True}, "fp16_products and transposed do not combine"),
    ({"fp16_products": "pv", "wide_products": "pv"}, r"both in fp16_products and in wide_products: \['pv'\]"),
    ({"fp16_products": "qs,xv", "bf16_products": "qs"}, r"both in bf16_products and in fp16_products: \['qs'\]"),
    ({"stack_qk": True, "fp16_products": "ks"}, "in fp16_products together or not at all"),
])
def test_wide_and_stack_errors(options, message):
    (q, k, v, g, beta), _ = _inputs(1, 1, 16, 1, 2, 16, 16)
    options = {"precision": "bf16x3", **options}
    with pytest.raises(ValueError, match=message):
        gated_delta_rule(q, k, v, g, beta, implementation="pallas_interpret", block_v=16, **options)


def test_state_pass_checks_the_stacked_rows():
    """A kq array that is not the intra kernel's [N*2C, Hk*K] for this chunk table is refused with
    its shape, not read out of bounds."""
    (q, k, v, g, beta), _ = _inputs(1, 1, 100, 1, 2, 16, 16)
    first, starts, lens = kcd.chunk_table(np.array([0, 100]), 100, 64)
    q2, k2 = (a.reshape(100, 16) for a in (q[0], k[0]))
    x, p, kq = kcd.intra_chunk(q2, k2, g[0], beta[0], starts, lens, chunk_size=64, group=2,
                               precision="bf16x3", stack_qk=True, interpret=True)
    assert kq.shape == (2 * 2 * 64, 16)
    # each chunk slot's k rows then q rows, zero past the chunk's end (36 tokens in the second)
    np.testing.assert_array_equal(np.asarray(kq[64:128]), np.asarray(q2[:64]))
    np.testing.assert_array_equal(np.asarray(kq[128:164]), np.asarray(k2[64:]))
    assert not np.asarray(kq[164:192]).any() and not np.asarray(kq[228:]).any()
    with pytest.raises(ValueError, match=r"kq has shape \(128, 16\)"):
        kcd.state_pass(q2, k2, v[0].reshape(100, 32), g[0], beta[0], x, p, None, first, np.array([0, 100]),
                       chunk_size=64, group=2, out_dtype=jnp.float32, precision="bf16x3",
                       block_v=16, kq=kq[:128], interpret=True)
    x16, p16 = kcd.intra_chunk(q2, k2, g[0], beta[0], starts, lens, chunk_size=64, group=2,
                               precision="bf16x3", fp16=("x", "p"), interpret=True)
    assert x16.dtype == p16.dtype == jnp.float16
    with pytest.raises(ValueError, match="X is float16, which only fp16_products='xv' reads"):
        kcd.state_pass(q2, k2, v[0].reshape(100, 32), g[0], beta[0], x16, p16, None, first,
                       np.array([0, 100]), chunk_size=64, group=2, out_dtype=jnp.float32,
                       precision="bf16x3", block_v=16, fp16_products="pv", interpret=True)
    with pytest.raises(ValueError, match=r"fp16 names the matrices 'x' and 'p', got \['v'\]"):
        kcd.intra_chunk(q2, k2, g[0], beta[0], starts, lens, chunk_size=64, group=2,
                        precision="bf16x3", fp16=("v",), interpret=True)
    with pytest.raises(ValueError, match=r"cu has shape \(3,\)"):  # offsets of another table
        kcd.state_pass(q2, k2, v[0].reshape(100, 32), g[0], beta[0], x, p, None, first, np.array([0, 50, 100]),
                       chunk_size=64, group=2, out_dtype=jnp.float32, precision="bf16x3",
                       block_v=16, interpret=True)


def test_chunked_interpret_bf16_padded_dims():
    (q, k, v, g, beta), state = _inputs(5, 1, 70, 1, 3, 8, 24, dtype=jnp.bfloat16)
    o_ref, s_ref = _naive(q, k, v, g, beta, state)
    o, s = gated_delta_rule(q, k, v, g, beta, initial_state=state, implementation="pallas_interpret",
                            chunk_size=32, block_v=16)
    _check(o, s, o_ref, s_ref, jnp.bfloat16)


# Packed sequences: an empty one, one shorter than a chunk, one spanning chunks, one ending exactly
# on a chunk boundary. Each must match the reference run on that sequence alone.
CU = (0, 0, 7, 47, 63, 80)


@pytest.mark.parametrize("traced", [False, True])
def test_varlen_interpret_matches_per_sequence(traced):
    (q, k, v, g, beta), state = _inputs(3, 1, CU[-1], 1, 2, 16, 16, num_states=len(CU) - 1)
    o_ref, s_ref = gated_delta_rule(q, k, v, g, beta, initial_state=state, cu_seqlens=np.array(CU),
                                    implementation="naive")
    run = lambda cu, *a: gated_delta_rule(*a[:5], initial_state=a[5], cu_seqlens=cu,  # noqa: E731
                                          implementation="pallas_interpret", chunk_size=16, block_v=16)
    if traced:
        o, s = jax.jit(run)(jnp.asarray(CU, jnp.int32), q, k, v, g, beta, state)
    else:
        o, s = run(np.array(CU), q, k, v, g, beta, state)
    _check(o, s, o_ref, s_ref, jnp.float32)
    # the empty sequence keeps its initial state
    np.testing.assert_array_equal(np.asarray(s[0]), np.asarray(state[0]))


def test_gradients_interpret_match_reference():
    (q, k, v, g, beta), state = _inputs(13, 1, 40, 1, 2, 16, 16)
    rng = np.random.default_rng(0)
    w_o = jnp.asarray(rng.standard_normal(v.shape), jnp.float32)
    w_s = jnp.asarray(rng.standard_normal(state.shape), jnp.float32)

    def loss(impl, *xs):
        o, s = gated_delta_rule(*xs[:5], initial_state=xs[5], implementation=impl, chunk_size=16)
        return jnp.sum(o * w_o) + jnp.sum(s * w_s)

    argnums = tuple(range(6))
    grads_ref = jax.jit(jax.grad(functools.partial(loss, "naive"), argnums))(q, k, v, g, beta, state)
    grads = jax.jit(jax.grad(functools.partial(loss, "pallas_interpret"), argnums))(q, k, v, g, beta, state)
    for name, d, d_ref in zip(("q", "k", "v", "g", "beta", "initial_state"), grads, grads_ref):
        assert np.all(np.isfinite(d)), name
        # The backward IS the chunked reference's VJP, so only fp32 rounding separates them.
        assert _rel(d, d_ref) < 1e-4, name


def test_gradients_varlen_interpret():
    (q, k, v, g, beta), state = _inputs(14, 1, 30, 1, 2, 16, 16, num_states=2)
    cu = np.array([0, 12, 30])

    def loss(impl, q, v):
        o, s = gated_delta_rule(q, k, v, g, beta, initial_state=state, cu_seqlens=cu, implementation=impl,
                                chunk_size=16)
        return jnp.sum(o * o) + jnp.sum(s)

    for d, d_ref in zip(jax.jit(jax.grad(functools.partial(loss, "pallas_interpret"), (0, 1)))(q, v),
                        jax.jit(jax.grad(functools.partial(loss, "naive"), (0, 1)))(q, v)):
        assert _rel(d, d_ref) < 1e-4


def test_gradients_traced_offsets_raise():
    (q, k, v, g, beta), _ = _inputs(15, 1, 20, 1, 2, 16, 16)

    def loss(q, cu):
        o, _ = gated_delta_rule(q, k, v, g, beta, cu_seqlens=cu, implementation="pallas_interpret",
                                chunk_size=16)
        return jnp.sum(o)

    with pytest.raises(NotImplementedError, match="traced cu_seqlens"):
        jax.jit(jax.grad(loss))(q, jnp.asarray([0, 5, 20], jnp.int32))


def test_default_implementation():
    expected = "pallas" if ON_GPU else "chunked"
    assert default_implementation("bf16x3", 64) == expected
    assert default_implementation("tf32x3", 64) == "chunked"  # the kernels are slower than XLA there
    assert default_implementation("bf16x6", 64) == "chunked"  # not offered by the kernels
    assert default_implementation("bf16x3", 128) == "chunked"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(implementation="pallas_interpret", precision="bf16x6"), r"precision must be one of"),
        (dict(implementation="pallas_interpret", chunk_size=128), r"chunk_size must be one of \(16, 32, 64\)"),
        (dict(implementation="chunked", block_v=16), r"settings of the Pallas kernels"),
        (dict(implementation="pallas_interpret", cu_seqlens=np.array([0, 3, 2, 4])), r"cu_seqlens must rise"),
    ],
)
def test_validation(kwargs, message):
    (q, k, v, g, beta), _ = _inputs(0, 1, 4, 1, 2, 16, 16)
    with pytest.raises(ValueError, match=message):
        gated_delta_rule(q, k, v, g, beta, **kwargs)


def _lower_for_cuda(fn, *args):
    """Runs the Pallas -> Triton lowering for a CUDA target on any machine (no GPU needed)."""
    from jax import export

    specs = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in args]
    exported = export.export(
        jax.jit(fn), platforms=["cuda"],
        disabled_checks=[export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")],
    )(*specs)
    return exported.mlir_module()


@pytest.mark.parametrize("precision", ["tf32x3", "tf32", "float32", "bf16x3-sw"])
def test_kernels_lower_to_triton_at_27b_shapes(precision):
    # Catches what interpret mode cannot: ops, shapes and dtypes the Triton lowering rejects
    # ("-sw": stack_qk with wide_products, whose joins and splits only the lowering checks).
    bf16 = lambda *s: jnp.zeros(s, jnp.bfloat16)  # noqa: E731
    args = (bf16(1, 256, 16, 128), bf16(1, 256, 16, 128), bf16(1, 256, 48, 128),
            jnp.zeros((1, 256, 48), jnp.float32), bf16(1, 256, 48), jnp.zeros((1, 48, 128, 128), jnp.float32))
    precision, _, variant = precision.partition("-")
    options = {"stack_qk": True, "wide_products": True} if variant == "sw" else {}
    text = _lower_for_cuda(functools.partial(chunk_gated_delta_rule_pallas, precision=precision, **options), *args)
    assert text.count("__gpu$xla.gpu.triton") == 2
    step = tuple(a[:, :1] for a in args[:5]) + args[5:]
    text = _lower_for_cuda(gated_delta_recurrent_pallas, *step)
    assert text.count("__gpu$xla.gpu.triton") == 1


# ---- GPU: the compiled Triton kernels ------------------------------------------------------------

_pallas = jax.jit(gated_delta_rule, static_argnames=("implementation", "chunk_size", "precision", "transposed",
                                                     "stack_qk", "wide_products", "bf16_products",
                                                     "fp16_products"))


# Each case compiles the two kernels afresh (seconds each), so the grid is sparse: every T, both
# dtypes and both accurate precisions appear, with and without an initial state.
@gpu
@pytest.mark.parametrize("t, dtype, with_state, precision", [
    (1, jnp.float32, True, "bf16x3"), (63, jnp.bfloat16, True, "bf16x3"), (65, jnp.float32, False, "bf16x3"),
    (1000, jnp.bfloat16, True, "bf16x3"), (1000, jnp.float32, True, "bf16x3"), (1000, jnp.bfloat16, True, "tf32x3"),
    (1000, jnp.float32, False, "tf32x3"), (65, jnp.bfloat16, True, "bf16x3-tr"),
    (1000, jnp.float32, True, "bf16x3-tr"), (65, jnp.bfloat16, True, "bf16x3-sw"),
    (1000, jnp.float32, True, "bf16x3-sw"), (1000, jnp.bfloat16, False, "bf16x3-w"),
    (1000, jnp.bfloat16, True, "bf16x3-q"), (65, jnp.bfloat16, False, "bf16x3-q"),
    (1000, jnp.bfloat16, True, "bf16x3-h"), (65, jnp.bfloat16, False, "bf16x3-h"),
    (1000, jnp.float32, True, "tf32x3-h"),
])
def test_gpu_chunked_matches_reference(t, dtype, with_state, precision):
    # "-tr": the transposed state pass (kernel_chunked.state_pass(transposed=True)); "-sw": stack_qk
    # with wide_products (all); "-w": wide_products alone; "-q": bf16_products="qs" (bf16 inputs
    # only: its fp32 error is ~1e-4, above GPU_FP32_TOL by design; the CPU test bounds it); "-h":
    # fp16_products (all five; held to FP16_PRODUCTS_TOL, inside the bounds)
    (q, k, v, g, beta), state = _inputs(t + 7, 2, t, 2, 6, 128, 128, dtype=dtype)
    state = state if with_state else None
    o_ref, s_ref = _naive(q, k, v, g, beta, state)
    precision, _, variant = precision.partition("-")
    o, s = _pallas(q, k, v, g, beta, initial_state=state, implementation="pallas", precision=precision,
                   transposed=variant == "tr", stack_qk=variant == "sw", wide_products=variant in ("sw", "w"),
                   bf16_products="qs" if variant == "q" else "", fp16_products=variant == "h")
    _check(o, s, o_ref, s_ref, dtype, fp32_tol=FP16_PRODUCTS_TOL if variant == "h" else GPU_FP32_TOL)


@gpu
def test_gpu_chunked_27b_heads():
    (q, k, v, g, beta), state = _inputs(1, 1, 1000, 16, 48, 128, 128, dtype=jnp.bfloat16)
    o_ref, s_ref = _naive(q, k, v, g, beta, state)
    o, s = _pallas(q, k, v, g, beta, initial_state=state, implementation="pallas", precision="bf16x3")
    _check(o, s, o_ref, s_ref, jnp.bfloat16)


@gpu
def test_gpu_varlen():
    cu = np.array([0, 1, 64, 200, 200, 517])
    (q, k, v, g, beta), state = _inputs(2, 1, cu[-1], 2, 6, 128, 128, num_states=len(cu) - 1)
    o_ref, s_ref = gated_delta_rule(q, k, v, g, beta, initial_state=state, cu_seqlens=cu, implementation="naive")
    o, s = gated_delta_rule(q, k, v, g, beta, initial_state=state, cu_seqlens=cu, implementation="pallas",
                            precision="bf16x3")
    _check(o, s, o_ref, s_ref, jnp.float32, fp32_tol=GPU_FP32_TOL)
    o, s = jax.jit(lambda cu: gated_delta_rule(q, k, v, g, beta, initial_state=state, cu_seqlens=cu,
                                               implementation="pallas", precision="bf16x3"))(jnp.asarray(cu))
    _check(o, s, o_ref, s_ref, jnp.float32, fp32_tol=GPU_FP32_TOL)


@gpu
@pytest.mark.parametrize("batch, t, dtype", [(1, 1, jnp.bfloat16), (8, 1, jnp.float32), (2, 4, jnp.bfloat16)])
def test_gpu_recurrent(batch, t, dtype):
    (q, k, v, g, beta), state = _inputs(batch * 10 + t, batch, t, 16, 48, 128, 128, dtype=dtype)
    o_ref, s_ref = gated_delta_recurrent(q, k, v, g, beta, state, implementation="naive", output_all_states=True)
    o, s = gated_delta_recurrent(q, k, v, g, beta, state, implementation="pallas", output_all_states=True)
    _check(o, s, o_ref, s_ref, dtype)
    # Final state only, state donated: the kernel updates it in place.
    step = jax.jit(functools.partial(gated_delta_recurrent, implementation="pallas"), donate_argnums=5)
    o, s = step(q, k, v, g, beta, jnp.array(state))
    _check(o, s, o_ref, s_ref[:, -1], dtype)
