"""The gated delta rule at the 27B shapes (Hk=16 key heads, Hv=48 value heads, K=V=128) on one GPU:
our implementations against flash-linear-attention (Triton), which vLLM and transformers use.

    python scripts/bench_gated_delta.py --json out/bench_gated_delta.json

Prefill: (B, T) in {(1, 4096), (1, 16384), (8, 2048)}; decode: one token for B in {1, 8, 32}.
flash-linear-attention is timed when ``fla`` imports (install the fla-core and flash-linear-attention
0.6.0 wheels, pure Python); its q/k are our key heads repeated to 48 heads, as its GVA-less API needs.
Each implementation's output is also compared with fla's on the same inputs (relative error).
"""

from __future__ import annotations

import argparse
import functools
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.gated_delta import gated_delta_rule, gated_delta_step, reference

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from benchlib import device_info, print_table, time_fn, write_json  # noqa: E402

HK, HV, K, V = 16, 48, 128, 128


def make_inputs(B, T, seed=0):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, T, HK, K)).astype(np.float32)
    k = rng.standard_normal((B, T, HK, K)).astype(np.float32)
    q /= np.linalg.norm(q, axis=-1, keepdims=True)
    k /= np.linalg.norm(k, axis=-1, keepdims=True)
    v = rng.standard_normal((B, T, HV, V)).astype(np.float32)
    g = -np.log1p(np.exp(-rng.standard_normal((B, T, HV)))).astype(np.float32)  # logsigmoid, as fla's bench
    beta = (1 / (1 + np.exp(-rng.random((B, T, HV))))).astype(np.float32)
    return q, k, v, g, beta


def fla_available():
    try:
        import fla  # noqa: F401
        import torch
        return torch.cuda.is_available()
    except Exception:
        return False


def time_torch(fn, reps=20):
    import torch

    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def rel_err(a, b):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prefill", default="1x4096,1x16384,8x2048")
    ap.add_argument("--decode", default="1,8,32")
    ap.add_argument("--impls", default="chunked:blocked:float32,chunked:blocked:tf32x3,chunked:blocked:bf16x6",
                    help="comma list of name[:solve[:precision[:chunk_size[:scan_unroll]]]]")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    use_fla = fla_available()
    rows = []
    for shape in args.prefill.split(","):
        B, T = map(int, shape.split("x"))
        q, k, v, g, beta = make_inputs(B, T)
        qj = jnp.asarray(q * K ** -0.5, jnp.bfloat16)
        kj, vj, bj = (jnp.asarray(x, jnp.bfloat16) for x in (k, v, beta))
        gj = jnp.asarray(g)
        fla_o = None
        if use_fla:
            import torch
            from fla.ops.gated_delta_rule import chunk_gated_delta_rule

            tq, tk = (torch.tensor(np.repeat(x, HV // HK, axis=2), dtype=torch.bfloat16, device="cuda") for x in (q, k))
            tv, tb = (torch.tensor(x, dtype=torch.bfloat16, device="cuda") for x in (v, beta))
            tg = torch.tensor(g, device="cuda")
            fla_fn = lambda: chunk_gated_delta_rule(tq, tk, tv, tg, tb, output_final_state=True)
            fla_o = fla_fn()[0].float().cpu().numpy()
            dt = time_torch(fla_fn)
            rows.append({"case": f"prefill B={B} T={T}", "impl": "fla chunk (Triton)", "ms": dt * 1e3,
                         "Mtok_s": B * T / dt / 1e6, "rel_err_vs_fla": 0.0})
            print(rows[-1], flush=True)
        for impl in args.impls.split(","):
            # name[:solve[:precision[:chunk_size[:scan_unroll]]]]
            name, solve, precision, chunk, unroll = (impl.split(":") + [""] * 4)[:5]
            reference.SCAN_UNROLL = int(unroll) if unroll else 1
            kw = {k: v for k, v in (("solve", solve), ("precision", precision)) if v}
            if chunk:
                kw["chunk_size"] = int(chunk)
            fn = jax.jit(functools.partial(gated_delta_rule, implementation=name, **kw))
            try:
                o, _ = jax.block_until_ready(fn(qj, kj, vj, gj, bj))
            except Exception as e:
                print(f"{impl} B={B} T={T} failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
                continue
            t = time_fn(fn, qj, kj, vj, gj, bj, warmup=1, reps=args.reps)["median_s"]
            rows.append({"case": f"prefill B={B} T={T}", "impl": f"ours {impl}", "ms": t * 1e3,
                         "Mtok_s": B * T / t / 1e6, "rel_err_vs_fla": rel_err(o, fla_o) if fla_o is not None else None})
            print(rows[-1], flush=True)

    for B in map(int, args.decode.split(",")):
        q, k, v, g, beta = make_inputs(B, 1, seed=B)
        state = jnp.asarray(np.random.default_rng(0).standard_normal((B, HV, K, V)).astype(np.float32) * 0.1)
        args_j = (jnp.asarray(q[:, 0] * K ** -0.5, jnp.bfloat16), jnp.asarray(k[:, 0], jnp.bfloat16),
                  jnp.asarray(v[:, 0], jnp.bfloat16), jnp.asarray(g[:, 0]), jnp.asarray(beta[:, 0], jnp.bfloat16))
        step = jax.jit(gated_delta_step, donate_argnums=5)
        s = state
        for _ in range(3):
            _, s = step(*args_j, s)
        jax.block_until_ready(s)
        times = []
        for _ in range(50):
            t0 = time.perf_counter()
            _, s = step(*args_j, s)
            s.block_until_ready()
            times.append(time.perf_counter() - t0)
        t = float(np.median(times))
        state_bytes = 2 * B * HV * K * V * 4
        rows.append({"case": f"decode B={B}", "impl": "ours XLA step (one call)", "ms": t * 1e3,
                     "GB_s": state_bytes / t / 1e9})
        print(rows[-1], flush=True)
    print(f"\ngated delta rule, Hk={HK} Hv={HV} K={K} V={V}, bf16 inputs, fp32 state; {device_info()}")
    print_table(rows, [("case", "case"), ("impl", "implementation"), ("ms", "ms"), ("Mtok_s", "Mtok/s"),
                       ("GB_s", "state GB/s"), ("rel_err_vs_fla", "rel. err vs fla")])
    write_json(args.json, {"benchmark": "gated_delta", "device": device_info(), "rows": rows})


if __name__ == "__main__":
    main()
