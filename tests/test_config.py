"""config.json parsing: both HF layouts, the strict allow-list, and the round trip through transformers."""

from __future__ import annotations

import dataclasses
import json

import pytest

import qwen35_jax as Q
from qwen35_jax.config import ConfigError, config_from_hf_dict, config_to_hf_dict, load_config


def _text_dict(**over):
    d = dict(model_type="qwen3_5_text", architectures=["Qwen3_5ForCausalLM"], vocab_size=128, hidden_size=32,
             intermediate_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
             linear_num_key_heads=2, linear_num_value_heads=6, linear_key_head_dim=8, linear_value_head_dim=8,
             rope_parameters={"rope_type": "default", "rope_theta": 1e6, "partial_rotary_factor": 0.25})
    d.update(over)
    return d


def test_causal_lm_layout(hf_checkpoints):
    path, model = hf_checkpoints("gva3", "causal")
    cfg = load_config(path)
    assert cfg.architecture == "Qwen3_5ForCausalLM" and cfg.vision is None
    t = cfg.text
    assert (t.hidden_size, t.num_hidden_layers, t.linear_num_value_heads, t.linear_num_key_heads) == (64, 5, 6, 2)
    assert t.layer_types == tuple(model.config.layer_types)
    assert t.rotary_dim == 8 and t.linear_conv_dim == 2 * 2 * 16 + 6 * 16


def test_conditional_generation_layout(hf_checkpoints):
    path, model = hf_checkpoints("kdiffv_tied", "conditional")
    cfg = load_config(path)
    assert cfg.architecture == "Qwen3_5ForConditionalGeneration"
    assert cfg.vision is not None and cfg.vision.depth == 1 and cfg.vision.out_hidden_size == cfg.text.hidden_size
    assert cfg.text.linear_key_head_dim == 8 and cfg.text.linear_value_head_dim == 24
    assert cfg.tie_word_embeddings is True
    assert cfg.image_token_id == 248056


def test_nested_tie_flag_is_ignored_like_transformers():
    """In the nested layout transformers ties by the top-level flag only."""
    d = config_to_hf_dict(Q.ModelConfig(text=Q.tiny_text_config(), vision=Q.tiny_vision_config()))
    d["text_config"]["tie_word_embeddings"] = True
    d["tie_word_embeddings"] = False
    assert config_from_hf_dict(d).tie_word_embeddings is False


@pytest.mark.parametrize("arch", ["Qwen3_5ForCausalLM", "Qwen3_5ForConditionalGeneration"])
def test_round_trip_through_transformers(arch):
    from transformers import Qwen3_5Config, Qwen3_5TextConfig

    text = Q.tiny_text_config(tie_word_embeddings=arch == "Qwen3_5ForCausalLM", eos_token_id=[5, 7])
    cfg = Q.ModelConfig(text=text, vision=None if arch == "Qwen3_5ForCausalLM" else Q.tiny_vision_config(),
                        architecture=arch)
    d = config_to_hf_dict(cfg)
    hf = (Qwen3_5TextConfig if arch == "Qwen3_5ForCausalLM" else Qwen3_5Config)(**d)
    again = config_from_hf_dict(json.loads(hf.to_json_string()))
    assert again == cfg


def test_layer_types_derived_from_interval():
    d = _text_dict(num_hidden_layers=8, full_attention_interval=4)
    assert config_from_hf_dict(d).text.layer_types == ("linear_attention",) * 3 + ("full_attention",) + \
        ("linear_attention",) * 3 + ("full_attention",)


def test_legacy_rope_keys():
    d = _text_dict(rope_theta=5e5, partial_rotary_factor=0.5)
    del d["rope_parameters"]
    t = config_from_hf_dict(d).text
    assert t.rope_theta == 5e5 and t.partial_rotary_factor == 0.5 and t.rotary_dim == 8


def test_presets():
    big = Q.qwen35_27b()
    assert big.text.hidden_size == 5120 and big.text.num_full_attention_layers == 16
    assert big.text.rotary_dim == 64 and big.text.linear_conv_dim == 10240
    assert big.vision.out_hidden_size == 5120 and big.vision.merged_hidden_size == 4608
    assert Q.qwen35_27b_text().vision is None
    hash(big)  # a static jit argument must be hashable


@pytest.mark.parametrize(
    "mutate, phrase",
    [
        (lambda d: d.update(sliding_window=4096), "unknown key(s) ['sliding_window']"),
        (lambda d: d.update(attention_bias=True), "attention_bias"),
        (lambda d: d.update(model_type="qwen3_5_moe_text"), "qwen3_5_moe_text"),
        (lambda d: d.update(rope_parameters={"rope_type": "yarn", "factor": 4.0}), "rope_type 'yarn'"),
        (lambda d: d["rope_parameters"].update(beta_fast=32), "unknown rope_parameters key(s) ['beta_fast']"),
        (lambda d: d.update(quantization_config={"quant_method": "gptq"}), "quantized"),
        (lambda d: d.update(layer_types=["linear_attention"] * 3), "layer_types has 3 entries"),
        (lambda d: d.update(layer_types=["linear_attention"] * 3 + ["sliding_attention"]), "sliding_attention"),
        (lambda d: d.update(linear_num_value_heads=5), "not a multiple"),
        (lambda d: d.update(hidden_act="gelu"), "hidden_act"),
        (lambda d: d.update(hidden_size=-1), "hidden_size must be a positive integer"),
    ],
)
def test_bad_text_configs_raise_with_the_key_named(mutate, phrase):
    d = _text_dict()
    mutate(d)
    with pytest.raises(ConfigError) as e:
        config_from_hf_dict(d)
    assert phrase in str(e.value)


def test_bad_nested_configs():
    good = config_to_hf_dict(Q.ModelConfig(text=Q.tiny_text_config(), vision=Q.tiny_vision_config()))
    for mutate, phrase in [
        (lambda d: d.update(some_new_flag=True), "unknown key(s) ['some_new_flag']"),
        (lambda d: d["vision_config"].update(deepstack_visual_indexes=[8, 16]), "DeepStack"),
        (lambda d: d["vision_config"].update(out_hidden_size=99), "out_hidden_size=99"),
        (lambda d: d["text_config"].update(mystery=1), "text_config: unknown key(s) ['mystery']"),
        (lambda d: d.pop("text_config"), "'text_config' is missing"),
        (lambda d: d.update(model_type="llama"), "model_type 'llama'"),
    ]:
        d = json.loads(json.dumps(good))
        mutate(d)
        with pytest.raises(ConfigError) as e:
            config_from_hf_dict(d)
        assert phrase in str(e.value)


def test_load_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="no config.json"):
        load_config(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(_text_dict(unknown_knob=3)))
    with pytest.raises(ConfigError, match=str(tmp_path)):
        load_config(tmp_path)


def test_dataclass_invariants():
    with pytest.raises(ConfigError, match="vision must be None"):
        Q.ModelConfig(text=Q.tiny_text_config(), vision=Q.tiny_vision_config(), architecture="Qwen3_5ForCausalLM")
    with pytest.raises(ConfigError, match="mrope_section"):
        dataclasses.replace(Q.tiny_text_config(), mrope_section=(1, 1))
