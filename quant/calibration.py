"""Layer-by-layer calibration capture and model-level GPTQ (``gptq_quantize_model``).

GPTQ needs, for every linear, the Hessian ``H = 2/n X^T X`` of its inputs *in the partly quantized
model*. Following GPTQModel's ``looper/module_looper.py`` with ``true_sequential=True``
(``shared/reference/quant_formats.md`` 1.7), each decoder layer is processed in subsets:

    full attention:  q/k/v_proj  ->  o_proj  ->  gate/up_proj  ->  down_proj
    Gated DeltaNet:  in_proj_qkv/z/b/a  ->  out_proj  ->  gate/up_proj  ->  down_proj

For each subset the layer is re-run on the calibration activations with the earlier subsets
already quantized, the subset's input second moments are accumulated (fp32, batch by batch), and
its linears are quantized; the next layer receives the quantized layer's outputs. Memory: one
layer's weights plus the calibration hidden states ``[S, T, D]`` (and one batch's temporaries);
the Hessians of one subset at a time.

Capture works by substituting, inside a jitted layer function, a recorder for each linear weight
of the subset: ``qwen35_jax.layers.linear`` calls ``w.apply_linear(x)`` on it, the recorder
returns ``x @ W^T`` and keeps ``X^T X`` as a traced value that the jitted function returns.

Shapes: S calibration sequences, T tokens, D model width, K in features.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from qwen35_jax import layers as L
from qwen35_jax.config import FULL_ATTENTION, ModelConfig
from qwen35_jax.model import Attention, GatedDeltaNet, RuntimeOptions, default_position_ids
from quant.gptq import HessianAccumulator, _xtx, gptq_quantize
from quant.quantize import build, path_string, walk
from quant.recipes import METHODS, Recipe, get_recipe, plan

# true-sequential subsets (GPTQModel module trees: a subset index per module)
ATTENTION_SUBSETS = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",),
                     ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",))
DELTANET_SUBSETS = (("linear_attn.in_proj_qkv", "linear_attn.in_proj_z", "linear_attn.in_proj_b",
                     "linear_attn.in_proj_a"), ("linear_attn.out_proj",),
                    ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",))


def _shared_input_groups(names: tuple[str, ...], layer_type: str) -> list[tuple[str, ...]]:
    """``names`` partitioned into groups of linears that read the same input: the true-sequential
    subsets (q/k/v; in_proj_*; gate/up; each other linear alone), whether or not the quantization
    itself runs true-sequential."""
    subsets = ATTENTION_SUBSETS if layer_type == FULL_ATTENTION else DELTANET_SUBSETS
    groups = [tuple(n for n in subset if n in names) for subset in subsets]
    grouped = {n for g in groups for n in g}
    return [g for g in groups if g] + [(n,) for n in names if n not in grouped]


class _Recorder:
    """Stands in for a linear weight: computes ``x @ W^T`` and keeps ``X^T X`` (fp32)."""

    def __init__(self, w):
        self.w = w
        self.xtx = None

    def apply_linear(self, x):
        self.xtx = _xtx(x)
        return L.linear(x, self.w)

    def dequantize(self):  # never called; makes the recorder look like a weight leaf
        raise NotImplementedError


def _get(lp: Mapping, dotted: str):
    node = lp
    for part in dotted.split("."):
        node = node[part]
    return node


def _with(lp: Mapping, dotted: str, value) -> dict:
    """A copy of the nested dict ``lp`` with ``dotted`` (a module path; its ``weight``) replaced."""
    parts = dotted.split(".")
    out = dict(lp)
    node = out
    for part in parts:
        node[part] = dict(node[part])
        node = node[part]
    node["weight"] = value
    return out


def _weights(module: Mapping, names: Sequence[str]) -> dict:
    """``{name: array or leaf}`` as :func:`qwen35_jax.model._values` builds it from modules."""
    return {n: module[n]["weight"] if isinstance(module[n], Mapping) else module[n] for n in names}


def layer_forward(c, layer_type: str, lp: Mapping, x, cos, sin, options: RuntimeOptions = RuntimeOptions()):
    """One decoder layer (``qwen35_jax.model.DecoderLayer.__call__``) as a function of its param
    dict ``lp`` (``params['language_model']['layers'][i]``). x ``[B, T, D]`` -> ``[B, T, D]``."""
    eps = c.rms_norm_eps
    h = L.rms_norm(x, lp["input_layernorm"]["weight"], eps)
    if layer_type == FULL_ATTENTION:
        h = L.gated_attention(h, _weights(lp["self_attn"], Attention._NAMES), num_heads=c.num_attention_heads,
                              num_kv_heads=c.num_key_value_heads, head_dim=c.head_dim, eps=eps, cos=cos, sin=sin,
                              mask=None, implementation=options.attention)
    else:
        h, _ = L.gated_deltanet(h, _weights(lp["linear_attn"], GatedDeltaNet._NAMES),
                                num_k_heads=c.linear_num_key_heads, num_v_heads=c.linear_num_value_heads,
                                k_head_dim=c.linear_key_head_dim, v_head_dim=c.linear_value_head_dim, eps=eps,
                                implementation=options.gated_delta, chunk_size=options.chunk_size,
                                solve=options.gated_delta_solve, precision=options.gated_delta_precision)
    x = x + h
    return x + L.swiglu_mlp(L.rms_norm(x, lp["post_attention_layernorm"]["weight"], eps),
                            _weights(lp["mlp"], ("gate_proj", "up_proj", "down_proj")))


@functools.partial(jax.jit, static_argnames=("c", "layer_type", "names", "options"))
def _capture(lp, x, cos, sin, *, c, layer_type, names, options):
    """``{name: X^T X}`` of the inputs of the linears ``names`` when the layer runs on x."""
    recorders = {}
    for n in names:
        recorders[n] = _Recorder(_get(lp, n)["weight"])
        lp = _with(lp, n, recorders[n])
    layer_forward(c, layer_type, lp, x, cos, sin, options)
    return {n: r.xtx for n, r in recorders.items()}


@functools.partial(jax.jit, static_argnames=("c", "layer_type", "options"))
def _forward(lp, x, cos, sin, *, c, layer_type, options):
    return layer_forward(c, layer_type, lp, x, cos, sin, options)


def _batches(calibration, batch_size: int | None) -> list[jax.Array]:
    """Token ids ``[S, T]`` (or a list of ``[b, T_i]`` arrays) -> a list of int32 ``[b, T]`` batches."""
    if isinstance(calibration, (list, tuple)):
        arrays = [np.asarray(a) for a in calibration]
    else:
        arrays = [np.asarray(calibration)]
    out = []
    for a in arrays:
        if a.ndim != 2 or not np.issubdtype(a.dtype, np.integer):
            raise ValueError(f"calibration must be integer token ids [sequences, tokens], got {a.dtype} {a.shape}")
        step = batch_size or a.shape[0]
        out.extend(jnp.asarray(a[i:i + step], jnp.int32) for i in range(0, a.shape[0], step))
    if not out or sum(int(b.size) for b in out) == 0:
        raise ValueError("calibration holds no tokens")
    return out


def gptq_quantize_model(cfg: ModelConfig, params: Mapping, recipe: Recipe | str, calibration, *,
                        batch_size: int | None = None, true_sequential: bool = True,
                        options: RuntimeOptions = RuntimeOptions(), verbose: bool = False,
                        progress=None) -> tuple[dict, dict]:
    """Quantize ``params`` with ``recipe`` (rules may use "gptq", "rtn", ...), calibrating GPTQ on
    the token ids ``calibration`` ``[S, T]`` (or a list of such arrays), layer by layer.

    Returns ``(qparams, info)``: the quantized tree (same nesting as ``params``) and
    ``{path: quant.gptq.GPTQInfo}`` for every GPTQ weight (its calibration output error etc.).
    batch_size: sequences per forward batch (None: all at once). true_sequential: quantize a layer's
    linears in the subsets above with inputs recomputed through the quantized earlier subsets
    (False: every linear of a layer sees the layer's float computation, one subset).
    progress: optional ``progress(done_layers, total_layers, seconds_of_this_layer)`` after each layer.
    EoRA (``eora_rank`` > 0) uses the same H and is attached at once, so later subsets and layers
    see the compensated weights. GPTQ rules may only select decoder-layer linears
    (``language_model.layers.*``); other rules (e.g. RTN on ``lm_head``) apply as in
    :func:`quant.quantize_params`.
    """
    recipe = get_recipe(recipe)
    items = walk(params)
    flat = {path_string(keys): leaf for keys, leaf in items}
    assignments = plan(flat, recipe, calibration=calibration)
    prefix = "language_model.layers."
    outside = sorted(p for p, a in assignments.items()
                     if METHODS[a.rule.method].needs_calibration and not p.startswith(prefix))
    if outside:
        raise NotImplementedError(f"calibrated methods apply to decoder-layer linears only; got {outside}")
    batches = _batches(calibration, batch_size)
    c = cfg.text
    embed = params["language_model"]["embed_tokens"]["weight"]
    xs = [jnp.take(embed, b, axis=0) for b in batches]  # [b, T, D] hidden states per batch
    rope = []
    for b in batches:
        cos, sin = L.rope_cos_sin(default_position_ids(*b.shape), c.rotary_dim, c.rope_theta, c.mrope_section,
                                  embed.dtype)
        rope.append((cos, sin))
    n_tokens = sum(int(b.size) for b in batches)

    new: dict[str, Any] = {}
    info: dict = {}
    layers = params["language_model"]["layers"]
    for i in range(c.num_hidden_layers):
        t0 = time.perf_counter()
        lp = layers[i]
        layer_type = c.layer_types[i]
        subsets = ATTENTION_SUBSETS if layer_type == FULL_ATTENTION else DELTANET_SUBSETS
        if not true_sequential:
            subsets = (tuple(n for s in subsets for n in s),)
        for subset in subsets:
            todo = tuple(n for n in subset if f"{prefix}{i}.{n}.weight" in assignments)
            if not todo:
                continue
            need_h = tuple(n for n in todo if METHODS[assignments[f"{prefix}{i}.{n}.weight"].rule.method]
                           .needs_calibration)
            # Linears that read the same input share one X^T X: captured once (for the first of them)
            # into one accumulator object.
            groups = _shared_input_groups(need_h, layer_type)
            accs = {}
            for group in groups:
                accs.update(dict.fromkeys(group, HessianAccumulator(_get(lp, group[0])["weight"].shape[1])))
            heads = tuple(group[0] for group in groups)
            bases = {}
            if heads:
                for x, (cos, sin) in zip(xs, rope):
                    xtx = _capture(lp, x, cos, sin, c=c, layer_type=layer_type, names=heads, options=options)
                    for n in heads:
                        accs[n].add_xtx(xtx[n], x.shape[0] * x.shape[1], x.shape[0])
            for n in todo:
                path = f"{prefix}{i}.{n}.weight"
                a = assignments[path]
                w = _get(lp, n)["weight"]
                if n in accs:
                    settings = dict(a.settings)
                    rank, eora_dtype = settings.pop("eora_rank"), settings.pop("eora_dtype")
                    leaf, inf = gptq_quantize(w, accs[n].hessian, n_samples=accs[n].n, name=path,
                                              return_info=True, **settings)
                    if rank:
                        from quant.eora import eigen_basis, eora

                        # one eigendecomposition per shared input (id: the group's one accumulator)
                        if id(accs[n]) not in bases:
                            bases[id(accs[n])] = eigen_basis(accs[n].hessian)
                        leaf = eora(w, leaf, accs[n].hessian, int(rank), lora_dtype=eora_dtype,
                                    basis=bases[id(accs[n])])
                    info[path] = inf
                else:
                    leaf = METHODS[a.rule.method].quantize(w, name=path, calibration=None, **a.settings)
                lp = _with(lp, n, leaf)
                new[path] = leaf
        # the next layer sees this layer's quantized outputs
        xs = [_forward(lp, x, cos, sin, c=c, layer_type=layer_type, options=options)
              for x, (cos, sin) in zip(xs, rope)]
        if verbose or progress is not None:
            jax.block_until_ready(xs)
        if verbose:
            print(f"layer {i} ({layer_type}): {time.perf_counter() - t0:.2f} s, {n_tokens} tokens")
        if progress is not None:
            progress(i + 1, c.num_hidden_layers, time.perf_counter() - t0)

    out = []
    for keys, leaf in items:
        path = path_string(keys)
        if path in new:
            out.append((keys, new[path]))
        elif path in assignments:  # non-calibrated rules outside the decoder layers
            a = assignments[path]
            out.append((keys, METHODS[a.rule.method].quantize(leaf, name=path, calibration=None, **a.settings)))
        else:
            out.append((keys, leaf))
    return build(out), info
