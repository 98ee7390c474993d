"""Pure-JAX gated delta rule: the per-token recurrence and the chunked WY/UT form.

Sources:
  * S. Yang, J. Kautz, A. Hatamizadeh, "Gated Delta Networks: Improving Mamba2 with Delta Rule",
    ICLR 2025, arXiv:2412.06464 (the gated delta recurrence and its chunkwise form).
  * S. Yang et al., "Parallelizing Linear Transformers with the Delta Rule over Sequence Length",
    NeurIPS 2024, arXiv:2406.06484 (the WY/UT representation that turns a chunk of rank-1 delta
    updates into one unit-lower-triangular solve plus matmuls).

Shapes use B batch, T tokens, Hk key heads, Hv value heads, K key dim, V value dim, C chunk size,
N number of chunks, G = Hv // Hk value heads per key head. Layout follows flash-linear-attention
and transformers: q, k [B, T, Hk, K]; v [B, T, Hv, V]; g, beta [B, T, Hv]; state [B, Hv, K, V].
Value head j reads key head j // G (the `repeat_interleave` convention). Internally Hv is split
into (Hk, G), which is a free reshape, so q and k are never repeated G times.

The caller l2-normalises q and k and scales q by K**-0.5; nothing here normalises. With
state S [K, V] per (batch, value head), each token does

    S <- exp(g_t) S;  u_t = beta_t (v_t - S^T k_t);  S <- S + k_t u_t^T;  o_t = S^T q_t

All arithmetic is float32 with Precision.HIGHEST dots. These functions do not validate their
inputs; `api.gated_delta_rule` does.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

_F32 = jnp.float32
# On GPU an fp32 dot at default precision runs in TF32 (10-bit mantissa), and the recurrent state
# would carry that error from chunk to chunk.
_HIGHEST = lax.Precision.HIGHEST
_SOLVE_BLOCK = 16
SOLVE_METHODS = ("triangular_solve", "blocked")
# Chunks per iteration of the inter-chunk lax.scan. Each XLA while-loop iteration has a fixed cost
# (launches, the loop predicate); unrolling trades it for compile time. On an H100 at T=4096
# (tf32x3 dots): unroll 1 / 2 / 4 / 8 took 3.21 / 3.00 / 3.09 / 3.21 ms. Benchmarks may override it.
SCAN_UNROLL = 2

# Dot arithmetic of the chunked form on GPUs. "float32" is exact fp32 (SIMT cores); the multi-pass
# presets split each f32 operand into 2-3 low-precision pieces and run the products on tensor cores:
# "tf32x3" and "bf16x6" are accurate to a few f32 ulps, "bf16x3" to ~1e-5 relative. On other
# backends every setting computes in plain float32 (the presets are GPU features).
DOT_PRECISIONS = {
    "float32": lax.Precision.HIGHEST,
    "tf32x3": lax.DotAlgorithmPreset.TF32_TF32_F32_X3,
    "bf16x6": lax.DotAlgorithmPreset.BF16_BF16_F32_X6,
    "bf16x3": lax.DotAlgorithmPreset.BF16_BF16_F32_X3,
}


def _dot_precision(name: str):
    if name not in DOT_PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(DOT_PRECISIONS)}, got {name!r}")
    return DOT_PRECISIONS[name] if jax.default_backend() == "gpu" else _HIGHEST


def _einsum(subscripts, *operands, precision=_HIGHEST):
    return jnp.einsum(subscripts, *operands, precision=precision, preferred_element_type=_F32)


def _matmul(a, b, precision=_HIGHEST):  # batched over all leading axes
    return _einsum("...ij,...jk->...ik", a, b, precision=precision)


def _split_value_heads(x, num_key_heads, axis):
    """Splits the Hv axis of `x` into (Hk, G); value head j = h * G + i lands at [h, i]."""
    shape = x.shape
    return x.reshape(shape[:axis] + (num_key_heads, -1) + shape[axis + 1 :])


def _step_f32(q, k, v, g, beta, state):
    """One token in fp32: q, k [B, Hk, K]; v [B, Hv, V]; g, beta [B, Hv]; state [B, Hv, K, V]."""
    batch, num_key_heads, key_dim = k.shape
    num_value_heads, value_dim = v.shape[-2:]
    q, k = q.astype(_F32), k.astype(_F32)
    v, g, beta, s = (
        _split_value_heads(x.astype(_F32), num_key_heads, 1) for x in (v, g, beta, state)
    )
    s = jnp.exp(g)[..., None, None] * s
    u = beta[..., None] * (v - _einsum("bhk,bhgkv->bhgv", k, s))
    # The rank-1 update is an outer product: elementwise, so no dot precision is involved.
    s = s + k[:, :, None, :, None] * u[:, :, :, None, :]
    o = _einsum("bhk,bhgkv->bhgv", q, s)
    return (
        o.reshape(batch, num_value_heads, value_dim),
        s.reshape(batch, num_value_heads, key_dim, value_dim),
    )


def gated_delta_step(q, k, v, g, beta, state):
    """One decode token of the gated delta rule.

    Args:
      q, k: [B, Hk, K], already l2-normalised (q also scaled by K**-0.5).
      v: [B, Hv, V].
      g: [B, Hv] log-decay (<= 0), float32.
      beta: [B, Hv] in (0, 1).
      state: [B, Hv, K, V] float32.

    Returns:
      (o [B, Hv, V] in v.dtype, new_state [B, Hv, K, V] float32); o is read from the new state.
    """
    o, state = _step_f32(q, k, v, g, beta, state)
    return o.astype(v.dtype), state


def _zero_state(k, v):
    batch, _, _, key_dim = k.shape
    num_value_heads, value_dim = v.shape[-2:]
    return jnp.zeros((batch, num_value_heads, key_dim, value_dim), _F32)


def naive_recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=None, *, out_dtype=None):
    """Token-by-token gated delta rule (`lax.scan` of `gated_delta_step`): the readable reference.

    Args:
      q, k: [B, T, Hk, K], already l2-normalised (q also scaled by K**-0.5).
      v: [B, T, Hv, V], Hv a multiple of Hk.
      g: [B, T, Hv] log-decay (<= 0), float32.
      beta: [B, T, Hv] in (0, 1).
      initial_state: optional [B, Hv, K, V] float32; None means zeros.
      out_dtype: dtype of o; defaults to v.dtype.

    Returns:
      (o [B, T, Hv, V], final_state [B, Hv, K, V] float32).
    """
    out_dtype = v.dtype if out_dtype is None else out_dtype
    state = _zero_state(k, v) if initial_state is None else initial_state.astype(_F32)

    def body(s, xs):
        o_t, s = _step_f32(*xs, s)
        return s, o_t

    with jax.named_scope("gated_delta_naive_scan"):
        time_major = tuple(jnp.moveaxis(x, 1, 0) for x in (q, k, v, g, beta))
        state, o = lax.scan(body, state, time_major)
    return jnp.moveaxis(o, 0, 1).astype(out_dtype), state


def _forward_substitution_inverse(strict):
    """(I + strict)^-1 for strictly lower `strict` [..., n, n], one row per step (n small)."""
    n = strict.shape[-1]
    cols = jnp.arange(n)

    def row_step(i, inv):
        # Row i of the inverse is e_i - sum_{j<i} strict[i, j] inv[j]. strict[i, j>=i] is zero, so
        # the full-row product is exact even though rows >= i of `inv` are still identity rows.
        strict_row = lax.dynamic_index_in_dim(strict, i, axis=-2, keepdims=False)
        row = (cols == i).astype(_F32) - _einsum("...j,...jc->...c", strict_row, inv)
        return lax.dynamic_update_index_in_dim(inv, row, i, axis=-2)

    # A loop rather than 15 unrolled steps keeps the traced graph (and compile time) small.
    return lax.fori_loop(1, n, row_step, jnp.broadcast_to(jnp.eye(n, dtype=_F32), strict.shape))


def _unit_lower_inverse_blocked(strict, precision=_HIGHEST):
    """(I + strict)^-1 for strictly lower `strict` [..., C, C], C a multiple of 16; no solve op.

    Forward substitution inverts all 16x16 diagonal blocks at once; then pairs of neighbouring
    inverses are merged with [[A11, 0], [A21, A22]]^-1 = [[X11, 0], [-X22 A21 X11, X22]],
    doubling the block size (16 -> 32 -> 64) so the bulk of the work is batched matmuls.
    """
    size = strict.shape[-1]
    num_blocks = size // _SOLVE_BLOCK
    padded_blocks = 1 << max(num_blocks - 1, 0).bit_length()
    padded = padded_blocks * _SOLVE_BLOCK
    if padded != size:
        # Extending with an identity block keeps the leading block's inverse unchanged.
        pad = [(0, 0)] * (strict.ndim - 2) + [(0, padded - size)] * 2
        strict = jnp.pad(strict, pad)

    def block(row, col, width):
        return strict[..., row * width : (row + 1) * width, col * width : (col + 1) * width]

    width = _SOLVE_BLOCK
    diagonal = jnp.stack([block(i, i, width) for i in range(padded_blocks)], axis=-3)
    inv = _forward_substitution_inverse(diagonal)  # [..., padded_blocks, 16, 16]
    while width < padded:
        count = padded // (2 * width)
        lower_left = jnp.stack([block(2 * p + 1, 2 * p, width) for p in range(count)], axis=-3)
        inv11, inv22 = inv[..., 0::2, :, :], inv[..., 1::2, :, :]
        inv21 = -_matmul(inv22, _matmul(lower_left, inv11, precision), precision)
        top = jnp.concatenate([inv11, jnp.zeros_like(inv11)], axis=-1)
        bottom = jnp.concatenate([inv21, inv22], axis=-1)
        inv = jnp.concatenate([top, bottom], axis=-2)
        width *= 2
    return inv[..., 0, :size, :size]


def _solve_unit_lower(strict, rhs, method, precision=_HIGHEST):
    """(I + strict)^-1 rhs for strictly lower `strict` [..., C, C] and rhs [..., C, X]."""
    if method == "triangular_solve":
        # unit_diagonal: the (zero) diagonal of `strict` is never read; the solve sees I + strict.
        return lax.linalg.triangular_solve(
            strict, rhs, left_side=True, lower=True, unit_diagonal=True
        )
    if method == "blocked":
        return _matmul(_unit_lower_inverse_blocked(strict, precision), rhs, precision)
    raise ValueError(f"solve must be one of {SOLVE_METHODS}, got {method!r}")


def chunk_gated_delta_rule(
    q,
    k,
    v,
    g,
    beta,
    initial_state=None,
    *,
    chunk_size: int = 64,
    out_dtype=None,
    solve: str | None = None,
    precision: str = "float32",
):
    """Chunked (WY/UT) gated delta rule; same contract and result as the naive recurrence.

    Args:
      q, k: [B, T, Hk, K], already l2-normalised (q also scaled by K**-0.5).
      v: [B, T, Hv, V], Hv a multiple of Hk.
      g: [B, T, Hv] log-decay (<= 0), float32.
      beta: [B, T, Hv] in (0, 1).
      initial_state: optional [B, Hv, K, V] float32; None means zeros.
      chunk_size: C, tokens per chunk (a multiple of 16 for solve="blocked").
      out_dtype: dtype of o; defaults to v.dtype.
      solve: "triangular_solve" (lax.linalg.triangular_solve) or "blocked" (explicit inverse from
        16x16 forward substitution and block merging, matmuls only); None picks the faster one for
        the chunk size (blocked when it is a multiple of 16: 3.6 vs 4.5 ms at T=4096 on an H100, and
        no LAPACK trsm on CPU, which can deadlock jaxlib's intra-op pool on small machines).
      precision: dot arithmetic on GPU, a key of DOT_PRECISIONS.

    Returns:
      (o [B, T, Hv, V], final_state [B, Hv, K, V] float32).
    """
    if solve is None:
        # Blocked everywhere it applies: faster on GPU, and on CPU it avoids jaxlib's LAPACK trsm FFI,
        # whose ParallelBatchMap waits on the same intra-op pool it runs in: with two solves in flight
        # on a 2-core machine both pool threads block and the step never finishes (seen in training).
        solve = "blocked" if chunk_size % _SOLVE_BLOCK == 0 else "triangular_solve"
    if solve not in SOLVE_METHODS:
        raise ValueError(f"solve must be one of {SOLVE_METHODS}, got {solve!r}")
    prec = _dot_precision(precision)
    ein = functools.partial(_einsum, precision=prec)
    if solve == "blocked" and chunk_size % _SOLVE_BLOCK:
        raise ValueError(f"chunk_size must be a multiple of {_SOLVE_BLOCK} for solve='blocked'")
    batch, seq_len, num_key_heads, key_dim = k.shape
    num_value_heads, value_dim = v.shape[-2:]
    out_dtype = v.dtype if out_dtype is None else out_dtype
    state = _zero_state(k, v) if initial_state is None else initial_state.astype(_F32)
    num_chunks = math.ceil(seq_len / chunk_size)
    pad = num_chunks * chunk_size - seq_len

    with jax.named_scope("gated_delta_chunk_prepare"):
        # Padded steps have k = v = 0, beta = 0, g = 0: they write nothing and decay nothing.
        def chunked(x):  # [B, T, ...] -> [B, N, C, ...]
            x = jnp.pad(x.astype(_F32), [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
            return x.reshape((batch, num_chunks, chunk_size) + x.shape[2:])

        # Chunk axis first (lax.scan slices it), tokens next to the feature axis for the matmuls.
        q_c, k_c = (chunked(x).transpose(1, 0, 3, 2, 4) for x in (q, k))  # [N, B, Hk, C, K]
        v_c = _split_value_heads(chunked(v), num_key_heads, 3)
        v_c = v_c.transpose(1, 0, 3, 4, 2, 5)  # [N, B, Hk, G, C, V]
        g_c, beta_c = (
            _split_value_heads(chunked(x), num_key_heads, 3).transpose(1, 0, 3, 4, 2)
            for x in (g, beta)
        )  # [N, B, Hk, G, C]

        gamma = jnp.cumsum(g_c, axis=-1)  # log of the decay from the chunk start to token i
        rows = jnp.arange(chunk_size)
        causal = rows[:, None] >= rows[None, :]
        strictly_lower = rows[:, None] > rows[None, :]
        # seg[i, j] = gamma_i - gamma_j for i >= j, summed directly over (j, i] instead of
        # subtracting prefix sums: gamma reaches ~-100 within a chunk, and the difference of two
        # such numbers carries ~6e-6 absolute error into the exponent (measured: 10x larger
        # output error than the token scan). Never exp(gamma_i) * exp(-gamma_j): that overflows.
        seg = jnp.cumsum(jnp.where(strictly_lower, g_c[..., :, None], 0.0), axis=-2)
        # Masked to -inf rather than multiplied by a mask, so no inf or NaN can reach the grads.
        pair_decay = jnp.exp(jnp.where(causal, seg, -jnp.inf))  # [N, B, Hk, G, C, C], <= 1

        # Key-key and query-key products depend only on the key head: compute once, broadcast
        # over the G value heads.
        kk = ein("nbhck,nbhdk->nbhcd", k_c, k_c)[:, :, :, None]
        qk = ein("nbhck,nbhdk->nbhcd", q_c, k_c)[:, :, :, None]
        intra_attn = qk * pair_decay  # diagonal included: o_t reads the updated state
        strict = jnp.where(strictly_lower, beta_c[..., :, None] * kk * pair_decay, 0.0)

        k_g = k_c[:, :, :, None]  # [N, B, Hk, 1, C, K]
        decay_in = jnp.exp(gamma)[..., None]  # chunk start -> token i, <= 1
        decay_out = jnp.exp(seg[..., -1, :])[..., None]  # token i -> chunk end, <= 1
        chunk_decay = jnp.exp(gamma[..., -1])  # [N, B, Hk, G]

    with jax.named_scope("gated_delta_ut_solve"):
        # One solve for both right-hand sides: U = A^-1 (beta V), W = A^-1 (beta K exp(gamma)).
        rhs = jnp.concatenate(
            [beta_c[..., None] * v_c, beta_c[..., None] * k_g * decay_in], axis=-1
        )
        solved = _solve_unit_lower(strict, rhs, solve, prec)
        u, w = solved[..., :value_dim], solved[..., value_dim:]
        # W S and (Q exp(gamma)) S share S: stacking them along tokens makes one matmul per chunk.
        w_and_q = jnp.concatenate([w, q_c[:, :, :, None] * decay_in], axis=-2)  # [.., 2C, K]
        k_out = k_g * decay_out  # [N, B, Hk, G, C, K]

    def body(s, xs):  # s: [B, Hk, G, K, V]
        w_and_q_n, u_n, k_out_n, chunk_decay_n = xs
        read = ein("bhgck,bhgkv->bhgcv", w_and_q_n, s)
        v_new = u_n - read[..., :chunk_size, :]
        s = chunk_decay_n[..., None, None] * s + ein("bhgck,bhgcv->bhgkv", k_out_n, v_new)
        return s, (v_new, read[..., chunk_size:, :])

    with jax.named_scope("gated_delta_chunk_scan"):
        state = _split_value_heads(state, num_key_heads, 1)
        state, (v_new, o_inter) = lax.scan(
            body, state, (w_and_q, u, k_out, chunk_decay), unroll=min(SCAN_UNROLL, num_chunks)
        )
        state = state.reshape(batch, num_value_heads, key_dim, value_dim)

    with jax.named_scope("gated_delta_chunk_output"):
        # The intra-chunk term needs only v_new, so it runs for all chunks at once after the scan.
        o = o_inter + ein("nbhgcd,nbhgdv->nbhgcv", intra_attn, v_new)
        o = o.transpose(1, 0, 4, 2, 3, 5)  # [B, N, C, Hk, G, V]
        o = o.reshape(batch, num_chunks * chunk_size, num_value_heads, value_dim)[:, :seq_len]
    return o.astype(out_dtype), state
