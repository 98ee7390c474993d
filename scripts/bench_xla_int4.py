"""Does XLA fuse a group-scaled 4-bit (or 8-bit) weight dequantization into its own GEMM, and how
fast is that against the bf16 GEMM and our prefill path (Pallas dequantization pass + bf16 GEMM)?

    python scripts/bench_xla_int4.py --json out/bench_xla_int4.json            # K=5120 -> N=34816
    python scripts/bench_xla_int4.py --rows 512,1024 --json out/x.json
    python scripts/bench_xla_int4.py --smoke                                   # tiny, CPU check

Methods (each a jitted ``x @ W`` in bf16 with fp32 accumulation inside the dot):
  xla_bf16            the bf16 weight (the baseline every ratio is against)
  xla_u4_g128         ``jnp.uint4`` codes [K, N], bf16 scales per 128-row group, zero point 8,
                      dequantized in jnp before the dot: ``((w - 8) * s) @``
  xla_u4_g128_zeros   the same with a bf16 zero point per group
  xla_s8_g32          ``int8`` codes with bf16 scales per 32-row group
  xla_s4_perchannel   ``int4`` codes, one scale per output column applied after the dot (the only
                      form XLA fused into one GEMM kernel in the first run)
  xla_slab_u4_g128    our packed layout (``quant_matmul/layout.py``: uint32 words of 8 slab codes)
                      bit-cast to ``uint4`` and reordered to [K, N] in jnp, then as xla_u4_g128
  ours_pass_int4_g128 ``dequantize_then_dot`` on the same packed words: the Pallas pass writes the
                      bf16 weight, then XLA's bf16 GEMM (the model's prefill path on a GPU)

Timing as in ``bench_quant_matmul.py`` (weight copies beyond the L2 cache, medians of ``--reps``
samples, and the device time per call from a profiler trace, with the time of each kernel in the
JSON, which is how a fused GEMM shows: one kernel). ``err``: relative Frobenius error of the output
against float32 ``x @ W`` on the same dequantized weight (bf16 rounding of the weight or output: a
few 1e-3 at most; a wrong code order or group mapping gives O(1)). Every method's reference is built
from the codes themselves, not from the path it checks (``(c - 8) * s`` for our symmetric packing).
"""

from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from bench_quant_matmul import n_copies, timed  # noqa: E402
from benchlib import device_info, print_table, write_json  # noqa: E402

from pallas_kernels.quant_matmul import dequantize_then_dot, layout  # noqa: E402

METHODS = ("xla_bf16", "xla_u4_g128", "xla_u4_g128_zeros", "xla_s8_g32", "xla_s4_perchannel",
           "xla_slab_u4_g128", "ours_pass_int4_g128")


def _groups(w, s, group, zero):
    """(w - zero) * s with s [K / group, N] broadcast over each group's rows; w [K, N] codes."""
    k, n = w.shape
    wb = w.astype(jnp.bfloat16).reshape(k // group, group, n)
    z = zero if np.isscalar(zero) else zero[:, None, :]
    return ((wb - z) * s[:, None, :]).reshape(k, n)


def _slab_codes(packed, k):
    """The codes of our packed uint32 [S, N] words (4 bits) as uint4 [K, N]: word [r, n] bit field j
    holds row j * S + r, and a bit-cast puts field j at index j of a new last axis."""
    s_rows, n = packed.shape
    u4 = jax.lax.bitcast_convert_type(packed, jnp.uint4)  # [S, N, 8]
    return jnp.moveaxis(u4, 2, 0).reshape(8 * s_rows, n)[:k]


def make_methods(k, n, key):
    """name -> (fn(x, *weights), weights, weight bytes, dequantized fp32 weight or None)."""
    k1, k2, k3 = jax.random.split(key, 3)
    codes4 = jax.random.randint(k1, (k, n), 0, 16, jnp.int32)
    s128 = (jax.random.uniform(k2, (k // 128, n)) * 0.01 + 1e-3).astype(jnp.bfloat16)
    z128 = jax.random.randint(k3, (k // 128, n), 6, 10, jnp.int32).astype(jnp.bfloat16)
    codes8 = jax.random.randint(k1, (k, n), -128, 128, jnp.int32)
    s32 = (jax.random.uniform(k2, (k // 32, n)) * 0.01 + 1e-3).astype(jnp.bfloat16)
    spc = (jax.random.uniform(k2, (n,)) * 0.01 + 1e-3).astype(jnp.bfloat16)
    u4, s4, s8 = codes4.astype(jnp.uint4), (codes4 - 8).astype(jnp.int4), codes8.astype(jnp.int8)
    packed = layout.pack(codes4.astype(jnp.uint32), 4, 128)
    kw = dict(bits=4, group_size=128, in_features=k)
    f32 = lambda w: w.astype(jnp.float32)  # noqa: E731
    deq_u4 = _groups(u4, s128, 128, 8.0)
    methods = {
        "xla_bf16": (lambda x, w: x @ w, (deq_u4,), k * n * 2, None),
        "xla_u4_g128": (lambda x, w, s: x @ _groups(w, s, 128, 8.0), (u4, s128), k * n // 2 + s128.size * 2,
                        f32(deq_u4)),
        "xla_u4_g128_zeros": (lambda x, w, s, z: x @ _groups(w, s, 128, z), (u4, s128, z128),
                              k * n // 2 + s128.size * 4, f32(_groups(u4, s128, 128, z128))),
        "xla_s8_g32": (lambda x, w, s: x @ _groups(w, s, 32, 0.0), (s8, s32), k * n + s32.size * 2,
                       f32(_groups(s8, s32, 32, 0.0))),
        "xla_s4_perchannel": (lambda x, w, s: (x @ w.astype(jnp.bfloat16)) * s, (s4, spc), k * n // 2 + n * 2,
                              f32(s4) * f32(spc)),
        "xla_slab_u4_g128": (lambda x, p, s: x @ _groups(_slab_codes(p, k), s, 128, 8.0), (packed, s128),
                             packed.size * 4 + s128.size * 2, f32(deq_u4)),
        "ours_pass_int4_g128": (
            lambda x, p, s: dequantize_then_dot(x, p, s, None, **kw), (packed, s128),
            packed.size * 4 + s128.size * 2, f32(deq_u4)),
    }
    return methods


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="1,512,1024,2048,4096")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--k", type=int, default=5120)
    ap.add_argument("--n", type=int, default=34816)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--json", default=None)
    ap.add_argument("--smoke", action="store_true", help="K=256, N=128, rows 1 and 16 (CPU check)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.k, args.n, args.rows = 256, 128, "1,16"
    names = args.methods.split(",")
    unknown = [m for m in names if m not in METHODS]
    if unknown:
        raise SystemExit(f"--methods: unknown {unknown}; known: {', '.join(METHODS)}")
    if args.k % 128 or args.k % 8:
        raise SystemExit(f"--k must be a multiple of 128 (the group size), got {args.k}")
    methods = make_methods(args.k, args.n, jax.random.key(0))
    rows, base = [], {}
    for m in map(int, args.rows.split(",")):
        x = jax.random.normal(jax.random.key(m), (m, args.k), jnp.bfloat16)
        for name in names:
            fn, weights, nbytes, w_ref = methods[name]
            row = dict(M=m, method=name)
            try:
                out = jax.jit(fn)(x, *weights)
                if w_ref is not None:
                    want = x.astype(jnp.float32) @ w_ref
                    row["err"] = float(jnp.linalg.norm(out.astype(jnp.float32) - want) / jnp.linalg.norm(want))
                # distinct buffers for every array, integer codes included (shared codes would be
                # read from L2 by the later copies)
                copies = [weights] + [tuple(jnp.array(a, copy=True) for a in weights)
                                      for _ in range(n_copies(nbytes) - 1)]
                t, _, dev = timed(fn, x, copies, args.reps)
                row["us"] = t * 1e6
                if dev:
                    row.update(device_us=dev["busy_us"], kernels=dev["kernels"],
                               device_us_by_kernel={k: round(v, 2) for k, v in dev["by_name"].items()})
                key = "device_us" if dev else "us"
                if name == "xla_bf16":
                    base[m] = row[key]
                if m in base:
                    row["x_bf16"] = row[key] / base[m]
            except Exception as e:  # a method XLA cannot lower here is a result too
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            rows.append(row)
            print({k: v for k, v in row.items() if k != "device_us_by_kernel"}, flush=True)
    print_table(rows, [("M", "M"), ("method", "method"), ("device_us", "device us"), ("us", "wall us"),
                       ("kernels", "kernels"), ("x_bf16", "x bf16"), ("err", "err"), ("error", "error")])
    write_json(args.json, {"device": device_info(), "K": args.k, "N": args.n, "rows": rows})


if __name__ == "__main__":
    main()
