"""Prefill kernel for int4 weights on Hopper, written in Pallas Mosaic GPU (``plgpu``).

Why a second backend: the Triton lowering keeps the decoded weight in shared memory (or pays layout
conversions to get it into wgmma's register operand), and its bf16 ceiling alone is 1.21x cuBLAS at
512 rows (NOTES round 4). Here the decoded weight never touches shared memory: it is built directly
in registers as wgmma's **A operand**, so the product is computed transposed,

    out^T [N, M] = W^T [N, K] @ x^T [K, M]      (weights are wgmma's M, tokens its N)

and stored back transposed, so the caller sees ``out [M, N]``.

**Which codes a thread needs.** In wgmma's register layout for A (``mgpu.WGMMA_LAYOUT``) the thread
with lane ``l`` of warp ``w`` holds rows ``16 w + 8 h + l // 4`` (``h`` in {0, 1}) and, for every
8-column tile ``ct``, the two columns ``8 ct + 2 (l % 4) + e`` (``e`` in {0, 1}) as one bf16x2
register. Rows are output features ``n``; the columns are a reduction order of our choosing,
because the activations are permuted to match once per call (an ``[M, K]`` transpose in XLA,
``permute_activations``). The order chosen: register ``ct = t (p/2) + m`` of the thread with
``q = l % 4`` holds, as element ``e``, the code in bit field ``j = m + e p/2`` of packed word
``[r0 + 4 t + q, n]`` (``p`` codes per word; ``layout.py``'s slab packing puts that code at input
row ``k = j S + r0 + 4 t + q``). So one thread reads whole 32-bit words from shared memory, and
``(word >> bits m) & 0x000F000F`` puts fields ``m`` and ``m + 4`` in the two halves of a register:
OR-ing ``0x43004300`` makes them the bf16 pair ``128 + c`` (exact), one subtraction of
``128 + zero`` gives ``c - zero`` exactly and one multiplication by the scale pair gives the
weight, rounded once to bf16 (with bf16 scales the same rounding as ``dequantize_pallas`` + bf16
GEMM; fp16 / fp32 scales are rounded to bf16 first, a second relative error of at most 2**-9).

**Scales.** A pipeline step reads ``R`` word rows, i.e. ``R`` rows in each of the ``p`` slabs, so
its codes come from ``p`` quantization groups (one per slab). ``pair_scales`` lays the scales out
once per call as ``uint32 [U, p/2, N]``: entry ``[u, m, n]`` packs the bf16 scales of fields
``m`` and ``m + p/2`` for the ``u``-th block of ``min(group, S)`` slab rows, which is exactly the
register pair above. Zero points (if any) travel the same way as ``128 + zero``.

**Kernel structure.** Warp specialized (``plgpu.emit_pipeline_warp_specialized``): one memory
warpgroup streams x, word and scale tiles with TMA into a ``stages``-deep ring; two compute
warpgroups each own 64 output features of the CTA's 128 and all ``block_m`` tokens (an fp32
accumulator of 64 x block_m). Per step each compute warpgroup decodes its A fragment (64 x D,
``D = p R`` reduction rows) and issues one wgmma against the x tile in shared memory.

**8-bit codes** (``p = 4``): the same order and pairs, but ``128 + c`` is not exact in bf16 for
``c >= 128``, so the decode is in fp32: ``(word >> 8 j) & 0xFF | 0x4B000000`` is ``2**23 + c``
exactly, minus ``2**23 + zero`` gives ``c - zero``, times the scale is exact in fp32 (8 x 8
significant bits), and one ``bf16x2`` conversion rounds the pair once: the same weights as the
4-bit path's bf16 arithmetic would give, at about twice the instructions per weight.
``MosaicConfig.byte_perm`` gets the same weights with byte selects and no conversion.

Other widths and shapes this kernel does not cover (``unsupported_reason``) stay on the
dequantize-then-GEMM path.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import operator

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from pallas_kernels.quant_matmul import layout

MAGIC = 0x43004300  # bf16 pair (128, 128); OR-ing a 4-bit code into each mantissa gives 128 + c
MAGIC_F32 = 0x4B000000  # fp32 2**23; OR-ing an 8-bit code into the mantissa gives 2**23 + c (exact)
KERNEL_BITS = (4, 8)
# ``prmt.b32 d, a, b, sel``: byte i of d is byte ``sel >> 4 i & 7`` of ``{b, a}`` (a's bytes 0-3).
PRMT_CODE = 0x7440  # + j: byte j of the word, then b = MAGIC_F32's bytes 0, 0, 3: fp32 2**23 + c
PRMT_UPPER_HALVES = 0x7632  # a's bytes 2, 3 and b's: two fp32 -> a bf16 pair (truncating)


@dataclasses.dataclass(frozen=True)
class MosaicConfig:
    """``block_m`` tokens per CTA (wgmma N, <= 256), ``depth`` reduction rows per pipeline step
    (a multiple of 64: one 128-byte swizzled x row), ``stages`` TMA ring depth, ``splits`` CTAs
    along the reduction (split-K: fp32 partial outputs summed by XLA; for grids that fill few of
    the GPU's SMs; measured slower at every issue shape, NOTES round 11), ``token_split``: the two
    compute warpgroups take ``block_m / 2`` tokens each of the same 64 output features (twice the
    CTAs of the default, where they take 64 features each of all ``block_m`` tokens); ``pingpong``:
    the two compute warpgroups take turns on the tensor cores (a token passed through two shared
    memory barriers: a warpgroup issues its wgmma only after the other issued its own), so one
    warpgroup's wgmma runs while the other decodes its next fragment, instead of both decoding at
    once and then sharing the tensor cores (measured 1.5-4% faster at 256 tokens, not at 176:
    NOTES round 13; ``choose_config`` sets it at 256). ``swizzle_words``: thread ``q`` reads word
    rows ``8 (t // 2) + 2 q + t % 2`` of a step (not ``4 t + q``; the activations are permuted to
    match) from a word tile TMA'd with the 128-byte swizzle, so a warp's word loads hit 32 distinct
    banks instead of 8 (4-way conflicts); needs 8 | R word rows per step (2-4% faster at every
    issue shape, NOTES round 14; ``choose_config`` sets it). ``interleave``: each compute warpgroup
    decodes and issues its step in 16-deep slices (one wgmma each, x TMA'd with the 32-byte swizzle
    so a slice is a whole tile), meant to overlap the decode of slice j + 1 with the wgmma of slice
    j (round 14's profile: a warpgroup spends ~510 of ~930 cycles per step decoding and ~280
    waiting for its own wgmma); correct, but measured 13-44% slower at every issue shape (round
    14), kept for experiments. Not with ``pingpong``. ``tail_splits`` (> 1, or 0 for ``tail_plan``'s
    choice): a hybrid grid where the tiles that fill whole waves of CTAs (one per SM) run as usual
    and the rest, the partial last wave, run as a second launch split-K by ``tail_splits`` (fp32
    partials summed by XLA into the first launch's output in place), so a grid of 2.06 waves takes
    about 2 + 1/tail_splits waves instead of 3 (NOTES round 14). Not with ``splits``. Measured
    10-24% faster at the four issue shapes with a tail (round 15); checked on an H100 (round 16;
    ``SCHEDULE_TAIL``). ``lop3``: each code field is masked and OR-ed with the magic in one ``lop3.b32``
    (inline PTX; LLVM emits an AND and an OR, which ptxas leaves as two LOP3s: round 14's SASS),
    16 of the ~158 instructions per warp and step at 4 bits; the same values. Measured 1-2.5%
    faster at 176 tokens, 0-1% at 256 (round 15); checked on an H100 (round 16; ``SCHEDULE_LOP3``).
    ``stream_k``: the tiles that fill whole waves run as usual and the rest (all of them for a grid
    under one wave) run as a second launch of up to one CTA per SM, the CTAs of each token tile
    taking equal shares of the rest's (feature tile, step) iterations (stream-K: a CTA's share may
    start or end inside a tile). The CTA that holds a tile's first step adds the other CTAs' fp32
    partials of that tile (written to a workspace and signalled with a global semaphore) and
    stores the tile in bf16 (``StreamK`` gives the schedule). Not with ``splits``, ``tail_splits``,
    ``token_split`` or ``interleave``. Correct on an H100 (round 16), but each of its steps takes
    ~1.4x a plain grid step, so it is slower than the plain grid or the hybrid grid at every issue
    shape measured (NOTES round 16): kept for experiments, never chosen by ``choose_config``.
    With every CTA given one whole tile it ran at the plain grid's speed (+2%), so the cost comes
    with shares that cross tiles; the suspect (not measured) is that the CTAs then stand at as
    many K steps at once as there are share offsets into their tiles (K phases), where the plain
    grid's CTAs all read the same x tile together. ``rest_first`` (with ``stream_k``):
    each CTA runs the rest of its share (from its tile's first step) before its head, parking the
    rest's sum in the workspace while the head runs, so at pipeline step ``c`` a CTA stands at K
    step ``c`` or ``c + steps - width`` unless its share lies inside one tile: at 512 rows and
    256 tokens 4 K phases instead of 8 at 6144 -> 5120 and 17408 -> 5120, 2 instead of 4 at
    5120 -> 6144. Prepared in round 16, lowered and simulated on the CPU, not yet run on a GPU.
    ``stream_k_ctas``: the CTAs per token tile of the stream-K launch (0: ``stream_k_plan``'s
    choice, the most up to one per SM); at least the launch's feature tiles, a divisor of their
    iterations (e.g. the feature tiles themselves: every CTA one whole tile). ``byte_perm`` (8-bit
    codes only): each code is moved into the fp32 ``2**23 + c`` by one ``prmt.b32`` (byte select,
    no shift or mask), ``2**23 + zero`` subtracted in fp32 (exact), the pair packed to bf16 by a
    second ``prmt`` taking the upper halves (exact: ``|c - zero| <= 255`` has at most 8
    significant bits) and scaled by one bf16x2 multiplication (one rounding, as before): per pair
    of codes 3 integer, 2 fp32 and 1 bf16x2 instructions, no conversion instruction (the fp32 path:
    shifts and LOP3s, 4 fp32 and one ``cvt.rn.bf16x2.f32``, which the CUDA guide lists at a quarter
    of the integer throughput). The same weights bit for bit (NOTES round 17)."""

    block_m: int = 256
    depth: int = 64
    stages: int = 3
    splits: int = 1
    token_split: bool = False
    pingpong: bool = False
    swizzle_words: bool = False
    interleave: bool = False
    tail_splits: int = 1
    lop3: bool = False
    stream_k: bool = False
    rest_first: bool = False
    stream_k_ctas: int = 0
    byte_perm: bool = False

    @property
    def cta_n(self) -> int:
        """Output features per CTA: 2 x 64 (warpgroups split the features), or 64 (they split
        the tokens and decode the same 64 features)."""
        return 64 if self.token_split else 128

    @property
    def name(self) -> str:
        return (f"mosaic_m{self.block_m}_d{self.depth}_st{self.stages}"
                + (f"_k{self.splits}" if self.splits > 1 else "") + ("_ts" if self.token_split else "")
                + ("_pp" if self.pingpong else "") + ("_sw" if self.swizzle_words else "")
                + ("_il" if self.interleave else "")
                + ({1: "", 0: "_tail"}.get(self.tail_splits, f"_tail{self.tail_splits}"))
                + ("_l3" if self.lop3 else "") + ("_sk" if self.stream_k else "")
                + ("_rf" if self.rest_first else "")
                + (f"_c{self.stream_k_ctas}" if self.stream_k_ctas else "") + ("_bp" if self.byte_perm else ""))


def rows_per_step(bits: int, cfg: MosaicConfig) -> int:
    """``R``: packed word rows per pipeline step (``D / p``)."""
    return cfg.depth // layout.codes_per_word(bits)


def scale_block_rows(in_features: int, bits: int, group_size: int) -> int:
    """Slab rows that share one scale row: ``group_size`` when groups tile a slab, else the slab."""
    s = layout.slab_rows(in_features, bits, group_size)
    if group_size < in_features and s % group_size == 0:
        return group_size
    return s


def unsupported_reason(m: int, n: int, *, bits: int, group_size: int, in_features: int,
                       cfg: MosaicConfig = MosaicConfig()):
    """None if the kernel covers this case, else why not (the caller falls back)."""
    if bits not in KERNEL_BITS:
        return f"bits={bits}: the Mosaic kernel decodes 4-bit and 8-bit codes only"
    if n % cfg.cta_n:
        return f"N={n} is not a multiple of {cfg.cta_n}"
    if cfg.depth % 64 or cfg.block_m % (16 if cfg.token_split else 8) or not 8 <= cfg.block_m <= 256:
        return (f"config {cfg} (depth must be a multiple of 64, block_m a multiple of 8 <= 256, of 16 "
                "with token_split)")
    r = rows_per_step(bits, cfg)
    s = layout.slab_rows(in_features, bits, group_size)
    if cfg.interleave and cfg.pingpong:
        return "interleave and pingpong are exclusive (both schedule the wgmmas of a step)"
    if cfg.swizzle_words and r % 8:
        return f"swizzle_words needs a multiple of 8 word rows per step, not {r}"
    if s % r or scale_block_rows(in_features, bits, group_size) % r:
        return f"slab rows {s} / group size {group_size} not a multiple of {r} word rows per step"
    if (s // r) % cfg.splits:
        return f"splits={cfg.splits} does not divide the {s // r} pipeline steps"
    wm = cfg.block_m // 2 if cfg.token_split else cfg.block_m
    if (cfg.splits > 1 or cfg.tail_splits != 1) and wm % 32:
        return (f"split-K partials are stored in 32-token chunks: {wm} tokens per warpgroup "
                f"(block_m={cfg.block_m}) is not a multiple of 32")
    if cfg.tail_splits != 1 and cfg.splits > 1:
        return "tail_splits and splits are exclusive (split-K for the whole grid or for its last wave)"
    if cfg.tail_splits < 0 or (cfg.tail_splits and (s // r) % cfg.tail_splits):
        return f"tail_splits={cfg.tail_splits} does not divide the {s // r} pipeline steps"
    if cfg.stream_k and (cfg.splits > 1 or cfg.tail_splits != 1 or cfg.token_split or cfg.interleave):
        return "stream_k is exclusive with splits, tail_splits, token_split and interleave"
    if cfg.byte_perm and bits != 8:
        return f"byte_perm selects whole bytes: it decodes 8-bit codes, not bits={bits}"
    if (cfg.rest_first or cfg.stream_k_ctas) and not cfg.stream_k:
        return "rest_first and stream_k_ctas shape the shares of stream_k: they need stream_k=True"
    return None


MAX_TAIL_SPLITS = 16
ANY_STEPS = math.lcm(*range(1, MAX_TAIL_SPLITS + 1))  # a step count every tail split divides


def _whole_waves(m: int, n: int, cfg: MosaicConfig, sms: int):
    """``(n_tiles, m_tiles, whole)``: feature tiles, token tiles, and the feature tiles that fill
    as many full waves of ``sms`` CTAs as fit (a feature tile's token tiles go together)."""
    n_tiles = n // cfg.cta_n
    m_tiles = -(-m // cfg.block_m)
    return n_tiles, m_tiles, (n_tiles * m_tiles) // sms * sms // m_tiles


def tail_plan(m: int, n: int, cfg: MosaicConfig, *, steps: int, sms: int | None = None):
    """``(whole, tail, splits)`` for ``cfg.tail_splits``: feature tiles (of ``cta_n``) computed
    whole in the first launch, feature tiles split-K ``splits`` ways in the second. ``whole``
    fills as many full waves of ``sms`` CTAs as fit (the token tiles of a feature tile go
    together), ``tail`` is the rest (all of it for a grid under one wave). ``tail_splits == 0``
    picks the largest divisor of the ``steps`` (pipeline steps of a tile) up to
    ``MAX_TAIL_SPLITS`` whose tail launch fits one wave. No tail (``(all, 0, 1)``) when the waves
    come out even or the split is 1."""
    sms = sms or num_sms()
    n_tiles, m_tiles, whole = _whole_waves(m, n, cfg, sms)
    tail = n_tiles - whole
    splits = cfg.tail_splits
    if tail and not splits:
        fit = max(1, sms // (tail * m_tiles))
        splits = max(d for d in range(1, min(fit, MAX_TAIL_SPLITS) + 1) if steps % d == 0)
    if not tail or splits <= 1:
        return n_tiles, 0, 1
    return whole, tail, splits


def stream_k_plan(m: int, n: int, cfg: MosaicConfig, *, steps: int, sms: int | None = None):
    """``(whole, rest, ctas)`` for ``cfg.stream_k``: feature tiles (of ``cta_n``) computed whole in
    the first launch (as many full waves of ``sms`` CTAs as fit, as in ``tail_plan``), feature
    tiles left to the stream-K launch, and its CTAs per token tile: the most, up to
    ``sms // m_tiles``, that divide the rest's (feature tile, step) iterations evenly (at least
    one per feature tile, so a CTA's share crosses at most one tile boundary), or
    ``cfg.stream_k_ctas`` (checked against the same rules). ``(all, 0, 0)`` when the waves come
    out even."""
    sms = sms or num_sms()
    n_tiles, m_tiles, whole = _whole_waves(m, n, cfg, sms)
    rest = n_tiles - whole
    if not rest:
        return n_tiles, 0, 0
    per_row = max(1, sms // m_tiles)
    while rest > per_row:  # token tiles that do not divide a wave: at most one feature tile per CTA
        whole, rest = whole + 1, rest - 1
    ctas = max(c for c in range(rest, per_row + 1) if (rest * steps) % c == 0)
    if cfg.stream_k_ctas:
        ctas = cfg.stream_k_ctas
        if ctas < rest or (rest * steps) % ctas or ctas > per_row:
            raise ValueError(f"{cfg.name}: stream_k_ctas={ctas} must be at least the {rest} feature tiles of the "
                             f"stream-K launch, divide their {rest * steps} iterations and fit one CTA per SM "
                             f"({per_row} per token tile)")
    return whole, rest, ctas


@dataclasses.dataclass(frozen=True)
class StreamK:
    """The static plan of one stream-K launch: ``tiles`` feature tiles of ``steps`` pipeline steps
    each, for each of ``m_tiles`` token tiles; per token tile, ``ctas`` CTAs divide the ``I =
    tiles * steps`` (feature tile, step) iterations into equal shares of ``width = I / ctas``:
    CTA ``(g, mi)`` runs ``[g width, (g + 1) width)`` for token tile ``mi``. ``ctas >= tiles``,
    so ``width <= steps`` and a share crosses at most one tile boundary. The CTAs of one ``g``
    (one per token tile) run the same weight steps at the same time, so the weight tile they
    read is fetched from memory once and shared through L2, as in the plain grid.

    A CTA runs its share as two pipelines, each with its own accumulator: the head (the steps
    before its first tile boundary, if the share begins inside a tile), published to the fp32
    workspace and signalled; then the rest, which begins at its tile's first step, so the CTA
    waits for the heads of the CTAs after it that hold the tile's other steps, adds them and
    stores the tile. Earlier versions (NOTES rounds 15-16) zeroed the accumulator at the
    boundary (1.2-1.5x slower per step), or published it from inside one pipeline and
    subtracted it at the end (register spills at 256 tokens; 5-20% slower than this one)."""
    tiles: int
    steps: int
    ctas: int
    m_tiles: int

    def __post_init__(self):
        if (self.tiles * self.steps) % self.ctas or not self.tiles <= self.ctas:
            raise ValueError(f"{self}: ctas must divide the iterations and be at least the tiles")

    @property
    def width(self) -> int:
        return self.tiles * self.steps // self.ctas

    # The schedule below works on Python ints (tests simulate the kernel with them) and on traced
    # int32 scalars (the kernel): operators only.
    def share(self, g):
        """``(lo, hi)``: CTA ``g`` owns iterations ``[lo, hi)`` (of every token tile)."""
        return g * self.width, (g + 1) * self.width

    def at(self, lo, c):
        """``(feature tile, step within the tile)`` of pipeline step ``c``."""
        it = lo + c
        return it // self.steps, it % self.steps

    def head_len(self, lo, hi):
        """The steps of the share before its first tile boundary if it begins inside a tile (the
        head, published as a partial of tile ``lo // steps``), else 0."""
        a = (self.steps - lo % self.steps) % self.steps
        w = hi - lo
        return a - (a > w) * (a - w)

    def semaphore(self, t, mi, wg):
        """The index of the semaphore of feature tile ``t``, token tile ``mi``, warpgroup ``wg``."""
        return (t * self.m_tiles + mi) * 2 + wg

    def others(self, t, g):
        """How many CTAs after ``g`` hold steps of tile ``t`` (their heads: ``g`` adds them)."""
        return (t * self.steps + self.steps - 1) // self.width - g


# The grid model of ``choose_config``: one CTA per SM (~180 KB of shared memory), CTAs of equal
# work, so a grid of C CTAs takes ceil(C / SMs) waves, and a CTA's pipeline step costs about
# ``block_m + STEP_OVERHEAD_ROWS`` token-rows of wgmma time (a per-step cost that does not grow
# with block_m; fit on an H100 over block_m 128/176/192/256 at 17408 -> 5120, NOTES round 13,
# where the model ranks the four block_m of every issue shape at 512 rows as measured).
STEP_OVERHEAD_ROWS = 200
BLOCK_M_CHOICES = (256, 192, 176, 128)
DEFAULT_SMS = 132  # H100 SXM; the GPU's own count is used where jax reports it
# Whether ``cfg=None`` takes ``choose_config`` (measured faster than ``MosaicConfig()`` at the
# N = 5120 / 10240 shapes and equal elsewhere, NOTES round 13) or the fixed ``MosaicConfig()``.
AUTO_CONFIG = True


def num_sms() -> int:
    """Streaming multiprocessors of the default device (``DEFAULT_SMS`` off GPU)."""
    try:
        return int(getattr(jax.devices()[0], "core_count", 0)) or DEFAULT_SMS
    except Exception:  # noqa: BLE001 - no backend
        return DEFAULT_SMS


def grid_ctas(m: int, n: int, cfg: MosaicConfig) -> int:
    """CTAs of the launch for an ``[m, K] x [K, n]`` call."""
    return (n // cfg.cta_n) * -(-m // cfg.block_m) * cfg.splits


# The hybrid grid's second launch, its fp32 partials summed by XLA and the in-place update cost
# 16-22 us beyond the waves they save at the four issue shapes with a tail at 512 rows (15-17 MB
# of partials written and read; H100, NOTES round 15), about 1.2 us per MB: in token-row-steps
# (one costs ~1.55 ns there: 280 us for 5 waves x 80 steps x 456 rows at 5120 -> 34816).
TAIL_ROW_STEPS_PER_MB = 780


def modeled_cost(m: int, n: int, cfg: MosaicConfig, sms: int | None = None,
                 steps: int = ANY_STEPS) -> float:
    """Time of the call under the grid model, in token-row-steps: waves x steps per CTA x
    (block_m + overhead) (split-K divides the steps; the model leaves out split-K's fp32
    partials, which round 11 measured as not paying); with ``tail_splits`` the whole waves, the
    split tail's waves and ``TAIL_ROW_STEPS_PER_MB`` per MB of its partials. ``steps``: pipeline
    steps of a tile (the same for every ``block_m``, so without a tail only the ranking matters).
    ``stream_k`` is not modeled (its cost is not measured yet): an error, not a guess."""
    if cfg.stream_k:
        raise NotImplementedError(f"{cfg.name}: the grid model has no term for stream_k yet")
    sms = sms or num_sms()
    unit = cfg.block_m + STEP_OVERHEAD_ROWS
    m_tiles = -(-m // cfg.block_m)
    if cfg.tail_splits != 1:
        whole, tail, splits = tail_plan(m, n, cfg, steps=steps, sms=sms)
        if tail:
            tail_waves = -(-tail * m_tiles * splits // sms)
            partial_mb = tail * cfg.cta_n * m_tiles * cfg.block_m * splits * 4 / 1e6
            return ((-(-whole * m_tiles // sms) + tail_waves / splits) * unit * steps
                    + TAIL_ROW_STEPS_PER_MB * partial_mb)
    waves = -(-grid_ctas(m, n, cfg) // sms)
    return waves * unit * steps / cfg.splits


def choose_config(m: int, n: int, *, bits: int, group_size: int, in_features: int,
                  sms: int | None = None) -> MosaicConfig:
    """The ``block_m`` of ``BLOCK_M_CHOICES`` the grid model says is fastest for this call
    (ties: the larger tile); every candidate is a supported config (module defaults otherwise).

    At 512 rows, N = 5120 (40 CTA columns) 176 tokens per CTA make 120 CTAs, one wave on 132
    SMs, where 256 give 80 CTAs; at N >= 34816, 256 keeps the decode amortised best."""
    sms = sms or num_sms()
    cands = [c for c in (schedule(b, bits) for b in BLOCK_M_CHOICES)
             if unsupported_reason(m, n, bits=bits, group_size=group_size, in_features=in_features,
                                   cfg=c) is None]
    if not cands:
        return MosaicConfig()
    steps = layout.slab_rows(in_features, bits, group_size) // rows_per_step(bits, cands[0])
    return min(cands, key=lambda c: (modeled_cost(m, n, c, sms, steps=steps), -c.block_m))


# Measured faster on an H100 (NOTES round 15) and checked against the reference there (round 16:
# ``pytest -m gpu -k "tail or l3 or scheduled_switches"``, 18 passed): the hybrid grid
# (``tail_splits=0``: at 512 rows 5120 -> 34816 280 -> 252 us, 17408 170 -> 139, 12288 116 -> 104,
# 10240 117 -> 89) and the fused LOP3 (1-2.5% at 176 tokens, 0-1% at 256). Switches for ablations.
SCHEDULE_TAIL = True
SCHEDULE_LOP3 = True
# The byte-select decode of 8-bit codes (``MosaicConfig.byte_perm``): off until measured on a GPU.
SCHEDULE_BYTE_PERM = False


def schedule(block_m: int, bits: int = 4) -> MosaicConfig:
    """The config ``choose_config`` gives a ``block_m`` (measured on an H100, NOTES rounds 13-15):
    pingpong at 256 tokens (1.5-4% faster at all seven issue shapes; at 176, 0-1.5% slower), the
    swizzled word tile everywhere (2-4% faster at all seven, int4 and int8; depth 64 gives 8 word
    rows per step at 4 bits and 16 at 8, so it always applies); with ``SCHEDULE_LOP3`` the fused
    LOP3, with ``SCHEDULE_TAIL`` the hybrid grid where the partials fit 32-token chunks (not at
    176; the same grid where the waves come out even, and the model prices the tail); not
    ``interleave`` (13-44% slower); for 8-bit codes with ``SCHEDULE_BYTE_PERM`` the byte-select
    decode."""
    return MosaicConfig(block_m=block_m, pingpong=block_m == 256, swizzle_words=True, lop3=SCHEDULE_LOP3,
                        tail_splits=0 if SCHEDULE_TAIL and block_m % 32 == 0 else 1,
                        byte_perm=SCHEDULE_BYTE_PERM and bits == 8)


def default_config(m: int, n: int, *, bits: int, group_size: int, in_features: int) -> MosaicConfig:
    """The config ``quant_matmul_mosaic(cfg=None)`` runs: ``choose_config`` where ``AUTO_CONFIG``,
    else ``MosaicConfig()``."""
    if AUTO_CONFIG:
        return choose_config(m, n, bits=bits, group_size=group_size, in_features=in_features)
    return MosaicConfig()


def available() -> bool:
    """True on a Hopper GPU (sm_90: wgmma) whose jax has Pallas Mosaic GPU."""
    try:
        dev = jax.devices()[0]
        if dev.platform != "gpu" or str(getattr(dev, "compute_capability", "")) != "9.0":
            return False
        from jax.experimental.pallas import mosaic_gpu  # noqa: F401
    except Exception:  # noqa: BLE001 - no GPU backend / an older jax without plgpu
        return False
    return True


def preferred(m: int, n: int, *, bits: int, group_size: int, in_features: int) -> bool:
    """Whether the prefill dispatch (M >= 512 rows) should take this kernel over the
    dequantization pass + XLA bf16 GEMM: where it measured faster on an H100 (NOTES rounds 11, 13).

    4-bit codes: at 512 rows it wins at every issue shape; up to 2,048 rows where N >= 10,240 (a
    grid of at least 80 CTA columns); from 4,096 rows, and at N = 5,120 beyond 512 rows, the pass
    + GEMM path is faster (one CTA per 128 x 256 tile leaves SMs idle or a partial last wave).
    8-bit codes: at 512 rows (5120 -> 34816 332 against 445 us, 17408 -> 5120 200 against 220).
    """
    if unsupported_reason(m, n, bits=bits, group_size=group_size, in_features=in_features):
        return False
    if bits == 8:  # timed at 512 rows only (two shapes, both faster than the pass + GEMM)
        return m <= 512
    return m <= 512 or (m <= 2048 and n >= 10240)


def permute_activations(x, *, bits: int, group_size: int, in_features: int, cfg: MosaicConfig):
    """``x [M, K]`` -> ``x' [Mp, Kp]`` in the reduction order of the A fragments (module doc).

    Rows are zero-padded to a multiple of ``block_m`` and columns to ``Kp``; column
    ``c D + 8 (t p/2 + m) + 2 q + e`` of ``x'`` is column ``(m + e p/2) S + c R + 4 t + q`` of ``x``.
    """
    p = layout.codes_per_word(bits)
    s = layout.slab_rows(in_features, bits, group_size)
    r = rows_per_step(bits, cfg)
    m_rows = x.shape[0]
    mp = -(-m_rows // cfg.block_m) * cfg.block_m
    x = jnp.pad(x, ((0, mp - m_rows), (0, p * s - in_features)))
    if cfg.swizzle_words:  # row 8 t2 + 2 q + t1 of the step, t = 2 t2 + t1
        x7 = x.reshape(mp, 2, p // 2, s // r, r // 8, 4, 2)  # [M, e, m, c, t2, q, t1]
        return x7.transpose(0, 3, 4, 6, 2, 5, 1).reshape(mp, p * s)
    x6 = x.reshape(mp, 2, p // 2, s // r, r // 4, 4)  # [M, e, m, c, t, q]
    return x6.transpose(0, 3, 4, 2, 5, 1).reshape(mp, p * s)


def _pairs_u32(lo, hi):
    """Two bf16 arrays -> uint32 with ``lo`` in the low half (element 0 of a bf16x2 register)."""
    lo = lax.bitcast_convert_type(lo.astype(jnp.bfloat16), jnp.uint16).astype(jnp.uint32)
    hi = lax.bitcast_convert_type(hi.astype(jnp.bfloat16), jnp.uint16).astype(jnp.uint32)
    return lo | (hi << 16)


def pair_scales(scales, zeros, *, bits: int, group_size: int, in_features: int):
    """Scales ``[G, N]`` (+ zeros) -> ``(sc, zb)``, each ``uint32 [U, p/2, N]`` or ``zb`` None.

    ``sc[u, m, n]`` packs the bf16 scales of fields ``m`` and ``m + p/2`` for slab-row block ``u``;
    ``zb`` likewise packs ``128 + zero`` for 4-bit codes (exact in bf16 below 128), the zero itself
    for 8-bit codes (integers up to 255 are exact in bf16; the kernel decodes those in fp32).
    """
    p = layout.codes_per_word(bits)
    s = layout.slab_rows(in_features, bits, group_size)
    gsr = scale_block_rows(in_features, bits, group_size)
    n_groups = scales.shape[0]
    u = np.arange(s // gsr)
    j = np.arange(p)
    g = (j[None, :] * s + u[:, None] * gsr) // group_size  # [U, p]: group of field j in block u
    g = np.minimum(g, n_groups - 1)  # per-channel: one group (group_size == K)
    half = p // 2
    sc = scales[g]  # [U, p, N]
    sc = _pairs_u32(sc[:, :half], sc[:, half:])
    if zeros is None:
        return sc, None
    zb = zeros.astype(jnp.float32)[g] + (128.0 if bits == 4 else 0.0)
    return sc, _pairs_u32(zb[:, :half], zb[:, half:])


@dataclasses.dataclass(frozen=True)
class _Ops:
    """Integer ops for ``word_coords``: MLIR arith builders in the kernel, Python ints in tests."""
    add: object = operator.add
    mul: object = operator.mul
    xor: object = operator.xor
    and_: object = operator.and_
    shl: object = operator.lshift
    shr: object = operator.rshift
    const: object = int


def word_coords(q, t: int, n, *, swizzled: bool, ops: _Ops = _Ops()):
    """Indices into a step's word tile of the word that thread quad-lane ``q`` decodes as its
    ``t``-th word of output feature ``n`` (0..127 within the CTA).

    Plain: tile ``[R, 128]``, row ``4 t + q``. ``swizzled``: tile ``[R/8, 4, 8, 32]`` (8 x 32-word
    tiles) written by TMA with the 128-byte swizzle (16-byte chunk index XOR row % 8), row
    ``8 (t // 2) + 2 q + t % 2``, so the 32 lanes of a warp (8 features x 4 q) read 32 banks."""
    k = ops.const
    if not swizzled:
        return (ops.add(q, k(4 * t)), n)
    row8 = ops.add(ops.mul(q, k(2)), k(t % 2))
    col = ops.xor(ops.and_(n, k(31)), ops.shl(row8, k(2)))
    return (k(t // 2), ops.shr(n, k(5)), row8, col)


def _decode_fragment(w_ref, sc_ref, zb_ref, *, bits: int, depth: int, by_warpgroup: bool = True,
                     swizzled: bool = False, cts: tuple[int, ...] | None = None, lop3: bool = False,
                     byte_perm: bool = False):
    """Inline Mosaic GPU: this warpgroup's A fragment ``bf16 [64, depth]`` (module doc), or with
    ``cts`` only those 8-column tiles of it, ``bf16 [64, 8 len(cts)]`` (a slice of the step).

    ``w_ref`` is the step's ``uint32 [R, 128]`` word tile, ``sc_ref``/``zb_ref`` its
    ``uint32 [1, p/2, 128]`` scale (and ``128 + zero``) pairs; ``zb_ref`` None means symmetric
    codes (zero ``2**(bits - 1)``). Compute warpgroup ``g`` decodes columns ``[64 g, 64 g + 64)``
    (``by_warpgroup``), else both decode columns ``[0, 64)``.
    """
    import jax.experimental.mosaic.gpu as mgpu
    from jax.experimental.mosaic.gpu import utils as mu
    from jax._src.lib.mlir import ir
    from jax._src.lib.mlir.dialects import arith, llvm, memref, vector

    p = layout.codes_per_word(bits)
    half = p // 2
    cts = tuple(range(depth // 8)) if cts is None else tuple(cts)
    needed = {}  # word t -> the fields m decoded from it, in register order
    for ct in cts:
        t, m = divmod(ct, half)
        needed.setdefault(t, []).append(m)

    def body(_ctx, w, sc, *zb):
        i32 = ir.IntegerType.get_signless(32)
        index = ir.IndexType.get()
        bf16x2 = ir.VectorType.get((2,), ir.BF16Type.get())
        c = lambda v: mu.c(v, i32)  # noqa: E731
        tid = mu.thread_idx()
        lane = arith.andi(tid, c(31))
        q = arith.andi(lane, c(3))
        warp = arith.andi(arith.shrui(tid, c(5)), c(3))
        wg = arith.shrui(tid, c(7))
        n0 = arith.addi(arith.muli(warp, c(16)), arith.shrui(lane, c(2)))
        if by_warpgroup:
            n0 = arith.addi(n0, arith.muli(wg, c(64)))
        as_pair = lambda v: mu.bitcast(v, bf16x2)  # noqa: E731
        ix = lambda v: arith.index_cast(index, v)  # noqa: E731
        shape = (64, 8 * len(cts))
        reg_shape = mgpu.WGMMA_LAYOUT.registers_shape(shape)
        regs = np.empty(reg_shape, dtype=object)
        z = 2 ** (bits - 1)  # symmetric codes: 128 + zero in both halves, the magic's own trick
        zb_const = None if zb else as_pair(c(MAGIC | z | z << 16))
        pair_mask = (1 << bits) - 1 | ((1 << bits) - 1) << 16  # fields m and m + p/2 of a word
        f32x2 = ir.VectorType.get((2,), ir.F32Type.get())
        i32x2 = ir.VectorType.get((2,), i32)

        def f32_pair(lo, hi):  # two i32 bit patterns -> vector<2xf32>
            return mu.bitcast(vector.from_elements(i32x2, [lo, hi]), f32x2)

        def widen(pair):  # uint32 bf16 pair -> vector<2xf32> (exact)
            return f32_pair(arith.shli(pair, c(16)), arith.andi(pair, c(-65536)))

        mlir_ops = _Ops(add=arith.addi, mul=arith.muli, xor=arith.xori, and_=arith.andi, shl=arith.shli,
                        shr=arith.shrui, const=c)

        ms = sorted({m for fields in needed.values() for m in fields})

        def load_pairs(ref, n):  # the pairs of fields m (None where this slice needs none)
            return [memref.load(ref, [ix(c(0)), ix(c(m)), n]) if m in ms else None for m in range(half)]

        def field(word, shift, mask, magic):  # (word >> shift) & mask | magic
            if shift:
                word = arith.shrui(word, c(shift))
            if lop3:  # one LOP3 (LUT 0xEA = a & b | c) where LLVM's and + or stay two
                return llvm.inline_asm(i32, [word], f"lop3.b32 $0, $1, {mask:#x}, {magic:#x}, 0xEA;", "=r,r")
            return arith.ori(arith.andi(word, c(mask)), c(magic))

        def prmt(a, b, selector):  # bytes of {b, a} picked by the selector's nibbles (PTX prmt.b32)
            return llvm.inline_asm(i32, [a, b], f"prmt.b32 $0, $1, $2, {selector:#x};", "=r,r,r")

        f32 = ir.F32Type.get()

        def f32_halves(pair):  # uint32 bf16 pair -> its two values as fp32 scalars (exact)
            return [arith.bitcast(f32, v) for v in (arith.shli(pair, c(16)), arith.andi(pair, c(-65536)))]

        def keep(f, vs):  # f over the loaded pairs, None stays None
            return [v if v is None else f(v) for v in vs]

        def f32x2_splat(v):
            return arith.constant(f32x2, ir.DenseElementsAttr.get_splat(f32x2, ir.FloatAttr.get(ir.F32Type.get(), v)))

        for h in range(2):
            n_h = arith.addi(n0, c(8 * h))
            n = ix(n_h)
            if byte_perm:  # fp32 2**23 + c - (2**23 + zero) exact, packed to bf16 exactly, one rounding
                scale = keep(as_pair, load_pairs(sc, n))
                big = arith.constant(f32, ir.FloatAttr.get(f32, float(2 ** 23)))
                zero = (keep(lambda v: [arith.addf(e, big) for e in f32_halves(v)], load_pairs(zb[0], n)) if zb
                        else [[arith.constant(f32, ir.FloatAttr.get(f32, float(2 ** 23 + z)))] * 2] * half)
            elif bits == 8:  # fp32: 2**23 + c - (2**23 + zero) exact, times the scale exact, one rounding
                scale = keep(widen, load_pairs(sc, n))
                zero = (keep(lambda v: arith.addf(widen(v), f32x2_splat(float(2 ** 23))), load_pairs(zb[0], n))
                        if zb else [f32x2_splat(float(2 ** 23 + z))] * half)
            else:  # bf16 pairs: 128 + c - (128 + zero) exact, one rounding in the product
                scale = keep(as_pair, load_pairs(sc, n))
                zero = keep(as_pair, load_pairs(zb[0], n)) if zb else [zb_const] * half
            for t, fields in needed.items():
                coords = word_coords(q, t, n_h, swizzled=swizzled, ops=mlir_ops)
                word = memref.load(w, [ix(v) for v in coords])
                for m in fields:
                    if byte_perm:  # byte j of the word into byte 0 of fp32 2**23
                        codes = [arith.bitcast(f32, prmt(word, c(MAGIC_F32), PRMT_CODE + j)) for j in (m, m + half)]
                        diff = [arith.bitcast(i32, arith.subf(v, z_e)) for v, z_e in zip(codes, zero[m])]
                        val = arith.mulf(as_pair(prmt(diff[0], diff[1], PRMT_UPPER_HALVES)), scale[m])
                    elif bits == 8:
                        codes = [field(word, bits * j, 255, MAGIC_F32) for j in (m, m + half)]
                        prod = arith.mulf(arith.subf(f32_pair(*codes), zero[m]), scale[m])
                        val = arith.truncf(bf16x2, prod)
                    else:
                        v = field(word, bits * m, pair_mask, MAGIC)
                        val = arith.mulf(arith.subf(as_pair(v), zero[m]), scale[m])
                    idx = [0] * len(reg_shape)
                    idx[1] = cts.index(t * half + m)
                    idx[4] = h
                    regs[tuple(idx)] = val
        assert all(r is not None for r in regs.flat), "fragment register left unset"
        return mgpu.FragmentedArray(_registers=regs, _layout=mgpu.WGMMA_LAYOUT, _is_signed=None)

    from jax.experimental.pallas import mosaic_gpu as plgpu

    refs = (w_ref, sc_ref) + ((zb_ref,) if zb_ref is not None else ())
    fn = plgpu.inline_mgpu(
        arg_types=(plgpu.RefType(WORD_TRANSFORMS() if swizzled else ()),)
        + tuple(plgpu.RefType() for _ in refs[1:]),
        return_type=plgpu.ShapeDtypeStruct((64, 8 * len(cts)), jnp.bfloat16, plgpu.Layout.WGMMA),
    )(body)
    return fn(*refs)


def WORD_TRANSFORMS():  # noqa: N802 - a constant that needs plgpu imported
    """Shared-memory transforms of the word tile with ``swizzle_words``: 8 x 32-word (128-byte)
    tiles, 128-byte swizzle (16-byte chunk index XOR row % 8, which ``_decode_fragment`` undoes)."""
    from jax.experimental.pallas import mosaic_gpu as plgpu
    return (plgpu.TilingTransform((8, 32)), plgpu.SwizzleTransform(128))


def _check_layout_assumptions():
    """The register indexing in ``_decode_fragment`` assumes this WGMMA layout tiling."""
    import jax.experimental.mosaic.gpu as mgpu
    got = mgpu.WGMMA_LAYOUT.registers_shape((64, 64))
    if got != (1, 8, 1, 1, 2, 1, 1, 1, 1):
        raise NotImplementedError(f"unexpected WGMMA register layout {got} in this jax version")


def quant_matmul_mosaic(x, packed, scales, zeros, *, bits: int, group_size: int, in_features: int,
                        cfg: MosaicConfig | None = None, out_dtype=None):
    """``x [M, K] (bf16) @ W`` with W the packed int4 weight -> ``[M, N]``; Hopper GPUs only.
    ``cfg`` None: ``default_config`` for this shape."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    _check_layout_assumptions()
    m_rows, k = x.shape
    n = packed.shape[1]
    if k != in_features:
        raise ValueError(f"x has {k} input features, the weight {in_features}")
    if cfg is None:
        cfg = default_config(m_rows, n, bits=bits, group_size=group_size, in_features=in_features)
    why = unsupported_reason(m_rows, n, bits=bits, group_size=group_size, in_features=in_features,
                             cfg=cfg)
    if why:
        raise NotImplementedError(why)
    out_dtype = jnp.dtype(out_dtype or x.dtype)
    p = layout.codes_per_word(bits)
    half = p // 2
    r = rows_per_step(bits, cfg)
    gsr = scale_block_rows(in_features, bits, group_size)
    xp = permute_activations(x.astype(jnp.bfloat16), bits=bits, group_size=group_size,
                             in_features=in_features, cfg=cfg)
    sc, zb = pair_scales(scales, zeros, bits=bits, group_size=group_size, in_features=in_features)
    mp, kp = xp.shape
    bm, d = cfg.block_m, cfg.depth
    ts, cta_n = cfg.token_split, cfg.cta_n
    wm = bm // 2 if ts else bm  # tokens per compute warpgroup
    has_zeros = zb is not None

    # interleave: 16-deep slices of the x tile must be whole tiles (32-byte rows, 32-byte swizzle)
    x_transforms = ((plgpu.TilingTransform((8, 16)), plgpu.SwizzleTransform(32)) if cfg.interleave
                    else (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128)))
    o_transforms = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))

    pp = cfg.pingpong

    def launch(splits: int, n0: int, n_grid: int, sk: StreamK | None = None):
        """One kernel over feature tiles ``[n0, n0 + n_grid)``: ``splits == 1`` writes them into a
        bf16 ``out [Mp, N]`` (other columns left unwritten), else fp32 partials out^T
        ``[splits, n_grid cta_n, Mp]``; with ``sk`` (stream-K) a bf16 ``[Mp, n_grid cta_n]`` and
        the fp32 workspace of the partials ``[ctas, m_tiles, slot, 2, 64, wm]`` (discarded; slot 0: the
        head, slot 1 with ``rest_first``: the parked rest)."""
        steps = sk.width if sk else kp // d // splits  # pipeline steps per CTA

        def kernel(xp_gmem, w_gmem, sc_gmem, *rest):
            zb_gmem = rest[0] if has_zeros else None
            if pp:  # turn[g]: compute warpgroup g may issue its wgmma (phases counted per thread)
                *rest, turn = rest
            out_gmem = rest[-2] if sk else rest[-1]
            ni = lax.axis_index("n")
            mi = lax.axis_index("m")
            wg = lax.axis_index("wg")
            c0 = lax.axis_index("k") * steps  # first pipeline step of this CTA's reduction range
            if sk:  # CTA g runs iterations [lo, hi) of the (tile, step) space
                ws_gmem = rest[-1]
                g = ni
                lo, hi = sk.share(g)
                # per feature tile, token tile and warpgroup
                sems = pl.get_global(plgpu.SemaphoreType.REGULAR((2 * sk.tiles * sk.m_tiles,)))

                def publish(acc, t):  # a partial of tile t for the CTA that holds its first step
                    ws_gmem.at[g, mi, 0, wg][...] = acc
                    plgpu.semaphore_signal(sems.at[sk.semaphore(t, mi, wg)], memory_scope="gpu")

            def step(_, x_smem, w_smem, sc_smem, *more):
                zb_smem = more[0] if has_zeros else None
                acc_ref = more[-1]
                x_wg = x_smem.at[pl.ds(wg * wm, wm)] if ts else x_smem
                decode = functools.partial(_decode_fragment, w_smem, sc_smem, zb_smem, bits=bits, depth=d,
                                           by_warpgroup=not ts, swizzled=cfg.swizzle_words, lop3=cfg.lop3,
                                           byte_perm=cfg.byte_perm)
                if cfg.interleave:  # slice j's decode is issued after slice j - 1's wgmma
                    for j in range(d // 16):
                        plgpu.wgmma(acc_ref, decode(cts=(2 * j, 2 * j + 1)),
                                    plgpu.transpose_ref(x_wg.at[:, pl.ds(16 * j, 16)], (1, 0)))
                    plgpu.wgmma_wait(0)
                    return acc_ref
                a = decode()
                if pp:
                    plgpu.barrier_wait(turn.at[wg])
                plgpu.wgmma(acc_ref, a, plgpu.transpose_ref(x_wg, (1, 0)))
                if pp:  # issued: the other warpgroup's wgmma queues behind this one
                    plgpu.barrier_arrive(turn.at[1 - wg])
                # wait here: keeping one wgmma in flight (wait(1), inputs released a step late) gave
                # wrong results on the H100 (NOTES round 11); the two warpgroups overlap each other
                plgpu.wgmma_wait(0)
                return acc_ref

            def rows(size, start=0):  # this warpgroup's tokens
                return pl.ds(mi * bm + (wg * wm if ts else 0) + start, size)

            def cols(first_tile, ni=ni):  # this warpgroup's output features
                return pl.ds((ni + first_tile) * cta_n + (0 if ts else wg * 64), 64)

            def store_bf16(acc, o_smem, ni=ni, n0=n0):  # out [Mp, N]: acc is out^T, stored transposed
                o = o_smem.at[wg]
                plgpu.transpose_ref(o, (1, 0))[...] = plgpu.layout_cast(
                    acc.astype(out_dtype), plgpu.Layout.WGMMA_TRANSPOSED)
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(
                    o, out_gmem.at[rows(wm), cols(n0, ni=ni)])
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)

            def store_partial(acc, o_smem):  # fp32 out^T [splits, n_grid cta_n, Mp] in 32-token chunks
                o = o_smem.at[wg]
                for j in range(wm // 32):
                    plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                    o[...] = acc[:, j * 32:(j + 1) * 32]
                    plgpu.commit_smem()
                    plgpu.copy_smem_to_gmem(o, out_gmem.at[lax.axis_index("k"), cols(0), rows(32, j * 32)])
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)

            def context(run, finish=None, first_turn=True, smem=True):
                if pp and first_turn:  # warpgroup 0 takes the first turn (once: turns carry over)
                    @pl.when(wg == 1)
                    def _():
                        plgpu.barrier_arrive(turn.at[0])

                acc = pl.run_scoped(lambda acc_ref: run(acc_ref)[...], plgpu.ACC((64, wm)))
                if finish is None:
                    finish = store_partial if splits > 1 else store_bf16
                if smem:
                    pl.run_scoped(functools.partial(finish, acc), o_alloc, collective_axes=("wg",))
                else:
                    finish(acc)

            def emit(context, length=steps, first=None):  # the pipeline over this CTA's steps
                if sk:  # pipeline step c is iteration first + c of the share
                    at_c = functools.partial(sk.at, first)
                    x_at = lambda c: (mi, at_c(c)[1])  # noqa: E731
                    k_at = lambda c: at_c(c)[1]  # noqa: E731
                    n_at = lambda c: n0 + at_c(c)[0]  # noqa: E731
                else:
                    x_at = lambda c: (mi, c0 + c)  # noqa: E731
                    k_at = lambda c: c0 + c  # noqa: E731
                    n_at = lambda c: ni + n0  # noqa: E731
                specs = [
                    plgpu.BlockSpec((bm, d), x_at, transforms=x_transforms),
                    plgpu.BlockSpec((r, cta_n), lambda c: (k_at(c), n_at(c)),
                                    transforms=WORD_TRANSFORMS() if cfg.swizzle_words else ()),
                    plgpu.BlockSpec((1, half, cta_n), lambda c: ((k_at(c) * r) // gsr, 0, n_at(c))),
                ]
                if has_zeros:
                    specs.append(plgpu.BlockSpec((1, half, cta_n), lambda c: ((k_at(c) * r) // gsr, 0, n_at(c))))
                plgpu.emit_pipeline_warp_specialized(
                    step, grid=(length,), memory_registers=40, in_specs=tuple(specs),
                    max_concurrent_steps=cfg.stages, wg_axis="wg", num_compute_wgs=2,
                    compute_context=context,
                )(xp_gmem, w_gmem, sc_gmem, *((zb_gmem,) if has_zeros else ()))

            if sk:  # the head [lo, b0) and the rest [b0, hi): two pipelines, two accumulators
                a_len = sk.head_len(lo, hi)
                b0 = lo + a_len

                def finish_head(acc):
                    @pl.when(a_len > 0)
                    def _():
                        publish(acc, lo // sk.steps)

                def finish_rest(acc, o_smem):  # holds the first step of its tile: add the others' partials
                    t = b0 // sk.steps
                    others = sk.others(t, g)

                    @pl.when(b0 < hi)
                    def _():
                        @pl.when(others > 0)
                        def _():
                            plgpu.semaphore_wait(sems.at[sk.semaphore(t, mi, wg)], others, memory_scope="gpu")

                        def add(j, v):
                            return v + plgpu.load(ws_gmem.at[g + j, mi, 0, wg], (), layout=plgpu.Layout.WGMMA,
                                                  optimized=False)

                        own = acc
                        if cfg.rest_first:  # the rest ran first: its sum waits in slot 1
                            own = plgpu.load(ws_gmem.at[g, mi, 1, wg], (), layout=plgpu.Layout.WGMMA,
                                             optimized=False)
                        store_bf16(lax.fori_loop(1, others + 1, add, own), o_smem, ni=t, n0=0)

                if cfg.rest_first:  # the rest (parked in slot 1: the next pipeline needs the registers), the head
                    def park_rest(acc):
                        @pl.when(b0 < hi)
                        def _():
                            ws_gmem.at[g, mi, 1, wg][...] = acc

                    def finish_both(acc, o_smem):
                        finish_head(acc)
                        finish_rest(None, o_smem)

                    emit(functools.partial(context, finish=park_rest, first_turn=True, smem=False), hi - b0, b0)
                    emit(functools.partial(context, finish=finish_both, first_turn=False), a_len, lo)
                else:
                    emit(functools.partial(context, finish=finish_head, first_turn=True, smem=False), a_len, lo)
                    emit(functools.partial(context, finish=finish_rest, first_turn=False), hi - b0, b0)
            else:
                emit(context)

            @pl.when(wg == 2)
            def _():  # the memory warpgroup takes part in the collective allocation of the store
                pl.run_scoped(lambda _: None, o_alloc, collective_axes=("wg",))

        if splits > 1:
            o_alloc = plgpu.SMEM((2, 64, 32), jnp.float32,
                                 transforms=(plgpu.TilingTransform((8, 32)), plgpu.SwizzleTransform(128)))
            out_type = jax.ShapeDtypeStruct((splits, n_grid * cta_n, mp), jnp.float32)
        else:
            o_alloc = plgpu.SMEM((2, wm, 64), out_dtype, transforms=o_transforms)
            out_type = jax.ShapeDtypeStruct((mp, n), out_dtype)
        if sk:
            out_type = (jax.ShapeDtypeStruct((mp, n_grid * cta_n), out_dtype),
                        jax.ShapeDtypeStruct((sk.ctas, sk.m_tiles, 2 if cfg.rest_first else 1, 2, 64, wm),
                                             jnp.float32))
        extra = {}
        if pp:
            extra["scratch_types"] = (plgpu.Barrier(num_arrivals=1, num_barriers=2),)
        call = plgpu.kernel(
            kernel,
            out_type=out_type,
            **extra,
            grid=(sk.ctas if sk else n_grid, mp // bm, 1 if sk else splits),
            grid_names=("n", "m", "k"),
            num_threads=3,
            thread_name="wg",
        )
        args = (xp, packed, sc)
        if has_zeros:
            args += (zb,)
        return call(*args)[0] if sk else call(*args)

    def summed(partials):  # one XLA fusion: sum of the fp32 partials, transpose, cast -> [Mp, cols]
        return partials.sum(axis=0).T.astype(out_dtype)

    n_tiles = n // cta_n
    if cfg.splits > 1:
        return summed(launch(cfg.splits, 0, n_tiles))[:m_rows]
    # the feature tiles [whole, n_tiles) of the partial last wave: stream-K or split-K (or none)
    if cfg.stream_k:
        whole, tail, ctas = stream_k_plan(m_rows, n, cfg, steps=kp // d)
        tail_launch = lambda: launch(1, whole, tail, StreamK(tail, kp // d, ctas, mp // bm))  # noqa: E731
    else:
        whole, tail, tail_splits = tail_plan(m_rows, n, cfg, steps=kp // d)
        tail_launch = lambda: summed(launch(tail_splits, whole, tail))  # noqa: E731
    if not tail:
        return launch(1, 0, n_tiles)[:m_rows]
    part = tail_launch()
    if not whole:
        return part[:m_rows]
    out = lax.dynamic_update_slice(launch(1, 0, whole), part, (0, whole * cta_n))  # in place
    return out[:m_rows]


def emulate(x, packed, scales, zeros, *, bits: int, group_size: int, in_features: int,
            cfg: MosaicConfig = MosaicConfig()):
    """The kernel's arithmetic in plain jnp (CPU-testable): permuted activations times A fragments
    rebuilt from the words exactly as ``_decode_fragment`` does, fp32 accumulation."""
    p = layout.codes_per_word(bits)
    half = p // 2
    r = rows_per_step(bits, cfg)
    s = layout.slab_rows(in_features, bits, group_size)
    gsr = scale_block_rows(in_features, bits, group_size)
    xp = permute_activations(x.astype(jnp.bfloat16), bits=bits, group_size=group_size,
                             in_features=in_features, cfg=cfg)
    sc, zb = pair_scales(scales, zeros, bits=bits, group_size=group_size, in_features=in_features)
    n = packed.shape[1]
    steps = s // r
    if cfg.swizzle_words:  # row 8 t2 + 2 q + t1 -> [c, t = 2 t2 + t1, q, n]
        words = packed.astype(jnp.uint32).reshape(steps, r // 8, 4, 2, n).transpose(0, 1, 3, 2, 4)
        words = words.reshape(steps, r // 4, 4, n)
    else:
        words = packed.astype(jnp.uint32).reshape(steps, r // 4, 4, n)  # [c, t, q, n]
    u_of_c = (np.arange(steps) * r) // gsr
    mask = jnp.uint32((1 << bits) - 1 | ((1 << bits) - 1) << 16)

    def unpair(v):  # uint32 -> bf16 [..., 2] (element 0 = low half)
        lo = lax.bitcast_convert_type((v & 0xFFFF).astype(jnp.uint16), jnp.bfloat16)
        hi = lax.bitcast_convert_type((v >> 16).astype(jnp.uint16), jnp.bfloat16)
        return jnp.stack([lo, hi], axis=-1)

    cols = []
    for m in range(half):
        scale = unpair(sc[u_of_c, m])[:, None, None]  # [c, 1, 1, n, e]
        if bits == 8:  # fp32: 2**23 + c - (2**23 + zero), times the scale, rounded once to bf16
            f = lax.bitcast_convert_type(jnp.stack(
                [((words >> (bits * j)) & 255) | jnp.uint32(MAGIC_F32) for j in (m, m + half)], -1),
                jnp.float32)  # [c, t, q, n, e]
            zero = (jnp.float32(2 ** 23 + 2 ** (bits - 1)) if zb is None else
                    unpair(zb[u_of_c, m])[:, None, None].astype(jnp.float32) + jnp.float32(2 ** 23))
            cols.append(((f - zero) * scale.astype(jnp.float32)).astype(jnp.bfloat16))
            continue
        v = unpair(((words >> (bits * m)) & mask) | jnp.uint32(MAGIC))  # [c, t, q, n, e]
        if zb is None:
            zero = jnp.bfloat16(128 + 2 ** (bits - 1))
        else:
            zero = unpair(zb[u_of_c, m])[:, None, None]
        cols.append(((v - zero).astype(jnp.bfloat16) * scale).astype(jnp.bfloat16))
    a = jnp.stack(cols, axis=2)  # [c, t, m, q, n, e]
    a = a.transpose(0, 1, 2, 3, 5, 4).reshape(p * s, n)  # rows in x' column order
    out = jnp.dot(xp.astype(jnp.float32), a.astype(jnp.float32),
                  precision=lax.Precision.HIGHEST)
    return out[: x.shape[0]].astype(x.dtype)
