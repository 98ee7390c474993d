"""Strict loading and saving of HF-layout checkpoints: every bad input gives an error naming the
problem; a load -> save round trip is bit-exact and transformers reads what we write."""

from __future__ import annotations

import json
import shutil
import warnings

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch

import qwen35_jax as Q
from qwen35_jax.checkpoint import load_params, save_params
from qwen35_jax.config import ConfigError
from qwen35_jax.safetensors_io import CheckpointError, index_checkpoint, read_tensor, save_checkpoint


@pytest.fixture
def ckpt(hf_checkpoints, tmp_path):
    """A private copy of the tiny causal checkpoint that a test may damage."""
    src, _ = hf_checkpoints("gva3", "causal")
    dst = tmp_path / "ckpt"
    shutil.copytree(src, dst)
    return dst


def _rewrite(path, edit):
    """Re-save the checkpoint's tensors after ``edit(dict name -> np.ndarray)``."""
    index = index_checkpoint(path)
    tensors = {name: read_tensor(info) for name, info in index.items()}
    edit(tensors)
    save_checkpoint(tensors, path, overwrite=True)


def test_nonexistent_path(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        Q.load_checkpoint(tmp_path / "nope")


def test_directory_without_safetensors(ckpt):
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"no \*\.safetensors|safetensors") as e:
        Q.load_checkpoint(ckpt)
    assert str(ckpt) in str(e.value)


def test_truncated_file(ckpt):
    f = ckpt / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match="truncated") as e:
        Q.load_checkpoint(ckpt)
    assert "model.safetensors" in str(e.value)


def test_corrupted_header(ckpt):
    f = ckpt / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:40] = b"\xff" * 32
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError) as e:
        Q.load_checkpoint(ckpt)
    assert "model.safetensors" in str(e.value)


def test_missing_tensor(ckpt):
    _rewrite(ckpt, lambda t: t.pop("model.layers.2.linear_attn.A_log"))
    with pytest.raises(CheckpointError, match="missing tensor") as e:
        Q.load_checkpoint(ckpt)
    assert "model.layers.2.linear_attn.A_log" in str(e.value)


def test_extra_unknown_tensor(ckpt):
    _rewrite(ckpt, lambda t: t.update({"model.layers.0.mlp.bias_we_do_not_have": np.zeros(3, np.float32)}))
    with pytest.raises(CheckpointError, match="does not have") as e:
        Q.load_checkpoint(ckpt)
    assert "model.layers.0.mlp.bias_we_do_not_have" in str(e.value) and "model.safetensors" in str(e.value)


def test_wrongly_shaped_tensor(ckpt):
    def edit(t):
        t["model.layers.3.self_attn.q_proj.weight"] = t["model.layers.3.self_attn.q_proj.weight"][:-1]
    _rewrite(ckpt, edit)
    with pytest.raises(CheckpointError, match=r"has shape \[255, 64\] but the config implies \[256, 64\]") as e:
        Q.load_checkpoint(ckpt)
    assert "model.layers.3.self_attn.q_proj.weight" in str(e.value)


def test_integer_tensor_where_a_float_is_expected(ckpt):
    def edit(t):
        t["model.norm.weight"] = t["model.norm.weight"].astype(np.int32)
    _rewrite(ckpt, edit)
    with pytest.raises(CheckpointError, match="'model.norm.weight' has dtype I32"):
        Q.load_checkpoint(ckpt)


def test_config_with_unknown_key(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["use_sliding_window"] = True
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['use_sliding_window'\]"):
        Q.load_checkpoint(ckpt)


def test_token_ids_out_of_range(hf_checkpoints):
    path, _ = hf_checkpoints("gva3", "causal")
    cfg, params = Q.load_checkpoint(path)
    ids = np.zeros((2, 5), np.int32)
    ids[1, 3] = cfg.text.vocab_size
    with pytest.raises(ValueError, match=r"input_ids\[1, 3\] = 160 is outside the vocabulary \[0, 160\)"):
        Q.forward(cfg, params, ids)
    ids[1, 3] = -1
    with pytest.raises(ValueError, match="outside the vocabulary"):
        Q.forward(cfg, params, ids)
    # under an outer jit the ids cannot be checked: the sequence holding the bad id gets NaN logits (the
    # NaN embedding spreads through its chunk of the delta rule), the other sequences are untouched
    ids[1, 3] = cfg.text.vocab_size + 7
    out = np.asarray(jax.jit(Q.forward, static_argnums=0)(cfg, params, jnp.asarray(ids)))
    assert np.isnan(out[1, 3]).all() and np.isfinite(out[0]).all()
    # (equal up to float32 rounding: a GPU may tile the batch-1 and batch-2 matmuls differently)
    np.testing.assert_allclose(out[0], np.asarray(Q.forward(cfg, params, ids[:1])[0]), rtol=1e-5, atol=1e-5)


def test_other_bad_forward_inputs(hf_checkpoints):
    path, _ = hf_checkpoints("gva3", "causal")
    cfg, params = Q.load_checkpoint(path)
    with pytest.raises(ValueError, match=r"shape \[batch, tokens\]"):
        Q.forward(cfg, params, np.zeros(5, np.int32))
    with pytest.raises(ValueError, match="empty"):
        Q.forward(cfg, params, np.zeros((1, 0), np.int32))
    with pytest.raises(ValueError, match="integers"):
        Q.forward(cfg, params, np.zeros((1, 3), np.float32))
    with pytest.raises(ValueError, match="attention_mask has shape"):
        Q.forward(cfg, params, np.zeros((1, 3), np.int32), attention_mask=np.ones((1, 4)))


def test_mtp_tensors_without_an_mtp_config_are_reported_not_dropped(ckpt):
    _rewrite(ckpt, lambda t: t.update({"mtp.fc.weight": np.ones((64, 128), np.float32),
                                       "mtp.norm.weight": np.zeros(64, np.float32)}))
    result = load_params(ckpt, Q.load_config(ckpt))
    assert sorted(result.unused) == ["mtp.fc.weight", "mtp.norm.weight"]
    with pytest.warns(UserWarning, match="2 checkpoint tensor"):
        Q.load_checkpoint(ckpt)


def test_round_trip_is_bit_exact_and_transformers_reads_it(hf_checkpoints, tmp_path):
    for name, arch in [("gva3", "causal"), ("kdiffv_tied", "conditional")]:
        src, model = hf_checkpoints(name, arch)
        cfg = Q.load_config(src)
        loaded = load_params(src, cfg, dtype=None)
        out = tmp_path / f"{name}_{arch}"
        Q.save_params(out, cfg, loaded.params, max_shard_bytes=20_000)  # force several shards + an index
        assert (out / "model.safetensors.index.json").exists()
        a, b = index_checkpoint(src), index_checkpoint(out)
        assert sorted(a) == sorted(b)
        for tensor in a:
            x, y = read_tensor(a[tensor]), read_tensor(b[tensor])
            assert x.dtype == y.dtype and x.shape == y.shape
            assert x.tobytes() == y.tobytes(), tensor
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            reloaded = type(model).from_pretrained(str(out)).eval()
        ids = torch.tensor(np.random.default_rng(0).integers(0, cfg.text.vocab_size, (1, 9)))
        with torch.no_grad():
            np.testing.assert_array_equal(reloaded(ids).logits.numpy(), model(ids).logits.numpy())


def test_bf16_save_and_dtype_conversion(hf_checkpoints, tmp_path):
    src, _ = hf_checkpoints("gva3", "causal")
    cfg, params32 = Q.load_checkpoint(src, dtype=jnp.float32)
    Q.save_params(tmp_path / "bf16", cfg, params32, dtype=jnp.bfloat16)
    info = index_checkpoint(tmp_path / "bf16")["model.layers.0.mlp.up_proj.weight"]
    assert info.dtype == "BF16"
    _, params16 = Q.load_checkpoint(tmp_path / "bf16", dtype=jnp.float32)
    w32 = np.asarray(params32["language_model"]["layers"][0]["mlp"]["up_proj"]["weight"])
    w16 = np.asarray(params16["language_model"]["layers"][0]["mlp"]["up_proj"]["weight"])
    np.testing.assert_array_equal(w16, w32.astype(ml_dtypes.bfloat16).astype(np.float32))
    with pytest.raises(CheckpointError, match="already exists"):
        Q.save_params(tmp_path / "bf16", cfg, params32)


def test_load_with_a_sharding_function(hf_checkpoints):
    path, _ = hf_checkpoints("gva3", "causal")
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("x",))
    seen = []

    def place(name, spec):
        seen.append(name)
        return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

    cfg = Q.load_config(path)
    params = load_params(path, cfg, dtype=jnp.float32, sharding=place).params
    assert len(seen) == len(Q.param_specs(cfg))
    leaf = params["language_model"]["norm"]["weight"]
    assert isinstance(leaf.sharding, jax.sharding.NamedSharding)


def test_random_params_match_the_abstract_tree():
    cfg = Q.ModelConfig(text=Q.tiny_text_config(), vision=None, architecture="Qwen3_5ForCausalLM")
    params = Q.random_params(cfg, seed=3, dtype=jnp.float32)
    specs = Q.param_specs(cfg, jnp.float32)
    flat = Q.flatten(params)
    assert {k: v.shape for k, v in flat.items()} == {k: v.shape for k, v in specs.items()}
    again = Q.flatten(Q.random_params(cfg, seed=3, dtype=jnp.float32))
    assert all(np.array_equal(flat[k], again[k]) for k in flat)  # deterministic per seed
    logits = Q.forward(cfg, params, np.arange(12, dtype=np.int32).reshape(2, 6))
    assert np.isfinite(np.asarray(logits)).all()


def test_mtp_head_loads_into_its_subtree(ckpt, tmp_path):
    """A config that declares the MTP head: its 15 tensors load into params['mtp'] and round-trip."""
    cfg = Q.load_config(ckpt)
    cfg_mtp = Q.ModelConfig(text=Q.TextConfig(**{**cfg.text.__dict__, "mtp_num_hidden_layers": 1}),
                            vision=None, architecture=cfg.architecture)
    params = Q.random_params(cfg_mtp, seed=1, dtype=jnp.float32)
    save_params(tmp_path / "with_mtp", cfg_mtp, params)
    names = sorted(n for n in index_checkpoint(tmp_path / "with_mtp") if n.startswith("mtp."))
    assert len(names) == 15 and "mtp.fc.weight" in names and "mtp.layers.0.self_attn.q_proj.weight" in names
    cfg2, loaded = Q.load_checkpoint(tmp_path / "with_mtp")
    assert cfg2.text.mtp_num_hidden_layers == 1
    np.testing.assert_array_equal(loaded["mtp"]["fc"]["weight"], params["mtp"]["fc"]["weight"])
    # the same config without the mtp tensors: loads the rest, warns
    save_params(tmp_path / "no_mtp", cfg_mtp, {k: v for k, v in params.items() if k != "mtp"})
    with pytest.warns(UserWarning, match="no mtp.. tensors"):
        _, partial = Q.load_checkpoint(tmp_path / "no_mtp")
    assert "mtp" not in partial
