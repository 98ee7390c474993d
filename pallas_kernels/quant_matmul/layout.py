"""The packed layout of integer weight codes that the quant_matmul kernels read.

One layout for every bit width, chosen for the kernels (the public GPTQ layout is converted to and
from it by the format readers/writers in ``quant/formats``):

* Orientation ``[K, N]`` (input dim first), so a kernel tile of ``N`` columns is contiguous.
* ``p = 32 // bits`` codes per ``uint32`` word (2 bits -> 16, 3 bits -> 10 with 2 bits unused,
  4 bits -> 8, 8 bits -> 4).
* **Strided ("slab") packing.** The padded input dim ``Kp = p * S`` is split into ``p`` slabs of
  ``S`` rows; bit field ``j`` (bits ``[j*bits, (j+1)*bits)``) of word ``[r, n]`` holds the code of
  row ``k = j * S + r``. A kernel that loads a ``[R, bn]`` tile of words therefore gets ``p``
  contiguous ``[R, bn]`` row blocks of the weight (one per shift) and multiplies each by a
  contiguous slice of ``x``; no in-register interleaving is needed (the trick of Marlin-style
  kernels, here done with slabs instead of a permutation inside a tile).
* ``S`` is a multiple of 16 (the smallest tensor-core dot depth) and either a multiple or a divisor
  of the group size, so no quantization group straddles a slab boundary and every row block of a
  kernel (``R`` rows, a power of 2 dividing both) lies in one group. Among such ``S`` the smallest
  ``>= ceil(K / p)`` is taken: a small ``K`` (e.g. 512 at 4 bits, g128: ``S = 64``) is not padded up
  to a whole group per slab. Rows ``k >= K`` are padding: code 0 and scale 0 (they dequantize to 0);
  when ``S`` divides the group size, ``K`` is a multiple of ``S`` and padding is whole slabs.
* Scales and zero points: ``[ceil(Kp / group_size), N]``; per-channel quantization is
  ``group_size == K`` (one group: ``[1, N]``).
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

SUPPORTED_BITS = (2, 3, 4, 8)
MIN_DOT_DEPTH = 16


def codes_per_word(bits: int) -> int:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"unsupported bit width {bits}; supported: {SUPPORTED_BITS}")
    return 32 // bits


def slab_rows(in_features: int, bits: int, group_size: int) -> int:
    """``S``: rows per slab for an input dim ``in_features`` (``Kp = codes_per_word(bits) * S``)."""
    p = codes_per_word(bits)
    if in_features <= 0:
        raise ValueError(f"in_features must be positive, got {in_features}")
    if group_size <= 0 or in_features % group_size:
        raise ValueError(
            f"group_size {group_size} does not divide the input dim {in_features}"
        )
    need = -(-in_features // p)
    if group_size == in_features:  # per-channel: one group over all of K, only the dot-depth alignment
        return -(-need // MIN_DOT_DEPTH) * MIN_DOT_DEPTH
    # Slabs no larger than a group: the smallest multiple of 16 dividing the group size that holds K.
    for s in range(MIN_DOT_DEPTH, group_size + 1, MIN_DOT_DEPTH):
        if s >= need and group_size % s == 0:
            return s
    align = math.lcm(group_size, MIN_DOT_DEPTH)  # else whole groups per slab
    return -(-need // align) * align


def padded_in_features(in_features: int, bits: int, group_size: int) -> int:
    """``Kp``, the input dim including padding rows."""
    return codes_per_word(bits) * slab_rows(in_features, bits, group_size)


def num_groups(in_features: int, bits: int, group_size: int) -> int:
    """Rows of the scale/zero arrays: ``ceil(Kp / group_size)`` (1 for per-channel)."""
    if group_size == in_features:
        return 1
    return -(-padded_in_features(in_features, bits, group_size) // group_size)


def pack(codes, bits: int, group_size: int):
    """Pack integer codes ``[K, N]`` (values in ``[0, 2**bits)``) into ``uint32 [S, N]``.

    Works on numpy arrays and on (traced) jax arrays; returns the same kind.
    """
    xp = np if isinstance(codes, np.ndarray) else jnp
    if codes.ndim != 2:
        raise ValueError(f"codes must be [K, N], got shape {tuple(codes.shape)}")
    k, n = codes.shape
    p = codes_per_word(bits)
    s = slab_rows(k, bits, group_size)
    c = codes.astype(xp.uint32)
    c = xp.pad(c, ((0, p * s - k), (0, 0)))
    c = c.reshape(p, s, n)
    shifts = (xp.arange(p, dtype=xp.uint32) * bits).reshape(p, 1, 1)
    words = c << shifts
    # The fields are disjoint, so a sum is an OR (and reduces in one op for numpy and XLA).
    return words.sum(axis=0, dtype=xp.uint32)


def unpack(packed, bits: int, in_features: int):
    """Inverse of ``pack``: ``uint32 [S, N]`` -> codes ``uint8 [K, N]`` (padding rows dropped)."""
    xp = np if isinstance(packed, np.ndarray) else jnp
    if packed.ndim != 2:
        raise ValueError(f"packed must be [S, N], got shape {tuple(packed.shape)}")
    p = codes_per_word(bits)
    s, n = packed.shape
    if p * s < in_features:
        raise ValueError(
            f"packed words [{s}, {n}] hold {p * s} rows at {bits} bits, fewer than in_features "
            f"{in_features}"
        )
    shifts = (xp.arange(p, dtype=xp.uint32) * bits).reshape(p, 1, 1)
    mask = xp.uint32((1 << bits) - 1)
    codes = (packed.astype(xp.uint32)[None] >> shifts) & mask
    return codes.reshape(p * s, n)[:in_features].astype(xp.uint8)


def expand_groups(a, group_size: int, in_features: int):
    """Repeat per-group rows ``[G, N]`` to per-input-row ``[K, N]`` (per-channel: ``G == 1``)."""
    xp = np if isinstance(a, np.ndarray) else jnp
    if a.shape[0] == 1:
        return xp.broadcast_to(a, (in_features,) + tuple(a.shape[1:]))
    return xp.repeat(a, group_size, axis=0)[:in_features]
