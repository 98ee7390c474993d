"""Feasibility probe for the prefill regime of the quantized matmul (issue 4: rows >= 512 within 1.25x
of the bf16 GEMM): how close does JAX's own Mosaic GPU mixed-type Hopper kernel
(``jax.experimental.pallas.ops.gpu.hopper_mixed_type_matmul_mgpu``: int8 codes dequantized in
registers as wgmma's A operand, warp-specialized TMA pipeline) come to XLA's bf16 GEMM?

The weight goes in as A, so the product is computed swapped: out^T [N, M] = W^T int8 [N, K] @ x^T
[K, M]. Per-channel int8 with no group scales, i.e. strictly less work than our int4 g128; the
scales would be applied to the output. Times are CUPTI kernel times (``mosaic.gpu.profiler.measure``),
medians of ``--reps``; the error is against the fp32 dot of the same int8 values.

    python scripts/probe_mosaic_mixed.py --json out/probe_mosaic_mixed.json   # H100 / H200
    python scripts/probe_mosaic_mixed.py --lower                              # CPU: lowering only
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys
import types

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(__file__))
from benchlib import device_info, print_table, write_json  # noqa: E402


def configs(hm):
    """Tile (weights x tokens x depth) 128 x {128, 64} x {64, 128}, both warpgroup splits."""
    for tn, tk, wgd in itertools.product((128, 64), (64, 128), hm.MatmulDimension):
        yield hm.TuningConfig(tile_m=128, tile_n=tn, tile_k=tk, max_concurrent_steps=4, epi_tile_n=64,
                              epi_tile_m=64, grid_minor_dim=hm.MatmulDimension.N, grid_tile_width=8,
                              wg_dimension=wgd)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", default="512,4096", help="M (tokens), comma list")
    ap.add_argument("--k", type=int, default=5120)
    ap.add_argument("--n", type=int, default=34816)
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--lower", action="store_true",
                    help="only lower every config for CUDA (works on a CPU; checks shapes and shared memory)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    from jax.experimental.pallas.ops.gpu import hopper_mixed_type_matmul_mgpu as hm

    if args.lower:  # the kernel asks the default device for its SM count, which a CPU lacks;
        # jax's module is patched for this call only (restored below)
        real_backend = hm.backend
        hm.backend = types.SimpleNamespace(
            get_default_device=lambda: types.SimpleNamespace(core_count=132))
        try:
            return _run(args, hm, None)
        finally:
            hm.backend = real_backend
    return _run(args, hm, _median_us(args.reps))


def _median_us(reps):
    from jax.experimental.mosaic.gpu import profiler

    def median_us(f, *a):
        _, times = profiler.measure(f, iterations=reps)(*a)
        return statistics.median(times) * 1e3
    return median_us


def _run(args, hm, median_us):
    """Every config at every row count: lowered only (median_us None) or run, checked and timed."""
    k, n, rows = args.k, args.n, []
    for m in map(int, args.rows.split(",")):
        sd = jax.ShapeDtypeStruct
        if not args.lower:
            x = jax.random.normal(jax.random.key(0), (m, k), jnp.bfloat16)
            w = jax.random.normal(jax.random.key(1), (k, n), jnp.bfloat16)
            wq = jax.random.randint(jax.random.key(2), (n, k), -128, 127, dtype=jnp.int8)
            bf16_us = median_us(jax.jit(lambda x, w: x @ w), x, w)
            rows.append({"rows": m, "impl": "XLA bf16 x @ w", "us": bf16_us, "x_vs_bf16": 1.0})
            ref = jnp.dot(wq.astype(jnp.bfloat16), x.T, preferred_element_type=jnp.float32)
        for cfg in configs(hm):
            name = f"mosaic int8 tile {cfg.tile_m}x{cfg.tile_n}x{cfg.tile_k} wg={cfg.wg_dimension}"
            f = jax.jit(lambda a, b, cfg=cfg: hm.mixed_matmul_kernel(a, b, out_dtype=jnp.bfloat16, config=cfg))
            try:
                if args.lower:
                    f.trace(sd((n, k), jnp.int8), sd((k, m), jnp.bfloat16)).lower(lowering_platforms=("cuda",))
                    rows.append({"rows": m, "impl": name, "lowered": True})
                    continue
                out = f(wq, x.T)
                err = float(jnp.linalg.norm(out.astype(jnp.float32) - ref) / jnp.linalg.norm(ref))
                us = median_us(f, wq, x.T)
                rows.append({"rows": m, "impl": name, "us": us, "x_vs_bf16": us / bf16_us, "err": err})
            except ValueError as e:  # configs whose buffers exceed shared memory, or that do not divide
                rows.append({"rows": m, "impl": name, "skipped": str(e)[:120]})
            print(rows[-1], flush=True)
    print_table(rows, [("rows", "rows"), ("impl", "implementation"), ("us", "us"), ("x_vs_bf16", "x bf16"),
                       ("err", "err"), ("lowered", "lowered"), ("skipped", "skipped")])
    write_json(args.json, {"benchmark": "probe_mosaic_mixed", "device": device_info(), "k": k, "n": n,
                           "rows": rows})
    return rows


if __name__ == "__main__":
    main()
