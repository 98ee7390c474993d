"""Train a small byte-level BPE tokenizer (Hugging Face ``tokenizers``) for the small models.

The real Qwen vocabulary (248k) would be most of a 20M-parameter model, so the small models use their
own 8k-32k BPE trained on the train split. Same pre-tokenization family as Qwen (byte-level, GPT-2-style
regex), Qwen's special tokens (``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>``) so the chat template
and stop tokens work unchanged. Saved as ``tokenizer.json`` + ``tokenizer_config.json``: both our
``Tokenizer.from_checkpoint`` and transformers' ``AutoTokenizer`` load it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END)


def train_bpe(texts: Iterable[str], vocab_size: int = 8192, *, min_frequency: int = 2):
    """A ``tokenizers.Tokenizer`` trained on ``texts`` (deterministic for the same input)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if not 256 + len(SPECIAL_TOKENS) < vocab_size <= 1 << 20:
        raise ValueError(f"vocab_size {vocab_size} must be in ({256 + len(SPECIAL_TOKENS)}, 2**20]")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    texts = list(texts)
    if not any(t.strip() for t in texts):
        raise ValueError("cannot train a tokenizer on empty text")
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def save_tokenizer(tok, out_dir: str | Path) -> Path:
    """Write ``tokenizer.json`` and a ``tokenizer_config.json`` naming the special tokens."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": IM_END, "pad_token": ENDOFTEXT, "bos_token": None, "unk_token": None,
        "model_max_length": 1 << 20, "clean_up_tokenization_spaces": False,
        "added_tokens_decoder": {str(tok.token_to_id(t)): {"content": t, "special": True, "lstrip": False,
                                 "rstrip": False, "normalized": False, "single_word": False} for t in SPECIAL_TOKENS},
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return out_dir / "tokenizer.json"
