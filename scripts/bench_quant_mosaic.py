"""The Mosaic GPU int4 / int8 prefill kernel (``pallas_kernels/quant_matmul/kernel_mosaic.py``) on a
Hopper GPU: correctness against the fp32 reference on small and full-size cases, then CUPTI kernel times
(``mosaic.gpu.profiler.measure``: every kernel of the call, so the activation permutation and the
scale pairing are included) against XLA's bf16 GEMM and the dequantization pass + bf16 GEMM path.

    python scripts/bench_quant_mosaic.py --json out/bench_quant_mosaic.json
    python scripts/bench_quant_mosaic.py --bits 8 --group-size 32 --rows 512   # int8 g32
    python scripts/bench_quant_mosaic.py --lower     # CPU: lowering for CUDA only
    ncu --set full -k regex:mosaic_gpu python scripts/bench_quant_mosaic.py \
        --plain-runs 1 --skip-checks --shapes 17408:5120 --rows 512 --configs 176:64:3s   # for a profiler
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchlib import device_info, print_table, write_json  # noqa: E402

from pallas_kernels.quant_matmul import dequantize_then_dot, layout, quant_matmul_reference  # noqa: E402
from pallas_kernels.quant_matmul import kernel_mosaic as km  # noqa: E402

SHAPES = [(5120, 34816), (5120, 17408), (17408, 5120), (5120, 10240), (5120, 12288), (5120, 6144),
          (6144, 5120)]


def make(rng_key, m, k, n, group_size, zeros, bits=4):
    k1, k2, k3, k4, k5 = jax.random.split(rng_key, 5)
    s = layout.slab_rows(k, bits, group_size)
    g = layout.num_groups(k, bits, group_size)
    packed = jax.random.bits(k1, (s, n), jnp.uint32)
    if s * layout.codes_per_word(bits) > k:  # padding rows carry code 0 (layout.py)
        codes = layout.unpack(packed, bits, k)
        packed = layout.pack(codes, bits, group_size)
    scales = (jax.random.uniform(k2, (g, n), jnp.float32) * 0.05 + 0.005).astype(jnp.bfloat16)
    z = jax.random.randint(k3, (g, n), 0, 2 ** bits, jnp.int32).astype(jnp.uint8) if zeros else None
    x = jax.random.normal(k4, (m, k), jnp.bfloat16)
    return x, packed, scales, z


def parse_config(text):
    """``block_m:depth:stages[:splits[:tail_splits[:stream_k_ctas]]]`` plus flags: ``t`` token_split, ``p`` pingpong, ``s``
    swizzle_words, ``i`` interleave, ``l`` lop3, ``k`` stream_k, ``r`` rest_first, ``b`` byte_perm (8-bit codes); or ``auto``: None, resolved per shape by ``resolve`` (``kernel_mosaic.choose_config``)."""
    if text == "auto":
        return None
    head = text.rstrip("tpsilkrb")
    flags = text[len(head):]
    ints = dict(zip(("block_m", "depth", "stages", "splits", "tail_splits", "stream_k_ctas"),
                    map(int, head.split(":"))))
    return km.MosaicConfig(**ints, token_split="t" in flags, pingpong="p" in flags,
                           swizzle_words="s" in flags, interleave="i" in flags, lop3="l" in flags,
                           stream_k="k" in flags, rest_first="r" in flags,
                           byte_perm="b" in flags)


def resolve(cfg, m, k, n, gs, bits=4):
    return cfg or km.choose_config(m, n, bits=bits, group_size=gs, in_features=k)


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", default="512,4096")
    ap.add_argument("--configs", default="256:64:3,128:64:4,256:64:4,128:128:3",
                    help="block_m:depth:stages[:splits[:tail_splits[:stream_k_ctas]]][t: token_split][p: pingpong][s: swizzle_words][i: interleave][l: lop3][k: stream_k][r: rest_first][b: byte_perm], comma list; the first two also run the checks")
    ap.add_argument("--all-shapes", action="store_true", help="every issue shape (time only: the checks run first)")
    ap.add_argument("--shapes", default=None, help="K:N comma list instead of the first / all issue shapes")
    ap.add_argument("--sweep", action="store_true",
                    help="time block_m in {256, 128} x token_split x split-K in {1, 2, 3, 4, 6, 8} (split-K up to 6 waves of CTAs)")
    ap.add_argument("--skip-checks", action="store_true")
    ap.add_argument("--max-splits", type=int, default=8, help="largest split-K in --sweep")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--bits", type=int, default=4, choices=km.KERNEL_BITS, help="code width (checks and timing)")
    ap.add_argument("--group-size", type=int, default=128, help="group size of the timed shapes")
    ap.add_argument("--lower", action="store_true")
    ap.add_argument("--plain-runs", type=int, default=0,
                    help="instead of timing, run XLA bf16 and each config this many times (under a profiler)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    cfgs = [parse_config(c) for c in args.configs.split(",")]
    rows_list = [int(r) for r in args.rows.split(",")]
    bits, tgs = args.bits, args.group_size
    if args.lower:
        sd = jax.ShapeDtypeStruct
        for cfg in cfgs:
            for z in (False, True):
                k, n, gs = 5120, 34816, args.group_size
                f = jax.jit(lambda x, w, s, zz, cfg=resolve(cfg, 512, k, n, gs, bits): km.quant_matmul_mosaic(
                    x, w, s, zz, bits=bits, group_size=gs, in_features=k, cfg=cfg))
                f.trace(sd((512, k), jnp.bfloat16), sd((layout.slab_rows(k, bits, gs), n), jnp.uint32),
                        sd((layout.num_groups(k, bits, gs), n), jnp.bfloat16),
                        sd((layout.num_groups(k, bits, gs), n), jnp.uint8) if z else None
                        ).lower(lowering_platforms=("cuda",))
                print("lowered", f"int{bits}", resolve(cfg, 512, k, n, gs, bits).name, "zeros" if z else "sym",
                      flush=True)
        return
    from jax.experimental.mosaic.gpu import profiler

    def median_us(f, *a):
        _, times = profiler.measure(f, iterations=args.reps)(*a)
        return statistics.median(times) * 1e3

    out_rows = []
    key = jax.random.key(0)
    # 1. correctness: small ragged-M cases, zeros / symmetric, group sizes, per-channel
    checks = [(37, 1024, 256, 128, False), (5, 5120, 384, 128, True), (130, 640, 128, 640, False),
              (300, 768, 256, 32, True), (512, 5120, 34816, 128, False), (600, 17408, 5120, 128, True)]
    for (m, k, n, gs, z) in ([] if args.skip_checks else checks):
        x, w, s, zz = make(key, m, k, n, gs, z, bits)
        ref = quant_matmul_reference(x, w, s, zz, bits=bits, group_size=gs, in_features=k)
        for cfg in cfgs[:2]:
            cfg = resolve(cfg, m, k, n, gs, bits)
            t0 = time.time()
            try:
                out = jax.jit(lambda *a, cfg=cfg: km.quant_matmul_mosaic(
                    *a, bits=bits, group_size=gs, in_features=k, cfg=cfg))(x, w, s, zz)
                err = rel(out, ref)
                row = {"case": f"check int{bits} {m}x{k}->{n} g{gs}{' z' if z else ''}", "config": cfg.name,
                       "rel_err": err, "ok": err < 1e-2}
            except Exception as e:  # noqa: BLE001
                traceback.print_exc(limit=-4)
                row = {"case": f"check {m}x{k}->{n} g{gs}", "config": cfg.name,
                       "error": f"{type(e).__name__}: {str(e)[:300]}"}
            row["s"] = time.time() - t0
            print(row, flush=True)
            out_rows.append(row)
    # 2. timing
    shapes = SHAPES if args.all_shapes else SHAPES[:1]
    if args.shapes:
        shapes = [tuple(map(int, t.split(":"))) for t in args.shapes.split(",")]
    for (k, n) in shapes:
        for m in rows_list:
            x, w, s, zz = make(key, m, k, n, tgs, False, bits)
            wb = jax.random.normal(key, (k, n), jnp.bfloat16)
            if args.plain_runs:
                fns = [jax.jit(lambda a, b: a @ b)] + [jax.jit(lambda *a, cfg=resolve(c, m, k, n, tgs, bits): (
                    km.quant_matmul_mosaic(*a, bits=bits, group_size=tgs, in_features=k, cfg=cfg))) for c in cfgs]
                for i, f in enumerate(fns):
                    for _ in range(args.plain_runs):
                        jax.block_until_ready(f(x, wb) if i == 0 else f(x, w, s, zz))
                print("ran", k, n, m, ["XLA bf16"] + [resolve(c, m, k, n, tgs, bits).name for c in cfgs], flush=True)
                continue
            bf16 = median_us(jax.jit(lambda a, b: a @ b), x, wb)
            base = {"k": k, "n": n, "rows": m, "bits": bits, "group_size": tgs}
            out_rows.append({**base, "impl": "XLA bf16", "us": bf16, "x_bf16": 1.0})
            p = median_us(jax.jit(lambda *a: dequantize_then_dot(
                *a, bits=bits, group_size=tgs, in_features=k)), x, w, s, zz)
            out_rows.append({**base, "impl": "pass + bf16 GEMM", "us": p, "x_bf16": p / bf16})
            print(out_rows[-2], out_rows[-1], flush=True)
            cands = [resolve(c, m, k, n, tgs, bits) for c in cfgs]
            if args.sweep:  # block_m x token_split x split-K (the splits that divide the steps)
                cands = [km.MosaicConfig(bm, 64, 3, sp, ts) for bm in (256, 128) for ts in (False, True)
                         for sp in (1, 2, 3, 4, 6, 8)
                         if km.unsupported_reason(m, n, bits=bits, group_size=tgs, in_features=k,
                                                  cfg=km.MosaicConfig(bm, 64, 3, sp, ts)) is None
                         and (sp == 1 or (n // (64 if ts else 128)) * -(-m // bm) * sp <= 6 * 132)
                         and sp <= args.max_splits]
            for cfg in cands:
                try:
                    f = jax.jit(lambda *a, cfg=cfg: km.quant_matmul_mosaic(
                        *a, bits=bits, group_size=tgs, in_features=k, cfg=cfg))
                    us = median_us(f, x, w, s, zz)
                    out_rows.append({**base, "impl": cfg.name, "us": us, "x_bf16": us / bf16})
                except Exception as e:  # noqa: BLE001
                    out_rows.append({**base, "impl": cfg.name, "error": f"{type(e).__name__}: {str(e)[:200]}"})
                print(out_rows[-1], flush=True)
    print_table(out_rows, [("case", "case"), ("k", "K"), ("n", "N"), ("rows", "rows"), ("impl", "impl"),
                           ("config", "config"), ("us", "us"), ("x_bf16", "x bf16"), ("rel_err", "rel err"),
                           ("error", "error")])
    write_json(args.json, {"benchmark": "bench_quant_mosaic", "device": device_info(), "rows": out_rows})


if __name__ == "__main__":
    main()
