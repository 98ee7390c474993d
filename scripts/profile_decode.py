"""Where a decode step's time goes: a device trace of the jitted greedy step, summarized per kernel.

    python scripts/profile_decode.py --json out/profile_decode.json
    python scripts/profile_decode.py --batch 8 --context 32768 --hlo out/step_hlo.txt
    python scripts/profile_decode.py --tiny            # CPU smoke run (host events only)

Builds the full-size Qwen3.5-27B with random bf16 weights (as ``bench_decode.py``), fills the caches at
``--context``, times ``--steps`` plain greedy steps (synchronized), then records ``--trace-steps`` more
under ``jax.profiler`` and reads the Perfetto trace back. Printed: wall time per step; the GPU's busy
time per step (union of kernel intervals) and the idle gaps between kernels; kernels per step; the
kernels grouped by kind (matmul, fusion, Pallas/Triton custom calls, copies) and the top kernels by
total time; the weight bytes one step must read and the bandwidth that implies (wall and busy).
``--hlo`` writes the optimized HLO of the step (to look for copies/transposes the trace points at).
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import sys

os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")

import jax
import jax.numpy as jnp

import qwen35_jax as Q
from qwen35_jax import generation as G
from qwen35_jax.model import flatten
from qwen35_jax.sampling import get_preset

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from bench_decode import first_tokens, greedy_stepper, random_state, time_steps  # noqa: E402
from benchlib import busy_time, device_info, print_table, trace_events, write_json  # noqa: E402

_KINDS = (  # first match wins; names as XLA/cuBLAS/Triton give them
    ("matmul", re.compile(r"gemm|gemv|cublas|cutlass|sm90_|sm80_|xmma|matmul|dot", re.I)),
    ("triton/custom call", re.compile(r"pallas|triton|custom", re.I)),  # XLA Triton fusions too
    ("copy/transpose", re.compile(r"copy|transpose|memcpy|memset", re.I)),
    ("reduction", re.compile(r"reduce|reduction", re.I)),
    ("fusion", re.compile(r"fusion|loop_|input_", re.I)),
)


def kernel_kind(name: str) -> str:
    for kind, pat in _KINDS:
        if pat.search(name):
            return kind
    return "other"


def weight_bytes(params) -> int:
    """Bytes one decode step reads from the weights: everything but the embedding table (a gather of B
    rows) and the MTP head (not used by a plain step)."""
    total = 0
    for name, leaf in flatten(params).items():
        if "embed_tokens" in name or name.startswith("mtp"):
            continue
        total += leaf.size * leaf.dtype.itemsize
    return total


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--steps", type=int, default=16, help="timed steps (synchronized once at the end)")
    ap.add_argument("--trace-steps", type=int, default=4)
    ap.add_argument("--top", type=int, default=25, help="kernels listed by total time")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--separate", action="store_true",
                    help="the HF layout (one GEMV per projection) instead of model.fuse_projections' fused one")
    ap.add_argument("--hlo", default=None, help="write the step's optimized HLO here")
    ap.add_argument("--trace-dir", default=None, help="keep the raw trace here (default: a temp dir)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    text = Q.qwen35_27b_text().text if not args.tiny else Q.tiny_text_config(mtp_num_hidden_layers=1)
    cfg = Q.ModelConfig(text=text, vision=None, architecture="Qwen3_5ForCausalLM")
    params = Q.random_params(cfg, dtype=jnp.bfloat16, fused=not args.separate)
    B, ctx = args.batch, args.context
    state = random_state(cfg, B, ctx, G.cache_length(ctx, args.steps + args.trace_steps + 8, 3))
    tok = first_tokens(cfg, B)
    options = Q.RuntimeOptions()
    if args.hlo:
        compiled = G._jitted("step").lower(cfg, options, get_preset("greedy"), (), params, state, tok,
                                           jax.random.key(1), None, None, jnp.zeros((B,), bool)).compile()
        with open(args.hlo, "w") as f:
            f.write(compiled.as_text())
        print(f"optimized HLO -> {args.hlo}", flush=True)
    one = greedy_stepper(cfg, params, options, B)
    wall, carry = time_steps(one, (tok, state, jax.random.key(0)), args.steps)
    wall_ms = wall * 1e3

    held = [carry]

    def traced():
        for _ in range(args.trace_steps):
            held[0] = one(held[0])
        jax.block_until_ready(held[0])

    xs, source = trace_events(traced, args.trace_dir)
    n = args.trace_steps
    wbytes = weight_bytes(params)
    result = {"batch": B, "context": ctx, "wall_ms_per_step": wall_ms, "weight_gb": wbytes / 1e9,
              "wall_tb_s": wbytes / (wall_ms * 1e-3) / 1e12, "trace_source": source, "device": device_info()}
    print(f"B={B} ctx={ctx}: {wall_ms:.3f} ms/step wall; weights read per step {wbytes / 1e9:.2f} GB "
          f"-> {result['wall_tb_s']:.2f} TB/s", flush=True)
    if xs:
        span = (max(e["ts"] + e.get("dur", 0) for e in xs) - min(e["ts"] for e in xs)) / 1e3 / n
        busy = busy_time(xs) / 1e3 / n
        by_name = collections.defaultdict(lambda: [0.0, 0])
        by_kind = collections.defaultdict(lambda: [0.0, 0])
        for e in xs:
            d = e.get("dur", 0.0)
            by_name[e["name"]][0] += d
            by_name[e["name"]][1] += 1
            kind = kernel_kind(e["name"])
            by_kind[kind][0] += d
            by_kind[kind][1] += 1
        result.update({"trace_span_ms_per_step": span, "busy_ms_per_step": busy, "idle_ms_per_step": span - busy,
                       "kernels_per_step": len(xs) / n, "busy_tb_s": wbytes / (busy * 1e-3) / 1e12})
        print(f"trace ({source}): span {span:.3f} ms/step, GPU busy {busy:.3f} ms, idle gaps {span - busy:.3f} ms, "
              f"{len(xs) / n:.0f} kernels/step; weights at busy time {result['busy_tb_s']:.2f} TB/s")
        kinds = [{"kind": k, "ms_per_step": v[0] / 1e3 / n, "kernels_per_step": v[1] / n,
                  "us_per_kernel": v[0] / v[1]} for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1][0])]
        top = [{"name": k[:90], "ms_per_step": v[0] / 1e3 / n, "calls_per_step": v[1] / n, "us_per_call": v[0] / v[1]}
               for k, v in sorted(by_name.items(), key=lambda kv: -kv[1][0])[:args.top]]
        result.update({"kinds": kinds, "top_kernels": top})
        print_table(kinds, [("kind", "kind"), ("ms_per_step", "ms/step"), ("kernels_per_step", "kernels/step"),
                            ("us_per_kernel", "us/kernel")])
        print_table(top, [("name", "kernel"), ("ms_per_step", "ms/step"), ("calls_per_step", "calls/step"),
                          ("us_per_call", "us/call")])
    else:
        print(f"no device kernels in the trace: {source}")
    write_json(args.json, {"benchmark": "profile_decode", **result})


if __name__ == "__main__":
    main()
