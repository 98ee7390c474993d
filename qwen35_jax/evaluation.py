"""Perplexity with a sliding window, jitted and batched (float or quantized parameter trees).

The window rule is the one of the transformers perplexity guide ("Perplexity of fixed-length
models"): windows of ``seq_len`` tokens start every ``stride`` tokens; each window scores only the
tokens not scored by an earlier window, so every token after the first is scored exactly once and
(after the first window) with at least ``seq_len - stride`` tokens of context. The last window is
padded on the right to ``seq_len``; the model is causal, so padding never changes a scored position.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from qwen35_jax import model as M
from qwen35_jax.config import ModelConfig


class EvalError(ValueError):
    """Input that cannot be evaluated (empty text, text shorter than a window, bad window settings)."""


@dataclasses.dataclass(frozen=True)
class PerplexityResult:
    ppl: float
    nll: float          # mean negative log-likelihood per scored token (nats)
    num_tokens: int     # tokens scored
    num_windows: int

    def __str__(self) -> str:
        return f"ppl {self.ppl:.4f} (nll {self.nll:.4f} nats/token over {self.num_tokens:,} tokens, {self.num_windows} windows)"


def windows(num_tokens: int, seq_len: int, stride: int) -> list[tuple[int, int, int]]:
    """``[(begin, end, first_scored)]``: window ``[begin, end)`` scores targets at ``[first_scored, end)``
    (a target at position t is predicted from positions < t)."""
    if seq_len < 2:
        raise EvalError(f"seq_len must be >= 2, got {seq_len}")
    if not 1 <= stride <= seq_len:
        raise EvalError(f"stride must be in [1, seq_len={seq_len}], got {stride}")
    if num_tokens == 0:
        raise EvalError("the text is empty: no tokens to evaluate")
    if num_tokens < seq_len:
        raise EvalError(f"the text has {num_tokens} tokens, shorter than one window (seq_len={seq_len}); "
                        f"use a smaller seq_len or more text")
    out, prev_end, begin = [], 1, 0  # the first token is never a target
    while True:
        end = min(begin + seq_len, num_tokens)
        out.append((begin, end, prev_end))
        prev_end = end
        if end == num_tokens:
            return out
        # At least one token of overlap: a window's first token has no prediction inside the window.
        begin = min(begin + stride, end - 1)


@partial(jax.jit, static_argnames=("cfg", "options"))
def _window_nll(cfg: ModelConfig, options: M.RuntimeOptions, params, ids, target_mask):
    """Sum of the NLL of the masked targets and their count, for a batch of windows ``ids [B, T]``."""
    logits = M.forward_impl(cfg, params, ids, None, None, options)[:, :-1]
    targets = ids[:, 1:]
    logz = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    mask = target_mask[:, 1:]
    return jnp.sum(jnp.where(mask, logz - picked, 0.0)), jnp.sum(mask)


def perplexity(cfg: ModelConfig, params: Mapping, token_ids: Sequence[int] | np.ndarray, *, seq_len: int = 2048,
               stride: int = 512, batch_size: int = 8, options: M.RuntimeOptions = M.RuntimeOptions(),
               progress: Callable[[int, int], None] | None = None) -> PerplexityResult:
    """Sliding-window perplexity of ``token_ids`` (one long sequence). ``progress(done, total)`` is
    called after every batch of windows."""
    ids = np.asarray(token_ids, dtype=np.int64).reshape(-1)
    if ids.size and (ids.min() < 0 or ids.max() >= cfg.text.vocab_size):
        raise EvalError(f"token ids must be in [0, {cfg.text.vocab_size}); got range [{ids.min()}, {ids.max()}]")
    spans = windows(ids.size, seq_len, stride)
    total_nll, total_count = 0.0, 0
    for start in range(0, len(spans), batch_size):
        chunk = spans[start:start + batch_size]
        # Fixed batch shape (pad with empty windows) so the whole evaluation compiles once.
        batch = np.zeros((batch_size, seq_len), np.int32)
        mask = np.zeros((batch_size, seq_len), bool)
        for i, (b, e, first) in enumerate(chunk):
            batch[i, : e - b] = ids[b:e]
            mask[i, first - b: e - b] = True
        nll, count = _window_nll(cfg, options, params, jnp.asarray(batch), jnp.asarray(mask))
        total_nll += float(nll)
        total_count += int(count)
        if progress is not None:
            progress(min(start + batch_size, len(spans)), len(spans))
    assert total_count == ids.size - 1, (total_count, ids.size)  # every target scored exactly once
    nll = total_nll / total_count
    return PerplexityResult(ppl=math.exp(nll), nll=nll, num_tokens=total_count, num_windows=len(spans))
