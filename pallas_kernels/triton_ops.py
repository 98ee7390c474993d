"""Array helpers shared by the Pallas kernel families, written in the subset of jnp that the Triton
lowering of `pl.pallas_call` accepts (every op here also runs in interpret mode)."""

from __future__ import annotations

import jax.numpy as jnp


def interleave(tiles):
    """p (a power of 2) arrays [..., R] -> [..., R, 2, ..., 2] (log2 p trailing axes of 2) whose
    flattening puts tiles[j][..., r] at r * p + j. Built from two-way stacks on a new last axis
    (the only stack the Triton lowering has, `tt.join`): each level pairs the tiles whose indices
    differ in the highest remaining bit, so the lowest bit of j ends up as the last axis."""
    p = len(tiles)
    if p < 1 or p & (p - 1):
        raise ValueError(f"interleave takes a power-of-2 number of arrays, got {p}")
    while len(tiles) > 1:
        half = len(tiles) // 2
        tiles = [jnp.stack([tiles[i], tiles[i + half]], axis=-1) for i in range(half)]
    return tiles[0]
