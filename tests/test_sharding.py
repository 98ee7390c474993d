"""Sharded == unsharded on an emulated 8-device CPU mesh (conftest sets the device count)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from qwen35_jax import api, checkpoint, generation, sharding
from qwen35_jax import model as M
from qwen35_jax.config import ModelConfig, tiny_text_config

pytestmark = pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 (emulated) devices: "
                                "XLA_FLAGS=--xla_force_host_platform_device_count=8 before jax starts")

# fp32 everywhere: a sharded matmul only changes the order of the reduction over the split input dim
# (partial sums + all-reduce). With K <= 96 terms of O(1) products the reassociation error is a few
# ulp (~1e-7 relative) per layer; 4 layers and the final head keep it well under 1e-5.
RTOL = 1e-5


@pytest.fixture(scope="module")
def setup():
    cfg = ModelConfig(text=tiny_text_config(), vision=None)
    params = M.random_params(cfg, seed=3, dtype=jnp.float32)
    ids = np.random.default_rng(0).integers(0, cfg.text.vocab_size, size=(2, 37)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, :5] = 0  # left padding in one row
    return cfg, params, ids, mask


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.abs(a - b).max() / np.abs(b).max()


def test_spec_rules_divisibility_and_errors():
    mesh = sharding.make_mesh(data=2, model=4)
    assert sharding.spec_for(("mlp", "embed"), (96, 64), mesh) == P("model", None)
    assert sharding.spec_for(("gdn_heads", "embed"), (6, 64), mesh) == P(None, None)  # 6 % 4: replicate
    assert sharding.spec_for(("embed", "o_heads"), (64, 128), mesh) == P(None, "model")
    with pytest.raises(ValueError, match="no sharding rule for logical axis 'nope'"):
        sharding.spec_for(("nope",), (8,), mesh)
    with pytest.raises(ValueError, match="has no axis 'tp'"):
        sharding.param_sharding(ModelConfig(text=tiny_text_config(), vision=None), mesh, {"mlp": "tp"})
    with pytest.raises(ValueError, match="needs 16 devices"):
        sharding.make_mesh(data=2, model=8)


def test_sharded_forward_matches_unsharded(setup):
    cfg, params, ids, mask = setup
    ref = api.forward(cfg, params, ids, mask)
    mesh = sharding.make_mesh(data=2, model=4)
    sharded = sharding.shard_params(params, cfg, mesh)
    specs = sharding.describe(sharded)
    assert specs["language_model.layers.0.mlp.gate_proj.weight"] == str(P("model", None))
    assert specs["language_model.layers.0.mlp.down_proj.weight"] == str(P(None, "model"))
    assert specs["language_model.layers.3.self_attn.q_proj.weight"] == str(P("model", None))
    x_sh = sharding.batch_sharding(mesh)
    out = api.forward(cfg, sharded, jax.device_put(ids, x_sh), jax.device_put(mask, x_sh))
    assert len(out.sharding.device_set) == 8
    assert _rel(out, ref) < RTOL


def test_loader_places_each_tensor_into_its_shards(hf_checkpoints):
    path, _ = hf_checkpoints("gva3", "causal")
    cfg, ref = checkpoint.load_checkpoint(path, jnp.float32)
    mesh = sharding.make_mesh(data=1, model=8)
    placement = sharding.param_sharding(cfg, mesh)
    result = checkpoint.load_params(path, cfg, dtype=jnp.float32, sharding=placement)
    flat, flat_ref = M.flatten(result.params), M.flatten(ref)
    up = flat["language_model.layers.0.mlp.up_proj.weight"]
    assert isinstance(up.sharding, NamedSharding) and up.sharding.spec == P("model", None)
    # each device holds 1/8 of the rows, not a full copy
    assert {s.data.shape for s in up.addressable_shards} == {(up.shape[0] // 8, up.shape[1])}
    for name, arr in flat.items():
        np.testing.assert_array_equal(np.asarray(arr), np.asarray(flat_ref[name]), err_msg=name)


def test_sharded_greedy_generation_matches(setup):
    cfg, params, ids, _ = setup
    prompts = [list(map(int, ids[0, :9])), list(map(int, ids[1, :17]))]
    ref = generation.generate(cfg, params, prompts, max_new_tokens=6, sampling="greedy")
    mesh = sharding.make_mesh(data=1, model=4)
    sharded = sharding.shard_params(params, cfg, mesh)
    out = generation.generate(cfg, sharded, prompts, max_new_tokens=6, sampling="greedy")
    assert out.tokens == ref.tokens


@pytest.mark.parametrize("recipe", ["int8-per-channel", "int4-g32"])
def test_sharded_quantized_forward_matches_unsharded(setup, recipe):
    import quant

    cfg, params, ids, mask = setup
    qparams = quant.quantize_params(params, recipe)
    ref = api.forward(cfg, qparams, ids, mask)
    mesh = sharding.make_mesh(data=2, model=4)
    sharded = sharding.shard_params(qparams, cfg, mesh)
    up = M.flatten(sharded)["language_model.layers.0.mlp.up_proj.weight"]
    # packed words [S, N] and scales [G, N] split along N like the float weight's output dim
    assert up.packed.sharding.spec == P(None, "model") and up.scales.sharding.spec == P(None, "model")
    x_sh = sharding.batch_sharding(mesh)
    out = api.forward(cfg, sharded, jax.device_put(ids, x_sh), jax.device_put(mask, x_sh))
    assert _rel(out, ref) < RTOL  # same reasoning as the float case: only the reduction order changes
