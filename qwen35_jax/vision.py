"""The Qwen3.5 vision tower (a Qwen3-VL ViT without DeepStack) and the multimodal sequence: pure math
and host-side index computation. No Flax, no I/O.

Shapes: P patches (all images/frames packed), Dv vision width (1152), Hv heads, C*T*P*P the flattened
patch (1536). Facts in ``shared/reference/qwen35_architecture.md`` section 7:

* patches arrive 2x2-block-major (block row, block col, row in block, col in block), so the merger's
  "4 consecutive patches" are one 2x2 block;
* the learned 48x48 position table is resampled bilinearly with align_corners=True to each grid;
* attention is bidirectional within each frame of each image/video (a segment), with a 2-D rotary
  embedding of the UN-merged (row, col) over the full head dim;
* blocks use tanh-GELU, the merger exact GELU, LayerNorm before the 2x2 merge.
"""

from __future__ import annotations

import numpy as np

import jax
import jax.numpy as jnp

from qwen35_jax.layers import linear, precision_for

F32 = jnp.float32


# --------------------------------------------------------------------------------------------------
# Host-side index data (grid_thw is data the caller knows before tracing)
# --------------------------------------------------------------------------------------------------


def _check_grid(grid_thw, merge: int) -> np.ndarray:
    grid = np.asarray(grid_thw, np.int64).reshape(-1, 3)
    if (grid <= 0).any():
        raise ValueError(f"grid_thw entries must be positive, got {grid.tolist()}")
    bad = [g.tolist() for g in grid if g[1] % merge or g[2] % merge]
    if bad:
        raise ValueError(f"grid_thw heights/widths must be multiples of the merge size {merge}, got {bad}")
    return grid


def patch_rows_cols(grid_thw, merge: int) -> tuple[np.ndarray, np.ndarray]:
    """(row, col) of every patch in the packed, block-major order (frames repeat the same grid)."""
    rows, cols = [], []
    for t, h, w in _check_grid(grid_thw, merge):
        r = np.arange(h).reshape(h // merge, merge, 1, 1)
        c = np.arange(w).reshape(1, 1, w // merge, merge)
        r = np.broadcast_to(r, (h // merge, merge, w // merge, merge)).transpose(0, 2, 1, 3).reshape(-1)
        c = np.broadcast_to(c, (h // merge, merge, w // merge, merge)).transpose(0, 2, 1, 3).reshape(-1)
        rows.append(np.tile(r, t))
        cols.append(np.tile(c, t))
    return np.concatenate(rows), np.concatenate(cols)


def vision_index_data(grid_thw, *, merge: int, num_position_embeddings: int) -> dict[str, np.ndarray]:
    """Per-patch data for the vision forward, computed on the host:

    interp_idx / interp_w [P, 4]: bilinear taps (align_corners=True) into the flattened position table;
    rot [P, 2]: (row, col) for the 2-D rotary embedding; segment [P]: one id per frame of each entry
    (attention never crosses segments)."""
    grid = _check_grid(grid_thw, merge)
    side = int(round(num_position_embeddings ** 0.5))
    rows, cols = patch_rows_cols(grid, merge)
    heights = np.concatenate([np.full(t * h * w, h) for t, h, w in grid])
    widths = np.concatenate([np.full(t * h * w, w) for t, h, w in grid])

    def taps(index, size):
        # align_corners=True: endpoints map to 0 and side-1 (size 1 maps to 0)
        src = index.astype(np.float32) * np.float32(side - 1) / np.maximum(size - 1, 1).astype(np.float32)
        floor = np.floor(src)
        t = floor.astype(np.int64)[:, None] + np.arange(2)
        weight = np.clip(1 - np.abs(src[:, None] - floor[:, None] - np.arange(2)), 0, None)
        return np.clip(t, 0, side - 1), weight.astype(np.float32)

    ht, hw = taps(rows, heights)
    wt, ww = taps(cols, widths)
    idx = (ht[:, :, None] * side + wt[:, None, :]).reshape(-1, 4)
    wts = (hw[:, :, None] * ww[:, None, :]).reshape(-1, 4)
    segment = np.concatenate([np.repeat(np.arange(t) + k * 1000003, h * w) for k, (t, h, w) in enumerate(grid)])
    _, segment = np.unique(segment, return_inverse=True)
    return {"interp_idx": idx.astype(np.int32), "interp_w": wts, "rot": np.stack([rows, cols], 1).astype(np.int32),
            "segment": segment.astype(np.int32)}


# --------------------------------------------------------------------------------------------------
# The tower
# --------------------------------------------------------------------------------------------------


def layer_norm(x, weight, bias, eps: float = 1e-6):
    x32 = x.astype(F32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + eps)
    return (y * weight.astype(F32) + bias.astype(F32)).astype(x.dtype)


def linear_bias(x, w, b):
    return (linear(x, w) + b.astype(x.dtype)).astype(x.dtype)


def vision_rotary(rot, head_dim: int, theta: float):
    """cos/sin [P, head_dim] (float32) of the axial 2-D rotary: frequencies over head_dim/2 for the row
    and the same for the column, laid out [row | col | row | col]."""
    spatial = head_dim // 2
    inv = 1.0 / (np.float32(theta) ** (np.arange(0, spatial, 2, dtype=np.float32) / np.float32(spatial)))
    f = rot[:, :, None].astype(F32) * jnp.asarray(inv.astype(np.float32))  # [P, 2, spatial/2]
    hw = jnp.concatenate([f[:, 0], f[:, 1]], axis=-1)
    emb = jnp.concatenate([hw, hw], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def _rotate(x, cos, sin):
    """Full-dimension NeoX rotation in float32, cast back (HF ``apply_rotary_pos_emb_vision``)."""
    x32 = x.astype(F32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    return (x32 * cos[:, None, :] + rotated * sin[:, None, :]).astype(x.dtype)


def vision_attention(x, p, *, num_heads: int, cos, sin, segment):
    """Bidirectional attention within segments. x [P, Dv]; qkv rows are [q | k | v], heads contiguous."""
    P, D = x.shape
    hd = D // num_heads
    qkv = linear_bias(x, p["qkv"]["weight"], p["qkv"]["bias"]).reshape(P, 3, num_heads, hd)
    q, k, v = _rotate(qkv[:, 0], cos, sin), _rotate(qkv[:, 1], cos, sin), qkv[:, 2]
    prec = precision_for(x.dtype)
    scores = jnp.einsum("qhd,khd->hqk", q, k, precision=prec, preferred_element_type=F32) * (hd ** -0.5)
    same = segment[:, None] == segment[None, :]
    scores = jnp.where(same[None], scores, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("hqk,khd->qhd", probs, v.astype(F32), precision=jax.lax.Precision.HIGHEST,
                     preferred_element_type=F32).astype(x.dtype)
    return linear_bias(out.reshape(P, D), p["proj"]["weight"], p["proj"]["bias"])


def vision_block(x, p, *, num_heads: int, cos, sin, segment):
    h = layer_norm(x, p["norm1"]["weight"], p["norm1"]["bias"])
    x = x + vision_attention(h, p["attn"], num_heads=num_heads, cos=cos, sin=sin, segment=segment)
    h = layer_norm(x, p["norm2"]["weight"], p["norm2"]["bias"])
    h = jax.nn.gelu(linear_bias(h, p["mlp"]["linear_fc1"]["weight"], p["mlp"]["linear_fc1"]["bias"]), approximate=True)
    return x + linear_bias(h, p["mlp"]["linear_fc2"]["weight"], p["mlp"]["linear_fc2"]["bias"])


def vision_forward(p, pixel_values, data, *, num_heads: int, merge: int, theta: float):
    """The ViT and the patch merger. p: the ``visual`` params subtree; pixel_values [P, C*T*P*P];
    data: :func:`vision_index_data` (as arrays). Returns the merged features [P / merge^2, D_text]."""
    w = p["patch_embed"]["proj"]["weight"]
    dtype = w.dtype
    # Conv3d with stride = kernel on a (C, T, ph, pw)-ordered patch vector is a plain linear map
    x = linear_bias(pixel_values.astype(dtype), w.reshape(w.shape[0], -1), p["patch_embed"]["proj"]["bias"])
    table = p["pos_embed"]["weight"]
    pos = jnp.sum(table[data["interp_idx"]].astype(F32) * data["interp_w"][:, :, None], axis=1)
    x = x + pos.astype(dtype)
    cos, sin = vision_rotary(data["rot"], x.shape[-1] // num_heads, theta)
    for i in sorted(p["blocks"]):
        with jax.named_scope(f"vision_block_{i}"):
            x = vision_block(x, p["blocks"][i], num_heads=num_heads, cos=cos, sin=sin, segment=data["segment"])
    m = p["merger"]
    x = layer_norm(x, m["norm"]["weight"], m["norm"]["bias"])  # before the 2x2 shuffle
    x = x.reshape(x.shape[0] // (merge * merge), -1)
    x = jax.nn.gelu(linear_bias(x, m["linear_fc1"]["weight"], m["linear_fc1"]["bias"]), approximate=False)
    return linear_bias(x, m["linear_fc2"]["weight"], m["linear_fc2"]["bias"])


# --------------------------------------------------------------------------------------------------
# 3-D positions of a multimodal sequence (HF ``get_rope_index``)
# --------------------------------------------------------------------------------------------------


def rope_index(input_ids, *, image_grid_thw=None, video_grid_thw=None, attention_mask=None, merge: int = 2,
               image_token_id: int = 248056, video_token_id: int = 248057) -> tuple[np.ndarray, np.ndarray]:
    """position_ids [3, B, T] (rows T, H, W) and rope_deltas [B] for a batch with image/video pads.

    Runs of text advance all three rows together; a run of image (or video-frame) pads with merged
    grid (t, h', w') takes T = start + t_idx, H = start + row, W = start + col, and the text after it
    resumes at start + max(h', w'). Videos are split into one grid per frame (frames are separated by
    timestamp text in Qwen3.5 prompts). Padded positions get 0; delta = max position + 1 - length."""
    ids = np.asarray(input_ids)
    B, T = ids.shape
    mask = np.ones((B, T), bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
    images = iter(np.asarray(image_grid_thw, np.int64).reshape(-1, 3)) if image_grid_thw is not None else iter(())
    videos = []
    if video_grid_thw is not None:
        for t, h, w in np.asarray(video_grid_thw, np.int64).reshape(-1, 3):
            videos += [(1, h, w)] * int(t)
    videos = iter(videos)
    pos = np.zeros((3, B, T), np.int64)
    deltas = np.zeros(B, np.int64)
    for b in range(B):
        valid = np.nonzero(mask[b])[0]
        kind = np.where(ids[b, valid] == image_token_id, 1, np.where(ids[b, valid] == video_token_id, 2, 0))
        out, cur, i = [], 0, 0
        while i < len(valid):
            j = i
            while j < len(valid) and kind[j] == kind[i]:
                j += 1
            n = j - i
            if kind[i] == 0:
                out.append(np.broadcast_to(np.arange(n) + cur, (3, n)))
                cur += n
            else:
                try:
                    t, h, w = next(images if kind[i] == 1 else videos)
                except StopIteration:
                    what = "image" if kind[i] == 1 else "video frame"
                    raise ValueError(f"row {b}: more runs of {what} pad tokens than {what} grids") from None
                hh, ww = h // merge, w // merge
                if n != t * hh * ww:
                    raise ValueError(f"row {b}: a run of {n} vision pad tokens but its grid {[t, h, w]} "
                                     f"gives {t * hh * ww} merged patches")
                tt, rr, cc = np.meshgrid(np.arange(t), np.arange(hh), np.arange(ww), indexing="ij")
                out.append(np.stack([tt.reshape(-1) + cur, rr.reshape(-1) + cur, cc.reshape(-1) + cur]))
                cur += max(hh, ww)
            i = j
        if out:
            seq = np.concatenate(out, axis=1)
            pos[:, b, valid] = seq
            deltas[b] = seq.max() + 1 - len(valid)
    return pos, deltas


def scatter_vision(embeds, input_ids, features, token_id: int):
    """Replace the embeddings at every ``token_id`` position (row-major order) by ``features`` rows."""
    flat_ids = input_ids.reshape(-1)
    is_pad = flat_ids == token_id
    order = jnp.cumsum(is_pad) - 1
    rows = jnp.take(features, jnp.clip(order, 0, features.shape[0] - 1), axis=0)
    flat = jnp.where(is_pad[:, None], rows.astype(embeds.dtype), embeds.reshape(-1, embeds.shape[-1]))
    return flat.reshape(embeds.shape)
