"""The command-line scripts run end to end on tiny configs (subprocesses: hf_parity.py sets a global jax
option, and every script must work from a clean interpreter as the README shows)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load_script(name):
    """scripts/<name> imported as a module (its functions, without running main)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(Path(name).stem, ROOT / "scripts" / name)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


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
    r = _run(ROOT / "scripts" / "bench_decode.py", "--tiny", "--cases", "1x64,2x64:int8", "--drafts", "1",
             "--steps", "2", "--json", out)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "failed" not in r.stdout, r.stdout  # a case that raises is reported, not fatal: catch it here
    rows = json.loads(out.read_text())["rows"]
    # every case in the fused layout, the default --separate-cases (1x512, not run here) in the other
    assert {(row["layout"], row["batch"], row["kv"], row["mode"]) for row in rows} == {
        ("fused", 1, "bf16", "plain"), ("fused", 1, "bf16", "MTP K=1"),
        ("fused", 2, "int8", "plain"), ("fused", 2, "int8", "MTP K=1")}
    r = _run(ROOT / "scripts" / "bench_decode.py", "--tiny", "--cases", "1x64", "--drafts", "", "--steps", "2",
             "--layouts", "separate")
    assert r.returncode == 0 and "separate" in r.stdout, r.stdout + r.stderr
    r = _run(ROOT / "scripts" / "bench_decode.py", "--tiny", "--layouts", "fused,unfused")
    assert r.returncode == 2 and "--layouts" in r.stderr


def test_bench_gptq_tiny(tmp_path):
    out = tmp_path / "gptq.json"
    r = _run(ROOT / "scripts" / "bench_gptq.py", "--tiny", "--layers", "8", "--calib-seqs", "2", "--calib-len", "128",
             "--batch-size", "2", "--json", out)
    assert r.returncode == 0, r.stdout + r.stderr
    res = json.loads(out.read_text())
    assert res["complete"] and res["shapes"] == "a tiny config" and len(res["layer_seconds"]) == 8
    assert res["bits_per_weight"] == 4.125  # int4 + one fp16 scale per 128 weights, no padding at K = 128/256
    assert {row["layer type"] for row in res["rows"]} == {"linear_attention", "full_attention"}


def test_bench_gptq_summarize_cut_run():
    sys.path.insert(0, str(ROOT / "scripts"))
    import bench_gptq
    from qwen35_jax.config import make_layer_types

    types = make_layer_types(12)  # 3 DeltaNet : 1 attention
    # cut after layer 4: attention has only its compiling first layer (index 3), so no projection yet
    rows, projected = bench_gptq.summarize([50.0, 2.0, 4.0, 30.0, 3.0], types)
    assert projected is None and [r["layer type"] for r in rows] == ["linear_attention"]
    assert rows[0]["layers timed"] == 3 and rows[0]["median_s"] == 3.0 and rows[0]["first_s (compile)"] == 50.0
    rows, projected = bench_gptq.summarize([50.0, 2.0, 4.0, 30.0, 3.0, 3.0, 3.0, 5.0], types)
    assert projected == 48 * 3.0 + 16 * 5.0


def test_profile_decode_trace_summary(tmp_path):
    """The Perfetto reader keeps only the device stream's complete events and unions overlapping ones."""
    import gzip

    sys.path.insert(0, str(ROOT / "scripts"))
    import benchlib
    import profile_decode

    events = [
        {"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "/host:CPU"}},
        {"ph": "M", "pid": 2, "name": "process_name", "args": {"name": "/device:GPU:0"}},
        {"ph": "M", "pid": 2, "tid": 7, "name": "thread_name", "args": {"name": "Stream #14(Compute)"}},
        {"ph": "M", "pid": 2, "tid": 8, "name": "thread_name", "args": {"name": "XLA Ops"}},
        {"ph": "X", "pid": 1, "tid": 1, "ts": 0.0, "dur": 100.0, "name": "PjitFunction(_step)"},
        {"ph": "X", "pid": 2, "tid": 8, "ts": 0.0, "dur": 100.0, "name": "an op annotation, not a kernel"},
        {"ph": "X", "pid": 2, "tid": 7, "ts": 10.0, "dur": 5.0, "name": "gemm_fusion_dot_1"},
        {"ph": "X", "pid": 2, "tid": 7, "ts": 12.0, "dur": 5.0, "name": "loop_add_fusion"},  # overlaps: union 10..17
        {"ph": "X", "pid": 2, "tid": 7, "ts": 20.0, "dur": 1.0, "name": "wrapped_transpose"},
    ]
    d = tmp_path / "plugins" / "profile" / "run"
    d.mkdir(parents=True)
    with gzip.open(d / "perfetto_trace.json.gz", "wt") as f:
        json.dump({"traceEvents": events}, f)
    xs, source = benchlib.device_events(str(tmp_path))
    assert sorted(e["name"] for e in xs) == ["gemm_fusion_dot_1", "loop_add_fusion", "wrapped_transpose"]
    assert "GPU" in source and benchlib.busy_time(xs) == 8.0
    assert [profile_decode.kernel_kind(e["name"]) for e in xs] == ["matmul", "fusion", "copy/transpose"]


def test_profile_decode_tiny(tmp_path):
    out, hlo = tmp_path / "profile.json", tmp_path / "step.hlo"
    r = _run(ROOT / "scripts" / "profile_decode.py", "--tiny", "--steps", "2", "--trace-steps", "1", "--hlo", hlo,
             "--json", out)
    assert r.returncode == 0, r.stdout + r.stderr
    res = json.loads(out.read_text())
    assert res["wall_ms_per_step"] > 0 and res["weight_gb"] > 0
    assert "HloModule" in hlo.read_text()


def test_bench_gated_delta_state_flags():
    """The state-pass flags of --impls / --piece-state map to the kernel options; unknown flags and
    product names stop the script (before any GPU work) with the spec in the message."""
    mod = _load_script("bench_gated_delta.py")
    assert mod.parse_state_flags("", "x") == {}
    assert mod.parse_state_flags("stack/wide=xv+pv+update", "x") == {"stack_qk": True, "wide_products": "xv,pv,update"}
    assert mod.parse_state_flags("tr", "x") == {"transposed": True}
    assert mod.parse_state_flags("fuse/wide", "x") == {"fuse_products": True, "wide_products": True}
    assert mod.parse_state_flags("bf16=qs", "x") == {"bf16_products": "qs"}
    assert mod.parse_state_flags("f16", "x") == {"fp16_products": True}
    assert mod.parse_state_flags("f16=xv+pv", "x") == {"fp16_products": "xv,pv"}
    assert mod.parse_state_flags("nof16", "x") == {"fp16_products": False}
    label, kw, _ = mod.parse_impl("pallas:bf16x3:32:4:1::stack/wide")
    assert kw == {"implementation": "pallas", "precision": "bf16x3", "block_v": 32, "num_warps": 4,
                  "num_stages": 1, "stack_qk": True, "wide_products": True}, kw
    for bad, word in (("tr=1", "'tr=1'"), ("wide=xv+kv", "['kv']"), ("wide=", "'wide='"), ("stak", "'stak'"),
                      ("bf16=qs+q", "['q']"), ("f16=xs", "['xs']")):
        with pytest.raises(SystemExit, match=re.escape(word)):
            mod.parse_state_flags(bad, "--impls spec")


def test_probe_mosaic_mixed_lowers(tmp_path):
    """The Mosaic GPU probe's kernels lower for CUDA on a CPU (shapes, tiling, shared memory are
    checked at lowering), and its JSON names every config."""
    mod = _load_script("probe_mosaic_mixed.py")
    out = tmp_path / "p.json"
    rows = mod.main(["--lower", "--rows", "256", "--k", "256", "--n", "512", "--json", str(out)])
    assert len(rows) == 8 and all(r.get("lowered") for r in rows), rows
    assert json.loads(out.read_text())["rows"] == rows
    from jax.experimental.pallas.ops.gpu import hopper_mixed_type_matmul_mgpu as hm
    assert not isinstance(hm.backend, types.SimpleNamespace)  # jax's module is restored after --lower


def test_bench_xla_int4_smoke(tmp_path):
    """Every method of the XLA int4 fusion probe runs on a CPU and computes the product it claims:
    err is the relative error against float32 x @ W on the same dequantized weight, bf16 output
    rounding only (~2e-3 measured; 1e-2 bounds it), while a wrong code order (the slab bit-cast) or
    group mapping errs by O(1)."""
    out = tmp_path / "xla_int4.json"
    r = _run(ROOT / "scripts" / "bench_xla_int4.py", "--smoke", "--reps", "1", "--json", out)
    assert r.returncode == 0, r.stdout + r.stderr
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 2 * 7 and all("error" not in row and row["us"] > 0 for row in rows), rows
    assert all(row["err"] < 1e-2 for row in rows if row["method"] != "xla_bf16"), rows


def test_bench_quant_matmul_smoke(tmp_path):
    """Tiny shapes through the Pallas interpreter: every method gives a time (the device-time column
    stays empty on a CPU, where the trace has no device stream)."""
    out = tmp_path / "qmm.json"
    r = _run(ROOT / "scripts" / "bench_quant_matmul.py", "--smoke", "--reps", "1", "--json", out)
    assert r.returncode == 0, r.stdout + r.stderr
    rows = json.loads(out.read_text())["rows"]
    assert rows and all("error" not in row and row["us"] > 0 and "device_us" not in row for row in rows), rows


def test_bench_gated_delta_decode_cpu(tmp_path):
    """The decode section on a CPU: the XLA step is timed (one call and per layer in a jit); the Pallas
    variant reports that it needs a GPU instead of stopping the script."""
    out = tmp_path / "gd.json"
    r = _run(ROOT / "scripts" / "bench_gated_delta.py", "--prefill", "", "--decode", "1", "--layers", "2",
             "--reps", "1", "--decode-impls", "16:1", "--json", out)
    assert r.returncode == 0, r.stdout + r.stderr
    impls = [row["impl"] for row in json.loads(out.read_text())["rows"]]
    assert impls == ["ours XLA step (one call)", "ours XLA step (2 layers in one jit, per layer)"], impls
    assert "pallas BV=16 warps=1 decode B=1 failed" in r.stdout


def test_bench_gated_delta_processes_cpu(tmp_path):
    """--processes: the prefill timed in fresh processes, aggregated per implementation (fastest and
    median process, every value)."""
    out = tmp_path / "gdp.json"
    r = _run(ROOT / "scripts" / "bench_gated_delta.py", "--processes", "2", "--prefill", "1x64",
             "--impls", "chunked:blocked:float32", "--reps", "1", "--inner", "1", "--json", out)
    assert r.returncode == 0, r.stdout + r.stderr
    (row,) = json.loads(out.read_text())["rows"]
    assert row["impl"] == "ours chunked:blocked:float32" and row["processes"] == 2, row
    assert len(row["all_ms"]) == 2 and row["min_ms"] == min(row["all_ms"]) > 0, row
    assert row["median_ms"] == sum(row["all_ms"]) / 2, row


def test_bench_quant_matmul_m1_candidates_flag():
    """--m1-candidates names the --sweep-m1 kernels; a name not in kernel.CANDIDATES is an error that
    names it, before any GPU work."""
    r = _run(ROOT / "scripts" / "bench_quant_matmul.py", "--sweep-m1", "--no-bench",
             "--m1-candidates", "row_r16_bn128_w1_pf_t16_xf,row_nope")
    assert r.returncode != 0 and "row_nope" in r.stderr and "row_r16_bn128_w1_pf_t16_xf" not in r.stderr, r.stderr
    mod = _load_script("bench_quant_matmul.py")
    plan = mod.sweep_m1_plan(["row_r16_bn128_w1_pf_t16", "row_r16_bn128_w1_pf_t16_xf"])
    assert [(sc, c) for _, _, _, sc, c in plan] == [
        (None, "xla_bf16"), ("int4_g128", "row_r16_bn128_w1_pf_t16"), ("int4_g128", "row_r16_bn128_w1_pf_t16_xf"),
        ("int8_g32", "row_r16_bn128_w1_pf_t16"), ("int8_g32", "row_r16_bn128_w1_pf_t16_xf")]
    assert len(mod.sweep_m1_plan()) == 1 + 2 * (len(mod._M1_FIRST) + len(mod._M1_REST))


def test_bench_quant_mosaic_lowers():
    """The Mosaic int4 prefill bench lowers its configs (plain and split-K, symmetric and with
    zero points) for CUDA on a CPU; the kernel's numerics are tested in
    tests/pallas_kernels/quant_matmul/test_quant_mosaic.py."""
    r = _run(ROOT / "scripts" / "bench_quant_mosaic.py", "--lower", "--configs", "256:64:3,128:64:4:2")
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("lowered") == 4, r.stdout
