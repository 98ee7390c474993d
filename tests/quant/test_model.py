"""Quantized trees in the model: logits error of RTN, the group-size trend, save/load bit-identity,
and end-to-end runs (jit, generation with MTP, the vision tower, a quantized lm_head)."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qwen35_jax as Q
import quant
from qwen35_jax.api import vision_features
from qwen35_jax.generation import generate
from quant import Recipe, Rule


def _rel(a, b):
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def _all_linears(params):
    """A rule pattern selecting every quantizable linear weight (text, lm_head, MTP, vision)."""
    paths = [p for p, leaf in Q.flatten(params).items() if quant.linear_weight_problem(p, leaf) is None]
    return "|".join(re.escape(p) for p in paths)


@pytest.fixture(scope="module")
def model(numpy_params):
    """One float32 model for every test here: text + vision + MTP, with dims that group sizes
    16..128 divide (hidden 128, MLP 256, attention o_proj in 4*32, DeltaNet value dim 4*32)."""
    text = Q.tiny_text_config(hidden_size=128, intermediate_size=256, linear_num_key_heads=2,
                              linear_num_value_heads=4, linear_key_head_dim=32, linear_value_head_dim=32,
                              mtp_num_hidden_layers=1)
    cfg = Q.ModelConfig(text=text, vision=Q.tiny_vision_config(out_hidden_size=128), image_token_id=150,
                        video_token_id=151)
    params = numpy_params(cfg, seed=1)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 150, (2, 8)), jnp.int32)
    return cfg, params, ids, Q.forward(cfg, params, ids)


def test_int8_per_channel_logits_within_one_percent():
    cfg = Q.ModelConfig(text=Q.tiny_text_config(), vision=None, architecture="Qwen3_5ForCausalLM")
    params = Q.random_params(cfg, seed=1, dtype=jnp.float32)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 160, (2, 9)), jnp.int32)
    q = quant.quantize_params(params, "int8-per-channel")
    # int8 per channel over K = 64..128 Gaussian inputs: max|w| ~ 2.5 sigma, step 2*max/255 ~ 0.02
    # sigma, RMS error step/sqrt(12) ~ 0.55% of sigma per weight; the logits move by about as much
    # (measured 0.57%), so 1% holds with ~1.7x margin while a wrong scale/zero/packing gives >> 10%.
    assert _rel(Q.forward(cfg, q, ids), Q.forward(cfg, params, ids)) < 1e-2
    # the same tree dequantized computes the same function (float32 dots of the same weights, in a
    # different summation order: ~1e-6 relative)
    np.testing.assert_allclose(np.asarray(Q.forward(cfg, quant.dequantize_params(q), ids)),
                               np.asarray(Q.forward(cfg, q, ids)), rtol=1e-4, atol=1e-5)


def test_int4_error_shrinks_with_group_size(model):
    cfg, params, ids, ref = model
    flat = Q.flatten(params)
    w_err, trees = [], {}
    for gs in (128, 64, 32, 16):
        q = quant.quantize_params(params, Recipe([Rule(quant.TEXT_LINEARS, "rtn", bits=4, group_size=gs)]))
        deq = Q.flatten(quant.dequantize_params(q))
        paths = [p for p, leaf in Q.flatten(q).items() if quant.is_quantized(leaf)]
        num = sum(float(np.sum((np.asarray(deq[p]) - np.asarray(flat[p])) ** 2)) for p in paths)
        w_err.append(num / sum(float(np.sum(np.asarray(flat[p]) ** 2)) for p in paths))
        trees[gs] = q
    # weights: strictly monotone (expected ~10% less squared error per halving over ~0.4M weights:
    # the sampling noise is far smaller)
    assert all(a > b for a, b in zip(w_err, w_err[1:])), w_err
    # logits of one random input are noisier, so only compare the ends (expected ratio ~0.7)
    assert _rel(Q.forward(cfg, trees[16], ids), ref) < _rel(Q.forward(cfg, trees[128], ids), ref)


def test_save_load_bit_identical(model, tmp_path):
    cfg, params, ids, _ = model
    recipe = Recipe([Rule(r"language_model\.layers\.\d+\.mlp\.\w+_proj\.weight", "rtn", bits=3, group_size=32,
                          sym=False, clip="mse", scale_dtype="bfloat16"),
                     Rule(quant.TEXT_LINEARS, "rtn", bits=8, group_size=16)], name="mixed")
    q = quant.quantize_params(params, recipe)
    path = quant.save(tmp_path / "q", q, extra={"recipe": recipe.to_dict()})
    back = quant.load(path)
    assert jax.tree.structure(back) == jax.tree.structure(q)  # same keys (ints stay ints) and static metadata
    for a, b in zip(jax.tree.leaves(q), jax.tree.leaves(back)):
        assert a.dtype == b.dtype and np.array_equal(np.asarray(a), np.asarray(b))
    assert np.array_equal(np.asarray(Q.forward(cfg, back, ids)), np.asarray(Q.forward(cfg, q, ids)))
    assert Recipe.from_dict(quant.read_meta(path)["extra"]["recipe"]) == recipe
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        quant.save(path, q)


def test_end_to_end_everything_quantized(model):
    """lm_head, MTP and vision linears quantized too: forward under an outer jit, greedy generation,
    the MTP input projection and the vision tower."""
    cfg, params, ids, _ = model
    q = quant.quantize_params(params, Recipe([Rule(_all_linears(params), "rtn", bits=8, group_size=16)]))
    assert quant.is_quantized(q["lm_head"]["weight"]) and quant.is_quantized(q["mtp"]["fc"]["weight"])
    assert quant.is_quantized(q["visual"]["blocks"][0]["attn"]["qkv"]["weight"])
    deq = quant.dequantize_params(q)

    fwd = jax.jit(Q.forward, static_argnums=0)
    # float32 everywhere: quantized and dequantized trees differ only in summation order (~1e-6)
    np.testing.assert_allclose(np.asarray(fwd(cfg, q, ids)), np.asarray(fwd(cfg, deq, ids)), rtol=1e-4, atol=1e-5)

    out = generate(cfg, q, [[3, 5, 7, 11], [2, 4]], max_new_tokens=3)
    assert [len(t) for t in out.tokens] == [3, 3]

    x = jnp.asarray(np.random.default_rng(1).standard_normal((1, 3, 2 * cfg.text.hidden_size)), jnp.float32)
    mtp_fc = lambda p: Q.model.bind(cfg, p).mtp.fc(x)  # noqa: E731  (used only by speculative decoding)
    np.testing.assert_allclose(np.asarray(mtp_fc(q)), np.asarray(mtp_fc(deq)), rtol=1e-4, atol=1e-5)

    grid = np.array([[1, 4, 4]])
    pixels = np.random.default_rng(3).standard_normal((16, cfg.vision.patch_dim)).astype(np.float32)
    fq, fd = vision_features(cfg, q, pixels, grid), vision_features(cfg, deq, pixels, grid)
    np.testing.assert_allclose(np.asarray(fq), np.asarray(fd), rtol=1e-4, atol=1e-5)  # same weights, f32
