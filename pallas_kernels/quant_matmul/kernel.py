"""Pallas (Triton lowering) kernels of the weight-only quantized matmul ``x @ dequant(W)``.

Shapes: M rows of activations, K input features, Kp = p * S padded input dim, S packed word rows,
p = 32 // bits codes per uint32 word, N output features, G scale groups (1 for per-channel),
R word rows per loop step, bm x bn output tile.

The packed layout (``layout.py``) is slab-strided: bit field ``j`` of word ``[r, n]`` is the code
of weight row ``j * S + r``. One ``[R, bn]`` tile of words loaded from HBM therefore yields ``p``
contiguous ``[R, bn]`` weight row blocks (one per shift), each multiplied by the contiguous
activation slice ``x[:, j*S + r0 : j*S + r0 + R]``. The weight bytes are read exactly once per
output tile and no register shuffles are needed to line codes up with activations (Marlin does
the same with a permutation inside a tile: Frantar et al., "MARLIN: Mixed-Precision
Auto-Regressive Parallel Inference on Large Language Models", arXiv:2408.11743).

Three loop bodies share the decode of a code tile:

* ``gemv_dot`` (decode, M <= 16): x rows padded (by load masks, not copies) to ``bm = 16``, codes
  minus zero fed to a tensor-core dot in bf16 (exact: ``|code - zero| <= 255``), the group scale
  applied to the ``[bm, bn]`` dot result. Split-K over a second grid axis fills the SMs when N / bn
  is small; fp32 partial sums are added by one small XLA reduction.
* ``gemv_fma`` (decode, M tiny): the same on the vector units (multiply + reduce over the R rows of
  a chunk), no padding of M to 16 rows.
* ``gemv_fma2``: as ``gemv_fma`` but with an ``[R, bn]`` fp32 accumulator reduced once at the end.
* ``gemv_red`` (decode, M tiny): vector FMAs with no per-weight zero/offset subtraction and no
  per-weight scale: each code is decoded by ONE logic op into ``f = 1 + code * u`` (the "field at
  the top of the mantissa" trick below), ``P = sum_r x_r f_r`` is reduced over the R rows of a
  step (in-thread when ``bn >= 128 * num_warps``: Triton's 16-byte-vector layout then puts all R
  rows of a column in one thread), and the offset, zero point and scale are applied once per
  column, slab and step: ``s / u * (P - (1 + z * u) * sum_r x_r)``. About 2.5 lane-instructions
  per int4 weight (0.5 shift, 1 LOP3, 1 FFMA) against ~4.5 for the dot path.
* ``gemm`` (prefill): a ``[bm, bn]`` output tile per program, the dequantized bf16 weight tile
  ``(code - zero) * scale`` fed to tensor-core dots, fp32 accumulator in registers.

Code to float without an int->float convert instruction (a quarter-rate instruction on the SM):
OR-ing a code ``c < 2**23`` into the mantissa of ``2**23`` (bits ``0x4B000000``) gives the float
``2**23 + c`` exactly, so ``bitcast(c | 0x4B000000) - (2**23 + zero)`` is ``c - zero`` exactly in
one logic op (the AND with the field mask and this OR fuse into one LOP3) and one FADD.

The "top of the mantissa" variant (``fast_decode``, and always in ``gemv_red``): a word shifted so
that field ``j`` sits at bits ``[b, b + bits)`` with ``b + bits <= 23``, AND-ed with that field's
mask and OR-ed with ``0x3F800000`` (1.0), is the float ``1 + code * 2**(b - 23)`` exactly. With
``b`` near the top (within ``FIELD_SLACK`` bits of ``23 - bits``) the constant 1 is at most
``2**FIELD_SLACK`` times the code term, so the offset can be removed after a sum (or folded into
one FFMA with the scale, ``f * (s / u) - (1 + z * u) * (s / u)``) at a relative cost of
~2**-24 * 2**FIELD_SLACK * 2**bits / std(code) (~1e-6): no per-weight FADD. Fields whose top
positions are within the slack share one shifted word (int4: two fields per shift).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.quant_matmul import layout
from pallas_kernels.triton_ops import interleave

try:  # the Triton-lowering helpers (masked load/store, compiler params); same module in 0.10-0.12
    from jax.experimental.pallas import triton as pltriton
except ImportError:  # pragma: no cover - a jax without the Triton backend
    pltriton = None


def _triton_compiler_params(num_warps: int, num_stages: int):
    """The Triton compiler-params class moved between jax versions; find whichever exists."""
    cls = getattr(pltriton, "CompilerParams", None) if pltriton is not None else None
    if cls is None:
        cls = getattr(pl, "TritonCompilerParams", None)
    if cls is None:  # pragma: no cover
        raise RuntimeError("this jax has no Pallas Triton CompilerParams")
    return cls(num_warps=num_warps, num_stages=num_stages)


MAGIC = 0x4B000000  # float32 bit pattern of 2**23
MAGIC_F = float(2**23)
DECODE_MAX_ROWS = 16  # M up to this runs the GEMV / skinny-GEMM kernel
MIN_BLOCK_N = 16  # the smallest tensor-core dot width the Triton lowering accepts
NUM_SMS = 132  # H100 SXM / H200: used to size split-K (a heuristic, not a correctness input)
ONE_BITS = 0x3F800000  # float32 bit pattern of 1.0
FIELD_SLACK = 8  # fast decode: a field may sit up to this many bits below the top of the mantissa
RED_MAX_ROWS = 4  # choose_config uses gemv_red only up to this M (it unrolls the rows)
MODES = ("gemv_dot", "gemv_fma", "gemv_fma2", "gemv_red", "gemv_row", "gemm")


@dataclasses.dataclass(frozen=True)
class Config:
    """Block configuration of one kernel launch (all static).

    mode: "gemv_dot" | "gemv_fma" | "gemv_fma2" | "gemv_red" | "gemm".
    bm: activation rows per program (gemv_dot: 16; gemv_fma* / gemv_red: ignored, the real M is
      used).
    bn: output columns per program (power of 2, >= 16).
    rows: R, word rows per loop step (power of 2 dividing S and, when grouped, the group size:
      then every row block of a step lies inside one scale group).
    splits: programs along K (gemv modes; partial sums added in XLA). Must divide S // rows.
    scale_after_dot: gemv_dot only: dot the exact (code - zero) and scale the [bm, bn] result
      (True), or dequantize fully before the dot (False, as gemm does).
    fast_decode: gemm / gemv_dot: decode with the top-of-mantissa trick (module docstring): one
      shift per two int4 fields and, in gemm, ``(code - zero) * scale`` as one FFMA. gemv_red
      always decodes this way.
    transposed: gemm only: compute the transposed tile, decoded weights as the dot's first operand
      (wgmma takes that one from registers; the activations go through shared memory). Always
      decodes as ``fast_decode``.
    stacked: transposed gemm only, bits 2, 4, 8: the p decoded [bn, R] slab tiles of a step are
      interleaved into ONE [bn, p R] operand (``jnp.stack`` pairs, as Triton's join) and multiplied by
      the matching [bm, p R] tile of the activations with their columns reordered once per call
      (``stacked_activations``), so a step is one dot of depth p R instead of p dots of depth R
      (Triton waits for each wgmma before the next when a loop body has several).
    prefetch: gemv_red / gemv_row: load the next step's words before decoding the current ones
      (a register double buffer carried by the loop; Triton does not software-pipeline loads
      that feed no dot, so otherwise a warp's loads and its arithmetic do not overlap). An int
      d >= 1 (gemv_row) keeps d steps in flight (True is 1).
    x_f32: gemv_row only: the activations go to the kernel as float32, zero-padded to the p S
      rows of the packed layout, with their sums per slab and step precomputed by XLA
      (``row_activations``), so the loop loads each activation as an fp32 scalar (no convert, no
      mask on the slab that straddles K) and adds no activation sums (with bn = 128 and one warp,
      each activation serves 4 weights of a thread: the convert and the add were ~0.5 of the ~3.5
      instructions per weight).
    fma_asm: gemv_row only: each product-accumulate as one ``fma.rn.f32`` (inline PTX,
      `_fma`). The device's Triton (inside XLA) does not contract ``a * b + c`` into an FFMA:
      Nsight Compute counted 0 fused and 12.3 M non-fused FP32 instructions in
      ``row_r16_bn128_w1_pf_t16_xf`` at K=5120 -> N=34816 (H100, 2026-12-07), an FMUL and an
      FADD per weight. Interpret mode computes ``a * b + c`` (one rounding more per product).
    """

    mode: str
    bm: int
    bn: int
    rows: int
    splits: int = 1
    num_warps: int = 4
    num_stages: int = 3
    scale_after_dot: bool = True
    fast_decode: bool = False
    prefetch: bool | int = False
    transposed: bool = False
    stacked: bool = False
    x_f32: bool = False
    fma_asm: bool = False


# ---------------------------------------------------------------------------------------------
# Block-size choice


def _pow2_floor(v: int) -> int:
    return 1 << (max(int(v), 1).bit_length() - 1)


def max_rows_per_step(s_rows: int, group_size: int, in_features: int) -> int:
    """Largest power-of-2 R dividing S and (grouped) the group size."""
    r = s_rows & -s_rows  # largest power of 2 dividing S
    if group_size != in_features:
        r = min(r, group_size & -group_size)
    return r


def unsupported_reason(m: int, n: int, *, bits: int, group_size: int, in_features: int):
    """None when the Pallas kernels cover the call, else a short reason (the API then falls back)."""
    if pltriton is None:
        return "this jax has no Pallas Triton backend"
    if bits not in layout.SUPPORTED_BITS:
        return f"bits={bits} not in {layout.SUPPORTED_BITS}"
    if m < 1:
        return f"M={m}: no rows"
    if n < MIN_BLOCK_N:
        return f"N={n} < {MIN_BLOCK_N} (the smallest tensor-core tile)"
    s_rows = layout.slab_rows(in_features, bits, group_size)
    if max_rows_per_step(s_rows, group_size, in_features) < 16:
        return f"group size {group_size} has no power-of-2 divisor >= 16 (dot depth)"
    return None


def _divisors(v: int):
    return [d for d in range(1, v + 1) if v % d == 0]


# Named block configurations: the candidates that `scripts/bench_quant_matmul.py --sweep3` times
# (every one by name), and the entries `_TABLE` picks from. Values are Config fields plus
# "target": the programs per SM that split-K aims at (decode modes; default 4). choose_config
# clamps them to the shape (N, S, group size).
CANDIDATES = {
    # -- decode: the round-1 bests (gemv_dot: tensor-core dot of x padded to 16 rows)
    "dot_r128_w8": dict(mode="gemv_dot", bm=16, bn=128, rows=128, num_warps=8, num_stages=3),
    "dot_r64_w4": dict(mode="gemv_dot", bm=16, bn=128, rows=64, num_warps=4, num_stages=3),
    # gemv_dot with several pipelined steps per program (R=128 s5 at K=5120 int4 is ONE step per
    # program: no overlap of a program's loads with its decode) and the cheaper decode
    "dot_r32_w4_st4_fast": dict(mode="gemv_dot", bm=16, bn=128, rows=32, num_warps=4,
                                num_stages=4, fast_decode=True, target=2),
    # -- decode, vector FMAs with the top-of-mantissa decode (no per-weight FADD / FMUL / MOV).
    # SASS of the loop (pip triton 3.9, sm_90, int4 g128 K=5120): gemv_dot ~5.3-6 instructions
    # per weight; gemv_red (in-thread tree reduction) 3.8-4.2; gemv_row 3.5-4.1. One-warp programs
    # (bn = 128 * c: each thread holds 4c columns and all R rows), 64-170 registers, many
    # programs per SM hide the load latency (Triton does not pipeline loads that feed no dot).
    "red_r8_bn128_w1": dict(mode="gemv_red", bm=16, bn=128, rows=8, num_warps=1, target=8),
    "red_r16_bn128_w1": dict(mode="gemv_red", bm=16, bn=128, rows=16, num_warps=1, target=8),
    "row_r8_bn128_w1": dict(mode="gemv_row", bm=16, bn=128, rows=8, num_warps=1, target=8),
    "row_r8_bn128_w1_pf": dict(mode="gemv_row", bm=16, bn=128, rows=8, num_warps=1,
                               prefetch=True, target=8),
    "row_r16_bn128_w1_pf": dict(mode="gemv_row", bm=16, bn=128, rows=16, num_warps=1,
                                prefetch=True, target=8),
    "row_r16_bn128_w1_pf_t16": dict(mode="gemv_row", bm=16, bn=128, rows=16, num_warps=1,
                                    prefetch=True, target=16),
    "row_r16_bn128_w1_pf_t32": dict(mode="gemv_row", bm=16, bn=128, rows=16, num_warps=1,
                                    prefetch=True, target=32),
    "row_r32_bn128_w1_pf_t16": dict(mode="gemv_row", bm=16, bn=128, rows=32, num_warps=1,
                                    prefetch=True, target=16),
    # two steps in flight per program (the loop carries 2 x R word rows)
    "row_r16_bn128_w1_pf2_t16": dict(mode="gemv_row", bm=16, bn=128, rows=16, num_warps=1,
                                     prefetch=2, target=16),
    "row_r8_bn128_w1_pf2_t16": dict(mode="gemv_row", bm=16, bn=128, rows=8, num_warps=1,
                                    prefetch=2, target=16),
    "row_r8_bn128_w1_pf3_t16": dict(mode="gemv_row", bm=16, bn=128, rows=8, num_warps=1,
                                    prefetch=3, target=16),
    "row_r16_bn64_w1_pf_t32": dict(mode="gemv_row", bm=16, bn=64, rows=16, num_warps=1,
                                   prefetch=True, target=32),
    # x_f32: fp32 zero-padded activations and their step sums from XLA (no convert or add of x in
    # the loop; Config.x_f32)
    "row_r16_bn128_w1_pf_t16_xf": dict(mode="gemv_row", bm=16, bn=128, rows=16, num_warps=1,
                                       prefetch=True, target=16, x_f32=True),
    "row_r16_bn64_w1_pf_t32_xf": dict(mode="gemv_row", bm=16, bn=64, rows=16, num_warps=1,
                                      prefetch=True, target=32, x_f32=True),
    "row_r32_bn64_w1_pf_t32_xf": dict(mode="gemv_row", bm=16, bn=64, rows=32, num_warps=1,
                                      prefetch=True, target=32, x_f32=True),
    "row_r8_bn256_w1_pf_xf": dict(mode="gemv_row", bm=16, bn=256, rows=8, num_warps=1,
                                  prefetch=True, target=8, x_f32=True),
    "row_r8_bn128_w1_pf_t16_xf": dict(mode="gemv_row", bm=16, bn=128, rows=8, num_warps=1,
                                      prefetch=True, target=16, x_f32=True),
    # fma_asm: the products as explicit FFMAs (Config.fma_asm)
    "row_r16_bn128_w1_pf_t16_xf_fma": dict(mode="gemv_row", bm=16, bn=128, rows=16, num_warps=1,
                                           prefetch=True, target=16, x_f32=True, fma_asm=True),
    "row_r8_bn128_w1_pf_t16_xf_fma": dict(mode="gemv_row", bm=16, bn=128, rows=8, num_warps=1,
                                          prefetch=True, target=16, x_f32=True, fma_asm=True),
    "row_r8_bn128_w1_pf2_t16_xf_fma": dict(mode="gemv_row", bm=16, bn=128, rows=8, num_warps=1,
                                           prefetch=2, target=16, x_f32=True, fma_asm=True),
    "row_r16_bn64_w1_pf_t32_xf_fma": dict(mode="gemv_row", bm=16, bn=64, rows=16, num_warps=1,
                                          prefetch=True, target=32, x_f32=True, fma_asm=True),
    # split counts between t8 (4 splits at K=5120: 1,088 programs) and t16 (8: 2,176 programs, 1.37
    # waves of the 1,584 one-warp programs an H100 holds at 168 registers): 5 splits (one wave,
    # 1,360 programs) and 10 (2,720, 1.7 waves)
    "row_r16_bn128_w1_pf_t9_xf": dict(mode="gemv_row", bm=16, bn=128, rows=16, num_warps=1,
                                      prefetch=True, target=9, x_f32=True),
    "row_r16_bn128_w1_pf_t20_xf": dict(mode="gemv_row", bm=16, bn=128, rows=16, num_warps=1,
                                       prefetch=True, target=20, x_f32=True),
    "row_r8_bn256_w1_pf": dict(mode="gemv_row", bm=16, bn=256, rows=8, num_warps=1,
                               prefetch=True, target=8),
    "row_r8_bn256_w2_pf": dict(mode="gemv_row", bm=16, bn=256, rows=8, num_warps=2,
                               prefetch=True, target=4),
    "row_r16_bn256_w1": dict(mode="gemv_row", bm=16, bn=256, rows=16, num_warps=1, target=8),
    # -- prefill (16 < M < XLA_DEQUANT_MIN_ROWS)
    "gemm_128x128_r32_w8": dict(mode="gemm", bm=128, bn=128, rows=32, num_warps=8, num_stages=2),
    "gemm_128x128_r32_w8_fast": dict(mode="gemm", bm=128, bn=128, rows=32, num_warps=8,
                                     num_stages=2, fast_decode=True),
    "gemm_128x256_r32_w8_fast": dict(mode="gemm", bm=128, bn=256, rows=32, num_warps=8,
                                     num_stages=2, fast_decode=True),
    "gemm_128x128_r32_w4_st3_fast": dict(mode="gemm", bm=128, bn=128, rows=32, num_warps=4,
                                         num_stages=3, fast_decode=True),
    "gemm_128x128_r16_w8_st3_fast": dict(mode="gemm", bm=128, bn=128, rows=16, num_warps=8,
                                         num_stages=3, fast_decode=True),
    # transposed (decoded weights as the dot's first operand, wgmma reads it from registers).
    # Offline compile (pip triton 3.6 with the make_ttir passes XLA's pipeline also runs, sm_90,
    # int4 g128 K=5120): no spills; registers / shared memory 157 / 94 KB (64x128 r16 w4 st4: two
    # programs per SM), 125 / 123 KB (128x128 r16 w8 st3), 166 / 158 KB (128x128 r32 w8 st2),
    # 196 / 221 KB (256x128 r16 w8 st3: the decode of a weight tile shared by 256 rows).
    "gemm_t_64x128_r16_w4_st4": dict(mode="gemm", bm=64, bn=128, rows=16, num_warps=4,
                                     num_stages=4, transposed=True),
    "gemm_t_128x128_r16_w8_st3": dict(mode="gemm", bm=128, bn=128, rows=16, num_warps=8,
                                      num_stages=3, transposed=True),
    "gemm_t_128x128_r32_w8": dict(mode="gemm", bm=128, bn=128, rows=32, num_warps=8,
                                  num_stages=2, transposed=True),
    "gemm_t_256x128_r16_w8_st3": dict(mode="gemm", bm=256, bn=128, rows=16, num_warps=8,
                                      num_stages=3, transposed=True),
    # stacked (one dot of depth p R per step; activations reordered once per call). Offline compile
    # (as above, 2026-12-06): Triton keeps the wgmma groups in flight across steps (wait_group 7, the
    # one wait 0 after the loop), which no multi-dot variant got; no spills: 137 registers / 132 KB
    # (128x128 r16 w8 st3), 168 / 96 KB (64x128 r16 w4 st3).
    "gemm_s_128x128_r16_w8_st3": dict(mode="gemm", bm=128, bn=128, rows=16, num_warps=8,
                                      num_stages=3, transposed=True, stacked=True),
    "gemm_s_64x128_r16_w4_st3": dict(mode="gemm", bm=64, bn=128, rows=16, num_warps=4,
                                     num_stages=3, transposed=True, stacked=True),
    "gemm_s_256x128_r16_w8_st3": dict(mode="gemm", bm=256, bn=128, rows=16, num_warps=8,
                                      num_stages=3, transposed=True, stacked=True),
    "gemm_s_128x256_r16_w8_st3": dict(mode="gemm", bm=128, bn=256, rows=16, num_warps=8,
                                      num_stages=3, transposed=True, stacked=True),
}

# Measured on one H200 (jax 0.11.2, 2026-12-02; NOTES.md has the sweeps). Keys: (regime, bits of
# the entry: 4 stands for 2/3/4, 8 for 8, per-channel?); values: CANDIDATES names. Decode:
# gemv_dot beat gemv_fma / gemv_fma2 at every point tried in rounds 1-2; the split count is sized
# so that N / bn * splits >= target * NUM_SMS (4 per SM was better than 2 or 16 for gemv_dot).
# Decode: the round-3 sweep's winner for all three schemes (H200, device time, K=5120 -> N=34816, M=1:
# int4 g128 45.3 us against 76.5 for dot_r128_w8, int8 g32 54.3 against 85.6, int8 per-channel 56.7
# against 61.1; NOTES.md round 3), with its activations as fp32 and their step sums from XLA
# (x_f32; H100, 2026-12-06, two runs: int4 g128 47.2 / 46.9 us against 49.3 / 48.8 without, int8 g32
# 68.4 against 69.6; NOTES.md round 6), and its products as explicit FFMAs (fma_asm; H100,
# 2026-12-07: int4 g128 46.2 -> 42.0 us with R=8, int8 g32 67.7 -> 66.5 with R=16; NOTES.md round 10).
_TABLE = {
    ("decode", 4, False): "row_r8_bn128_w1_pf_t16_xf_fma",
    ("decode", 4, True): "row_r8_bn128_w1_pf_t16_xf_fma",
    ("decode", 8, False): "row_r16_bn128_w1_pf_t16_xf_fma",
    ("decode", 8, True): "row_r16_bn128_w1_pf_t16_xf_fma",
    ("gemm", 4, False): "gemm_128x128_r32_w8",
    ("gemm", 4, True): "gemm_128x128_r32_w8",
    ("gemm", 8, False): "gemm_128x128_r32_w8",
    ("gemm", 8, True): "gemm_128x128_r32_w8",
}
# Decode candidate used where the table's gemv_red / gemv_fma* entry does not apply (M > RED_MAX_ROWS).
_DECODE_FALLBACK = {4: "dot_r128_w8", 8: "dot_r64_w4"}
DEFAULT_TARGET_PER_SM = 4
DECODE_TARGET_PROGRAMS = DEFAULT_TARGET_PER_SM * NUM_SMS


def table_entry(m: int, *, bits: int, group_size: int, in_features: int) -> str:
    """The CANDIDATES name the dispatch table gives for this call."""
    regime = "gemm" if m > DECODE_MAX_ROWS else "decode"
    bclass = 4 if bits < 8 else 8
    name = _TABLE[(regime, bclass, group_size == in_features)]
    if regime == "decode" and CANDIDATES[name]["mode"] != "gemv_dot" and m > RED_MAX_ROWS:
        name = _DECODE_FALLBACK[bclass]
    return name


def choose_config(m: int, n: int, *, bits: int, group_size: int, in_features: int,
                  target_programs: int | None = None, candidate: str | None = None) -> Config:
    """Pick a Config (``candidate``: a CANDIDATES name, else the table's) and clamp it to the
    shape (N, S, group size); size split-K for decode modes."""
    s_rows = layout.slab_rows(in_features, bits, group_size)
    if candidate is None:
        candidate = table_entry(m, bits=bits, group_size=group_size, in_features=in_features)
    base = dict(CANDIDATES[candidate])
    target = base.pop("target", DEFAULT_TARGET_PER_SM) * NUM_SMS
    if target_programs is not None:
        target = target_programs
    regime = "gemm" if base["mode"] == "gemm" else "decode"
    rows = min(base["rows"], max_rows_per_step(s_rows, group_size, in_features))
    if base["mode"] == "gemv_dot" and rows < base["rows"]:
        # Small groups cap R (int8 g32: R = 32): widen the tile to keep the bytes per step
        # (int8 g32 at K=5120, N=34816: bn 256 158 us vs bn 128 167-245 us).
        base["bn"] = min(256, base["bn"] * base["rows"] // rows)
    base["rows"] = rows
    base["bn"] = max(MIN_BLOCK_N, min(base["bn"], _pow2_floor(n)))
    if regime == "gemm":
        base["bm"] = max(16, min(base["bm"], pl.next_power_of_2(m)))
        return Config(**base)
    # Split K until there are enough programs to keep every SM streaming (a column tile of a
    # narrow N alone leaves most SMs idle: N=5120 / bn=128 is 40 programs for 132 SMs).
    steps = s_rows // base["rows"]
    n_blocks = -(-n // base["bn"])
    splits = 1
    for d in _divisors(steps):
        splits = d
        if n_blocks * d >= target:
            break
    base["splits"] = splits
    return Config(**base)


# ---------------------------------------------------------------------------------------------
# Kernel bodies


def _decode_codes(words, shift: int, bits: int, zero_plus_magic):
    """uint32 words [R, bn] -> float32 (code - zero) [R, bn], exact (see module docstring)."""
    mask = jnp.uint32((1 << bits) - 1)
    field = jax.lax.shift_right_logical(words, jnp.uint32(shift)) if shift else words
    f = jax.lax.bitcast_convert_type((field & mask) | jnp.uint32(MAGIC), jnp.float32)
    return f - zero_plus_magic


@functools.lru_cache(maxsize=None)
def _field_plan(bits: int, slack: int | None = None):
    """Top-of-mantissa decode plan: for field j, ``(d, b)``: shift the word left by ``d`` (right by
    ``-d``) to put field j at bits ``[b, b + bits)``, ``23 - bits - slack <= b <= 23 - bits``.
    Fields that fit the window under one ``d`` share one shift; greedy cover, fewest shifts first,
    ``d = 0`` (no shift) preferred (int4, slack 8: fields 3, 4 unshifted, 0-2 and 5-7 one shift
    each; int8: fields 0-1 and 2-3 one shift each)."""
    slack = FIELD_SLACK if slack is None else slack
    p = 32 // bits
    top = 23 - bits
    lo = max(0, top - slack)

    def greedy(first):
        left, plan = set(range(p)), {}
        while left:
            best = None
            for d in ([first] if first is not None and not plan else
                      range(lo - (p - 1) * bits, top + 1)):
                cov = [j for j in left if lo <= j * bits + d <= top]
                key = (len(cov), d)  # most fields, then the highest positions
                if cov and (best is None or key > best[0]):
                    best = (key, d, cov)
            if best is None:  # `first` covers nothing
                return None
            _, d, cov = best
            plan.update({j: (d, j * bits + d) for j in cov})
            left -= set(cov)
        return tuple(plan[j] for j in range(p))

    plans = [pl_ for pl_ in (greedy(0), greedy(None)) if pl_ is not None]
    return min(plans, key=lambda pl_: len({d for d, _ in pl_ if d}))  # fewest real shifts


def _shift(words, d: int):
    if d > 0:
        return jax.lax.shift_left(words, jnp.uint32(d))
    if d < 0:
        return jax.lax.shift_right_logical(words, jnp.uint32(-d))
    return words


def _opaque_u32(v: int):
    """The uint32 constant v as a value the compiler cannot fold (a select on the program id, which
    is never 2**31 - 2 here; the grid size is static in Pallas and would fold): ``(w & MASK) | ONE`` has two immediates, one more than a LOP3 takes, and
    ptxas re-materialises a constant mask with a MOV before every LOP3 (~1 MOV per weight, seen in
    the SASS); a mask held in a register costs nothing per use."""
    return jnp.where(pl.program_id(0) == 2**31 - 2, jnp.uint32(0), jnp.uint32(v))


def _decode_top(shifted, b: int, bits: int, masks=None):
    """Shifted words (field at bits [b, b + bits)) -> float32 ``1 + code * 2**(b - 23)``, exact.
    ``masks``: {b: mask value} from ``_opaque_u32`` (else a constant mask)."""
    mask = masks[b] if masks is not None else jnp.uint32(((1 << bits) - 1) << b)
    return jax.lax.bitcast_convert_type((shifted & mask) | jnp.uint32(ONE_BITS), jnp.float32)


def _fma(a, b, c, asm: bool):
    """a * b + c, float32, c's shape (a, b broadcast to it); ``asm``: one ``fma.rn.f32`` per
    element (inline PTX: the device's Triton does not contract a multiply and an add; Config.fma_asm)."""
    if not asm:
        return a * b + c
    a, b = (jnp.broadcast_to(jnp.asarray(v, jnp.float32), c.shape) for v in (a, b))
    return pltriton.elementwise_inline_asm(
        "fma.rn.f32 $0, $1, $2, $3;", args=[a, b, c], constraints="=f,f,f,f", pack=1,
        result_shape_dtypes=[jax.ShapeDtypeStruct(c.shape, jnp.float32)])[0]


def _load(ref, idx, mask):
    """ref[idx] with an optional bounds mask (masked-out lanes read 0)."""
    if mask is None:
        return ref[idx]
    return pltriton.load(ref.at[idx], mask=mask, other=0)


def _zeros_and_out(rest, has_zeros: bool):
    """(z_ref or None, o_ref) from a kernel's trailing refs: [z_ref,] o_ref."""
    return (rest[0], rest[1]) if has_zeros else (None, rest[0])


def _kernel_x_f32(x_ref, xs_ref, w_ref, s_ref, *rest, **kw):
    """`_kernel` with the activations of ``row_activations``: x_ref float32 [M, p S], xs_ref
    float32 [M, p S / R] (config.x_f32)."""
    _kernel(x_ref, w_ref, s_ref, *rest, xs_ref=xs_ref, **kw)


def row_activations(x, *, bits: int, s_rows: int, rows: int):
    """config.x_f32: (x as float32 zero-padded to [M, p S], the sums of each R-row block of it
    [M, p S / R]); block t holds the activations of rows t R .. t R + R - 1, i.e. of slab
    t // (S / R), word rows (t % (S / R)) R onward."""
    m, k = x.shape
    kp = (32 // bits) * s_rows
    xf = jnp.pad(x.astype(jnp.float32), ((0, 0), (0, kp - k)))
    return xf, xf.reshape(m, kp // rows, rows).sum(axis=-1)


def _kernel(x_ref, w_ref, s_ref, *rest, cfg: Config, bits: int, m: int, n: int, k: int,
            s_rows: int, group_size, has_zeros: bool, cdt, out_partial: bool, interpret: bool = False,
            xs_ref=None):
    """One program: output tile [bm, bn] (gemm / gemv_dot) or [M, bn] (gemv_fma*) over one K split.

    x_ref [M, K] (config.x_f32: float32 [M, p S], and xs_ref [M, p S / R]: `row_activations`),
    w_ref uint32 [S, N], s_ref [G, N], z_ref uint8 [G, N] (optional),
    o_ref [M, N] (out dtype) or [splits, M, N] float32 partial sums.
    """
    z_ref, o_ref = _zeros_and_out(rest, has_zeros)
    p = 32 // bits
    r, bn = cfg.rows, cfg.bn
    per_channel = group_size is None
    if cfg.mode == "gemm":
        i_m, i_n = pl.program_id(0), pl.program_id(1)
        split = 0
        m0 = i_m * cfg.bm
    else:
        i_n, split = pl.program_id(0), pl.program_id(1)
        m0 = 0
    col0 = pl.multiple_of(i_n * bn, bn)
    cols = pl.ds(col0, bn)
    steps = s_rows // r // cfg.splits
    row_base = split * (steps * r)

    ragged_n = n % bn != 0
    col_ok = (col0 + jax.lax.broadcasted_iota(jnp.int32, (1, bn), 1)) < n if ragged_n else None
    # Slabs entirely made of padding rows (k >= K) hold code 0 * scale 0: skip them statically.
    live_slabs = [j for j in range(p) if j * s_rows < k]
    sym_zero = jnp.float32(MAGIC_F + 2 ** (bits - 1))

    def scale_zero(group_row):
        s = _load(s_ref, (pl.ds(group_row, 1), cols), col_ok).astype(jnp.float32)  # [1, bn]
        if z_ref is None:
            return s, sym_zero
        z = _load(z_ref, (pl.ds(group_row, 1), cols), col_ok).astype(jnp.float32) + MAGIC_F
        return s, z

    if per_channel:  # one scale row for the whole K: load it once, outside the loop
        pc_scale, pc_zero = scale_zero(0)

    def group_of(k0):
        if per_channel:
            return pc_scale, pc_zero
        return scale_zero(k0 // group_size)

    def scale_zero_raw(k0):
        """Scale [1, bn] f32 (None for per-channel: applied after the loop) and the zero point
        [1, bn] f32 (None: symmetric)."""
        if per_channel:
            s = None
            if z_ref is None:
                return s, None
            return s, pc_zero - MAGIC_F
        g_row = k0 // group_size
        s = _load(s_ref, (pl.ds(g_row, 1), cols), col_ok).astype(jnp.float32)
        if z_ref is None:
            return s, None
        return s, _load(z_ref, (pl.ds(g_row, 1), cols), col_ok).astype(jnp.float32)

    plan = _field_plan(bits)
    masks = None
    if cfg.mode in ("gemv_red", "gemv_row") or cfg.fast_decode:
        masks = {b: _opaque_u32(((1 << bits) - 1) << b) for _, b in plan}

    def top_terms(j, k0):
        """Fast decode of slab j: (u, offset k = 1 + zero * u, coef = scale / u or 1 / u)."""
        b = plan[j][1]
        u = 2.0 ** (b - 23)
        s, z = scale_zero_raw(k0)
        kk = 1.0 + 2 ** (bits - 1) * u if z is None else 1.0 + z * u
        coef = 1.0 / u if s is None else s * (1.0 / u)
        return u, kk, coef

    def x_cols_mask(j, shape, k0):
        # Only the slab that straddles K needs a column mask (static test).
        if (j + 1) * s_rows <= k:
            return None
        return (k0 + jax.lax.broadcasted_iota(jnp.int32, shape, len(shape) - 1)) < k

    def run_fma_loop(body, prefetched):
        """gemv_red / gemv_row: the step loop (carry: the prefetched words, then one [1, bn] f32
        accumulator per row of x), then the per-channel scale and the store of each row."""
        init = tuple(jnp.zeros((1, bn), jnp.float32) for _ in range(m))
        accs = jax.lax.fori_loop(0, steps, body, tuple(prefetched) + init)[len(prefetched):]
        for i in range(m):
            val = accs[i] * pc_scale if per_channel else accs[i]
            if out_partial:
                _store(o_ref, (split, pl.ds(i, 1), cols), val, col_ok)
            else:
                _store(o_ref, (pl.ds(i, 1), cols), val.astype(o_ref.dtype), col_ok)

    if cfg.mode == "gemv_red":
        # Per step and slab: P = sum_r x_r f_r with f = 1 + code * u (one LOP3 per weight, plus a
        # shift shared by the fields of a plan group), X = sum_r x_r, then per column
        # acc += (s / u) * (P - (1 + z * u) * X) = s * sum_r x_r (code_r - z).
        def load_step(c):
            r0 = pl.multiple_of(row_base + jnp.minimum(c, steps - 1) * r, r)
            return _load(w_ref, (pl.ds(r0, r), cols), col_ok)  # [R, bn] uint32

        def body(c, carry):
            if cfg.prefetch:
                words, accs = carry[0], carry[1:]
                nxt = load_step(c + 1)
            else:
                words, accs = load_step(c), carry
            r0 = pl.multiple_of(row_base + c * r, r)
            accs = list(accs)
            shifted = {}
            for j in live_slabs:
                d, b = plan[j]
                if d not in shifted:
                    shifted[d] = _shift(words, d)
                f = _decode_top(shifted[d], b, bits, masks)  # [R, bn] f32, 1 + code * u
                k0 = j * s_rows + r0
                _, kk, coef = top_terms(j, k0)
                xmask = x_cols_mask(j, (r,), k0)
                for i in range(m):
                    xr = _load(x_ref, (jnp.int32(i), pl.ds(k0, r)), xmask).astype(jnp.float32)
                    part = jnp.sum(xr[:, None] * f, axis=0, keepdims=True)  # [1, bn]
                    xs = jnp.sum(xr)
                    accs[i] = accs[i] + coef * (part - xs * kk)
            return ((nxt,) if cfg.prefetch else ()) + tuple(accs)

        run_fma_loop(body, (load_step(0),) if cfg.prefetch else ())
        return

    if cfg.mode == "gemv_row":
        # gemv_red with the R rows of a step loaded as R separate [1, bn] row vectors and the
        # activation as scalars: every product is one FFMA into a per-slab [1, bn] partial (a
        # chain, not the mul + add tree of an in-thread reduction), X_j a scalar chain.
        depth = int(cfg.prefetch)  # steps whose words are in flight (carried by the loop)
        asm = cfg.fma_asm and not interpret

        def load_rows(c):
            r0 = pl.multiple_of(row_base + jnp.minimum(c, steps - 1) * r, r)
            return tuple(_load(w_ref, (pl.ds(r0 + t, 1), cols), col_ok) for t in range(r))

        def body(c, carry):
            if depth:
                rows_w, accs = carry[:r], carry[depth * r:]
                nxt = carry[r:depth * r] + load_rows(c + depth)
            else:
                rows_w, accs = load_rows(c), carry
            r0 = pl.multiple_of(row_base + c * r, r)
            accs = list(accs)
            parts = {(i, j): None for i in range(m) for j in live_slabs}
            xsums = {(i, j): None for i in range(m) for j in live_slabs}
            for t in range(r):
                words = rows_w[t]  # [1, bn] uint32
                shifted = {}
                for j in live_slabs:
                    d, b = plan[j]
                    if d not in shifted:
                        shifted[d] = _shift(words, d)
                    f = _decode_top(shifted[d], b, bits, masks)  # [1, bn]
                    kt = j * s_rows + r0 + t
                    for i in range(m):
                        if xs_ref is not None:  # fp32, zero-padded: no convert, no mask
                            xv = x_ref[i, kt]
                        elif (j + 1) * s_rows <= k:
                            xv = x_ref[i, kt].astype(jnp.float32)
                        else:  # the slab that straddles K: rows >= K read 0
                            xv = jnp.where(kt < k, x_ref[i, jnp.minimum(kt, k - 1)], 0
                                           ).astype(jnp.float32)
                        key = (i, j)
                        parts[key] = xv * f if parts[key] is None else _fma(xv, f, parts[key], asm)
                        if xs_ref is None:  # else the sum comes precomputed, below
                            xsums[key] = xv if xsums[key] is None else xsums[key] + xv
            for j in live_slabs:
                _, kk, coef = top_terms(j, j * s_rows + r0)
                for i in range(m):
                    if xs_ref is not None:
                        xsums[(i, j)] = xs_ref[i, (j * s_rows + r0) // r]
                    accs[i] = accs[i] + coef * (parts[(i, j)] - xsums[(i, j)] * kk)
            return (nxt if depth else ()) + tuple(accs)

        run_fma_loop(body, sum((load_rows(d) for d in range(depth)), ()))
        return

    if cfg.mode in ("gemv_fma", "gemv_fma2"):
        # gemv_fma reduces each [R, bn] product over R at once (a cross-thread reduction per slab
        # and step); gemv_fma2 keeps an [R, bn] fp32 accumulator per row and reduces it once at
        # the end, so the loop is pure per-lane arithmetic (decode, scale, FMA; no shuffles).
        deferred = cfg.mode == "gemv_fma2"
        acc_shape = (r, bn) if deferred else (1, bn)

        def body(c, accs):
            r0 = pl.multiple_of(row_base + c * r, r)
            words = _load(w_ref, (pl.ds(r0, r), cols), col_ok)  # [R, bn] uint32
            accs = list(accs)
            for j in live_slabs:
                k0 = j * s_rows + r0
                s, z = group_of(k0)
                f = _decode_codes(words, j * bits, bits, z)  # [R, bn] exact (code - zero)
                if deferred and not per_channel:
                    f = f * s
                xmask = x_cols_mask(j, (r,), k0)
                for i in range(m):
                    xr = _load(x_ref, (jnp.int32(i), pl.ds(k0, r)), xmask).astype(jnp.float32)
                    if deferred:
                        accs[i] = accs[i] + xr[:, None] * f
                    else:
                        part = jnp.sum(xr[:, None] * f, axis=0, keepdims=True)  # [1, bn]
                        accs[i] = accs[i] + part * s
            return tuple(accs)

        init = tuple(jnp.zeros(acc_shape, jnp.float32) for _ in range(m))
        accs = jax.lax.fori_loop(0, steps, body, init)
        for i in range(m):
            val = accs[i]
            if deferred:
                val = jnp.sum(val, axis=0, keepdims=True)
                if per_channel:
                    val = val * pc_scale
            if out_partial:
                _store(o_ref, (split, pl.ds(i, 1), cols), val, col_ok)
            else:
                _store(o_ref, (pl.ds(i, 1), cols), val.astype(o_ref.dtype), col_ok)
        return

    bm = cfg.bm
    rows_ok = (m0 + jax.lax.broadcasted_iota(jnp.int32, (bm, 1), 0)) < m if m % bm else None
    scale_after = cfg.mode == "gemv_dot" and cfg.scale_after_dot

    def x_tile(j, k0):
        cmask = x_cols_mask(j, (1, r), k0)
        mask = rows_ok if cmask is None else (cmask if rows_ok is None else rows_ok & cmask)
        return _load(x_ref, (pl.ds(m0, bm), pl.ds(k0, r)), mask).astype(cdt)  # [bm, R]

    def slab_t(words_t, shifted, j, r0):
        """Slab j of a step for the transposed gemms: (code - zero) * scale as one FFMA,
        f * (s / u) - (1 + z u) * (s / u), decoded as in fast_decode; [bn, R] in cdt. `shifted`
        caches the shifted words of the step (fields of one plan group share a shift)."""
        k0 = j * s_rows + r0
        d, b = plan[j]
        if d not in shifted:
            shifted[d] = _shift(words_t, d)
        f = _decode_top(shifted[d], b, bits, masks)  # 1 + code * u, [bn, R]
        _, kk, coef = top_terms(j, k0)
        a_ = coef * pc_scale if per_channel else coef  # s / u, [1, bn]
        a_, kk = a_.T, (kk.T if jnp.ndim(kk) == 2 else kk)  # per column -> per row
        return (f * a_ + (-kk * a_)).astype(cdt)

    def run_transposed(body_fn):
        """The step loop of a transposed gemm (accumulator [bn, bm]) and the store of its tile."""
        acc = jax.lax.fori_loop(0, steps, body_fn, jnp.zeros((bn, bm), jnp.float32)).T
        mask = rows_ok
        if col_ok is not None:
            mask = col_ok if mask is None else mask & col_ok
        _store(o_ref, (pl.ds(m0, bm), cols), acc.astype(o_ref.dtype), mask)

    def step_words_t(c):
        r0 = pl.multiple_of(row_base + c * r, r)
        return r0, _load(w_ref, (pl.ds(r0, r), cols), col_ok).T  # [bn, R] uint32

    if cfg.mode == "gemm" and cfg.stacked:
        # acc^T [bn, bm] += W^T [bn, pR] @ xs^T [pR, bm], column r * p + j of both being weight row
        # j * S + r0 + r (x reordered by the wrapper; its padding columns are zeros).
        def body_s(c, acc):
            r0, words = step_words_t(c)
            shifted = {}
            # slabs of padding rows only: zero weights (x is zero there too)
            tiles = [slab_t(words, shifted, j, r0) if j in live_slabs else jnp.zeros((bn, r), cdt)
                     for j in range(p)]
            w = interleave(tiles).reshape(bn, p * r)  # column r * p + j <- tiles[j][:, r]
            xs = _load(x_ref, (pl.ds(m0, bm), pl.ds(r0 * p, p * r)), rows_ok)  # [bm, pR]
            return acc + jax.lax.dot(w, xs.astype(cdt).T, preferred_element_type=jnp.float32)

        run_transposed(body_s)
        return

    if cfg.mode == "gemm" and cfg.transposed:
        # acc^T [bn, bm] = sum_j deq(W_j)^T [bn, R] @ x_j^T [R, bm]: the decoded weights are the
        # dot's first operand, which Hopper's wgmma reads from registers; the activations are the
        # second, staged in shared memory by the pipelined loads.
        def body_t(c, acc):
            r0, words = step_words_t(c)
            shifted = {}
            for j in live_slabs:
                xt = x_tile(j, j * s_rows + r0)  # [bm, R]
                acc = acc + jax.lax.dot(slab_t(words, shifted, j, r0), xt.T,
                                        preferred_element_type=jnp.float32)
            return acc

        run_transposed(body_t)
        return

    def body(c, acc):
        r0 = pl.multiple_of(row_base + c * r, r)
        words = _load(w_ref, (pl.ds(r0, r), cols), col_ok)  # [R, bn] uint32, read once
        shifted = {}
        for j in live_slabs:
            k0 = j * s_rows + r0
            xt = x_tile(j, k0)
            if cfg.fast_decode:
                d, b = plan[j]
                if d not in shifted:
                    shifted[d] = _shift(words, d)
                f = _decode_top(shifted[d], b, bits, masks)  # 1 + code * u
                u, kk, coef = top_terms(j, k0)
                if scale_after:
                    # (code - zero) * u, exact in bf16 / f16 (<= 8 significant bits)
                    d_ = jax.lax.dot(xt, (f - kk).astype(cdt), preferred_element_type=jnp.float32)
                    acc = acc + d_ * coef
                else:
                    # (code - zero) * scale as one FFMA: f * (s / u) - (1 + z u) * (s / u)
                    a_ = coef * pc_scale if per_channel else coef  # s / u, [1, bn]
                    w = (f * a_ + (-kk * a_)).astype(cdt)
                    acc = acc + jax.lax.dot(xt, w, preferred_element_type=jnp.float32)
                continue
            s, z = group_of(k0)
            f = _decode_codes(words, j * bits, bits, z)
            if scale_after:
                # bf16 holds every |code - zero| <= 256 exactly: the dot sees the exact codes.
                d = jax.lax.dot(xt, f.astype(cdt), preferred_element_type=jnp.float32)
                acc = acc + (d if per_channel else d * s)
            else:
                w = (f * s).astype(cdt)  # one rounding of the exact fp32 weight
                acc = acc + jax.lax.dot(xt, w, preferred_element_type=jnp.float32)
        return acc

    acc = jax.lax.fori_loop(0, steps, body, jnp.zeros((bm, bn), jnp.float32))
    if scale_after and per_channel:
        acc = acc * pc_scale
    mask = rows_ok
    if col_ok is not None:
        mask = col_ok if mask is None else mask & col_ok
    if out_partial:
        _store(o_ref, (split, pl.ds(m0, bm), cols), acc, mask)
    else:
        _store(o_ref, (pl.ds(m0, bm), cols), acc.astype(o_ref.dtype), mask)


def stacked_activations(x, *, bits: int, s_rows: int):
    """x [M, K] -> [M, S * p] with column r * p + j = x[:, j * S + r] (zeros past K): the column
    order of the ``stacked`` gemm's weight operand. One transpose of x per call (M x K x 2 bytes)."""
    p = 32 // bits
    m, k = x.shape
    xp = jnp.pad(x, ((0, 0), (0, p * s_rows - k)))
    return xp.reshape(m, p, s_rows).transpose(0, 2, 1).reshape(m, s_rows * p)


def _store(ref, idx, val, mask):
    if mask is None:
        ref[idx] = val
    else:
        pltriton.store(ref.at[idx], val, mask=mask)


# ---------------------------------------------------------------------------------------------
# Wrapper


def quant_matmul_pallas(x, packed, scales, zeros, *, bits: int, group_size: int, in_features: int,
                        interpret: bool = False, config: Config | None = None):
    """``x [M, K] @ W [K, N] -> [M, N]`` in ``x.dtype`` with W packed as in ``layout.py``.

    Inputs are assumed validated by ``api.quant_matmul``. ``config`` overrides the block choice
    (tests and benchmarks use it).
    """
    m, k = x.shape
    s_rows, n = packed.shape
    if config is None:
        config = choose_config(m, n, bits=bits, group_size=group_size, in_features=in_features)
    cfg = config
    _check_config(cfg, m, n, s_rows, group_size, in_features, bits=bits)
    # Dots in f16 when the activations are f16 (codes and f16 scales are exact there), else bf16.
    cdt = jnp.float16 if x.dtype == jnp.float16 else jnp.bfloat16
    has_zeros = zeros is not None
    n_blocks = -(-n // cfg.bn)
    out_partial = cfg.mode != "gemm" and cfg.splits > 1
    if cfg.mode == "gemm":
        grid = (-(-m // cfg.bm), n_blocks)  # M fastest: concurrent programs share a weight tile in L2
    else:
        grid = (n_blocks, cfg.splits)
    if out_partial:
        out_shape = jax.ShapeDtypeStruct((cfg.splits, m, n), jnp.float32)
    else:
        out_shape = jax.ShapeDtypeStruct((m, n), x.dtype)
    kern = functools.partial(
        _kernel_x_f32 if cfg.x_f32 else _kernel, cfg=cfg, bits=bits, m=m, n=n, k=k, s_rows=s_rows,
        group_size=None if group_size == in_features else group_size, has_zeros=has_zeros,
        cdt=cdt, out_partial=out_partial, interpret=bool(interpret),
    )
    name = f"quant_matmul_{cfg.mode}_int{bits}"
    if cfg.x_f32:
        xin = row_activations(x, bits=bits, s_rows=s_rows, rows=cfg.rows)
    else:
        xin = (stacked_activations(x, bits=bits, s_rows=s_rows) if cfg.stacked else x,)
    args = xin + (packed, scales) + ((zeros,) if has_zeros else ())
    out = pl.pallas_call(
        kern,
        out_shape=out_shape,
        grid=grid,
        interpret=interpret,
        compiler_params=None if interpret else _triton_compiler_params(cfg.num_warps, cfg.num_stages),
        name=name,
    )(*args)
    if out_partial:
        # fp32 partial sums of the K splits: one small fused XLA reduction ([splits, M, N] f32).
        out = out.sum(axis=0).astype(x.dtype)
    return out


def _dequant_kernel(w_ref, s_ref, *rest, bits: int, k: int, s_rows: int, rows: int, bn: int, n: int,
                    group_size, has_zeros: bool):
    """One [R, bn] tile of words -> the p weight row blocks it holds, ``(code - zero) * scale``
    rounded once to the output dtype, stored at rows ``j * S + r0`` (rows >= K are not stored)."""
    z_ref, o_ref = _zeros_and_out(rest, has_zeros)
    p = 32 // bits
    r0 = pl.multiple_of(pl.program_id(0) * rows, rows)
    col0 = pl.multiple_of(pl.program_id(1) * bn, bn)
    cols = pl.ds(col0, bn)
    col_ok = (col0 + jax.lax.broadcasted_iota(jnp.int32, (1, bn), 1)) < n if n % bn else None
    words = _load(w_ref, (pl.ds(r0, rows), cols), col_ok)  # [R, bn] uint32
    plan = _field_plan(bits)
    masks = {b: _opaque_u32(((1 << bits) - 1) << b) for _, b in plan}
    shifted = {}
    for j in range(p):
        if j * s_rows >= k:  # a slab made only of padding rows
            continue
        d, b = plan[j]
        if d not in shifted:
            shifted[d] = _shift(words, d)
        f = _decode_top(shifted[d], b, bits, masks)  # 1 + code * u, exact
        u = 2.0 ** (b - 23)
        g_row = 0 if group_size is None else (j * s_rows + r0) // group_size
        sc = _load(s_ref, (pl.ds(g_row, 1), cols), col_ok).astype(jnp.float32)  # [1, bn]
        if z_ref is None:
            kk = 1.0 + 2 ** (bits - 1) * u
        else:
            kk = 1.0 + _load(z_ref, (pl.ds(g_row, 1), cols), col_ok).astype(jnp.float32) * u
        a_ = sc * (1.0 / u)
        w = (f * a_ + (-kk * a_)).astype(o_ref.dtype)  # (code - zero) * scale, one FFMA
        mask = col_ok
        if (j + 1) * s_rows > k:  # the slab that straddles K: rows >= K are padding
            row_ok = (j * s_rows + r0 + jax.lax.broadcasted_iota(jnp.int32, (rows, 1), 0)) < k
            mask = row_ok if mask is None else row_ok & mask
        _store(o_ref, (pl.ds(j * s_rows + r0, rows), cols), w, mask)


# Launch settings of dequantize_pallas (word rows, columns, warps per program) when not given.
# H100, K=5120 -> N=34816, device us (`bench_quant_matmul.py --sweep-dequant`, 2026-12-06): int4 g128
# rows 8 / 16 / 32 at bn 256, 4 warps: 164 / 169 / 196 (164 us = 2.74 TB/s of codes, scales and
# bf16 weight moved); bn 512: 182-241; int8 g32: 194 / 199 / 234.
DEQUANT_DEFAULTS = dict(rows=8, bn=256, num_warps=4)


def dequantize_pallas(packed, scales, zeros, *, bits: int, group_size: int, in_features: int,
                      dtype=jnp.bfloat16, rows: int | None = None, bn: int | None = None,
                      num_warps: int | None = None, interpret: bool = False):
    """``[K, N]`` weight in ``dtype`` (bf16 / f16) from the packed layout, one memory-bound pass:
    reads the codes and scales once, writes the weight once (the prefill path then runs XLA's bf16
    GEMM on it). Rows are decoded as in ``fast_decode``: relative error ~1e-6 before the rounding to
    ``dtype``, so an element differs from the rounded exact weight by at most one ulp of ``dtype``."""
    rows = DEQUANT_DEFAULTS["rows"] if rows is None else rows
    bn = DEQUANT_DEFAULTS["bn"] if bn is None else bn
    num_warps = DEQUANT_DEFAULTS["num_warps"] if num_warps is None else num_warps
    s_rows, n = packed.shape
    k = in_features
    r = min(rows, max_rows_per_step(s_rows, group_size, in_features))
    bn = max(MIN_BLOCK_N, min(bn, _pow2_floor(n)))
    has_zeros = zeros is not None
    kern = functools.partial(
        _dequant_kernel, bits=bits, k=k, s_rows=s_rows, rows=r, bn=bn, n=n,
        group_size=None if group_size == in_features else group_size, has_zeros=has_zeros,
    )
    args = (packed, scales) + ((zeros,) if has_zeros else ())
    return pl.pallas_call(
        kern,
        out_shape=jax.ShapeDtypeStruct((k, n), dtype),
        grid=(s_rows // r, -(-n // bn)),
        interpret=interpret,
        compiler_params=None if interpret else _triton_compiler_params(num_warps, 1),
        name=f"quant_dequantize_int{bits}",
    )(*args)


def _check_config(cfg: Config, m, n, s_rows, group_size, in_features, bits=None):
    if cfg.mode not in MODES:
        raise ValueError(f"unknown kernel mode {cfg.mode!r}")
    for name in ("bn", "rows") + (("bm",) if cfg.mode in ("gemv_dot", "gemm") else ()):
        v = getattr(cfg, name)
        lo = 8 if (cfg.mode in ("gemv_red", "gemv_row") and name == "rows") else 16  # no dot
        if v < lo or v & (v - 1):
            raise ValueError(f"config.{name}={v} must be a power of 2 >= {lo}")
    if cfg.rows > max_rows_per_step(s_rows, group_size, in_features):
        raise ValueError(
            f"config.rows={cfg.rows} must divide S={s_rows} and the group size {group_size}"
        )
    steps = s_rows // cfg.rows
    if cfg.mode == "gemm" and cfg.splits != 1:
        raise ValueError("the gemm mode does not split K")
    if cfg.transposed and cfg.mode != "gemm":
        raise ValueError(f"config.transposed applies to the gemm mode only, not {cfg.mode!r}")
    if cfg.x_f32 and cfg.mode != "gemv_row":
        raise ValueError(f"config.x_f32 applies to the gemv_row mode only, not {cfg.mode!r}")
    if cfg.fma_asm and cfg.mode != "gemv_row":
        raise ValueError(f"config.fma_asm applies to the gemv_row mode only, not {cfg.mode!r}")
    if cfg.stacked and not (cfg.mode == "gemm" and cfg.transposed):
        raise ValueError("config.stacked needs the transposed gemm (mode='gemm', transposed=True)")
    if cfg.stacked and bits is not None and (32 // bits) & (32 // bits - 1):
        raise ValueError(f"config.stacked needs a power-of-2 number of codes per word (bits 2, 4, 8), not bits={bits}")
    if steps % cfg.splits:
        raise ValueError(f"config.splits={cfg.splits} must divide S / rows = {steps}")
    if cfg.mode in ("gemv_fma", "gemv_fma2", "gemv_red", "gemv_row") and m > DECODE_MAX_ROWS:
        raise ValueError(f"{cfg.mode} unrolls over the M={m} rows; use it for M <= {DECODE_MAX_ROWS}")
