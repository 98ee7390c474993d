"""Save and load (possibly quantized) parameter trees: orbax for the arrays, a JSON sidecar for the
structure and the static metadata, so :func:`load` rebuilds the tree without a target from the
caller.

Directory layout::

    <dir>/quant_meta.json   format/version, one entry per leaf: its key path (JSON keeps int keys
                            ints), its kind ("array" or a registered leaf type name), the leaf type's
                            static fields, and shape/dtype of every array; an optional "extra" dict
    <dir>/arrays/           an orbax StandardCheckpointer checkpoint of a nested dict of arrays
                            (string keys; a quantized leaf is a dict of its array children)

Round trips are bit-exact (orbax stores the raw buffers).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np

from quant.leaves import QuantizedWeight, dtype_name
from quant.quantize import build, walk

FORMAT = "qwen35-jax-params"
VERSION = 1
META_FILE = "quant_meta.json"
ARRAYS_DIR = "arrays"

# Quantized leaf types the sidecar can name: registered pytree dataclasses whose static fields are
# JSON values and whose data fields are arrays or None.
LEAF_TYPES: dict[str, type] = {}


def register_leaf_type(cls: type) -> type:
    """Make a quantized leaf dataclass savable (its class name is its tag in the sidecar)."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls.__name__} is not a dataclass")
    LEAF_TYPES[cls.__name__] = cls
    return cls


register_leaf_type(QuantizedWeight)


def _fields(cls) -> tuple[list[str], list[str]]:
    """(data field names, static field names) of a leaf dataclass."""
    data, static = [], []
    for f in dataclasses.fields(cls):
        (static if f.metadata.get("static", False) else data).append(f.name)
    return data, static


def _is_array(x) -> bool:
    return isinstance(x, (jax.Array, np.ndarray))


def _array_meta(a) -> dict[str, Any]:
    return {"shape": list(a.shape), "dtype": dtype_name(a.dtype)}


def _check_key(k, where) -> str:
    if isinstance(k, bool) or not isinstance(k, (str, int)):
        raise TypeError(f"{where}: keys must be str or int, got {k!r}")
    if isinstance(k, str) and ("." in k or "/" in k or not k):
        raise ValueError(f"{where}: key {k!r} is empty or holds '.' or '/' (save the nested tree, not a flat one)")
    return str(k)


def save(path: str | os.PathLike, tree: Mapping, *, extra: Mapping[str, Any] | None = None) -> Path:
    """Write ``tree`` (nested dict of arrays and quantized leaves) to a new directory ``path``.

    extra: JSON-serialisable metadata stored in the sidecar (e.g. ``recipe.to_dict()``).
    Refuses to write into an existing path.
    """
    path = Path(path).absolute()
    if path.exists():
        raise FileExistsError(f"{path} already exists; refusing to overwrite it (choose a new directory)")
    entries, arrays = [], []
    for keys, leaf in walk(tree):
        where = ".".join(map(str, keys))
        str_keys = [_check_key(k, where) for k in keys]
        if _is_array(leaf):
            entries.append({"keys": list(keys), "kind": "array", **_array_meta(leaf)})
            arrays.append((tuple(str_keys), leaf))
            continue
        kind = type(leaf).__name__
        if LEAF_TYPES.get(kind) is not type(leaf):
            raise TypeError(f"{where}: cannot save a leaf of type {kind}; known leaf types: {sorted(LEAF_TYPES)}")
        data, static = _fields(type(leaf))
        children = {}
        for name in data:
            child = getattr(leaf, name)
            if child is None:
                children[name] = None
            elif _is_array(child):
                children[name] = _array_meta(child)
                arrays.append((tuple(str_keys) + (name,), child))
            else:
                raise TypeError(f"{where}.{name}: expected an array or None, got {type(child).__name__}")
        entries.append({"keys": list(keys), "kind": kind, "static": {n: getattr(leaf, n) for n in static},
                        "children": children})
    meta = {"format": FORMAT, "version": VERSION, "leaves": entries, "extra": dict(extra or {})}
    text = json.dumps(meta, indent=1)  # fails early (before any file exists) on non-JSON extra/static
    import orbax.checkpoint as ocp

    path.mkdir(parents=True)
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(path / ARRAYS_DIR, build(arrays))
    ckpt.wait_until_finished()
    (path / META_FILE).write_text(text)
    return path


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
    """The sidecar of a saved tree (structure, static metadata, ``extra``)."""
    f = Path(path) / META_FILE
    if not f.is_file():
        raise FileNotFoundError(f"{f} not found: {path} is not a tree saved by quant.save")
    meta = json.loads(f.read_text())
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise ValueError(f"{f}: format {meta.get('format')!r} version {meta.get('version')!r}, expected "
                         f"{FORMAT!r} version {VERSION}")
    return meta


def load(path: str | os.PathLike, *, sharding: jax.sharding.Sharding | None = None) -> dict:
    """Rebuild a tree written by :func:`save`: the same nesting and key types, quantized leaves of
    the saved types with their static metadata, every array bit-identical. ``sharding`` places
    every array (default: the first device)."""
    import orbax.checkpoint as ocp

    path = Path(path).absolute()
    meta = read_meta(path)
    sharding = sharding or jax.sharding.SingleDeviceSharding(jax.devices()[0])

    def spec(m):
        return jax.ShapeDtypeStruct(tuple(m["shape"]), np.dtype(m["dtype"]), sharding=sharding)

    targets = []
    for e in meta["leaves"]:
        sk = tuple(str(k) for k in e["keys"])
        if e["kind"] == "array":
            targets.append((sk, spec(e)))
        else:
            targets.extend((sk + (n,), spec(m)) for n, m in e["children"].items() if m is not None)
    restored = ocp.StandardCheckpointer().restore(path / ARRAYS_DIR, build(targets))

    def get(keys):
        node = restored
        for k in keys:
            node = node[k]
        return node

    out = []
    for e in meta["leaves"]:
        keys = tuple(e["keys"])
        sk = tuple(str(k) for k in keys)
        if e["kind"] == "array":
            out.append((keys, get(sk)))
            continue
        cls = LEAF_TYPES.get(e["kind"])
        if cls is None:
            raise ValueError(f"{'.'.join(sk)}: unknown leaf type {e['kind']!r} in {path / META_FILE}; "
                             f"known: {sorted(LEAF_TYPES)}")
        children = {n: (None if m is None else get(sk + (n,))) for n, m in e["children"].items()}
        leaf = cls(**children, **e["static"])
        if hasattr(leaf, "validate"):
            leaf.validate()
        out.append((keys, leaf))
    return build(out)
