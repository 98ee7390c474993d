"""``quantize_params``: the pure transform from a float parameter tree to one with quantized leaves.

The tree keeps its nesting and key types (layer indices stay int keys); the selected ``.weight``
leaves become quantized leaves (:class:`quant.leaves.QuantizedWeight` for RTN), everything else is
the same object as in the input. Leaves are quantized one at a time, each by a per-leaf jitted
function (cached by shape and settings, so the 64 layers of the 27B compile a handful of times),
so peak memory is the model plus one leaf's temporaries; no second float copy is ever built.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import jax

from quant.leaves import is_quantized
from quant.recipes import METHODS, Recipe, get_recipe, plan


def walk(tree: Mapping, prefix: tuple = ()) -> list[tuple[tuple, Any]]:
    """``[(key path tuple, leaf)]`` of a nested dict, depth first in insertion order. Quantized
    leaves are leaves (they are never descended into)."""
    items = []
    for k, v in tree.items():
        if isinstance(v, Mapping):
            items.extend(walk(v, prefix + (k,)))
        else:
            items.append((prefix + (k,), v))
    return items


def path_string(keys: tuple) -> str:
    """(``'language_model'``, ``'layers'``, 3, ...) -> ``'language_model.layers.3...'`` (as
    ``qwen35_jax.model.flatten``)."""
    return ".".join(str(k) for k in keys)


def build(items) -> dict:
    """Inverse of :func:`walk`: nested plain dicts from ``[(key path, leaf)]``."""
    tree: dict = {}
    for keys, leaf in items:
        node = tree
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = leaf
    return tree


def quantize_params(params: Mapping, recipe: Recipe | str, *, calibration=None, donate: bool = False,
                    verbose: bool = False) -> dict:
    """Return ``params`` with the leaves that ``recipe`` selects replaced by quantized leaves.

    params: nested dict of float arrays (``nnx.to_pure_dict`` layout; int layer keys are kept).
    recipe: a :class:`Recipe` or a preset name (``quant.PRESETS``). The whole recipe is checked
        against the tree first (:func:`quant.recipes.plan`); nothing is quantized if it fails.
    calibration: data for methods that need it (GPTQ); RTN ignores it.
    donate: delete each float weight's buffer once its quantized leaf exists, so quantizing a
        model that barely fits frees memory as it goes. The input tree is unusable afterwards.
    verbose: print one line per quantized leaf.

    Raises ValueError naming the parameter when a weight holds NaN or Inf.
    """
    recipe = get_recipe(recipe)
    items = walk(params)
    flat = {path_string(keys): leaf for keys, leaf in items}
    if len(flat) != len(items):
        raise ValueError("two parameters have the same path string (e.g. keys 3 and '3' in one dict)")
    assignments = plan(flat, recipe, calibration=calibration)
    out = []
    for keys, leaf in items:
        path = path_string(keys)
        a = assignments.get(path)
        if a is None:
            out.append((keys, leaf))
            continue
        t0 = time.perf_counter()
        q = METHODS[a.rule.method].quantize(leaf, name=path, calibration=calibration, **a.settings)
        jax.block_until_ready(q)  # one leaf in flight: bounded memory, and errors name the right leaf
        if donate and isinstance(leaf, jax.Array):
            leaf.delete()
        if verbose:
            print(f"{path}: {q!r} ({time.perf_counter() - t0:.2f} s)")
        out.append((keys, q))
    return build(out)


@jax.jit
def _dequantize_leaf(leaf):
    return leaf.dequantize()


def dequantize_params(tree: Mapping) -> dict:
    """The float tree back: every quantized leaf replaced by its dequantized ``[out, in]`` weight in
    the original dtype (jitted per leaf type and shape)."""
    return build([(keys, _dequantize_leaf(leaf) if is_quantized(leaf) else leaf) for keys, leaf in walk(tree)])
