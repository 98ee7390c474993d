"""Public entry point for the gated delta rule: validation and dispatch to an implementation.

The recurrence is the one of Gated DeltaNet (Yang, Kautz, Hatamizadeh, "Gated Delta Networks:
Improving Mamba2 with Delta Rule", ICLR 2025, arXiv:2412.06464); the chunked implementation uses
the WY/UT representation of Yang et al., "Parallelizing Linear Transformers with the Delta Rule
over Sequence Length" (NeurIPS 2024, arXiv:2406.06484). See `reference.py` for the math.

Shapes: B batch, T tokens, Hk key heads, Hv value heads, K key dim, V value dim.
"""

from __future__ import annotations

import numbers

import jax.numpy as jnp

from pallas_kernels.gated_delta import reference

DEFAULT_IMPLEMENTATION = "chunked"


def _chunked(q, k, v, g, beta, initial_state, *, chunk_size, out_dtype, solve, precision):
    return reference.chunk_gated_delta_rule(
        q, k, v, g, beta, initial_state, chunk_size=chunk_size, out_dtype=out_dtype, solve=solve,
        precision=precision,
    )


def _naive(q, k, v, g, beta, initial_state, *, chunk_size, out_dtype, solve, precision):
    del chunk_size, solve, precision  # the token-by-token scan has none of them
    return reference.naive_recurrent_gated_delta_rule(
        q, k, v, g, beta, initial_state, out_dtype=out_dtype
    )


# Every entry takes the same arguments, so a new backend (e.g. "pallas") is one more line here.
_IMPLEMENTATIONS = {
    "chunked": _chunked,
    "naive": _naive,
}


def _check_float(name, x):
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"{name} must have a floating dtype, got {x.dtype}")


def _validate(q, k, v, g, beta, initial_state, implementation, chunk_size, solve, precision):
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
    if initial_state is not None:
        expected = (batch, num_value_heads, key_dim, value_dim)
        if initial_state.shape != expected:
            raise ValueError(
                f"initial_state must have shape [B, Hv, K, V] = {expected}, "
                f"got {initial_state.shape}"
            )
        if initial_state.dtype != jnp.float32:
            raise ValueError(f"initial_state must be float32, got {initial_state.dtype}")
    if solve is not None and solve not in reference.SOLVE_METHODS:
        raise ValueError(f"solve must be one of {reference.SOLVE_METHODS} or None, got {solve!r}")
    if precision not in reference.DOT_PRECISIONS:
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
    implementation: str | None = None,
    chunk_size: int = 64,
    out_dtype=None,
    solve: str | None = None,
    precision: str = "float32",
):
    """Gated delta rule over a sequence (prefill / training).

    Args:
      q, k: [B, T, Hk, K], already l2-normalised; q also scaled by K**-0.5.
      v: [B, T, Hv, V], Hv a multiple of Hk; value head j reads key head j // (Hv // Hk).
      g: [B, T, Hv] log-decay (<= 0), float32.
      beta: [B, T, Hv] in (0, 1), any float dtype.
      initial_state: optional [B, Hv, K, V] float32; None means zeros.
      implementation: "chunked" (WY/UT form), "naive" (token scan) or None (the default, chunked).
      chunk_size: tokens per chunk for the chunked form (a multiple of 16 for solve="blocked").
      out_dtype: dtype of o; defaults to v.dtype.
      solve: unit-lower-triangular solve of the chunked form, "triangular_solve", "blocked" or
        None (the faster one for the backend).
      precision: dot arithmetic of the chunked form on GPU ("float32", "tf32x3", "bf16x6",
        "bf16x3"; see reference.DOT_PRECISIONS). Other backends always compute in float32.

    Returns:
      (o [B, T, Hv, V], final_state [B, Hv, K, V] float32).

    Pure and shape-static: jit it with `static_argnames=("implementation", "chunk_size",
    "out_dtype", "solve", "precision")`. Invalid shapes or options raise ValueError at trace time.
    """
    implementation = DEFAULT_IMPLEMENTATION if implementation is None else implementation
    _validate(q, k, v, g, beta, initial_state, implementation, chunk_size, solve, precision)
    return _IMPLEMENTATIONS[implementation](
        q, k, v, g, beta, initial_state, chunk_size=chunk_size, out_dtype=out_dtype, solve=solve,
        precision=precision,
    )
