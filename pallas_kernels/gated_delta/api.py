"""Public entry point for the gated delta rule: validation and dispatch to an implementation.

The recurrence is the one of Gated DeltaNet (Yang, Kautz, Hatamizadeh, "Gated Delta Networks:
Improving Mamba2 with Delta Rule", ICLR 2025, arXiv:2412.06464); the chunked implementation uses
the WY/UT representation of Yang et al., "Parallelizing Linear Transformers with the Delta Rule
over Sequence Length" (NeurIPS 2024, arXiv:2406.06484). See `reference.py` for the math.

Shapes: B batch, T tokens, Hk key heads, Hv value heads, K key dim, V value dim.
"""

from __future__ import annotations

import functools
import numbers

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.gated_delta import kernel_chunked, kernel_common, kernel_decode, reference

# "pallas" runs the Triton kernels (GPU only); "pallas_interpret" runs the same kernel code in
# Pallas interpret mode (any backend; slow, for tests).
IMPLEMENTATIONS = ("chunked", "naive", "pallas", "pallas_interpret")
PALLAS_IMPLEMENTATIONS = ("pallas", "pallas_interpret")
# Dot arithmetic the Pallas kernels offer (kernel_common.PRECISIONS); the reference's bf16 presets
# have no faithful Triton lowering.
PALLAS_PRECISIONS = kernel_common.PRECISIONS


# Precisions at which the Pallas prefill beats the XLA chunked form (H200, B=1, T=4096: bf16x3
# 1.04 ms against 2.61 ms for XLA at tf32x3; the Pallas kernels at tf32x3 take 3.4 ms, so there XLA
# stays the default). See NOTES.md.
PALLAS_DEFAULT_PRECISIONS = ("bf16x3",)


def default_implementation(precision: str = "float32", chunk_size: int = 64) -> str:
    """What `implementation=None` means: the Pallas kernels on a GPU at the precisions where they
    are the faster choice (PALLAS_DEFAULT_PRECISIONS), else the XLA chunked form."""
    if (jax.default_backend() == "gpu" and precision in PALLAS_DEFAULT_PRECISIONS
            and chunk_size in kernel_chunked.CHUNK_SIZES):
        return "pallas"
    return "chunked"


def _per_sequence(fn, q, k, v, g, beta, initial_state, offsets):
    """Runs fn(q, k, v, g, beta, state) -> (o, final) on each packed sequence of a B=1 batch.

    offsets: host int array [S+1]. Returns (o [1, T, Hv, V], final [S, Hv, K, V])."""
    outs, finals = [], []
    num_value_heads, value_dim = v.shape[-2:]
    key_dim = k.shape[-1]
    for s in range(len(offsets) - 1):
        a, b = int(offsets[s]), int(offsets[s + 1])
        h0 = None if initial_state is None else initial_state[s : s + 1]
        if b == a:  # an empty sequence keeps its state and emits nothing
            finals.append(jnp.zeros((1, num_value_heads, key_dim, value_dim), jnp.float32)
                          if h0 is None else h0.astype(jnp.float32))
            continue
        o, final = fn(q[:, a:b], k[:, a:b], v[:, a:b], g[:, a:b], beta[:, a:b], h0)
        outs.append(o)
        finals.append(final)
    o = jnp.concatenate(outs, axis=1) if outs else jnp.zeros(v.shape, v.dtype)
    return o, jnp.concatenate(finals, axis=0)


def _with_packing(fn):
    """Lifts a batch implementation to cu_seqlens packing (host offsets only: a Python loop)."""

    def run(q, k, v, g, beta, initial_state, *, cu_seqlens, out_dtype, **kwargs):
        one = lambda *a: fn(*a, out_dtype=out_dtype, **kwargs)  # noqa: E731
        if cu_seqlens is None:
            return one(q, k, v, g, beta, initial_state)
        offsets = kernel_chunked.concrete_offsets(cu_seqlens)
        if offsets is None:
            raise ValueError("the XLA implementations need cu_seqlens known at trace time (numpy or a "
                             "tuple); only implementation='pallas' takes traced offsets")
        o, final = _per_sequence(one, q, k, v, g, beta, initial_state, offsets)
        return o.astype(v.dtype if out_dtype is None else out_dtype), final

    return run


def _chunked_one(q, k, v, g, beta, initial_state, *, chunk_size, out_dtype, solve, precision):
    return reference.chunk_gated_delta_rule(
        q, k, v, g, beta, initial_state, chunk_size=chunk_size, out_dtype=out_dtype, solve=solve,
        precision=precision,
    )


def _naive_one(q, k, v, g, beta, initial_state, *, chunk_size, out_dtype, solve, precision):
    del chunk_size, solve, precision  # the token-by-token scan has none of them
    return reference.naive_recurrent_gated_delta_rule(
        q, k, v, g, beta, initial_state, out_dtype=out_dtype
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _reference_vjp(forward, backward, args, aux):
    """forward(*args, aux) whose gradient is that of backward(*args) (a pure-JAX reference of the
    same function). aux (e.g. traced offsets) gets no cotangent; backward=None means the gradient
    is not available, which raises when one is taken."""
    return forward(*args, aux)


def _reference_vjp_fwd(forward, backward, args, aux):
    return forward(*args, aux), args


def _reference_vjp_bwd(forward, backward, args, cotangents):
    if backward is None:
        raise NotImplementedError(
            "gradients of the Pallas gated delta rule with traced cu_seqlens are not implemented; "
            "pass cu_seqlens as a numpy array or tuple (known at trace time)"
        )
    _, vjp = jax.vjp(backward, *args)
    return vjp(cotangents), None


_reference_vjp.defvjp(_reference_vjp_fwd, _reference_vjp_bwd)

# The reference's precision used for the backward of a Pallas forward computed at `precision`.
_BACKWARD_PRECISION = {"float32": "float32", "tf32x3": "tf32x3", "tf32": "tf32x3", "bf16x3": "bf16x3"}


def _pallas(q, k, v, g, beta, initial_state, *, cu_seqlens, chunk_size, out_dtype, solve,
            precision, interpret, **tuning):
    """The Pallas forward; its gradient is the VJP of the XLA chunked reference (recomputed)."""
    offsets = None if cu_seqlens is None else kernel_chunked.concrete_offsets(cu_seqlens)
    packed = cu_seqlens is not None
    traced = packed and offsets is None

    def forward(q, k, v, g, beta, h0, cu):
        return kernel_chunked.chunk_gated_delta_rule_pallas(
            q, k, v, g, beta, h0, cu_seqlens=cu if traced else offsets, chunk_size=chunk_size,
            out_dtype=out_dtype, precision=precision, interpret=interpret, **tuning,
        )

    def backward(q, k, v, g, beta, h0):
        one = functools.partial(
            _chunked_one, chunk_size=chunk_size, out_dtype=out_dtype, solve=solve,
            precision=_BACKWARD_PRECISION[precision],
        )
        if not packed:
            return one(q, k, v, g, beta, h0)
        o, final = _per_sequence(one, q, k, v, g, beta, h0, offsets)
        return o.astype(v.dtype if out_dtype is None else out_dtype), final

    args = (q, k, v, g, beta, initial_state)
    return _reference_vjp(forward, None if traced else backward, args,
                          jnp.asarray(cu_seqlens, jnp.int32) if traced else None)


_IMPLEMENTATIONS = {
    "chunked": _with_packing(_chunked_one),
    "naive": _with_packing(_naive_one),
    "pallas": functools.partial(_pallas, interpret=False),
    "pallas_interpret": functools.partial(_pallas, interpret=True),
}


def _check_float(name, x):
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"{name} must have a floating dtype, got {x.dtype}")


def _validate(q, k, v, g, beta, initial_state, implementation, chunk_size, solve, precision,
              cu_seqlens=None):
    if implementation not in _IMPLEMENTATIONS:
        raise ValueError(
            f"unknown implementation {implementation!r}; valid: {sorted(_IMPLEMENTATIONS)} or None"
        )
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.ndim != 4:
            raise ValueError(f"{name} must be [B, T, heads, dim], got shape {tuple(x.shape)}")
        _check_float(name, x)
    if q.shape != k.shape:
        raise ValueError(f"q and k must have the same shape, got q {q.shape} and k {k.shape}")
    batch, seq_len, num_key_heads, key_dim = k.shape
    if seq_len == 0:
        raise ValueError(f"q, k, v must have at least one token (T > 0), got k shape {k.shape}")
    if v.shape[:2] != (batch, seq_len):
        raise ValueError(f"v shape {v.shape} must start with k's [B, T] = {(batch, seq_len)}")
    num_value_heads, value_dim = v.shape[2:]
    if num_value_heads % num_key_heads:
        raise ValueError(
            f"v has {num_value_heads} heads, not a multiple of k's {num_key_heads} heads"
        )
    for name, x in (("g", g), ("beta", beta)):
        if x.shape != (batch, seq_len, num_value_heads):
            raise ValueError(
                f"{name} must have shape [B, T, Hv] = {(batch, seq_len, num_value_heads)}, "
                f"got {x.shape}"
            )
        _check_float(name, x)
    # g is cumulatively summed over a chunk; bf16 log-decays would lose most of the state's
    # long-range information before the sum even starts.
    if g.dtype != jnp.float32:
        raise ValueError(f"g must be float32, got {g.dtype}")
    num_states = batch
    if cu_seqlens is not None:
        if batch != 1:
            raise ValueError(f"with cu_seqlens, q/k/v must hold one packed row (B = 1), got B={batch}")
        if jnp.ndim(cu_seqlens) != 1 or jnp.shape(cu_seqlens)[0] < 2:
            raise ValueError(f"cu_seqlens must be [S+1] sequence offsets, got shape {jnp.shape(cu_seqlens)}")
        num_states = jnp.shape(cu_seqlens)[0] - 1
        offsets = kernel_chunked.concrete_offsets(cu_seqlens)
        if offsets is not None and (offsets[0] != 0 or offsets[-1] != seq_len or np.any(np.diff(offsets) < 0)):
            raise ValueError(f"cu_seqlens must rise from 0 to T = {seq_len}, got {offsets.tolist()}")
    if initial_state is not None:
        expected = (num_states, num_value_heads, key_dim, value_dim)
        if initial_state.shape != expected:
            raise ValueError(
                f"initial_state must have shape [{'B' if cu_seqlens is None else 'S'}, Hv, K, V] = {expected}, "
                f"got {initial_state.shape}"
            )
        if initial_state.dtype != jnp.float32:
            raise ValueError(f"initial_state must be float32, got {initial_state.dtype}")
    if solve is not None and solve not in reference.SOLVE_METHODS:
        raise ValueError(f"solve must be one of {reference.SOLVE_METHODS} or None, got {solve!r}")
    if implementation in PALLAS_IMPLEMENTATIONS:
        if precision not in PALLAS_PRECISIONS:
            raise ValueError(f"precision must be one of {PALLAS_PRECISIONS} for {implementation!r}, got {precision!r}")
        if chunk_size not in kernel_chunked.CHUNK_SIZES:
            raise ValueError(f"chunk_size must be one of {kernel_chunked.CHUNK_SIZES} for {implementation!r}, "
                             f"got {chunk_size!r}")
    elif precision not in reference.DOT_PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(reference.DOT_PRECISIONS)}, got {precision!r}")
    if not isinstance(chunk_size, numbers.Integral) or chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    if implementation == "chunked" and solve == "blocked" and chunk_size % 16:
        raise ValueError(
            f"chunk_size must be a positive multiple of 16 for solve='blocked', got {chunk_size}"
        )


def gated_delta_rule(
    q,
    k,
    v,
    g,
    beta,
    *,
    initial_state=None,
    cu_seqlens=None,
    implementation: str | None = None,
    chunk_size: int = 64,
    out_dtype=None,
    solve: str | None = None,
    precision: str = "float32",
    **tuning,
):
    """Gated delta rule over a sequence (prefill / training).

    Args:
      q, k: [B, T, Hk, K], already l2-normalised; q also scaled by K**-0.5.
      v: [B, T, Hv, V], Hv a multiple of Hk; value head j reads key head j // (Hv // Hk).
      g: [B, T, Hv] log-decay (<= 0), float32.
      beta: [B, T, Hv] in (0, 1), any float dtype.
      initial_state: optional [B, Hv, K, V] float32 ([S, Hv, K, V] with cu_seqlens); None: zeros.
      cu_seqlens: optional [S+1] int offsets of S sequences packed along T (B must be 1); states
        never cross a boundary. A traced array works with "pallas" (forward only); the XLA
        implementations and gradients need it known at trace time (numpy or tuple).
      implementation: "chunked" (XLA WY/UT form), "naive" (token scan), "pallas" (Triton kernels,
        GPU), "pallas_interpret" (the same kernels interpreted, any backend) or None: "pallas" on a
        GPU at precision "bf16x3" (where it is the faster choice), else "chunked"
        (`default_implementation`).
        The Pallas forward's gradient is the VJP of the chunked reference (recomputed).
      chunk_size: tokens per chunk for the chunked forms (a multiple of 16 for solve="blocked";
        16, 32 or 64 for the Pallas kernels).
      out_dtype: dtype of o; defaults to v.dtype.
      solve: unit-lower-triangular solve of the chunked form, "triangular_solve", "blocked" or
        None (the faster one for the backend).
      precision: dot arithmetic of the chunked forms on GPU ("float32", "tf32x3", "bf16x6",
        "bf16x3" for "chunked", see reference.DOT_PRECISIONS; "bf16x3", "tf32x3", "tf32", "float32"
        for the Pallas kernels, see kernel_common.PRECISIONS). On other backends the chunked form
        computes in float32; the Pallas "bf16x3" splits operands by hand on every backend. With
        bf16/fp16 q, k, v the Pallas "bf16x3" state pass computes its products in fp16 by default
        (error of o ~1.2e-3 with bf16 o, inside the 2e-3 bound; pass fp16_products=False for
        every product at bf16x3, ~1.4e-4): see `kernel_chunked.default_fp16_products`.
      **tuning: Pallas launch settings (block_v, num_warps, num_stages, num_warps_intra), and
        fuse_products, transposed, wide_products, stack_qk, bf16_products or fp16_products (see
        `chunk_gated_delta_rule_pallas`).

    Returns:
      (o [B, T, Hv, V], final_state [B, Hv, K, V] float32; [S, Hv, K, V] with cu_seqlens).

    Pure and shape-static: jit it with `static_argnames=("implementation", "chunk_size",
    "out_dtype", "solve", "precision")`. Invalid shapes or options raise ValueError at trace time.
    """
    if implementation is None:
        implementation = default_implementation(precision, chunk_size)
    _validate(q, k, v, g, beta, initial_state, implementation, chunk_size, solve, precision, cu_seqlens)
    if tuning and implementation not in PALLAS_IMPLEMENTATIONS:
        raise ValueError(f"{sorted(tuning)} are settings of the Pallas kernels, not of {implementation!r}")
    return _IMPLEMENTATIONS[implementation](
        q, k, v, g, beta, initial_state, cu_seqlens=cu_seqlens, chunk_size=chunk_size,
        out_dtype=out_dtype, solve=solve, precision=precision, **tuning,
    )


def _recurrent_reference(q, k, v, g, beta, state, *, output_all_states, out_dtype):
    """T unrolled `gated_delta_step`s (T is small)."""
    outs, states = [], []
    for t in range(q.shape[1]):
        o_t, state = reference.gated_delta_step(q[:, t], k[:, t], v[:, t], g[:, t], beta[:, t], state)
        outs.append(o_t)
        states.append(state)
    o = jnp.stack(outs, axis=1).astype(v.dtype if out_dtype is None else out_dtype)
    return o, (jnp.stack(states, axis=1) if output_all_states else state)


def gated_delta_recurrent(
    q,
    k,
    v,
    g,
    beta,
    state,
    *,
    implementation: str | None = None,
    output_all_states: bool = False,
    out_dtype=None,
    **tuning,
):
    """A few tokens of the gated delta rule from a given state: decode (T = 1) and speculative
    verification (T <= 8 or so).

    Args:
      q, k: [B, T, Hk, K], l2-normalised (q also scaled by K**-0.5).
      v: [B, T, Hv, V], Hv a multiple of Hk.
      g: [B, T, Hv] float32 log-decay; beta: [B, T, Hv].
      state: [B, Hv, K, V] float32 (donate it to update it in place with "pallas").
      implementation: "pallas" (one Triton kernel, GPU), "pallas_interpret", "naive" or "chunked"
        (both: T unrolled XLA steps), or None: "pallas" on a GPU, else "naive".
      output_all_states: return the state after every token (for rollback) instead of the last.
      **tuning: Pallas launch settings (block_v, num_warps).

    Returns:
      (o [B, T, Hv, V] in out_dtype (default v.dtype), states [B, Hv, K, V] float32, or
      [B, T, Hv, K, V] with output_all_states).
    """
    if implementation is None:
        implementation = "pallas" if jax.default_backend() == "gpu" else "naive"
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"unknown implementation {implementation!r}; valid: {list(IMPLEMENTATIONS)} or None")
    if state is None:
        raise ValueError("state is required: [B, Hv, K, V] float32")
    _validate(q, k, v, g, beta, state, "naive", 64, None, "float32")
    reference_fn = functools.partial(_recurrent_reference, output_all_states=output_all_states,
                                     out_dtype=out_dtype)
    if implementation not in PALLAS_IMPLEMENTATIONS:
        if tuning:
            raise ValueError(f"{sorted(tuning)} are settings of the Pallas kernels, not of {implementation!r}")
        return reference_fn(q, k, v, g, beta, state)

    def forward(q, k, v, g, beta, state, aux):
        # One token: "every state" is the final one. Asked for as such, the kernel updates the
        # (donated) state in place; with output_all_states it would write a fresh [B, 1, ...] buffer
        # that XLA then copies into the donated one (2.1 us per layer at B=1, 13.2 us at B=8 in the
        # 27B decode step on an H200).
        all_states = output_all_states and q.shape[1] > 1
        o, s = kernel_decode.gated_delta_recurrent_pallas(
            q, k, v, g, beta, state, output_all_states=all_states, out_dtype=out_dtype,
            interpret=implementation == "pallas_interpret", **tuning,
        )
        return o, (s[:, None] if output_all_states and not all_states else s)

    return _reference_vjp(forward, reference_fn, (q, k, v, g, beta, state), None)
