"""Does XLA fold the cast of an fp32 matmul result into the GEMM? (bf16 x @ bf16 w, fp32 accumulation)

Times four spellings of the same product (wall time of one jitted call, synchronized, median of warmed
up runs) and checks that their outputs are identical:

* ``x @ w`` (bf16 result),
* ``jnp.dot(x, w, preferred_element_type=f32).astype(bf16)`` (what ``layers.linear`` did before),
* ``lax.dot_general`` with an f32 result, then the cast,
* ``jnp.dot(x, w, preferred_element_type=bf16)`` (what ``layers.linear`` does on a GPU now).

On an H100 (2026-12-06) the f32 spellings were 0.18 ms slower at M=512 and 0.42 ms at M=4096 (K=5120,
N=34816): the fp32 [M, N] result makes a round trip through HBM. Run on a GPU:

    python scripts/bench_gemm_out_dtype.py [--rows 512,4096] [--json out.json]
"""

from __future__ import annotations

import argparse
import re

import jax
import jax.numpy as jnp
import numpy as np

from benchlib import device_info, print_table, time_fn, write_json

F32, BF16 = jnp.float32, jnp.bfloat16
SPELLINGS = {
    "x @ w": lambda x, w: x @ w,
    "dot f32, cast": lambda x, w: jnp.dot(x, w, preferred_element_type=F32).astype(x.dtype),
    "dot_general f32, cast": lambda x, w: jax.lax.dot_general(
        x, w, (((1,), (0,)), ((), ())), preferred_element_type=F32).astype(x.dtype),
    "dot bf16": lambda x, w: jnp.dot(x, w, preferred_element_type=BF16),
}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="512,4096")
    ap.add_argument("--k", type=int, default=5120)
    ap.add_argument("--n", type=int, default=34816)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    w = jax.random.normal(jax.random.key(1), (args.k, args.n), BF16)
    rows = []
    for m in map(int, args.rows.split(",")):
        x = jax.random.normal(jax.random.key(m), (m, args.k), BF16)
        base = None
        for name, fn in SPELLINGS.items():
            jf = jax.jit(fn)
            hlo = jf.lower(x, w).compile().as_text()
            out = np.asarray(jf(x, w), np.float32)
            base = out if base is None else base
            t = time_fn(jf, x, w, warmup=2, reps=args.reps)
            rows.append({"M": m, "K": args.k, "N": args.n, "spelling": name, "us": t["median_s"] * 1e6,
                         "fusions": len(re.findall(r"\bfusion\(", hlo)),
                         "max_abs_diff_vs_first": float(np.abs(out - base).max())})
            print(rows[-1], flush=True)
    info = device_info()
    print(f"\nbf16 GEMM result spellings; {info}")
    print_table(rows, [("M", "M"), ("spelling", "spelling"), ("us", "wall us (median)"),
                       ("fusions", "XLA fusions"), ("max_abs_diff_vs_first", "max |diff| vs x @ w")])
    write_json(args.json, {"device": info, "rows": rows})


if __name__ == "__main__":
    main()
