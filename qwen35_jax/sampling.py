"""Token sampling for generation: pure, jit-friendly functions of arrays plus a static config.

Everything here is usable inside a jitted decode step. :class:`SamplingParams` is a frozen, hashable
dataclass meant to be a *static* argument (``jax.jit(sample, static_argnames="params")``): every
branch below is taken on it in Python, never on a traced value, so a neutral setting (no top-k, no
penalty, ...) costs nothing at all.

Semantics and their sources
---------------------------
* **Repetition penalty** -- Hugging Face transformers ``RepetitionPenaltyLogitsProcessor`` (CTRL,
  Keskar et al. 2019), which vLLM's ``apply_penalties`` reproduces: for every token that appears in
  the prompt *or* among the generated tokens, a positive logit is divided by ``p`` and a negative one
  multiplied by ``p``.
* **Presence penalty** -- vLLM's sampler (``vllm.model_executor.layers.utils.apply_penalties``), i.e.
  the OpenAI API definition: ``presence_penalty`` is subtracted from the logit of every token that
  appears at least once among the *generated* tokens (the prompt does not count).
* **Temperature, top-k, top-p, min-p** -- transformers ``TemperatureLogitsWarper``,
  ``TopKLogitsWarper``, ``TopPLogitsWarper``, ``MinPLogitsWarper``:

  - top-p keeps the smallest set of tokens, in descending probability order, whose cumulative
    probability reaches ``top_p``; exactly as ``TopPLogitsWarper``, tokens whose cumulative
    probability *in ascending order* is ``<= 1 - top_p`` are removed, and the top token is always kept;
  - min-p removes the tokens whose probability is below ``min_p`` times the top probability.

* **Order** -- penalties -> temperature -> top-k -> top-p -> min-p -> draw. This is the order of
  transformers' ``generate`` (``_get_logits_processor``) and of vLLM's original (v0) sampler
  (``_apply_top_k_top_p`` then ``_apply_min_p``). vLLM's V1 sampler applies min-p *before*
  top-k/top-p; since min-p only compares each probability with the top one (a ratio that top-k and
  top-p do not change, and they never drop the top token), the two orders differ only when top-p
  and min-p are both active. Qwen's recommended settings all have ``min_p = 0``.

Implementation notes
--------------------
* With ``top_k > 0`` the vocabulary (248,320 for Qwen3.5) is cut to ``k`` candidates with
  ``jax.lax.top_k``; temperature, top-p and min-p then work on ``[B, k]`` arrays and the draw is a
  categorical over the ``k`` candidates, mapped back to token ids. No full sort, no ``[B, V]`` scatter.
* **Ties at the k-th value**: exactly ``k`` tokens are kept; among tokens tied with the k-th largest
  logit, the lowest token ids win (``jax.lax.top_k``'s order). transformers and vLLM keep *all* tied
  tokens (``logits < kth_value`` is removed), so the sets differ only on exact ties at the boundary
  (possible with bfloat16 logits; irrelevant with float32 ones).
* With ``top_k == 0`` and ``top_p < 1`` one full sort of the values (no indices) is done; it yields
  the smallest surviving logit, and every token with a logit ``>=`` it survives. Tokens tied with that
  cut-off value are therefore all kept (transformers keeps or drops each according to its position in
  ``torch.sort``).
* Random draws use one key per row (a single key is split into ``B``; a batch of ``B`` keys is used as
  is, e.g. one seed per request), so rows are independent.
* ``temperature == 0`` is greedy: the argmax of the penalised logits; no key is needed and nothing
  random happens (top-k/top-p/min-p never remove the argmax, so they are skipped).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any

import jax
import jax.numpy as jnp

__all__ = [
    "SamplingParams",
    "PRESETS",
    "get_preset",
    "apply_penalties",
    "filtered_logits",
    "sample",
    "update_counts",
    "token_counts",
]

Array = jax.Array
_NEG_INF = -jnp.inf


# --------------------------------------------------------------------------------------------------
# Static configuration
# --------------------------------------------------------------------------------------------------


def _real(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a real number, got {value!r}")
    out = float(value)
    if not math.isfinite(out):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return out


@dataclasses.dataclass(frozen=True, kw_only=True)
class SamplingParams:
    """Static sampling settings (hashable: pass as a static argument to ``jax.jit``).

    Attributes:
        temperature: logits are divided by it; ``0`` means greedy (argmax). ``>= 0``.
        top_k: keep the ``k`` most likely tokens; ``0`` turns it off. ``int >= 0``.
        top_p: nucleus sampling mass in ``(0, 1]``; ``1`` turns it off.
        min_p: drop tokens whose probability is below ``min_p * p_max``; in ``[0, 1)``, ``0`` is off.
        presence_penalty: subtracted from the logits of already *generated* tokens (OpenAI/vLLM);
            in ``[-2, 2]``, ``0`` is off.
        repetition_penalty: CTRL/transformers penalty on prompt *and* generated tokens; ``> 0``,
            ``1`` is off.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0

    def __post_init__(self) -> None:
        t = _real("temperature", self.temperature)
        if not t >= 0.0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, numbers.Integral) or self.top_k < 0:
            raise ValueError(f"top_k must be an int >= 0 (0 = off), got {self.top_k!r}")
        top_p = _real("top_p", self.top_p)
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        min_p = _real("min_p", self.min_p)
        if not 0.0 <= min_p < 1.0:
            raise ValueError(f"min_p must be in [0, 1), got {self.min_p!r}")
        pres = _real("presence_penalty", self.presence_penalty)
        if not -2.0 <= pres <= 2.0:
            raise ValueError(f"presence_penalty must be in [-2, 2], got {self.presence_penalty!r}")
        rep = _real("repetition_penalty", self.repetition_penalty)
        if not rep > 0.0:
            raise ValueError(f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty!r}")
        # Normalise to plain Python scalars so equal settings hash equally (one jit cache entry).
        for name, value in (("temperature", t), ("top_k", int(self.top_k)), ("top_p", top_p), ("min_p", min_p),
                            ("presence_penalty", pres), ("repetition_penalty", rep)):
            object.__setattr__(self, name, value)

    @property
    def greedy(self) -> bool:
        """``temperature == 0``: argmax of the penalised logits, no randomness."""
        return self.temperature == 0.0

    @property
    def uses_counts(self) -> bool:
        """Whether a penalty is active, i.e. whether the decode loop must track token counts."""
        return self.presence_penalty != 0.0 or self.repetition_penalty != 1.0


# Qwen's recommended settings for Qwen3.5 / Qwen3.6 (model card, "Best Practices").
PRESETS: dict[str, SamplingParams] = {
    "thinking-general": SamplingParams(temperature=1.0, top_p=0.95, top_k=20, min_p=0.0,
                                       presence_penalty=1.5, repetition_penalty=1.0),
    "thinking-coding": SamplingParams(temperature=0.6, top_p=0.95, top_k=20, min_p=0.0,
                                      presence_penalty=0.0, repetition_penalty=1.0),
    "instruct-general": SamplingParams(temperature=0.7, top_p=0.8, top_k=20, min_p=0.0,
                                       presence_penalty=1.5, repetition_penalty=1.0),
    "instruct-reasoning": SamplingParams(temperature=1.0, top_p=1.0, top_k=40, min_p=0.0,
                                         presence_penalty=2.0, repetition_penalty=1.0),
    "greedy": SamplingParams(temperature=0.0),
}


def get_preset(name: str) -> SamplingParams:
    """One of :data:`PRESETS` by name; ``ValueError`` listing the valid names otherwise."""
    try:
        return PRESETS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown sampling preset {name!r}; valid names: {', '.join(sorted(PRESETS))}") from None


# --------------------------------------------------------------------------------------------------
# Penalties and token bookkeeping
# --------------------------------------------------------------------------------------------------


def apply_penalties(logits: Array, counts: Array | None, prompt_mask: Array | None,
                    params: SamplingParams) -> Array:
    """Repetition then presence penalty (vLLM's order); float32 ``[B, V]`` in and out.

    Args:
        logits: ``[B, V]`` float32.
        counts: ``[B, V]`` int32, how often each token was *generated* so far (``None``: none yet).
        prompt_mask: ``[B, V]`` bool, tokens present in the prompt (``None``: ignore the prompt).
        params: static settings; a neutral penalty is skipped at trace time.
    """
    logits = jnp.asarray(logits, jnp.float32)
    generated = None if counts is None else counts > 0
    if params.repetition_penalty != 1.0:
        seen = generated
        if prompt_mask is not None:
            pm = jnp.asarray(prompt_mask, bool)
            seen = pm if seen is None else seen | pm
        if seen is not None:
            p = params.repetition_penalty
            penalised = jnp.where(logits < 0, logits * p, logits / p)
            logits = jnp.where(seen, penalised, logits)
    if params.presence_penalty != 0.0 and generated is not None:
        logits = logits - params.presence_penalty * generated.astype(logits.dtype)
    return logits


def update_counts(counts: Array, tokens: Array, active: Array | None = None) -> Array:
    """``counts[b, tokens[b]] += 1`` for every row (only where ``active[b]``, if given)."""
    rows = jnp.arange(counts.shape[0])
    inc = jnp.ones((), counts.dtype) if active is None else jnp.asarray(active).astype(counts.dtype)
    return counts.at[rows, tokens].add(inc)


def token_counts(ids: Array, vocab_size: int, valid: Array | None = None) -> Array:
    """``[B, T]`` token ids -> ``[B, vocab_size]`` int32 occurrence counts.

    ``valid`` (``[B, T]`` bool) masks padding. Use ``token_counts(prompt, V, mask) > 0`` as the
    ``prompt_mask``. Without ``valid``, every id must be in ``[0, V)`` (a negative pad id would wrap).
    """
    ids = jnp.asarray(ids)
    rows = jnp.arange(ids.shape[0])[:, None]
    inc = jnp.ones(ids.shape, jnp.int32) if valid is None else jnp.asarray(valid).astype(jnp.int32)
    if valid is not None:
        ids = jnp.where(jnp.asarray(valid, bool), ids, 0)
    return jnp.zeros((ids.shape[0], vocab_size), jnp.int32).at[rows, ids].add(inc)


# --------------------------------------------------------------------------------------------------
# Filters (temperature, top-k, top-p, min-p)
# --------------------------------------------------------------------------------------------------


def _top_p_sorted_desc(x: Array, top_p: float) -> Array:
    """top-p on candidates already sorted in descending order (the output of ``lax.top_k``)."""
    asc = x[..., ::-1]
    cum = jnp.cumsum(jax.nn.softmax(asc, axis=-1), axis=-1)
    remove = cum <= (1.0 - top_p)
    remove = remove.at[..., -1].set(False)  # the top token always survives
    return jnp.where(remove[..., ::-1], _NEG_INF, x)


def _top_p_unsorted(x: Array, top_p: float) -> Array:
    """top-p on the whole vocabulary: one sort of the values gives the smallest surviving logit."""
    asc = jnp.sort(x, axis=-1)
    cum = jnp.cumsum(jax.nn.softmax(asc, axis=-1), axis=-1)
    n_removed = jnp.sum(cum <= (1.0 - top_p), axis=-1)
    n_removed = jnp.minimum(n_removed, x.shape[-1] - 1)  # the top token always survives
    cutoff = jnp.take_along_axis(asc, n_removed[:, None], axis=-1)
    return jnp.where(x < cutoff, _NEG_INF, x)


def _min_p(x: Array, min_p: float) -> Array:
    probs = jax.nn.softmax(x, axis=-1)
    top = jnp.max(probs, axis=-1, keepdims=True)
    return jnp.where(probs < min_p * top, _NEG_INF, x)


def _candidates(logits: Array, params: SamplingParams) -> tuple[Array, Array | None]:
    """Temperature, top-k, top-p and min-p on penalised logits.

    Returns ``(cand_logits, cand_ids)``: with top-k active, ``[B, k]`` tempered logits (``-inf`` where
    top-p/min-p removed them) and their int32 token ids; otherwise ``[B, V]`` logits and ``None``.
    """
    x = logits
    ids = None
    vocab = x.shape[-1]
    if 0 < params.top_k < vocab:
        x, ids = jax.lax.top_k(x, params.top_k)  # descending; ties -> lower token id first
        ids = ids.astype(jnp.int32)
    if params.temperature != 1.0:
        x = x / params.temperature
    if params.top_p < 1.0:
        x = _top_p_sorted_desc(x, params.top_p) if ids is not None else _top_p_unsorted(x, params.top_p)
    if params.min_p > 0.0:
        x = _min_p(x, params.min_p)
    return x, ids


def filtered_logits(logits: Array, params: SamplingParams, *, counts: Array | None = None,
                    prompt_mask: Array | None = None) -> Array:
    """The ``[B, V]`` float32 logits :func:`sample` draws from: penalised, tempered, with ``-inf`` on
    every token removed by top-k/top-p/min-p. ``softmax`` of it is the sampling distribution.

    For greedy params the penalised logits are returned unchanged (the choice is their argmax).
    Meant for tests and inspection; :func:`sample` never materialises the ``[B, V]`` scatter.
    """
    x = apply_penalties(logits, counts, prompt_mask, params)
    if params.greedy:
        return x
    cand, ids = _candidates(x, params)
    if ids is None:
        return cand
    rows = jnp.arange(x.shape[0])[:, None]
    return jnp.full_like(x, _NEG_INF).at[rows, ids].set(cand)


def _row_keys(key: Any, batch: int) -> Array:
    """A single PRNG key -> ``batch`` keys (split); a batch of ``batch`` keys is used as is."""
    key = jnp.asarray(key) if not isinstance(key, jax.Array) else key
    typed = jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
    single = key.ndim == (0 if typed else 1)
    if single:
        return jax.random.split(key, batch)
    if key.shape[0] != batch:
        raise ValueError(f"got {key.shape[0]} PRNG keys for a batch of {batch} rows; pass one key or one per row")
    return key


def sample(logits: Array, key: Any, params: SamplingParams, *, counts: Array | None = None,
           prompt_mask: Array | None = None) -> Array:
    """Draw one token per row. ``[B, V]`` float32 logits -> ``[B]`` int32 token ids.

    Args:
        logits: ``[B, V]`` next-token logits (cast to float32).
        key: a PRNG key (split into one per row) or ``B`` keys (one per row); ignored, and may be
            ``None``, when ``params.greedy``.
        params: static :class:`SamplingParams`.
        counts: ``[B, V]`` int32 counts of *generated* tokens (see :func:`update_counts`); ``None``
            means nothing generated yet.
        prompt_mask: ``[B, V]`` bool, the prompt's tokens (repetition penalty only).
    """
    if params.greedy:
        x = apply_penalties(logits, counts, prompt_mask, params)
        return jnp.argmax(x, axis=-1).astype(jnp.int32)
    if key is None:
        raise ValueError("sample() needs a PRNG key unless params.greedy (temperature == 0)")
    keys = _row_keys(key, logits.shape[0])
    x = apply_penalties(logits, counts, prompt_mask, params)
    cand, ids = _candidates(x, params)
    choice = jax.vmap(lambda k, row: jax.random.categorical(k, row))(keys, cand)
    if ids is None:
        return choice.astype(jnp.int32)
    return jnp.take_along_axis(ids, choice[:, None].astype(jnp.int32), axis=-1)[:, 0]
