"""EoRA: training-free eigen-space low-rank compensation of the quantization error.

Liu et al., "EoRA: Fine-tuning-free Compensation for Compressed LLM with Eigenspace Low-Rank
Approximation", arXiv:2410.21271, as GPTQModel implements it (``gptqmodel/eora/eora.py``
``eora_compute_lora``; ``shared/reference/quant_formats.md`` section 2.1):

    D = W - W_q                                   [N, K], float
    C = Q diag(lam) Q^T                           eigh of the activation covariance X^T X [K, K]
    keep lam > lam_max * min(1, K * eps_f32)      truncated pseudo-inverse; the rest count as 0
    S = Q diag(sqrt lam),  S+ = diag(1/sqrt lam) Q^T
    U s V^T = svd(D S)
    B = U_r diag(sqrt s_r)            [N, r]   (lora_B)
    A = diag(sqrt s_r) V_r^T S+       [r, K]   (lora_A)

so ``W_q + B A`` is the best rank-r correction of W_q in the activation-weighted norm
``||(D - B A) X^T||_F``, and ``y = x W_q^T + (x A^T) B^T``. The result does not depend on the
scale of C, so GPTQ's ``H = 2/n X^T X`` serves as C directly.

Shapes: N out features, K in features, r rank.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from quant.leaves import SCALE_DTYPES, dtype_name

F32 = jnp.float32
HI = jax.lax.Precision.HIGHEST


def _basis(c, xp, linalg):
    """``(S, S+)`` of the covariance c: ``Q diag(sqrt lam)`` and its truncated pseudo-inverse."""
    lam, q = linalg.eigh(c)
    eps = float(np.finfo(np.float32).eps)
    keep = lam > lam.max() * min(1.0, c.shape[0] * eps)
    sq = xp.sqrt(xp.where(keep, lam, 1.0))
    s = q * xp.where(keep, sq, 0.0)[None, :]  # Q diag(sqrt lam)
    s_pinv = (q * xp.where(keep, 1.0 / sq, 0.0)[None, :]).T  # diag(1/sqrt lam) Q^T
    return s, s_pinv


def _factors(delta, basis, rank, xp, linalg):
    """Factors of rank ``rank`` (None: every singular direction, ``min(N, K)``)."""
    s, s_pinv = basis
    u, sv, vt = linalg.svd(delta @ s, full_matrices=False)
    r = sv.shape[0] if rank is None else rank
    root = xp.sqrt(sv[:r])
    b = u[:, :r] * root[None, :]
    a = (root[:, None] * vt[:r]) @ s_pinv
    return a, b


@jax.jit
def eigen_basis(covariance):
    """The eigen-space basis ``(S, S+)`` (float32, ``[K, K]`` each) of an activation covariance
    ``[K, K]``. Linears that read the same input share it: pass it to :func:`eora` /
    :func:`eora_factors` as ``basis`` and the eigendecomposition runs once for all of them."""
    with jax.default_matmul_precision("highest"):
        return _basis(covariance.astype(F32), jnp, jnp.linalg)


@jax.jit
def _factors_f32(delta, basis):
    """All ``min(N, K)`` factors, sorted by singular value: one compilation serves every rank (the
    caller slices), and the SVD is computed in full anyway."""
    with jax.default_matmul_precision("highest"):
        return _factors(delta.astype(F32), basis, None, jnp, jnp.linalg)


def eora_factors(w, w_q, covariance, rank: int, *, compute_dtype: str = "float32", basis=None):
    """``(A [r, K], B [N, r])`` float32 with ``W_q + B A ~ W`` in the activation-weighted norm.

    w, w_q: ``[N, K]`` the float weight and its quantized (dequantized) version; covariance:
    ``[K, K]`` activation second moment (X^T X or GPTQ's H; its scale is irrelevant).
    compute_dtype: "float32" (jit-compiled, on the accelerator) or "float64" (numpy on the host,
    GPTQModel's precision for the eigendecomposition; slow for large K).
    basis: :func:`eigen_basis` of ``covariance``, computed once and shared by linears with the same
    input (float32 only; None computes it here).
    Raises ValueError for a rank outside ``[1, min(N, K)]``.
    """
    n, k = w.shape
    if tuple(w_q.shape) != (n, k) or tuple(covariance.shape) != (k, k):
        raise ValueError(f"EoRA shapes: w {tuple(w.shape)}, w_q {tuple(w_q.shape)}, covariance "
                         f"{tuple(covariance.shape)}; expected [N, K], [N, K], [K, K]")
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or not 1 <= rank <= min(n, k):
        raise ValueError(f"EoRA rank {rank!r} must be an int in [1, min(N, K) = {min(n, k)}] for a [{n}, {k}] weight")
    delta = jnp.asarray(w).astype(F32) - jnp.asarray(w_q).astype(F32)
    if compute_dtype == "float32":
        if basis is None:
            basis = eigen_basis(jnp.asarray(covariance))
        elif tuple(basis[0].shape) != (k, k) or tuple(basis[1].shape) != (k, k):
            raise ValueError(f"EoRA basis shapes {tuple(basis[0].shape)}, {tuple(basis[1].shape)}; expected "
                             f"[{k}, {k}] each (eigen_basis of the [K, K] covariance)")
        a, b = _factors_f32(delta, basis)
        return a[:rank], b[:, :rank]
    if compute_dtype == "float64":
        if basis is not None:
            raise ValueError("a precomputed basis is float32; compute_dtype='float64' computes its own")
        c64 = np.asarray(covariance, np.float64)
        a, b = _factors(np.asarray(delta, np.float64), _basis(c64, np, np.linalg), int(rank), np, np.linalg)
        return jnp.asarray(a, F32), jnp.asarray(b, F32)
    raise ValueError(f"compute_dtype must be 'float32' or 'float64', got {compute_dtype!r}")


def eora(w, leaf, covariance, rank: int, *, lora_dtype=None, compute_dtype: str = "float32", basis=None):
    """Attach an EoRA adapter of rank ``rank`` to the quantized leaf of w ``[N, K]``.

    leaf: a :class:`quant.leaves.QuantizedWeight` (any adapter it already has is replaced; the
    error is taken against the bare quantized weight). lora_dtype: storage dtype of A and B
    (default: the leaf's original dtype when it is float16/bfloat16/float32, as GPTQModel casts
    them to the module dtype). Returns the leaf with ``lora_a``/``lora_b`` set.
    """
    base = leaf.with_lora(None, None) if leaf.lora_a is not None else leaf
    a, b = eora_factors(w, base.dequantize(), covariance, rank, compute_dtype=compute_dtype, basis=basis)
    if lora_dtype is None:
        lora_dtype = base.orig_dtype if base.orig_dtype in SCALE_DTYPES else "float32"
    lora_dtype = dtype_name(lora_dtype)
    if lora_dtype not in SCALE_DTYPES:
        raise ValueError(f"lora_dtype {lora_dtype} is not one of {SCALE_DTYPES}")
    return base.with_lora(a.astype(lora_dtype), b.astype(lora_dtype))
