"""Fixtures of the quant tests."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

import qwen35_jax as Q


def _numpy_params(cfg, seed: int = 0):
    """``random_params``' distributions (by ``init_kind``) drawn with numpy, float32: the same
    semantics without its per-shape compilations (~10 s for a config with vision on 2 cores)."""
    rng = np.random.default_rng(seed)
    flat = {}
    for name, spec in Q.param_specs(cfg, jnp.float32).items():
        kind = Q.model.init_kind(name, len(spec.shape))
        if kind in ("ones", "zeros"):
            v = np.full(spec.shape, 1.0 if kind == "ones" else 0.0)
        elif kind == "log_uniform_1_16":
            v = np.log(rng.uniform(1.0, 16.0, spec.shape))
        else:
            v = 0.02 * rng.standard_normal(spec.shape)
        flat[name] = jnp.asarray(v, jnp.float32)
    return Q.unflatten(flat)


@pytest.fixture(scope="session")
def numpy_params():
    return _numpy_params
