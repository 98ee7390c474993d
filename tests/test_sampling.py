"""Token sampling: parity of every filter with transformers' logits warpers, penalty semantics (vLLM /
OpenAI presence, CTRL repetition), statistics of the draws, seeds, jit and validation."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from qwen35_jax import sampling as S
from qwen35_jax.sampling import SamplingParams

V = 1000

# jitted once per (params, shape): much faster on CPU than op-by-op dispatch; eager is checked in test_jit_matches_eager
_filtered = jax.jit(S.filtered_logits, static_argnames="params")
_sample = jax.jit(S.sample, static_argnames="params")


def _logits(seed: int, b: int = 4, v: int = V, scale: float = 3.0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal((b, v)) * scale).astype(np.float32)


def _hf_filtered(logits: np.ndarray, p: SamplingParams, input_ids: np.ndarray | None = None) -> np.ndarray:
    """transformers' chain, in generate()'s order: repetition penalty, temperature, top-k, top-p, min-p."""
    procs = LogitsProcessorList()
    if p.repetition_penalty != 1.0:
        procs.append(RepetitionPenaltyLogitsProcessor(penalty=p.repetition_penalty))
    if p.temperature != 1.0:
        procs.append(TemperatureLogitsWarper(p.temperature))
    if p.top_k > 0:
        procs.append(TopKLogitsWarper(top_k=p.top_k))
    if p.top_p < 1.0:
        procs.append(TopPLogitsWarper(top_p=p.top_p))
    if p.min_p > 0.0:
        procs.append(MinPLogitsWarper(min_p=p.min_p))
    ids = torch.zeros((logits.shape[0], 0), dtype=torch.long) if input_ids is None else torch.from_numpy(input_ids)
    return procs(ids, torch.from_numpy(logits.copy())).numpy()


def _softmax64(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _assert_same_distribution(ours: np.ndarray, ref: np.ndarray) -> None:
    np.testing.assert_array_equal(np.isfinite(ours), np.isfinite(ref), err_msg="surviving token sets differ")
    assert not np.isnan(ours).any()
    np.testing.assert_allclose(_softmax64(ours), _softmax64(ref), rtol=1e-5, atol=1e-12)


FILTER_CASES = [
    dict(temperature=0.5),
    dict(top_k=1),
    dict(top_k=5),
    dict(top_k=V + 10),  # larger than the vocabulary: no-op, as transformers' clamp
    dict(top_p=0.1),
    dict(top_p=0.5, temperature=0.7),
    dict(top_p=0.999),
    dict(top_k=20, top_p=0.5),
    dict(top_k=200, top_p=0.9, temperature=1.3),
    dict(min_p=0.05),
    dict(min_p=0.3, temperature=2.0),
    dict(top_k=50, min_p=0.1),
    dict(top_p=0.9, min_p=0.05),
    dict(top_k=40, top_p=0.8, min_p=0.02, temperature=0.6),
] + [dataclasses.asdict(dataclasses.replace(p, presence_penalty=0.0))
     for name, p in S.PRESETS.items() if name != "greedy"]


@pytest.mark.parametrize("kw", FILTER_CASES, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
def test_filters_match_transformers(kw):
    p = SamplingParams(**kw)
    for seed in range(3):
        logits = _logits(seed, scale=[1.0, 3.0, 6.0][seed])
        ours = np.asarray(_filtered(jnp.asarray(logits), p))
        _assert_same_distribution(ours, _hf_filtered(logits, p))


def _prompt_and_generated(seed: int, b: int = 4, v: int = V):
    rng = np.random.default_rng(100 + seed)
    prompt = rng.integers(0, v, size=(b, 30))
    generated = rng.integers(0, v, size=(b, 12))
    prompt_mask = np.zeros((b, v), bool)
    np.put_along_axis(prompt_mask, prompt, True, axis=1)
    counts = np.zeros((b, v), np.int32)
    np.add.at(counts, (np.arange(b)[:, None], generated), 1)
    return prompt, generated, jnp.asarray(prompt_mask), jnp.asarray(counts)


@pytest.mark.parametrize("penalty", [1.3, 0.7])
@pytest.mark.parametrize("extra", [dict(), dict(top_k=20, top_p=0.9, temperature=0.7)])
def test_repetition_penalty_matches_transformers(penalty, extra):
    p = SamplingParams(repetition_penalty=penalty, **extra)
    logits = _logits(7)
    prompt, generated, prompt_mask, counts = _prompt_and_generated(0)
    ours = np.asarray(_filtered(jnp.asarray(logits), p, counts=counts, prompt_mask=prompt_mask))
    ref = _hf_filtered(logits, p, input_ids=np.concatenate([prompt, generated], axis=1))
    _assert_same_distribution(ours, ref)
    if not extra:  # no filter: the penalised logits themselves
        np.testing.assert_allclose(ours, ref, rtol=1e-6)


def test_presence_penalty_only_generated_tokens_repetition_also_prompt():
    logits = _logits(11)
    _, generated, prompt_mask, counts = _prompt_and_generated(1)
    pm, gen = np.asarray(prompt_mask), np.asarray(counts) > 0
    assert (pm & ~gen).any() and (gen & ~pm).any()

    pres = SamplingParams(presence_penalty=1.5)
    out = np.asarray(S.apply_penalties(jnp.asarray(logits), counts, prompt_mask, pres))
    np.testing.assert_allclose(out, logits - 1.5 * gen, rtol=1e-6)  # vLLM / OpenAI: once per token, generated only
    np.testing.assert_array_equal(out[pm & ~gen], logits[pm & ~gen])

    # counts > 1 subtract once (presence, not frequency)
    twice = S.update_counts(counts, jnp.asarray(generated[:, 0]))
    np.testing.assert_array_equal(np.asarray(S.apply_penalties(jnp.asarray(logits), twice, prompt_mask, pres)), out)

    rep = SamplingParams(repetition_penalty=2.0)
    out = np.asarray(S.apply_penalties(jnp.asarray(logits), counts, prompt_mask, rep))
    seen = pm | gen
    expect = np.where(seen, np.where(logits < 0, logits * 2.0, logits / 2.0), logits)
    np.testing.assert_allclose(out, expect, rtol=1e-6)
    assert (out[pm & ~gen] != logits[pm & ~gen]).all()

    both = SamplingParams(repetition_penalty=2.0, presence_penalty=-0.5)
    out = np.asarray(S.apply_penalties(jnp.asarray(logits), counts, prompt_mask, both))
    np.testing.assert_allclose(out, expect + 0.5 * gen, rtol=1e-6)  # repetition first, then presence

    # neutral penalties are skipped; missing counts/prompt mean "nothing seen"
    np.testing.assert_array_equal(np.asarray(S.apply_penalties(jnp.asarray(logits), counts, prompt_mask,
                                                               SamplingParams())), logits)
    np.testing.assert_array_equal(np.asarray(S.apply_penalties(jnp.asarray(logits), None, None, both)), logits)


def test_greedy_is_argmax_and_needs_no_key():
    logits = _logits(3, b=8)
    g = S.get_preset("greedy")
    assert g.greedy and not SamplingParams().greedy
    out = _sample(jnp.asarray(logits), None, g)
    assert out.dtype == jnp.int32 and out.shape == (8,)
    np.testing.assert_array_equal(np.asarray(out), logits.argmax(-1))
    np.testing.assert_array_equal(np.asarray(_sample(jnp.asarray(logits), None, g)), np.asarray(out))
    np.testing.assert_array_equal(np.asarray(_sample(jnp.asarray(logits), jax.random.key(5), g)), np.asarray(out))
    # greedy applies penalties first: punish each row's argmax so the runner-up wins
    top = logits.argmax(-1)
    counts = S.update_counts(jnp.zeros(logits.shape, jnp.int32), jnp.asarray(top))
    gp = SamplingParams(temperature=0.0, presence_penalty=2.0)
    expect = (logits - 2.0 * np.asarray(counts > 0)).argmax(-1)
    np.testing.assert_array_equal(np.asarray(_sample(jnp.asarray(logits), None, gp, counts=counts)), expect)
    with pytest.raises(ValueError, match="key"):
        S.sample(jnp.asarray(logits), None, SamplingParams())


def _ref_probs(logits: np.ndarray, *, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0) -> np.ndarray:
    """Independent numpy reference (float64) of the renormalised sampling distribution, one row."""
    x = logits.astype(np.float64) / temperature
    order = np.argsort(-x, kind="stable")
    keep = np.ones_like(x, dtype=bool)
    if top_k:
        keep[order[top_k:]] = False
    if top_p < 1.0:
        p = _softmax64(np.where(keep, x, -np.inf))
        cum = np.cumsum(p[order])
        n = int(np.searchsorted(cum, top_p) + 1)  # smallest prefix with mass >= top_p
        keep[order[n:]] = False
    if min_p > 0.0:
        p = _softmax64(np.where(keep, x, -np.inf))
        keep &= p >= min_p * p.max()
    return _softmax64(np.where(keep, x, -np.inf))


@pytest.mark.parametrize("kw", [dict(top_k=3), dict(top_p=0.6, temperature=0.8), dict(min_p=0.2)],
                         ids=["top_k", "top_p", "min_p"])
def test_draw_frequencies(kw):
    n = 20000
    base = np.array([3.0, 2.6, 2.2, 1.9, 1.0, 0.5, 0.0, -1.0, -2.0, -3.0] + [-4.0] * 22, np.float32)
    base = base[np.random.default_rng(0).permutation(base.size)]  # the top tokens are not the first ids
    expect = _ref_probs(base, **kw)
    allowed = expect > 0
    assert 2 <= allowed.sum() <= 6  # a real filter, not a trivial one

    toks = np.asarray(_sample(jnp.broadcast_to(jnp.asarray(base), (n, base.size)), jax.random.key(42),
                               SamplingParams(**kw)))
    assert allowed[toks].all(), f"drew a filtered token: {np.unique(toks[~allowed[toks]])}"
    freq = np.bincount(toks, minlength=base.size) / n
    sigma = np.sqrt(expect * (1 - expect) / n)
    assert (np.abs(freq - expect) <= 4 * sigma + 1e-12).all(), (freq[allowed], expect[allowed])


def test_seeds_and_row_independence():
    logits = jnp.asarray(_logits(5, b=64, scale=0.5))  # flat-ish: many plausible tokens per row
    p = SamplingParams(temperature=1.0, top_k=200, top_p=0.95)
    a = np.asarray(_sample(logits, jax.random.key(0), p))
    np.testing.assert_array_equal(a, np.asarray(_sample(logits, jax.random.key(0), p)))
    b = np.asarray(_sample(logits, jax.random.key(1), p))
    assert (a != b).mean() > 0.5
    # identical rows with one key still get independent draws
    same = jnp.broadcast_to(logits[0], logits.shape)
    assert len(np.unique(np.asarray(_sample(same, jax.random.key(0), p)))) > 10
    # one key per row (typed or raw): a row's draw depends only on its own key and logits
    perm = np.random.default_rng(0).permutation(64)
    keys = jax.random.split(jax.random.key(3), 64)
    full = np.asarray(_sample(logits, keys, p))
    np.testing.assert_array_equal(np.asarray(_sample(logits[perm], keys[perm], p)), full[perm])
    # legacy raw uint32 keys are accepted too (one, or one per row)
    assert S._row_keys(jax.random.PRNGKey(0), 5).shape == (5, 2)
    raw = jax.random.split(jax.random.PRNGKey(0), 5)
    assert S._row_keys(raw, 5) is raw and S._row_keys(keys[:5], 5) is not None
    with pytest.raises(ValueError, match="PRNG keys"):
        S.sample(logits, jax.random.split(jax.random.key(0), 3), p)


@pytest.mark.parametrize("name", ["thinking-general", "greedy"])
def test_jit_matches_eager(name):
    p = S.get_preset(name)
    logits = jnp.asarray(_logits(9, b=6))
    _, _, prompt_mask, counts = _prompt_and_generated(2, b=6)
    key = None if p.greedy else jax.random.key(7)
    jitted = jax.jit(S.sample, static_argnames="params")
    eager = S.sample(logits, key, p, counts=counts, prompt_mask=prompt_mask)
    np.testing.assert_array_equal(np.asarray(jitted(logits, key, p, counts=counts, prompt_mask=prompt_mask)),
                                  np.asarray(eager))
    # an equal but distinct params object reuses the compiled function (hashable, normalised)
    same = SamplingParams(**{k: (int(v) if isinstance(v, float) and v.is_integer() and k != "top_k" else v)
                             for k, v in dataclasses.asdict(p).items()})
    assert same == p and hash(same) == hash(p)


def test_no_full_sort_when_top_k_is_set():
    logits = jnp.zeros((2, 4096), jnp.float32)
    key = jax.random.key(0)

    def primitives(p):
        found = set()

        def walk(jaxpr):
            for eqn in jaxpr.eqns:
                found.add(eqn.primitive.name)
                for sub in jax.core.subjaxprs(eqn) if hasattr(jax.core, "subjaxprs") else ():
                    walk(sub)
                for v in eqn.params.values():
                    for j in (v if isinstance(v, (list, tuple)) else [v]):
                        inner = getattr(j, "jaxpr", None)
                        if inner is not None:
                            walk(getattr(inner, "jaxpr", inner))

        walk(jax.make_jaxpr(lambda l, k: S.sample(l, k, p))(logits, key).jaxpr)
        return found

    prims = primitives(S.get_preset("thinking-general"))
    assert "top_k" in prims and "sort" not in prims
    assert "sort" in primitives(SamplingParams(top_p=0.9))
    plain = primitives(SamplingParams(temperature=0.7))
    assert "sort" not in plain and "top_k" not in plain


def test_update_counts_and_token_counts():
    counts = jnp.zeros((3, 10), jnp.int32)
    counts = S.update_counts(counts, jnp.array([1, 2, 3]))
    counts = S.update_counts(counts, jnp.array([1, 5, 3]), active=jnp.array([True, False, True]))
    expect = np.zeros((3, 10), np.int32)
    expect[0, 1] = 2
    expect[1, 2] = 1
    expect[2, 3] = 2
    np.testing.assert_array_equal(np.asarray(counts), expect)
    ids = jnp.array([[1, 1, 4, -1], [0, 9, 9, 9]])
    valid = jnp.array([[True, True, True, False], [True, True, True, True]])
    tc = np.asarray(S.token_counts(ids, 10, valid))
    _, generated, _, counts = _prompt_and_generated(0)
    np.testing.assert_array_equal(np.asarray(S.token_counts(jnp.asarray(generated), V)), np.asarray(counts))
    assert tc[0, 1] == 2 and tc[0, 4] == 1 and tc[0].sum() == 3 and tc[1, 9] == 3 and tc[1, 0] == 1


def test_presets():
    assert set(S.PRESETS) == {"thinking-general", "thinking-coding", "instruct-general", "instruct-reasoning", "greedy"}
    tg = S.get_preset("thinking-general")
    assert (tg.temperature, tg.top_p, tg.top_k, tg.min_p, tg.presence_penalty, tg.repetition_penalty) == \
        (1.0, 0.95, 20, 0.0, 1.5, 1.0)
    ir = S.get_preset("instruct-reasoning")
    assert (ir.temperature, ir.top_p, ir.top_k, ir.presence_penalty) == (1.0, 1.0, 40, 2.0)
    assert S.get_preset("thinking-coding").temperature == 0.6 and S.get_preset("instruct-general").top_p == 0.8
    assert S.get_preset("thinking-general").uses_counts and not S.get_preset("thinking-coding").uses_counts
    with pytest.raises(ValueError, match="thinking-general") as e:
        S.get_preset("creative")
    assert "creative" in str(e.value) and "greedy" in str(e.value)


@pytest.mark.parametrize("kw,field", [
    (dict(top_p=0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_p=float("nan")), "top_p"),
    (dict(temperature=-1), "temperature"),
    (dict(temperature=float("inf")), "temperature"),
    (dict(top_k=-1), "top_k"),
    (dict(top_k=2.5), "top_k"),
    (dict(top_k=True), "top_k"),
    (dict(min_p=1.0), "min_p"),
    (dict(min_p=-0.1), "min_p"),
    (dict(repetition_penalty=0), "repetition_penalty"),
    (dict(presence_penalty=2.5), "presence_penalty"),
    (dict(presence_penalty="1"), "presence_penalty"),
])
def test_validation(kw, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kw)


def test_validation_message_and_accepted_edges():
    with pytest.raises(ValueError, match=r"^top_p must be in \(0, 1\], got 0$"):
        SamplingParams(top_p=0)
    SamplingParams(temperature=0, top_k=0, top_p=1, min_p=0, presence_penalty=-2, repetition_penalty=0.5)
    SamplingParams(top_k=np.int64(5), top_p=np.float32(0.5), presence_penalty=2)
    assert isinstance(SamplingParams(top_k=np.int64(5)).top_k, int)
