"""Sharding the model with JAX's own SPMD machinery: a ``Mesh``, logical axis rules, ``NamedSharding``.

Every parameter carries logical axis names (``model.param_axes``: ``q_heads``, ``gdn_v``, ``mlp``,
``embed``, ...). A rule set maps logical names to mesh axes; ``param_sharding`` turns the pair into a
``NamedSharding`` per parameter, which the loader (``checkpoint.load_params(sharding=...)``) and
``model.random_params(sharding=...)`` use to put each tensor directly into its shards, and which
``shard_params`` applies to a tree that already exists (float or quantized). The model code itself
is unchanged: under ``jit`` the compiler (GSPMD / Shardy) propagates the layouts from the inputs and
inserts the collectives.

The default rules are Megatron-style tensor parallelism (Shoeybi et al., arXiv:1909.08053) over the
``model`` mesh axis: column-parallel q/k/v, in_proj_* and gate/up (their output dim is split), row-
parallel o_proj, out_proj and down_proj (their input dim is split, so each layer needs one all-reduce
after the attention/DeltaNet block and one after the MLP); data parallelism over the ``data`` axis for
the batch. A dimension that the mesh axis does not divide (e.g. the 27B's 4 KV heads on 8 devices)
stays replicated instead of failing: correctness never depends on the rules, only speed does.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from qwen35_jax import model as M
from qwen35_jax.config import ModelConfig

DATA = "data"
MODEL = "model"

# logical axis -> mesh axis (None: replicated). Keys are the names used in model.py.
DEFAULT_RULES: dict[str, str | None] = {
    "batch": DATA,
    # text decoder: tensor parallel over heads / value heads / the MLP intermediate dim
    "q_heads": MODEL, "kv_heads": MODEL, "o_heads": MODEL,
    "gdn_qkv": MODEL, "gdn_conv": MODEL, "gdn_v": MODEL, "gdn_heads": MODEL,
    "mlp": MODEL,
    # model.fuse_projections' stacked weights (q|k|v, in_proj_*, gate|up): a split of the stacked
    # dim would not follow the parts, so they stay replicated; shard the separate layout instead
    "fused": None,
    "embed": None, "vocab": None, "mtp_in": None,
    # vision tower: small (0.4B); replicated by default
    "vit_heads": None, "vit_embed": None, "vit_mlp": None, "vit_merge": None,
}


def make_mesh(data: int = 1, model: int | None = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ``(data, model)`` mesh. ``model=None`` takes every device not used by ``data``."""
    devices = list(jax.devices() if devices is None else devices)
    if model is None:
        if len(devices) % data:
            raise ValueError(f"data={data} does not divide the {len(devices)} devices")
        model = len(devices) // data
    if data * model > len(devices):
        raise ValueError(f"a {data} x {model} mesh needs {data * model} devices; {len(devices)} are available")
    grid = np.asarray(devices[: data * model], dtype=object).reshape(data, model)
    return Mesh(grid, (DATA, MODEL))


def _check_rules(rules: Mapping[str, str | None], mesh: Mesh) -> None:
    for logical, axis in rules.items():
        if axis is not None and axis not in mesh.shape:
            raise ValueError(f"sharding rule {logical!r} -> {axis!r}: the mesh has no axis {axis!r} "
                             f"(its axes: {tuple(mesh.shape)})")


def spec_for(axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
             rules: Mapping[str, str | None] = DEFAULT_RULES) -> P:
    """``PartitionSpec`` for one array with logical ``axes``; undivisible or reused mesh axes replicate."""
    if len(axes) != len(shape):
        raise ValueError(f"logical axes {tuple(axes)} do not match the shape {tuple(shape)}")
    out, used = [], set()
    for name, size in zip(axes, shape):
        axis = rules.get(name) if name is not None else None
        if name is not None and name not in rules:
            raise ValueError(f"no sharding rule for logical axis {name!r}; add it to the rules (None replicates)")
        if axis is None or axis in used or size % mesh.shape[axis]:
            out.append(None)
        else:
            out.append(axis)
            used.add(axis)
    return P(*out)


def param_sharding(cfg: ModelConfig, mesh: Mesh, rules: Mapping[str, str | None] = DEFAULT_RULES):
    """A function ``(name, ShapeDtypeStruct) -> NamedSharding`` for ``load_params``/``random_params``."""
    _check_rules(rules, mesh)
    axes = M.param_axes(cfg)

    def placement(name: str, spec) -> NamedSharding:
        if name not in axes:
            raise KeyError(f"parameter {name!r} is not part of the model config")
        return NamedSharding(mesh, spec_for(axes[name], spec.shape, mesh, rules))

    return placement


def _quantized_placement(leaf, out_spec: P, mesh: Mesh):
    """Shardings for a quantized leaf: packed words [S, N], scales/zeros [G, N] and low-rank factors
    follow the float weight's *output* dim; their K-side dims are stored strided (see
    ``pallas_kernels/quant_matmul/layout.py``), so a split of the input dim is not a contiguous block
    of rows there and they stay replicated along it."""
    out_axis = out_spec[0] if len(out_spec) else None
    kn = NamedSharding(mesh, P(None, out_axis))
    rep = NamedSharding(mesh, P())
    children = {}
    for field in dataclasses.fields(leaf):
        value = getattr(leaf, field.name)
        if not isinstance(value, jax.Array | np.ndarray):
            continue
        if value.ndim == 2 and value.shape[1] == leaf.out_features:
            children[field.name] = kn
        elif value.ndim == 2 and value.shape[0] == leaf.out_features:  # [N, r] adapters
            children[field.name] = NamedSharding(mesh, P(out_axis, None))
        else:
            children[field.name] = rep
    return children


def shard_params(params: Mapping, cfg: ModelConfig, mesh: Mesh,
                 rules: Mapping[str, str | None] = DEFAULT_RULES) -> dict:
    """Place an existing parameter tree (float arrays or quantized leaves) onto ``mesh``."""
    _check_rules(rules, mesh)
    axes = M.param_axes(cfg, M.is_fused(params))
    flat = M.flatten(params)
    out = {}
    for name, leaf in flat.items():
        if name not in axes:
            raise KeyError(f"parameter {name!r} is not part of the model config")
        if dataclasses.is_dataclass(leaf) and hasattr(leaf, "out_features"):
            logical_shape = (leaf.out_features, leaf.in_features)
            spec = spec_for(axes[name], logical_shape, mesh, rules)
            placements = _quantized_placement(leaf, spec, mesh)
            out[name] = dataclasses.replace(
                leaf, **{k: jax.device_put(getattr(leaf, k), s) for k, s in placements.items()})
        else:
            out[name] = jax.device_put(leaf, NamedSharding(mesh, spec_for(axes[name], leaf.shape, mesh, rules)))
    return M.unflatten(out)


def batch_sharding(mesh: Mesh, ndim: int = 2, rules: Mapping[str, str | None] = DEFAULT_RULES) -> NamedSharding:
    """Inputs ``[B, T, ...]``: the batch over the data axis, the rest replicated."""
    return NamedSharding(mesh, P(rules.get("batch"), *([None] * (ndim - 1))))


def describe(params: Mapping) -> dict[str, str]:
    """``{name: str(PartitionSpec)}`` of a placed tree, for notebooks and tests."""
    out = {}
    for name, leaf in M.flatten(params).items():
        arr = getattr(leaf, "packed", leaf)
        sh = getattr(arr, "sharding", None)
        out[name] = str(sh.spec) if isinstance(sh, NamedSharding) else str(sh)
    return out


__all__ = ["DATA", "MODEL", "DEFAULT_RULES", "make_mesh", "spec_for", "param_sharding", "shard_params",
           "batch_sharding", "describe"]
