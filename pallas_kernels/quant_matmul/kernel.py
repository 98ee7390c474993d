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
* ``gemm`` (prefill): a ``[bm, bn]`` output tile per program, the dequantized bf16 weight tile
  ``(code - zero) * scale`` fed to tensor-core dots, fp32 accumulator in registers.

Code to float without an int->float convert instruction (a quarter-rate instruction on the SM):
OR-ing a code ``c < 2**23`` into the mantissa of ``2**23`` (bits ``0x4B000000``) gives the float
``2**23 + c`` exactly, so ``bitcast(c | 0x4B000000) - (2**23 + zero)`` is ``c - zero`` exactly in
one logic op (the AND with the field mask and this OR fuse into one LOP3) and one FADD.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.quant_matmul import layout

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


@dataclasses.dataclass(frozen=True)
class Config:
    """Block configuration of one kernel launch (all static).

    mode: "gemv_dot" | "gemv_fma" | "gemv_fma2" | "gemm".
    bm: activation rows per program (gemv_dot: 16; gemv_fma*: ignored, the real M is used).
    bn: output columns per program (power of 2, >= 16).
    rows: R, word rows per loop step (power of 2 dividing S and, when grouped, the group size:
      then every row block of a step lies inside one scale group).
    splits: programs along K (gemv modes; partial sums added in XLA). Must divide S // rows.
    scale_after_dot: gemv_dot only: dot the exact (code - zero) and scale the [bm, bn] result
      (True), or dequantize fully before the dot (False, as gemm does).
    """

    mode: str
    bm: int
    bn: int
    rows: int
    splits: int = 1
    num_warps: int = 4
    num_stages: int = 3
    scale_after_dot: bool = True


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


# Measured on one H200 (jax 0.11.2, 2026-12-02; NOTES.md has the sweep). Keys: (regime, bits of the
# entry: 4 stands for 2/3/4, 8 for 8); values are Config fields, clamped to the shape by
# `choose_config`. Decode: gemv_dot beat gemv_fma / gemv_fma2 at every point tried; the split count
# is sized so that N / bn * splits >= DECODE_TARGET_PROGRAMS (4 per SM was better than 2 or 16).
_TABLE = {
    ("decode", 4): dict(mode="gemv_dot", bm=16, bn=128, rows=128, num_warps=8, num_stages=3),
    ("decode", 8): dict(mode="gemv_dot", bm=16, bn=128, rows=64, num_warps=4, num_stages=3),
    ("gemm", 4): dict(mode="gemm", bm=128, bn=128, rows=32, num_warps=8, num_stages=2),
    ("gemm", 8): dict(mode="gemm", bm=128, bn=128, rows=32, num_warps=8, num_stages=2),
}
DECODE_TARGET_PROGRAMS = 4 * NUM_SMS


def choose_config(m: int, n: int, *, bits: int, group_size: int, in_features: int,
                  target_programs: int = DECODE_TARGET_PROGRAMS) -> Config:
    """Pick a Config from the table and clamp it to the shape (N, S, group size)."""
    s_rows = layout.slab_rows(in_features, bits, group_size)
    regime = "gemm" if m > DECODE_MAX_ROWS else "decode"
    base = dict(_TABLE[(regime, 4 if bits < 8 else 8)])
    rows = min(base["rows"], max_rows_per_step(s_rows, group_size, in_features))
    if regime == "decode" and rows < base["rows"]:
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
        if n_blocks * d >= target_programs:
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


def _load(ref, idx, mask):
    """ref[idx] with an optional bounds mask (masked-out lanes read 0)."""
    if mask is None:
        return ref[idx]
    return pltriton.load(ref.at[idx], mask=mask, other=0)


def _kernel(x_ref, w_ref, s_ref, *rest, cfg: Config, bits: int, m: int, n: int, k: int,
            s_rows: int, group_size, has_zeros: bool, cdt, out_partial: bool):
    """One program: output tile [bm, bn] (gemm / gemv_dot) or [M, bn] (gemv_fma*) over one K split.

    x_ref [M, K], w_ref uint32 [S, N], s_ref [G, N], z_ref uint8 [G, N] (optional),
    o_ref [M, N] (out dtype) or [splits, M, N] float32 partial sums.
    """
    if has_zeros:
        z_ref, o_ref = rest
    else:
        (o_ref,) = rest
        z_ref = None
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

    def x_cols_mask(j, shape, k0):
        # Only the slab that straddles K needs a column mask (static test).
        if (j + 1) * s_rows <= k:
            return None
        return (k0 + jax.lax.broadcasted_iota(jnp.int32, shape, len(shape) - 1)) < k

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

    def body(c, acc):
        r0 = pl.multiple_of(row_base + c * r, r)
        words = _load(w_ref, (pl.ds(r0, r), cols), col_ok)  # [R, bn] uint32, read once
        for j in live_slabs:
            k0 = j * s_rows + r0
            s, z = group_of(k0)
            f = _decode_codes(words, j * bits, bits, z)
            xt = x_tile(j, k0)
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
    _check_config(cfg, m, n, s_rows, group_size, in_features)
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
        _kernel, cfg=cfg, bits=bits, m=m, n=n, k=k, s_rows=s_rows,
        group_size=None if group_size == in_features else group_size, has_zeros=has_zeros,
        cdt=cdt, out_partial=out_partial,
    )
    name = f"quant_matmul_{cfg.mode}_int{bits}"
    args = (x, packed, scales) + ((zeros,) if has_zeros else ())
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


def _check_config(cfg: Config, m, n, s_rows, group_size, in_features):
    if cfg.mode not in ("gemv_dot", "gemv_fma", "gemv_fma2", "gemm"):
        raise ValueError(f"unknown kernel mode {cfg.mode!r}")
    for name in ("bn", "rows") + (("bm",) if not cfg.mode.startswith("gemv_fma") else ()):
        v = getattr(cfg, name)
        if v < 16 or v & (v - 1):
            raise ValueError(f"config.{name}={v} must be a power of 2 >= 16")
    if cfg.rows > max_rows_per_step(s_rows, group_size, in_features):
        raise ValueError(
            f"config.rows={cfg.rows} must divide S={s_rows} and the group size {group_size}"
        )
    steps = s_rows // cfg.rows
    if cfg.mode == "gemm" and cfg.splits != 1:
        raise ValueError("the gemm mode does not split K")
    if steps % cfg.splits:
        raise ValueError(f"config.splits={cfg.splits} must divide S / rows = {steps}")
    if cfg.mode.startswith("gemv_fma") and m > DECODE_MAX_ROWS:
        raise ValueError(f"{cfg.mode} unrolls over the M={m} rows; use it for M <= {DECODE_MAX_ROWS}")
