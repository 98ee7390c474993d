"""Checkpoint I/O in the Hugging Face layout: one declarative name map between our parameter paths and
the tensor names on disk, a strict lazy loader, and a writer.

Our paths mirror HF's module tree without the ``model.`` wrapper, so the map is a table of prefixes
per architecture (it is a bijection; see :data:`NAME_MAP`). The loader validates everything it can
before reading a byte of data (names, shapes, dtypes), then reads one tensor at a time and places it on
the device, so host memory never holds more than one tensor of a 54 GB checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from qwen35_jax import model as M
from qwen35_jax.config import CAUSAL_LM, CONDITIONAL_GENERATION, ModelConfig, config_to_hf_dict, load_config
from qwen35_jax.safetensors_io import CheckpointError, TensorInfo, index_checkpoint, read_tensor, save_checkpoint

# (our prefix, prefix on disk), per checkpoint layout. Longest HF prefixes first, so that mapping back
# from disk names is unambiguous ("model.language_model." before a bare "model.").
NAME_MAP: dict[str, tuple[tuple[str, str], ...]] = {
    CONDITIONAL_GENERATION: (
        ("language_model.", "model.language_model."),
        ("visual.", "model.visual."),
        ("lm_head.", "lm_head."),
        ("mtp.", "mtp."),
    ),
    CAUSAL_LM: (
        ("language_model.", "model."),
        ("lm_head.", "lm_head."),
        ("mtp.", "mtp."),
    ),
}

# Stored dtypes a float parameter may have (fp8 or integers mean a quantized checkpoint).
FLOAT_DTYPES = ("F32", "BF16", "F16", "F64")

Sharding = Any  # a jax.sharding.Sharding, or a function (name, ShapeDtypeStruct) -> Sharding


def to_hf_name(cfg: ModelConfig, name: str) -> str:
    """Our parameter path -> the tensor name in an HF checkpoint of ``cfg.architecture``."""
    for ours, theirs in NAME_MAP[cfg.architecture]:
        if name.startswith(ours):
            return theirs + name[len(ours):]
    raise KeyError(f"parameter {name!r} has no name in the {cfg.architecture} layout")


def from_hf_name(cfg: ModelConfig, hf_name: str) -> str | None:
    """The inverse of :func:`to_hf_name`; None for names outside the map."""
    for ours, theirs in sorted(NAME_MAP[cfg.architecture], key=lambda p: -len(p[1])):
        if hf_name.startswith(theirs):
            return ours + hf_name[len(theirs):]
    return None


@dataclasses.dataclass
class LoadResult:
    """What :func:`load_params` returns: the params tree and the checkpoint tensors it did not use
    (with the reason), e.g. ``mtp.*`` when config.json declares no MTP head."""

    params: dict
    unused: dict[str, str]


def _resolve_sharding(sharding: Sharding, name: str, spec: jax.ShapeDtypeStruct):
    return sharding(name, spec) if callable(sharding) else sharding


def load_params(path: str | os.PathLike, cfg: ModelConfig, *, dtype=jnp.bfloat16,
                sharding: Sharding | None = None, index: Mapping[str, TensorInfo] | None = None) -> LoadResult:
    """Load every parameter of ``cfg`` from the safetensors in ``path``, strictly.

    dtype: the dtype every parameter is cast to (None keeps each tensor's stored dtype, which makes
        a load -> save round trip bit-exact).
    sharding: where to put each tensor (a Sharding, or a function (name, ShapeDtypeStruct) -> Sharding);
        None places on the default device.

    Raises :class:`CheckpointError` naming the tensor and the file for: a tensor the model does not
    have, a missing tensor, a shape that differs from the config, a non-float tensor.
    """
    index = index_checkpoint(path) if index is None else index
    specs = M.param_specs(cfg, jnp.float32)
    has_mtp = any(name.startswith("mtp.") for name in index)
    if not has_mtp and any(name.startswith("mtp.") for name in specs):
        # Derivatives saved by transformers drop the MTP head but keep mtp_num_hidden_layers in the
        # config: load the rest and say so (speculative decoding then needs another draft source).
        warnings.warn(f"{path}: config.json declares an MTP head but the checkpoint has no mtp.* tensors; "
                      f"loading without it", stacklevel=2)
        specs = {k: v for k, v in specs.items() if not k.startswith("mtp.")}
    by_name: dict[str, TensorInfo] = {}
    unused: dict[str, str] = {}
    unexpected: list[str] = []
    for hf_name, info in index.items():
        name = from_hf_name(cfg, hf_name)
        if name in specs:
            by_name[name] = info
        elif hf_name.startswith("mtp.") and cfg.text.mtp_num_hidden_layers == 0:
            unused[hf_name] = "config.json declares no MTP head (mtp_num_hidden_layers = 0)"
        elif name == "lm_head.weight" and cfg.tie_word_embeddings:
            unused[hf_name] = "tie_word_embeddings is true: the head is the embedding (as in transformers)"
        else:
            unexpected.append(f"{hf_name!r} in {info.path}")
    if unexpected:
        shown = "; ".join(unexpected[:5]) + (f"; ... ({len(unexpected)} in all)" if len(unexpected) > 5 else "")
        raise CheckpointError(
            f"{path}: tensor(s) that {cfg.architecture} with this config.json does not have: {shown}"
        )
    missing = [to_hf_name(cfg, n) for n in specs if n not in by_name]
    if missing:
        shown = ", ".join(repr(m) for m in missing[:5]) + (f", ... ({len(missing)} in all)" if len(missing) > 5 else "")
        raise CheckpointError(f"{path}: missing tensor(s) {shown}: the checkpoint does not match its config.json")
    for name, info in by_name.items():
        expected = tuple(specs[name].shape)
        if tuple(info.shape) != expected:
            raise CheckpointError(
                f"{info.path}: tensor {info.name!r} has shape {list(info.shape)} but the config implies {list(expected)}"
            )
        if info.dtype not in FLOAT_DTYPES:
            raise CheckpointError(
                f"{info.path}: tensor {info.name!r} has dtype {info.dtype}; a float checkpoint was expected "
                f"(quantized checkpoints are read by quant.formats)"
            )

    flat = {}
    for name in specs:  # deterministic order: the module order
        info = by_name[name]
        array = read_tensor(info)
        target = jnp.dtype(dtype) if dtype is not None else array.dtype
        if array.dtype != target:
            array = array.astype(target)  # round-to-nearest-even, as torch's .to(bfloat16)
        spec = jax.ShapeDtypeStruct(array.shape, array.dtype)
        placement = _resolve_sharding(sharding, name, spec)
        flat[name] = jax.device_put(array, placement) if placement is not None else jnp.asarray(array)
        del array
    return LoadResult(params=M.unflatten(flat), unused=unused)


def load_checkpoint(path: str | os.PathLike, dtype=jnp.float32, *, sharding: Sharding | None = None):
    """``cfg, params = load_checkpoint(path)``: read ``config.json`` and every parameter.

    Checkpoint tensors the model does not use (e.g. ``mtp.*`` when the config declares no MTP head) are
    listed in a warning; use :func:`load_params` to get them as a list.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint path {path} does not exist")
    if not path.is_dir():
        raise CheckpointError(f"checkpoint path {path} is not a directory (expected config.json + *.safetensors)")
    cfg = load_config(path)
    result = load_params(path, cfg, dtype=dtype, sharding=sharding)
    if result.unused:
        names = sorted(result.unused)
        shown = ", ".join(names[:4]) + (f", ... ({len(names)} in all)" if len(names) > 4 else "")
        warnings.warn(f"{path}: {len(names)} checkpoint tensor(s) not used: {shown}", stacklevel=2)
    return cfg, result.params


def hf_state_dict(cfg: ModelConfig, params: Mapping) -> dict[str, Any]:
    """``{hf name: array}`` for every parameter in ``params`` (float leaves only; fused projections are
    split back into the HF names)."""
    out = {}
    for name, leaf in M.flatten(M.unfuse_projections(cfg, params)).items():
        if not hasattr(leaf, "shape") or hasattr(leaf, "apply_linear"):
            raise CheckpointError(
                f"parameter {name!r} is a {type(leaf).__name__}, not a float array: the HF float layout cannot "
                f"hold it (export quantized trees with the writers in quant.formats)"
            )
        out[to_hf_name(cfg, name)] = leaf
    return out


def save_params(path: str | os.PathLike, cfg: ModelConfig, params: Mapping, *, dtype=None,
                extra: Mapping[str, Any] | None = None, max_shard_bytes: int = 5 * 2**30,
                overwrite: bool = False) -> list[Path]:
    """Write ``config.json`` and the safetensors of ``params`` in the HF layout of ``cfg.architecture``
    (transformers loads the result). ``dtype`` casts every tensor (None keeps them); ``extra`` adds raw
    HF-named tensors (e.g. the ``unused`` ones from :func:`load_params`, so nothing is lost in a round
    trip). Refuses to overwrite existing files unless ``overwrite=True``."""
    path = Path(path)
    tensors = hf_state_dict(cfg, params)
    if dtype is not None:
        tensors = {k: _LazyCast(v, jnp.dtype(dtype)) for k, v in tensors.items()}
    for k, v in (extra or {}).items():
        if k in tensors:
            raise CheckpointError(f"extra tensor {k!r} collides with a model parameter")
        tensors[k] = v
    config_file = path / "config.json"
    if config_file.exists() and not overwrite:
        raise CheckpointError(f"{config_file} already exists; pass overwrite=True to replace the checkpoint")
    files = save_checkpoint(tensors, path, max_shard_bytes=max_shard_bytes, overwrite=overwrite)
    cfg_dict = config_to_hf_dict(cfg)
    cfg_dict["dtype"] = _dtype_name(next(iter(tensors.values())).dtype) if tensors else "float32"
    tmp = config_file.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(cfg_dict, indent=2) + "\n")
    os.replace(tmp, config_file)
    return [*files, config_file]


class _LazyCast:
    """An array-like that casts only when the writer converts it (one tensor in host memory at a time)."""

    def __init__(self, array, dtype):
        self._array, self.dtype, self.shape = array, np.dtype(dtype), tuple(array.shape)

    def __array__(self, dtype=None, copy=None):
        out = np.asarray(jax.device_get(self._array)).astype(self.dtype)
        return out if dtype is None else out.astype(dtype)


def _dtype_name(dtype) -> str:
    return {"bfloat16": "bfloat16", "float16": "float16", "float32": "float32"}.get(np.dtype(dtype).name, "float32")


def sharding_by_name(fn: Callable[[str, jax.ShapeDtypeStruct], Any]) -> Callable[[str, jax.ShapeDtypeStruct], Any]:
    """Identity helper that documents the callable form of ``sharding=`` (name, spec) -> Sharding."""
    return fn
