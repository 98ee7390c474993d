"""Recipes: matching, presets on the real 27B shapes (abstract, no compute), and every bad input
raising with a message that names the offending thing."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qwen35_jax as Q
import quant
from quant import Recipe, RecipeError, Rule
from quant.recipes import TEXT_LINEARS


@pytest.fixture(scope="module")
def tiny(numpy_params):
    cfg = Q.ModelConfig(text=Q.tiny_text_config(mtp_num_hidden_layers=1), vision=Q.tiny_vision_config())
    return cfg, numpy_params(cfg)


@pytest.fixture(scope="module")
def abstract_27b():
    return Q.model.param_specs(Q.qwen35_27b(), jnp.bfloat16)


@pytest.mark.parametrize("name", sorted(quant.PRESETS))
def test_presets_plan_on_the_27b(name, abstract_27b):
    plan = quant.plan(abstract_27b, quant.PRESETS[name])
    # 16 attention layers x q/k/v/o + 48 DeltaNet layers x qkv/z/out + 64 MLPs x 3
    assert len(plan) == 16 * 4 + 48 * 3 + 64 * 3
    assert not any(p.startswith(("visual", "mtp", "lm_head")) or "in_proj_a" in p or "in_proj_b" in p for p in plan)
    bits = {p: a.settings["bits"] for p, a in plan.items()}
    if name == "int8-attn-int4-rest-g128":
        assert all(b == (8 if ".self_attn." in p else 4) for p, b in bits.items())
        assert {a.settings["group_size"] for a in plan.values()} == {128}


def test_first_match_wins_and_none_keeps(tiny):
    _, params = tiny
    recipe = Recipe([
        Rule(r"language_model\.layers\.0\.mlp\.down_proj\.weight", None),
        Rule(r"language_model\.layers\.\d+\.mlp\.down_proj\.weight", "rtn", bits=8, group_size=32),
        Rule(r"language_model\.layers\.\d+\.mlp\.\w+\.weight", "rtn", bits=4, group_size=32),
    ])
    q = quant.quantize_params(params, recipe)
    layers = q["language_model"]["layers"]
    assert sorted(layers) == sorted(params["language_model"]["layers"])  # int keys kept
    assert layers[0]["mlp"]["down_proj"]["weight"] is params["language_model"]["layers"][0]["mlp"]["down_proj"]["weight"]
    assert layers[1]["mlp"]["down_proj"]["weight"].bits == 8
    assert layers[1]["mlp"]["up_proj"]["weight"].bits == 4
    assert q["language_model"]["norm"]["weight"] is params["language_model"]["norm"]["weight"]


def test_donate_frees_only_the_quantized_inputs(tiny):
    _, params = tiny
    mine = quant.quantize_params(params, Recipe([]))  # a tree of fresh copies we may consume
    mine = jax.tree.map(jnp.copy, mine)
    up = mine["language_model"]["layers"][0]["mlp"]["up_proj"]["weight"]
    norm = mine["language_model"]["norm"]["weight"]
    q = quant.quantize_params(mine, Recipe([Rule(r"language_model\.layers\.0\.mlp\.up_proj\.weight", "rtn",
                                                 group_size=32)]), donate=True)
    assert up.is_deleted() and not norm.is_deleted()
    assert q["language_model"]["norm"]["weight"] is norm


def _raises(params, recipe, *fragments):
    with pytest.raises(RecipeError) as e:
        quant.quantize_params(params, recipe)
    for f in fragments:
        assert f in str(e.value), (f, str(e.value))


def test_bad_recipes_name_the_problem(tiny):
    _, params = tiny
    with pytest.raises(RecipeError, match="unknown method 'gptqq'"):
        Rule(r".*q_proj\.weight", "gptqq")
    with pytest.raises(RecipeError, match="unknown setting.*'bit'"):
        Rule(r".*q_proj\.weight", "rtn", bit=4)
    with pytest.raises(RecipeError, match="invalid regex"):
        Rule(r"(unclosed", "rtn")
    with pytest.raises(RecipeError, match="unknown preset 'int5'"):
        quant.get_recipe("int5")
    # a rule that matches nothing, named
    _raises(params, Recipe([Rule(r"language_model\.layers\.\d+\.mlp\.up_proj\.weight", "rtn", group_size=32),
                            Rule(r".*\.qproj\.weight", "rtn")]),
            r"rule #1 Rule('.*\\.qproj\\.weight', 'rtn') matches no parameter")
    # a rule fully shadowed by an earlier one
    _raises(params, Recipe([Rule(r".*up_proj\.weight", "rtn", group_size=32),
                            Rule(r"language_model\.layers\.0\.mlp\.up_proj\.weight", "rtn", bits=8)]),
            "rule #1", "taken by an earlier rule")
    # non-linear leaves: a norm, the conv1d, an embedding
    for path, why in (("language_model.norm.weight", "not a linear weight"),
                      ("language_model.layers.0.linear_attn.conv1d.weight", "not a linear weight"),
                      ("language_model.embed_tokens.weight", "embedding table")):
        _raises(params, Recipe([Rule(path.replace(".", r"\."), "rtn", bits=8, group_size=None)]), f"'{path}'", why)
    # group size not dividing the input dim (names the parameter and the dim); unsupported bits
    _raises(params, Recipe([Rule(r"language_model\.layers\.\d+\.mlp\.down_proj\.weight", "rtn", group_size=64)]),
            "'language_model.layers.0.mlp.down_proj.weight'", "group size 64 does not divide the input dim 96")
    _raises(params, Recipe([Rule(r".*gate_proj\.weight", "rtn", bits=6, group_size=32)]),
            "language_model.layers.0.mlp.gate_proj.weight", "unsupported bits 6")
    _raises(params, Recipe([Rule(r".*gate_proj\.weight", "rtn", scale_dtype="int8", group_size=32)]),
            "scale_dtype 'int8'")
    # all problems are reported together, before anything is quantized
    with pytest.raises(RecipeError, match=r"\(3 problem\(s\)\)"):
        quant.quantize_params(params, Recipe([Rule(r"language_model\.layers\.0\.mlp\.gate_proj\.weight", "rtn", bits=6),
                                              Rule(r"language_model\.norm\.weight", "rtn"),
                                              Rule(r"nothing", None)]))


def test_already_quantized_and_nan(tiny):
    _, params = tiny
    r = Recipe([Rule(r"language_model\.layers\.0\.mlp\.up_proj\.weight", "rtn", group_size=32)])
    q = quant.quantize_params(params, r)
    _raises(q, r, "language_model.layers.0.mlp.up_proj.weight", "already quantized")
    bad = quant.quantize_params(params, Recipe([]))  # a shallow rebuild we may edit
    w = bad["language_model"]["layers"][1]["mlp"]["up_proj"]["weight"]
    bad["language_model"]["layers"][1]["mlp"]["up_proj"]["weight"] = w.at[3, 4].set(jnp.inf)
    with pytest.raises(ValueError, match=r"language_model\.layers\.1\.mlp\.up_proj\.weight: .*NaN or Inf"):
        quant.quantize_params(bad, quant.get_recipe(Recipe([Rule(r".*up_proj\.weight", "rtn", group_size=32)])))


def test_recipe_dict_round_trip_and_overrides():
    r = quant.get_recipe("int8-attn-int4-rest-g128", clip="mse")
    assert all(rule.settings["clip"] == "mse" for rule in r.rules)
    assert Recipe.from_dict(r.to_dict()) == r
    assert repr(TEXT_LINEARS) in repr(quant.PRESETS["int4-g32"])
    assert np.isnan(quant.average_bits({}).quantized_bits_per_weight)
