"""Pure math of the Qwen3.5 text decoder: norms, partial interleaved mRoPE, gated attention, the Gated
DeltaNet mixer and the SwiGLU MLP, as functions of arrays. No Flax, no I/O.

The dtype flow reproduces Hugging Face ``modeling_qwen3_5`` (section 5.1 of
``shared/reference/qwen35_architecture.md``): the residual stream and every projection run in the
parameter dtype; norms, softmax, the decay gate, the l2-norm and the delta-rule state run in float32 and
cast back exactly where the reference casts. Shapes use B batch, T tokens, S key positions, D model
width, H heads, K key dim, V value dim, G query heads per KV head.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.gated_delta import gated_delta_rule

F32 = jnp.float32


def precision_for(dtype) -> jax.lax.Precision:
    """float32 parameters ask for float32 arithmetic: without HIGHEST, GPUs run f32 dots in TF32
    (10-bit mantissa), which alone breaks the 1e-4 parity with the reference. bf16 keeps the default."""
    return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else jax.lax.Precision.DEFAULT


def gemm_out_dtype(dtype) -> jnp.dtype:
    """The result type to ask of a ``dtype`` x ``dtype`` matmul that is rounded to ``dtype`` anyway.

    On a GPU, ``dtype`` itself: cuBLAS accumulates bf16/f16 products in float32 and rounds once on
    output, the same numbers as a float32 result cast afterwards (bit-identical on an H100, K=5120,
    N=34816), without writing and re-reading the float32 [M, N] result (XLA does not fold the cast
    into the GEMM: 2,652 against 2,233 us at M=4096). Elsewhere float32 then the cast: the CPU's
    bf16-output dot sums in another order (differences of an ulp)."""
    dtype = jnp.dtype(dtype)
    if dtype == F32:
        return dtype
    try:
        on_gpu = jax.default_backend() == "gpu"
    except RuntimeError:  # no backend could be initialised
        on_gpu = False
    return dtype if on_gpu else jnp.dtype(F32)


def linear(x: jax.Array, w: jax.Array) -> jax.Array:
    """``x @ w.T`` for a weight stored like PyTorch's ``nn.Linear`` ([out, in]).

    Accumulates in float32 and rounds once to ``x.dtype`` (what cuBLAS/oneDNN do for a bf16 matmul;
    see `gemm_out_dtype`). Every matmul site of the model calls this one function, so a quantized
    weight type only has to teach it one more case.
    """
    if hasattr(w, "apply_linear"):  # quantized leaves (the quant package) bring their own matmul
        return w.apply_linear(x)
    y = jax.lax.dot_general(
        x, w.astype(x.dtype), (((x.ndim - 1,), (1,)), ((), ())),
        precision=precision_for(x.dtype), preferred_element_type=gemm_out_dtype(x.dtype),
    )
    return y.astype(x.dtype)


# Linears that read the same input, and the name of the one weight that model.fuse_projections makes
# of them (their [out, in] weights stacked along out, in this order). A fused weight is one matmul
# instead of two to four: at decode, where every projection is a weight-bandwidth-bound GEMV, one
# bigger GEMV fills the GPU better (see model.fuse_projections for the measured difference).
FUSED_PROJECTIONS: dict[str, tuple[str, ...]] = {
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "in_proj_qkvzba": ("in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a"),
    "gate_up_proj": ("gate_proj", "up_proj"),
}


def grouped_linear(x: jax.Array, p, fused: str, sizes: int | tuple[int, ...]) -> list[jax.Array]:
    """The outputs of the projections ``FUSED_PROJECTIONS[fused]`` of ``x``: one matmul split into
    ``sizes`` (output widths, or a number of equal parts) when ``p`` holds the fused weight, else
    one matmul each. Each output column is the same dot product either way."""
    if fused not in p:
        return [linear(x, p[name]) for name in FUSED_PROJECTIONS[fused]]
    y = linear(x, p[fused])
    if isinstance(sizes, int):
        if y.shape[-1] % sizes:
            raise ValueError(f"fused weight {fused!r} has {y.shape[-1]} outputs, not {sizes} equal parts")
        return jnp.split(y, sizes, axis=-1)
    if y.shape[-1] != sum(sizes):
        raise ValueError(f"fused weight {fused!r} has {y.shape[-1]} outputs; the config implies "
                         f"{' + '.join(map(str, sizes))} = {sum(sizes)}")
    return jnp.split(y, np.cumsum(sizes)[:-1].tolist(), axis=-1)


# --------------------------------------------------------------------------------------------------
# Norms
# --------------------------------------------------------------------------------------------------


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """Zero-centred RMSNorm, scale ``(1 + w)``, multiplied in float32 *before* the cast back
    (HF ``Qwen3_5RMSNorm``; Gemma-style). Stored weights are near 0: a plain ``w * x_hat`` would be
    catastrophically wrong."""
    x32 = x.astype(F32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (y * (1.0 + weight.astype(F32))).astype(x.dtype)


def gated_rms_norm(x: jax.Array, gate: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """The DeltaNet output norm (HF ``Qwen3_5RMSNormGated``): plain scale ``w``, normalise first, then
    gate with ``silu(z)``. The cast points matter for bf16 parity: normalise in f32, cast to the input
    dtype, multiply by ``w`` in that dtype, multiply by ``silu(z)`` in f32, cast back."""
    dtype = x.dtype
    x32 = x.astype(F32)
    xn = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    y = weight.astype(dtype) * xn.astype(dtype)
    y = y.astype(F32) * jax.nn.silu(gate.astype(F32))
    return y.astype(dtype)


def l2_normalize(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    """``x / sqrt(sum(x^2) + eps)`` in float32 (FLA's ``use_qk_l2norm_in_kernel`` convention)."""
    x32 = x.astype(F32)
    return x32 * jax.lax.rsqrt(jnp.sum(x32 * x32, axis=-1, keepdims=True) + eps)


# --------------------------------------------------------------------------------------------------
# Rotary embedding: partial (first rotary_dim dims), NeoX half-split, interleaved mRoPE
# --------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=32)
def _rope_tables(rotary_dim: int, theta: float, mrope_section: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """inv_freq [rotary_dim/2] (float32, computed like torch's float32 ``base ** (arange/dim)``) and the
    axis (0 = T, 1 = H, 2 = W) each frequency slot takes its position from.

    HF's interleaved layout: slot j reads the H row if j % 3 == 1 and j < 3*sec[1], the W row if
    j % 3 == 2 and j < 3*sec[2], and the T row otherwise ([11, 11, 10] for the 27B's 32 slots)."""
    half = rotary_dim // 2
    exponent = np.arange(0, rotary_dim, 2, dtype=np.float32) / np.float32(rotary_dim)
    inv_freq = (np.float32(1.0) / (np.float32(theta) ** exponent)).astype(np.float32)
    axis = np.zeros(half, np.int32)
    for j in range(half):
        if j % 3 == 1 and j < 3 * mrope_section[1]:
            axis[j] = 1
        elif j % 3 == 2 and j < 3 * mrope_section[2]:
            axis[j] = 2
    return inv_freq, axis


def rope_cos_sin(position_ids: jax.Array, rotary_dim: int, theta: float, mrope_section: tuple[int, ...],
                 dtype) -> tuple[jax.Array, jax.Array]:
    """cos/sin [B, T, rotary_dim] for position ids [3, B, T] (rows T, H, W) or [B, T] (text: all equal).

    Angles are float32 (``pos * inv_freq``), then cast to the activation dtype as HF does."""
    if position_ids.ndim == 2:
        position_ids = jnp.broadcast_to(position_ids[None], (3, *position_ids.shape))
    inv_freq, axis = _rope_tables(rotary_dim, float(theta), tuple(mrope_section))
    freqs = position_ids[..., None].astype(F32) * jnp.asarray(inv_freq)  # [3, B, T, half]
    # pick, per slot, the row its axis says: a static gather over the leading axis
    freqs = jnp.take_along_axis(freqs, jnp.asarray(axis)[None, None, None, :], axis=0)[0]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def apply_partial_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate the first ``rotary_dim`` dims of x [B, T, H, Dh] (pairs (i, i + rotary_dim/2)); the rest
    pass through unchanged."""
    r = cos.shape[-1]
    x_rot, x_pass = x[..., :r], x[..., r:]
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    x1, x2 = x_rot[..., : r // 2], x_rot[..., r // 2:]
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return jnp.concatenate([(x_rot * c + rotated * s).astype(x.dtype), x_pass], axis=-1)


# --------------------------------------------------------------------------------------------------
# Gated full attention
# --------------------------------------------------------------------------------------------------

_MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)  # finite: fully-masked rows stay NaN-free


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, mask: jax.Array | None,
                          implementation: str = "xla") -> jax.Array:
    """Causal GQA attention. q [B, T, H, Dh], k/v [B, S, KVH, Dh] (query head i uses KV head i // G),
    mask [B, S] of valid key positions (or None). The last T key positions align with the queries.

    ``implementation="xla"`` is the explicit einsum form (fp32 softmax, the reference numerics);
    ``"cudnn"`` calls ``jax.nn.dot_product_attention``'s fused kernel (GPU, bf16, no padding mask).
    """
    B, T, H, Dh = q.shape
    S, KVH = k.shape[1], k.shape[2]
    G = H // KVH
    scale = Dh ** -0.5
    if implementation == "cudnn":
        if mask is not None:
            raise ValueError("attention implementation 'cudnn' takes no padding mask; use 'xla'")
        return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=True, implementation="cudnn")
    if implementation != "xla":
        raise ValueError(f"unknown attention implementation {implementation!r}; expected 'xla' or 'cudnn'")
    prec = precision_for(q.dtype)
    qg = q.reshape(B, T, KVH, G, Dh)
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k, precision=prec, preferred_element_type=F32) * scale
    q_pos = jnp.arange(T)[:, None] + (S - T)
    allowed = q_pos >= jnp.arange(S)[None, :]  # [T, S]
    allowed = allowed[None, None, None]
    if mask is not None:
        allowed = allowed & mask.astype(bool)[:, None, None, None, :]
    scores = jnp.where(allowed, scores, _MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v.astype(F32), precision=jax.lax.Precision.HIGHEST, preferred_element_type=F32)
    return out.astype(q.dtype).reshape(B, T, H, Dh)


def attention_qkv(x, p, *, num_heads: int, num_kv_heads: int, head_dim: int, eps: float, cos, sin):
    """Projections of the gated attention: q [B, T, H, Dh] and k [B, T, KVH, Dh] after their norms and
    RoPE, v, and the output gate [B, T, H*Dh]. q_proj [2*H*Dh, D] is per head [query | gate]."""
    B, T, _ = x.shape
    kv = num_kv_heads * head_dim
    qg, k, v = grouped_linear(x, p, "qkv_proj", (2 * num_heads * head_dim, kv, kv))
    qg = qg.reshape(B, T, num_heads, 2 * head_dim)
    q, gate = qg[..., :head_dim], qg[..., head_dim:]
    gate = gate.reshape(B, T, num_heads * head_dim)
    q = rms_norm(q, p["q_norm"], eps)  # q/k norms come BEFORE RoPE
    k = rms_norm(k.reshape(B, T, num_kv_heads, head_dim), p["k_norm"], eps)
    v = v.reshape(B, T, num_kv_heads, head_dim)
    return apply_partial_rope(q, cos, sin), apply_partial_rope(k, cos, sin), v, gate


def attention_out(o, gate, p):
    """Gate the attention output per head with sigmoid(gate), then o_proj."""
    B, T = o.shape[:2]
    return linear(o.reshape(B, T, -1) * jax.nn.sigmoid(gate), p["o_proj"])


def gated_attention(x, p, *, num_heads: int, num_kv_heads: int, head_dim: int, eps: float,
                    cos, sin, mask, implementation: str = "xla"):
    """The gated full-attention mixer over a whole sequence. x [B, T, D] (after input_layernorm);
    ``p`` holds q_proj, k_proj, v_proj, o_proj, q_norm, k_norm."""
    q, k, v, gate = attention_qkv(x, p, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
                                  eps=eps, cos=cos, sin=sin)
    o = dot_product_attention(q, k, v, mask=mask, implementation=implementation)
    return attention_out(o, gate, p)


def cached_attention(q, k_all, v_all, *, key_valid, q_slots):
    """Attention of new queries q [B, T, H, Dh] over a slot-indexed cache k_all/v_all [B, KVH, S, Dh].
    key_valid [B, S] marks real tokens; query t of row b (at slot q_slots[b, t]) sees slots <= its own.
    Softmax in float32; the probabilities meet V in V's dtype with float32 accumulation (flash-decoding
    numerics: decode reads the whole cache per token, and an f32 copy of it would double the traffic)."""
    B, T, H, Dh = q.shape
    KVH = k_all.shape[1]
    G = H // KVH
    prec = precision_for(q.dtype)
    scores = jnp.einsum("btkgd,bksd->bkgts", q.reshape(B, T, KVH, G, Dh), k_all, precision=prec,
                        preferred_element_type=F32) * (Dh ** -0.5)
    slots = jnp.arange(k_all.shape[2])
    allowed = key_valid[:, None, :] & (slots[None, None, :] <= q_slots[:, :, None])  # [B, T, S]
    scores = jnp.where(allowed[:, None, None], scores, _MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1).astype(v_all.dtype)
    # the GEMM's natural output order, then a transpose of the (small) result: asking the einsum for
    # "btkgd" directly hits an unimplemented bf16 x bf16 -> f32 dot on XLA's CPU backend
    out = jnp.einsum("bkgts,bksd->bkgtd", probs, v_all, precision=prec, preferred_element_type=F32)
    return out.astype(q.dtype).transpose(0, 3, 1, 2, 4).reshape(B, T, H, Dh)


# --------------------------------------------------------------------------------------------------
# Gated DeltaNet
# --------------------------------------------------------------------------------------------------


def causal_conv1d(x: jax.Array, weight: jax.Array, state: jax.Array | None = None):
    """Depthwise causal conv over time. x [B, T, C], weight [C, 1, W] (PyTorch Conv1d layout; tap W-1
    multiplies the current token), state [B, W-1, C] (the previous raw inputs) or None for zeros.

    Returns (y [B, T, C] in the weight dtype, before the activation; new state [B, W-1, C]). Accumulates
    the W products in float32 and rounds once, like a bf16 conv kernel.
    """
    B, T, C = x.shape
    W = weight.shape[-1]
    dtype = weight.dtype
    if state is None:
        state = jnp.zeros((B, W - 1, C), x.dtype)
    xp = jnp.concatenate([state.astype(x.dtype), x], axis=1)  # [B, T + W - 1, C]
    w = weight[:, 0, :].astype(F32)  # [C, W]
    acc = jnp.zeros((B, T, C), F32)
    for j in range(W):
        acc = acc + xp[:, j: j + T, :].astype(dtype).astype(F32) * w[:, j]
    return acc.astype(dtype), xp[:, T:, :]


def _deltanet_projections(x, p, num_k_heads, num_v_heads, k_head_dim, v_head_dim):
    """in_proj_qkv (the conv input), in_proj_z [B, T, Hv, V], in_proj_b, in_proj_a of the DeltaNet."""
    B, T, _ = x.shape
    vd = num_v_heads * v_head_dim
    sizes = (2 * num_k_heads * k_head_dim + vd, vd, num_v_heads, num_v_heads)
    mixed, z, b, a = grouped_linear(x, p, "in_proj_qkvzba", sizes)
    return mixed, z.reshape(B, T, num_v_heads, v_head_dim), b, a


def gated_deltanet(x, p, *, num_k_heads: int, num_v_heads: int, k_head_dim: int, v_head_dim: int, eps: float,
                   mask=None, conv_state=None, recurrent_state=None, implementation: str | None = None,
                   chunk_size: int = 64, solve: str | None = None, precision: str = "float32"):
    """The Gated DeltaNet mixer (HF ``Qwen3_5GatedDeltaNet``). x [B, T, D] after input_layernorm.

    ``p`` holds in_proj_qkv [2*Hk*K + Hv*V, D] (plain concat [q | k | v], head-major), in_proj_z,
    in_proj_b, in_proj_a, conv1d [C, 1, W], dt_bias [Hv], A_log [Hv], norm [V], out_proj.
    Returns (y [B, T, D], (conv_state, recurrent_state)) so that a prefill can hand its states to decode.
    """
    B, T, _ = x.shape
    if mask is not None:  # padded tokens become exact zeros: k = v = 0, so they never write the state
        x = (x * mask[:, :, None].astype(x.dtype)).astype(x.dtype)
    mixed, z, b, a = _deltanet_projections(x, p, num_k_heads, num_v_heads, k_head_dim, v_head_dim)

    conv_out, conv_state = causal_conv1d(mixed, p["conv1d"], conv_state)
    mixed = jax.nn.silu(conv_out).astype(mixed.dtype)  # conv + SiLU over q, k AND v (z, a, b bypass it)
    kd = num_k_heads * k_head_dim
    q = mixed[..., :kd].reshape(B, T, num_k_heads, k_head_dim)
    k = mixed[..., kd: 2 * kd].reshape(B, T, num_k_heads, k_head_dim)
    v = mixed[..., 2 * kd:].reshape(B, T, num_v_heads, v_head_dim)

    beta = jax.nn.sigmoid(b)
    g = -jnp.exp(p["A_log"].astype(F32)) * jax.nn.softplus(a.astype(F32) + p["dt_bias"].astype(F32))
    q = l2_normalize(q) * (k_head_dim ** -0.5)  # l2-norm AFTER the conv, then the 1/sqrt(K) scale
    k = l2_normalize(k)
    o, recurrent_state = gated_delta_rule(
        q, k, v, g, beta, initial_state=recurrent_state, implementation=implementation, chunk_size=chunk_size,
        solve=solve, precision=precision,
    )
    y = gated_rms_norm(o, z, p["norm"], eps).reshape(B, T, num_v_heads * v_head_dim)
    return linear(y, p["out_proj"]), (conv_state, recurrent_state)


def gated_deltanet_steps(x, p, *, num_k_heads: int, num_v_heads: int, k_head_dim: int, v_head_dim: int,
                         eps: float, conv_state, recurrent_state, implementation: str | None = None):
    """The DeltaNet mixer for a few new tokens (decode, speculative verification), token by token.

    x [B, T, D] with small T; conv_state [B, W-1, C]; recurrent_state [B, Hv, K, V] f32. Returns
    (y [B, T, D], window [B, W-1+T, C], states [B, T, Hv, K, V]): ``window[:, t+1 : t+W]`` is the conv
    state after token t and ``states[:, t]`` the recurrent state after it, so a caller that keeps only
    the first n tokens can roll back exactly. ``implementation``: see
    :func:`pallas_kernels.gated_delta.gated_delta_recurrent` (None: the Pallas kernel on GPU).
    """
    from pallas_kernels.gated_delta import gated_delta_recurrent

    B, T, _ = x.shape
    mixed, z, b, a = _deltanet_projections(x, p, num_k_heads, num_v_heads, k_head_dim, v_head_dim)
    conv_out, _ = causal_conv1d(mixed, p["conv1d"], conv_state)
    window = jnp.concatenate([conv_state.astype(mixed.dtype), mixed], axis=1)
    mixed = jax.nn.silu(conv_out).astype(mixed.dtype)
    kd = num_k_heads * k_head_dim
    q = l2_normalize(mixed[..., :kd].reshape(B, T, num_k_heads, k_head_dim)) * (k_head_dim ** -0.5)
    k = l2_normalize(mixed[..., kd: 2 * kd].reshape(B, T, num_k_heads, k_head_dim))
    v = mixed[..., 2 * kd:].reshape(B, T, num_v_heads, v_head_dim)
    beta = jax.nn.sigmoid(b)
    g = -jnp.exp(p["A_log"].astype(F32)) * jax.nn.softplus(a.astype(F32) + p["dt_bias"].astype(F32))
    o, states = gated_delta_recurrent(q, k, v, g, beta, recurrent_state, implementation=implementation,
                                      output_all_states=True)
    y = gated_rms_norm(o, z, p["norm"], eps).reshape(B, T, num_v_heads * v_head_dim)
    return linear(y, p["out_proj"]), window, states


def swiglu_mlp(x, p):
    """``down(silu(gate(x)) * up(x))``."""
    gate, up = grouped_linear(x, p, "gate_up_proj", 2)
    return linear(jax.nn.silu(gate) * up, p["down_proj"])
