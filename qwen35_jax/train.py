"""Train a small Qwen3.5-architecture model (both layer types, 3:1 pattern) with optax.

The point is a *trained* model on which quantization quality can be measured (random weights say
nothing about perplexity deltas). AdamW with linear warmup and cosine decay (Loshchilov & Hutter,
arXiv:1711.05101); fp32 master weights, optional bf16 compute; orbax checkpoints with resume;
deterministic for a seed (the batch of step ``s`` depends only on (seed, s), so a resumed run sees the
same data as an uninterrupted one). The result is saved in the Hugging Face layout (``config.json``,
``model.safetensors``, tokenizer files), which transformers loads.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from qwen35_jax import checkpoint, model as M
from qwen35_jax.config import ModelConfig, TextConfig, make_layer_types


def _text(vocab_size: int, **kw) -> TextConfig:
    layers = kw.pop("num_hidden_layers")
    return TextConfig(vocab_size=vocab_size, num_hidden_layers=layers, layer_types=make_layer_types(layers),
                      tie_word_embeddings=False, rope_theta=10_000_000.0, partial_rotary_factor=0.25, **kw)


# Model sizes. Both keep the 27B's structure: 3 DeltaNet : 1 gated attention, DeltaNet value heads =
# 2-3x key heads, GQA, partial RoPE, untied head.
MODEL_PRESETS: dict[str, Callable[[int], TextConfig]] = {
    # ~1.3M non-embedding parameters: trains on a 2-core CPU in a few minutes (the README default).
    # Every linear's input dim is a multiple of 128, so group-128 recipes apply to all of them.
    "cpu-small": lambda vocab: _text(
        vocab, hidden_size=128, intermediate_size=256, num_hidden_layers=8, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, linear_num_key_heads=2, linear_num_value_heads=4,
        linear_key_head_dim=32, linear_value_head_dim=32),
    # ~41M non-embedding parameters: minutes on one H100/H200
    "gpu-40m": lambda vocab: _text(
        vocab, hidden_size=512, intermediate_size=1536, num_hidden_layers=12, num_attention_heads=8,
        num_key_value_heads=2, head_dim=64, linear_num_key_heads=4, linear_num_value_heads=8,
        linear_key_head_dim=64, linear_value_head_dim=64),
}


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = 300
    batch_size: int = 8
    seq_len: int = 256
    learning_rate: float = 3e-3
    warmup_fraction: float = 0.05
    final_lr_fraction: float = 0.1
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    grad_clip: float = 1.0
    seed: int = 0
    compute_dtype: str = "float32"   # "bfloat16" on a GPU: bf16 matmuls, fp32 master weights
    checkpoint_every: int = 100
    log_every: int = 10

    def __post_init__(self):
        for name in ("steps", "batch_size", "seq_len", "checkpoint_every", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.compute_dtype not in ("float32", "bfloat16"):
            raise ValueError(f"compute_dtype must be 'float32' or 'bfloat16', got {self.compute_dtype!r}")


def optimizer(tc: TrainConfig) -> optax.GradientTransformation:
    warmup = max(1, int(tc.warmup_fraction * tc.steps))
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, tc.learning_rate, warmup, max(tc.steps, warmup + 1), tc.learning_rate * tc.final_lr_fraction)

    def decay_mask(params):  # no weight decay on norms, biases and the 1-D DeltaNet parameters
        return jax.tree.map(lambda p: p.ndim >= 2, params)

    return optax.chain(optax.clip_by_global_norm(tc.grad_clip),
                       optax.adamw(schedule, b1=tc.b1, b2=tc.b2, weight_decay=tc.weight_decay, mask=decay_mask))


def batch_for_step(tokens: np.ndarray, step: int, tc: TrainConfig) -> np.ndarray:
    """``[batch, seq_len + 1]`` random windows of the token stream; a function of (seed, step) only."""
    n = tokens.size - tc.seq_len - 1
    if n <= 0:
        raise ValueError(f"the training text has {tokens.size} tokens; seq_len {tc.seq_len} needs more than "
                         f"{tc.seq_len + 1}")
    rng = np.random.default_rng([tc.seed, step])
    starts = rng.integers(0, n + 1, size=tc.batch_size)
    return np.stack([tokens[s: s + tc.seq_len + 1] for s in starts]).astype(np.int32)


def loss_fn(params, cfg: ModelConfig, batch, compute_dtype):
    """Mean next-token cross-entropy (fp32 logits) over ``batch [B, T+1]``."""
    p = jax.tree.map(lambda x: x.astype(compute_dtype), params)
    logits = M.forward_impl(cfg, p, batch[:, :-1])
    logz = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, batch[:, 1:, None], axis=-1)[..., 0]
    return jnp.mean(logz - picked)


@partial(jax.jit, static_argnames=("cfg", "opt", "compute_dtype"), donate_argnums=(0, 1))
def train_step(params, opt_state, batch, *, cfg: ModelConfig, opt, compute_dtype):
    loss, grads = jax.value_and_grad(loss_fn)(params, cfg, batch, jnp.dtype(compute_dtype))
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss


class _Progress:
    """A one-line progress bar on stderr (no dependency): step, loss, tokens/s, ETA."""

    def __init__(self, total: int, enabled: bool = True):
        self.total, self.enabled, self.t0 = total, enabled, time.perf_counter()

    def update(self, step: int, loss: float, tokens_per_s: float) -> None:
        if not self.enabled:
            return
        done = step / self.total
        bar = "#" * int(30 * done) + "-" * (30 - int(30 * done))
        eta = (time.perf_counter() - self.t0) / max(done, 1e-9) * (1 - done)
        sys.stderr.write(f"\r[{bar}] {step}/{self.total} loss {loss:.4f} {tokens_per_s:,.0f} tok/s eta {eta:.0f}s ")
        sys.stderr.flush()

    def close(self):
        if self.enabled:
            sys.stderr.write("\n")


def _checkpointer(directory: Path):
    import orbax.checkpoint as ocp

    # Synchronous saves: the next train step donates the parameter buffers, so a background writer
    # must never still be reading them.
    return ocp.CheckpointManager(directory.absolute(), options=ocp.CheckpointManagerOptions(
        max_to_keep=2, enable_async_checkpointing=False))


def _save_state(manager, step: int, params, opt_state) -> None:
    import orbax.checkpoint as ocp

    manager.save(step, args=ocp.args.StandardSave({"params": params, "opt_state": opt_state}))
    manager.wait_until_finished()


def _restore_state(manager, step: int, params, opt_state):
    import orbax.checkpoint as ocp

    target = {"params": params, "opt_state": opt_state}
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), target)
    restored = manager.restore(step, args=ocp.args.StandardRestore(abstract))
    return restored["params"], restored["opt_state"]


def train(cfg: ModelConfig, tokens: Sequence[int] | np.ndarray, out_dir: str | Path, tc: TrainConfig = TrainConfig(),
          *, resume: bool = True, progress: bool = True, tokenizer_dir: str | Path | None = None,
          max_seconds: float | None = None) -> dict[str, Any]:
    """Train ``cfg`` on a token stream; save the HF-layout model into ``out_dir``; returns the log.

    Checkpoints go to ``out_dir/checkpoints`` every ``tc.checkpoint_every`` steps; with ``resume`` a
    later call continues from the newest one (same data order, so the result equals an uninterrupted
    run up to floating-point reassociation). ``max_seconds`` stops early (the log records the step)
    and saves the model as it is then: for runs on a time-limited machine."""
    out_dir = Path(out_dir)
    if (out_dir / "config.json").exists():
        raise FileExistsError(f"{out_dir} already holds a finished model (config.json); refusing to overwrite it")
    out_dir.mkdir(parents=True, exist_ok=True)
    tokens = np.asarray(tokens, dtype=np.int32).reshape(-1)
    if tokens.size and tokens.max() >= cfg.text.vocab_size:
        raise ValueError(f"token id {tokens.max()} >= vocab_size {cfg.text.vocab_size}")
    params = M.random_params(cfg, seed=tc.seed, dtype=jnp.float32)
    opt = optimizer(tc)
    opt_state = opt.init(params)
    manager = _checkpointer(out_dir / "checkpoints")
    start = 0
    if resume and manager.latest_step() is not None:
        start = int(manager.latest_step())
        params, opt_state = _restore_state(manager, start, params, opt_state)
    losses: list[tuple[int, float]] = []
    bar = _Progress(tc.steps, progress)
    tokens_per_step = tc.batch_size * tc.seq_len
    t_last, step_last = time.perf_counter(), start
    loss = None
    stopped_at = None
    t_start = time.perf_counter()
    for step in range(start, tc.steps):
        batch = jnp.asarray(batch_for_step(tokens, step, tc))
        params, opt_state, loss = train_step(params, opt_state, batch, cfg=cfg, opt=opt, compute_dtype=tc.compute_dtype)
        if (step + 1) % tc.log_every == 0 or step + 1 == tc.steps:
            value = float(loss)
            if not math.isfinite(value):
                raise FloatingPointError(f"loss became {value} at step {step + 1}; lower the learning rate")
            now = time.perf_counter()
            losses.append((step + 1, value))
            bar.update(step + 1, value, (step + 1 - step_last) * tokens_per_step / (now - t_last))
            t_last, step_last = now, step + 1
        if (step + 1) % tc.checkpoint_every == 0 and step + 1 < tc.steps:
            _save_state(manager, step + 1, params, opt_state)
        if max_seconds is not None and step + 1 < tc.steps and time.perf_counter() - t_start > max_seconds:
            stopped_at = step + 1
            break
    bar.close()
    manager.close()
    checkpoint.save_params(out_dir, cfg, params)
    if tokenizer_dir is not None:
        for name in ("tokenizer.json", "tokenizer_config.json"):
            src = Path(tokenizer_dir) / name
            if src.exists():
                (out_dir / name).write_bytes(src.read_bytes())
    log = {"train_config": dataclasses.asdict(tc), "losses": losses, "resumed_from": start, "stopped_at": stopped_at,
           "train_seconds": time.perf_counter() - t_start,
           "non_embedding_params": M.count_params(params) - 2 * cfg.text.vocab_size * cfg.text.hidden_size}
    (out_dir / "train_log.json").write_text(json.dumps(log, indent=1))
    return log
