"""Build a small trained Qwen3.5-architecture model end to end: corpus -> BPE tokenizer -> training.

``build_small_model`` is what ``scripts/train.py`` runs; ``default_model`` is the model that
``qwen35-jax ablate`` uses when no ``--model`` is given: the ``cpu-small`` preset trained on the
built-in corpus sample, cached on first use under ``$XDG_CACHE_HOME/qwen35_jax`` (no download).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np

from qwen35_jax import bpe, corpus
from qwen35_jax.config import CAUSAL_LM, ModelConfig
from qwen35_jax.train import MODEL_PRESETS, TrainConfig, train

DEFAULT_MODEL_VERSION = "cpu-small-v2"  # bump when the recipe of the default model changes


def encode_documents(tokenizer, documents) -> np.ndarray:
    """One token stream: every document followed by ``<|endoftext|>`` (special strings in the text are
    plain text, never control tokens)."""
    eot = tokenizer.token_to_id(bpe.ENDOFTEXT)
    out: list[int] = []
    for doc in documents:
        out.extend(tokenizer.encode(doc, allow_special=False))
        out.append(eot)
    return np.asarray(out, dtype=np.int32)


def matching_tokenizer(model_dir, vocab_size: int):
    """The tokenizer of ``model_dir``, refusing one whose ids do not fit the model's vocabulary (e.g.
    the packaged Qwen vocabulary that ``Tokenizer.from_checkpoint`` falls back to when a small model's
    directory has no ``tokenizer.json``)."""
    from qwen35_jax.tokenizer import Tokenizer, TokenizerError

    tok = Tokenizer.from_checkpoint(model_dir)
    if tok.vocab_size > vocab_size:
        raise TokenizerError(
            f"{model_dir}: no tokenizer matching the model: the one found ({tok.source}) has "
            f"{tok.vocab_size:,} tokens but the model's vocabulary is {vocab_size:,} (is tokenizer.json missing?)")
    return tok


def build_small_model(out_dir: str | Path, *, corpus_dir: str | Path | None = None, preset: str = "cpu-small",
                      vocab_size: int = 8192, tc: TrainConfig = TrainConfig(), progress: bool = True,
                      max_seconds: float | None = None) -> dict:
    """Train a tokenizer on the train split of ``corpus_dir`` (default: the built-in sample), then the
    model; write both into ``out_dir`` (HF layout). Returns the training log."""
    from qwen35_jax.tokenizer import Tokenizer

    if preset not in MODEL_PRESETS:
        raise ValueError(f"unknown model preset {preset!r}; choose one of {sorted(MODEL_PRESETS)}")
    out_dir = Path(out_dir)
    source = Path(corpus_dir) if corpus_dir is not None else corpus.sample_dir()
    tok_dir = out_dir / "tokenizer"
    if not (tok_dir / "tokenizer.json").exists():
        bpe.save_tokenizer(bpe.train_bpe(corpus.read_split(source, "train"), vocab_size), tok_dir)
    tokenizer = Tokenizer.from_checkpoint(tok_dir)
    tokens = encode_documents(tokenizer, corpus.read_split(source, "train"))
    # Round the embedding rows up to a multiple of 64 (tensor-core friendly); the extra rows are never
    # produced by the tokenizer.
    vocab = -(-tokenizer.vocab_size // 64) * 64
    cfg = ModelConfig(text=MODEL_PRESETS[preset](vocab), vision=None, architecture=CAUSAL_LM)
    log = train(cfg, tokens, out_dir, tc, progress=progress, tokenizer_dir=tok_dir, max_seconds=max_seconds)
    log.update(corpus=str(source), preset=preset, train_tokens=int(tokens.size))
    return log


def default_model(progress: bool = True) -> Path:
    """The default ablation model, trained on first use (a few minutes on 2 CPU cores) and cached."""
    target = corpus.cache_dir() / DEFAULT_MODEL_VERSION
    if (target / "config.json").exists() and (target / "tokenizer.json").exists():
        return target
    work = target.with_name(target.name + ".partial")  # resumable: train() restarts from its checkpoints
    print(f"training the default model ({DEFAULT_MODEL_VERSION}) into {target} (first use only)")
    build_small_model(work, progress=progress)
    shutil.rmtree(work / "checkpoints", ignore_errors=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(work, target)
    return target
