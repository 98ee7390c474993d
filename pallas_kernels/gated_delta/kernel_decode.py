"""Pallas (Triton) kernel for the gated delta rule over a few tokens: decode and speculative verify.

The recurrence of Gated DeltaNet (Yang, Kautz, Hatamizadeh, arXiv:2412.06464), per (batch, value
head), with the fp32 state S [K, V]:

    S <- exp(g_t) S;  u_t = beta_t (v_t - S^T k_t);  S <- S + k_t u_t^T;  o_t = S^T q_t

Decode is bound by the state traffic (48 x 128 x 128 fp32 = 3 MB per layer and sequence, read and
written once per token): XLA's einsum version makes four passes over it (decay, S^T k, rank-1 update,
S^T q). This kernel makes one: each program loads a [K, BV] tile of one head's state into registers,
runs all T tokens on it (no dots: the products are rank-1, so elementwise work and reductions over K)
and writes it back, in place when only the final state is wanted (`input_output_aliases`).

Grid: (B * Hv, V / BV). Value head j of batch b reads key head j // (Hv // Hk) (the model's
`repeat_interleave` rule); q and k are indexed, never repeated.

Shapes: B batch, T tokens (a handful), Hk key heads, Hv value heads, K key dim, V value dim.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.gated_delta import kernel_common as kc

F32 = jnp.float32
# Tokens up to this count are unrolled in the kernel (speculative verification uses <= 8); longer
# runs use an scf.for loop so the kernel stays small.
_MAX_UNROLL = 8


def _recurrent_kernel(q_ref, k_ref, v_ref, g_ref, beta_ref, s0_ref, o_ref, s_ref, *, num_tokens,
                      num_key_heads, num_value_heads, key_dim, block_v, all_states):
    """One program: tile S[:, vb*BV : (vb+1)*BV] of value head j of sequence b, over all T tokens.

    Refs (flattened 2-D/1-D views, see `gated_delta_recurrent_pallas`): q, k [B*T*Hk, K];
    v [B*T*Hv, V]; g, beta [B*T*Hv]; s0 [B*Hv*K, V]; o [B*T*Hv, V]; s [B*Hv*K, V] (aliases s0) or,
    with all_states, [B*T*Hv*K, V].
    """
    row = pl.program_id(0)  # b * Hv + j
    vb = pl.program_id(1)
    group = num_value_heads // num_key_heads
    b = row // num_value_heads
    j = row % num_value_heads
    h = j // group
    cols = pl.ds(vb * block_v, block_v)
    s = s0_ref[pl.ds(row * key_dim, key_dim), cols].astype(F32)  # [K, BV]

    def token(t, s):
        qk_row = (b * num_tokens + t) * num_key_heads + h
        v_row = (b * num_tokens + t) * num_value_heads + j
        q = q_ref[qk_row, :].astype(F32)  # [K]
        k = k_ref[qk_row, :].astype(F32)
        v = v_ref[v_row, cols].astype(F32)  # [BV]
        decay = jnp.exp(g_ref[v_row].astype(F32))
        beta = beta_ref[v_row].astype(F32)
        s = s * decay
        # S^T k and S^T q are reductions over K of elementwise products: exact fp32, no dot units.
        u = beta * (v - jnp.sum(k[:, None] * s, axis=0))
        s = s + k[:, None] * u[None, :]
        o_ref[v_row, cols] = jnp.sum(q[:, None] * s, axis=0).astype(o_ref.dtype)
        if all_states:
            s_ref[pl.ds(v_row * key_dim, key_dim), cols] = s
        return s

    if num_tokens <= _MAX_UNROLL:
        for t in range(num_tokens):
            s = token(t, s)
    else:
        s = jax.lax.fori_loop(0, num_tokens, token, s)
    if not all_states:
        s_ref[pl.ds(row * key_dim, key_dim), cols] = s


@functools.partial(
    jax.jit,
    static_argnames=("output_all_states", "out_dtype", "block_v", "num_warps", "interpret"),
)
def gated_delta_recurrent_pallas(q, k, v, g, beta, state, *, output_all_states: bool = False,
                                 out_dtype=None, block_v: int | None = None,
                                 num_warps: int | None = None, interpret: bool = False):
    """T tokens (decode: T=1; speculative verification: T <= 8) of the gated delta rule in one kernel.

    Args:
      q, k: [B, T, Hk, K], l2-normalised (q also scaled by K**-0.5).
      v: [B, T, Hv, V], Hv a multiple of Hk.
      g: [B, T, Hv] log-decay (float32); beta: [B, T, Hv].
      state: [B, Hv, K, V] float32. Without `output_all_states` it is updated in place when the
        caller donates it (the kernel aliases it to the new state).
      output_all_states: also return the state after every token (for rollback after a partially
        accepted speculative draft).
      block_v, num_warps: BV, value columns per program (a power of two), and warps per program.
        None picks what measured fastest on an H200 inside a 48-layer jit: at B <= 2, BV=16 with
        one warp (more, smaller programs: 12.3 vs 15.0 us per layer at B=1); above, BV=32 with
        4 warps (26.7 vs 36.1 us at B=8).

    Returns:
      (o [B, T, Hv, V] in out_dtype (default v.dtype), states): states is the final state
      [B, Hv, K, V] float32, or [B, T, Hv, K, V] float32 with `output_all_states`.
    """
    batch, num_tokens, num_key_heads, key_dim = k.shape
    num_value_heads, value_dim = v.shape[-2:]
    out_dtype = jnp.dtype(v.dtype if out_dtype is None else out_dtype)
    # Triton tensors need power-of-two sizes. Zero columns/rows are exact: zero key entries never
    # touch the state, zero value columns stay zero.
    kp, vp = kc.pow2_at_least(key_dim, 1), kc.pow2_at_least(value_dim, 1)
    small = batch <= 2
    block_v = (16 if small else 32) if block_v is None else block_v
    num_warps = (1 if small else 4) if num_warps is None else num_warps
    bv = min(block_v, vp)
    if not kc.is_pow2(bv):
        raise ValueError(f"block_v must be a power of two, got {block_v}")
    q2 = kc.pad_axis(q, 3, kp).reshape(batch * num_tokens * num_key_heads, kp)
    k2 = kc.pad_axis(k, 3, kp).reshape(batch * num_tokens * num_key_heads, kp)
    v2 = kc.pad_axis(v, 3, vp).reshape(batch * num_tokens * num_value_heads, vp)
    g1 = g.astype(F32).reshape(-1)
    b1 = beta.reshape(-1)
    s2 = kc.pad_axis(kc.pad_axis(state.astype(F32), 2, kp), 3, vp)
    s2 = s2.reshape(batch * num_value_heads * kp, vp)

    states_rows = (num_tokens if output_all_states else 1) * batch * num_value_heads * kp
    kernel = functools.partial(
        _recurrent_kernel, num_tokens=num_tokens, num_key_heads=num_key_heads,
        num_value_heads=num_value_heads, key_dim=kp, block_v=bv, all_states=output_all_states,
    )
    o2, s_out = pl.pallas_call(
        kernel,
        out_shape=(
            jax.ShapeDtypeStruct((batch * num_tokens * num_value_heads, vp), out_dtype),
            jax.ShapeDtypeStruct((states_rows, vp), F32),
        ),
        grid=(batch * num_value_heads, vp // bv),
        # The state is read and rewritten tile by tile, each tile by the one program that owns it,
        # so updating it in place is race-free.
        input_output_aliases={} if output_all_states else {5: 1},
        compiler_params=kc.compiler_params(num_warps=num_warps, num_stages=1),
        interpret=interpret,
        name="gated_delta_recurrent",
    )(q2, k2, v2, g1, b1, s2)
    o = o2.reshape(batch, num_tokens, num_value_heads, vp)[..., :value_dim]
    if output_all_states:
        s_out = s_out.reshape(batch, num_tokens, num_value_heads, kp, vp)
    else:
        s_out = s_out.reshape(batch, num_value_heads, kp, vp)
    return o, s_out[..., :key_dim, :value_dim]
