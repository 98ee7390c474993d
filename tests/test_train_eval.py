"""Corpus splits, the small BPE tokenizer, training (determinism, resume, HF layout) and perplexity."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qwen35_jax import bpe, checkpoint, corpus, evaluation, train as TR
from qwen35_jax import model as M
from qwen35_jax.config import CAUSAL_LM, ModelConfig
from qwen35_jax.small_model import encode_documents
from qwen35_jax.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("bpe")
    bpe.save_tokenizer(bpe.train_bpe(corpus.read_split(corpus.sample_dir(), "train"), 2048), path)
    return path


def small_cfg(vocab=2048):
    return ModelConfig(text=TR.MODEL_PRESETS["cpu-small"](vocab), vision=None, architecture=CAUSAL_LM)


TINY_TC = TR.TrainConfig(steps=6, batch_size=2, seq_len=32, checkpoint_every=3, log_every=1)


def test_corpus_splits_are_deterministic_by_file(tmp_path):
    splits = corpus.split_documents(corpus.sample_dir())
    assert [len(splits[s]) for s in corpus.SPLITS] == [40, 3, 3]
    assert splits == corpus.split_documents(corpus.sample_dir())
    all_files = sum(splits.values(), [])
    assert len(set(all_files)) == len(all_files) == 46  # no document in two splits
    paths = corpus.write_splits(corpus.sample_dir(), tmp_path / "c")
    assert paths["validation"].read_text(encoding="utf-8") == "\n\n".join(corpus.read_split(corpus.sample_dir(), "validation"))
    with pytest.raises(corpus.CorpusError, match="refusing to overwrite"):
        corpus.write_splits(corpus.sample_dir(), tmp_path / "c")
    with pytest.raises(corpus.CorpusError, match="does not exist"):
        corpus.split_documents(tmp_path / "nope")
    (tmp_path / "two").mkdir()
    for i in range(2):
        (tmp_path / "two" / f"{i}.rst.txt").write_text("x")
    with pytest.raises(corpus.CorpusError, match="at least 3"):
        corpus.split_documents(tmp_path / "two")
    with pytest.raises(corpus.CorpusError, match="unknown split"):
        corpus.read_split(corpus.sample_dir(), "dev")


def test_bpe_tokenizer_round_trip_and_transformers_agree(tok_dir):
    import transformers

    ours = Tokenizer.from_checkpoint(tok_dir)
    theirs = transformers.AutoTokenizer.from_pretrained(str(tok_dir))
    text = "Lists are mutable:\n\n>>> squares = [1, 4, 9]\n>>> squares[0]  # café ✓"
    ids = ours.encode(text)
    assert ours.decode(ids) == text
    assert theirs(text)["input_ids"] == ids
    assert ours.eos_token_id == ours.token_to_id("<|im_end|>")
    with pytest.raises(ValueError, match="empty text"):
        bpe.train_bpe(["", "  "], 512)


def test_perplexity_windows_and_value(tok_dir):
    cfg = small_cfg()
    params = M.random_params(cfg, seed=1, dtype=jnp.float32)
    ids = np.random.default_rng(0).integers(0, 2000, size=150).astype(np.int32)
    # One window over everything == the plain mean NLL of the whole sequence.
    logits = np.asarray(M.forward_jit(cfg, params, jnp.asarray(ids[None])), np.float64)[0, :-1]
    logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    nll = float(np.mean(logz - logits[np.arange(149), ids[1:]]))
    one = evaluation.perplexity(cfg, params, ids, seq_len=150, stride=150, batch_size=2)
    # fp32 logits and a 149-term mean: agreement to ~1e-6 relative (float32 rounding of logsumexp terms).
    assert one.num_tokens == 149 and one.num_windows == 1
    assert math.isclose(one.nll, nll, rel_tol=1e-5)
    # Sliding windows: every target scored once; with context cut to 40 tokens the NLL changes only a little.
    slid = evaluation.perplexity(cfg, params, ids, seq_len=40, stride=16, batch_size=3)
    assert slid.num_tokens == 149 and slid.num_windows == len(evaluation.windows(150, 40, 16))
    assert abs(slid.nll - one.nll) < 0.05 * one.nll
    with pytest.raises(evaluation.EvalError, match="empty"):
        evaluation.perplexity(cfg, params, [], seq_len=40, stride=16)
    with pytest.raises(evaluation.EvalError, match="shorter than one window"):
        evaluation.perplexity(cfg, params, ids[:30], seq_len=40, stride=16)
    with pytest.raises(evaluation.EvalError, match="stride"):
        evaluation.perplexity(cfg, params, ids, seq_len=40, stride=41)
    with pytest.raises(evaluation.EvalError, match="token ids"):
        evaluation.perplexity(cfg, params, np.full(50, 5000), seq_len=40, stride=16)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tok_dir):
    tok = Tokenizer.from_checkpoint(tok_dir)
    tokens = encode_documents(tok, corpus.read_split(corpus.sample_dir(), "train"))
    out = tmp_path_factory.mktemp("run") / "model"
    log = TR.train(small_cfg(), tokens, out, TINY_TC, progress=False, tokenizer_dir=tok_dir)
    return out, tokens, log


def test_training_lowers_loss_and_saves_hf_layout(trained):
    import torch
    import transformers

    out, _, log = trained
    losses = [v for _, v in log["losses"]]
    assert losses[-1] < losses[0]
    assert log["non_embedding_params"] > 0
    cfg, params = checkpoint.load_checkpoint(out)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    ids = np.random.default_rng(1).integers(0, 2000, size=(1, 48))
    with torch.no_grad():
        ref = hf(torch.as_tensor(ids)).logits.numpy()
    ours = np.asarray(M.forward_jit(cfg, params, jnp.asarray(ids, jnp.int32)))
    # fp32 both sides; reductions of <= 256 terms: ~1e-6 relative, the acceptance bound is 1e-4.
    assert np.abs(ours - ref).max() / np.abs(ref).max() < 1e-4
    assert (out / "tokenizer.json").exists()
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        TR.train(small_cfg(), np.arange(100), out, TINY_TC, progress=False)


def test_training_is_deterministic_and_resumes_exactly(trained, tmp_path, monkeypatch):
    out, tokens, _ = trained
    _, ref = checkpoint.load_checkpoint(out)
    real = TR.batch_for_step

    def interrupted(tok, step, tc):
        if step == 4:
            raise KeyboardInterrupt("simulated interruption")
        return real(tok, step, tc)

    monkeypatch.setattr(TR, "batch_for_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        TR.train(small_cfg(), tokens, tmp_path / "m", TINY_TC, progress=False)
    monkeypatch.setattr(TR, "batch_for_step", real)
    log = TR.train(small_cfg(), tokens, tmp_path / "m", TINY_TC, progress=False)
    assert log["resumed_from"] == 3
    _, resumed = checkpoint.load_checkpoint(tmp_path / "m")
    for name, a in M.flatten(ref).items():  # same data order and the same ops: bit-identical
        np.testing.assert_array_equal(np.asarray(M.flatten(resumed)[name]), np.asarray(a), err_msg=name)


def test_train_config_validation():
    with pytest.raises(ValueError, match="steps"):
        TR.TrainConfig(steps=0)
    with pytest.raises(ValueError, match="compute_dtype"):
        TR.TrainConfig(compute_dtype="float16")
    with pytest.raises(ValueError, match="needs more than"):
        TR.batch_for_step(np.arange(10), 0, TR.TrainConfig(seq_len=32))


def test_ablate_cli_writes_tables_and_plot(trained, tmp_path, capsys):
    from PIL import Image

    from qwen35_jax import cli

    out, _, _ = trained
    rc = cli.main(["ablate", "--model", str(out), "--recipes", "int8-per-channel,bf16,int4-g128", "--seq-len",
                   "64", "--out", str(tmp_path / "abl")])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "| none |" in text and "| int4-g128 |" in text and "plot.png" in text
    import json

    results = json.loads((tmp_path / "abl" / "results.json").read_text())
    assert results["meta"]["complete"] is True
    rows = {r["recipe"]: r for r in results["rows"]}
    assert list(rows) == ["none", "int8-per-channel", "bf16", "int4-g128"]
    assert rows["none"]["ppl_delta_pct"] == 0.0
    # bf16 weights: relative rounding error <= 2^-9 per weight, ~30x below int4 g128's (scale/sqrt(12) with
    # scale = max|w|/7), so its perplexity change is the smaller one; half the fp32 bytes
    assert rows["bf16"]["bits_per_weight"] == 16.0
    assert abs(rows["bf16"]["ppl_delta_pct"]) < abs(rows["int4-g128"]["ppl_delta_pct"])
    assert rows["bf16"]["size_mb"] < 0.55 * rows["none"]["size_mb"]
    # int8 per-channel: 8 bits + one fp16 scale per output row over K=128..256 inputs -> 8.06-8.13 bits
    assert 8.0 < rows["int8-per-channel"]["bits_per_weight"] < 8.2
    # int4 g128: 4 bits + 16/128 for the fp16 group scale = 4.125
    assert rows["int4-g128"]["bits_per_weight"] == pytest.approx(4.125, abs=1e-6)
    assert rows["int4-g128"]["size_mb"] < rows["none"]["size_mb"]
    assert abs(rows["int8-per-channel"]["ppl_delta_pct"]) < abs(rows["int4-g128"]["ppl_delta_pct"]) + 1e-9
    assert Image.open(tmp_path / "abl" / "plot.png").size == (900, 560)
    # bad input: unknown recipe, non-empty output dir, a model dir without a tokenizer
    assert cli.main(["ablate", "--model", str(out), "--recipes", "int5-g7", "--out", str(tmp_path / "x")]) == 2
    assert "unknown recipe" in capsys.readouterr().err
    assert cli.main(["ablate", "--model", str(out), "--recipes", "int4-g128", "--out", str(tmp_path / "abl")]) == 2
    assert "refusing to overwrite" in capsys.readouterr().err
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        (bare / name).write_bytes((out / name).read_bytes())
    assert cli.main(["ablate", "--model", str(bare), "--recipes", "int4-g128", "--out", str(tmp_path / "y")]) == 2
    assert "tokenizer" in capsys.readouterr().err.lower()


def test_quantize_script_gptq_round_trip(trained, tmp_path, capsys):
    import importlib.util
    from pathlib import Path

    import quant

    spec = importlib.util.spec_from_file_location(
        "quantize_script", Path(__file__).parents[1] / "scripts" / "quantize.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out, _, _ = trained
    argv = [str(out), "--recipe", "gptq-int4-g128", "--calib-seqs", "4", "--calib-len", "64",
            "--out", str(tmp_path / "q")]
    assert script.main(argv) == 0
    printed = capsys.readouterr()
    assert "4 sequences x 64 tokens" in printed.err and "layer 8/8" in printed.err
    assert "GPTQ output error over" in printed.out
    cfg, params = checkpoint.load_checkpoint(out)
    loaded = quant.load(tmp_path / "q")
    leaf = M.flatten(loaded)["language_model.layers.0.mlp.down_proj.weight"]
    assert leaf.method == "gptq" and leaf.bits == 4
    # the saved tree is exactly what gptq_quantize_model gives for the same calibration windows
    # (quantization is deterministic and orbax round trips are exact)
    from qwen35_jax import corpus as C
    from qwen35_jax.small_model import encode_documents as enc
    from qwen35_jax.small_model import matching_tokenizer

    tok = matching_tokenizer(out, cfg.text.vocab_size)
    calib = script.calibration_tokens(enc(tok, C.read_split(C.sample_dir(), "train")), 4, 64)
    direct, _ = quant.gptq_quantize_model(cfg, params, "gptq-int4-g128", calib, batch_size=8)
    for name, a in M.flatten(direct).items():
        b = M.flatten(loaded)[name]
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=name)
    # bad input: existing output, calibration shorter than one sequence, unknown recipe
    assert script.main(argv) == 2 and "refusing to overwrite" in capsys.readouterr().err
    short = tmp_path / "short.txt"
    short.write_text("just a few words")
    assert script.main([str(out), "--recipe", "gptq-int4-g128", "--calib", str(short), "--calib-len", "64",
                        "--out", str(tmp_path / "q2")]) == 2
    assert "fewer than one sequence" in capsys.readouterr().err
    assert script.main([str(out), "--recipe", "gptq-int9", "--out", str(tmp_path / "q3")]) == 2
    assert "unknown preset" in capsys.readouterr().err
