"""qwen35-jax: a JAX/Pallas reimplementation of the Qwen3.5 / Qwen3.6 27B model family.

The two calls most code needs::

    cfg, params = qwen35_jax.load_checkpoint(path, dtype=jnp.float32)
    logits = qwen35_jax.forward(cfg, params, input_ids, attention_mask=None)   # float32 [B, T, vocab]

``forward`` is jittable with ``cfg`` static: ``jax.jit(qwen35_jax.forward, static_argnums=0)``.
"""

from qwen35_jax.api import forward, hidden_states
from qwen35_jax.checkpoint import LoadResult, from_hf_name, hf_state_dict, load_checkpoint, load_params, save_params, to_hf_name
from qwen35_jax.config import (
    ConfigError,
    ModelConfig,
    TextConfig,
    VisionConfig,
    config_from_hf_dict,
    config_to_hf_dict,
    load_config,
    make_layer_types,
    qwen35_27b,
    qwen35_27b_text,
    tiny_text_config,
    tiny_vision_config,
)
from qwen35_jax.model import (
    Qwen35,
    RuntimeOptions,
    abstract_model,
    abstract_params,
    count_params,
    flatten,
    fuse_projections,
    is_fused,
    param_axes,
    param_specs,
    random_params,
    unflatten,
    unfuse_projections,
)
from qwen35_jax.safetensors_io import CheckpointError
from qwen35_jax.generation import GenerationResult, generate
from qwen35_jax.sampling import PRESETS, SamplingParams, get_preset
from qwen35_jax.tokenizer import Tokenizer, TokenizerError
from qwen35_jax.cache import memory_table

__version__ = "0.1.0"

__all__ = [
    # the two calls
    "load_checkpoint", "forward",
    # generation
    "generate", "GenerationResult", "SamplingParams", "PRESETS", "get_preset", "Tokenizer", "TokenizerError",
    "memory_table",
    # richer API
    "hidden_states", "load_params", "save_params", "LoadResult", "hf_state_dict", "to_hf_name", "from_hf_name",
    "RuntimeOptions", "Qwen35", "abstract_model", "abstract_params", "param_specs", "param_axes",
    "random_params", "count_params", "flatten", "unflatten", "fuse_projections", "unfuse_projections", "is_fused",
    # configuration
    "ModelConfig", "TextConfig", "VisionConfig", "ConfigError", "CheckpointError", "load_config",
    "config_from_hf_dict", "config_to_hf_dict", "make_layer_types", "qwen35_27b", "qwen35_27b_text",
    "tiny_text_config", "tiny_vision_config",
]
