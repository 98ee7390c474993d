"""The command-line scripts run end to end on tiny configs (subprocesses: hf_parity.py sets a global jax
option, and every script must work from a clean interpreter as the README shows)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(*args, timeout=600):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_hf_parity_passes_and_fails_by_tolerance(hf_checkpoints, tmp_path):
    path, _ = hf_checkpoints("gva3", "causal")
    out = tmp_path / "parity.json"
    r = _run(ROOT / "scripts" / "hf_parity.py", path, "--tokens", "48", "--json", out)
    assert r.returncode == 0, r.stdout + r.stderr
    res = json.loads(out.read_text())
    # float32 on both sides, differing by reduction order only: a few 1e-7 relative (the parity tests' bound)
    assert res["tokens"] == 48 and res["max_rel_err"] < 1e-4 and res["argmax_agreement"] == 1.0
    # a tolerance below float32 rounding cannot hold: exit status 1, so a script caller sees the failure
    r = _run(ROOT / "scripts" / "hf_parity.py", path, "--tokens", "48", "--tol", "1e-12")
    assert r.returncode == 1, r.stdout + r.stderr


def test_bench_decode_tiny_runs_every_mode(tmp_path):
    out = tmp_path / "decode.json"
    r = _run(ROOT / "scripts" / "bench_decode.py", "--tiny", "--cases", "1x64,2x64", "--drafts", "1", "--steps", "2",
             "--json", out)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "failed" not in r.stdout, r.stdout  # a case that raises is reported, not fatal: catch it here
    rows = json.loads(out.read_text())["rows"]
    assert {(row["batch"], row["mode"]) for row in rows} == {(1, "plain"), (1, "MTP K=1"), (2, "plain"),
                                                              (2, "MTP K=1")}


def test_bench_gptq_tiny(tmp_path):
    out = tmp_path / "gptq.json"
    r = _run(ROOT / "scripts" / "bench_gptq.py", "--tiny", "--layers", "8", "--calib-seqs", "2", "--calib-len", "128",
             "--batch-size", "2", "--json", out)
    assert r.returncode == 0, r.stdout + r.stderr
    res = json.loads(out.read_text())
    assert res["complete"] and res["shapes"] == "a tiny config" and len(res["layer_seconds"]) == 8
    assert res["bits_per_weight"] == 4.125  # int4 + one fp16 scale per 128 weights, no padding at K = 128/256
    assert {row["layer type"] for row in res["rows"]} == {"linear_attention", "full_attention"}
