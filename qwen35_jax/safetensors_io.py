"""Strict, lazy safetensors reader and streaming, sharding writer.

Only safetensors headers and JSON are ever parsed (never pickle).  Reading is lazy:
``index_checkpoint`` parses headers only, and ``read_tensor`` reads exactly one tensor's
bytes, so a 54 GB checkpoint is never held in memory at once.  Every problem is raised
as :class:`CheckpointError` whose message names the file and, where relevant, the tensor.

File layout: 8-byte little-endian header length N, N bytes of UTF-8 JSON mapping tensor
name -> {"dtype", "shape", "data_offsets": [begin, end]} (relative to the byte after the
header) plus an optional "__metadata__" str->str map, then little-endian C-order data.
"""

from __future__ import annotations

import json
import math
import os
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

__all__ = ["CheckpointError", "TensorInfo", "read_header", "index_checkpoint", "read_tensor",
           "save_checkpoint", "INDEX_NAME", "SINGLE_NAME"]

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
# Same limit as the reference Rust implementation: a larger header is corrupt or hostile.
MAX_HEADER_BYTES = 100_000_000

# Explicitly little-endian, since that is what the format stores.
_DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_), "U8": np.dtype("u1"), "I8": np.dtype("i1"),
    "U16": np.dtype("<u2"), "I16": np.dtype("<i2"), "U32": np.dtype("<u4"),
    "I32": np.dtype("<i4"), "U64": np.dtype("<u8"), "I64": np.dtype("<i8"),
    "F16": np.dtype("<f2"), "F32": np.dtype("<f4"), "F64": np.dtype("<f8"),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
}
_ST_NAMES: dict[np.dtype, str] = {dt: name for name, dt in _DTYPES.items()}


class CheckpointError(ValueError):
    """Any malformed, inconsistent or unwritable checkpoint."""


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: ``begin``/``end`` are absolute byte offsets in ``path``."""

    name: str
    path: Path
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        """Size of the tensor's data in bytes."""
        return self.end - self.begin

    @property
    def np_dtype(self) -> np.dtype:
        """numpy dtype (ml_dtypes for BF16 / F8_*) matching ``dtype``."""
        return _DTYPES[self.dtype]


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)  # JSON true is not a size


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # json.loads silently keeps the last duplicate; a duplicated tensor name is corruption.
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise CheckpointError(f"duplicate key {key!r} in JSON object")
        out[key] = value
    return out


def _load_json(raw: bytes, where: str) -> Any:
    try:
        # Decode explicitly: json.loads(bytes) would also accept UTF-16/32.
        return json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicate_keys)
    except CheckpointError as e:
        raise CheckpointError(f"{where}: {e}") from None
    except (UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{where}: not valid UTF-8 JSON ({e})") from None


def read_header(path: str | os.PathLike) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and validate the header of ONE safetensors file; returns (tensors, metadata)."""
    path = Path(os.path.abspath(path))
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 8:
                raise CheckpointError(f"{path}: file has {size} bytes, fewer than the 8-byte "
                                      "header length prefix of a safetensors file")
            n = int.from_bytes(f.read(8), "little")
            if n == 0 or n > MAX_HEADER_BYTES or 8 + n > size:
                raise CheckpointError(
                    f"{path}: corrupted header: header length {n} must be between 1 and "
                    f"{MAX_HEADER_BYTES} and fit in the file ({size} bytes)")
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read file: {e}") from None
    header = _load_json(raw, f"{path}: corrupted header")
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupted header: expected a JSON object, "
                              f"got {type(header).__name__}")

    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise CheckpointError(f"{path}: __metadata__ must map strings to strings, got {metadata!r}")

    data_start, data_size = 8 + n, size - 8 - n
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        where = f"{path}: tensor {name!r}"
        if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
            raise CheckpointError(f"{where}: entry must be an object with keys dtype, shape, "
                                  f"data_offsets, got {entry!r}")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if dtype not in _DTYPES:
            raise CheckpointError(f"{where}: unknown dtype {dtype!r}, expected one of "
                                  f"{', '.join(_DTYPES)}")
        if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
            raise CheckpointError(f"{where}: shape must be a list of non-negative ints, "
                                  f"got {shape!r}")
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(_is_int(o) for o in offsets) or not 0 <= offsets[0] <= offsets[1]):
            raise CheckpointError(f"{where}: data_offsets must be [begin, end] with "
                                  f"0 <= begin <= end, got {offsets!r}")
        need = math.prod(shape) * _DTYPES[dtype].itemsize
        if offsets[1] - offsets[0] != need:
            raise CheckpointError(f"{where} needs {need} bytes ({dtype} {shape}) but "
                                  f"data_offsets give {offsets[1] - offsets[0]}")
        if offsets[1] > data_size:
            raise CheckpointError(
                f"{where}: file is truncated: header declares data up to byte "
                f"{data_start + offsets[1]} but the file has {size}")
        tensors[name] = TensorInfo(name, path, dtype, tuple(shape),
                                   data_start + offsets[0], data_start + offsets[1])

    # Empty tensors occupy no bytes, so they cannot overlap anything.
    spans = sorted((t for t in tensors.values() if t.nbytes), key=lambda t: (t.begin, t.end))
    for prev, cur in zip(spans, spans[1:]):
        if cur.begin < prev.end:
            raise CheckpointError(
                f"{path}: overlapping tensors {prev.name!r} (bytes {prev.begin}..{prev.end}) "
                f"and {cur.name!r} (bytes {cur.begin}..{cur.end}); expected disjoint regions")
    return tensors, dict(metadata)


def _read_index(index: Path) -> dict[str, TensorInfo]:
    """Read a sharded checkpoint through its index, cross-checking index and shards."""
    try:
        raw = index.read_bytes()
    except OSError as e:
        raise CheckpointError(f"{index}: cannot read index: {e}") from None
    data = _load_json(raw, f"{index}: index")
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
        raise CheckpointError(f"{index}: expected a JSON object with a \"weight_map\" object "
                              "mapping tensor names to file names")
    headers: dict[str, dict[str, TensorInfo]] = {}
    for fname in sorted(set(weight_map.values())):
        # Shards must sit next to the index; never follow names out of the directory.
        if Path(fname).name != fname or fname in (".", ".."):
            raise CheckpointError(f"{index}: weight_map names {fname!r}, expected a plain "
                                  "file name in the same directory")
        shard = index.parent / fname
        if not shard.is_file():
            raise CheckpointError(f"{index}: weight_map names file {fname!r} but {shard} "
                                  "does not exist")
        headers[fname] = read_header(shard)[0]
    out: dict[str, TensorInfo] = {}
    for name, fname in weight_map.items():
        if name not in headers[fname]:
            raise CheckpointError(f"{index}: tensor {name!r} is mapped to "
                                  f"{index.parent / fname} but that file does not contain it")
        out[name] = headers[fname][name]
    for fname, tensors in headers.items():
        for name in tensors:
            if weight_map.get(name) != fname:
                listed = (f"maps it to {weight_map[name]!r}" if name in weight_map
                          else "does not list it")
                raise CheckpointError(f"{index.parent / fname}: tensor {name!r} is in this "
                                      f"file but {index} {listed}")
    return out


def index_checkpoint(path: str | os.PathLike) -> dict[str, TensorInfo]:
    """Map every tensor name of a checkpoint (directory, ``.safetensors`` file or index
    ``.json``) to its location, reading headers only."""
    path = Path(os.path.abspath(path))
    if not path.exists():
        raise CheckpointError(f"checkpoint path {path} does not exist")
    if path.is_file():
        return _read_index(path) if path.name.endswith(".json") else read_header(path)[0]
    indexes = sorted(path.glob("*.safetensors.index.json"))
    if len(indexes) > 1:
        raise CheckpointError(f"{path}: several index files "
                              f"({', '.join(p.name for p in indexes)}), expected one")
    if indexes:
        return _read_index(indexes[0])
    files = sorted(p for p in path.glob("*.safetensors") if p.is_file())
    if not files:
        names = sorted(p.name for p in path.iterdir())
        listing = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
        raise CheckpointError(f"{path}: directory has no *.safetensors file (it contains: "
                              f"{listing or 'nothing'})")
    out: dict[str, TensorInfo] = {}
    for file in files:
        for name, info in read_header(file)[0].items():
            if name in out:
                raise CheckpointError(f"tensor {name!r} appears in both {out[name].path} and "
                                      f"{file}; without {INDEX_NAME} names must be unique")
            out[name] = info
    return out


def read_tensor(info: TensorInfo) -> np.ndarray:
    """Read exactly one tensor's bytes into a fresh, C-contiguous, self-owned array."""
    out = np.empty(info.shape, dtype=info.np_dtype)
    buf = memoryview(out.reshape(-1).view(np.uint8))  # reshape of a fresh array is a view
    try:
        # Unbuffered: bytes go straight into ``out``; loop because a read may be short.
        with open(info.path, "rb", buffering=0) as f:
            f.seek(info.begin)
            done = 0
            while done < len(buf):
                got = f.readinto(buf[done:])
                if not got:
                    raise CheckpointError(
                        f"{info.path}: file is truncated: tensor {info.name!r} needs bytes "
                        f"{info.begin}..{info.end} but the file ends at {info.begin + done}")
                done += got
    except OSError as e:
        raise CheckpointError(f"{info.path}: cannot read tensor {info.name!r}: {e}") from None
    return out


def _plan(where: Path, name: str, value: Any) -> tuple[Any, tuple[int, ...], str]:
    """Shape and safetensors dtype of one array-like, without copying it to host memory."""
    if not (hasattr(value, "shape") and hasattr(value, "dtype")):
        value = np.asarray(value)  # Python scalars / lists: small, convert now
    try:
        dt = np.dtype(value.dtype)
        st = _ST_NAMES.get(dt.newbyteorder("<"))  # big-endian input is byte-swapped on write
    except TypeError:
        st = None
    if st is None:
        raise CheckpointError(f"{where}: tensor {name!r}: unsupported dtype {value.dtype}, "
                              "expected bool, (u)int8/16/32/64, float16/32/64, bfloat16, "
                              "float8_e4m3fn or float8_e5m2")
    return value, tuple(int(d) for d in value.shape), st


def _temp_name(target: Path) -> Path:
    # Hidden and not *.safetensors, so a leftover from a crash is never taken for a shard.
    return target.with_name(f".{target.name}.{secrets.token_hex(4)}.tmp")


def _write_file(tmp: Path, target: Path, entries: list[tuple[str, Any, tuple[int, ...], str]],
                metadata: dict[str, str]) -> None:
    """Write one shard (destined for ``target``) to the temporary file ``tmp``."""
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for name, _, shape, st in entries:
        nbytes = math.prod(shape) * _DTYPES[st].itemsize
        header[name] = {"dtype": st, "shape": list(shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    raw += b" " * (-len(raw) % 8)  # keeps the data section 8-byte aligned
    with open(tmp, "xb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        for name, value, shape, st in entries:
            arr = np.asarray(value, dtype=_DTYPES[st], order="C")  # one tensor on host at a time
            if arr.shape != shape:
                raise CheckpointError(f"{target}: tensor {name!r} changed shape from {shape} "
                                      f"to {arr.shape} while saving")
            f.write(arr.reshape(-1).view(np.uint8))
            del arr  # free this tensor's host copy before the next one is made
        f.flush()
        os.fsync(f.fileno())  # data is on disk before the rename makes it visible


def save_checkpoint(tensors: Mapping[str, Any] | Iterable[tuple[str, Any]],
                    path: str | os.PathLike, *, max_shard_bytes: int = 5 * 2**30,
                    metadata: Mapping[str, str] | None = None,
                    overwrite: bool = False) -> list[Path]:
    """Save tensors (numpy or jax arrays) as an HF-style safetensors checkpoint directory.

    Writes ``model.safetensors`` if everything fits in ``max_shard_bytes``, otherwise
    ``model-0000i-of-0000N.safetensors`` shards plus ``model.safetensors.index.json``.
    Tensors are converted to host memory one at a time while writing.  ``metadata`` is
    merged over the default ``{"format": "pt"}``.  Refuses a directory that already holds
    a checkpoint unless ``overwrite=True``, in which case stale ``*.safetensors`` and
    ``*.safetensors.index.json`` files are removed so the directory stays consistent.
    Returns the written paths (shards, then the index if any).
    """
    path = Path(os.path.abspath(path))
    if max_shard_bytes <= 0:
        raise CheckpointError(f"{path}: max_shard_bytes must be positive, got {max_shard_bytes}")
    meta = {"format": "pt", **(metadata or {})}
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise CheckpointError(f"{path}: metadata must map strings to strings, got {meta!r}")
    items = tensors.items() if isinstance(tensors, Mapping) else tensors
    planned: list[tuple[str, Any, tuple[int, ...], str]] = []
    seen: set[str] = set()
    for item in items:
        if not (isinstance(item, tuple) and len(item) == 2):
            raise CheckpointError(f"{path}: expected (name, array) pairs, got {item!r:.80}")
        name, value = item
        if not isinstance(name, str) or not name or name == "__metadata__":
            raise CheckpointError(f"{path}: invalid tensor name {name!r}")
        if name in seen:
            raise CheckpointError(f"{path}: duplicate tensor name {name!r}")
        seen.add(name)
        planned.append((name, *_plan(path, name, value)))

    # Greedy sharding in the given order, like transformers; an oversized tensor gets its own shard.
    shards: list[list[tuple[str, Any, tuple[int, ...], str]]] = [[]]
    shard_bytes, total = 0, 0
    for entry in planned:
        nbytes = math.prod(entry[2]) * _DTYPES[entry[3]].itemsize
        if shards[-1] and shard_bytes + nbytes > max_shard_bytes:
            shards.append([])
            shard_bytes = 0
        shards[-1].append(entry)
        shard_bytes += nbytes
        total += nbytes
    n = len(shards)
    names = [SINGLE_NAME] if n == 1 else [f"model-{i:05d}-of-{n:05d}.safetensors"
                                          for i in range(1, n + 1)]

    if path.exists() and not path.is_dir():
        raise CheckpointError(f"{path}: exists and is not a directory")
    path.mkdir(parents=True, exist_ok=True)
    ours = set(names) | ({INDEX_NAME} if n > 1 else set())
    existing = sorted(p.name for p in path.iterdir() if p.name in ours
                      or p.name.endswith((".safetensors", ".safetensors.index.json")))
    if existing and not overwrite:
        raise CheckpointError(f"{path}: directory already contains checkpoint files "
                              f"({', '.join(existing[:8])}); pass overwrite=True to replace them")

    temps: list[tuple[Path, Path]] = []
    try:
        for fname, entries in zip(names, shards):
            temps.append((_temp_name(path / fname), path / fname))
            _write_file(temps[-1][0], path / fname, entries, meta)
        if n > 1:
            index = {"metadata": {"total_size": total},
                     "weight_map": {e[0]: f for f, s in zip(names, shards) for e in s}}
            temps.append((_temp_name(path / INDEX_NAME), path / INDEX_NAME))
            with open(temps[-1][0], "x", encoding="utf-8") as f:
                f.write(json.dumps(index, indent=2, ensure_ascii=False) + "\n")
                f.flush()
                os.fsync(f.fileno())
    except BaseException:  # incl. KeyboardInterrupt: leave no temporary files behind
        for tmp, _ in temps:
            tmp.unlink(missing_ok=True)
        raise
    # overwrite=True: a stale index of another layout would shadow the new files, so it goes
    # first; stale shards go last.  Shards are renamed before the index, so a visible index
    # never names a shard that is not there yet.
    stale = [path / name for name in existing if name not in ours]
    for p in stale:
        if p.name.endswith(".json"):
            p.unlink(missing_ok=True)
    for tmp, final in temps:
        os.replace(tmp, final)
    for p in stale:
        p.unlink(missing_ok=True)
    return [final for _, final in temps]
