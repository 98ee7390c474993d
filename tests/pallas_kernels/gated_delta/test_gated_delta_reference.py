"""Pure-JAX gated delta rule: chunked vs token scan, parity with transformers, grads, validation."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from pallas_kernels.gated_delta import (
    chunk_gated_delta_rule,
    gated_delta_rule,
    gated_delta_step,
    naive_recurrent_gated_delta_rule,
)

# Small GVA config: K != V and Hv = 3 * Hk, so a head-mapping or K/V transposition bug shows.
B, HK, HV, K, V = 2, 2, 6, 16, 24

# fp32 vs fp32 (both HIGHEST-precision dots): every output is a sum over ~T*K products, and with
# unit roundoff u = 6e-8 and random-sign rounding the norm-wise error grows like sqrt(n) * u, i.e.
# a few 1e-7 (measured 1e-7 to 3e-7 for both implementations against a float64 scan). 1e-5 leaves
# headroom for other CPUs/GPUs, while any real bug (wrong head mapping, decay off by one token,
# state read before the update) gives errors of 1e-2 or more.
FP32_TOL = 1e-5
GRAD_TOL = 1e-4

_naive = jax.jit(naive_recurrent_gated_delta_rule, static_argnames=("out_dtype",))
_chunk = jax.jit(chunk_gated_delta_rule, static_argnames=("chunk_size", "out_dtype", "solve", "precision"))
SOLVES = ("triangular_solve", "blocked")


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


def _l2norm(x):  # same formula as transformers' / FLA's l2norm
    return x / np.sqrt((x * x).sum(-1, keepdims=True) + 1e-6)


def _inputs(seed, t, *, batch=B, hk=HK, hv=HV, kd=K, vd=V, with_state=True):
    """Returns raw q, k (for transformers) and the normalised fp32 inputs of our functions."""
    rng = np.random.default_rng(seed)
    q_raw = rng.standard_normal((batch, t, hk, kd)).astype(np.float32)
    k_raw = rng.standard_normal((batch, t, hk, kd)).astype(np.float32)
    v = rng.standard_normal((batch, t, hv, vd)).astype(np.float32)
    # Log-decays like the model's -exp(A_log) * softplus(.): mostly in [-3, 0), some within 1e-3
    # of 0 (long memory) and a few -20 (state wiped out; exp underflows over a chunk).
    g = -np.minimum(np.log1p(np.exp(rng.standard_normal((batch, t, hv)) * 2 - 1)), 3)
    u = rng.random(g.shape)
    g = np.where(u < 0.15, -1e-3 * rng.random(g.shape), g)
    g = np.where(u > 0.97, -20.0, g).astype(np.float32)
    beta = (1 / (1 + np.exp(-rng.standard_normal((batch, t, hv))))).astype(np.float32)
    state = rng.standard_normal((batch, hv, kd, vd)).astype(np.float32) if with_state else None
    q = (_l2norm(q_raw) * kd**-0.5).astype(np.float32)
    k = _l2norm(k_raw).astype(np.float32)
    args = tuple(jnp.asarray(x) for x in (q, k, v, g, beta))
    return q_raw, k_raw, args, None if state is None else jnp.asarray(state)


@pytest.mark.parametrize("solve", SOLVES)
@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("t", [1, 63, 64, 65, 200])
def test_chunked_matches_naive(t, with_state, solve):
    _, _, args, state = _inputs(t, t, with_state=with_state)
    o_ref, s_ref = _naive(*args, state)
    o, s = _chunk(*args, state, solve=solve)
    assert o.shape == (B, t, HV, V) and o.dtype == jnp.float32
    assert s.shape == (B, HV, K, V) and s.dtype == jnp.float32
    assert _rel(o, o_ref) < FP32_TOL
    assert _rel(s, s_ref) < FP32_TOL


# Multi-pass tensor-core dots (GPU only; elsewhere they run in float32 and this test is exact).
# tf32x3 / bf16x6 drop only the lo*lo partial products (~2^-21 / 2^-24 relative per product): a few
# 1e-7 after the solve and 1000 tokens of recurrence, like fp32, so the fp32 bound applies.
# bf16x3 drops terms of ~2^-16 = 1.5e-5 relative per product; with error growth through the solve
# and the state, 2e-4 is its bound.
@pytest.mark.parametrize("precision,tol", [("tf32x3", FP32_TOL), ("bf16x6", FP32_TOL), ("bf16x3", 2e-4)])
def test_chunked_multipass_precisions(precision, tol):
    _, _, args, state = _inputs(11, 1000)
    o_ref, s_ref = _naive(*args, state)
    for solve in SOLVES:
        o, s = _chunk(*args, state, solve=solve, precision=precision)
        assert _rel(o, o_ref) < tol, (solve, _rel(o, o_ref))
        assert _rel(s, s_ref) < tol, (solve, _rel(s, s_ref))


@pytest.mark.parametrize("solve", SOLVES)
def test_chunked_matches_naive_long(solve):
    _, _, args, state = _inputs(7, 1000)
    o_ref, s_ref = _naive(*args, state)
    o, s = _chunk(*args, state, solve=solve)
    assert _rel(o, o_ref) < FP32_TOL
    assert _rel(s, s_ref) < FP32_TOL


@pytest.mark.parametrize(
    "hk, hv, kd, vd, chunk_size, solve",
    [
        (3, 3, 16, 16, 64, "triangular_solve"),  # no grouping
        (1, 4, 32, 8, 16, "blocked"),  # one 16-block: forward substitution only
        (2, 6, 16, 24, 48, "blocked"),  # 3 blocks: padded to 4 for the merge
        (2, 6, 16, 24, 128, "blocked"),
        (2, 6, 16, 24, 40, "triangular_solve"),  # chunk size not a multiple of 16
    ],
)
def test_chunked_matches_naive_other_shapes(hk, hv, kd, vd, chunk_size, solve):
    _, _, args, state = _inputs(11, 150, hk=hk, hv=hv, kd=kd, vd=vd)
    o_ref, s_ref = _naive(*args, state)
    o, s = _chunk(*args, state, chunk_size=chunk_size, solve=solve)
    assert _rel(o, o_ref) < FP32_TOL
    assert _rel(s, s_ref) < FP32_TOL


def _float64_scan(q, k, v, g, beta, state):
    """The per-token recurrence in numpy float64, with the key heads repeated explicitly."""
    q, k, v, g, beta, s = (np.asarray(x, np.float64) for x in (q, k, v, g, beta, state))
    group = v.shape[2] // k.shape[2]
    q, k = np.repeat(q, group, axis=2), np.repeat(k, group, axis=2)
    o = np.zeros(v.shape)
    for i in range(v.shape[1]):
        s = s * np.exp(g[:, i])[..., None, None]
        u = beta[:, i, :, None] * (v[:, i] - np.einsum("bhk,bhkv->bhv", k[:, i], s))
        s = s + k[:, i, :, :, None] * u[:, :, None, :]
        o[:, i] = np.einsum("bhk,bhkv->bhv", q[:, i], s)
    return o, s


@pytest.mark.parametrize("solve", SOLVES)
def test_chunked_accurate_when_prefix_sums_cancel(solve):
    # Three -20 log-decays open each chunk, then near-zero ones: the in-chunk prefix sum sits near
    # -60 while neighbouring tokens differ by 1e-3, so gamma_i - gamma_j taken as a difference of
    # prefix sums has ~4e-6 absolute error in the exponent. Measured against float64 on a CPU: token
    # scan 2e-7, chunked (segment sums) 2e-7, chunked with prefix-sum differences 3e-6; on an H100
    # the token scan itself is at 1.2e-6 (its exp differs from the CPU's by an ulp or two). So the
    # chunked form must be as accurate as the token scan on the same device (within 2x, and never
    # worse than the 1e-6 the CPU gives), which the prefix-sum variant is not.
    _, _, (q, k, v, _, beta), state = _inputs(21, 128)
    g = np.full(beta.shape, -1e-3, np.float32)
    g[:, 0:3] = g[:, 64:67] = -20.0
    args = (q, k, v, jnp.asarray(g), beta, state)
    o_64, s_64 = _float64_scan(*args)
    o_n, s_n = _naive(*args)
    o_c, s_c = _chunk(*args, solve=solve)
    assert _rel(o_n, o_64) < 2e-6 and _rel(s_n, s_64) < 2e-6
    assert _rel(o_c, o_64) < max(2 * _rel(o_n, o_64), 1e-6)
    assert _rel(s_c, s_64) < max(2 * _rel(s_n, s_64), 1e-6)


def test_matches_transformers():
    torch = pytest.importorskip("torch")
    hf = pytest.importorskip("transformers.models.qwen3_5.modeling_qwen3_5")
    q_raw, k_raw, args, state = _inputs(3, 130)
    _, _, v, g, beta = (torch.from_numpy(np.array(x)) for x in args)
    # Give transformers the key heads already repeated (value head j -> key head j // G): older
    # transformers 5.x (e.g. 5.17) expect equal head counts there, newer ones repeat internally and
    # skip it when the counts are equal, so this works with both.
    group = HV // HK
    raw = dict(
        query=torch.from_numpy(np.repeat(q_raw, group, axis=2)),
        key=torch.from_numpy(np.repeat(k_raw, group, axis=2)),
        value=v,
        g=g,
        beta=beta,
        initial_state=torch.from_numpy(np.array(state)),
        output_final_state=True,
        use_qk_l2norm_in_kernel=True,
    )
    o_hf_chunk, s_hf_chunk = hf.torch_chunk_gated_delta_rule(**raw)
    o_hf_rec, s_hf_rec = hf.torch_recurrent_gated_delta_rule(**raw)
    for ours in (_chunk(*args, state), _naive(*args, state)):
        for o_hf, s_hf in ((o_hf_chunk, s_hf_chunk), (o_hf_rec, s_hf_rec)):
            assert _rel(ours[0], o_hf.numpy()) < FP32_TOL
            assert _rel(ours[1], s_hf.numpy()) < FP32_TOL


@pytest.mark.parametrize("solve", SOLVES)
def test_bf16_inputs(solve):
    _, _, (q, k, v, g, beta), state = _inputs(5, 130)
    q, k, v, beta = (x.astype(jnp.bfloat16) for x in (q, k, v, beta))
    o_ref, s_ref = _naive(q, k, v, g, beta, state)
    o, s = _chunk(q, k, v, g, beta, state, solve=solve)
    assert o.dtype == jnp.bfloat16 and s.dtype == jnp.float32
    # Both sides compute in fp32 from the same bf16 inputs and differ by ~1e-7 before the final
    # cast; the cast rounds them to the same bf16 value except for the few elements sitting
    # within ~1e-7 of a rounding boundary, which then differ by one bf16 ulp (2^-8 relative).
    # The norm-wise difference is therefore far below the 2e-3 bound, which is about the size of
    # a single bf16 rounding of every element. Measured: 2e-5 (0.01% of elements differ by one
    # ulp), while bf16 o vs the fp32 o of the same inputs is 1.6e-3.
    assert _rel(o, o_ref) < 2e-3
    # The state never passes through bf16: fp32 agreement (1e-4 leaves 10x slack over FP32_TOL).
    assert _rel(s, s_ref) < 1e-4


def test_step_matches_naive():
    t = 12
    _, _, (q, k, v, g, beta), state = _inputs(9, t)
    o_ref, s_ref = _naive(q, k, v, g, beta, state)
    step = jax.jit(gated_delta_step)
    s, outs = state, []
    for i in range(t):
        o_i, s = step(q[:, i], k[:, i], v[:, i], g[:, i], beta[:, i], s)
        assert o_i.shape == (B, HV, V) and o_i.dtype == v.dtype
        outs.append(o_i)
    assert _rel(jnp.stack(outs, axis=1), o_ref) < 1e-6
    assert _rel(s, s_ref) < 1e-6


@pytest.mark.parametrize("solve", SOLVES)
def test_gradients_match_naive(solve):
    _, _, args, state = _inputs(13, 65)
    rng = np.random.default_rng(0)
    w_o = jnp.asarray(rng.standard_normal((B, 65, HV, V)), jnp.float32)
    w_s = jnp.asarray(rng.standard_normal((B, HV, K, V)), jnp.float32)

    def loss(fn, *xs):
        o, s = fn(*xs)
        return jnp.sum(o * w_o) + jnp.sum(s * w_s)

    argnums = tuple(range(6))
    grads_ref = jax.jit(jax.grad(lambda *xs: loss(naive_recurrent_gated_delta_rule, *xs), argnums))
    grads = jax.jit(
        jax.grad(lambda *xs: loss(lambda *a: chunk_gated_delta_rule(*a, solve=solve), *xs), argnums)
    )
    names = ("q", "k", "v", "g", "beta", "initial_state")
    for name, d, d_ref in zip(names, grads(*args, state), grads_ref(*args, state)):
        assert np.all(np.isfinite(d)), name
        assert _rel(d, d_ref) < GRAD_TOL, name


def test_api_dispatch_and_jit():
    _, _, args, state = _inputs(17, 20)
    eager = gated_delta_rule(*args, initial_state=state)
    jitted = jax.jit(
        gated_delta_rule, static_argnames=("implementation", "chunk_size", "out_dtype", "solve")
    )
    o, s = jitted(*args, initial_state=state)
    assert _rel(o, eager[0]) < 1e-6 and _rel(s, eager[1]) < 1e-6
    o_naive, s_naive = jitted(
        *args, initial_state=state, implementation="naive", out_dtype="bfloat16"
    )
    assert o_naive.dtype == jnp.bfloat16
    assert _rel(o_naive, eager[0]) < 2e-3 and _rel(s_naive, eager[1]) < FP32_TOL
    o_zero, s_zero = jitted(*args)  # initial_state=None is a zero state
    o_zero_ref, s_zero_ref = jitted(*args, initial_state=jnp.zeros_like(state))
    assert _rel(o_zero, o_zero_ref) < 1e-6 and _rel(s_zero, s_zero_ref) < 1e-6


def _bad_inputs(case):
    q = k = jnp.zeros((1, 4, 2, 8))  # valid base: B=1, T=4, Hk=2, Hv=6, K=V=8
    v = jnp.zeros((1, 4, 6, 8))
    g = beta = jnp.zeros((1, 4, 6))
    kwargs = {"initial_state": jnp.zeros((1, 6, 8, 8), jnp.float32)}
    if case == "heads":
        v, g, beta = jnp.zeros((1, 4, 5, 8)), jnp.zeros((1, 4, 5)), jnp.zeros((1, 4, 5))
    elif case == "qk":
        q = jnp.zeros((1, 4, 2, 4))
    elif case == "rank":
        q = k = jnp.zeros((4, 2, 8))
    elif case == "empty":
        q, k, v = jnp.zeros((1, 0, 2, 8)), jnp.zeros((1, 0, 2, 8)), jnp.zeros((1, 0, 6, 8))
        g = beta = jnp.zeros((1, 0, 6))
    elif case == "v_batch":
        v = jnp.zeros((1, 5, 6, 8))
    elif case == "g_shape":
        g = jnp.zeros((1, 4, 2))
    elif case == "beta_shape":
        beta = jnp.zeros((4, 6))
    elif case == "g_dtype":
        g = g.astype(jnp.bfloat16)
    elif case == "int_dtype":
        v = v.astype(jnp.int32)
    elif case == "state_shape":
        kwargs["initial_state"] = jnp.zeros((1, 2, 8, 8))
    elif case == "state_dtype":
        kwargs["initial_state"] = kwargs["initial_state"].astype(jnp.bfloat16)
    elif case == "implementation":
        kwargs["implementation"] = "pallas_v0"
    elif case == "chunk_blocked":
        kwargs.update(solve="blocked", chunk_size=24)
    elif case == "chunk_nonpositive":
        kwargs["chunk_size"] = 0
    elif case == "solve":
        kwargs["solve"] = "lu"
    return (q, k, v, g, beta), kwargs


@pytest.mark.parametrize(
    "case, message",
    [
        ("heads", r"v has 5 heads, not a multiple of k's 2 heads"),
        ("qk", r"q and k must have the same shape.*\(1, 4, 2, 4\).*\(1, 4, 2, 8\)"),
        ("rank", r"q must be \[B, T, heads, dim\]"),
        ("empty", r"at least one token"),
        ("v_batch", r"v shape \(1, 5, 6, 8\)"),
        ("g_shape", r"g must have shape \[B, T, Hv\] = \(1, 4, 6\), got \(1, 4, 2\)"),
        ("beta_shape", r"beta must have shape \[B, T, Hv\]"),
        ("g_dtype", r"g must be float32"),
        ("int_dtype", r"v must have a floating dtype"),
        ("state_shape", r"initial_state must have shape \[B, Hv, K, V\] = \(1, 6, 8, 8\)"),
        ("state_dtype", r"initial_state must be float32"),
        ("implementation", r"unknown implementation 'pallas_v0'.*'chunked', 'naive'"),
        ("chunk_blocked", r"chunk_size must be a positive multiple of 16.*24"),
        ("chunk_nonpositive", r"chunk_size must be a positive int"),
        ("solve", r"solve must be one of"),
    ],
)
def test_validation_errors(case, message):
    args, kwargs = _bad_inputs(case)
    with pytest.raises(ValueError, match=message):
        gated_delta_rule(*args, **kwargs)
