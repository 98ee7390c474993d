"""model.fuse_projections: the decode layout with one weight per group of projections that read the
same input (q/k/v, the DeltaNet's in_proj_*, gate/up). Same outputs, same generations, a lossless
round trip, and clear errors where the layout does not apply."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qwen35_jax as Q
import quant
from qwen35_jax import generation as G
from qwen35_jax import model as M
from qwen35_jax import sharding


@pytest.fixture(scope="module")
def tiny():
    cfg = Q.ModelConfig(text=Q.tiny_text_config(mtp_num_hidden_layers=1), vision=None,
                        architecture="Qwen3_5ForCausalLM")
    return cfg, Q.random_params(cfg, seed=3, dtype=jnp.float32)


def _leaves_equal(a, b):
    fa, fb = M.flatten(a), M.flatten(b)
    return fa.keys() == fb.keys() and all(np.array_equal(np.asarray(fa[k]), np.asarray(fb[k])) for k in fa)


def test_fused_layout_names_and_shapes(tiny):
    cfg, params = tiny
    fused = Q.fuse_projections(params)
    assert Q.is_fused(fused) and not Q.is_fused(params)
    specs = M.param_specs(cfg, jnp.float32, fused=True)
    flat = M.flatten(fused)
    assert {k: tuple(v.shape) for k, v in flat.items()} == {k: tuple(v.shape) for k, v in specs.items()}
    t = cfg.text
    layer0 = fused["language_model"]["layers"][0]  # layer 0 is a DeltaNet layer
    assert layer0["linear_attn"]["in_proj_qkvzba"]["weight"].shape == (
        t.linear_conv_dim + t.linear_value_dim + 2 * t.linear_num_value_heads, t.hidden_size)
    assert layer0["mlp"]["gate_up_proj"]["weight"].shape == (2 * t.intermediate_size, t.hidden_size)
    assert "qkv_proj" in fused["mtp"]["layers"][0]["self_attn"]
    assert "q_proj" in params["mtp"]["layers"][0]["self_attn"]  # the input tree is untouched


def test_fused_forward_equals_separate(tiny):
    cfg, params = tiny
    ids = jnp.asarray(np.random.default_rng(0).integers(0, cfg.text.vocab_size, (2, 21)))
    ref = np.asarray(Q.forward(cfg, params, ids))
    out = np.asarray(Q.forward(cfg, Q.fuse_projections(params), ids))
    # Each output column is the same float32 dot product (K = 64 terms); only the summation order
    # inside the bigger matmul can differ: a few ulps (~1e-7 relative) per dot, carried through 4
    # layers. 1e-5 of the largest logit is far below any real mistake (a wrong split is O(1)).
    assert np.max(np.abs(out - ref)) <= 1e-5 * np.max(np.abs(ref))


def test_fused_generation_and_mtp_equal_separate(tiny):
    cfg, params = tiny
    fused = Q.fuse_projections(params)
    prompts = [[1, 2, 3, 4, 5, 6, 7], [9, 8]]
    plain = G.generate(cfg, params, prompts, max_new_tokens=16).tokens
    assert G.generate(cfg, fused, prompts, max_new_tokens=16).tokens == plain
    assert G.generate(cfg, fused, prompts, max_new_tokens=16, num_draft_tokens=2).tokens == plain


def test_round_trip_and_checkpoint(tiny, tmp_path):
    cfg, params = tiny
    fused = Q.fuse_projections(params)
    assert _leaves_equal(Q.unfuse_projections(cfg, fused), params)  # slices of a concat: exact
    Q.save_params(tmp_path, cfg, fused)  # the writer splits back into the HF names
    loaded = Q.load_params(tmp_path, cfg, dtype=None).params
    assert _leaves_equal(loaded, params)


def test_delete_inputs_frees_the_separate_weights(tiny):
    cfg, params = tiny
    copy = jax.tree.map(jnp.array, params)
    gate = copy["language_model"]["layers"][0]["mlp"]["gate_proj"]["weight"]
    norm = copy["language_model"]["norm"]["weight"]
    fused = Q.fuse_projections(copy, delete_inputs=True)
    assert gate.is_deleted() and not norm.is_deleted()  # only the fused groups' inputs go
    assert _leaves_equal(Q.unfuse_projections(cfg, fused), params)


def test_fused_tree_shards(tiny):
    cfg, params = tiny
    mesh = sharding.make_mesh(data=2, model=4)
    fused = Q.fuse_projections(params)
    placed = sharding.shard_params(fused, cfg, mesh)
    w = placed["language_model"]["layers"][0]["mlp"]["gate_up_proj"]["weight"]
    assert w.sharding.spec == jax.sharding.PartitionSpec(None, None)  # the "fused" rule: replicated
    ids = jnp.asarray(np.random.default_rng(1).integers(0, cfg.text.vocab_size, (2, 9)))
    np.testing.assert_allclose(np.asarray(Q.forward(cfg, placed, ids)), np.asarray(Q.forward(cfg, fused, ids)),
                               rtol=0, atol=1e-5 * float(np.max(np.abs(np.asarray(Q.forward(cfg, fused, ids))))))


def test_bad_fusions(tiny):
    cfg, params = tiny
    fused = Q.fuse_projections(params)
    with pytest.raises(ValueError, match="already fused"):
        Q.fuse_projections(fused)
    mixed = M.unflatten({**M.flatten(params), **{k: v for k, v in M.flatten(fused).items() if ".layers.0." in k}})
    mixed = M.unflatten({k: v for k, v in M.flatten(mixed).items()
                         if not (".layers.0.mlp.gate_proj" in k or ".layers.0.mlp.up_proj" in k
                                 or ".layers.0.linear_attn.in_proj_" in k and "qkvzba" not in k)})
    with pytest.raises(ValueError, match="mixes fused"):
        Q.is_fused(mixed)
    quantized = quant.quantize_params(params, "int8-per-channel")
    with pytest.raises(TypeError, match=r"layers\.0\.linear_attn\.in_proj_qkv\.weight is a QuantizedWeight: only float weights"):
        Q.fuse_projections(quantized)
    with pytest.raises(quant.RecipeError, match="fused projection"):
        quant.quantize_params(fused, "int8-per-channel")
    partial = M.unflatten({k: v for k, v in M.flatten(params).items() if ".layers.1.mlp.up_proj" not in k})
    with pytest.raises(ValueError, match=r"layers\.1\.mlp: has \['gate_proj'\] but not \['up_proj'\]"):
        Q.fuse_projections(partial)


def test_linear_rounds_once_from_float32():
    # layers.linear accumulates in float32 and rounds once to the input dtype, whichever result type
    # it asks of the GEMM (bf16 on a GPU, where cuBLAS rounds its fp32 accumulator once; f32 then a
    # cast elsewhere). Against numpy's float64 product rounded to bf16: at most one bf16 ulp apart
    # (fp32 summation over K=512 moves the value by ~512 * 2^-24 relative, far below the ulp of
    # 2^-8..2^-7, so it can only flip a rounding at a boundary), and equal almost everywhere; a
    # bf16 accumulator (~2^-8 relative per add) or a second rounding in bf16 would fail both.
    from qwen35_jax import layers as L

    assert L.gemm_out_dtype(jnp.float32) == jnp.float32
    expect = jnp.bfloat16 if jax.default_backend() == "gpu" else jnp.float32
    assert L.gemm_out_dtype(jnp.bfloat16) == expect
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((4, 512)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((48, 512)), jnp.bfloat16)
    y = L.linear(x, w)
    assert y.dtype == jnp.bfloat16
    exact = np.asarray(x, np.float64) @ np.asarray(w, np.float64).T
    rounded = np.asarray(jnp.asarray(exact, jnp.bfloat16), np.float64)
    got = np.asarray(y, np.float64)
    ulp = 2.0 ** (np.floor(np.log2(np.abs(rounded) + 1e-30)) - 7)  # bf16: 8 significant bits
    assert np.all(np.abs(got - rounded) <= ulp)
    assert (got != rounded).mean() < 0.01
