"""Shared fixtures: tiny random Qwen3.5 checkpoints written by transformers' ``save_pretrained``."""

from __future__ import annotations

import os
import warnings

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Eight emulated CPU devices for the sharding tests (tests/test_sharding.py): the flag must be set
# before jax initialises its backends. Unsharded tests keep running on device 0.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import numpy as np
import pytest

# Tiny text configs that between them cover every structural feature the acceptance list names.
TINY_TEXT = {
    # DeltaNet value heads = 3 x key heads (as the 27B), K = V, untied head, 5 layers (L L L F L)
    "gva3": dict(vocab_size=160, hidden_size=64, intermediate_size=96, num_hidden_layers=5, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=32, linear_num_key_heads=2, linear_num_value_heads=6,
                 linear_key_head_dim=16, linear_value_head_dim=16, tie_word_embeddings=False),
    # key dim != value dim, tied embeddings, MQA-like attention (1 KV head)
    "kdiffv_tied": dict(vocab_size=128, hidden_size=48, intermediate_size=80, num_hidden_layers=4, num_attention_heads=3,
                        num_key_value_heads=1, head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4,
                        linear_key_head_dim=8, linear_value_head_dim=24, tie_word_embeddings=True),
    # key dim != value dim with GVA 3x and a wider head (rotary dim 16)
    "kdiffv_gva": dict(vocab_size=144, hidden_size=64, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=64, linear_num_key_heads=1, linear_num_value_heads=3,
                       linear_key_head_dim=24, linear_value_head_dim=16, tie_word_embeddings=False),
}

TINY_VISION = dict(depth=1, hidden_size=16, num_heads=2, intermediate_size=24, patch_size=4, num_position_embeddings=16)


def _perturb(model, seed: int, scale: float = 0.3):
    """HF initialises (1+w) norms to 0 and the gated norm to 1: any norm bug would be invisible. Give
    every 1-D parameter (norms, A_log, dt_bias) random values, and the matrices a larger spread so the
    logits are not all near-ties (which would make argmax comparisons meaningless)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn(p.shape, generator=g) * scale)
            elif "embed" in name or "lm_head" in name:
                p.normal_(0.0, 1.0, generator=g)
            else:
                p.normal_(0.0, 0.08, generator=g)


def build_hf_checkpoint(path, name: str, architecture: str = "causal", seed: int = 0):
    """Save a tiny random transformers model and return (path, torch model in float32, eval mode)."""
    import torch
    from transformers import Qwen3_5Config, Qwen3_5ForCausalLM, Qwen3_5ForConditionalGeneration, Qwen3_5TextConfig

    torch.manual_seed(seed)
    text = dict(TINY_TEXT[name])
    if architecture == "causal":
        model = Qwen3_5ForCausalLM(Qwen3_5TextConfig(**text))
    else:
        tie = text.pop("tie_word_embeddings")
        vision = dict(TINY_VISION, out_hidden_size=text["hidden_size"])
        model = Qwen3_5ForConditionalGeneration(Qwen3_5Config(text_config=text, vision_config=vision, tie_word_embeddings=tie))
    model.eval()
    _perturb(model, seed)
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(str(path))
    return path, model


@pytest.fixture(scope="session")
def hf_checkpoints(tmp_path_factory):
    """name -> (path, torch model) for every tiny config in both layouts (built once per session)."""
    cache = {}

    def get(name: str, architecture: str = "causal"):
        key = (name, architecture)
        if key not in cache:
            path = tmp_path_factory.mktemp(f"{name}_{architecture}")
            cache[key] = build_hf_checkpoint(path, name, architecture)
        return cache[key]

    return get


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_executables():
    """Drops jax's compiled executables after each test module. The whole suite otherwise keeps
    every module's compilations alive in one process until the end, and on 2 cores the full run
    (700 tests) crashed in XLA's CPU compiler near its end (a segfault in the last module's
    compile that the module alone does not reproduce)."""
    yield
    import gc

    import jax

    jax.clear_caches()
    gc.collect()
