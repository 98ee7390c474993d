"""Tests for qwen35_jax.safetensors_io: round trips, interop with the reference
safetensors library, lazy reads, and one test per error case."""

from __future__ import annotations

import json
import os
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from qwen35_jax.safetensors_io import (INDEX_NAME, CheckpointError, TensorInfo, index_checkpoint,
                                       read_header, read_tensor, save_checkpoint)

ALL_DTYPES = [np.bool_, np.uint8, np.int8, np.uint16, np.int16, np.uint32, np.int32, np.uint64,
              np.int64, np.float16, np.float32, np.float64, ml_dtypes.bfloat16,
              ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e5m2]


def _random(dtype, shape, seed=0) -> np.ndarray:
    """Random bit patterns (NaNs, infs, denormals included) to test bit-exactness."""
    dtype = np.dtype(dtype)
    rng = np.random.default_rng(seed)
    if dtype == np.bool_:
        return rng.integers(0, 2, size=shape).astype(np.bool_)
    raw = rng.integers(0, 256, size=int(np.prod(shape)) * dtype.itemsize, dtype=np.uint8)
    return raw.view(dtype).reshape(shape)


def _bits(a: np.ndarray) -> bytes:
    return np.ascontiguousarray(a).tobytes()


def _assert_same(got: np.ndarray, want: np.ndarray) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape
    assert _bits(got) == _bits(want)


def _load_all(path) -> dict[str, np.ndarray]:
    return {name: read_tensor(info) for name, info in index_checkpoint(path).items()}


def _raw_file(path: Path, header, data: bytes = b"", *, header_bytes: bytes | None = None) -> Path:
    """Write a hand-made safetensors file (possibly malformed)."""
    raw = header_bytes if header_bytes is not None else json.dumps(header).encode()
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data)
    return path


def _f32_header(**tensors) -> dict:
    return {name: {"dtype": "F32", "shape": shape, "data_offsets": offs}
            for name, (shape, offs) in tensors.items()}


# --------------------------------------------------------------------------- round trips

def test_round_trip_every_dtype(tmp_path):
    tensors = {}
    for i, dt in enumerate(ALL_DTYPES):
        name = np.dtype(dt).name
        tensors[f"{name}.matrix"] = _random(dt, (3, 5), seed=i)
        tensors[f"{name}.scalar"] = _random(dt, (), seed=100 + i)
        tensors[f"{name}.empty"] = _random(dt, (0, 4), seed=200 + i)
    paths = save_checkpoint(tensors, tmp_path / "ckpt")
    assert paths == [tmp_path / "ckpt" / "model.safetensors"]
    raw = paths[0].read_bytes()
    assert int.from_bytes(raw[:8], "little") % 8 == 0  # header padded to 8 bytes
    infos, meta = read_header(paths[0])
    assert meta == {"format": "pt"}
    assert list(infos) == list(tensors)
    loaded = _load_all(tmp_path / "ckpt")
    for name, want in tensors.items():
        _assert_same(loaded[name], want)
        assert loaded[name].flags.c_contiguous and loaded[name].flags.owndata
    info = infos["bfloat16.matrix"]
    assert isinstance(info, TensorInfo) and info.np_dtype == ml_dtypes.bfloat16
    assert info.dtype == "BF16" and info.shape == (3, 5) and info.nbytes == 30


def test_sharded_round_trip(tmp_path):
    tensors = {f"layers.{i}.w": _random(np.float32, (4, 8), seed=i) for i in range(5)}  # 128 B each
    tensors["big"] = _random(ml_dtypes.bfloat16, (300,), seed=9)  # 600 B > limit: own shard
    paths = save_checkpoint(list(tensors.items()), tmp_path, max_shard_bytes=300,
                            metadata={"note": "x"})
    names = [p.name for p in paths]
    assert names == [f"model-0000{i}-of-00004.safetensors" for i in range(1, 5)] + [INDEX_NAME]
    index = json.loads((tmp_path / INDEX_NAME).read_text())
    assert index["metadata"]["total_size"] == 5 * 128 + 600
    assert index["weight_map"]["layers.0.w"] == "model-00001-of-00004.safetensors"
    assert index["weight_map"]["big"] == "model-00004-of-00004.safetensors"
    assert read_header(paths[0])[1] == {"format": "pt", "note": "x"}
    loaded = _load_all(tmp_path)
    assert loaded.keys() == tensors.keys()
    for name, want in tensors.items():
        _assert_same(loaded[name], want)
    assert index_checkpoint(tmp_path / INDEX_NAME).keys() == tensors.keys()  # index path works too
    assert not list(tmp_path.glob(".*"))  # no temporary files left behind


def test_save_jax_arrays_and_big_endian(tmp_path):
    import jax.numpy as jnp
    want = _random(ml_dtypes.bfloat16, (2, 3), seed=3)
    be = np.arange(6, dtype=">i4").reshape(2, 3)
    save_checkpoint({"j": jnp.asarray(want), "be": be, "fortran": np.asfortranarray(be)}, tmp_path)
    loaded = _load_all(tmp_path)
    _assert_same(loaded["j"], want)
    assert loaded["be"].dtype == np.dtype("<i4") and (loaded["be"] == be).all()
    assert (loaded["fortran"] == be).all()


def test_overwrite_replaces_stale_files(tmp_path):
    save_checkpoint({f"t{i}": np.full(10, i, np.float32) for i in range(3)}, tmp_path,
                    max_shard_bytes=40)
    save_checkpoint({"only": np.ones(2, np.float32)}, tmp_path, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]
    assert list(_load_all(tmp_path)) == ["only"]
    save_checkpoint({"x": np.ones(4, np.float32), "y": np.ones(4, np.float32)}, tmp_path,
                    max_shard_bytes=16, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", INDEX_NAME]
    assert list(_load_all(tmp_path)) == ["x", "y"]


def test_failed_save_leaves_no_files(tmp_path):
    class Exploding:
        shape, dtype = (4,), np.dtype(np.float32)

        def __array__(self, dtype=None, copy=None):
            raise RuntimeError("device lost")

    with pytest.raises(RuntimeError, match="device lost"):
        save_checkpoint({"ok": np.ones(4, np.float32), "bad": Exploding()}, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_index_ignores_stray_safetensors(tmp_path):
    save_checkpoint({"a": np.ones(4, np.float32), "b": np.zeros(4, np.float32)}, tmp_path,
                    max_shard_bytes=16)
    _raw_file(tmp_path / "stray.safetensors", {}, header_bytes=b"garbage!")
    assert index_checkpoint(tmp_path).keys() == {"a", "b"}


# --------------------------------------------------------------------------- interop

def test_reads_files_written_by_reference_library(tmp_path):
    import safetensors.numpy
    import safetensors.torch
    import torch
    tensors = {"f32": _random(np.float32, (3, 4)), "i64": _random(np.int64, (5,), 1),
               "bool": _random(np.bool_, (2, 2), 2), "f16": _random(np.float16, (7,), 3),
               "scalar": np.array(1.5, np.float64), "empty": np.zeros((0, 3), np.int32)}
    safetensors.numpy.save_file(tensors, tmp_path / "np.safetensors", metadata={"k": "v"})
    assert read_header(tmp_path / "np.safetensors")[1] == {"k": "v"}
    loaded = _load_all(tmp_path / "np.safetensors")
    for name, want in tensors.items():
        _assert_same(loaded[name], want)

    t = torch.randn(4, 6).to(torch.bfloat16)
    (tmp_path / "t").mkdir()
    safetensors.torch.save_file({"w": t}, tmp_path / "t" / "x.safetensors")
    got = _load_all(tmp_path / "t")["w"]
    assert got.dtype == ml_dtypes.bfloat16
    assert (got.view(np.int16) == t.view(torch.int16).numpy()).all()


def test_reference_library_reads_our_files(tmp_path):
    import safetensors.numpy
    import safetensors.torch
    import torch
    tensors = {"f32": _random(np.float32, (3, 4)), "u8": _random(np.uint8, (9,), 1),
               "bool": _random(np.bool_, (2, 3), 2), "scalar": np.array(7, np.int16),
               "empty": np.zeros((2, 0), np.float64)}
    [path] = save_checkpoint(tensors, tmp_path / "np")
    loaded = safetensors.numpy.load_file(path)
    for name, want in tensors.items():
        _assert_same(loaded[name], want)

    bf16 = _random(ml_dtypes.bfloat16, (5, 3), 4)
    fp8 = np.array([0.5, -2.0, 448.0, 0.0], ml_dtypes.float8_e4m3fn)
    [path] = save_checkpoint({"bf16": bf16, "fp8": fp8}, tmp_path / "torch")
    loaded = safetensors.torch.load_file(path)
    assert loaded["bf16"].dtype == torch.bfloat16
    assert (loaded["bf16"].view(torch.int16).numpy() == bf16.view(np.int16)).all()
    assert loaded["fp8"].dtype == torch.float8_e4m3fn
    assert loaded["fp8"].float().tolist() == [0.5, -2.0, 448.0, 0.0]


# --------------------------------------------------------------------------- laziness

def test_read_tensor_reads_only_its_bytes(tmp_path):
    tensors = {"a": _random(np.float32, (64,)), "b": _random(np.float32, (16, 4), 1),
               "c": _random(np.int8, (33,), 2)}
    [path] = save_checkpoint(tensors, tmp_path)
    infos, _ = read_header(path)
    with open(path, "r+b") as f:  # clobber every other tensor's region
        for name in ("a", "c"):
            f.seek(infos[name].begin)
            f.write(b"\xff" * infos[name].nbytes)
    _assert_same(read_tensor(infos["b"]), tensors["b"])
    assert not np.array_equal(read_tensor(infos["a"]), tensors["a"])


# --------------------------------------------------------------------------- errors

def _raises(match_parts, fn, *args, **kwargs) -> str:
    with pytest.raises(CheckpointError) as exc:
        fn(*args, **kwargs)
    msg = str(exc.value)
    for part in match_parts:
        assert str(part) in msg, f"{part!r} not in {msg!r}"
    return msg


def test_error_nonexistent_path(tmp_path):
    _raises([tmp_path / "nope", "does not exist"], index_checkpoint, tmp_path / "nope")


def test_error_directory_without_safetensors(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"x")
    (tmp_path / "config.json").write_text("{}")
    _raises([tmp_path, "no *.safetensors", "config.json", "pytorch_model.bin"],
            index_checkpoint, tmp_path)


def test_error_file_too_short(tmp_path):
    p = tmp_path / "short.safetensors"
    p.write_bytes(b"\x01\x02\x03")
    _raises([p, "3 bytes", "8-byte"], index_checkpoint, p)


def test_error_truncated_file(tmp_path):
    [p] = save_checkpoint({"x": np.ones(10, np.float32), "w": np.ones(100, np.float32)}, tmp_path)
    size = p.stat().st_size
    p.write_bytes(p.read_bytes()[:-8])
    _raises([p, "'w'", "truncated", f"up to byte {size}", f"the file has {size - 8}"],
            read_header, p)


@pytest.mark.parametrize("raw, phrase", [
    (b"\x00\xff garbage \xfe", "not valid UTF-8 JSON"),
    (b'{"x": {"dtype": "F32",', "not valid UTF-8 JSON"),
    ('{"w": {}}'.encode("utf-16"), "not valid UTF-8 JSON"),
    (b"[1, 2, 3]", "expected a JSON object"),
])
def test_error_corrupted_header(tmp_path, raw, phrase):
    p = _raw_file(tmp_path / "bad.safetensors", None, header_bytes=raw)
    _raises([p, "corrupted header", phrase], read_header, p)


@pytest.mark.parametrize("declared", [0, 10_000, 200_000_000])
def test_error_bad_header_length(tmp_path, declared):
    p = tmp_path / "bad.safetensors"
    p.write_bytes(declared.to_bytes(8, "little") + b"{}" * 100)
    _raises([p, "corrupted header", f"header length {declared}"], read_header, p)


def test_error_duplicate_name_in_header(tmp_path):
    entry = '{"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}'
    p = _raw_file(tmp_path / "d.safetensors", None,
                  header_bytes=f'{{"w": {entry}, "w": {entry}}}'.encode(), data=b"\0" * 4)
    _raises([p, "duplicate key 'w'"], read_header, p)


def test_error_unknown_dtype(tmp_path):
    p = _raw_file(tmp_path / "u.safetensors",
                  {"w": {"dtype": "C64", "shape": [1], "data_offsets": [0, 8]}}, b"\0" * 8)
    _raises([p, "'w'", "unknown dtype 'C64'", "BF16"], read_header, p)


@pytest.mark.parametrize("entry, phrase", [
    ({"dtype": "F32", "shape": [2, -1], "data_offsets": [0, 0]}, "non-negative ints"),
    ({"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}, "non-negative ints"),
    ({"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}, "0 <= begin <= end"),
    ({"dtype": "F32", "shape": [1]}, "data_offsets"),
    ("not an object", "entry must be an object"),
])
def test_error_malformed_entry(tmp_path, entry, phrase):
    p = _raw_file(tmp_path / "m.safetensors", {"w": entry}, b"\0" * 8)
    _raises([p, "'w'", phrase], read_header, p)


def test_error_bad_metadata(tmp_path):
    p = _raw_file(tmp_path / "m.safetensors", {"__metadata__": {"n": 3}})
    _raises([p, "__metadata__"], read_header, p)


def test_error_offsets_inconsistent_with_shape(tmp_path):
    p = _raw_file(tmp_path / "model-00002-of-00003.safetensors",
                  _f32_header(**{"model.norm.weight": ([5120], [0, 20476])}), b"\0" * 20480)
    _raises([p, "tensor 'model.norm.weight' needs 20480 bytes (F32 [5120]) but data_offsets "
                "give 20476"], read_header, p)


def test_error_overlapping_tensors(tmp_path):
    p = _raw_file(tmp_path / "o.safetensors",
                  _f32_header(a=([4], [0, 16]), b=([2], [8, 16]), e=([0], [4, 4])), b"\0" * 16)
    _raises([p, "overlapping", "'a'", "'b'"], read_header, p)


def test_error_duplicate_tensor_across_files(tmp_path):
    save_checkpoint({"w": np.ones(2, np.float32)}, tmp_path / "a")
    (tmp_path / "a" / "model.safetensors").rename(tmp_path / "one.safetensors")
    save_checkpoint({"w": np.ones(2, np.float32)}, tmp_path / "b")
    (tmp_path / "b" / "model.safetensors").rename(tmp_path / "two.safetensors")
    _raises(["'w'", tmp_path / "one.safetensors", tmp_path / "two.safetensors"],
            index_checkpoint, tmp_path)


def _sharded(tmp_path) -> tuple[Path, dict]:
    save_checkpoint({"a": np.ones(4, np.float32), "b": np.ones(4, np.float32)}, tmp_path,
                    max_shard_bytes=16)
    return tmp_path / INDEX_NAME, json.loads((tmp_path / INDEX_NAME).read_text())


def test_error_index_invalid(tmp_path):
    index, _ = _sharded(tmp_path)
    index.write_text("{not json")
    _raises([index, "not valid UTF-8 JSON"], index_checkpoint, tmp_path)
    index.write_text('{"metadata": {}}')
    _raises([index, "weight_map"], index_checkpoint, tmp_path)


def test_error_index_names_missing_file(tmp_path):
    index, data = _sharded(tmp_path)
    data["weight_map"]["b"] = "model-00009-of-00009.safetensors"
    index.write_text(json.dumps(data))
    _raises([index, "model-00009-of-00009.safetensors", "does not exist"],
            index_checkpoint, tmp_path)


def test_error_index_lists_tensor_not_in_file(tmp_path):
    index, data = _sharded(tmp_path)
    data["weight_map"]["ghost"] = "model-00001-of-00002.safetensors"
    index.write_text(json.dumps(data))
    _raises([index, "'ghost'", tmp_path / "model-00001-of-00002.safetensors", "does not contain"],
            index_checkpoint, tmp_path)


def test_error_tensor_in_file_but_not_in_index(tmp_path):
    # Shard 1 holds "a" and "extra" (16 + 4 bytes), shard 2 holds "b".
    save_checkpoint({"a": np.ones(4, np.float32), "extra": np.ones(1, np.float32),
                     "b": np.ones(4, np.float32)}, tmp_path, max_shard_bytes=20)
    index = tmp_path / INDEX_NAME
    data = json.loads(index.read_text())
    del data["weight_map"]["extra"]
    index.write_text(json.dumps(data))
    _raises([tmp_path / "model-00001-of-00002.safetensors", "'extra'", "does not list it"],
            index_checkpoint, tmp_path)


def test_error_index_maps_tensor_to_another_file(tmp_path):
    save_checkpoint({"c": np.ones(1, np.float32), "a": np.ones(1, np.float32)}, tmp_path / "1")
    save_checkpoint({"a": np.ones(1, np.float32), "b": np.ones(1, np.float32)}, tmp_path / "2")
    os.replace(tmp_path / "1" / "model.safetensors", tmp_path / "s1.safetensors")
    os.replace(tmp_path / "2" / "model.safetensors", tmp_path / "s2.safetensors")
    (tmp_path / INDEX_NAME).write_text(json.dumps(
        {"weight_map": {"a": "s2.safetensors", "b": "s2.safetensors", "c": "s1.safetensors"}}))
    _raises([tmp_path / "s1.safetensors", "'a'", "maps it to 's2.safetensors'"],
            index_checkpoint, tmp_path)


def test_error_index_escaping_directory(tmp_path):
    (tmp_path / INDEX_NAME).write_text(json.dumps({"weight_map": {"a": "../x.safetensors"}}))
    _raises([tmp_path / INDEX_NAME, "'../x.safetensors'", "plain file name"],
            index_checkpoint, tmp_path)


def test_error_save_into_non_empty_directory(tmp_path):
    save_checkpoint({"w": np.ones(2, np.float32)}, tmp_path)
    before = (tmp_path / "model.safetensors").read_bytes()
    _raises([tmp_path, "model.safetensors", "overwrite=True"],
            save_checkpoint, {"w": np.zeros(2, np.float32)}, tmp_path)
    assert (tmp_path / "model.safetensors").read_bytes() == before
    (tmp_path / "model.safetensors").unlink()
    (tmp_path / "other.safetensors").write_bytes(b"mine")
    _raises([tmp_path, "other.safetensors"], save_checkpoint, {"w": np.ones(2)}, tmp_path)


@pytest.mark.parametrize("bad", [np.ones(2, np.complex64), np.array([object()], dtype=object),
                                 np.array(["s"])])
def test_error_unsupported_dtype_on_save(tmp_path, bad):
    _raises([tmp_path, "'weird'", "unsupported dtype", "bfloat16"],
            save_checkpoint, {"fine": np.ones(1), "weird": bad}, tmp_path)
    assert not any(tmp_path.iterdir())  # validated before anything is written


def test_error_duplicate_name_on_save(tmp_path):
    _raises([tmp_path, "duplicate tensor name 'w'"], save_checkpoint,
            [("w", np.ones(1)), ("w", np.zeros(1))], tmp_path)
