"""The public forward functions: input validation around the jitted model of :mod:`qwen35_jax.model`."""

from __future__ import annotations

import functools
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
            pixel_values=None, image_grid_thw=None, pixel_values_videos=None, video_grid_thw=None,
            options: M.RuntimeOptions = M.RuntimeOptions()) -> jax.Array:
    """float32 logits [B, T, vocab].

    input_ids: int [B, T]. attention_mask: [B, T], 1 for real tokens, 0 for padding (or None).
    position_ids: [B, T] or [3, B, T] (T/H/W rows of the interleaved mRoPE); default ``arange(T)`` for
        every row, as transformers' forward uses (pass mask-derived positions for left padding).
    pixel_values / image_grid_thw, pixel_values_videos / video_grid_thw: images and videos from
        ``qwen35_jax.image_processing``; their features replace the pad tokens and the positions become
        3-D (transformers' ``get_rope_index``) unless given.
    options: implementation choices (:class:`RuntimeOptions`), static.

    Jitted internally; the text-only path is also jittable from outside with ``cfg`` static.
    """
    _check_inputs(cfg, input_ids, attention_mask, position_ids)
    if pixel_values is None and pixel_values_videos is None:
        return M.forward_jit(cfg, params, jnp.asarray(input_ids), attention_mask, position_ids, options)
    embeds, positions, _ = multimodal_inputs(
        cfg, params, input_ids, attention_mask, pixel_values=pixel_values, image_grid_thw=image_grid_thw,
        pixel_values_videos=pixel_values_videos, video_grid_thw=video_grid_thw)
    return M.forward_jit(cfg, params, jnp.asarray(input_ids), attention_mask,
                         positions if position_ids is None else position_ids, options, embeds)


def hidden_states(cfg: ModelConfig, params: Mapping, input_ids, attention_mask=None, *, position_ids=None,
                  options: M.RuntimeOptions = M.RuntimeOptions()) -> jax.Array:
    """The decoder output after the final norm, [B, T, hidden] in the parameter dtype."""
    _check_inputs(cfg, input_ids, attention_mask, position_ids)
    return M.hidden_states_jit(cfg, params, jnp.asarray(input_ids), attention_mask, position_ids, options)


# --------------------------------------------------------------------------------------------------
# Images and video
# --------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _vision_jit(num_heads: int, merge: int, theta: float):
    from qwen35_jax.vision import vision_forward

    return jax.jit(functools.partial(vision_forward, num_heads=num_heads, merge=merge, theta=theta))


def vision_features(cfg: ModelConfig, params: Mapping, pixel_values, grid_thw) -> jax.Array:
    """The vision tower's merged features [sum(t*h*w) / merge^2, hidden] for packed ``pixel_values``
    [sum(t*h*w), C*T*P*P] with ``grid_thw`` [n, 3] (see ``qwen35_jax.image_processing``)."""
    from qwen35_jax.vision import vision_index_data

    v = cfg.vision
    if v is None or "visual" not in params:
        raise ValueError("this model has no vision tower (a Qwen3_5ForCausalLM config or params without 'visual')")
    grid = np.asarray(grid_thw, np.int64).reshape(-1, 3)
    P = int(np.prod(grid, axis=1).sum())
    shape = tuple(getattr(pixel_values, "shape", ()))
    if shape != (P, v.patch_dim):
        raise ValueError(f"pixel values have shape {shape}, but grid_thw {grid.tolist()} needs {(P, v.patch_dim)}")
    data = vision_index_data(grid, merge=v.spatial_merge_size, num_position_embeddings=v.num_position_embeddings)
    fn = _vision_jit(v.num_heads, v.spatial_merge_size, v.rope_theta)
    return fn(params["visual"], jnp.asarray(pixel_values), {k: jnp.asarray(a) for k, a in data.items()})


def multimodal_inputs(cfg: ModelConfig, params: Mapping, input_ids, attention_mask=None, *, pixel_values=None,
                      image_grid_thw=None, pixel_values_videos=None, video_grid_thw=None):
    """(inputs_embeds [B, T, D], position_ids [3, B, T], rope_deltas [B]) of a sequence with images and
    videos: the vision features replace the embeddings of the ``<|image_pad|>`` / ``<|video_pad|>``
    tokens (whose counts must match the grids), and the 3-D mRoPE positions follow transformers'
    ``get_rope_index``."""
    from qwen35_jax.vision import rope_index

    ids = np.asarray(input_ids)
    merge2 = cfg.vision.spatial_merge_size ** 2 if cfg.vision is not None else 4
    features = []
    for name, pixels, grid, token in (("image", pixel_values, image_grid_thw, cfg.image_token_id),
                                      ("video", pixel_values_videos, video_grid_thw, cfg.video_token_id)):
        n_tokens = int((ids == token).sum())
        if pixels is None:
            if n_tokens:
                raise ValueError(f"input_ids hold {n_tokens} {name} pad tokens but no {name} was given")
            continue
        if grid is None:
            raise ValueError(f"{name} pixel values need {name}_grid_thw")
        n_feats = int(np.prod(np.asarray(grid).reshape(-1, 3), axis=1).sum()) // merge2
        if n_tokens != n_feats:
            raise ValueError(f"{name} features and {name} pad tokens do not match: {n_tokens} pad tokens in "
                             f"input_ids, {n_feats} merged patches in {name}_grid_thw")
        features.append((token, vision_features(cfg, params, pixels, grid)))
    embeds = M.embed_multimodal_jit(cfg, params, jnp.asarray(ids), tuple(features))
    positions, deltas = rope_index(
        ids, image_grid_thw=image_grid_thw, video_grid_thw=video_grid_thw, attention_mask=attention_mask,
        merge=cfg.vision.spatial_merge_size if cfg.vision else 2, image_token_id=cfg.image_token_id,
        video_token_id=cfg.video_token_id)
    return embeds, jnp.asarray(positions, jnp.int32), deltas
