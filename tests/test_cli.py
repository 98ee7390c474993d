"""The console script: summary and next-token commands on a tiny checkpoint, and clean errors."""

from __future__ import annotations

import numpy as np
import torch

from qwen35_jax.cli import main


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
