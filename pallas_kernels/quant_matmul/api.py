"""Public entry point of the weight-only quantized matmul: validation and dispatch.

Shapes: M rows of activations (any leading dims are flattened into M), K input features
(``in_features``), Kp padded input dim, S = Kp // p packed word rows, N output features,
G groups (``layout.num_groups``). The packed layout is the one of ``layout.py``.

Dispatch (``implementation=None``), on a GPU:
  * M <= 16 (decode): the Pallas split-K GEMV / skinny GEMM of ``kernel.py``;
  * 16 < M < XLA_DEQUANT_MIN_ROWS[bits]: the Pallas tiled GEMM;
  * larger M (prefill), 4-bit or 8-bit codes, bf16 activations, on a Hopper GPU, where it
    measured faster (``kernel_mosaic.preferred``: 4-bit at 512 rows, or up to 2,048 rows with
    N >= 10,240; 8-bit at 512 rows): the fused Mosaic GPU kernel of ``kernel_mosaic.py``
    ("mosaic"; the decoded weight is wgmma's register operand, 1.10-1.17x XLA's bf16 GEMM at
    K=5120 -> N=34816, 512-1,024 rows, int4; 1.3-1.5x at the smaller issue shapes);
  * other large M: the weight is dequantized to bf16 in one memory-bound pass (the Pallas
    ``kernel.dequantize_pallas``) and XLA runs its own bf16 GEMM ("xla_dequant", see
    ``dequantize_then_dot``). At these sizes the pass is small next to the GEMM, and our
    Triton-lowered fused GEMMs (~270-370 TFLOP/s) lose to XLA's bf16 GEMM (~550-740); NOTES.md.
Shapes the kernels do not cover (``kernel.unsupported_reason``), and every call off-GPU, use
the plain-jnp reference.
"""

from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp

from pallas_kernels.quant_matmul import layout, reference

IMPLEMENTATIONS = (None, "reference", "pallas", "pallas_interpret", "xla_dequant", "mosaic")
# Rows from which the default GPU path is "xla_dequant" (dequantization pass + XLA bf16 GEMM).
# H100, K=5120 -> N=34816, M=512, device us (2026-12-06): bf16 GEMM 251; pass + GEMM int4 g128 466,
# int8 g32 498; Pallas fused gemm int4 761, int8 g32 578; XLA's own dequantize fusion + GEMM 648 /
# 644. (H200, 2026-12-02, wall us, M=4096: Pallas gemm int4 6164 / int8 4131, XLA dequantize + GEMM
# 2393 / 2433, bf16 1966.)
XLA_DEQUANT_MIN_ROWS = {2: 512, 3: 512, 4: 512, 8: 512}
SCALE_DTYPES = (jnp.float16, jnp.bfloat16, jnp.float32)


def _on_gpu() -> bool:
    try:
        return jax.default_backend() == "gpu"
    except RuntimeError:  # no backend could be initialised at all
        return False


def _validate(x, packed, scales, zeros, bits, group_size, in_features, implementation):
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"unknown implementation {implementation!r}; valid: {IMPLEMENTATIONS}")
    for name, v in (("bits", bits), ("group_size", group_size), ("in_features", in_features)):
        if not isinstance(v, numbers.Integral) or isinstance(v, bool):
            raise TypeError(f"{name} must be a Python int (static), got {type(v).__name__}")
    if bits not in layout.SUPPORTED_BITS:
        raise ValueError(f"unsupported bit width {bits}; supported: {layout.SUPPORTED_BITS}")
    if in_features <= 0:
        raise ValueError(f"in_features must be positive, got {in_features}")
    if group_size <= 0 or in_features % group_size:
        raise ValueError(
            f"group_size {group_size} must be positive and divide in_features {in_features}"
        )
    if x.ndim < 1 or x.shape[-1] != in_features:
        raise ValueError(f"x must be [..., K={in_features}], got shape {tuple(x.shape)}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"x must have a floating dtype, got {x.dtype}")
    s_rows = layout.slab_rows(in_features, bits, group_size)
    if packed.ndim != 2 or packed.dtype != jnp.uint32:
        raise ValueError(
            f"packed must be uint32 [S, N], got {packed.dtype} of shape {tuple(packed.shape)}"
        )
    if packed.shape[0] != s_rows:
        raise ValueError(
            f"packed has {packed.shape[0]} word rows; K={in_features} at {bits} bits, group "
            f"{group_size} needs S={s_rows} (Kp={layout.padded_in_features(in_features, bits, group_size)})"
        )
    n = packed.shape[1]
    g = layout.num_groups(in_features, bits, group_size)
    if scales.shape != (g, n):
        raise ValueError(f"scales must be [G={g}, N={n}], got shape {tuple(scales.shape)}")
    if scales.dtype not in SCALE_DTYPES:
        raise ValueError(f"scales must be float16, bfloat16 or float32, got {scales.dtype}")
    if zeros is not None:
        if zeros.shape != (g, n):
            raise ValueError(f"zeros must be [G={g}, N={n}] or None, got shape {tuple(zeros.shape)}")
        if zeros.dtype != jnp.uint8:
            raise ValueError(f"zeros must be uint8, got {zeros.dtype}")


def quant_matmul(x, packed, scales, zeros, *, bits: int, group_size: int, in_features: int,
                 implementation: str | None = None):
    """``x [..., K] @ W [K, N] -> [..., N]`` in ``x.dtype``; ``W`` given packed (``layout.py``).

    Args:
      x: activations ``[M, K]`` (or ``[..., K]``), floating (bf16 on the fast path).
      packed: ``uint32 [S, N]`` codes, ``S = layout.slab_rows(K, bits, group_size)``.
      scales: ``[G, N]`` float16 / bfloat16 / float32 (``G = layout.num_groups(...)``).
      zeros: ``uint8 [G, N]`` zero points, or None for the symmetric ``2**(bits-1)``.
      bits: 2, 3, 4 or 8 (3 runs on the reference only).
      group_size: rows per scale group; ``== in_features`` for per-channel.
      in_features: K (the real input dim, before padding).
      implementation: None (GPU: Pallas kernels, or "xla_dequant" for large M; elsewhere the
        reference), "reference" (fp32), "pallas" (the Pallas kernels at every M; raises if the
        shape is not covered), "pallas_interpret" (Pallas interpreter, for CPU tests) or
        "xla_dequant" (XLA dequantizes to bf16 / f16, then a dot with fp32 accumulation) or
        "mosaic" (the fused Mosaic GPU kernel at any M, activations cast to bf16; Hopper GPUs,
        4-bit codes; raises if the shape is not covered).
    """
    _validate(x, packed, scales, zeros, bits, group_size, in_features, implementation)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, in_features)
    n = packed.shape[1]
    kwargs = dict(bits=bits, group_size=group_size, in_features=in_features)
    m = x2.shape[0]

    if implementation == "mosaic" or (
        implementation is None and _on_gpu() and m >= XLA_DEQUANT_MIN_ROWS[bits]
        and x2.dtype == jnp.bfloat16 and mosaic_preferred(m, n, **kwargs)
    ):
        from pallas_kernels.quant_matmul import kernel_mosaic

        reason = kernel_mosaic.unsupported_reason(m, n, **kwargs)
        if reason is None and not kernel_mosaic.available():
            reason = "needs a Hopper (sm_90) GPU and jax's Pallas Mosaic GPU backend"
        if reason is not None:
            raise ValueError(f"the Mosaic quant_matmul kernel does not cover this call: {reason}")
        out = kernel_mosaic.quant_matmul_mosaic(x2.astype(jnp.bfloat16), packed, scales, zeros, **kwargs)
        return out.astype(x.dtype).reshape(lead + (n,))
    if implementation == "xla_dequant" or (
        implementation is None and _on_gpu() and m >= XLA_DEQUANT_MIN_ROWS[bits]
    ):
        out = dequantize_then_dot(x2, packed, scales, zeros, **kwargs)
        return out.reshape(lead + (n,))
    use_kernel = implementation in ("pallas", "pallas_interpret")
    if use_kernel or (implementation is None and _on_gpu()):
        from pallas_kernels.quant_matmul import kernel

        reason = kernel.unsupported_reason(m, n, **kwargs)
        if reason is not None:
            if use_kernel:
                raise ValueError(f"the Pallas quant_matmul kernel does not cover this call: {reason}")
        else:
            out = kernel.quant_matmul_pallas(
                x2, packed, scales, zeros, interpret=implementation == "pallas_interpret", **kwargs
            )
            return out.reshape(lead + (n,))
    out = reference.quant_matmul_reference(x2, packed, scales, zeros, **kwargs)
    return out.reshape(lead + (n,))


def mosaic_preferred(m, n, **kwargs) -> bool:
    """Whether the default dispatch sends an M-row bf16 call to the Mosaic kernel (Hopper only)."""
    from pallas_kernels.quant_matmul import kernel_mosaic

    return kernel_mosaic.available() and kernel_mosaic.preferred(m, n, **kwargs)


def dequantize_then_dot(x, packed, scales, zeros, *, bits: int, group_size: int, in_features: int,
                        dequant: str | None = None):
    """``x [M, K]`` @ the weight dequantized to bf16 (f16 for f16 x) ``[K, N]``, fp32 accumulation.

    The prefill path: the bf16 weight is materialised (one pass over 2 bytes per weight) and XLA runs
    its tuned bf16 GEMM; each weight is rounded once to bf16, as in the Pallas GEMM. ``dequant``:
    "pallas" (the memory-bound Pallas pass, ``kernel.dequantize_pallas``; GPU), "xla" (XLA's fusion of
    ``reference.dequantize``), or None: "pallas" on a GPU where the kernels cover the shape.
    """
    cdt = jnp.float16 if x.dtype == jnp.float16 else jnp.bfloat16
    kw = dict(bits=bits, group_size=group_size, in_features=in_features)
    if dequant not in (None, "pallas", "xla"):
        raise ValueError(f"dequant must be None, 'pallas' or 'xla', got {dequant!r}")
    from pallas_kernels.quant_matmul import kernel

    if dequant is None:
        dequant = "pallas" if _on_gpu() and kernel.unsupported_reason(1, packed.shape[1], **kw) is None else "xla"
    if dequant == "pallas":
        w = kernel.dequantize_pallas(packed, scales, zeros, dtype=cdt, **kw)
    else:
        w = reference.dequantize(packed, scales, zeros, **kw).astype(cdt)
    # On a GPU the GEMM writes cdt itself (fp32 accumulation, one rounding: the same numbers as an
    # fp32 result cast after, without the fp32 [M, N] round trip through HBM, which cost 0.4 ms of
    # 2.6 at M=4096, K=5120, N=34816 on an H100); elsewhere fp32 then the cast.
    out = jnp.dot(x.astype(cdt), w, preferred_element_type=cdt if _on_gpu() else jnp.float32)
    return out.astype(x.dtype)
