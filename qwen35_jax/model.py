"""The Qwen3.5 model as Flax NNX modules, used functionally.

The modules declare the parameters (names mirror Hugging Face, so ``language_model.layers.3.
self_attn.q_proj.weight`` is ``model.language_model.layers.3.self_attn.q_proj.weight`` on disk) and wire
the pure math of :mod:`qwen35_jax.layers`. They are never initialised eagerly: the abstract model is
built with ``nnx.eval_shape``, split into ``(graphdef, state)``, and the state is filled from a
checkpoint or by :func:`random_params`. Users hold ``params``, a plain nested dict of arrays (what
``nnx.to_pure_dict`` gives, layer indices as int keys); :func:`forward` merges it back into modules
inside ``jit``. Any array leaf may be replaced by a quantized leaf that implements ``apply_linear``.

Every parameter carries logical axis names (``axes`` metadata) for sharding rules.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qwen35_jax import layers as L
from qwen35_jax.config import FULL_ATTENTION, ModelConfig, TextConfig, VisionConfig

F32 = jnp.float32


# --------------------------------------------------------------------------------------------------
# Runtime options (not architecture): which implementation runs each op
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class RuntimeOptions:
    """Implementation choices that do not change the function computed (within float tolerance).

    attention: "xla" (explicit einsum, fp32 softmax, supports padding masks) or "cudnn" (fused GPU
        kernel through ``jax.nn.dot_product_attention``; no padding mask).
    gated_delta: None (the library default for the platform: the Pallas kernels on a GPU, the XLA
        chunked form elsewhere), "pallas", "chunked" or "naive"; see
        :func:`pallas_kernels.gated_delta.gated_delta_rule` (prefill) and
        :func:`pallas_kernels.gated_delta.gated_delta_recurrent` (decode steps; "chunked" and "naive"
        both mean unrolled XLA steps there).
    chunk_size: chunk length of the chunked delta rule.
    gated_delta_solve: its triangular solve ("triangular_solve", "blocked", None = backend default).
    gated_delta_precision: its dot arithmetic on GPU ("float32", "tf32x3", "bf16x6", "bf16x3"; the
        Pallas kernels take "bf16x3", "tf32x3", "tf32", "float32"). The default "bf16x3" (fp32
        operands split into two bf16 parts, ~1e-5 relative) is what makes None pick the Pallas
        prefill on a GPU (1.04 ms per layer at T=4096 on an H200, against 2.61 ms for the XLA form
        at "tf32x3", which is as accurate as float32); on CPU the XLA form computes in float32.
    """

    attention: str = "xla"
    gated_delta: str | None = None
    chunk_size: int = 64
    gated_delta_solve: str | None = None
    gated_delta_precision: str = "bf16x3"


# --------------------------------------------------------------------------------------------------
# Parameter-holding building blocks
# --------------------------------------------------------------------------------------------------


def _param(shape: tuple[int, ...], dtype, axes: tuple[str | None, ...]) -> nnx.Param:
    # The value is only ever materialised abstractly (nnx.eval_shape); see random_params for init.
    return nnx.Param(jnp.zeros(shape, dtype), axes=axes)


class Linear(nnx.Module):
    """A weight stored like ``torch.nn.Linear``: [out, in] (optionally with a bias, vision only)."""

    def __init__(self, in_features: int, out_features: int, *, axes: tuple[str, str], dtype, bias: bool = False):
        self.weight = _param((out_features, in_features), dtype, axes)
        if bias:
            self.bias = _param((out_features,), dtype, axes[:1])

    def __call__(self, x):
        return L.linear(x, self.weight.get_value())


class Embedding(nnx.Module):
    def __init__(self, num: int, features: int, *, axes: tuple[str, str], dtype):
        self.weight = _param((num, features), dtype, axes)


class RMSNorm(nnx.Module):
    """(1 + w) RMSNorm; the stored weight is zero-centred."""

    def __init__(self, features: int, *, eps: float, dtype, axis: str = "embed"):
        self.weight = _param((features,), dtype, (axis,))
        self.eps = eps

    def __call__(self, x):
        return L.rms_norm(x, self.weight.get_value(), self.eps)


class GatedRMSNorm(nnx.Module):
    """Plain-w RMSNorm followed by a SiLU gate (inside the DeltaNet)."""

    def __init__(self, features: int, *, eps: float, dtype):
        self.weight = _param((features,), dtype, (None,))
        self.eps = eps


class LayerNorm(nnx.Module):
    def __init__(self, features: int, *, dtype):
        self.weight = _param((features,), dtype, ("vit_embed",))
        self.bias = _param((features,), dtype, ("vit_embed",))


class DepthwiseConv1d(nnx.Module):
    def __init__(self, channels: int, width: int, *, dtype):
        self.weight = _param((channels, 1, width), dtype, ("gdn_conv", None, None))


def _projection_names(fused_name: str, fused: bool) -> tuple[str, ...]:
    return (fused_name,) if fused else L.FUSED_PROJECTIONS[fused_name]


def _values(module: nnx.Module, names: tuple[str, ...]) -> dict[str, Any]:
    """The arrays (or quantized leaves) a pure layer function needs, by HF attribute name."""
    out = {}
    for name in names:
        v = getattr(module, name)
        out[name] = v.get_value() if isinstance(v, nnx.Variable) else v.weight.get_value()
    return out


# --------------------------------------------------------------------------------------------------
# Text decoder
# --------------------------------------------------------------------------------------------------


class GatedDeltaNet(nnx.Module):
    """``linear_attn``: see :func:`qwen35_jax.layers.gated_deltanet`."""

    _REST = ("conv1d", "dt_bias", "A_log", "norm", "out_proj")
    _NAMES = L.FUSED_PROJECTIONS["in_proj_qkvzba"] + _REST  # the separate (HF) layout

    def __init__(self, c: TextConfig, *, dtype, fused: bool = False):
        D = c.hidden_size
        if fused:
            self.in_proj_qkvzba = Linear(D, c.linear_conv_dim + c.linear_value_dim + 2 * c.linear_num_value_heads,
                                         axes=("fused", "embed"), dtype=dtype)
        else:
            self.in_proj_qkv = Linear(D, c.linear_conv_dim, axes=("gdn_qkv", "embed"), dtype=dtype)
            self.in_proj_z = Linear(D, c.linear_value_dim, axes=("gdn_v", "embed"), dtype=dtype)
            self.in_proj_b = Linear(D, c.linear_num_value_heads, axes=("gdn_heads", "embed"), dtype=dtype)
            self.in_proj_a = Linear(D, c.linear_num_value_heads, axes=("gdn_heads", "embed"), dtype=dtype)
        self._names = _projection_names("in_proj_qkvzba", fused) + self._REST
        self.conv1d = DepthwiseConv1d(c.linear_conv_dim, c.linear_conv_kernel_dim, dtype=dtype)
        self.dt_bias = _param((c.linear_num_value_heads,), dtype, ("gdn_heads",))
        self.A_log = _param((c.linear_num_value_heads,), dtype, ("gdn_heads",))
        self.norm = GatedRMSNorm(c.linear_value_head_dim, eps=c.rms_norm_eps, dtype=dtype)
        self.out_proj = Linear(c.linear_value_dim, D, axes=("embed", "gdn_v"), dtype=dtype)
        self.c = c

    def __call__(self, x, *, mask, options: RuntimeOptions, conv_state=None, recurrent_state=None):
        c = self.c
        return L.gated_deltanet(
            x, _values(self, self._names),
            num_k_heads=c.linear_num_key_heads, num_v_heads=c.linear_num_value_heads,
            k_head_dim=c.linear_key_head_dim, v_head_dim=c.linear_value_head_dim, eps=c.rms_norm_eps,
            mask=mask, conv_state=conv_state, recurrent_state=recurrent_state,
            implementation=options.gated_delta, chunk_size=options.chunk_size,
            solve=options.gated_delta_solve, precision=options.gated_delta_precision,
        )


    def steps(self, x, *, cache, implementation: str | None = None):
        """A few new tokens against a DeltaNetCache: (y, window, per-token states); see
        :func:`qwen35_jax.layers.gated_deltanet_steps`."""
        c = self.c
        return L.gated_deltanet_steps(
            x, _values(self, self._names), num_k_heads=c.linear_num_key_heads, num_v_heads=c.linear_num_value_heads,
            k_head_dim=c.linear_key_head_dim, v_head_dim=c.linear_value_head_dim, eps=c.rms_norm_eps,
            conv_state=cache.conv, recurrent_state=cache.recurrent, implementation=implementation,
        )


class Attention(nnx.Module):
    """``self_attn``: gated GQA attention with q/k norms and partial RoPE."""

    _REST = ("o_proj", "q_norm", "k_norm")
    _NAMES = L.FUSED_PROJECTIONS["qkv_proj"] + _REST  # the separate (HF) layout

    def __init__(self, c: TextConfig, *, dtype, fused: bool = False):
        D, H, KV, Dh = c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim
        if fused:
            self.qkv_proj = Linear(D, 2 * H * Dh + 2 * KV * Dh, axes=("fused", "embed"), dtype=dtype)
        else:
            self.q_proj = Linear(D, 2 * H * Dh, axes=("q_heads", "embed"), dtype=dtype)
            self.k_proj = Linear(D, KV * Dh, axes=("kv_heads", "embed"), dtype=dtype)
            self.v_proj = Linear(D, KV * Dh, axes=("kv_heads", "embed"), dtype=dtype)
        self._names = _projection_names("qkv_proj", fused) + self._REST
        self.o_proj = Linear(H * Dh, D, axes=("embed", "o_heads"), dtype=dtype)
        self.q_norm = RMSNorm(Dh, eps=c.rms_norm_eps, dtype=dtype, axis=None)
        self.k_norm = RMSNorm(Dh, eps=c.rms_norm_eps, dtype=dtype, axis=None)
        self.c = c

    def __call__(self, x, *, cos, sin, mask, options: RuntimeOptions):
        c = self.c
        return L.gated_attention(
            x, _values(self, self._names), num_heads=c.num_attention_heads, num_kv_heads=c.num_key_value_heads,
            head_dim=c.head_dim, eps=c.rms_norm_eps, cos=cos, sin=sin, mask=mask, implementation=options.attention,
        )


    def cached(self, x, *, cos, sin, cache, slots, key_valid, q_slots, fresh: bool, mask, options: RuntimeOptions):
        """Attention of new tokens that also writes their keys/values into ``cache`` at ``slots``.
        ``fresh``: the cache held nothing before (a prefill), so the new tokens only see each other
        and the fused/explicit full-sequence kernels apply; otherwise they read the whole cache."""
        from qwen35_jax.cache import read_kv, write_kv

        c = self.c
        p = _values(self, self._names)
        q, k, v, gate = L.attention_qkv(x, p, num_heads=c.num_attention_heads, num_kv_heads=c.num_key_value_heads,
                                        head_dim=c.head_dim, eps=c.rms_norm_eps, cos=cos, sin=sin)
        cache = write_kv(cache, k, v, slots)
        if fresh:
            o = L.dot_product_attention(q, k, v, mask=mask, implementation=options.attention)
        else:
            k_all, v_all = read_kv(cache, q.dtype)
            o = L.cached_attention(q, k_all, v_all, key_valid=key_valid, q_slots=q_slots)
        return L.attention_out(o, gate, p), cache


class MLP(nnx.Module):
    def __init__(self, c: TextConfig, *, dtype, fused: bool = False):
        D, F = c.hidden_size, c.intermediate_size
        if fused:
            self.gate_up_proj = Linear(D, 2 * F, axes=("fused", "embed"), dtype=dtype)
        else:
            self.gate_proj = Linear(D, F, axes=("mlp", "embed"), dtype=dtype)
            self.up_proj = Linear(D, F, axes=("mlp", "embed"), dtype=dtype)
        self.down_proj = Linear(F, D, axes=("embed", "mlp"), dtype=dtype)
        self._names = _projection_names("gate_up_proj", fused) + ("down_proj",)

    def __call__(self, x):
        return L.swiglu_mlp(x, _values(self, self._names))


class DecoderLayer(nnx.Module):
    """Pre-norm residual block; the mixer is ``linear_attn`` (Gated DeltaNet) or ``self_attn``."""

    def __init__(self, c: TextConfig, layer_idx: int, *, dtype, layer_type: str | None = None, fused: bool = False):
        self.layer_type = layer_type or c.layer_types[layer_idx]
        self.input_layernorm = RMSNorm(c.hidden_size, eps=c.rms_norm_eps, dtype=dtype)
        if self.layer_type == FULL_ATTENTION:
            self.self_attn = Attention(c, dtype=dtype, fused=fused)
        else:
            self.linear_attn = GatedDeltaNet(c, dtype=dtype, fused=fused)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, eps=c.rms_norm_eps, dtype=dtype)
        self.mlp = MLP(c, dtype=dtype, fused=fused)

    def __call__(self, x, *, cos, sin, mask, options: RuntimeOptions):
        h = self.input_layernorm(x)
        if self.layer_type == FULL_ATTENTION:
            h = self.self_attn(h, cos=cos, sin=sin, mask=mask, options=options)
        else:
            h, _ = self.linear_attn(h, mask=mask, options=options)
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x))

    def cached(self, x, *, cache, cos, sin, slots, key_valid, q_slots, fresh: bool, mask, options: RuntimeOptions):
        """One layer over new tokens with its cache. Returns (x, cache or pending DeltaNet states):
        attention layers return their updated KVCache; DeltaNet layers return a DeltaNetCache after a
        fresh prefill, else ``(window, states)`` for :func:`commit_deltanet` once the caller knows how
        many of the new tokens it keeps."""
        from qwen35_jax.cache import DeltaNetCache

        h = self.input_layernorm(x)
        if self.layer_type == FULL_ATTENTION:
            h, new = self.self_attn.cached(h, cos=cos, sin=sin, cache=cache, slots=slots, key_valid=key_valid,
                                           q_slots=q_slots, fresh=fresh, mask=mask, options=options)
        elif fresh:
            h, (conv, recurrent) = self.linear_attn(h, mask=mask, options=options)
            new = DeltaNetCache(conv=conv.astype(cache.conv.dtype), recurrent=recurrent)
        else:
            h, window, states = self.linear_attn.steps(h, cache=cache, implementation=options.gated_delta)
            new = (window, states)
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x)), new


def commit_deltanet(pending, keep: jax.Array, conv_width: int):
    """The DeltaNetCache after keeping the first ``keep[b]`` (>= 1) of the new tokens of row b.
    pending = (window [B, W-1+T, C], states [B, T, Hv, K, V]) from :meth:`DecoderLayer.cached`."""
    from qwen35_jax.cache import DeltaNetCache

    window, states = pending
    rows = jnp.arange(window.shape[0])
    idx = keep[:, None] + jnp.arange(conv_width - 1)[None, :]  # conv window after token keep-1
    # One new token (plain decode): keep is 1, and a plain index avoids a gather that would copy the
    # whole recurrent state (3 MB per layer and sequence at the 27B shapes) once more per token.
    recurrent = states[:, 0] if states.shape[1] == 1 else states[rows, keep - 1]
    return DeltaNetCache(conv=window[rows[:, None], idx], recurrent=recurrent)


class TextModel(nnx.Module):
    """``model.language_model``: embedding, the hybrid stack, final norm."""

    def __init__(self, c: TextConfig, *, dtype, fused: bool = False):
        self.embed_tokens = Embedding(c.vocab_size, c.hidden_size, axes=("vocab", "embed"), dtype=dtype)
        self.layers = nnx.List([DecoderLayer(c, i, dtype=dtype, fused=fused) for i in range(c.num_hidden_layers)])
        self.norm = RMSNorm(c.hidden_size, eps=c.rms_norm_eps, dtype=dtype)
        self.c = c

    def embed(self, input_ids):
        table = self.embed_tokens.weight.get_value()
        # Under jit, ids outside [0, vocab) cannot raise; they gather NaN rows, so the logits of that
        # sequence are NaN, never silently wrong numbers. Eager calls are range-checked before this.
        return jnp.take(table, input_ids, axis=0, mode="fill", fill_value=jnp.nan)

    def __call__(self, x, *, position_ids, mask, options: RuntimeOptions):
        c = self.c
        cos, sin = L.rope_cos_sin(position_ids, c.rotary_dim, c.rope_theta, c.mrope_section, x.dtype)
        for i, layer in enumerate(self.layers):
            with jax.named_scope(f"layer_{i}_{layer.layer_type}"):
                x = layer(x, cos=cos, sin=sin, mask=mask, options=options)
        return self.norm(x)

    def cached(self, x, *, caches, position_ids, slots, key_valid, fresh: bool, mask, options: RuntimeOptions):
        """The stack over new tokens with per-layer caches; returns (hidden after the final norm,
        list of new caches / pending DeltaNet states). See :meth:`DecoderLayer.cached`."""
        c = self.c
        cos, sin = L.rope_cos_sin(position_ids, c.rotary_dim, c.rope_theta, c.mrope_section, x.dtype)
        new = []
        for i, (layer, cache) in enumerate(zip(self.layers, caches)):
            with jax.named_scope(f"layer_{i}_{layer.layer_type}"):
                x, n = layer.cached(x, cache=cache, cos=cos, sin=sin, slots=slots, key_valid=key_valid,
                                    q_slots=slots, fresh=fresh, mask=mask, options=options)
            new.append(n)
        return self.norm(x), new


class MTP(nnx.Module):
    """The multi-token-prediction head (``mtp.*``; vLLM's ``Qwen3_5MTP``; transformers ignores it):
    ``fc(concat[norm_e(embed(next token)), norm_h(hidden)])`` -> one gated full-attention layer ->
    ``norm`` -> the shared lm_head. Embedding and head are the main model's."""

    def __init__(self, c: TextConfig, *, dtype, fused: bool = False):
        D = c.hidden_size
        self.pre_fc_norm_embedding = RMSNorm(D, eps=c.rms_norm_eps, dtype=dtype)
        self.pre_fc_norm_hidden = RMSNorm(D, eps=c.rms_norm_eps, dtype=dtype)
        self.fc = Linear(2 * D, D, axes=("embed", "mtp_in"), dtype=dtype)
        self.layers = nnx.List([DecoderLayer(c, 0, dtype=dtype, layer_type=FULL_ATTENTION, fused=fused)
                                for _ in range(c.mtp_num_hidden_layers)])
        self.norm = RMSNorm(D, eps=c.rms_norm_eps, dtype=dtype)
        self.c = c

    def cached(self, embeds, hidden, *, caches, position_ids, slots, key_valid, fresh: bool, mask,
               options: RuntimeOptions, layer: int = 0):
        """embeds [B, T, D] of the NEXT tokens, hidden [B, T, D] the target's final-norm hidden states at
        the same positions. Returns (mtp hidden after its norm, new cache of the layer used)."""
        c = self.c
        x = self.fc(jnp.concatenate([self.pre_fc_norm_embedding(embeds), self.pre_fc_norm_hidden(hidden)], -1))
        cos, sin = L.rope_cos_sin(position_ids, c.rotary_dim, c.rope_theta, c.mrope_section, x.dtype)
        x, cache = self.layers[layer].cached(x, cache=caches[layer], cos=cos, sin=sin, slots=slots,
                                             key_valid=key_valid, q_slots=slots, fresh=fresh, mask=mask,
                                             options=options)
        return self.norm(x), cache


# --------------------------------------------------------------------------------------------------
# Vision tower: parameters (its forward arrives with the vision issue). Declared now so the abstract
# tree equals the checkpoint and no tensor of a real checkpoint is dropped.
# --------------------------------------------------------------------------------------------------


class Conv3d(nnx.Module):
    """A Conv3d with stride = kernel: [out, C, kT, kH, kW] weight and a bias."""

    def __init__(self, in_channels: int, out_channels: int, kernel: tuple[int, int, int], *, dtype):
        self.weight = _param((out_channels, in_channels, *kernel), dtype, ("vit_embed", None, None, None, None))
        self.bias = _param((out_channels,), dtype, ("vit_embed",))


class VisionPatchEmbed(nnx.Module):
    def __init__(self, v: VisionConfig, *, dtype):
        kernel = (v.temporal_patch_size, v.patch_size, v.patch_size)
        self.proj = Conv3d(v.in_channels, v.hidden_size, kernel, dtype=dtype)


class VisionAttention(nnx.Module):
    def __init__(self, v: VisionConfig, *, dtype):
        self.qkv = Linear(v.hidden_size, 3 * v.hidden_size, axes=("vit_heads", "vit_embed"), dtype=dtype, bias=True)
        self.proj = Linear(v.hidden_size, v.hidden_size, axes=("vit_embed", "vit_heads"), dtype=dtype, bias=True)


class VisionMLP(nnx.Module):
    def __init__(self, v: VisionConfig, *, dtype):
        self.linear_fc1 = Linear(v.hidden_size, v.intermediate_size, axes=("vit_mlp", "vit_embed"), dtype=dtype, bias=True)
        self.linear_fc2 = Linear(v.intermediate_size, v.hidden_size, axes=("vit_embed", "vit_mlp"), dtype=dtype, bias=True)


class VisionBlock(nnx.Module):
    def __init__(self, v: VisionConfig, *, dtype):
        self.norm1 = LayerNorm(v.hidden_size, dtype=dtype)
        self.norm2 = LayerNorm(v.hidden_size, dtype=dtype)
        self.attn = VisionAttention(v, dtype=dtype)
        self.mlp = VisionMLP(v, dtype=dtype)


class VisionMerger(nnx.Module):
    def __init__(self, v: VisionConfig, *, dtype, out_features: int):
        M = v.merged_hidden_size
        self.norm = LayerNorm(v.hidden_size, dtype=dtype)
        self.linear_fc1 = Linear(M, M, axes=("vit_merge", None), dtype=dtype, bias=True)
        self.linear_fc2 = Linear(M, out_features, axes=("embed", "vit_merge"), dtype=dtype, bias=True)


class VisionModel(nnx.Module):
    """``model.visual`` (parameters only for now)."""

    def __init__(self, v: VisionConfig, *, dtype):
        self.patch_embed = VisionPatchEmbed(v, dtype=dtype)
        self.pos_embed = Embedding(v.num_position_embeddings, v.hidden_size, axes=(None, "vit_embed"), dtype=dtype)
        self.blocks = nnx.List([VisionBlock(v, dtype=dtype) for _ in range(v.depth)])
        self.merger = VisionMerger(v, dtype=dtype, out_features=v.out_hidden_size)


# --------------------------------------------------------------------------------------------------
# The whole model
# --------------------------------------------------------------------------------------------------


class Qwen35(nnx.Module):
    """Top level: ``language_model``, ``lm_head`` (absent when tied to the embedding), ``visual``, and
    ``mtp`` when the config declares an MTP head (``mtp_num_hidden_layers`` > 0)."""

    def __init__(self, cfg: ModelConfig, *, dtype=jnp.bfloat16, fused: bool = False):
        self.language_model = TextModel(cfg.text, dtype=dtype, fused=fused)
        if not cfg.tie_word_embeddings:
            self.lm_head = Linear(cfg.text.hidden_size, cfg.text.vocab_size, axes=("vocab", "embed"), dtype=dtype)
        if cfg.vision is not None:
            self.visual = VisionModel(cfg.vision, dtype=dtype)
        if cfg.text.mtp_num_hidden_layers > 0:
            self.mtp = MTP(cfg.text, dtype=dtype, fused=fused)
        self.cfg = cfg

    def logits(self, hidden):
        """float32 logits: the head matmul accumulates in f32 and is not rounded to the activation dtype."""
        w = (self.language_model.embed_tokens if self.cfg.tie_word_embeddings else self.lm_head).weight.get_value()
        if hasattr(w, "apply_linear"):
            return w.apply_linear(hidden).astype(F32)
        return jax.lax.dot_general(
            hidden, w.astype(hidden.dtype), (((hidden.ndim - 1,), (1,)), ((), ())),
            precision=L.precision_for(hidden.dtype), preferred_element_type=F32,
        )


# --------------------------------------------------------------------------------------------------
# Abstract tree, names, random init
# --------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=16)
def abstract_model(cfg: ModelConfig, dtype=jnp.bfloat16, fused: bool = False) -> tuple[nnx.GraphDef, nnx.State]:
    """(graphdef, abstract state) of the model, built without allocating any parameter. ``fused``: the
    layout of :func:`fuse_projections` (one weight per group of projections that read one input)."""
    return nnx.split(nnx.eval_shape(lambda: Qwen35(cfg, dtype=jnp.dtype(dtype), fused=fused)))


def path_str(path: tuple) -> str:
    """('language_model', 'layers', 3, 'mlp', 'up_proj', 'weight') -> 'language_model.layers.3.mlp.up_proj.weight'."""
    parts = []
    for p in path:
        for attr in ("key", "idx", "name"):
            if hasattr(p, attr):
                p = getattr(p, attr)
                break
        parts.append(str(p))
    return ".".join(parts)


def param_specs(cfg: ModelConfig, dtype=jnp.bfloat16, fused: bool = False) -> dict[str, jax.ShapeDtypeStruct]:
    """Flat ``{name: ShapeDtypeStruct}`` of every parameter, in a deterministic order."""
    _, state = abstract_model(cfg, jnp.dtype(dtype), fused)
    return {path_str(path): var.get_value() for path, var in nnx.to_flat_state(state)}


def param_axes(cfg: ModelConfig, fused: bool = False) -> dict[str, tuple[str | None, ...]]:
    """Flat ``{name: logical axis names}`` (the input of sharding rules)."""
    _, state = abstract_model(cfg, jnp.dtype(jnp.bfloat16), fused)
    return {path_str(path): tuple(var.get_metadata().get("axes", ())) for path, var in nnx.to_flat_state(state)}


def abstract_params(cfg: ModelConfig, dtype=jnp.bfloat16, fused: bool = False) -> dict:
    """The nested ``params`` dict with ShapeDtypeStruct leaves."""
    _, state = abstract_model(cfg, jnp.dtype(dtype), fused)
    return nnx.to_pure_dict(state)


def unflatten(flat: Mapping[str, Any]) -> dict:
    """``{'a.b.3.c': x}`` -> ``{'a': {'b': {3: {'c': x}}}}`` (digit components become int keys, as NNX's)."""
    tree: dict = {}
    for name, value in flat.items():
        node = tree
        parts = [int(p) if p.isdigit() else p for p in name.split(".")]
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return tree


def flatten(params: Mapping) -> dict[str, Any]:
    """Inverse of :func:`unflatten`: ``{name: leaf}`` (a quantized leaf stays one leaf)."""
    out: dict[str, Any] = {}

    def walk(node, prefix):
        if isinstance(node, Mapping):
            for k, v in node.items():
                walk(v, f"{prefix}.{k}" if prefix else str(k))
        else:
            out[prefix] = node

    walk(params, "")
    return out


def init_kind(name: str, ndim: int) -> str:
    """How a parameter is initialised, from its name (HF's ``_init_weights`` conventions)."""
    if name.endswith("linear_attn.norm.weight") or name.endswith("dt_bias"):
        return "ones"
    if name.endswith("A_log"):
        return "log_uniform_1_16"
    if name.endswith(".bias") or (ndim == 1 and "norm" in name and "visual" not in name):
        return "zeros"  # biases and the zero-centred (1 + w) norms
    if ndim == 1:
        return "ones"  # vision LayerNorm weights
    return "normal_0.02"


@functools.lru_cache(maxsize=None)
def _initializer(kind: str, shape: tuple[int, ...], dtype, sharding) -> Callable[[jax.Array], jax.Array]:
    """One compiled initializer per (kind, shape, dtype, sharding): the 27B needs ~20, not ~900."""

    def draw(key, block_shape):
        if kind == "log_uniform_1_16":
            return jnp.log(jax.random.uniform(key, block_shape, F32, 1.0, 16.0)).astype(dtype)
        return (0.02 * jax.random.normal(key, block_shape, F32)).astype(dtype)

    def init(key):
        if kind == "ones":
            return jnp.ones(shape, dtype)
        if kind == "zeros":
            return jnp.zeros(shape, dtype)
        # The random-bit generator needs ~16 bytes of temporaries per element: drawing the 1.27 B
        # embedding in one go would take 20 GB. Draw it in row blocks of <= 2^24 elements instead.
        blocks = _row_blocks(shape, 1 << 24)
        if blocks == 1:
            return draw(key, shape)
        out = jax.lax.map(lambda k: draw(k, (shape[0] // blocks, *shape[1:])), jax.random.split(key, blocks))
        return out.reshape(shape)

    return jax.jit(init, out_shardings=sharding)


def _row_blocks(shape: tuple[int, ...], max_elements: int) -> int:
    """The fewest blocks that divide the leading axis evenly with <= max_elements each (1 if small)."""
    size = int(np.prod(shape)) if shape else 1
    if size <= max_elements or not shape:
        return 1
    for blocks in range(2, shape[0] + 1):
        if shape[0] % blocks == 0 and size // blocks <= max_elements:
            return blocks
    return shape[0]


def init_value(name: str, shape: tuple[int, ...], dtype, seed: int, sharding=None) -> jax.Array:
    """The random initial value of one parameter: (1 + w) norms 0, the gated norm 1, ``dt_bias`` 1,
    ``A_log`` = log U(1, 16), biases 0, every matrix N(0, 0.02). Each leaf draws from its own key
    (seed, name), so the result does not depend on the order of initialisation or on sharding."""
    digest = int.from_bytes(hashlib.blake2s(f"{seed}:{name}".encode(), digest_size=4).digest(), "little")
    fn = _initializer(init_kind(name, len(shape)), tuple(shape), jnp.dtype(dtype), sharding)
    return fn(jax.random.key(digest))


def random_params(cfg: ModelConfig, *, seed: int = 0, dtype=jnp.bfloat16,
                  sharding: Callable[[str, jax.ShapeDtypeStruct], Any] | Any | None = None,
                  only: str | None = None, fused: bool = False) -> dict:
    """Random parameters with the real shapes, created leaf by leaf directly on the device (so a 54 GB
    model never needs a host copy). ``sharding`` is a Sharding or a function ``(name, spec) -> Sharding``;
    ``only`` keeps the parameters whose path starts with that prefix (e.g. ``"visual."``); ``fused``
    draws the layout of :func:`fuse_projections` directly (different random values than the unfused
    tree of the same seed)."""
    flat = {}
    for name, spec in param_specs(cfg, dtype, fused).items():
        if only is not None and not name.startswith(only):
            continue
        target = sharding(name, spec) if callable(sharding) else sharding
        flat[name] = init_value(name, spec.shape, spec.dtype, seed, target)
    return unflatten(flat)


def count_params(params_or_specs: Mapping, prefix: str = "") -> int:
    """Number of parameters under ``prefix`` (e.g. ``'language_model.'``) of a flat or nested tree."""
    return sum(int(np.prod(v.shape)) for k, v in flatten(params_or_specs).items() if k.startswith(prefix))


# --------------------------------------------------------------------------------------------------
# Fused projections (a decode layout)
# --------------------------------------------------------------------------------------------------


def _projection_groups(params: Mapping):
    """Yield (path of the module dict, module dict, fused name) for every module dict of ``params``
    that holds a group of ``layers.FUSED_PROJECTIONS``, fused or not."""
    def walk(node, prefix):
        if not isinstance(node, Mapping):
            return
        for fused, parts in L.FUSED_PROJECTIONS.items():
            if fused in node or any(p in node for p in parts):
                yield prefix, node, fused
        for k, v in node.items():
            yield from walk(v, f"{prefix}.{k}" if prefix else str(k))
    yield from walk(params, "")


def _copy_dicts(node):
    """The same tree with new dicts (the leaves shared): edits of the copy never reach the original."""
    return {k: _copy_dicts(v) for k, v in node.items()} if isinstance(node, Mapping) else node


def is_fused(params: Mapping) -> bool:
    """Whether ``params`` has the layout of :func:`fuse_projections`. Raises ``ValueError`` for a tree
    that mixes the two layouts (it matches no model)."""
    fused, unfused = [], []
    for prefix, node, name in _projection_groups(params):
        (fused if name in node else unfused).append(f"{prefix}.{name}" if name in node else
                                                    f"{prefix}.{L.FUSED_PROJECTIONS[name][0]}")
        if len(fused) and len(unfused):
            raise ValueError(f"the parameter tree mixes fused ({fused[0]}) and separate ({unfused[0]}) projections; "
                             f"use fuse_projections / unfuse_projections on the whole tree")
    return bool(fused)


def fuse_projections(params: Mapping, *, delete_inputs: bool = False) -> dict:
    """A decode layout of ``params``: the projections that read the same input (attention q/k/v, the
    DeltaNet's four ``in_proj_*``, the MLP's gate/up) become one weight each (``qkv_proj``,
    ``in_proj_qkvzba``, ``gate_up_proj``: the [out, in] weights stacked along out), so a decode step
    runs one bigger GEMV per group instead of two to four. Every output is the same dot product as
    before (the split is exact); on the GPU only the summation order inside XLA's GEMV can differ.

    Float weights only: a tree with quantized projections is an error (their leaves run their own
    kernels), as is a tree that is already fused. Quantizers, calibration and the checkpoint writer
    work on the separate layout (:func:`unfuse_projections` gives it back; the writer does that itself).

    A new tree; the input is unchanged unless ``delete_inputs=True``, which frees each group's separate
    arrays once their fused copy exists (peak memory: the model plus one fused weight, which is what
    a 27B on an 80 GB GPU needs). Untouched leaves are shared with the input.
    """
    if is_fused(params):
        raise ValueError("the parameter tree is already fused")
    out = _copy_dicts(params)
    for prefix, node, name in list(_projection_groups(out)):
        parts = L.FUSED_PROJECTIONS[name]
        missing = [p for p in parts if p not in node]
        if missing:
            raise ValueError(f"{prefix}: has {[p for p in parts if p in node]} but not {missing}; cannot fuse {name}")
        weights = [node[p]["weight"] for p in parts]
        for p, w in zip(parts, weights):
            if not isinstance(w, jax.Array | np.ndarray):
                raise TypeError(f"{prefix}.{p}.weight is a {type(w).__name__}: only float weights can be fused "
                                f"(quantized leaves run their own kernels; keep that tree unfused)")
        if len({w.shape[1] for w in weights}) != 1 or len({w.dtype for w in weights}) != 1:
            raise ValueError(f"{prefix}: {parts} differ in input size or dtype: "
                             f"{[(tuple(w.shape), str(w.dtype)) for w in weights]}")
        node[name] = {"weight": jnp.concatenate([jnp.asarray(w) for w in weights], axis=0)}
        for p in parts:
            del node[p]
        if delete_inputs:
            jax.block_until_ready(node[name]["weight"])
            for w in weights:
                if isinstance(w, jax.Array):
                    w.delete()
    return out


def unfuse_projections(cfg: ModelConfig, params: Mapping) -> dict:
    """The inverse of :func:`fuse_projections` (slices; the tree's HF-named layout again)."""
    if not is_fused(params):
        return params
    out = _copy_dicts(params)
    flat_specs = param_specs(cfg, jnp.float32)
    for prefix, node, name in list(_projection_groups(out)):
        parts = L.FUSED_PROJECTIONS[name]
        sizes = [flat_specs[f"{prefix}.{p}.weight"].shape[0] for p in parts]
        w = node.pop(name)["weight"]
        if w.shape[0] != sum(sizes):
            raise ValueError(f"{prefix}.{name}.weight has {w.shape[0]} rows; the config implies {sum(sizes)}")
        for p, piece in zip(parts, jnp.split(w, np.cumsum(sizes)[:-1].tolist(), axis=0)):
            node[p] = {"weight": piece}
    return out


# --------------------------------------------------------------------------------------------------
# Functional entry points
# --------------------------------------------------------------------------------------------------


def bind(cfg: ModelConfig, params: Mapping) -> Qwen35:
    """Merge a ``params`` dict into a live module (inside jit this costs only tracing time). Subtrees
    may be absent (e.g. drop ``visual`` for text-only work); their modules stay abstract."""
    graphdef, abstract_state = abstract_model(cfg, jnp.dtype(jnp.bfloat16), is_fused(params))
    state = jax.tree.map(lambda leaf: leaf, abstract_state)  # fresh Variables: never mutate the cached tree
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state)


def default_position_ids(batch: int, length: int, offset: int = 0) -> jax.Array:
    """``arange(T) + offset`` for every row, as HF uses when no position ids are given."""
    return jnp.broadcast_to(jnp.arange(offset, offset + length, dtype=jnp.int32), (batch, length))


def _run_text(model: Qwen35, input_ids, attention_mask, position_ids, options, inputs_embeds=None):
    x = model.language_model.embed(input_ids) if inputs_embeds is None else inputs_embeds
    B, T = x.shape[:2]
    if position_ids is None:
        position_ids = default_position_ids(B, T)
    return model.language_model(x, position_ids=position_ids, mask=attention_mask, options=options)


def hidden_states_impl(cfg: ModelConfig, params: Mapping, input_ids, attention_mask=None, position_ids=None,
                       options: RuntimeOptions = RuntimeOptions(), inputs_embeds=None):
    """The decoder output after the final norm, [B, T, D] in the parameter dtype (no input checks).
    ``inputs_embeds`` [B, T, D] replaces the embedding lookup (multimodal sequences)."""
    return _run_text(bind(cfg, params), input_ids, attention_mask, position_ids, options, inputs_embeds)


def forward_impl(cfg: ModelConfig, params: Mapping, input_ids, attention_mask=None, position_ids=None,
                 options: RuntimeOptions = RuntimeOptions(), inputs_embeds=None):
    """float32 logits [B, T, vocab] (no input checks; see :func:`qwen35_jax.forward`)."""
    model = bind(cfg, params)
    return model.logits(_run_text(model, input_ids, attention_mask, position_ids, options, inputs_embeds))


forward_jit = jax.jit(forward_impl, static_argnames=("cfg", "options"))
hidden_states_jit = jax.jit(hidden_states_impl, static_argnames=("cfg", "options"))


def _embed_multimodal(cfg: ModelConfig, params: Mapping, input_ids, features: tuple):
    """Token embeddings with the vision features scattered into the image / video pad positions.
    features: ((token_id, [n, D] array), ...)."""
    from qwen35_jax.vision import scatter_vision

    x = bind(cfg, params).language_model.embed(input_ids)
    for token_id, feats in features:
        x = scatter_vision(x, input_ids, feats, token_id)
    return x


embed_multimodal_jit = jax.jit(_embed_multimodal, static_argnames=("cfg",))
