"""Recipes: which parameter gets which quantizer, as data.

A :class:`Recipe` is an ordered list of :class:`Rule` s. Each rule is a regex fullmatched against
the parameter path (the keys of ``qwen35_jax.model.flatten(params)``, e.g.
``language_model.layers.3.self_attn.q_proj.weight``), a method name (None = leave the parameter
as it is) and that method's settings. The first matching rule wins; unmatched parameters stay.
An ablation is a one-line change::

    Recipe([Rule(r".*\\.mlp\\..*\\.weight", "rtn", bits=4, group_size=64)])

:func:`plan` checks a whole recipe against a tree (concrete or abstract ``ShapeDtypeStruct``
leaves) before anything is quantized and reports every problem at once.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np

from qwen35_jax.layers import FUSED_PROJECTIONS
from quant.leaves import SCALE_DTYPES, SUPPORTED_BITS, dtype_name, is_quantized, normalize_group_size


class RecipeError(ValueError):
    """A recipe that cannot be applied to a parameter tree (the message lists every problem)."""


# --------------------------------------------------------------------------------------------------
# Methods
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Method:
    """A quantizer a rule can name.

    quantize: ``(w [N, K], *, name, calibration, **settings) -> quantized leaf``.
    defaults: every accepted setting with its default (other keys are an error).
    check: ``(settings, shape) -> problem string or None`` for one parameter, before quantizing.
    needs_calibration: the method reads ``calibration`` (GPTQ); a recipe using it without
        calibration data is an error.
    """

    name: str
    quantize: Callable[..., Any]
    defaults: Mapping[str, Any]
    check: Callable[[Mapping[str, Any], tuple[int, ...]], str | None]
    needs_calibration: bool = False


METHODS: dict[str, Method] = {}


def register_method(method: Method) -> Method:
    """Add a quantizer to the names recipes may use (later registrations replace earlier ones)."""
    METHODS[method.name] = method
    return method


def _check_rtn(settings: Mapping[str, Any], shape: tuple[int, ...]) -> str | None:
    from quant.rtn import CLIP_MODES

    bits, k = settings["bits"], shape[1]
    if bits not in SUPPORTED_BITS:
        return f"unsupported bits {bits!r} (supported: {SUPPORTED_BITS})"
    gs = settings["group_size"]
    if gs is not None and (not isinstance(gs, (int, np.integer)) or isinstance(gs, bool)):
        return f"group_size must be an int, -1 or None, got {gs!r}"
    gs = normalize_group_size(gs, k)
    if gs <= 0 or k % gs:
        return f"group size {gs} does not divide the input dim {k} (weight shape {list(shape)})"
    if settings["clip"] not in CLIP_MODES:
        return f"unknown clip mode {settings['clip']!r} (expected one of {CLIP_MODES})"
    sd = settings["scale_dtype"]
    if sd is not None:
        try:
            sd_ok = dtype_name(sd) in SCALE_DTYPES
        except TypeError:
            sd_ok = False
        if not sd_ok:
            return f"scale_dtype {sd!r} is not one of {SCALE_DTYPES}"
    if not isinstance(settings["sym"], bool):
        return f"sym must be a bool, got {settings['sym']!r}"
    return None


def _rtn(w, *, name, calibration, **settings):
    from quant.rtn import rtn_quantize

    del calibration  # round-to-nearest needs no data
    return rtn_quantize(w, name=name, **settings)


register_method(Method(
    name="rtn", quantize=_rtn, check=_check_rtn,
    defaults=dict(bits=4, group_size=128, sym=True, clip="minmax", scale_dtype=None, norm=2.4, grid=100,
                  maxshrink=0.8),
))


GPTQ_DEFAULTS = dict(bits=4, group_size=128, sym=True, act_order=False, act_group_aware=False, static_groups=False,
                     damp_percent=0.01, damp_increment=0.01, block_size=128, scale_dtype="float16", clip="minmax",
                     norm=2.4, grid=100, maxshrink=0.8, eora_rank=0, eora_dtype=None)


def _check_gptq(settings: Mapping[str, Any], shape: tuple[int, ...]) -> str | None:
    msg = _check_rtn(settings, shape)
    if msg is not None:
        return msg
    for key in ("act_order", "act_group_aware", "static_groups"):
        if not isinstance(settings[key], bool):
            return f"{key} must be a bool, got {settings[key]!r}"
    if settings["act_order"] and settings["act_group_aware"]:
        return "act_order (desc_act) and act_group_aware are mutually exclusive"
    if not 0.0 < float(settings["damp_percent"]) < 1.0:
        return f"damp_percent must be in (0, 1), got {settings['damp_percent']!r}"
    r = settings["eora_rank"]
    if isinstance(r, bool) or not isinstance(r, (int, np.integer)) or r < 0:
        return f"eora_rank must be an int >= 0, got {r!r}"
    if r > min(shape):
        return f"eora_rank {r} exceeds min(N, K) = {min(shape)} of the weight (shape {list(shape)})"
    return None


def _gptq(w, *, name, calibration, **settings):
    """Per-leaf GPTQ: ``calibration`` maps parameter paths to Hessians (a
    :class:`quant.gptq.HessianAccumulator`, or ``(H [K, K], n_samples)``). Token ids need the model:
    use :func:`quant.calibration.gptq_quantize_model`."""
    from quant.gptq import HessianAccumulator, gptq_quantize

    if not isinstance(calibration, Mapping):
        raise TypeError(f"{name}: GPTQ through quantize_params needs calibration={{path: Hessian}}; to calibrate "
                        f"from token ids run quant.gptq_quantize_model(cfg, params, recipe, token_ids)")
    if name not in calibration:
        raise KeyError(f"{name}: no Hessian for this parameter in calibration")
    h = calibration[name]
    if isinstance(h, HessianAccumulator):
        h, n = h.hessian, h.n
    else:
        h, n = h
    return gptq_leaf(w, h, n, name=name, **settings)


def gptq_leaf(w, h, n_samples, *, name, eora_rank=0, eora_dtype=None, **settings):
    """GPTQ of one weight from its Hessian H [K, K] over n_samples, then (eora_rank > 0) an EoRA
    adapter of that rank computed with the same H as the activation covariance."""
    from quant.eora import eora
    from quant.gptq import gptq_quantize

    leaf = gptq_quantize(w, h, n_samples=n_samples, name=name, **settings)
    if eora_rank:
        leaf = eora(w, leaf, h, int(eora_rank), lora_dtype=eora_dtype)
    return leaf


register_method(Method(name="gptq", quantize=_gptq, check=_check_gptq, defaults=GPTQ_DEFAULTS,
                       needs_calibration=True))


# --------------------------------------------------------------------------------------------------
# Rules and recipes
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, init=False)
class Rule:
    """``Rule(pattern, method, **settings)``: parameters whose path fullmatches ``pattern`` get
    ``method`` (a registered name, or None to keep them as they are) with ``settings``."""

    pattern: str
    method: str | None
    settings: Mapping[str, Any]

    def __init__(self, pattern: str, method: str | None = None, **settings: Any):
        object.__setattr__(self, "pattern", pattern)
        object.__setattr__(self, "method", method)
        object.__setattr__(self, "settings", dict(settings))
        try:
            object.__setattr__(self, "_regex", re.compile(pattern))
        except re.error as e:
            raise RecipeError(f"{self!r}: invalid regex: {e}") from None
        if method is None:
            if settings:
                raise RecipeError(f"{self!r}: a rule without a method takes no settings")
            return
        if method not in METHODS:
            raise RecipeError(f"{self!r}: unknown method {method!r}; known methods: {sorted(METHODS)}")
        unknown = sorted(set(settings) - set(METHODS[method].defaults))
        if unknown:
            raise RecipeError(f"{self!r}: unknown setting(s) {unknown} for method {method!r}; accepted: "
                              f"{sorted(METHODS[method].defaults)}")

    def matches(self, path: str) -> bool:
        return self._regex.fullmatch(path) is not None

    def resolved_settings(self) -> dict[str, Any]:
        """The method's defaults updated by this rule's settings."""
        return {**METHODS[self.method].defaults, **self.settings} if self.method else {}

    def __repr__(self) -> str:
        args = [repr(self.pattern), repr(self.method)] + [f"{k}={v!r}" for k, v in self.settings.items()]
        return f"Rule({', '.join(args)})"

    def __eq__(self, other):
        return isinstance(other, Rule) and (self.pattern, self.method, self.settings) == (
            other.pattern, other.method, other.settings)

    def __hash__(self):
        return hash((self.pattern, self.method, tuple(sorted(self.settings.items()))))

    def to_dict(self) -> dict[str, Any]:
        return {"pattern": self.pattern, "method": self.method, "settings": dict(self.settings)}


@dataclasses.dataclass(frozen=True, init=False)
class Recipe:
    """An ordered list of rules (first match wins) and an optional name."""

    rules: tuple[Rule, ...]
    name: str

    def __init__(self, rules: Iterable[Rule], name: str = ""):
        rules = tuple(rules)
        for r in rules:
            if not isinstance(r, Rule):
                raise RecipeError(f"recipe {name!r}: rules must be Rule objects, got {r!r}")
        object.__setattr__(self, "rules", rules)
        object.__setattr__(self, "name", name)

    def rule_for(self, path: str) -> tuple[int, Rule] | None:
        """(index, rule) of the first rule matching ``path``, or None."""
        for i, r in enumerate(self.rules):
            if r.matches(path):
                return i, r
        return None

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "rules": [r.to_dict() for r in self.rules]}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Recipe":
        return cls([Rule(r["pattern"], r["method"], **r.get("settings", {})) for r in d["rules"]], d.get("name", ""))

    def __repr__(self) -> str:
        body = ",\n  ".join(repr(r) for r in self.rules)
        return f"Recipe([\n  {body}\n], name={self.name!r})"


# --------------------------------------------------------------------------------------------------
# Validation against a tree
# --------------------------------------------------------------------------------------------------

# 2-D ``.weight`` leaves that are lookup tables, not linear maps.
_EMBEDDINGS = ("embed_tokens", "pos_embed")


def linear_weight_problem(path: str, leaf) -> str | None:
    """Why ``leaf`` at ``path`` is not a quantizable linear weight (None when it is). Linear
    weights are the 2-D ``.weight`` leaves of ``Linear`` modules: norms are 1-D, conv1d 3-D, the
    vision patch conv 5-D, and the two embedding tables are excluded by name."""
    if is_quantized(leaf):
        return "is already quantized (dequantize_params first to re-quantize)"
    shape = tuple(getattr(leaf, "shape", ()))
    if not path.endswith(".weight") or len(shape) != 2:
        return f"is not a linear weight (shape {list(shape)}); only 2-D '.weight' leaves of linear layers can be quantized"
    if path.split(".")[-2] in _EMBEDDINGS:
        return "is an embedding table, not a linear weight"
    return None


@dataclasses.dataclass(frozen=True)
class Assignment:
    """One parameter to quantize: its path, the winning rule (and its index), resolved settings."""

    path: str
    rule_index: int
    rule: Rule
    settings: Mapping[str, Any]


def plan(flat: Mapping[str, Any], recipe: Recipe, *, calibration=None) -> dict[str, Assignment]:
    """Check ``recipe`` against a flat ``{path: leaf}`` tree and return ``{path: Assignment}`` of the
    parameters to quantize. Raises :class:`RecipeError` listing every problem: rules that select no
    parameter, rules with a method that match a non-linear or already quantized leaf, settings a
    parameter cannot take (e.g. a group size not dividing its input dim), missing calibration."""
    fused = [path for path in flat if path.split(".")[-2:][0] in FUSED_PROJECTIONS]
    if fused:
        raise RecipeError(f"{fused[0]} is a fused projection (model.fuse_projections), a decode layout: quantize "
                          f"the separate layout (model.unfuse_projections gives it back), then decode with it")
    problems: list[str] = []
    won = [[] for _ in recipe.rules]
    matched_any = [False] * len(recipe.rules)
    out: dict[str, Assignment] = {}
    for path, leaf in flat.items():
        first = None
        for i, r in enumerate(recipe.rules):
            if r.matches(path):
                matched_any[i] = True
                if first is None:
                    first = i
        if first is None:
            continue
        rule = recipe.rules[first]
        won[first].append(path)
        if rule.method is None:
            continue
        why = linear_weight_problem(path, leaf)
        if why is not None:
            problems.append(f"rule #{first} {rule!r} matches '{path}', which {why}")
            continue
        settings = rule.resolved_settings()
        msg = METHODS[rule.method].check(settings, tuple(leaf.shape))
        if msg is not None:
            problems.append(f"rule #{first} {rule!r} on '{path}': {msg}")
            continue
        out[path] = Assignment(path, first, rule, settings)
    for i, r in enumerate(recipe.rules):
        if not won[i]:
            if matched_any[i]:
                problems.append(f"rule #{i} {r!r} selects no parameter: every parameter it matches is taken by an "
                                f"earlier rule")
            else:
                problems.append(f"rule #{i} {r!r} matches no parameter")
    if calibration is None:
        needing = sorted({a.rule.method for a in out.values() if METHODS[a.rule.method].needs_calibration})
        if needing:
            problems.append(f"method(s) {needing} need calibration data; pass calibration=")
    if problems:
        title = f"recipe {recipe.name!r}" if recipe.name else "recipe"
        raise RecipeError(f"{title} cannot be applied ({len(problems)} problem(s)):\n  - " + "\n  - ".join(problems))
    return out


# --------------------------------------------------------------------------------------------------
# Presets
# --------------------------------------------------------------------------------------------------

_LAYER = r"language_model\.layers\.\d+\."
_ATTN = r"self_attn\.[qkvo]_proj"
# GPTQModel's qwen3_5 module tree: in_proj_a/b (the [48, 5120] decay/beta projections) are skipped
# (shared/peers/README.md); so are conv1d, norms, embeddings, lm_head, vision and MTP.
_DELTANET = r"linear_attn\.(in_proj_qkv|in_proj_z|out_proj)"
_MLP = r"mlp\.(gate|up|down)_proj"
TEXT_LINEARS = _LAYER + f"({_ATTN}|{_DELTANET}|{_MLP})" + r"\.weight"


def _uniform(name: str, bits: int, group_size: int | None) -> Recipe:
    return Recipe([Rule(TEXT_LINEARS, "rtn", bits=bits, group_size=group_size, sym=True,
                        scale_dtype="float16")], name=name)


# GPTQ checkpoints store float16 scales, so every preset does (scale_dtype="float16").
PRESETS: dict[str, Recipe] = {
    # Qwen3.6-27B-GPTQ-8bit: all text-decoder linears INT8 g32 sym (DESIGN.md table)
    "int8-g32-text": _uniform("int8-g32-text", 8, 32),
    # Qwen3.5-27B-TevunahAi-GPTQ: attention q/k/v/o INT8, DeltaNet and MLP INT4, g128, sym
    "int8-attn-int4-rest-g128": Recipe([
        Rule(_LAYER + _ATTN + r"\.weight", "rtn", bits=8, group_size=128, sym=True, scale_dtype="float16"),
        Rule(_LAYER + f"({_DELTANET}|{_MLP})" + r"\.weight", "rtn", bits=4, group_size=128, sym=True,
             scale_dtype="float16"),
    ], name="int8-attn-int4-rest-g128"),
    "int8-per-channel": _uniform("int8-per-channel", 8, None),
    "int4-g128": _uniform("int4-g128", 4, 128),
    "int4-g32": _uniform("int4-g32", 4, 32),
    "int3-g128": _uniform("int3-g128", 3, 128),
}

# Calibrated presets (quant.gptq_quantize_model(cfg, params, name, token_ids)); apart from PRESETS,
# whose recipes apply without data. get_recipe finds both.
CALIBRATED_PRESETS: dict[str, Recipe] = {
    "gptq-int4-g128": Recipe([Rule(TEXT_LINEARS, "gptq", bits=4, group_size=128, sym=True)], name="gptq-int4-g128"),
    # Qwen3.6-27B-GPTQ-8bit: all text linears INT8 g32 sym, act_group_aware (GPTQModel >= 5 default,
    # damp 0.05), in_proj_a/b kept 16-bit (TEXT_LINEARS excludes them)
    "gptq-int8-g32-text": Recipe([Rule(TEXT_LINEARS, "gptq", bits=8, group_size=32, sym=True, act_group_aware=True,
                                       damp_percent=0.05)], name="gptq-int8-g32-text"),
    # Qwen3.5-27B-TevunahAi-GPTQ: attention INT8, DeltaNet and MLP INT4, g128, desc_act, sym, EoRA rank 64
    "gptq-int8-attn-int4-rest-g128-eora64": Recipe([
        Rule(_LAYER + _ATTN + r"\.weight", "gptq", bits=8, group_size=128, sym=True, act_order=True, eora_rank=64),
        Rule(_LAYER + f"({_DELTANET}|{_MLP})" + r"\.weight", "gptq", bits=4, group_size=128, sym=True, act_order=True,
             eora_rank=64),
    ], name="gptq-int8-attn-int4-rest-g128-eora64"),
}


def get_recipe(recipe: Recipe | str, *, method: str | None = None, **settings: Any) -> Recipe:
    """A recipe, or a preset by name; ``method``/``settings`` override every rule that quantizes
    (e.g. ``get_recipe("int4-g128", clip="mse")``)."""
    if isinstance(recipe, str):
        if recipe not in PRESETS and recipe not in CALIBRATED_PRESETS:
            raise RecipeError(f"unknown preset {recipe!r}; presets: {sorted(PRESETS) + sorted(CALIBRATED_PRESETS)}")
        recipe = PRESETS.get(recipe) or CALIBRATED_PRESETS[recipe]
    if not isinstance(recipe, Recipe):
        raise RecipeError(f"expected a Recipe or a preset name, got {type(recipe).__name__}")
    if method is None and not settings:
        return recipe
    rules = [r if r.method is None else Rule(r.pattern, method or r.method, **{**r.settings, **settings})
             for r in recipe.rules]
    return Recipe(rules, name=recipe.name)
