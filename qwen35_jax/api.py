"""The public forward functions: input validation around the jitted model of :mod:`qwen35_jax.model`."""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from qwen35_jax import model as M
from qwen35_jax.config import ModelConfig


def _concrete(x) -> np.ndarray | None:
    """The value of ``x`` as numpy, or None when it is traced (inside an outer jit)."""
    try:
        return np.asarray(x)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None


def _check_inputs(cfg: ModelConfig, input_ids, attention_mask, position_ids) -> None:
    """Shape and range checks that name the offending argument. Token ids are range-checked whenever
    they are concrete; under an outer jit they cannot be, and an id outside the vocabulary then makes
    the logits of its sequence NaN (see TextModel.embed), never valid-looking numbers."""
    if not isinstance(cfg, ModelConfig):
        raise TypeError(f"cfg must be a qwen35_jax.ModelConfig, got {type(cfg).__name__}")
    shape = getattr(input_ids, "shape", None)
    if shape is None or len(shape) != 2:
        raise ValueError(f"input_ids must have shape [batch, tokens], got shape {shape}")
    if shape[1] == 0 or shape[0] == 0:
        raise ValueError(f"input_ids is empty (shape {tuple(shape)})")
    if not jnp.issubdtype(input_ids.dtype, jnp.integer):
        raise ValueError(f"input_ids must be integers, got dtype {input_ids.dtype}")
    ids = _concrete(input_ids)
    if ids is not None:
        bad = (ids < 0) | (ids >= cfg.text.vocab_size)
        if bad.any():
            b, t = map(int, np.argwhere(bad)[0])
            raise ValueError(
                f"input_ids[{b}, {t}] = {int(ids[b, t])} is outside the vocabulary [0, {cfg.text.vocab_size}) "
                f"({int(bad.sum())} id(s) out of range)"
            )
    if attention_mask is not None and tuple(attention_mask.shape) != tuple(shape):
        raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected {tuple(shape)} like input_ids")
    if position_ids is not None and tuple(position_ids.shape) not in (tuple(shape), (3, *shape)):
        raise ValueError(
            f"position_ids has shape {tuple(position_ids.shape)}, expected {tuple(shape)} or {(3, *shape)} (T/H/W rows)"
        )


def forward(cfg: ModelConfig, params: Mapping, input_ids, attention_mask=None, *, position_ids=None,
            options: M.RuntimeOptions = M.RuntimeOptions()) -> jax.Array:
    """float32 logits [B, T, vocab] of the text decoder.

    input_ids: int [B, T]. attention_mask: [B, T], 1 for real tokens, 0 for padding (or None).
    position_ids: [B, T] or [3, B, T] (T/H/W rows of the interleaved mRoPE); default ``arange(T)`` for
        every row, as transformers' forward uses (pass mask-derived positions for left padding).
    options: implementation choices (:class:`RuntimeOptions`), static.

    Jitted internally; also jittable from outside with ``cfg`` (and ``options``) static.
    """
    _check_inputs(cfg, input_ids, attention_mask, position_ids)
    return M.forward_jit(cfg, params, jnp.asarray(input_ids), attention_mask, position_ids, options)


def hidden_states(cfg: ModelConfig, params: Mapping, input_ids, attention_mask=None, *, position_ids=None,
                  options: M.RuntimeOptions = M.RuntimeOptions()) -> jax.Array:
    """The decoder output after the final norm, [B, T, hidden] in the parameter dtype."""
    _check_inputs(cfg, input_ids, attention_mask, position_ids)
    return M.hidden_states_jit(cfg, params, jnp.asarray(input_ids), attention_mask, position_ids, options)
