"""Generation: greedy parity with transformers' generate, padding that does not leak, fixed shapes,
MTP speculative decoding equal to greedy, sampling plumbing, KV-cache storage modes, bad input."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import qwen35_jax as Q
from qwen35_jax import generation as G
from qwen35_jax.cache import kv_bytes_per_token, memory_table
from qwen35_jax.sampling import SamplingParams


def _hf_generate(model, prompts, n):
    """transformers' greedy generate with left padding (what its tokenizers do for decoder-only models)."""
    T = max(map(len, prompts))
    ids = np.zeros((len(prompts), T), np.int64)
    mask = np.zeros_like(ids)
    for b, p in enumerate(prompts):
        ids[b, T - len(p):] = p
        mask[b, T - len(p):] = 1
    with torch.no_grad():
        out = model.generate(torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=n,
                             min_new_tokens=n, do_sample=False, pad_token_id=0)
    return [list(map(int, row)) for row in out[:, T:].numpy()]


@pytest.mark.parametrize("name,arch", [("gva3", "causal"), ("kdiffv_tied", "conditional")])
def test_greedy_matches_transformers_generate(hf_checkpoints, name, arch):
    path, model = hf_checkpoints(name, arch)
    cfg, params = Q.load_checkpoint(path, dtype=jnp.float32)
    rng = np.random.default_rng(7)
    single = [list(rng.integers(0, cfg.text.vocab_size, 11))]
    batch = [list(rng.integers(0, cfg.text.vocab_size, 19)), list(rng.integers(0, cfg.text.vocab_size, 6))]
    for prompts in (single, batch):
        ours = G.generate(cfg, params, prompts, max_new_tokens=64)
        assert ours.tokens == _hf_generate(model, prompts, 64)
        assert ours.finish_reason == ["length"] * len(prompts)


def _mtp_model(seed=0):
    """A tiny model with an MTP head whose drafts are right about half of the time: the head is wired
    to see only the next token's embedding (fc = [I | 0], its layer's outputs zeroed), so it drafts the
    model's 'bigram' prediction; the main model's MLPs are scaled up so that bigram is only an
    approximation of what it actually generates."""
    text = Q.tiny_text_config(mtp_num_hidden_layers=1)
    cfg = Q.ModelConfig(text=text, vision=None, architecture="Qwen3_5ForCausalLM")
    p = Q.random_params(cfg, seed=seed, dtype=jnp.float32)
    D = text.hidden_size
    p["language_model"]["embed_tokens"]["weight"] = p["language_model"]["embed_tokens"]["weight"] * 50
    p["lm_head"]["weight"] = p["lm_head"]["weight"] * 50
    p["mtp"]["fc"]["weight"] = jnp.concatenate([jnp.eye(D), jnp.zeros((D, D))], axis=1)
    layer = p["mtp"]["layers"][0]
    layer["self_attn"]["o_proj"]["weight"] = jnp.zeros_like(layer["self_attn"]["o_proj"]["weight"])
    layer["mlp"]["down_proj"]["weight"] = jnp.zeros_like(layer["mlp"]["down_proj"]["weight"])
    for lp in p["language_model"]["layers"].values():
        lp["mlp"]["down_proj"]["weight"] = lp["mlp"]["down_proj"]["weight"] * 30
    return cfg, p


def test_mtp_speculative_decoding_equals_greedy():
    cfg, params = _mtp_model()
    rng = np.random.default_rng(0)
    prompts = [list(rng.integers(0, 160, 13)), list(rng.integers(0, 160, 30))]
    greedy = G.generate(cfg, params, prompts, max_new_tokens=40)
    for k in (1, 2, 3):
        spec = G.generate(cfg, params, prompts, max_new_tokens=40, num_draft_tokens=k)
        assert spec.tokens == greedy.tokens, k
        rate = spec.stats["acceptance_rate"]
        assert 0.1 < rate < 0.95, rate  # drafts are sometimes right and sometimes wrong
        assert spec.stats["rounds"] < 40  # accepted drafts saved target forwards


def test_padding_does_not_leak_into_other_rows(hf_checkpoints):
    path, _ = hf_checkpoints("gva3", "causal")
    cfg, params = Q.load_checkpoint(path, dtype=jnp.float32)
    rng = np.random.default_rng(3)
    prompts = [list(rng.integers(0, 160, n)) for n in (3, 40, 17)]
    together = G.generate(cfg, params, prompts, max_new_tokens=24).tokens
    alone = [G.generate(cfg, params, [p], max_new_tokens=24).tokens[0] for p in prompts]
    assert together == alone


def test_fixed_shapes_do_not_recompile(hf_checkpoints):
    path, _ = hf_checkpoints("kdiffv_gva", "causal")
    cfg, params = Q.load_checkpoint(path, dtype=jnp.float32)
    rng = np.random.default_rng(4)
    G.generate(cfg, params, [list(rng.integers(0, 144, 5))], max_new_tokens=8)
    before = G.trace_counts()
    for n in (17, 40, 63, 1):  # all in the 64-token bucket, same cache size
        G.generate(cfg, params, [list(rng.integers(0, 144, n))], max_new_tokens=8)
    after = G.trace_counts()
    assert after["prefill"] == before["prefill"] and after["decode"] == before["decode"]
    assert G.prompt_bucket(65) == 128 and G.prompt_bucket(1) == 64


def test_stop_tokens_streaming_and_seeds(hf_checkpoints):
    path, _ = hf_checkpoints("gva3", "causal")
    cfg, params = Q.load_checkpoint(path, dtype=jnp.float32)
    prompt = [[5, 6, 7, 8]]
    base = G.generate(cfg, params, prompt, max_new_tokens=20).tokens[0]
    stop = base[5]
    first = base.index(stop)
    streamed = []
    res = G.generate(cfg, params, prompt, max_new_tokens=20, stop_token_ids=[stop], stream=streamed.append)
    assert res.tokens[0] == base[:first] and res.finish_reason == ["stop"]
    assert [s[0] for s in streamed if s[0] is not None] == base[:first]
    hot = SamplingParams(temperature=1.5, top_k=50, top_p=0.9)
    a = G.generate(cfg, params, prompt, max_new_tokens=16, sampling=hot, seed=1).tokens
    b = G.generate(cfg, params, prompt, max_new_tokens=16, sampling=hot, seed=1).tokens
    c = G.generate(cfg, params, prompt, max_new_tokens=16, sampling=hot, seed=2).tokens
    assert a == b and a != c
    preset = G.generate(cfg, params, prompt, max_new_tokens=4, sampling="thinking-general", seed=0)
    assert len(preset.tokens[0]) == 4


@pytest.mark.parametrize("kv_dtype,tol", [("int8", 2e-2), ("fp8", 8e-2)])
def test_quantized_kv_cache(hf_checkpoints, kv_dtype, tol):
    """Decode logits with an int8 / fp8 KV cache stay close to the float32 cache. One absmax scale per
    (token, head): int8 keeps ~2^-8 relative error per element, fp8 E4M3 ~2^-4; through softmax and the
    value mix the logits move by a fraction of that."""
    path, _ = hf_checkpoints("gva3", "causal")
    cfg, params = Q.load_checkpoint(path, dtype=jnp.float32)
    ids = jnp.asarray(np.random.default_rng(5).integers(0, 160, (1, 64)), jnp.int32)
    outs = {}
    for kv in ("float32", kv_dtype):
        state = G.init_decode_state(cfg, 1, 256, dtype=jnp.float32, kv_dtype=kv)
        _, _, state = G._prefill(cfg, Q.RuntimeOptions(), False, params, ids, jnp.zeros((1,), jnp.int32), state)
        model = Q.model.bind(cfg, params)
        logits, _, _ = G._decode(model, cfg, Q.RuntimeOptions(), jnp.asarray([[9]], jnp.int32), state)
        outs[kv] = np.asarray(logits)
    err = np.abs(outs[kv_dtype] - outs["float32"]).max() / np.abs(outs["float32"]).max()
    assert 0 < err < tol


@pytest.mark.parametrize("kv_dtype", ["float32", "int8"])
def test_fresh_decode_state_can_be_donated(hf_checkpoints, kv_dtype):
    """The jitted decode step donates the state; a fresh ``init_decode_state`` must hold one buffer per
    leaf (XLA refuses one buffer donated twice; scripts/bench_decode.py steps such a state directly)."""
    path, _ = hf_checkpoints("gva3", "causal")
    cfg, params = Q.load_checkpoint(path, dtype=jnp.float32)
    state = G.init_decode_state(cfg, 2, 64, dtype=jnp.float32, kv_dtype=kv_dtype)
    leaves = jax.tree.leaves(state)
    assert len({x.unsafe_buffer_pointer() for x in leaves}) == len(leaves)
    tok, state, _, _ = G._jitted("step")(cfg, Q.RuntimeOptions(), G.get_preset("greedy"), (), params, state,
                                         jnp.asarray([3, 5], jnp.int32), jax.random.key(0), None, None,
                                         jnp.zeros((2,), bool))
    assert tok.shape == (2,) and state.length.tolist() == [1, 1]


def test_memory_helpers():
    cfg = Q.qwen35_27b()
    assert kv_bytes_per_token(cfg) == 64 * 1024  # 16 layers x 4 KV heads x 256 x (K, V) x bf16
    assert kv_bytes_per_token(cfg, "int8") == 16 * 4 * 2 * (256 + 4)
    table = memory_table(cfg, contexts=(32768,))
    assert "| 32,768 | 2.00 GiB | 147 MiB |" in table


def test_bad_generation_input(hf_checkpoints):
    path, _ = hf_checkpoints("gva3", "causal")
    cfg, params = Q.load_checkpoint(path, dtype=jnp.float32)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        G.generate(cfg, params, [[1, 2], []])
    with pytest.raises(ValueError, match="does not fit a cache of max_len=64"):
        G.generate(cfg, params, [[1] * 60], max_new_tokens=16, max_len=64)
    with pytest.raises(ValueError, match="unknown preset|valid"):
        G.generate(cfg, params, [[1, 2]], sampling="creative-writing")
    with pytest.raises(ValueError, match="token id 999 outside the vocabulary"):
        G.generate(cfg, params, [[1, 999]])
    with pytest.raises(ValueError, match="top_p"):
        G.generate(cfg, params, [[1, 2]], sampling=SamplingParams(top_p=0.0))
    with pytest.raises(ValueError, match="MTP head"):
        G.generate(cfg, params, [[1, 2]], num_draft_tokens=2)
    with pytest.raises(ValueError, match="kv_dtype"):
        G.generate(cfg, params, [[1, 2]], kv_dtype="int4")
