"""The abstract 27B parameter tree equals transformers' Qwen3_5ForConditionalGeneration, name by name and
shape by shape, without allocating either model (ours through nnx.eval_shape, theirs on torch's meta
device)."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import pytest
import torch

import qwen35_jax as Q
from qwen35_jax.checkpoint import to_hf_name

TEXT_27B = dict(
    vocab_size=248320, hidden_size=5120, intermediate_size=17408, num_hidden_layers=64, num_attention_heads=24,
    num_key_value_heads=4, head_dim=256, linear_num_key_heads=16, linear_num_value_heads=48, linear_key_head_dim=128,
    linear_value_head_dim=128, linear_conv_kernel_dim=4, max_position_embeddings=262144, rms_norm_eps=1e-6,
    rope_parameters={"rope_type": "default", "rope_theta": 10_000_000, "partial_rotary_factor": 0.25,
                     "mrope_section": [11, 11, 10], "mrope_interleaved": True},
)


@pytest.fixture(scope="module")
def hf_27b():
    from transformers import Qwen3_5Config, Qwen3_5ForConditionalGeneration

    cfg = Qwen3_5Config(text_config=TEXT_27B, vision_config={"out_hidden_size": 5120}, tie_word_embeddings=False)
    with torch.device("meta"):
        model = Qwen3_5ForConditionalGeneration(cfg)
    return cfg, {name: tuple(p.shape) for name, p in model.state_dict().items()}


def test_27b_tree_matches_transformers(hf_27b):
    hf_cfg, hf_shapes = hf_27b
    cfg = Q.config_from_hf_dict(hf_cfg.to_dict())
    # the parsed transformers config is our preset, up to the fields transformers' defaults leave unset
    assert cfg.text == dataclasses.replace(Q.qwen35_27b().text, eos_token_id=None, mtp_num_hidden_layers=0)
    assert cfg.vision == Q.qwen35_27b().vision
    ours = {to_hf_name(cfg, name): tuple(spec.shape) for name, spec in Q.param_specs(cfg, jnp.bfloat16).items()}
    assert sorted(set(hf_shapes) - set(ours)) == []
    assert sorted(set(ours) - set(hf_shapes)) == []
    mismatched = {k: (ours[k], hf_shapes[k]) for k in ours if ours[k] != hf_shapes[k]}
    assert mismatched == {}


def test_27b_text_parameter_count():
    specs = Q.param_specs(Q.qwen35_27b(), jnp.bfloat16)
    text = Q.count_params(specs, "language_model.") + Q.count_params(specs, "lm_head.")
    assert text == 26_895_998_464
    # 48 DeltaNet + 16 attention layers in the 3:1 pattern
    layer_types = Q.qwen35_27b().text.layer_types
    assert layer_types.count("full_attention") == 16 and all(layer_types[i] == "full_attention" for i in range(3, 64, 4))


def test_abstract_tree_allocates_nothing():
    tree = Q.abstract_params(Q.qwen35_27b(), jnp.bfloat16)
    leaf = tree["language_model"]["layers"][3]["self_attn"]["q_proj"]["weight"]
    assert leaf.shape == (12288, 5120) and leaf.dtype == jnp.bfloat16
    assert not hasattr(leaf, "device")  # a ShapeDtypeStruct, not an array
    axes = Q.param_axes(Q.qwen35_27b())
    assert axes["language_model.layers.0.linear_attn.in_proj_qkv.weight"] == ("gdn_qkv", "embed")
