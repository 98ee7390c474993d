"""The vision tower and multimodal sequences against transformers' Qwen3_5ForConditionalGeneration:
vision features, 3-D positions (get_rope_index) and final logits with images, several images of
different sizes and a short video, text before and after."""

from __future__ import annotations

import warnings

import jax.numpy as jnp
import numpy as np
import pytest
import torch

import qwen35_jax as Q
from qwen35_jax.api import multimodal_inputs, vision_features
from qwen35_jax.vision import rope_index

IMG, VID, VS, VE = 150, 151, 152, 153  # tiny vocabulary: the special ids must fit in it


@pytest.fixture(scope="module")
def vlm(tmp_path_factory):
    from transformers import Qwen3_5Config, Qwen3_5ForConditionalGeneration

    text = dict(vocab_size=160, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, head_dim=32, linear_num_key_heads=2, linear_num_value_heads=6,
                linear_key_head_dim=16, linear_value_head_dim=16,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
                                 "mrope_section": [4, 2, 2], "mrope_interleaved": True})
    vision = dict(depth=2, hidden_size=32, num_heads=2, intermediate_size=48, patch_size=4, temporal_patch_size=2,
                  spatial_merge_size=2, num_position_embeddings=16, out_hidden_size=64)
    cfg = Qwen3_5Config(text_config=text, vision_config=vision, image_token_id=IMG, video_token_id=VID,
                        vision_start_token_id=VS, vision_end_token_id=VE, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = Qwen3_5ForConditionalGeneration(cfg).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # move every parameter off its special init so that any mix-up shows
        for name, p in model.named_parameters():
            p.add_(torch.randn(p.shape, generator=g) * (0.3 if p.dim() == 1 else 0.05))
    path = tmp_path_factory.mktemp("vlm")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(str(path))
    ours_cfg, params = Q.load_checkpoint(path, dtype=jnp.float32)
    return model, ours_cfg, params


def _pixels(grid, seed):
    n = int(np.prod(np.asarray(grid).reshape(-1, 3), axis=1).sum())
    return np.random.default_rng(seed).standard_normal((n, 3 * 2 * 4 * 4)).astype(np.float32)


def _sequence(parts):
    """parts: list of int (text token) or ("image"|"video", n_tokens); returns ids and HF mm_token_type_ids."""
    ids, types = [], []
    for part in parts:
        if isinstance(part, tuple):
            kind, n = part
            ids += [VS] + [IMG if kind == "image" else VID] * n + [VE]
            types += [0] + [1 if kind == "image" else 2] * n + [0]
        else:
            ids.append(part)
            types.append(0)
    return np.array([ids]), np.array([types])


def _rel(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


def test_vision_tower_matches_transformers(vlm):
    model, cfg, params = vlm
    grid = np.array([[1, 4, 6], [1, 8, 4], [2, 4, 4]])
    pixels = _pixels(grid, 0)
    ours = np.asarray(vision_features(cfg, params, pixels, grid))
    with torch.no_grad():
        ref = model.model.visual(torch.tensor(pixels), grid_thw=torch.tensor(grid)).pooler_output.numpy()
    assert ours.shape == ref.shape == (int(np.prod(grid, 1).sum()) // 4, 64)
    assert _rel(ours, ref) < 1e-4  # fp32 both sides; reductions of <= 96 terms: ~1e-6 expected


CASES = {
    "one image, text around": ([5, 6, 7, ("image", 6), 8, 9], np.array([[1, 4, 6]]), None),
    "two images of different sizes": ([5, ("image", 6), 11, 12, ("image", 8), 13], np.array([[1, 4, 6], [1, 8, 4]]), None),
    "a short video (2 frames)": ([3, 4, ("video", 4), 21, ("video", 4), 22, 23], None, np.array([[2, 4, 4]])),
}


@pytest.mark.parametrize("name", list(CASES))
def test_multimodal_logits_and_positions_match_transformers(vlm, name):
    model, cfg, params = vlm
    parts, image_grid, video_grid = CASES[name]
    ids, types = _sequence(parts)
    kwargs, hf_kwargs = {}, {"mm_token_type_ids": torch.tensor(types)}
    if image_grid is not None:
        kwargs.update(pixel_values=_pixels(image_grid, 1), image_grid_thw=image_grid)
        hf_kwargs.update(pixel_values=torch.tensor(kwargs["pixel_values"]), image_grid_thw=torch.tensor(image_grid))
    if video_grid is not None:
        kwargs.update(pixel_values_videos=_pixels(video_grid, 2), video_grid_thw=video_grid)
        hf_kwargs.update(pixel_values_videos=torch.tensor(kwargs["pixel_values_videos"]),
                         video_grid_thw=torch.tensor(video_grid))
    with torch.no_grad():
        ref = model(input_ids=torch.tensor(ids), **hf_kwargs).logits.numpy()
        hf_pos, hf_delta = model.model.get_rope_index(
            torch.tensor(ids), torch.tensor(types),
            image_grid_thw=None if image_grid is None else torch.tensor(image_grid),
            video_grid_thw=None if video_grid is None else torch.tensor(video_grid))
    pos, delta = rope_index(ids, image_grid_thw=image_grid, video_grid_thw=video_grid, merge=2,
                            image_token_id=IMG, video_token_id=VID)
    np.testing.assert_array_equal(pos, hf_pos.numpy())
    np.testing.assert_array_equal(delta, hf_delta.numpy().reshape(-1))
    ours = np.asarray(Q.forward(cfg, params, ids, **kwargs))
    assert _rel(ours, ref) < 1e-4


def test_positions_with_padding_match_transformers(vlm):
    model, cfg, _ = vlm
    ids, types = _sequence([5, 6, ("image", 6), 8])
    ids = np.concatenate([np.zeros((1, 3), int), ids], 1)
    types = np.concatenate([np.zeros((1, 3), int), types], 1)
    mask = np.ones_like(ids)
    mask[0, :3] = 0
    grid = np.array([[1, 4, 6]])
    hf_pos, hf_delta = model.model.get_rope_index(torch.tensor(ids), torch.tensor(types),
                                                  image_grid_thw=torch.tensor(grid), attention_mask=torch.tensor(mask))
    pos, delta = rope_index(ids, image_grid_thw=grid, attention_mask=mask, merge=2, image_token_id=IMG)
    np.testing.assert_array_equal(pos, hf_pos.numpy())
    np.testing.assert_array_equal(delta, hf_delta.numpy().reshape(-1))


def test_text_only_positions_reduce_to_1d(vlm):
    _, cfg, params = vlm
    ids = np.array([[1, 2, 3, 4, 5]])
    pos, delta = rope_index(ids)
    assert (pos == np.arange(5)).all() and delta.tolist() == [0]


def test_bad_multimodal_input(vlm):
    _, cfg, params = vlm
    ids, _ = _sequence([5, ("image", 6), 8])
    grid = np.array([[1, 4, 6]])
    with pytest.raises(ValueError, match="no image was given"):
        multimodal_inputs(cfg, params, ids, pixel_values_videos=_pixels(np.array([[2, 4, 4]]), 0),
                          video_grid_thw=np.array([[2, 4, 4]]))
    with pytest.raises(ValueError, match="do not match: 6 pad tokens in input_ids, 8 merged patches"):
        multimodal_inputs(cfg, params, ids, pixel_values=_pixels(np.array([[1, 8, 4]]), 0),
                          image_grid_thw=np.array([[1, 8, 4]]))
    with pytest.raises(ValueError, match="pixel values have shape"):
        vision_features(cfg, params, np.zeros((5, 96), np.float32), grid)
    with pytest.raises(ValueError, match="multiples of the merge size"):
        vision_features(cfg, params, np.zeros((15, 96), np.float32), np.array([[1, 3, 5]]))


@pytest.mark.parametrize("name", ["one image, text around", "a short video (2 frames)"])
def test_generation_with_vision_matches_transformers(vlm, name):
    """Greedy generation after a multimodal prompt: the decode positions continue at
    cache length + rope delta on all three rows, as transformers does."""
    model, cfg, params = vlm
    parts, image_grid, video_grid = CASES[name]
    ids, types = _sequence(parts)
    kwargs, hf_kwargs = {}, {"mm_token_type_ids": torch.tensor(types)}
    if image_grid is not None:
        kwargs.update(pixel_values=_pixels(image_grid, 1), image_grid_thw=image_grid)
        hf_kwargs.update(pixel_values=torch.tensor(kwargs["pixel_values"]), image_grid_thw=torch.tensor(image_grid))
    if video_grid is not None:
        kwargs.update(pixel_values_videos=_pixels(video_grid, 2), video_grid_thw=video_grid)
        hf_kwargs.update(pixel_values_videos=torch.tensor(kwargs["pixel_values_videos"]),
                         video_grid_thw=torch.tensor(video_grid))
    with torch.no_grad():
        ref = model.generate(torch.tensor(ids), max_new_tokens=20, min_new_tokens=20, do_sample=False,
                             pad_token_id=0, **hf_kwargs)[0, ids.shape[1]:].tolist()
    ours = Q.generate(cfg, params, ids, max_new_tokens=20, **kwargs)
    assert ours.tokens[0] == ref
