"""Generation: jitted prefill and decode steps over a fixed-shape decode state, batched prompts of
different lengths, sampling, stop tokens, streaming, and MTP speculative decoding.

Shapes are fixed per call so nothing recompiles per token: prompts are left-padded to a length bucket
(the next power of two, at least 64), the cache to a multiple of 256 slots. One compilation serves
every prompt that falls in the same bucket with the same batch size, cache size and sampling
settings; :func:`trace_counts` reports how many traces (= compilations) each step has had.

Padding never leaks: padded slots are zeroed before the DeltaNet projections (their k = v = 0, so
they write nothing into the recurrent state and the conv window sees zeros, as at a sequence start),
masked out of attention, and RoPE positions count real tokens only.

MTP speculative decoding (Qwen3.5's one-layer multi-token-prediction head, vLLM's ``Qwen3_5MTP``
scheme): the head drafts K tokens, the target verifies all of them in one forward of K+1 tokens, the
longest prefix that matches the target's greedy choice is accepted plus the target's own next token,
and every per-layer state is rolled back exactly to the accepted length (per-token DeltaNet states are
kept during verification). The output is token-for-token the plain greedy output.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from qwen35_jax import model as M
from qwen35_jax.cache import DecodeState, DeltaNetCache, KVCache, init_decode_state
from qwen35_jax.config import FULL_ATTENTION, ModelConfig
from qwen35_jax.sampling import SamplingParams, get_preset, sample, token_counts, update_counts

_TRACES: collections.Counter = collections.Counter()


def trace_counts() -> dict[str, int]:
    """How many times each jitted generation step has been traced (each trace is one compilation)."""
    return dict(_TRACES)


def prompt_bucket(length: int) -> int:
    """Padded prompt length: the next power of two, at least 64 (the delta rule's chunk)."""
    return max(64, 1 << (int(length) - 1).bit_length())


def cache_length(prompt_len: int, max_new_tokens: int, num_draft_tokens: int = 0) -> int:
    """KV-cache slots for a call: prompt bucket + new tokens + speculative headroom, rounded up to 256."""
    need = prompt_bucket(prompt_len) + max_new_tokens + 2 * num_draft_tokens + 2
    return -(-need // 256) * 256


# --------------------------------------------------------------------------------------------------
# Jitted steps (pure functions of params and state)
# --------------------------------------------------------------------------------------------------


def _fresh_state_like(state: DecodeState, layers, length) -> DecodeState:
    return state.replace(layers=tuple(layers), length=length)


def _prefill(cfg, options, has_padding, params, ids, pad, state, embeds=None, positions=None):
    """Run the (left-padded) prompt through the model, filling every cache. ``embeds`` [B, T, D] and
    ``positions`` [3, B, T] replace the token embeddings and 1-D positions for multimodal prompts.
    Returns (logits of the last position [B, V] f32, final hidden [B, T, D], new state)."""
    _TRACES["prefill"] += 1
    model = M.bind(cfg, params)
    B, T = ids.shape
    slots = jnp.broadcast_to(jnp.arange(T), (B, T))
    if positions is None:
        positions = jnp.maximum(slots - pad[:, None], 0)
    mask = (slots >= pad[:, None]) if has_padding else None
    x = model.language_model.embed(ids) if embeds is None else embeds
    hidden, layers = model.language_model.cached(x, caches=state.layers, position_ids=positions, slots=slots,
                                                 key_valid=None, fresh=True, mask=mask, options=options)
    new = _fresh_state_like(state, layers, jnp.full((B,), T, jnp.int32))
    return model.logits(hidden[:, -1]), hidden, new


def _decode(model, cfg, options, tokens, state):
    """Forward of new tokens [B, Tn] against the caches. Returns (logits [B, Tn, V] f32, hidden,
    pending layers) -- DeltaNet layers still need :func:`_commit`."""
    B, Tn = tokens.shape
    slots = state.length[:, None] + jnp.arange(Tn)[None, :]
    positions = slots - state.pad[:, None] + state.delta[:, None]
    S = state.max_len
    all_slots = jnp.arange(S)[None, :]
    key_valid = (all_slots >= state.pad[:, None]) & (all_slots < (state.length + Tn)[:, None])
    x = model.language_model.embed(tokens)
    hidden, pending = model.language_model.cached(x, caches=state.layers, position_ids=positions, slots=slots,
                                                  key_valid=key_valid, fresh=False, mask=None, options=options)
    return model.logits(hidden), hidden, pending


def _commit(cfg, state: DecodeState, pending, keep) -> DecodeState:
    """Keep the first ``keep[b]`` new tokens of each row (attention entries beyond stay masked)."""
    W = cfg.text.linear_conv_kernel_dim
    layers = [p if isinstance(p, KVCache) else M.commit_deltanet(p, keep, W) for p in pending]
    return _fresh_state_like(state, layers, state.length + keep)


def _step(cfg, options, sampling, stop_ids, params, state, tokens, key, counts, prompt_mask, done):
    """One decode token per row: forward, sample, stop check. Finished rows keep emitting nothing."""
    _TRACES["decode"] += 1
    model = M.bind(cfg, params)
    logits, _, pending = _decode(model, cfg, options, tokens[:, None], state)
    nxt = sample(logits[:, 0], key, sampling, counts=counts, prompt_mask=prompt_mask)
    nxt = jnp.where(done, tokens, nxt)
    counts = update_counts(counts, nxt, active=~done) if counts is not None else None
    new_done = done | jnp.isin(nxt, jnp.asarray(stop_ids, jnp.int32)) if stop_ids else done
    state = _commit(cfg, state, pending, jnp.ones_like(state.length))
    return nxt, state, counts, new_done


# ---- MTP speculative decoding --------------------------------------------------------------------


def _mtp_pass(model, options, mtp_state: DecodeState, next_tokens, hidden, *, fresh: bool, mask=None,
              prefill_positions=None):
    """The MTP head over slots [length, length + T): next_tokens [B, T] are the tokens one position
    ahead, hidden [B, T, D] the target (or fed-back MTP) hidden states. Writes its KV cache; does NOT
    advance ``length`` (the caller decides how many slots are real). Returns (mtp hidden, new cache)."""
    B, T = next_tokens.shape
    slots = mtp_state.length[:, None] + jnp.arange(T)[None, :]
    positions = jnp.maximum(slots - mtp_state.pad[:, None], 0) + mtp_state.delta[:, None]
    if prefill_positions is not None:
        positions = prefill_positions
    S = mtp_state.max_len
    all_slots = jnp.arange(S)[None, :]
    key_valid = (all_slots >= mtp_state.pad[:, None]) & (all_slots < (mtp_state.length + T)[:, None])
    embeds = model.language_model.embed(next_tokens)
    hm, cache = model.mtp.cached(embeds, hidden, caches=mtp_state.layers, position_ids=positions, slots=slots,
                                 key_valid=key_valid, fresh=fresh, mask=mask, options=options)
    return hm, cache


def _draft_more(model, options, mtp_state, first_draft, hm_last, num_draft):
    """Drafts 2..K by feeding the MTP head its own output (vLLM's multi-step MTP). The speculative
    cache entries it writes sit beyond ``length`` and are overwritten by the next catch-up pass."""
    drafts = [first_draft]
    probe = mtp_state
    h = hm_last
    for _ in range(num_draft - 1):
        hm, cache = _mtp_pass(model, options, probe, drafts[-1][:, None], h[:, None], fresh=False)
        probe = probe.replace(layers=(cache,), length=probe.length + 1)
        h = hm[:, 0]
        drafts.append(jnp.argmax(model.logits(hm[:, 0]), axis=-1).astype(jnp.int32))
    return jnp.stack(drafts, axis=1), probe.layers


def _spec_prefill(cfg, options, has_padding, num_draft, params, ids, pad, state, mtp_state, embeds=None,
                  positions=None):
    """Prefill the target and the MTP head; returns (first token, drafts [B, K], states)."""
    _TRACES["spec_prefill"] += 1
    logits, hidden, state = _prefill(cfg, options, has_padding, params, ids, pad, state, embeds, positions)
    model = M.bind(cfg, params)
    first = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    B, T = ids.shape
    next_tokens = jnp.concatenate([ids[:, 1:], first[:, None]], axis=1)  # slot i pairs (x_{i+1}, h_i)
    mask = (jnp.arange(T)[None, :] >= pad[:, None]) if has_padding else None
    hm, cache = _mtp_pass(model, options, mtp_state, next_tokens, hidden, fresh=True, mask=mask,
                          prefill_positions=positions)
    mtp_state = mtp_state.replace(layers=(cache,), pad=pad, length=jnp.full((B,), T, jnp.int32), delta=state.delta)
    d1 = jnp.argmax(model.logits(hm[:, -1]), axis=-1).astype(jnp.int32)
    drafts, layers = _draft_more(model, options, mtp_state, d1, hm[:, -1], num_draft)
    mtp_state = mtp_state.replace(layers=tuple(layers))
    return first, drafts, state, mtp_state


def _spec_round(cfg, options, num_draft, params, state, mtp_state, last, drafts):
    """Verify K drafts with one target forward of K+1 tokens; accept the matching prefix plus the
    target's next token; roll every state back to the accepted length; draft K new tokens.
    Returns (emitted [B, K+1], n_emitted [B], new last token, new drafts, states)."""
    _TRACES["spec_round"] += 1
    model = M.bind(cfg, params)
    K = num_draft
    tokens = jnp.concatenate([last[:, None], drafts], axis=1)  # [B, K+1]
    logits, hidden, pending = _decode(model, cfg, options, tokens, state)
    target = jnp.argmax(logits, axis=-1).astype(jnp.int32)  # target[:, j] follows tokens[:, j]
    match = (drafts == target[:, :K]).astype(jnp.int32)
    n = jnp.sum(jnp.cumprod(match, axis=1), axis=1)  # accepted drafts, 0..K
    state = _commit(cfg, state, pending, n + 1)
    j = jnp.arange(K + 1)[None, :]
    bonus = jnp.take_along_axis(target, n[:, None], axis=1)[:, 0]
    emitted = jnp.where(j < n[:, None], jnp.pad(drafts, ((0, 0), (0, 1))), bonus[:, None])
    # MTP catch-up over the verified slots with the true hidden states; real up to slot n
    hm, cache = _mtp_pass(model, options, mtp_state, emitted, hidden, fresh=False)
    mtp_state = mtp_state.replace(layers=(cache,), length=mtp_state.length + n + 1)
    hm_n = jnp.take_along_axis(hm, n[:, None, None], axis=1)[:, 0]
    d1 = jnp.argmax(model.logits(hm_n), axis=-1).astype(jnp.int32)
    new_drafts, layers = _draft_more(model, options, mtp_state, d1, hm_n, K)
    mtp_state = mtp_state.replace(layers=tuple(layers))
    return emitted, n + 1, bonus, new_drafts, state, mtp_state


_jitted_sample = jax.jit(sample, static_argnames=("params",))


@functools.lru_cache(maxsize=None)
def _jitted(name: str):
    fns = {
        "prefill": (_prefill, ("cfg", "options", "has_padding"), ()),
        "step": (_step, ("cfg", "options", "sampling", "stop_ids"), ("state",)),
        "spec_prefill": (_spec_prefill, ("cfg", "options", "has_padding", "num_draft"), ()),
        "spec_round": (_spec_round, ("cfg", "options", "num_draft"), ("state", "mtp_state")),
    }
    fn, static, donate = fns[name]
    return jax.jit(fn, static_argnames=static, donate_argnames=donate)


# --------------------------------------------------------------------------------------------------
# The user-facing loop
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class GenerationResult:
    """tokens: generated ids per row (stop token excluded); finish_reason: "stop" or "length" per row;
    stats: timings (s), tokens/s and, with MTP drafts, the acceptance rate."""

    tokens: list[list[int]]
    finish_reason: list[str]
    stats: dict[str, Any]


def _as_prompts(prompts, vocab_size: int) -> list[list[int]]:
    if isinstance(prompts, np.ndarray | jax.Array):
        arr = np.asarray(prompts)
        prompts = [arr] if arr.ndim == 1 else list(arr)
    out = []
    for b, p in enumerate(prompts):
        p = [int(t) for t in np.asarray(p).reshape(-1)]
        if not p:
            raise ValueError(f"prompt {b} is empty: generation needs at least one token")
        bad = [t for t in p if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"prompt {b} has token id {bad[0]} outside the vocabulary [0, {vocab_size})")
        out.append(p)
    if not out:
        raise ValueError("no prompts given")
    return out


def generate(cfg: ModelConfig, params, prompts, *, max_new_tokens: int = 128,
             sampling: SamplingParams | str = "greedy", stop_token_ids: Sequence[int] = (), seed: int = 0,
             num_draft_tokens: int = 0, kv_dtype: str | None = None, max_len: int | None = None,
             stream: Callable[[list[int | None]], None] | None = None,
             pixel_values=None, image_grid_thw=None, pixel_values_videos=None, video_grid_thw=None,
             options: M.RuntimeOptions = M.RuntimeOptions()) -> GenerationResult:
    """Generate up to ``max_new_tokens`` for each prompt (a list of token-id lists of any lengths, or a
    [B, T] array).

    sampling: a :class:`SamplingParams` or a preset name ("greedy", "thinking-general", ...).
    stop_token_ids: ids that end a row (e.g. ``<|im_end|>``); the stop token is not returned.
    num_draft_tokens: K >= 1 turns on MTP speculative decoding (greedy only; needs ``params['mtp']``).
    kv_dtype: KV-cache storage ("bfloat16", "float32", "int8", "fp8"); default the activation dtype.
    max_len: KV-cache slots (default :func:`cache_length`); a prompt that does not fit is an error.
    stream: called after every step with one entry per row: the new token, or None (row finished).
    pixel_values / image_grid_thw, pixel_values_videos / video_grid_thw: images and videos for the
        ``<|image_pad|>`` / ``<|video_pad|>`` tokens of the prompts (``qwen35_jax.image_processing``).
    """
    sampling = get_preset(sampling) if isinstance(sampling, str) else sampling
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    rows = _as_prompts(prompts, cfg.text.vocab_size)
    B, longest = len(rows), max(len(p) for p in rows)
    T = prompt_bucket(longest)
    S = max_len or cache_length(longest, max_new_tokens, num_draft_tokens)
    if T + max_new_tokens + 2 * num_draft_tokens + 1 > S:
        raise ValueError(
            f"the prompt ({longest} tokens, padded to {T}) plus {max_new_tokens} new tokens does not fit a "
            f"cache of max_len={S} slots"
        )
    if num_draft_tokens:
        if not 1 <= num_draft_tokens <= 8:
            raise ValueError(f"num_draft_tokens must be between 1 and 8, got {num_draft_tokens}")
        if "mtp" not in params:
            raise ValueError("num_draft_tokens needs the MTP head (params['mtp']); this checkpoint has none")
        if not sampling.greedy or sampling.repetition_penalty != 1.0 or sampling.presence_penalty != 0.0:
            raise ValueError("MTP speculative decoding is implemented for greedy decoding without penalties")
    pad = np.array([T - len(p) for p in rows], np.int32)
    ids = np.zeros((B, T), np.int32)
    for b, p in enumerate(rows):
        ids[b, pad[b]:] = p
    has_padding = bool(pad.any())
    dtype = jax.tree.leaves(params["language_model"]["embed_tokens"])[0].dtype
    state = init_decode_state(cfg, B, S, dtype=dtype, kv_dtype=kv_dtype).replace(pad=jnp.asarray(pad))
    embeds = positions = None
    if pixel_values is not None or pixel_values_videos is not None:
        from qwen35_jax.api import multimodal_inputs

        mask = np.arange(T)[None, :] >= pad[:, None]
        embeds, positions, deltas = multimodal_inputs(
            cfg, params, ids, mask, pixel_values=pixel_values, image_grid_thw=image_grid_thw,
            pixel_values_videos=pixel_values_videos, video_grid_thw=video_grid_thw)
        # decode positions continue from the last prompt position: slot - pad + delta
        state = state.replace(delta=jnp.asarray(deltas, jnp.int32))
    stop = tuple(int(t) for t in stop_token_ids)
    out: list[list[int]] = [[] for _ in range(B)]
    finished = [None] * B

    def emit(new_tokens: np.ndarray, counts_per_row: np.ndarray | None = None):
        step_out: list[int | None] = [None] * B
        for b in range(B):
            if finished[b]:
                continue
            for t in (new_tokens[b, : counts_per_row[b]] if counts_per_row is not None else [new_tokens[b]]):
                t = int(t)
                if t in stop:
                    finished[b] = "stop"
                    break
                out[b].append(t)
                step_out[b] = t
                if len(out[b]) >= max_new_tokens:
                    finished[b] = "length"
                    break
        if stream is not None:
            stream(step_out)

    t0 = time.perf_counter()
    stats: dict[str, Any] = {"batch": B, "prompt_bucket": T, "cache_len": S}
    if num_draft_tokens:
        mtp_state = init_decode_state(cfg, B, S, dtype=dtype, kv_dtype=kv_dtype, layer_types=(FULL_ATTENTION,))
        first, drafts, state, mtp_state = _jitted("spec_prefill")(
            cfg, options, has_padding, num_draft_tokens, params, jnp.asarray(ids), jnp.asarray(pad), state, mtp_state,
            embeds, positions)
        emit(np.asarray(first))
        stats["prefill_s"] = time.perf_counter() - t0
        last, proposed, accepted, rounds = first, 0, 0, 0
        while not all(finished):
            emitted, n, last, drafts, state, mtp_state = _jitted("spec_round")(
                cfg, options, num_draft_tokens, params, state, mtp_state, last, drafts)
            n_host = np.asarray(n)
            live = [b for b in range(B) if not finished[b]]
            proposed += num_draft_tokens * len(live)
            accepted += int(sum(n_host[b] - 1 for b in live))
            rounds += 1
            emit(np.asarray(emitted), n_host)
        stats.update(rounds=rounds, draft_tokens=proposed, accepted_drafts=accepted,
                     acceptance_rate=accepted / proposed if proposed else 0.0)
    else:
        key = jax.random.key(seed)
        vocab = cfg.text.vocab_size
        needs_counts = sampling.repetition_penalty != 1.0 or sampling.presence_penalty != 0.0
        valid = jnp.asarray(np.arange(T)[None, :] >= pad[:, None])
        prompt_mask = (token_counts(jnp.asarray(ids), vocab, valid) > 0) if needs_counts else None
        counts = jnp.zeros((B, vocab), jnp.int32) if needs_counts else None
        logits, _, state = _jitted("prefill")(cfg, options, has_padding, params, jnp.asarray(ids), jnp.asarray(pad),
                                              state, embeds, positions)
        key, sub = jax.random.split(key)
        tok = _jitted_sample(logits, sub, sampling, counts=counts, prompt_mask=prompt_mask)
        if needs_counts:
            counts = update_counts(counts, tok)
        done = jnp.isin(tok, jnp.asarray(stop, jnp.int32)) if stop else jnp.zeros((B,), bool)
        emit(np.asarray(tok))
        stats["prefill_s"] = time.perf_counter() - t0
        while not all(finished):
            key, sub = jax.random.split(key)
            tok, state, counts, done = _jitted("step")(
                cfg, options, sampling, stop, params, state, tok, sub, counts, prompt_mask, done)
            emit(np.asarray(tok))
    total = time.perf_counter() - t0
    generated = sum(len(o) for o in out)
    stats.update(total_s=total, generated_tokens=generated,
                 decode_tok_s=(generated - B) / max(total - stats["prefill_s"], 1e-9))
    return GenerationResult(tokens=out, finish_reason=[f or "length" for f in finished], stats=stats)
