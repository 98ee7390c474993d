"""Weight-only quantized matmul at the 27B projection shapes on one GPU: our Pallas kernels
(int4 g128, int8 g32, int8 per-channel) against XLA's bf16 dot and XLA's int8 dequantize+dot
(the anchors of /work/shared/anchors/README.md, re-measured in the same run). "ours" is the
public default dispatch: Pallas kernels, and XLA dequantize-then-bf16-dot from
``api.XLA_DEQUANT_MIN_ROWS`` rows (the config column says which).

    python scripts/bench_quant_matmul.py --json out/bench_quant_matmul.json
    python scripts/bench_quant_matmul.py --quick            # M=1 and 512 at K=5120 -> N=34816
    python scripts/bench_quant_matmul.py --sweep            # block-size variants first
    python scripts/bench_quant_matmul.py --sweep3 --no-bench  # every named kernel.CANDIDATES entry
                                                              # (GPU correctness check + device us)

Timing: every sample runs ``copies`` calls in one jitted function, each on its own copy of the
weights (together more than the L2 cache, so HBM and not the cache is measured; one dispatch, so
host overhead is not), then synchronizes; a call's time is sample / copies, the median of
``--reps`` samples after warm-up. The dispatch and synchronization of a sample still land in that
figure (divided by the 2 to 16 copies), so one more sample runs under ``jax.profiler`` and the
``device us`` column gives the time the GPU was busy per call (all kernels of the call, split-K
reductions included): the kernel time proper. Decode rows report GB/s of weight bytes (packed codes + scales,
or bf16 / int8 weights), prefill rows TFLOP/s (2 M K N).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
import traceback

import jax
import jax.numpy as jnp

from pallas_kernels.quant_matmul import dequantize_then_dot, layout
from pallas_kernels.quant_matmul.api import XLA_DEQUANT_MIN_ROWS, mosaic_preferred
from pallas_kernels.quant_matmul import kernel as qk
from pallas_kernels.quant_matmul import kernel_mosaic as km
from pallas_kernels.quant_matmul.kernel import Config

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from benchlib import device_info, print_table, traced_device_us, write_json  # noqa: E402

SHAPES = [(5120, 34816), (17408, 5120), (5120, 10240), (5120, 17408), (5120, 12288),
          (5120, 6144), (6144, 5120)]
ROWS = [1, 8, 64, 512, 4096]
SCHEMES = {  # name -> (bits, group size or None for per-channel)
    "int4_g128": (4, 128),
    "int8_g32": (8, 32),
    "int8_pc": (8, None),
}
CACHE_BYTES = 240e6  # > 4x the H200's L2 (60 MB): rotate weight copies beyond it


def timed(fn, x, copies, reps):
    """Median and min wall seconds per call of fn(x, *w) over the weight copies (see module docstring),
    and the device time per call from a trace of one more sample (None on a CPU)."""
    f = jax.jit(lambda x, ws: tuple(fn(x, *w) for w in ws))
    jax.block_until_ready(f(x, copies))  # compile + warm-up
    jax.block_until_ready(f(x, copies))
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(f(x, copies))
        samples.append((time.perf_counter() - t0) / len(copies))
    device = traced_device_us(lambda: jax.block_until_ready(f(x, copies)), len(copies))
    return statistics.median(samples), min(samples), device


def n_copies(nbytes):
    return int(min(16, max(2, math.ceil(CACHE_BYTES / nbytes))))


def quant_weights(k, n, scheme, key):
    """Random packed words (all fields random: a benchmark needs no valid padding) + bf16 scales."""
    bits, g = SCHEMES[scheme]
    g = k if g is None else g
    s_rows = layout.slab_rows(k, bits, g)
    ng = layout.num_groups(k, bits, g)
    k1, k2 = jax.random.split(key)
    packed = jax.random.bits(k1, (s_rows, n), jnp.uint32)
    scales = (jax.random.uniform(k2, (ng, n), jnp.float32) * 0.01 + 1e-3).astype(jnp.bfloat16)
    nbytes = packed.size * 4 + scales.size * 2
    return (packed, scales), nbytes, dict(bits=bits, group_size=g, in_features=k)


INTERPRET = False  # --smoke: tiny shapes through the Pallas interpreter (CPU check of this script)


def ours(kw, config=None):
    def f(x, packed, scales):
        if config is None:
            from pallas_kernels.quant_matmul import quant_matmul
            # The public default dispatch (Pallas kernels; XLA dequantize+dot at large M).
            impl = "pallas_interpret" if INTERPRET else None
            return quant_matmul(x, packed, scales, None, implementation=impl, **kw)
        return qk.quant_matmul_pallas(x, packed, scales, None, config=config, interpret=INTERPRET, **kw)
    return f


def xla_bf16(x, w):
    return x @ w


def xla_deq_int8(x, w, s):
    """The anchor's XLA int8 dequantize-then-dot (per-channel scale)."""
    return x @ (w.astype(jnp.bfloat16) * s)


def xla_deq_packed(kw):
    """Our reference path in bf16: XLA dequantizes the packed layout, then a bf16 dot."""
    from pallas_kernels.quant_matmul import dequantize

    def f(x, packed, scales):
        w = dequantize(packed, scales, None, **kw).astype(jnp.bfloat16)
        return jnp.dot(x, w, preferred_element_type=jnp.float32).astype(x.dtype)
    return f


def pallas_deq_packed(kw):
    """The prefill path of quant_matmul on a GPU: the Pallas dequantization pass, then XLA's bf16 dot."""
    def f(x, packed, scales):
        return dequantize_then_dot(x, packed, scales, None, dequant="pallas", **kw)
    return f


def run_case(rows, k, n, m, method, fn, weights, nbytes, reps, config=None):
    x = jax.random.normal(jax.random.key(m), (m, k), jnp.bfloat16)
    copies = [weights] + [jax.tree.map(lambda a: a + 0 if a.dtype != jnp.uint32 else a ^ jnp.uint32(i + 1), weights)
                          for i in range(n_copies(nbytes) - 1)]
    row = dict(K=k, N=n, M=m, method=method, config=_cfg_str(config))
    try:
        t, tmin, device = timed(fn, x, copies, reps)
        row.update(us=t * 1e6, us_min=tmin * 1e6, weight_GBps=nbytes / t / 1e9,
                   TFLOPs=2 * m * k * n / t / 1e12)
        if device:
            # by kernel (JSON only): the Pallas kernel apart from the split-K reduction and the
            # activations' preparation (x_f32), which the device_us column includes
            row.update(device_us=device["busy_us"], kernels=device["kernels"],
                       device_GBps=nbytes / device["busy_us"] / 1e3,
                       device_us_by_kernel={name: round(us, 3) for name, us in device["by_name"].items()})
    except Exception as e:  # a config Triton cannot compile (shared memory, registers) is a result too
        row.update(error=f"{type(e).__name__}: {str(e).splitlines()[0][:160]}")
        traceback.print_exc(limit=1)
    rows.append(row)
    _print_row(row)
    del copies
    return row


def _cfg_str(c):
    if c is None or isinstance(c, str):
        return c
    return (f"{c.mode} bm{c.bm} bn{c.bn} R{c.rows} s{c.splits} w{c.num_warps} st{c.num_stages}"
            + ("" if c.scale_after_dot or c.mode != "gemv_dot" else " prescale")
            + (" fast" if c.fast_decode else "") + (" pf" if c.prefetch else "") + (" T" if c.transposed else "") + (" S" if c.stacked else ""))


def _print_row(r):
    if "error" in r:
        print(f"K={r['K']} N={r['N']} M={r['M']} {r['method']} [{r['config']}]: {r['error']}", flush=True)
    else:
        dev = f" (device {r['device_us']:.1f} us, {r['kernels']:.0f} kernels)" if "device_us" in r else ""
        print(f"K={r['K']} N={r['N']} M={r['M']} {r['method']} [{r['config']}]: {r['us']:.1f} us{dev} "
              f"{r['weight_GBps']:.0f} GB/s {r['TFLOPs']:.1f} TFLOP/s", flush=True)


def sweep_configs(m, scheme, k, n):
    """Block-size variants to try at one shape (explicit configs; splits auto-sized)."""
    bits, g = SCHEMES[scheme]
    kw = dict(bits=bits, group_size=k if g is None else g, in_features=k)
    s_rows = layout.slab_rows(k, bits, kw["group_size"])
    rmax = qk.max_rows_per_step(s_rows, kw["group_size"], k)
    out = []

    def auto_splits(bn, r, target=qk.DECODE_TARGET_PROGRAMS):
        steps = s_rows // r
        nb = -(-n // bn)
        for d in qk._divisors(steps):
            if nb * d >= target:
                return d
        return steps

    if m <= 16:
        variants = [  # (mode, bn, R, warps, stages, extra)
            ("gemv_dot", 128, 128, 4, 3, {}), ("gemv_dot", 128, 64, 4, 3, {}),
            ("gemv_dot", 64, 128, 4, 3, {}), ("gemv_dot", 256, 64, 4, 3, {}),
            ("gemv_dot", 128, 32, 4, 3, {}), ("gemv_dot", 128, 128, 8, 3, {}),
            ("gemv_dot", 128, 64, 4, 4, {}), ("gemv_dot", 128, 64, 4, 3, dict(scale_after_dot=False)),
            ("gemv_dot", 128, 64, 4, 3, dict(target=2 * qk.NUM_SMS)),
            ("gemv_dot", 128, 64, 4, 3, dict(target=16 * qk.NUM_SMS)),
            ("gemv_fma", 128, 32, 4, 3, {}), ("gemv_fma", 256, 32, 4, 3, {}),
            ("gemv_fma", 64, 64, 2, 3, {}),
        ]
        if scheme == "int8_pc" or m > 1:  # fewer: the int4 / int8 g32 sweeps cover the shapes
            variants = variants[:4] + variants[10:11]
        for mode, bn, r, w, st, extra in variants:
            if mode == "gemv_fma" and m > 2:
                continue
            r = min(r, rmax)
            extra = dict(extra)
            target = extra.pop("target", qk.DECODE_TARGET_PROGRAMS)
            out.append(Config(mode, 16, bn, r, splits=auto_splits(bn, r, target), num_warps=w,
                              num_stages=st, **extra))
    else:
        variants = [  # (bm, bn, R, warps, stages)
            (128, 128, 32, 8, 2), (128, 256, 32, 8, 2), (64, 128, 32, 4, 3), (128, 128, 16, 8, 3),
            (128, 128, 64, 8, 2), (256, 128, 32, 8, 2), (128, 128, 32, 4, 2),
        ]
        if scheme != "int4_g128" or m > 512:
            variants = variants[:3]
        for bm, bn, r, w, st in variants:
            out.append(Config("gemm", min(bm, max(16, pl_next_pow2(m))), bn, min(r, rmax),
                              num_warps=w, num_stages=st))
    # drop duplicates after clamping
    seen, uniq = set(), []
    for c in out:
        if c not in seen:
            seen.add(c)
            uniq.append(c)
    return uniq, kw


def _c(mode, bn, r, splits, w=4, st=3):
    return Config(mode, 16, bn, r, splits=splits, num_warps=w, num_stages=st)


# (K, N, M, scheme, Config or "xla_deq"); splits sized for >= ~2-4 programs per SM.
SWEEP2 = [
    (5120, 34816, 1, "int4_g128", _c("gemv_dot", 128, 128, 5, w=8)),  # best of round 1
    (5120, 34816, 1, "int4_g128", _c("gemv_fma2", 128, 32, 2)),
    (5120, 34816, 1, "int4_g128", _c("gemv_fma2", 256, 32, 4)),
    (5120, 34816, 1, "int4_g128", _c("gemv_fma2", 128, 64, 2, w=8)),
    (5120, 34816, 1, "int4_g128", _c("gemv_fma2", 64, 32, 1, w=2)),
    (5120, 34816, 1, "int4_g128", _c("gemv_fma2", 128, 32, 5, st=2)),
    (5120, 34816, 1, "int8_g32", _c("gemv_dot", 256, 32, 4)),  # best of round 1
    (5120, 34816, 1, "int8_g32", _c("gemv_fma2", 128, 32, 2)),
    (5120, 34816, 1, "int8_g32", _c("gemv_fma2", 256, 32, 4, w=8)),
    (5120, 34816, 1, "int8_g32", _c("gemv_fma2", 64, 32, 1, w=2)),
    (5120, 34816, 1, "int8_pc", _c("gemv_fma2", 128, 32, 2)),
    (5120, 34816, 1, "int8_pc", _c("gemv_fma2", 128, 64, 2, w=8)),
    (5120, 34816, 2, "int4_g128", _c("gemv_fma2", 128, 32, 2)),
    (5120, 6144, 1, "int4_g128", _c("gemv_fma2", 128, 32, 10)),
    (17408, 5120, 1, "int4_g128", _c("gemv_fma2", 128, 32, 17)),
    (5120, 34816, 64, "int4_g128", "xla_deq"),
    (5120, 34816, 64, "int8_g32", "xla_deq"),
    (5120, 34816, 4096, "int8_g32", "xla_deq"),
]


# --sweep3: (K, N, M, scheme, what): what = a kernel.CANDIDATES name, "xla_deq" (XLA dequantize +
# bf16 dot of our layout) or "xla_bf16" (the bf16 weight, the baseline of the ratios).
_DEC_NEW = ["dot_r32_w4_st4_fast", "red_r8_bn128_w1", "red_r16_bn128_w1", "row_r8_bn128_w1",
            "row_r8_bn128_w1_pf", "row_r16_bn128_w1_pf", "row_r16_bn128_w1_pf_t16",
            "row_r8_bn256_w1_pf", "row_r8_bn256_w2_pf", "row_r16_bn256_w1"]
_DEC_FEW = ["red_r16_bn128_w1", "row_r8_bn128_w1_pf", "row_r8_bn256_w1_pf"]
_DEC_BASE = {"int4_g128": "dot_r128_w8", "int8_g32": "dot_r64_w4", "int8_pc": "dot_r64_w4"}
_GEMM = ["gemm_128x128_r32_w8", "gemm_128x128_r32_w8_fast", "gemm_128x256_r32_w8_fast",
         "gemm_128x128_r32_w4_st3_fast", "gemm_128x128_r16_w8_st3_fast"]
_SCH = ("int4_g128", "int8_g32", "int8_pc")
SWEEP3 = (  # in priority order (--time-budget skips the tail)
    [(5120, 34816, 1, None, "xla_bf16")]
    + [(5120, 34816, 1, sc, c) for sc in _SCH for c in [_DEC_BASE[sc]] + _DEC_NEW]
    + [(5120, 34816, 512, None, "xla_bf16"), (5120, 34816, 512, "int8_g32", "xla_deq")]
    + [(5120, 34816, 512, "int8_g32", c) for c in _GEMM]
    + [(k, n, 1, None, "xla_bf16") for k, n in ((17408, 5120), (5120, 10240))]
    + [(k, n, 1, sc, c) for k, n in ((17408, 5120), (5120, 10240))
       for sc in _SCH for c in [_DEC_BASE[sc]] + _DEC_FEW]
)


# --sweep4: the prefill regime (M >= 512), where the issue asks for <= 1.25x the bf16 matmul:
# the Triton-lowered gemm variants (dequantized weights as the dot's second operand, through shared
# memory, or transposed: as the first operand, from registers), XLA dequantize + bf16 dot, and a
# plain Pallas bf16 matmul ("pallas_bf16": what the Triton lowering reaches with no decode at all).
_GEMM4 = ["gemm_128x128_r32_w8", "gemm_128x128_r32_w8_fast", "gemm_t_64x128_r16_w4_st4",
          "gemm_t_128x128_r16_w8_st3", "gemm_t_128x128_r32_w8", "gemm_t_256x128_r16_w8_st3"]
SWEEP4 = (
    [(5120, 34816, 512, None, "xla_bf16"), (5120, 34816, 512, None, "pallas_bf16")]
    + [(5120, 34816, 512, sc, c) for sc in ("int4_g128", "int8_g32")
       for c in _GEMM4 + ["xla_deq", "pallas_deq"]]
    + [(5120, 34816, 4096, None, "xla_bf16"), (5120, 34816, 4096, None, "pallas_bf16")]
    + [(5120, 34816, 4096, sc, c) for sc in ("int4_g128", "int8_g32")
       for c in ("xla_deq", "pallas_deq", "gemm_t_128x128_r16_w8_st3", "gemm_t_256x128_r16_w8_st3")]
)


# --sweep-stacked: the stacked gemm (one dot per step) against XLA bf16 and the prefill path.
_GEMM_S = ["gemm_s_128x128_r16_w8_st3", "gemm_s_64x128_r16_w4_st3", "gemm_s_256x128_r16_w8_st3",
           "gemm_s_128x256_r16_w8_st3"]
SWEEP_STACKED = (
    [(5120, 34816, 512, None, "xla_bf16")]
    + [(5120, 34816, 512, sc, c) for sc in ("int4_g128", "int8_g32") for c in _GEMM_S + ["pallas_deq"]]
    + [(5120, 34816, 4096, None, "xla_bf16")]
    + [(5120, 34816, 4096, "int4_g128", c) for c in _GEMM_S[:1] + _GEMM_S[2:3] + ["pallas_deq"]]
)


# --sweep-dequant: the Pallas dequantization pass alone (the prefill path's first half), launch
# settings (word rows per program, columns per program, warps); GB/s counts codes + scales read and
# the bf16 weight written.
DEQUANT_CONFIGS = [(16, 256, 4), (8, 256, 4), (32, 256, 4), (16, 512, 4), (16, 512, 8), (32, 512, 8)]


def run_sweep_dequant(rows, reps):
    k, n = SHAPES[0]
    key = jax.random.key(5)
    for scheme in ("int4_g128", "int8_g32"):
        weights, nbytes, kw = quant_weights(k, n, scheme, key)
        moved = nbytes + k * n * 2
        for r, bn, w in DEQUANT_CONFIGS:
            def fn(x, packed, scales, r=r, bn=bn, w=w):
                return qk.dequantize_pallas(packed, scales, None, rows=r, bn=bn, num_warps=w,
                                            interpret=INTERPRET, **kw)
            row = run_case(rows, k, n, 1, f"dequant_{scheme}", fn, weights, nbytes, reps,
                           f"dequantize_pallas rows{r} bn{bn} w{w}")
            row["dequant_settings"] = dict(rows=r, bn=bn, num_warps=w)
            if row.get("device_us"):
                row["device_GBps"] = moved / row["device_us"] / 1e3
                print(f"    moved {moved / 1e6:.0f} MB: {row['device_GBps']:.0f} GB/s", flush=True)
        del weights
    return rows


# --sweep-m1: the decode candidates closest to the table's at M=1, K=5120 -> N=34816 (for a GPU
# other than the one the table was tuned on).
_M1_FIRST = ("row_r8_bn128_w1_pf_t16_xf_fma", "row_r16_bn128_w1_pf_t16_xf_fma", "row_r8_bn128_w1_pf2_t16_xf_fma",
             "row_r16_bn64_w1_pf_t32_xf_fma", "row_r16_bn128_w1_pf_t16", "row_r16_bn64_w1_pf_t32", "row_r16_bn128_w1_pf_t16_xf",
             "row_r16_bn64_w1_pf_t32_xf", "row_r32_bn64_w1_pf_t32_xf", "row_r8_bn256_w1_pf_xf",
             "row_r8_bn128_w1_pf_t16_xf")
_M1_REST = ("row_r16_bn128_w1_pf_t32", "row_r32_bn128_w1_pf_t16", "row_r16_bn128_w1_pf",
            "row_r8_bn128_w1_pf", "red_r16_bn128_w1", "row_r8_bn256_w1_pf", "row_r16_bn128_w1_pf2_t16",
            "row_r8_bn128_w1_pf2_t16", "row_r8_bn128_w1_pf3_t16")


def sweep_m1_plan(candidates=None):
    """--sweep-m1: XLA bf16, then each candidate (default: _M1_FIRST then _M1_REST) for int4 g128 and
    int8 g32, the first group of candidates for both schemes before the second."""
    groups = (_M1_FIRST, _M1_REST) if candidates is None else (tuple(candidates),)
    unknown = [c for g in groups for c in g if c not in qk.CANDIDATES]
    if unknown:
        raise SystemExit(f"--m1-candidates: not in kernel.CANDIDATES: {', '.join(unknown)}")
    return [(5120, 34816, 1, None, "xla_bf16")] + [
        (5120, 34816, 1, sc, c) for names in groups for sc in ("int4_g128", "int8_g32") for c in names]


# --sweep-prefill: where the prefill path (Pallas dequantization pass + XLA bf16 GEMM) comes within
# 1.25x of the bf16 GEMM, by rows.
SWEEP_PREFILL = [(5120, 34816, m, sc, c) for m in (512, 1024, 2048, 4096)
                 for sc, c in ((None, "xla_bf16"), ("int4_g128", "pallas_deq"), ("int8_g32", "pallas_deq"))]


def pallas_bf16(bm=128, bn=256, bk=64, num_warps=8, num_stages=3):
    """A plain Pallas (Triton lowering) bf16 matmul x [M, K] @ w [K, N], fp32 accumulation: the
    ceiling of what a Triton-lowered prefill kernel reaches before any weight decoding."""
    from jax.experimental import pallas as pl_

    def kernel(x_ref, w_ref, o_ref):
        m0, n0 = pl_.program_id(0) * bm, pl_.program_id(1) * bn
        nk = x_ref.shape[1] // bk

        def body(i, acc):
            k0 = pl_.multiple_of(i * bk, bk)
            return acc + jax.lax.dot(x_ref[pl_.ds(m0, bm), pl_.ds(k0, bk)],
                                     w_ref[pl_.ds(k0, bk), pl_.ds(n0, bn)],
                                     preferred_element_type=jnp.float32)

        acc = jax.lax.fori_loop(0, nk, body, jnp.zeros((bm, bn), jnp.float32))
        o_ref[pl_.ds(m0, bm), pl_.ds(n0, bn)] = acc.astype(o_ref.dtype)

    def fn(x, w):
        m, k = x.shape
        n = w.shape[1]
        if m % bm or n % bn or k % bk:
            raise ValueError(f"pallas_bf16 needs M % {bm}, N % {bn}, K % {bk} == 0")
        return pl_.pallas_call(
            kernel, out_shape=jax.ShapeDtypeStruct((m, n), x.dtype), grid=(m // bm, n // bn),
            interpret=INTERPRET,
            compiler_params=None if INTERPRET else qk._triton_compiler_params(num_warps, num_stages),
        )(x, w)

    return fn


def run_sweep3(rows, reps, budget, t_start, smoke=False, plan=None):
    """Every entry of ``plan`` (default SWEEP3): a GPU correctness check against the fp32 reference
    (rel. error, fresh activations, same weights), then the timing of run_case. Returns the rows."""
    from pallas_kernels.quant_matmul import quant_matmul_reference

    key = jax.random.key(3)
    cache = {}
    plan = SWEEP3 if plan is None else plan
    if smoke:  # tiny shapes, interpreted, a few entries of each kind
        plan = [(256, 512, 1, None, "xla_bf16")] + [
            (256, 512, 1, sc, c) for sc in SCHEMES for c in ("dot_r64_w4", "red_r8_bn128_w1",
                                                              "row_r8_bn128_w1_pf")] + [
            (256, 512, 64, "int8_g32", "gemm_128x128_r32_w8_fast"),
            (256, 512, 64, "int8_g32", "xla_deq"), (256, 512, 64, "int4_g128", "gemm_t_128x128_r32_w8"),
            (256, 512, 64, None, "pallas_bf16")]
    for k, n, m, scheme, what in plan:
        if budget and time.perf_counter() - t_start > budget:
            print(f"time budget reached: skipping {k}x{n} M={m} {scheme} {what}", flush=True)
            continue
        if what in ("xla_bf16", "pallas_bf16"):
            wb = jax.random.normal(key, (k, n), jnp.bfloat16)
            if what == "xla_bf16":
                run_case(rows, k, n, m, "xla_bf16", xla_bf16, (wb,), wb.size * 2, reps)
            else:
                fn, label = pallas_bf16(bm=min(128, pl_next_pow2(m))), "bm128 bn256 bk64 w8 st3"
                try:
                    run_case(rows, k, n, m, "pallas_bf16", fn, (wb,), wb.size * 2, reps, label)
                except Exception as e:  # noqa: BLE001 - reported, the sweep goes on
                    print(f"pallas_bf16 {k}x{n} M={m}: {type(e).__name__}: {str(e)[:160]}", flush=True)
            del wb
            continue
        if (k, n, scheme) not in cache:
            cache.clear()
            weights, nbytes, kw = quant_weights(k, n, scheme, key)
            cache[(k, n, scheme)] = (weights, nbytes, kw, {})
        weights, nbytes, kw, refs = cache[(k, n, scheme)]
        if m not in refs:
            x = jax.random.normal(jax.random.key(100 + m), (m, k), jnp.bfloat16)
            refs[m] = (x, quant_matmul_reference(x, *weights, None, **kw).astype(jnp.float32))
        x, ref = refs[m]
        if what == "xla_deq":
            fn, cfg, label = xla_deq_packed(kw), None, "xla_dequant"
        elif what == "pallas_deq":
            fn, cfg, label = pallas_deq_packed(kw), None, "pallas_dequant + xla bf16 dot"
        else:
            cfg = qk.choose_config(m, n, candidate=what, **kw)
            fn, label = ours(kw, cfg), f"{what}: {_cfg_str(cfg)}"
        try:
            out = jax.jit(fn)(x, *weights).astype(jnp.float32)
            err = float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))
        except Exception as e:  # noqa: BLE001 - a config that does not compile is a result
            err = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
        row = run_case(rows, k, n, m, f"{'xla' if what == 'xla_deq' else 'ours'}_{scheme}",
                       fn, weights, nbytes, reps, label)
        row["rel_err"] = err
        row["err"] = f"{err:.1e}" if isinstance(err, float) else err
        row["candidate"] = what
        if isinstance(err, float) and not err < 1e-2:
            row["error"] = f"WRONG: rel. error {err:.3g}"
        print(f"    rel. error vs fp32 reference: {err}", flush=True)
    cache.clear()
    # ratio to XLA bf16 at the same (K, N, M)
    base = {(r["K"], r["N"], r["M"]): r.get("device_us") or r.get("us")
            for r in rows if r["method"] == "xla_bf16"}
    for r in rows:
        b = base.get((r["K"], r["N"], r["M"]))
        t = r.get("device_us") or r.get("us")
        if b and t:
            r["vs_bf16"] = b / t
    return rows


def pl_next_pow2(v):
    return 1 << (int(v) - 1).bit_length()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="only M=1 and 512 at the first shape")
    ap.add_argument("--sweep", action="store_true", help="block-size sweep at the first shape first")
    ap.add_argument("--sweep2", action="store_true",
                    help="second round: gemv_fma2 decode variants and XLA-dequantize prefill points")
    ap.add_argument("--sweep3", action="store_true",
                    help="round 3: every named kernel.CANDIDATES entry at M=1 (3 shapes, 3 schemes) "
                         "and the int8 g32 M=512 options, each checked against the fp32 reference")
    ap.add_argument("--sweep-stacked", action="store_true",
                    help="the stacked gemm (one dot per step) at M=512 and 4096")
    ap.add_argument("--sweep4", action="store_true",
                    help="round 4: the prefill regime (M = 512, 4096): gemm variants incl. transposed, "
                         "XLA dequantize + dot, a plain Pallas bf16 matmul")
    ap.add_argument("--sweep-dequant", action="store_true",
                    help="the Pallas dequantization pass alone, several launch settings (GB/s moved)")
    ap.add_argument("--sweep-m1", action="store_true",
                    help="the decode candidates nearest the table's, M=1 at the first shape")
    ap.add_argument("--m1-candidates", default=None,
                    help="comma list of kernel.CANDIDATES names for --sweep-m1 (default: its own list)")
    ap.add_argument("--sweep-prefill", action="store_true",
                    help="the prefill path (dequantization pass + bf16 GEMM) against bf16 at M=512..4096")
    ap.add_argument("--dequant-config", default=None,
                    help="rows:bn:warps of the dequantization pass (kernel.DEQUANT_DEFAULTS), or 'best': "
                         "the fastest int4 setting of this run's --sweep-dequant")
    ap.add_argument("--no-bench", action="store_true", help="only the sweep")
    ap.add_argument("--json", default=None)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--time-budget", type=float, default=None,
                    help="stop starting new shapes after this many seconds (results so far kept)")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, interpreted (CPU check)")
    ap.add_argument("--rows", default=None, help="comma list of M instead of 1,8,64,512,4096")
    ap.add_argument("--no-mosaic-switches", action="store_true",
                    help="kernel_mosaic.SCHEDULE_TAIL and SCHEDULE_LOP3 off (no hybrid grid and no fused "
                         "LOP3 in the default prefill config: the defaults before NOTES round 16)")
    ap.add_argument("--byte-perm", action="store_true",
                    help="kernel_mosaic.SCHEDULE_BYTE_PERM on: the byte-select decode of 8-bit codes in the "
                         "default prefill config (NOTES round 17; off until measured)")
    args = ap.parse_args()
    global INTERPRET, SHAPES, ROWS, CACHE_BYTES
    if args.rows:
        ROWS = [int(r) for r in args.rows.split(",")]
    if args.no_mosaic_switches:
        km.SCHEDULE_TAIL = km.SCHEDULE_LOP3 = False
    if args.byte_perm:
        km.SCHEDULE_BYTE_PERM = True
    if args.smoke:
        INTERPRET, SHAPES, ROWS, CACHE_BYTES = True, [(256, 512)], [1, 64], 1
    t_start = time.perf_counter()
    info = device_info()
    print(info, flush=True)
    rows, sweep_rows = [], []
    key = jax.random.key(0)

    if args.sweep:
        k, n = SHAPES[0]
        for m, schemes in [(1, ("int4_g128", "int8_g32", "int8_pc")), (8, ("int4_g128",)),
                           (512, ("int4_g128", "int8_g32")), (4096, ("int4_g128",))]:
            for scheme in schemes:
                weights, nbytes, kw = quant_weights(k, n, scheme, key)
                cfgs, kw = sweep_configs(m, scheme, k, n)
                for cfg in cfgs:
                    run_case(sweep_rows, k, n, m, f"ours_{scheme}", ours(kw, cfg), weights, nbytes,
                             args.reps, cfg)
                if m >= 512:
                    run_case(sweep_rows, k, n, m, f"xla_deq_packed_{scheme}", xla_deq_packed(kw),
                             weights, nbytes, args.reps)
                del weights
        write_json(args.json and args.json.replace(".json", "_sweep.json"),
                   {"device": info, "rows": sweep_rows})

    if args.sweep2:
        for k, n, m, scheme, cfg in SWEEP2:
            weights, nbytes, kw = quant_weights(k, n, scheme, key)
            if cfg == "xla_deq":
                run_case(sweep_rows, k, n, m, f"xla_deq_packed_{scheme}", xla_deq_packed(kw), weights,
                         nbytes, args.reps)
            else:
                run_case(sweep_rows, k, n, m, f"ours_{scheme}", ours(kw, cfg), weights, nbytes,
                         args.reps, cfg)
            del weights
        write_json(args.json and args.json.replace(".json", "_sweep2.json"),
                   {"device": info, "rows": sweep_rows})

    sweep3_rows = []

    def run_plan(plan, suffix, runner=None):
        """One named sweep: its rows appended to sweep3_rows, and written to <json>_<suffix>.json."""
        n0 = len(sweep3_rows)
        if runner is None:
            run_sweep3(sweep3_rows, args.reps, args.time_budget, t_start, smoke=args.smoke, plan=plan)
        else:
            runner()
        write_json(args.json and args.json.replace(".json", f"_{suffix}.json"),
                   {"device": info, "rows": sweep3_rows[n0:]})

    if args.sweep3:
        run_plan(SWEEP3, "sweep3")
    if args.sweep_m1:
        run_plan(sweep_m1_plan(args.m1_candidates and args.m1_candidates.split(",")), "m1")
    if args.sweep_dequant:
        run_plan(None, "dequant", lambda: run_sweep_dequant(sweep3_rows, args.reps))
    if args.dequant_config:
        if args.dequant_config == "best":
            timed_ = [r for r in sweep3_rows if r["method"] == "dequant_int4_g128" and r.get("device_us")]
            if not timed_:
                ap.error("--dequant-config best needs --sweep-dequant timings (a GPU)")
            qk.DEQUANT_DEFAULTS.update(min(timed_, key=lambda r: r["device_us"])["dequant_settings"])
        else:
            r_, bn_, w_ = map(int, args.dequant_config.split(":"))
            qk.DEQUANT_DEFAULTS.update(rows=r_, bn=bn_, num_warps=w_)
        print(f"dequantization pass: {qk.DEQUANT_DEFAULTS}", flush=True)
    if args.sweep_prefill:
        run_plan(SWEEP_PREFILL, "prefill")
    if args.sweep4:
        run_plan(SWEEP4, "sweep4")
    if args.sweep_stacked:
        run_plan(SWEEP_STACKED, "stacked")

    if not args.no_bench:
        shapes = SHAPES[:1] if args.quick else SHAPES
        ms = [1, 512] if args.quick else ROWS
        for k, n in shapes:
            if args.time_budget and time.perf_counter() - t_start > args.time_budget:
                print(f"time budget reached: skipping K={k} N={n} and later shapes", flush=True)
                break
            wb = jax.random.normal(key, (k, n), jnp.bfloat16)
            w8 = jax.random.randint(key, (k, n), -127, 127, jnp.int8)
            s8 = jnp.full((1, n), 0.01, jnp.bfloat16)
            quant = {s: quant_weights(k, n, s, key) for s in SCHEMES}
            for m in ms:
                run_case(rows, k, n, m, "xla_bf16", xla_bf16, (wb,), wb.size * 2, args.reps)
                run_case(rows, k, n, m, "xla_deq_int8", xla_deq_int8, (w8, s8), w8.size + s8.size * 2,
                         args.reps)
                for s, (weights, nbytes, kw) in quant.items():
                    if m >= XLA_DEQUANT_MIN_ROWS[kw["bits"]] and not INTERPRET:
                        cfg = ("Mosaic GPU fused kernel " + km.default_config(m, n, **kw).name
                               if mosaic_preferred(m, n, **kw)
                               else "dequantization pass + XLA bf16 GEMM")
                    else:
                        cfg = qk.choose_config(m, n, **kw)
                    run_case(rows, k, n, m, f"ours_{s}", ours(kw), weights, nbytes, args.reps, cfg)
            del wb, w8, quant
        # speed-up vs XLA bf16 at the same (K, N, M)
        base = {(r["K"], r["N"], r["M"]): r.get("us") for r in rows if r["method"] == "xla_bf16"}
        for r in rows:
            b = base.get((r["K"], r["N"], r["M"]))
            if b and r.get("us"):
                r["vs_bf16"] = b / r["us"]
        write_json(args.json, {"device": info, "rows": rows})

    cols = [("K", "K"), ("N", "N"), ("M", "M"), ("method", "method"), ("config", "config"),
            ("us", "us"), ("weight_GBps", "GB/s (weights)"), ("device_us", "device us"),
            ("device_GBps", "GB/s at device us"), ("TFLOPs", "TFLOP/s"),
            ("vs_bf16", "x vs bf16"), ("error", "error")]
    if sweep3_rows:
        print("\n## sweep3 (x vs bf16: XLA bf16 device us / device us; err: rel. error vs fp32)")
        print_table(sweep3_rows, [("K", "K"), ("N", "N"), ("M", "M"), ("method", "method"),
                                  ("config", "candidate: config"), ("device_us", "device us"),
                                  ("us", "wall us"), ("device_GBps", "GB/s"),
                                  ("vs_bf16", "x vs bf16"), ("err", "err"), ("error", "error")])
    if sweep_rows:
        print("\n## sweep")
        print_table(sweep_rows, cols[:-2] + cols[-1:])
    if rows:
        print("\n## benchmark")
        print_table(rows, cols)
    print(f"total {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
