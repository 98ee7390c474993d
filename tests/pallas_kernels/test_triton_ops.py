"""The helpers shared by the kernel families (plain jnp here; the kernels use them under Triton)."""

import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.triton_ops import interleave


@pytest.mark.parametrize("p", [1, 2, 4, 8])
def test_interleave_puts_tile_j_row_r_at_r_p_plus_j(p):
    tiles = [jnp.asarray(np.arange(12).reshape(3, 4) + 100 * j) for j in range(p)]
    flat = np.asarray(interleave(tiles)).reshape(3, 4 * p)
    for j in range(p):
        np.testing.assert_array_equal(flat[:, j::p], np.asarray(tiles[j]))


def test_interleave_rejects_a_count_that_is_not_a_power_of_2():
    with pytest.raises(ValueError, match="power-of-2 number of arrays, got 3"):
        interleave([jnp.zeros((2, 2))] * 3)
