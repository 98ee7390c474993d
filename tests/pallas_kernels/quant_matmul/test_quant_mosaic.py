"""The Mosaic GPU int4 / int8 prefill kernel (``kernel_mosaic.py``): its reduction order and scale pairs
checked on the CPU through ``emulate`` (the kernel's arithmetic in jnp), its lowering for CUDA
checked on the CPU, and the compiled kernel checked on a Hopper GPU (``gpu`` marker)."""

import dataclasses
import re

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from pallas_kernels.quant_matmul import layout, quant_matmul, quant_matmul_reference
from pallas_kernels.quant_matmul import kernel_mosaic as km

from tests.pallas_kernels.quant_matmul.test_quant_matmul import MAX_TOL, REL_TOL, _max_rel, _rel, make_case  # same error budget

ON_HOPPER = km.available()

# (M, K, N, group_size, zeros): ragged M (not a multiple of block_m), groups tiling a slab (g32,
# g64, g128), a slab inside one group (K=1024, g128: S=128), per-channel, K=5120 as in the 27B.
CASES = [(37, 1024, 256, 128, False), (5, 5120, 384, 128, True), (130, 640, 128, 640, False),
         (300, 768, 256, 32, True), (64, 512, 128, 64, False)]


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.mark.parametrize("bits", km.KERNEL_BITS, ids=lambda b: f"int{b}")
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}x{c[1]}x{c[2]}-g{c[3]}{'-z' if c[4] else ''}")
def test_emulated_kernel_matches_reference(rng, case, bits):
    m, k, n, gs, z = case
    _, packed, scales, zeros = make_case(rng, k, n, bits, gs, z)
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    assert km.unsupported_reason(m, n, bits=bits, group_size=gs, in_features=k) is None
    ref = quant_matmul_reference(x, packed, scales, zeros, bits=bits, group_size=gs, in_features=k)
    out = km.emulate(x, packed, scales, zeros, bits=bits, group_size=gs, in_features=k)
    assert out.shape == (m, n)
    assert _rel(out, ref) < REL_TOL and _max_rel(out, ref) < MAX_TOL


@pytest.mark.parametrize("zeros", [False, True], ids=["sym", "zeros"])
def test_int8_decode_is_exact(rng, zeros):
    """The 8-bit decode (fp32: 2**23 + c minus 2**23 + zero, times the scale, one rounding to bf16)
    gives exactly the weights of ``dequantize`` in bf16: with one output feature per column and a
    one-hot row of x, the fp32 product returns the weight itself, so any decode or order error
    shows as an inequality (codes 0..255 and zeros 0..255 both cover the range where a bf16 magic
    would not be exact)."""
    from pallas_kernels.quant_matmul.reference import dequantize
    k, n, gs = 256, 128, 32
    _, packed, scales, z = make_case(rng, k, n, 8, gs, zeros)
    w = np.asarray(dequantize(packed, scales, z, bits=8, group_size=gs, in_features=k).astype(jnp.bfloat16),
                   np.float32)  # (c - zero) * scale, exact in fp32, rounded once to bf16
    eye = jnp.eye(k, dtype=jnp.bfloat16)
    got = np.asarray(km.emulate(eye, packed, scales, z, bits=8, group_size=gs, in_features=k), np.float32)
    np.testing.assert_array_equal(got, w)


@pytest.mark.parametrize("bits", km.KERNEL_BITS, ids=lambda b: f"int{b}")
@pytest.mark.parametrize("case", CASES[1:4], ids=lambda c: f"{c[0]}x{c[1]}x{c[2]}-g{c[3]}{'-z' if c[4] else ''}")
def test_emulated_swizzled_order_matches_reference(rng, case, bits):
    """``swizzle_words`` changes which word rows a thread takes and so the activations' permutation:
    the two must still agree (``emulate`` rebuilds the fragments in the swizzled order)."""
    m, k, n, gs, z = case
    cfg = km.MosaicConfig(swizzle_words=True)
    _, packed, scales, zeros = make_case(rng, k, n, bits, gs, z)
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    assert km.unsupported_reason(m, n, bits=bits, group_size=gs, in_features=k, cfg=cfg) is None
    ref = quant_matmul_reference(x, packed, scales, zeros, bits=bits, group_size=gs, in_features=k)
    out = km.emulate(x, packed, scales, zeros, bits=bits, group_size=gs, in_features=k, cfg=cfg)
    assert _rel(out, ref) < REL_TOL and _max_rel(out, ref) < MAX_TOL


@pytest.mark.parametrize("bits", km.KERNEL_BITS, ids=lambda b: f"int{b}")
def test_word_coords_undo_the_swizzle_without_bank_conflicts(bits):
    """The addresses ``_decode_fragment`` loads (``word_coords``, with Python ints), mapped back
    through the 128-byte swizzle as Mosaic GPU models it (byte offset XOR ((offset // 128) % 8) * 16,
    offsets from the 1024-byte aligned stage buffer), are the words of the documented order; each
    warp load touches 32 distinct banks (the plain tile: 8 banks, 4-way conflicts)."""
    r = km.rows_per_step(bits, km.MosaicConfig())
    words_per_thread = r // 4
    worst = {}
    for swizzled in (False, True):
        worst[swizzled] = 0
        for warp in range(4):
            for g in range(2):
                for h in range(2):
                    for t in range(words_per_thread):
                        banks = []
                        for lane in range(32):
                            q, n = lane % 4, 64 * g + 16 * warp + lane // 4 + 8 * h
                            coords = km.word_coords(q, t, n, swizzled=swizzled)
                            if swizzled:
                                tb, cb, row8, col = coords
                                phys = (((tb * 4 + cb) * 8 + row8) * 32 + col) * 4  # bytes, [R/8, 4, 8, 32]
                                logical = phys ^ (((phys // 128) % 8) << 4)
                                tb, cb, row8, col = np.unravel_index(logical // 4, (r // 8, 4, 8, 32))
                                assert (tb * 8 + row8, cb * 32 + col) == (8 * (t // 2) + 2 * q + t % 2, n)
                            else:
                                row, col = coords
                                assert (row, col) == (4 * t + q, n)
                                phys = (row * 128 + col) * 4
                            banks.append((phys // 4) % 32)
                        worst[swizzled] = max(worst[swizzled], max(np.bincount(banks)))
    assert worst == {False: 4, True: 1}


@pytest.mark.parametrize("scale_dtype", [jnp.float16, jnp.float32])
def test_emulated_kernel_with_wider_scales(rng, scale_dtype):
    """fp16 / fp32 scales (GPTQ checkpoints store fp16) are rounded to bf16 before the product: a
    second 2**-9 relative rounding per weight, still far inside REL_TOL."""
    _, packed, scales, zeros = make_case(rng, 1024, 256, 4, 128, True, scale_dtype=scale_dtype)
    x = jnp.asarray(rng.standard_normal((40, 1024)), jnp.bfloat16)
    ref = quant_matmul_reference(x, packed, scales, zeros, bits=4, group_size=128, in_features=1024)
    out = km.emulate(x, packed, scales, zeros, bits=4, group_size=128, in_features=1024)
    assert _rel(out, ref) < REL_TOL and _max_rel(out, ref) < MAX_TOL


def test_permutation_is_the_documented_order():
    """x' column c D + 8 (t p/2 + m) + 2 q + e holds x column (m + e p/2) S + c R + 4 t + q."""
    k, gs, cfg = 1024, 128, km.MosaicConfig()
    s, r, p = layout.slab_rows(k, 4, gs), km.rows_per_step(4, cfg), 8
    x = jnp.arange(k, dtype=jnp.float32)[None, :]
    xp = np.asarray(km.permute_activations(x, bits=4, group_size=gs, in_features=k, cfg=cfg))
    assert xp.shape == (cfg.block_m, p * s)
    assert not xp[1:].any()  # padding rows are zero
    for c in range(s // r):
        for t in range(r // 4):
            for m in range(p // 2):
                for q in range(4):
                    for e in range(2):
                        col = c * cfg.depth + 8 * (t * (p // 2) + m) + 2 * q + e
                        assert xp[0, col] == (m + e * p // 2) * s + c * r + 4 * t + q
    assert sorted(xp[0].astype(int)) == list(range(k))  # a permutation


def test_scale_pairs_hold_the_fields_groups(rng):
    k, n, gs = 5120, 128, 128  # S = 640 = 5 groups per slab
    _, _, scales, zeros = make_case(rng, k, n, 4, gs, True)
    sc, zb = km.pair_scales(scales, zeros, bits=4, group_size=gs, in_features=k)
    s = layout.slab_rows(k, 4, gs)
    assert sc.shape == zb.shape == (s // gs, 4, n) and sc.dtype == jnp.uint32
    lo = lambda v: np.asarray(jax.lax.bitcast_convert_type((v & 0xFFFF).astype(jnp.uint16), jnp.bfloat16), np.float32)  # noqa: E731
    hi = lambda v: np.asarray(jax.lax.bitcast_convert_type((v >> 16).astype(jnp.uint16), jnp.bfloat16), np.float32)  # noqa: E731
    s32 = np.asarray(scales.astype(jnp.float32))
    for u in range(s // gs):
        for m in range(4):
            np.testing.assert_array_equal(lo(sc[u, m]), s32[(m * s + u * gs) // gs])
            np.testing.assert_array_equal(hi(sc[u, m]), s32[((m + 4) * s + u * gs) // gs])
            np.testing.assert_array_equal(hi(zb[u, m]), 128.0 + np.asarray(zeros[((m + 4) * s + u * gs) // gs], np.float32))


def test_unsupported_cases_are_named():
    kw = dict(group_size=128, in_features=5120)
    assert "4-bit and 8-bit" in km.unsupported_reason(512, 34816, bits=3, **kw)
    assert km.unsupported_reason(512, 34816, bits=8, **kw) is None
    assert "multiple of 128" in km.unsupported_reason(512, 1000, bits=4, **kw)
    assert km.unsupported_reason(512, 192, bits=4, cfg=km.MosaicConfig(token_split=True), **kw) is None
    assert "of 16 with token_split" in km.unsupported_reason(512, 192, bits=4, cfg=km.MosaicConfig(
        block_m=8, token_split=True), **kw)
    assert "splits=3" in km.unsupported_reason(512, 34816, bits=4, cfg=km.MosaicConfig(splits=3), **kw)
    assert "group size 4" in km.unsupported_reason(512, 256, bits=4, group_size=4, in_features=512)
    assert "exclusive" in km.unsupported_reason(512, 34816, bits=4, cfg=km.MosaicConfig(
        pingpong=True, interleave=True), **kw)
    # split-K partials go out in 32-token chunks: 176 tokens would lose the last 16
    assert "multiple of 32" in km.unsupported_reason(512, 5120, bits=4, cfg=km.MosaicConfig(176, splits=2), **kw)
    assert "multiple of 32" in km.unsupported_reason(512, 5120, bits=4, cfg=km.MosaicConfig(176, tail_splits=0),
                                                     **kw)
    assert "exclusive" in km.unsupported_reason(512, 5120, bits=4, cfg=km.MosaicConfig(splits=2, tail_splits=2),
                                                **kw)
    assert "tail_splits=3" in km.unsupported_reason(512, 5120, bits=4, cfg=km.MosaicConfig(tail_splits=3), **kw)
    assert "need stream_k" in km.unsupported_reason(512, 5120, bits=4, cfg=km.MosaicConfig(rest_first=True), **kw)
    with pytest.raises(NotImplementedError, match="4-bit and 8-bit"):
        km.quant_matmul_mosaic(jnp.zeros((4, 512), jnp.bfloat16), jnp.zeros((32, 128), jnp.uint32),
                               jnp.ones((4, 128), jnp.bfloat16), None, bits=2, group_size=128,
                               in_features=512)


def test_choose_config_fills_the_grid():
    """The grid model: at 512 rows N = 5120 gets 176-token tiles (120 CTAs: one wave on 132 SMs,
    where 256 tokens give 80 CTAs); the largest projection keeps 256 (its waves do not improve)."""
    kw = dict(bits=4, group_size=128, in_features=5120)
    small = km.choose_config(512, 5120, sms=132, **kw)
    assert small.block_m == 176 and km.grid_ctas(512, 5120, small) == 120
    assert km.grid_ctas(512, 5120, km.MosaicConfig()) == 80
    assert km.modeled_cost(512, 5120, small, 132) < km.modeled_cost(512, 5120, km.MosaicConfig(), 132)
    assert km.choose_config(512, 34816, sms=132, **kw).block_m == 256
    assert km.choose_config(4096, 5120, sms=132, **kw).block_m == 256
    for m in (1, 300, 512, 1000, 2048, 4096):
        for n in (128, 5120, 10240, 34816):
            cfg = km.choose_config(m, n, sms=132, **kw)
            assert km.unsupported_reason(m, n, cfg=cfg, **kw) is None
            assert all(km.modeled_cost(m, n, cfg, 132) <= km.modeled_cost(m, n, km.MosaicConfig(block_m=b), 132)
                       for b in km.BLOCK_M_CHOICES)
    # a shape no candidate covers falls back to the defaults (the caller's unsupported_reason names why)
    assert km.choose_config(512, 1000, sms=132, **kw) == km.MosaicConfig()
    # pingpong where it measured faster (256 tokens), not at 176
    assert km.choose_config(512, 34816, sms=132, **kw).pingpong and not small.pingpong
    # the swizzled word tile everywhere (faster at all seven issue shapes, int4 and int8)
    assert small.swizzle_words and km.choose_config(512, 5120, sms=132, bits=8, group_size=32,
                                                    in_features=5120).swizzle_words
    # the fused LOP3 everywhere (SCHEDULE_LOP3); the hybrid grid where the partials fit 32-token
    # chunks (SCHEDULE_TAIL: not at 176 tokens)
    assert small.lop3 and small.tail_splits == 1
    assert km.choose_config(512, 34816, sms=132, **kw).tail_splits == 0


def test_schedule_switches_take_the_hybrid_grid_where_the_model_prices_it_faster(monkeypatch):
    """With ``SCHEDULE_TAIL`` / ``SCHEDULE_LOP3`` on, ``choose_config`` at 512 rows (int4 g128, 132
    SMs) takes the hybrid grid at the four shapes where it measured faster, keeps 176 tokens for
    N = 5120 (no tail there: 120 CTAs, one wave) and 256 without a tail at 6144 (96 CTAs)."""
    monkeypatch.setattr(km, "SCHEDULE_TAIL", True)
    monkeypatch.setattr(km, "SCHEDULE_LOP3", True)
    pick = {(k, n): km.choose_config(512, n, bits=4, group_size=128, in_features=k, sms=132)
            for k, n in ((5120, 34816), (5120, 17408), (5120, 12288), (5120, 10240), (17408, 5120),
                         (5120, 6144))}
    for (k, n), cfg in pick.items():
        assert cfg.lop3 and km.unsupported_reason(512, n, bits=4, group_size=128, in_features=k, cfg=cfg) is None
        _, tail, _ = km.tail_plan(512, n, cfg, steps=k // 64, sms=132)
        assert bool(tail) == (n in MEASURED_TAIL_512), (k, n, cfg.name)
    assert pick[17408, 5120].block_m == 176 and pick[5120, 6144].block_m == 256


# 512 rows, int4 g128, H100 (NOTES round 15): 256-token tiles with pingpong, plain grid vs hybrid
# grid, us. Where there is a tail the hybrid grid was faster; at 6144 there is none (one launch).
MEASURED_TAIL_512 = {34816: (280.2, 251.9), 17408: (169.9, 138.6), 12288: (115.8, 104.2), 10240: (116.7, 89.0)}


@pytest.mark.parametrize("n", sorted(MEASURED_TAIL_512))
def test_grid_model_prices_the_tail_as_measured(n):
    """The model with the tail's measured cost per MB of partials: the hybrid grid ranks before the
    plain grid where it measured faster, and the modeled times (x 1.55 ns per token-row-step, the
    H100's rate at 5120 -> 34816) land within 5% of the measured ones (the 4 points the cost per MB
    was fit on, so this checks the arithmetic of the fit, not a prediction)."""
    plain = km.MosaicConfig(pingpong=True, swizzle_words=True)
    hybrid = km.MosaicConfig(pingpong=True, swizzle_words=True, tail_splits=0)
    cost = {c: km.modeled_cost(512, n, c, 132, steps=80) * 1.55e-3 for c in (plain, hybrid)}
    assert cost[hybrid] < cost[plain]
    for c, us in zip((plain, hybrid), MEASURED_TAIL_512[n]):
        assert abs(cost[c] / us - 1) < 0.05, (c.name, cost[c], us)


def test_tail_plan_fills_whole_waves_then_splits_the_rest():
    """The hybrid grid at 512 rows, 256 tokens (2 token tiles), 132 SMs, 80 steps per tile (K=5120):
    whole waves of tiles first, the partial last wave split-K so that it fits one wave."""
    cfg = km.MosaicConfig(pingpong=True, tail_splits=0)
    plan = {n: km.tail_plan(512, n, cfg, steps=80, sms=132) for n in (34816, 17408, 12288, 10240, 6144)}
    assert plan[34816] == (264, 8, 8)    # 528 CTAs = 4 waves, then 16 tiles x 8 = 128 CTAs
    assert plan[17408] == (132, 4, 16)   # 264 = 2 waves, then 8 tiles x 16
    assert plan[12288] == (66, 30, 2)    # 132 = 1 wave, then 60 x 2
    assert plan[10240] == (66, 14, 4)    # 56 x 4 = 112
    assert plan[6144] == (48, 0, 1)      # 96 CTAs, under one wave: splitting all of it is plain split-K
    for n, (whole, tail, splits) in plan.items():
        m_tiles = 2
        assert whole + tail == n // 128
        assert tail == 0 or (whole * m_tiles) % 132 == 0  # the first launch is whole waves
        assert tail * m_tiles * splits <= 132 and 80 % splits == 0
        # the model: fewer waves than the plain grid wherever there is a tail
        if tail:
            assert km.modeled_cost(512, n, cfg, 132, steps=80) < km.modeled_cost(512, n, km.MosaicConfig(), 132)
    # a fixed split is taken as given; no split without a tail
    assert km.tail_plan(512, 17408, km.MosaicConfig(tail_splits=4), steps=80, sms=132) == (132, 4, 4)
    assert km.tail_plan(512, 17408, km.MosaicConfig(), steps=80, sms=132) == (136, 0, 1)
    assert km.tail_plan(512, 128 * 66, cfg, steps=80, sms=132) == (66, 0, 1)  # waves come out even


def simulate_stream_k(sk: km.StreamK, values, rest_first=False):
    """The stream-K launch's control flow (``quant_matmul_mosaic`` with ``stream_k``) run on the
    host with ``StreamK``'s schedule, one scalar per (tile, step) instead of a wgmma: each CTA runs
    its head (published) and the rest of its share (which starts at its tile's first step: it adds
    the others' partials and stores), the head first or, with ``rest_first``, the rest first (its
    sum parked in the workspace's second slot while the head runs). Returns the stored tile sums
    and each CTA's K step at each pipeline step; checks that every published partial is read
    once, by the CTA that holds its tile's first step."""
    heads, parked, stored, k_steps = {}, {}, {}, {}
    for g in range(sk.ctas):
        lo, hi = sk.share(g)
        a = sk.head_len(lo, hi)
        b0 = lo + a
        assert 0 <= a <= hi - lo and (a == 0) == (lo % sk.steps == 0)
        segments = [(b0, hi - b0, "rest"), (lo, a, "head")] if rest_first else [(lo, a, "head"), (b0, hi - b0, "rest")]
        k_steps[g] = [sk.at(first, c)[1] for first, n, _ in segments for c in range(n)]
        for first, n, kind in segments:
            acc = sum(values[sk.at(first, c)] for c in range(n))
            if kind == "head" and n:
                assert len({sk.at(lo, c)[0] for c in range(a)}) == 1, "the head stays in one tile"
                heads[g] = (lo // sk.steps, acc)
            elif kind == "rest" and n:
                t = b0 // sk.steps
                assert b0 % sk.steps == 0 and {sk.at(b0, c)[0] for c in range(n)} == {t}
                assert t not in stored, f"tile {t} stored twice"
                if rest_first:
                    parked[g] = acc
                stored[t] = (g, sk.others(t, g), acc)
    out = {}
    for t, (g, others, acc) in stored.items():  # after every CTA's last pipeline: the finish
        if rest_first:
            acc = parked.pop(g)
        for j in range(1, others + 1):
            pt, part = heads.pop(g + j)
            assert pt == t, f"CTA {g + j} published tile {pt}, read for tile {t}"
            acc += part
        out[t] = acc
    assert not heads and not parked, f"partials nobody read: {heads} {parked}"
    return out, k_steps


@pytest.mark.parametrize("tiles,steps,ctas", [(80, 272, 128), (80, 96, 128), (96, 80, 128), (28, 80, 112),
                                              (16, 80, 128), (2, 16, 32), (3, 80, 120), (131, 7, 131),
                                              (132, 80, 132), (1, 1, 1), (5, 3, 15), (80, 272, 80)])
def test_stream_k_schedule_covers_every_step_once(tiles, steps, ctas):
    """Every (tile, step) product lands in its tile exactly once: each tile's sum is exact (powers
    of two below 2**40 with distinct exponents per tile, so a lost, doubled or misplaced step shows
    as a wrong sum)."""
    sk = km.StreamK(tiles, steps, ctas, m_tiles=2)
    assert sk.width <= steps
    values = np.ldexp(1.0, np.arange(tiles * steps) % 40).reshape(tiles, steps) * (1 + np.arange(tiles))[:, None]
    phases = {}
    for rest_first in (False, True):
        out, k_steps = simulate_stream_k(sk, values, rest_first)
        assert sorted(out) == list(range(tiles))
        np.testing.assert_array_equal([out[t] for t in range(tiles)], values.sum(axis=1))
        phases[rest_first] = {(k - c) % steps for ks in k_steps.values() for c, k in enumerate(ks)}
        if rest_first:  # at pipeline step c a CTA stands at K step c or c + steps - width, unless
            for g, ks in k_steps.items():  # its share lies inside one tile (neither first nor last)
                lo, hi = sk.share(g)
                inside = lo % steps and hi % steps and lo // steps == (hi - 1) // steps
                assert inside or all((k - c) % steps in (0, steps - sk.width) for c, k in enumerate(ks)), g
    # K phases (K step - pipeline step, mod steps): head first, one per offset of a share into its
    # tile; rest first, 0, steps - width and the offsets of the shares inside one tile
    assert phases[False] == {(g * sk.width) % steps for g in range(ctas)}
    assert phases[True] <= {0, steps - sk.width} | phases[False]
    with pytest.raises(ValueError, match="divide"):
        km.StreamK(tiles, steps, tiles * steps + 1, m_tiles=2)
    # one semaphore per (feature tile, token tile, warpgroup): the kernel's global array, no sharing
    sems = [sk.semaphore(t, mi, wg) for t in range(tiles) for mi in range(2) for wg in range(2)]
    assert sorted(sems) == list(range(4 * tiles))


def test_stream_k_plan_leaves_at_most_one_tile_per_cta():
    """512 rows, 256 tokens (2 token tiles), 132 SMs: whole waves as usual, the rest stream-K over
    up to 66 CTAs per token tile (one per SM in all)."""
    cfg = km.MosaicConfig(pingpong=True, stream_k=True)
    assert km.stream_k_plan(512, 5120, cfg, steps=272, sms=132) == (0, 40, 64)       # 80 tiles < 1 wave
    assert km.stream_k_plan(512, 17408, cfg, steps=80, sms=132) == (132, 4, 64)      # 2 waves + 8 tiles
    assert km.stream_k_plan(512, 128 * 66, cfg, steps=80, sms=132) == (66, 0, 0)     # waves come out even
    assert km.stream_k_plan(512, 128, cfg, steps=1, sms=132) == (0, 1, 1)            # 1 iteration per token tile
    assert km.stream_k_plan(512, 128, cfg, steps=66, sms=132) == (0, 1, 66)          # one step per CTA
    assert km.stream_k_plan(512, 128, cfg, steps=134, sms=132) == (0, 1, 2)          # 67 > 66: 2 CTAs of 67
    # CTAs of the caller's choosing: checked against the same rules, named in the error
    fixed = km.MosaicConfig(pingpong=True, stream_k=True, stream_k_ctas=48)
    assert km.stream_k_plan(512, 5120, fixed, steps=96, sms=132) == (0, 40, 48)      # 6144 -> 5120: width 80
    assert km.stream_k_plan(512, 5120, dataclasses.replace(fixed, stream_k_ctas=40), steps=96, sms=132) == (0, 40, 40)
    for bad in (39, 50, 80):  # fewer than the tiles, not a divisor of 3,840, more than 66 per token tile
        with pytest.raises(ValueError, match=f"stream_k_ctas={bad}"):
            km.stream_k_plan(512, 5120, dataclasses.replace(fixed, stream_k_ctas=bad), steps=96, sms=132)
    assert "need stream_k" in km.unsupported_reason(512, 5120, bits=4, group_size=128, in_features=5120,
                                                    cfg=km.MosaicConfig(stream_k_ctas=48))
    # 5 token tiles (1,280 rows at 256) with 132 SMs: the rest never exceeds one tile per CTA
    for n in (5120, 6144, 10240, 12288, 17408, 34816):
        whole, rest, ctas = km.stream_k_plan(1280, n, cfg, steps=80, sms=132)
        assert whole + rest == n // 128 and rest <= ctas and 5 * ctas <= 132 and (rest * 80) % ctas == 0
    # its cost is not measured: the model says so rather than pricing it as the plain grid
    with pytest.raises(NotImplementedError, match="stream_k"):
        km.modeled_cost(512, 5120, cfg, 132)


# block_m from fastest to slowest at 512 rows, K=5120 (N=5120: K=17408), int4 g128, measured on an
# H100 in session 16 (NOTES round 13: e.g. N=5120 161.5 / 168.5 / 190.2 / 272.0 us)
MEASURED_ORDER_512 = {34816: (256, 176, 192, 128), 17408: (256, 176, 192, 128), 5120: (176, 192, 256, 128),
                      10240: (176, 192, 256, 128), 12288: (256, 128, 176, 192), 6144: (256, 128, 176, 192)}


@pytest.mark.parametrize("n", sorted(MEASURED_ORDER_512))
def test_grid_model_ranks_block_m_as_measured(n):
    """The wave model (waves x (block_m + STEP_OVERHEAD_ROWS)) orders the four tile heights as the
    GPU did at every issue shape: the check on STEP_OVERHEAD_ROWS and on the wave count."""
    got = tuple(sorted(km.BLOCK_M_CHOICES, key=lambda b: km.modeled_cost(512, n, km.MosaicConfig(block_m=b), 132)))
    assert got == MEASURED_ORDER_512[n]


def test_default_config_follows_the_switch(monkeypatch):
    kw = dict(bits=4, group_size=128, in_features=5120)
    monkeypatch.setattr(km, "AUTO_CONFIG", False)
    assert km.default_config(512, 5120, **kw) == km.MosaicConfig()
    monkeypatch.setattr(km, "AUTO_CONFIG", True)
    assert km.default_config(512, 5120, **kw) == km.choose_config(512, 5120, **kw)


def test_dispatch_rule():
    kw = dict(bits=4, group_size=128, in_features=5120)
    assert km.preferred(512, 5120, **kw) and km.preferred(2048, 34816, **kw)
    assert not km.preferred(1024, 5120, **kw) and not km.preferred(4096, 34816, **kw)
    # 8-bit codes: at 512 rows (timed there only), not beyond; other widths never
    assert km.preferred(512, 34816, bits=8, group_size=32, in_features=5120)
    assert not km.preferred(1024, 34816, bits=8, group_size=32, in_features=5120)
    assert not km.preferred(512, 34816, bits=3, group_size=128, in_features=5120)


@pytest.mark.skipif(ON_HOPPER, reason="on a Hopper GPU the Mosaic kernel runs (test_kernel_matches_reference_gpu); "
                    "this checks the error raised everywhere else")
def test_mosaic_implementation_off_hopper_is_a_clear_error(rng):
    _, packed, scales, _ = make_case(rng, 512, 128, 4, 128, False)
    x = jnp.zeros((8, 512), jnp.bfloat16)
    with pytest.raises(ValueError, match="Hopper"):
        quant_matmul(x, packed, scales, None, bits=4, group_size=128, in_features=512,
                     implementation="mosaic")


@pytest.mark.parametrize("cfg,zeros", [(km.MosaicConfig(), False), (km.MosaicConfig(128, 64, 3, 2), True),
                                       (km.MosaicConfig(token_split=True), True),
                                       (km.MosaicConfig(176, pingpong=True), True),
                                       (km.MosaicConfig(pingpong=True, token_split=True), False),
                                       (km.MosaicConfig(176, pingpong=True, swizzle_words=True), True),
                                       (km.MosaicConfig(176, swizzle_words=True, interleave=True), True),
                                       (km.MosaicConfig(128, 128, 2, 2, token_split=True, interleave=True), False),
                                       (km.MosaicConfig(pingpong=True, swizzle_words=True, tail_splits=0), True),
                                       (km.MosaicConfig(176, swizzle_words=True, lop3=True), True),
                                       (km.MosaicConfig(pingpong=True, swizzle_words=True, stream_k=True), True),
                                       (km.MosaicConfig(176, swizzle_words=True, stream_k=True), False),
                                       (km.MosaicConfig(pingpong=True, swizzle_words=True, stream_k=True, rest_first=True),
                                        True)],
                         ids=["default-sym", "m128-split2-zeros", "token-split-zeros", "m176-pingpong-zeros",
                              "pingpong-token-split", "m176-pingpong-swizzled-zeros", "m176-swizzled-interleaved-zeros",
                              "d128-split2-token-split-interleaved", "tail-split-zeros", "m176-swizzled-lop3-zeros",
                              "stream-k-zeros", "m176-stream-k", "stream-k-rest-first-zeros"])
@pytest.mark.parametrize("bits", km.KERNEL_BITS, ids=lambda b: f"int{b}")
def test_lowers_for_cuda(cfg, zeros, bits):
    """The whole kernel (pipeline, inline decode, transposed / split-K stores) lowers to Mosaic
    GPU on any host; catches layout and shape errors without a GPU."""
    sd = jax.ShapeDtypeStruct
    k, n, gs = 1024, 256, 128
    if cfg.tail_splits != 1:  # enough tiles for a whole wave and a split tail (2 x 136 tiles)
        n = 17408
        _, tail, splits = km.tail_plan(300, n, cfg, steps=k // 64)
        assert tail and splits > 1
    if cfg.stream_k and cfg.block_m == 256:  # whole waves and a stream-K rest
        n = 17408
        assert km.stream_k_plan(300, n, cfg, steps=k // 64)[0]
    hybrid = cfg.tail_splits != 1 or (cfg.stream_k and cfg.block_m == 256)
    g = layout.num_groups(k, bits, gs)
    f = jax.jit(lambda x, w, s, z: km.quant_matmul_mosaic(x, w, s, z, bits=bits, group_size=gs,
                                                          in_features=k, cfg=cfg))
    lowered = f.trace(sd((300, k), jnp.bfloat16), sd((layout.slab_rows(k, bits, gs), n), jnp.uint32),
                      sd((g, n), jnp.bfloat16), sd((g, n), jnp.uint8) if zeros else None
                      ).lower(lowering_platforms=("cuda",))
    text = lowered.as_text()
    assert "mosaic_gpu" in text
    # the hybrid grid: two launches (whole waves, split tail) and the tail written in place
    launches = len(re.findall(r"custom_call @mosaic_gpu", text))
    assert launches == (2 if hybrid else 1)
    assert ("dynamic_update_slice" in text) == hybrid
    assert ("lop3.b32" in text) == cfg.lop3  # the inline PTX of the fused mask-and-magic
    # stream-K: partials published with a release add and awaited with a compare-and-swap loop
    assert ("red.release.gpu.global.add" in text) == cfg.stream_k
    assert ("atom.relaxed.gpu.global.cas" in text) == cfg.stream_k


@pytest.mark.parametrize("cfg", [km.MosaicConfig(pingpong=True, swizzle_words=True, lop3=True, byte_perm=True),
                                 km.MosaicConfig(176, swizzle_words=True, byte_perm=True)], ids=lambda c: c.name)
@pytest.mark.parametrize("zeros", [False, True], ids=["sym", "zeros"])
def test_byte_perm_lowers_for_cuda(cfg, zeros):
    """The byte-select decode of 8-bit codes lowers, with its own ``prmt`` for each of the four
    byte positions and the one for the bf16 pack, and without the code LOP3. (The lowered text
    holds the kernel as bytecode, whose string table lists each distinct string once: Mosaic's own
    code has a ``prmt.b32`` and an ``arith.truncf`` of its own, so only these exact strings tell.)"""
    sd = jax.ShapeDtypeStruct
    k, n, gs, bits = 1024, 256, 32, 8
    g = layout.num_groups(k, bits, gs)
    f = jax.jit(lambda x, w, s, z: km.quant_matmul_mosaic(x, w, s, z, bits=bits, group_size=gs,
                                                          in_features=k, cfg=cfg))
    text = f.trace(sd((300, k), jnp.bfloat16), sd((layout.slab_rows(k, bits, gs), n), jnp.uint32),
                   sd((g, n), jnp.bfloat16), sd((g, n), jnp.uint8) if zeros else None
                   ).lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text
    for selector in [km.PRMT_CODE + j for j in range(4)] + [km.PRMT_UPPER_HALVES]:
        assert f"prmt.b32 $0, $1, $2, {selector:#x};" in text, hex(selector)
    assert "lop3.b32" not in text  # the 256-token config has lop3=True: byte_perm takes over its fields


def _prmt(a, b, selector):
    """PTX ``prmt.b32`` (default mode) on uint32 arrays: byte i of the result is byte
    ``selector >> 4 i & 7`` of the 8 bytes ``{b, a}`` (a's bytes are 0-3)."""
    a, b = np.broadcast_arrays(np.asarray(a, np.uint32), np.asarray(b, np.uint32))
    src = np.stack([(v >> np.uint32(8 * i)) & np.uint32(255) for v in (a, b) for i in range(4)], -1)
    return sum(src[..., (selector >> 4 * i) & 7].astype(np.uint32) << np.uint32(8 * i) for i in range(4))


def test_byte_perm_selectors_decode_every_code_and_zero_exactly():
    """The byte-select decode on the host, instruction by instruction: every byte position of a
    word, every code and zero (0..255) give ``c - zero`` exactly as a bf16 pair, the element-0
    code in the low half."""
    c, z = np.meshgrid(np.arange(256, dtype=np.uint32), np.arange(256, dtype=np.uint32), indexing="ij")
    c, z = c.ravel(), z.ravel()
    big = (np.float32(2 ** 23) + z.astype(np.float32)).astype(np.float32)
    for j in range(4):
        for other in range(4):
            if other == j:
                continue
            word = (c << np.uint32(8 * j)) | (((c * 7 + 3) & 255) << np.uint32(8 * other))  # other bytes: noise
            f = _prmt(word, km.MAGIC_F32, km.PRMT_CODE + j).view(np.float32)
            assert np.array_equal(f, np.float32(2 ** 23) + c.astype(np.float32))
            diff = (f - big).astype(np.float32).view(np.uint32)
            pair = _prmt(diff, diff[::-1], km.PRMT_UPPER_HALVES)
            lo = (pair << np.uint32(16)).view(np.float32)
            hi = (pair & np.uint32(0xFFFF0000)).view(np.float32)
            want = c.astype(np.float32) - z.astype(np.float32)
            assert np.array_equal(lo, want) and np.array_equal(hi, want[::-1])


def test_byte_perm_is_for_8_bit_codes_and_scheduled_only_there(monkeypatch):
    kw = dict(group_size=128, in_features=5120)
    cfg = km.MosaicConfig(swizzle_words=True, byte_perm=True)
    assert km.unsupported_reason(512, 5120, bits=8, cfg=cfg, **kw) is None
    assert "8-bit codes, not bits=4" in km.unsupported_reason(512, 5120, bits=4, cfg=cfg, **kw)
    assert cfg.name.endswith("_bp")
    monkeypatch.setattr(km, "SCHEDULE_BYTE_PERM", True)
    assert km.choose_config(512, 5120, bits=8, sms=132, **kw).byte_perm
    assert not km.choose_config(512, 5120, bits=4, sms=132, **kw).byte_perm
    monkeypatch.setattr(km, "SCHEDULE_BYTE_PERM", False)
    assert not km.choose_config(512, 5120, bits=8, sms=132, **kw).byte_perm


@pytest.mark.gpu
@pytest.mark.skipif(not ON_HOPPER, reason="needs a Hopper GPU (wgmma) and Pallas Mosaic GPU")
@pytest.mark.parametrize("case", CASES + [(600, 17408, 5120, 128, True)],
                         ids=lambda c: f"{c[0]}x{c[1]}x{c[2]}-g{c[3]}{'-z' if c[4] else ''}")
@pytest.mark.parametrize("cfg", [km.MosaicConfig(), km.MosaicConfig(128, 64, 4, 2),
                                 km.MosaicConfig(token_split=True), km.MosaicConfig(pingpong=True),
                                 km.MosaicConfig(176, pingpong=True), km.MosaicConfig(swizzle_words=True),
                                 km.MosaicConfig(176, swizzle_words=True),
                                 km.MosaicConfig(176, swizzle_words=True, interleave=True),
                                 km.MosaicConfig(interleave=True, token_split=True),
                                 km.MosaicConfig(176, swizzle_words=True, lop3=True),
                                 km.MosaicConfig(pingpong=True, swizzle_words=True, stream_k=True),
                                 km.MosaicConfig(176, swizzle_words=True, stream_k=True),
                                 km.MosaicConfig(pingpong=True, swizzle_words=True, stream_k=True, rest_first=True)],
                         ids=lambda c: c.name)
def test_kernel_matches_reference_gpu(rng, case, cfg):
    m, k, n, gs, z = case
    _, packed, scales, zeros = make_case(rng, k, n, 4, gs, z)
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    assert km.unsupported_reason(m, n, bits=4, group_size=gs, in_features=k, cfg=cfg) is None
    ref = quant_matmul_reference(x, packed, scales, zeros, bits=4, group_size=gs, in_features=k)
    out = jax.jit(lambda *a: km.quant_matmul_mosaic(*a, bits=4, group_size=gs, in_features=k, cfg=cfg))(
        x, packed, scales, zeros)
    assert out.shape == (m, n) and out.dtype == jnp.bfloat16
    assert _rel(out, ref) < REL_TOL and _max_rel(out, ref) < MAX_TOL
    via_api = quant_matmul(x, packed, scales, zeros, bits=4, group_size=gs, in_features=k,
                           implementation="mosaic")
    np.testing.assert_array_equal(np.asarray(via_api, np.float32), np.asarray(
        km.quant_matmul_mosaic(x, packed, scales, zeros, bits=4, group_size=gs, in_features=k), np.float32))


@pytest.mark.gpu
@pytest.mark.skipif(not ON_HOPPER, reason="needs a Hopper GPU (wgmma) and Pallas Mosaic GPU")
@pytest.mark.parametrize("case", CASES + [(600, 17408, 5120, 32, True)],
                         ids=lambda c: f"int8-{c[0]}x{c[1]}x{c[2]}-g{c[3]}{'-z' if c[4] else ''}")
@pytest.mark.parametrize("cfg", [km.MosaicConfig(), km.MosaicConfig(176, pingpong=True),
                                 km.MosaicConfig(pingpong=True, swizzle_words=True),
                                 km.MosaicConfig(swizzle_words=True, interleave=True),
                                 km.MosaicConfig(pingpong=True, swizzle_words=True, lop3=True),
                                 km.MosaicConfig(pingpong=True, swizzle_words=True, stream_k=True),
                                 km.MosaicConfig(pingpong=True, swizzle_words=True, stream_k=True, rest_first=True),
                                 km.MosaicConfig(pingpong=True, swizzle_words=True, lop3=True, byte_perm=True),
                                 km.MosaicConfig(176, swizzle_words=True, byte_perm=True)],
                         ids=lambda c: c.name)
def test_int8_kernel_matches_reference_gpu(rng, case, cfg):
    """8-bit codes: the fp32 decode (codes and zeros up to 255) in the compiled kernel."""
    m, k, n, gs, z = case
    _, packed, scales, zeros = make_case(rng, k, n, 8, gs, z)
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    ref = quant_matmul_reference(x, packed, scales, zeros, bits=8, group_size=gs, in_features=k)
    out = jax.jit(lambda *a: km.quant_matmul_mosaic(*a, bits=8, group_size=gs, in_features=k, cfg=cfg))(
        x, packed, scales, zeros)
    assert out.shape == (m, n) and out.dtype == jnp.bfloat16
    assert _rel(out, ref) < REL_TOL and _max_rel(out, ref) < MAX_TOL
    # the decoded weights themselves: a one-hot x returns them, exactly as emulate builds them
    eye = jnp.eye(min(k, 256), k, dtype=jnp.bfloat16)
    got = km.quant_matmul_mosaic(eye, packed, scales, zeros, bits=8, group_size=gs, in_features=k, cfg=cfg)
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(
        km.emulate(eye, packed, scales, zeros, bits=8, group_size=gs, in_features=k, cfg=cfg), np.float32))


@pytest.mark.gpu
@pytest.mark.skipif(not ON_HOPPER, reason="needs a Hopper GPU (wgmma) and Pallas Mosaic GPU")
@pytest.mark.parametrize("bits,gs,z", [(4, 128, True), (8, 32, False)], ids=["int4-g128-z", "int8-g32"])
def test_tail_split_kernel_matches_reference_gpu(rng, bits, gs, z):
    """The hybrid grid (``tail_splits``): whole waves of tiles, the rest split-K and written into
    the same output; 300 x 1024 -> 17408 gives 272 tiles of 256 x 128, so on 132 SMs whole waves
    take the first 132 or so feature tiles and the split tail the rest."""
    m, k, n = 300, 1024, 17408
    cfg = km.MosaicConfig(pingpong=True, swizzle_words=True, tail_splits=0)
    whole, tail, splits = km.tail_plan(m, n, cfg, steps=k // 64)
    assert tail and splits > 1, "this case must exercise the split tail"
    _, packed, scales, zeros = make_case(rng, k, n, bits, gs, z)
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    ref = quant_matmul_reference(x, packed, scales, zeros, bits=bits, group_size=gs, in_features=k)
    out = jax.jit(lambda *a: km.quant_matmul_mosaic(*a, bits=bits, group_size=gs, in_features=k, cfg=cfg))(
        x, packed, scales, zeros)
    assert out.shape == (m, n) and out.dtype == jnp.bfloat16
    # both sides of the boundary between the launches, and the error over all
    cut = whole * cfg.cta_n
    for part in (slice(0, cut), slice(cut, n)):
        assert _rel(out[:, part], ref[:, part]) < REL_TOL
    assert _rel(out, ref) < REL_TOL and _max_rel(out, ref) < MAX_TOL


@pytest.mark.gpu
@pytest.mark.skipif(not ON_HOPPER, reason="needs a Hopper GPU (wgmma) and Pallas Mosaic GPU")
@pytest.mark.parametrize("bits,gs,z", [(4, 128, True), (8, 32, False)], ids=["int4-g128-z", "int8-g32"])
@pytest.mark.parametrize("k,n", [(5120, 10240), (2048, 5120)], ids=["tail", "no-tail"])
def test_scheduled_switches_match_reference_gpu(monkeypatch, rng, bits, gs, z, k, n):
    """What ``quant_matmul_mosaic(cfg=None)`` runs with ``SCHEDULE_TAIL`` and ``SCHEDULE_LOP3`` on
    (the check that lets them be the default): 512 rows, a shape with a split tail (N = 10240: 160
    tiles of 256 x 128 on 132 SMs) and one without (N = 5120: 176 tokens, one wave)."""
    monkeypatch.setattr(km, "SCHEDULE_TAIL", True)
    monkeypatch.setattr(km, "SCHEDULE_LOP3", True)
    m = 512
    cfg = km.default_config(m, n, bits=bits, group_size=gs, in_features=k)
    assert cfg.lop3 and (cfg.tail_splits == 0) == (n == 10240), cfg.name
    _, packed, scales, zeros = make_case(rng, k, n, bits, gs, z)
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    ref = quant_matmul_reference(x, packed, scales, zeros, bits=bits, group_size=gs, in_features=k)
    out = jax.jit(lambda *a: km.quant_matmul_mosaic(*a, bits=bits, group_size=gs, in_features=k))(
        x, packed, scales, zeros)
    assert out.shape == (m, n) and _rel(out, ref) < REL_TOL and _max_rel(out, ref) < MAX_TOL
