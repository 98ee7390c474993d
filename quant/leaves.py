"""Quantized weight leaves: pytree dataclasses that stand in for a float ``[out, in]`` weight.

A leaf carries the packed integer codes in the kernel layout of
``pallas_kernels/quant_matmul/layout.py`` (``[K, N]`` orientation, strided "slab" packing into
``uint32`` words), its group scales and optional zero points, an optional act-order input
permutation, and static metadata. The model never looks inside: ``qwen35_jax.layers.linear``
calls ``w.apply_linear(x)`` on any leaf that has it.

Shapes: K in features, N out features (the float weight is HF ``[N, K]``), Kp padded K,
S = Kp // (32 // bits) packed word rows, G = Kp // group_size groups (1 for per-channel).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.quant_matmul import layout

SUPPORTED_BITS = layout.SUPPORTED_BITS
SCALE_DTYPES = ("float16", "bfloat16", "float32")


def _static(**kw):
    return dataclasses.field(metadata=dict(static=True), **kw)


def dtype_name(dtype) -> str:
    """Canonical dtype name (``"bfloat16"``, ``"float32"``, ...): hashable and JSON-friendly."""
    return np.dtype(jnp.dtype(dtype)).name


@dataclasses.dataclass(frozen=True)
class QuantizedWeight:
    """A weight-only integer-quantized linear weight (GPTQ/RTN family), logically ``[N, K]``.

    Children (arrays, traced under jit):
      packed: ``uint32 [S, N]``, codes of the *stored* rows (see ``perm``), slab-packed.
      scales: ``[G, N]`` float16/bfloat16/float32; padding groups have scale 0.
      zeros: ``uint8 [G, N]`` zero points, or None for symmetric (implicit ``2**(bits-1)``,
        GPTQ's ``(maxq + 1) / 2``).
      perm: ``int32 [K]`` or None. Act-order (GPTQ ``desc_act``): stored row ``j`` is input
        feature ``perm[j]``, so ``x[..., perm] @ W_stored == x @ W.T``.
    Static metadata (part of the pytree structure, so it is a jit cache key):
      bits, group_size (``== in_features`` for per-channel), in_features, out_features,
      method (the quantizer that produced it, e.g. ``"rtn"``), orig_dtype (name of the float
      weight's dtype; ``dequantize`` returns it).
    Optional low-rank adapter (EoRA, ``quant/eora.py``; None when absent):
      lora_a: ``[r, K]`` and lora_b: ``[N, r]``, so the weight is ``W_q + lora_b @ lora_a`` and
      ``apply_linear`` adds ``(x @ lora_a.T) @ lora_b.T`` (PEFT/GPTQModel ``lora_A``/``lora_B``).

    Build leaves with :meth:`from_codes` (it pads, packs and validates shapes); the raw
    constructor only checks the static fields, because JAX rebuilds leaves with placeholder
    children (tracers, ShapeDtypeStructs, shardings) through it.
    """

    packed: Any
    scales: Any
    zeros: Any
    perm: Any
    bits: int = _static()
    group_size: int = _static()
    in_features: int = _static()
    out_features: int = _static()
    method: str = _static(default="rtn")
    orig_dtype: str = _static(default="float32")
    lora_a: Any = None
    lora_b: Any = None

    def __post_init__(self):
        for name in ("bits", "group_size", "in_features", "out_features"):
            v = getattr(self, name)
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool):
                raise TypeError(f"QuantizedWeight.{name} must be an int, got {v!r}")
            object.__setattr__(self, name, int(v))
        if self.bits not in SUPPORTED_BITS:
            raise ValueError(f"unsupported bit width {self.bits}; supported: {SUPPORTED_BITS}")
        if self.in_features <= 0 or self.out_features <= 0:
            raise ValueError(f"in/out features must be positive, got {self.in_features}/{self.out_features}")
        if self.group_size <= 0 or self.in_features % self.group_size:
            raise ValueError(
                f"group size {self.group_size} does not divide in_features {self.in_features}"
            )
        object.__setattr__(self, "orig_dtype", dtype_name(self.orig_dtype))

    # ------------------------------------------------------------------ array-like properties

    @property
    def shape(self) -> tuple[int, int]:
        """The logical float weight shape ``(N, K)`` (HF ``[out, in]``)."""
        return (self.out_features, self.in_features)

    @property
    def dtype(self) -> np.dtype:
        """The dtype of the float weight this leaf replaces (what ``dequantize`` returns)."""
        return jnp.dtype(self.orig_dtype)

    @property
    def ndim(self) -> int:
        return 2

    @property
    def size(self) -> int:
        return self.out_features * self.in_features

    @property
    def lora_rank(self) -> int:
        """Rank of the attached low-rank adapter (0 without one)."""
        return 0 if self.lora_a is None else int(self.lora_a.shape[0])

    def with_lora(self, lora_a, lora_b) -> "QuantizedWeight":
        """This leaf with a low-rank adapter ``lora_a [r, K]``, ``lora_b [N, r]`` attached (or
        replaced; pass None, None to drop it)."""
        return dataclasses.replace(self, lora_a=lora_a, lora_b=lora_b).validate()

    @property
    def per_channel(self) -> bool:
        return self.group_size == self.in_features

    @property
    def padded_in_features(self) -> int:
        return layout.padded_in_features(self.in_features, self.bits, self.group_size)

    @property
    def num_groups(self) -> int:
        return layout.num_groups(self.in_features, self.bits, self.group_size)

    def __repr__(self) -> str:
        extra = ("asym" if self.zeros is not None else "sym") + (", act-order" if self.perm is not None else "")
        if self.lora_a is not None:
            extra += f", lora r{self.lora_rank}"
        g = "per-channel" if self.per_channel else f"g{self.group_size}"
        scale_dtype = getattr(self.scales, "dtype", "?")
        return (f"QuantizedWeight({self.method}, int{self.bits} {g} {extra}, shape={self.shape}, "
                f"dtype={self.orig_dtype}, scales={scale_dtype})")

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_codes(cls, codes, scales, zeros=None, perm=None, *, bits: int, group_size: int | None,
                   method: str, dtype) -> "QuantizedWeight":
        """Pack unpadded codes into a leaf.

        codes: integer ``[K, N]`` in ``[0, 2**bits)``, rows in *stored* order (after ``perm``).
        scales: ``[K // group_size, N]`` (the real groups; padding groups get scale 0 here).
        zeros: ``[K // group_size, N]`` integers or None (symmetric).
        perm: ``[K]`` permutation or None. dtype: the original float weight's dtype.
        group_size: None or -1 means per-channel (``K``).
        """
        k, n = codes.shape
        gs = normalize_group_size(group_size, k)
        _check_bits_group(bits, gs, k)
        g_real = k // gs
        g_pad = layout.num_groups(k, bits, gs)
        if tuple(scales.shape) != (g_real, n):
            raise ValueError(f"scales must be [K/group_size={g_real}, N={n}], got {tuple(scales.shape)}")
        if str(jnp.dtype(scales.dtype)) not in SCALE_DTYPES:
            raise ValueError(f"scales must be one of {SCALE_DTYPES}, got {scales.dtype}")
        scales = jnp.pad(jnp.asarray(scales), ((0, g_pad - g_real), (0, 0)))  # padding groups: scale 0
        if zeros is not None:
            if tuple(zeros.shape) != (g_real, n):
                raise ValueError(f"zeros must be [K/group_size={g_real}, N={n}], got {tuple(zeros.shape)}")
            zeros = jnp.pad(jnp.asarray(zeros).astype(jnp.uint8), ((0, g_pad - g_real), (0, 0)))
        if perm is not None:
            perm = jnp.asarray(perm, jnp.int32)
            if perm.shape != (k,):
                raise ValueError(f"perm must be [K={k}], got {tuple(perm.shape)}")
        packed = layout.pack(codes, bits, gs)
        leaf = cls(packed, scales, zeros, perm, bits=bits, group_size=gs, in_features=k, out_features=n,
                   method=method, orig_dtype=dtype_name(dtype))
        leaf.validate()
        return leaf

    def validate(self) -> "QuantizedWeight":
        """Check the children's shapes and dtypes against the static metadata (raises ValueError)."""
        k, n = self.in_features, self.out_features
        s = layout.slab_rows(k, self.bits, self.group_size)
        g = self.num_groups
        where = f"{self!r}"

        def check(name, a, shape, dtypes):
            if tuple(a.shape) != shape:
                raise ValueError(f"{where}: {name} has shape {tuple(a.shape)}, expected {shape}")
            if str(jnp.dtype(a.dtype)) not in dtypes:
                raise ValueError(f"{where}: {name} has dtype {a.dtype}, expected one of {dtypes}")

        check("packed", self.packed, (s, n), ("uint32",))
        check("scales", self.scales, (g, n), SCALE_DTYPES)
        if self.zeros is not None:
            check("zeros", self.zeros, (g, n), ("uint8",))
        if self.perm is not None:
            check("perm", self.perm, (k,), ("int32",))
        if (self.lora_a is None) != (self.lora_b is None):
            raise ValueError(f"{where}: lora_a and lora_b must be both set or both None")
        if self.lora_a is not None:
            r = self.lora_a.shape[0] if self.lora_a.ndim == 2 else -1
            check("lora_a", self.lora_a, (r, k), SCALE_DTYPES)
            check("lora_b", self.lora_b, (n, r), SCALE_DTYPES)
        return self

    # ------------------------------------------------------------------ math

    def dequantize_stored(self) -> jax.Array:
        """float32 ``[K, N]`` in stored (permuted) row order, padding dropped:
        ``(code - zero) * scale``, exact in float32 (an integer of <= 9 bits times a scale)."""
        codes = layout.unpack(self.packed, self.bits, self.in_features).astype(jnp.float32)
        scale = layout.expand_groups(self.scales.astype(jnp.float32), self.group_size, self.in_features)
        if self.zeros is None:
            zero = jnp.float32(2 ** (self.bits - 1))
        else:
            zero = layout.expand_groups(self.zeros.astype(jnp.float32), self.group_size, self.in_features)
        return (codes - zero) * scale

    def dequantize(self) -> jax.Array:
        """The float weight ``[N, K]`` in the original dtype, un-permuted: a drop-in for the
        float leaf this one replaced."""
        w_kn = self.dequantize_stored()
        if self.perm is not None:
            # stored row j is input feature perm[j]: scatter it back to row perm[j]
            w_kn = jnp.zeros_like(w_kn).at[self.perm].set(w_kn, unique_indices=True)
        w = w_kn.T
        if self.lora_a is not None:
            w = w + jnp.dot(self.lora_b.astype(jnp.float32), self.lora_a.astype(jnp.float32),
                            precision=jax.lax.Precision.HIGHEST)
        return w.astype(self.dtype)

    def apply_linear(self, x: jax.Array, *, implementation: str | None = None) -> jax.Array:
        """``x @ W.T`` for x ``[..., K]`` -> ``[..., N]`` in ``x.dtype`` (the kernel accumulates in
        float32). Act-order leaves gather the input features into stored order first."""
        from pallas_kernels.quant_matmul import quant_matmul

        if x.shape[-1] != self.in_features:
            raise ValueError(f"x has {x.shape[-1]} features, {self!r} expects {self.in_features}")
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)  # [M, K]
        if self.perm is not None:
            x2 = jnp.take(x2, self.perm, axis=1)
        y = quant_matmul(x2, self.packed, self.scales, self.zeros, bits=self.bits, group_size=self.group_size,
                         in_features=self.in_features, implementation=implementation)
        if self.lora_a is not None:  # the low-rank adapter on the un-permuted input, f32 accumulation
            x_in = x.reshape(-1, self.in_features)
            hi = jax.lax.Precision.HIGHEST
            xa = jnp.dot(x_in, self.lora_a.astype(x_in.dtype).T, precision=hi, preferred_element_type=jnp.float32)
            y = (y.astype(jnp.float32) + jnp.dot(xa, self.lora_b.astype(jnp.float32).T, precision=hi,
                                                 preferred_element_type=jnp.float32)).astype(y.dtype)
        return y.reshape(*lead, self.out_features)

    # ------------------------------------------------------------------ size accounting

    def storage_bits(self) -> int:
        """Bits held by the children: packed words (with padding), scales, zeros, perm and the
        low-rank adapter."""
        return sum(int(math.prod(a.shape)) * jnp.dtype(a.dtype).itemsize * 8
                   for a in (self.packed, self.scales, self.zeros, self.perm, self.lora_a, self.lora_b)
                   if a is not None)


jax.tree_util.register_dataclass(QuantizedWeight)


def is_quantized(x) -> bool:
    """True for any quantized leaf type (anything that brings its own matmul and dequantize)."""
    return hasattr(x, "apply_linear") and hasattr(x, "dequantize")


def normalize_group_size(group_size: int | None, in_features: int) -> int:
    """None or -1 (GPTQ's per-channel spelling) -> in_features."""
    if group_size is None or group_size == -1:
        return in_features
    return int(group_size)


def _check_bits_group(bits: int, group_size: int, in_features: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"unsupported bit width {bits}; supported: {SUPPORTED_BITS}")
    if group_size <= 0 or in_features % group_size:
        raise ValueError(f"group size {group_size} does not divide the input dim {in_features}")


def dequantize(leaf) -> jax.Array:
    """``leaf.dequantize()`` for quantized leaves; float arrays pass through."""
    return leaf.dequantize() if is_quantized(leaf) else leaf


# ------------------------------------------------------------------------------------------------
# Bits per weight
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class BitsSummary:
    """Storage cost of a parameter tree, in bits.

    quantized_*: over quantized leaves only (codes incl. padding, scales, zeros, perm);
    total_*: over every leaf, float leaves at ``itemsize * 8`` bits per element.
    ``*_params`` count logical weights (a quantized ``[N, K]`` leaf counts ``N * K``).
    """

    quantized_params: int
    quantized_bits: int
    total_params: int
    total_bits: int

    @property
    def quantized_bits_per_weight(self) -> float:
        return self.quantized_bits / self.quantized_params if self.quantized_params else float("nan")

    @property
    def total_bits_per_weight(self) -> float:
        return self.total_bits / self.total_params if self.total_params else float("nan")

    @property
    def total_bytes(self) -> int:
        return self.total_bits // 8


def average_bits(tree) -> BitsSummary:
    """Bits per weight of the quantized leaves (with all their overheads) and of the whole tree."""
    q_params = q_bits = t_params = t_bits = 0
    for leaf in jax.tree.leaves(tree, is_leaf=is_quantized):
        n = int(math.prod(leaf.shape))
        if is_quantized(leaf):
            b = leaf.storage_bits()
            q_params += n
            q_bits += b
        else:
            b = n * jnp.dtype(leaf.dtype).itemsize * 8
        t_params += n
        t_bits += b
    return BitsSummary(q_params, q_bits, t_params, t_bits)
