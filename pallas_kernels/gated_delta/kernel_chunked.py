"""Pallas (Triton) kernels for the chunked gated delta rule (prefill, training forward).

Math: the chunkwise form of Gated DeltaNet (Yang, Kautz, Hatamizadeh, arXiv:2412.06464) with the
WY/UT representation of Yang et al. (arXiv:2406.06484); `reference.chunk_gated_delta_rule` is the
readable XLA version and the ground truth. Per chunk of C tokens (gamma_i = sum of g over the chunk
up to token i, all decays exp(.) <= 1):

    A   = strict_lower(beta_i (k_i . k_j) exp(gamma_i - gamma_j))          [C, C]
    X   = (I + A)^-1                                                       (the UT transform)
    P   = lower(  (q_i . k_j) exp(gamma_i - gamma_j))                      [C, C], diagonal included
    rhs = beta * (V - exp(gamma) * (K S))                                  [C, V]
    V'  = X rhs        (= U - W S of the WY form, fused: W S = X diag(beta e^gamma) K S)
    O   = exp(gamma) * (Q S) + P V'
    S  <- exp(gamma_C) S + (K * exp(gamma_C - gamma))^T V'

Two kernels:
  1. `_intra_chunk_kernel`, grid (chunk, value head), fully parallel: X and P of one chunk. A is
     built from 16-row blocks; the 4 diagonal 16x16 blocks are inverted by forward substitution
     (row by row, exact for a unit lower-triangular matrix) and the off-diagonal blocks of X follow
     by block forward substitution X_ab = -X_aa sum_m A_am X_mb, as fla's solve_tril does with its
     16x16 blocks (our own code). X and P go to HBM in fp32 (2 x 16 KB per chunk and head).
  2. `_state_pass_kernel`, grid (sequence x value head, V / BV): the sequential pass over the chunks
     of one sequence with the state tile S [K, BV] held in registers the whole time (the XLA scan
     writes it to HBM and relaunches kernels every chunk). Per chunk: 5 small matmuls.

Sequences are packed along the token axis with `cu_seqlens` (B = 1) or come as a batch (each row a
sequence); both become a table of chunks that never cross a sequence boundary, so states never mix.
The last chunk of a sequence is masked (loads read zeros past its end; stores are masked).

Shapes: B batch, T tokens, Hk key heads, Hv value heads (a multiple of Hk; value head j reads key
head j // (Hv // Hk)), K key dim, V value dim, C chunk size, N chunks, S sequences.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.gated_delta import kernel_common as kc

F32 = jnp.float32
_BLOCK = 16  # rows of the diagonal blocks of A: the smallest tile a Triton dot accepts
CHUNK_SIZES = (16, 32, 64)


def _iota2(n):
    rows = lax.broadcasted_iota(jnp.int32, (n, n), 0)
    cols = lax.broadcasted_iota(jnp.int32, (n, n), 1)
    return rows, cols


def _unit_lower_inverse(a):
    """(I + a)^-1 for strictly lower a [n, n] (n = 16) by forward substitution, in fp32.

    Row i of the inverse is e_i - sum_{j<i} a[i, j] X[j]; a[i, j>=i] = 0, so using the whole X (whose
    rows >= i are still identity rows) is exact. Rows are selected with masks and reductions
    because Triton cannot index a register tile dynamically.
    """
    n = a.shape[0]
    rows, cols = _iota2(n)
    col_ids = lax.broadcasted_iota(jnp.int32, (n,), 0)

    def step(i, x):
        a_row = jnp.sum(jnp.where(rows == i, a, 0.0), axis=0)  # a[i, :], indexed by j
        new = jnp.where(col_ids == i, 1.0, 0.0) - jnp.sum(a_row[:, None] * x, axis=0)
        return jnp.where(rows == i, new[None, :], x)

    return lax.fori_loop(1, n, step, jnp.where(rows == cols, 1.0, 0.0).astype(F32))


def _intra_chunk_kernel(starts_ref, lens_ref, q_ref, k_ref, g_ref, beta_ref, *out_refs,
                        chunk, num_value_heads, group, key_dim, precision, x_parts, stack_qk=False):
    """X = (I + A)^-1 and P of chunk slot c, value head j (see the module docstring).

    Refs: starts, lens [N] int32 (first token, token count of each chunk slot); q, k [Ttot, Hk*K];
    g, beta [Ttot, Hv]; outputs X then P, each [N*Hv*C, C] (row block (c*Hv + j)*C holds this
    chunk's matrix): one float32 array each, or for precision "bf16x3" two bf16 arrays each, the
    hi and lo parts (`kc.split_bf16`), which the state pass loads straight into its dots, or one
    float16 array (for the state pass's `fp16_products`). `x_parts`: how many refs X takes.

    Works one 16-row block a at a time (block forward substitution by rows), loading k/q blocks
    when needed and storing each finished block at once, so few tiles are live in registers.

    `stack_qk`: a last output KQ [N*2C, Hk*K] gets this chunk's k rows then its q rows (zeros past
    the chunk's end), written by the first value head of each key head, for the state pass's
    stacked dot (`state_pass(kq=...)`).
    """
    # Value heads vary fastest in the launch order, so the G heads that share a key head (and its
    # q, k loads) run side by side.
    j = pl.program_id(0)
    c = pl.program_id(1)
    h = j // group
    start = starts_ref[c]
    length = lens_ref[c]
    nb = chunk // _BLOCK
    ids = lax.broadcasted_iota(jnp.int32, (_BLOCK,), 0)
    feature_cols = pl.ds(h * key_dim, key_dim)

    def rows(a):
        return pl.ds(start + a * _BLOCK, _BLOCK)

    def valid(a):  # past the chunk's end: k = q = 0, beta = g = 0
        return a * _BLOCK + ids < length

    def load_qk(ref, a):  # [16, K]
        mask = jnp.broadcast_to(valid(a)[:, None], (_BLOCK, key_dim))
        return kc.load(ref.at[rows(a), feature_cols], mask=mask, other=0)

    gammas, betas = [], []
    offset = jnp.zeros((), F32)
    for a in range(nb):
        g_a = kc.load(g_ref.at[rows(a), j], mask=valid(a), other=0).astype(F32)
        betas.append(kc.load(beta_ref.at[rows(a), j], mask=valid(a), other=0).astype(F32))
        # gamma within the chunk: the block's own prefix sum plus the sum of the blocks before it.
        gammas.append(jnp.cumsum(g_a) + offset)
        offset = offset + jnp.sum(g_a)

    rows2, cols2 = _iota2(_BLOCK)
    base = (c * num_value_heads + j) * chunk
    zeros = jnp.zeros((_BLOCK, _BLOCK), F32)

    if stack_qk:
        kq_ref, out_refs = out_refs[-1], out_refs[:-1]

        @pl.when(j % group == 0)
        def _():  # its own loads (L1 hits after the first), so no k/q block stays live past here
            for a in range(nb):
                kq_ref[pl.ds(c * 2 * chunk + a * _BLOCK, _BLOCK), feature_cols] = load_qk(k_ref, a)
                kq_ref[pl.ds((c * 2 + 1) * chunk + a * _BLOCK, _BLOCK), feature_cols] = load_qk(q_ref, a)

    x_ref, p_ref = out_refs[:x_parts], out_refs[x_parts:]

    def put(refs, a, b, val):
        parts = kc.split_bf16(val) if len(refs) == 2 else (val,)
        for ref, part in zip(refs, parts):
            ref[pl.ds(base + a * _BLOCK, _BLOCK), pl.ds(b * _BLOCK, _BLOCK)] = part.astype(ref.dtype)

    x_blk = {}
    for a in range(nb):
        k_a = load_qk(k_ref, a)
        q_a = load_qk(q_ref, a)
        a_row = {}
        for b in range(a + 1):
            k_b = k_a if b == a else load_qk(k_ref, b)
            # exp of a difference of prefix sums, clamped at 0 (never exp(gamma_i) * exp(-gamma_j),
            # which overflows); on the diagonal blocks the upper triangle is masked to 0.
            decay = jnp.exp(jnp.minimum(gammas[a][:, None] - gammas[b][None, :], 0.0))
            if a == b:
                decay_incl = jnp.where(rows2 >= cols2, decay, 0.0)
                decay_strict = jnp.where(rows2 > cols2, decay, 0.0)
            else:
                decay_incl = decay_strict = decay
            kk = kc.mm(k_a, k_b, precision, trans_b=True)
            a_row[b] = betas[a][:, None] * kk * decay_strict
            put(p_ref, a, b, kc.mm(q_a, k_b, precision, trans_b=True) * decay_incl)
        for b in range(a + 1, nb):
            put(p_ref, a, b, zeros)
            put(x_ref, a, b, zeros)
        # Row block a of X: X_aa by forward substitution, then X_ab = -X_aa sum_m A_am X_mb.
        x_aa = _unit_lower_inverse(a_row[a])
        for b in range(a):
            acc = kc.mm(a_row[b], x_blk[b, b], precision)
            for m in range(b + 1, a):
                acc = acc + kc.mm(a_row[m], x_blk[m, b], precision)
            x_blk[a, b] = -kc.mm(x_aa, acc, precision)
            put(x_ref, a, b, x_blk[a, b])
        x_blk[a, a] = x_aa
        put(x_ref, a, a, x_aa)


def _state_pass_kernel(first_ref, cu_ref, q_ref, k_ref, v_ref, g_ref, beta_ref, *rest,
                       chunk, num_value_heads, group, key_dim, value_dim, block_v, precision,
                       has_initial_state, x_parts, p_parts, fuse=frozenset(), transposed=False,
                       wide=frozenset(), stacked=False, low=frozenset(), half=frozenset(),
                       scaled=False):
    """The chunks of sequence s for value head j and value columns [vb*BV, (vb+1)*BV), in order.

    Refs: first [S+1] int32 (sequence s owns chunk slots first[s] .. first[s+1]-1); cu [S+1] int32
    (sequence s is tokens cu[s] .. cu[s+1]-1); q, k [Ttot, Hk*K]; v [Ttot, Hv*V]; g, beta
    [Ttot, Hv]; X then P [N*Hv*C, C] (`x_parts` and `p_parts` refs: float32 or float16, or bf16 hi
    and lo); optional h0 [S*Hv*K, V]; outputs o [Ttot, Hv*V], ht [S*Hv*K, V] float32.

    `transposed`: the same products with the state held as S^T [BV, K] and every product written
    with its register-resident factor (S^T, rhs^T, V'^T) on the left (`_transposed_step`): the
    tensor cores take a left operand from registers but a right one only from shared memory, so
    the loaded tiles (k, q, X, P) go on the right as the load pipeline staged them and no computed
    tile is copied to shared memory before its dot. Measured slower (NOTES.md run 8).

    `stacked`: a KQ ref [N*2C, Hk*K] (`intra_chunk(stack_qk=True)`) follows beta: K S and Q S
    are one dot of M = 2C per bf16 part of S. `wide`: the products (FUSABLE_PRODUCTS names) computed by
    `kc.mm_wide`. Both cut the dots per chunk, each of which Triton waits for before the next.
    `low`: the products computed as one bf16 dot of their operands rounded to bf16 (the hi part of
    `kc.split_bf16`; the unused lo part is dead code the compiler drops). `half`: the products
    computed as one fp16 dot of their operands rounded to fp16 (`kc.to_half`). `scaled`: a
    [1] float32 ref (a power of two, `fp16_scale`) follows beta; v and h0 are multiplied by it as
    they are loaded, o and the final state divided by it as they are stored (the rule is linear in
    v and h0, and a power of two rescales exactly), so the fp16 operands sit in fp16's range.
    """
    if scaled:
        scale_ref, rest = rest[0], rest[1:]
        scale = scale_ref[0]
    else:
        scale = None
    if stacked:
        kq_ref, rest = rest[0], rest[1:]
    x_ref, p_ref = rest[:x_parts], rest[x_parts:x_parts + p_parts]
    rest = rest[x_parts + p_parts:]
    if has_initial_state:
        h0_ref, o_ref, ht_ref = rest
    else:
        o_ref, ht_ref = rest
    # V blocks vary fastest in the launch order: the programs of one head that read the same q, k,
    # X, P run side by side and share them through L2.
    vb = pl.program_id(0)
    sj = pl.program_id(1)
    seq = sj // num_value_heads
    j = sj % num_value_heads
    h = j // group
    state_rows = pl.ds(sj * key_dim, key_dim)
    state_cols = pl.ds(vb * block_v, block_v)
    if has_initial_state:
        s0 = h0_ref[state_rows, state_cols].astype(F32)
        if scaled:
            s0 = s0 * scale
    else:
        s0 = jnp.zeros((key_dim, block_v), F32)
    ids = lax.broadcasted_iota(jnp.int32, (chunk,), 0)
    # A sequence's chunks are consecutive slots over consecutive tokens, so slot c starts at an
    # affine function of c: no per-chunk table lookup (a scalar load whose latency the loads of the
    # chunk's tiles would wait for in every iteration, before the software pipeliner can issue them).
    first_slot, seq_start, seq_end = first_ref[seq], cu_ref[seq], cu_ref[seq + 1]
    v_cols = pl.ds(j * value_dim + vb * block_v, block_v)
    k_cols = pl.ds(h * key_dim, key_dim)

    def chunk_inputs(c):
        """Chunk slot c: k [C, K]; q [C, K] (stacked: [k; q], [2C, K]); v [C, BV] fp32; X, P
        [C, C] (fp32, fp16 or (hi, lo) bf16); gamma (in-chunk prefix sums of g), gamma_end; beta [C];
        the store of o [C, BV]."""
        start = seq_start + (c - first_slot) * chunk
        rows = pl.ds(start, chunk)
        valid = ids < seq_end - start
        valid_k = jnp.broadcast_to(valid[:, None], (chunk, key_dim))
        valid_v = jnp.broadcast_to(valid[:, None], (chunk, block_v))
        k = kc.load(k_ref.at[rows, k_cols], mask=valid_k, other=0)
        # k again for the update (K^T V'): one load per use, so each is a plain dot operand that
        # the pipeliner copies ahead asynchronously (one tile with two uses was loaded in-line).
        # The mask is the same predicate written differently, so the compiler does not merge the
        # two loads back into one.
        valid_update = jnp.broadcast_to((ids + start < seq_end)[:, None], (chunk, key_dim))
        k_update = kc.load(k_ref.at[rows, k_cols], mask=valid_update, other=0)
        if stacked:  # [2C, K]: k rows then q rows, already zero past the chunk's end
            q = kc.load(kq_ref.at[pl.ds(c * 2 * chunk, 2 * chunk), k_cols])
        else:
            q = kc.load(q_ref.at[rows, k_cols], mask=valid_k, other=0)
        v = kc.load(v_ref.at[rows, v_cols], mask=valid_v, other=0).astype(F32)
        if scaled:
            v = v * scale
        g = kc.load(g_ref.at[rows, j], mask=valid, other=0).astype(F32)
        beta = kc.load(beta_ref.at[rows, j], mask=valid, other=0).astype(F32)
        mat_rows = pl.ds((c * num_value_heads + j) * chunk, chunk)
        # [C, C]: an fp32 tile, or the (hi, lo) bf16 parts, which go to the dots as loaded
        x = x_ref[0][mat_rows, :] if x_parts == 1 else tuple(r[mat_rows, :] for r in x_ref)
        p = p_ref[0][mat_rows, :] if p_parts == 1 else tuple(r[mat_rows, :] for r in p_ref)

        def store_o(o):
            if scaled:
                o = o * (1.0 / scale)
            kc.store(o_ref.at[rows, v_cols], o.astype(o_ref.dtype), mask=valid_v)

        # gamma_end: gamma of the last token (padded tokens have g = 0)
        return k, k_update, q, v, x, p, jnp.cumsum(g), jnp.sum(g), beta, store_o

    if transposed:
        step = functools.partial(_transposed_step, precision=precision)

        def transposed_body(c, s_t):
            k, _, *others = chunk_inputs(c)  # one k tile serves both products here
            return step(k, *others, s_t)

        s = lax.fori_loop(first_ref[seq], first_ref[seq + 1], transposed_body, s0.T).T
        ht_ref[state_rows, state_cols] = s
        return

    def body(c, s):
        k, k_update, q, v, x, p, gamma, gamma_end, beta, store_o = chunk_inputs(c)
        decay_in = jnp.exp(gamma)[:, None]  # chunk start -> token i
        decay_out = jnp.exp(jnp.minimum(gamma_end - gamma, 0.0))[:, None]  # token i -> chunk end
        # Accumulators keep fewer [C, BV] / [K, BV] fp32 tiles live (the 4-warp program is
        # register-bound): e^gamma Q S goes in as the accumulator of P V', and the decayed state
        # as that of the update's dot. (Forming Q S after V' instead spilled more: NOTES run 6.)
        def product(name, a, b, **kw):
            if name in low:
                return kc.mm(kc.split_bf16(a)[0], kc.split_bf16(b)[0], precision, **kw)
            if name in half:
                return kc.mm(kc.to_half(a), kc.to_half(b), precision, **kw)
            if name in wide:
                return kc.mm_wide(a, b, **kw)
            return kc.mm(a, b, precision, fuse=name in fuse, **kw)

        if stacked:  # one dot of [k; q] per part of S, its halves split apart in registers
            ks, qs = jnp.split(product("ks", q, s), 2, axis=0)
        else:
            ks = product("ks", k, s)  # [C, BV]
            qs = product("qs", q, s)
        rhs = beta[:, None] * (v - decay_in * ks)
        v_new = product("xv", x, rhs)
        store_o(product("pv", p, v_new, acc=decay_in * qs))
        # The decay to the chunk end goes on v_new, not on k: k stays exact in bf16 models.
        return product("update", k_update, decay_out * v_new, trans_a=True, acc=jnp.exp(gamma_end) * s)

    s = lax.fori_loop(first_ref[seq], first_ref[seq + 1], body, s0)
    ht_ref[state_rows, state_cols] = s if scale is None else s * (1.0 / scale)


def _transposed_step(k, q, v, x, p, gamma, gamma_end, beta, store_o, s_t, *, precision):
    """One chunk of the state pass on S^T [BV, K] (its `transposed` option). Per-token scalars are
    row vectors [1, C]:

        (K S)^T = S^T K^T,  rhs^T = beta (V^T - e^gamma (K S)^T),  V'^T = rhs^T X^T,
        O^T = e^gamma (S^T Q^T) + V'^T P^T,  S^T <- e^gamma_C S^T + (e^(gamma_C - gamma) V'^T) K
    """
    decay_in = jnp.exp(gamma)[None, :]
    decay_out = jnp.exp(jnp.minimum(gamma_end - gamma, 0.0))[None, :]
    ks_t = kc.mm(s_t, k, precision, trans_b=True)  # [BV, C]
    qs_t = kc.mm(s_t, q, precision, trans_b=True)
    rhs_t = beta[None, :] * (v.T - decay_in * ks_t)
    v_new_t = kc.mm(rhs_t, x, precision, trans_b=True)
    store_o(kc.mm(v_new_t, p, precision, trans_b=True, acc=decay_in * qs_t).T)
    return kc.mm(decay_out * v_new_t, k, precision, acc=jnp.exp(gamma_end) * s_t)  # [BV, K]


def concrete_offsets(cu_seqlens):
    """cu_seqlens as a numpy int64 array when its values are known at trace time, else None."""
    try:
        return np.asarray(cu_seqlens, np.int64)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None


def chunk_table(cu_seqlens, total_tokens: int, chunk: int):
    """Chunks that never cross a sequence boundary.

    Args:
      cu_seqlens: [S+1] int sequence offsets into the packed token axis (numpy/list: the table is
        built on the host with exactly as many slots as chunks; a traced array: built on device with
        an upper bound of slots, the spare ones empty).
      total_tokens: Ttot, the packed length.

    Returns:
      (first [S+1], starts [N], lens [N]) int32: sequence s owns slots first[s] .. first[s+1]-1;
      slot c covers tokens starts[c] .. starts[c] + lens[c] - 1 (lens[c] <= C; 0 for spare slots).
    """
    host = concrete_offsets(cu_seqlens)
    if host is None:
        cu = jnp.asarray(cu_seqlens).astype(jnp.int32)
        num_seqs = cu.shape[0] - 1
        # sum_s ceil(len_s / C) <= (Ttot + S (C - 1)) / C
        num_slots = max(1, (total_tokens + num_seqs * (chunk - 1)) // chunk)
        counts = (cu[1:] - cu[:-1] + chunk - 1) // chunk
        first = jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(counts).astype(jnp.int32)])
        slot = jnp.arange(num_slots, dtype=jnp.int32)
        seq = jnp.clip(jnp.searchsorted(first[1:], slot, side="right"), 0, num_seqs - 1)
        starts = cu[seq] + (slot - first[seq]) * chunk
        lens = jnp.clip(cu[seq + 1] - starts, 0, chunk)
        used = slot < first[-1]
        return first, jnp.where(used, starts, 0), jnp.where(used, lens, 0)
    cu = host
    counts = -(-np.diff(cu) // chunk)
    first = np.concatenate([[0], np.cumsum(counts)])
    starts = np.concatenate([cu[s] + chunk * np.arange(n) for s, n in enumerate(counts)] + [[0]])
    starts = starts[: max(1, first[-1])]  # a grid cannot be empty: keep one spare slot if needed
    seq = np.clip(np.searchsorted(first[1:], np.arange(len(starts)), side="right"), 0, len(cu) - 2)
    lens = np.clip(cu[seq + 1] - starts, 0, chunk) * (np.arange(len(starts)) < first[-1])
    return tuple(jnp.asarray(x, jnp.int32) for x in (first, starts, lens))


def intra_chunk(q2, k2, g2, beta2, starts, lens, *, chunk_size, group, precision="tf32x3",
                num_warps=4, split=None, stack_qk=False, fp16=(), interpret=False):
    """Kernel 1 on packed 2-D views: q2, k2 [Ttot, Hk*K]; g2, beta2 [Ttot, Hv]; chunk table
    starts, lens [N]. Returns (X, P), each [N*Hv*C, C] float32, or with `split` (default: precision
    "bf16x3") each a (hi, lo) pair of bf16 arrays: the same 4 bytes per entry, and the state pass
    then feeds its dots the tiles as loaded (shared-memory operands), with no fp32 tile and no
    split in its registers (at BV=64 that removed its register spills: 320 -> 20 bytes).
    `stack_qk`: also returns KQ [N*2C, Hk*K] (each chunk's k rows then its q rows, in q2's dtype)
    as a third value, for `state_pass(kq=...)`. `fp16`: "x" and/or "p", the matrices stored as one
    float16 array instead (for the state pass's `fp16_products` "xv" / "pv": half the bytes)."""
    num_value_heads = g2.shape[1]
    key_dim = q2.shape[1] * group // num_value_heads
    num_slots = starts.shape[0]
    rows = num_slots * num_value_heads * chunk_size
    split = precision == "bf16x3" if split is None else split
    if split and precision != "bf16x3":
        raise ValueError(f"split (hi, lo) X and P need precision 'bf16x3', got {precision!r}")
    unknown = set(fp16) - {"x", "p"}
    if unknown:
        raise ValueError(f"fp16 names the matrices 'x' and 'p', got {sorted(unknown)}")

    def mat(name):
        if name in fp16:
            return (jax.ShapeDtypeStruct((rows, chunk_size), jnp.float16),)
        return ((jax.ShapeDtypeStruct((rows, chunk_size), jnp.bfloat16),) * 2 if split
                else (jax.ShapeDtypeStruct((rows, chunk_size), F32),))

    x_mat, p_mat = mat("x"), mat("p")
    outs = pl.pallas_call(
        functools.partial(_intra_chunk_kernel, chunk=chunk_size, num_value_heads=num_value_heads,
                          group=group, key_dim=key_dim, stack_qk=stack_qk, x_parts=len(x_mat),
                          precision=kc.dot_precision(precision, interpret)),
        out_shape=x_mat + p_mat + ((jax.ShapeDtypeStruct((num_slots * 2 * chunk_size, q2.shape[1]), q2.dtype),)
                               if stack_qk else ()),
        grid=(num_value_heads, num_slots),
        compiler_params=kc.compiler_params(num_warps=num_warps, num_stages=1),
        interpret=interpret,
        name="gated_delta_intra_chunk",
    )(starts, lens, q2, k2, g2, beta2)
    kq = outs[-1:] if stack_qk else ()
    outs = outs[:-1] if stack_qk else outs
    x_out, p_out = outs[:len(x_mat)], outs[len(x_mat):]
    return tuple(m[0] if len(m) == 1 else tuple(m) for m in (x_out, p_out)) + kq


# The state pass's products (names for `fuse_products` and `wide_products`): k S, q S, X V-rhs,
# P V', and the update K^T V'.
FUSABLE_PRODUCTS = ("ks", "qs", "xv", "pv", "update")


def product_names(spec, option: str = "fuse_products") -> frozenset:
    """The products named by a `fuse_products` / `wide_products` value: True (all), False / None /
    "" (none), or a comma string or sequence of FUSABLE_PRODUCTS names (the offline compile found
    different register spills for each subset: NOTES.md runs 7 and 9)."""
    if spec is True:
        return frozenset(FUSABLE_PRODUCTS)
    if not spec:
        return frozenset()
    names = spec.split(",") if isinstance(spec, str) else list(spec)
    unknown = [n for n in names if n not in FUSABLE_PRODUCTS]
    if unknown:
        raise ValueError(f"{option}: unknown product(s) {unknown}; the state pass has {FUSABLE_PRODUCTS}")
    return frozenset(names)


def fused_products(fuse_products) -> frozenset:
    """`product_names` of a `fuse_products` value."""
    return product_names(fuse_products, "fuse_products")


# Inputs for which fp16_products=None means all five products in fp16 (`default_fp16_products`).
SIXTEEN_BIT = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def default_fp16_products(dtypes, precision="bf16x3", *, fuse_products=False, transposed=False,
                          wide_products=False, stack_qk=False, bf16_products=False) -> bool:
    """What `fp16_products=None` means: all five products in fp16 when q, k and v (`dtypes`) are
    all 16-bit floats, precision is "bf16x3" (the default; another precision is honoured as
    asked) and no other per-product option is given; else none. With 16-bit inputs
    their own rounding (bf16: 2^-8) already exceeds fp16's per-operand 2^-11, the error stays
    within the issue's bounds (o 1.2e-3 with bf16 o at (1, 4096) on an H100,
    `scripts/bench_gated_delta.py`; o before rounding 3.6e-4 and the final state 2.9e-4 in
    interpret mode, NOTES.md run 11), and
    the state pass runs 5 dots per chunk with a 3-stage pipeline (NOTES.md run 12). fp32 inputs
    keep `precision` for every product (their bound is tighter)."""
    others = (fuse_products, transposed, wide_products, stack_qk, bf16_products)
    return all(jnp.dtype(d) in SIXTEEN_BIT for d in dtypes) and precision == "bf16x3" and not any(others)


def default_num_stages(dtypes, fp16_products, block_v: int, stack_qk: bool = False) -> int:
    """What `num_stages=None` means for the state pass: its pipeline depth, the deepest that fits
    the H100's 227 KB of shared memory per block. fp32 q/k/v tiles are twice the size: 1 stage
    (2 stages need 246 KB at tf32x3 and BV=64 on an H100). 16-bit inputs with all five products
    in fp16 (X and P then one fp16 tile each) and BV <= 64: 3 stages (BV=64: 157 KB offline, 181 KB
    on the device by Nsight Compute;
    0.31 ms for the state pass at (1, 4096) against 0.38 at 2 stages, H100, NOTES.md run 12).
    Otherwise 2 (bf16x3's hi/lo X and P at 3 stages would need 296 KB)."""
    if any(jnp.dtype(d) not in SIXTEEN_BIT for d in dtypes):
        return 1
    if product_names(fp16_products, "fp16_products") == frozenset(FUSABLE_PRODUCTS) \
            and block_v <= 64 and not stack_qk:
        return 3
    return 2


def resolve_defaults(dtypes, precision, block_v: int, *, fp16_products=None, num_stages=None,
                     fuse_products=False, transposed=False, wide_products=False, stack_qk=False,
                     bf16_products=False):
    """(fp16_products, num_stages) with None resolved by `default_fp16_products` and
    `default_num_stages` for q, k, v of these `dtypes` (what `chunk_gated_delta_rule_pallas` and
    scripts/offline_compile.py run)."""
    if fp16_products is None:
        fp16_products = default_fp16_products(
            dtypes, precision, fuse_products=fuse_products, transposed=transposed,
            wide_products=wide_products, stack_qk=stack_qk, bf16_products=bf16_products)
    if num_stages is None:
        num_stages = default_num_stages(dtypes, fp16_products, block_v, stack_qk)
    return fp16_products, num_stages


# fp16_products: v and h0 are rescaled so that their largest magnitude lies in [8, 16): fp16's
# normal range then spans 2^12 of headroom above it (for the state and V', which grow from v by
# at most a modest factor) and 2^18 below it before subnormals.
FP16_TARGET_EXPONENT = 4


def fp16_scale(v2, h0=None):
    """[1] float32 power of two that brings max(|v|, |h0|) into [8, 16) (1 when that maximum is 0
    or not finite: an inf or NaN input then propagates as in the reference)."""
    m = jnp.max(jnp.abs(v2)).astype(F32)
    if h0 is not None:
        m = jnp.maximum(m, jnp.max(jnp.abs(h0)).astype(F32))
    _, e = jnp.frexp(m)  # m = f 2^e, f in [0.5, 1)
    e = jnp.clip(e, -100, 100)
    ok = jnp.isfinite(m) & (m > 0)
    return jnp.where(ok, jnp.ldexp(jnp.ones((), F32), FP16_TARGET_EXPONENT - e), 1.0).reshape(1)


def state_pass(q2, k2, v2, g2, beta2, x, p, h0, first, cu, *, chunk_size, group, out_dtype,
               precision="tf32x3", block_v=32, num_warps=4, num_stages=2, fuse_products=False,
               transposed=False, wide_products=False, kq=None, bf16_products=False,
               fp16_products=False, interpret=False):
    """Kernel 2 on packed 2-D views (see `intra_chunk`, whose (X, P) it takes as returned;
    v2 [Ttot, Hv*V], h0 [S*Hv*K, V] or None; first from `chunk_table`, cu [S+1] the sequence offsets
    it was built from). beta goes to the kernel as float32 (so that its per-chunk [C] tile is wide
    enough for the pipeliner's asynchronous copies). `fuse_products` (bf16x3): the products whose bf16
    parts go in one dot (`kernel_common.mm_fused`) instead of one dot per part (`fused_products`).
    `transposed`: the body that holds S^T (see `_state_pass_kernel`); the same results.
    `wide_products` (bf16x3; names as `fuse_products`): the products computed by `kc.mm_wide`, the
    right operand's bf16 parts side by side along N. `kq`: the stacked [k; q] rows from
    `intra_chunk(stack_qk=True)`: K S and Q S as one dot (with "ks" and "qs" both wide or neither).
    `bf16_products` (names as `fuse_products`): products computed as one bf16 dot of their operands
    rounded to bf16, the rounding error of a single bf16 pass. "qs" and "pv" only reach o; "ks",
    "xv" and "update" feed the state, so their error compounds over the chunks.
    `fp16_products` (names as `fuse_products`): products computed as one fp16 dot of their operands
    rounded to fp16 (`kc.to_half`: 8x less rounding error than bf16, fp16's range). X and P may be
    float16 arrays (`intra_chunk(fp16=...)`) when their products are named here. With any fp16
    product, v and h0 are rescaled by a power of two (`fp16_scale`: one XLA reduction over v) and
    the results scaled back, so the fp16 operands are in range whatever the scale of v.
    Returns (o2 [Ttot, Hv*V] in out_dtype, ht [S*Hv*K, V] float32)."""
    total, num_value_heads = g2.shape
    value_dim = v2.shape[1] // num_value_heads
    key_dim = q2.shape[1] * group // num_value_heads
    num_seqs = first.shape[0] - 1
    bv = min(block_v, value_dim)
    has_h0 = h0 is not None
    fuse = fused_products(fuse_products)
    wide = product_names(wide_products, "wide_products")
    stacked = kq is not None
    low = product_names(bf16_products, "bf16_products")
    half = product_names(fp16_products, "fp16_products")
    for rounded, names in (("bf16_products", low), ("fp16_products", half)):
        if names and transposed:
            raise ValueError(f"{rounded} and transposed do not combine (the transposed body has no per-product precision)")
        for option, others in (("fuse_products", fuse), ("wide_products", wide)):
            if names & others:
                raise ValueError(f"products both in {rounded} and in {option}: {sorted(names & others)}")
        if stacked and len(names & {"ks", "qs"}) == 1:
            raise ValueError(f"with kq (one dot for K S and Q S), 'ks' and 'qs' are in {rounded} together or not at all")
    if low & half:
        raise ValueError(f"products both in bf16_products and in fp16_products: {sorted(low & half)}")
    if fuse and transposed:
        raise ValueError("fuse_products and transposed do not combine (the transposed body has no fused products)")
    for option, names in (("fuse_products", fuse), ("wide_products", wide)):
        if names and precision != "bf16x3":
            raise ValueError(f"{option} needs precision 'bf16x3' (it rearranges the bf16 parts), got {precision!r}")
    if transposed and (wide or stacked):
        raise ValueError("wide_products and kq (stacked k, q) do not combine with transposed")
    if fuse & wide:
        raise ValueError(f"products both fused and wide: {sorted(fuse & wide)}")
    if stacked and (fuse & {"ks", "qs"} or len(wide & {"ks", "qs"}) == 1):
        raise ValueError("with kq (one dot for K S and Q S), 'ks' and 'qs' cannot be fused, and are wide together or not at all")
    x_parts, p_parts = (m if isinstance(m, tuple) else (m,) for m in (x, p))
    num_slots = x_parts[0].shape[0] // (num_value_heads * chunk_size)
    if stacked and kq.shape != (num_slots * 2 * chunk_size, q2.shape[1]):
        raise ValueError(f"kq has shape {kq.shape}; intra_chunk(stack_qk=True) gives "
                         f"{(num_slots * 2 * chunk_size, q2.shape[1])} for this chunk table")
    cu = jnp.asarray(cu).astype(jnp.int32)
    if cu.shape != first.shape:
        raise ValueError(f"cu has shape {cu.shape}; the chunk table's first has {first.shape} (one offset per sequence + 1)")
    for name, parts, product in (("X", x_parts, "xv"), ("P", p_parts, "pv")):
        if len(parts) == 1 and parts[0].dtype == jnp.float16 and product not in half:
            raise ValueError(f"{name} is float16, which only fp16_products={product!r} reads; "
                             f"store it as float32 or (hi, lo) bf16 for precision {precision!r}")
        if len(parts) not in (1, 2) or (len(parts) == 1 and parts[0].dtype not in (F32, jnp.float16)):
            raise ValueError(f"{name} must be a float32 or float16 array or a (hi, lo) bf16 pair")
    return pl.pallas_call(
        functools.partial(_state_pass_kernel, chunk=chunk_size, num_value_heads=num_value_heads,
                          group=group, key_dim=key_dim, value_dim=value_dim, block_v=bv,
                          precision=kc.dot_precision(precision, interpret), has_initial_state=has_h0,
                          x_parts=len(x_parts), p_parts=len(p_parts), fuse=fuse,
                          transposed=transposed, wide=wide, stacked=stacked, low=low, half=half,
                          scaled=bool(half)),
        out_shape=(
            jax.ShapeDtypeStruct((total, num_value_heads * value_dim), out_dtype),
            jax.ShapeDtypeStruct((num_seqs * num_value_heads * key_dim, value_dim), F32),
        ),
        grid=(value_dim // bv, num_seqs * num_value_heads),
        compiler_params=kc.compiler_params(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="gated_delta_state_pass",
    )(first, cu, q2, k2, v2, g2, beta2.astype(F32), *((fp16_scale(v2, h0),) if half else ()),
      *(() if kq is None else (kq,)), *x_parts, *p_parts,
      *(() if h0 is None else (h0,)))


@functools.partial(
    jax.jit,
    static_argnames=("chunk_size", "out_dtype", "precision", "block_v", "num_warps", "num_stages",
                     "num_warps_intra", "fuse_products", "transposed", "wide_products", "stack_qk",
                     "bf16_products", "fp16_products", "interpret"),
)
def _chunk_gated_delta_packed(q, k, v, g, beta, initial_state, first, starts, lens, cu, *, chunk_size,
                              out_dtype, precision, block_v, num_warps, num_stages, num_warps_intra,
                              interpret, fuse_products=False, transposed=False, wide_products="",
                              stack_qk=False, bf16_products="", fp16_products=""):
    """The two kernels on packed tokens: q, k [Ttot, Hk, K]; v [Ttot, Hv, V]; g, beta [Ttot, Hv];
    initial_state [S, Hv, K, V] or None; chunk table from `chunk_table` and the offsets cu [S+1]
    it was built from. K, V powers of two >= 16."""
    total, num_key_heads, key_dim = k.shape
    num_value_heads, value_dim = v.shape[-2:]
    group = num_value_heads // num_key_heads
    num_seqs = first.shape[0] - 1
    q2 = q.reshape(total, num_key_heads * key_dim)
    k2 = k.reshape(total, num_key_heads * key_dim)
    v2 = v.reshape(total, num_value_heads * value_dim)
    g2 = g.astype(F32)
    x, p, *kq = intra_chunk(q2, k2, g2, beta, starts, lens, chunk_size=chunk_size, group=group,
                            precision=precision, num_warps=num_warps_intra, stack_qk=stack_qk,
                            fp16=tuple(m for m, prod in (("x", "xv"), ("p", "pv"))
                                       if prod in fp16_products.split(",")),
                            interpret=interpret)
    h0 = None
    if initial_state is not None:
        h0 = initial_state.astype(F32).reshape(num_seqs * num_value_heads * key_dim, value_dim)
    o2, ht = state_pass(q2, k2, v2, g2, beta, x, p, h0, first, cu, chunk_size=chunk_size,
                        group=group, out_dtype=out_dtype, precision=precision, block_v=block_v,
                        num_warps=num_warps, num_stages=num_stages, fuse_products=fuse_products,
                        transposed=transposed, wide_products=wide_products,
                        kq=kq[0] if kq else None, bf16_products=bf16_products,
                        fp16_products=fp16_products, interpret=interpret)
    return (o2.reshape(total, num_value_heads, value_dim),
            ht.reshape(num_seqs, num_value_heads, key_dim, value_dim))


def chunk_gated_delta_rule_pallas(q, k, v, g, beta, initial_state=None, *, cu_seqlens=None,
                                  chunk_size: int = 64, out_dtype=None, precision: str = "bf16x3",
                                  block_v: int = 64, num_warps: int = 4, num_stages: int | None = None,
                                  num_warps_intra: int = 1, fuse_products: bool | str = False,
                                  transposed: bool = False, wide_products: bool | str = False,
                                  stack_qk: bool = False, bf16_products: bool | str = False,
                                  fp16_products: bool | str | None = None, interpret: bool = False):
    """Chunked gated delta rule with the Pallas kernels (forward only; see api for gradients).

    Args:
      q, k: [B, T, Hk, K], l2-normalised (q also scaled by K**-0.5).
      v: [B, T, Hv, V], Hv a multiple of Hk.
      g: [B, T, Hv] float32 log-decay; beta: [B, T, Hv].
      initial_state: optional [S, Hv, K, V] float32 (S = B, or the number of packed sequences).
      cu_seqlens: optional [S+1] offsets of sequences packed along T (then B must be 1).
      chunk_size: C in CHUNK_SIZES.
      precision: in-kernel dot arithmetic for fp32 operands, one of kernel_common.PRECISIONS.
      block_v: BV, value columns per program of the state pass (a power of two >= 16). The
        defaults (bf16x3, BV=64, 4 warps; 1 warp for the intra-chunk kernel) were the fastest
        measured on an H200 and again on an H100 (2026-12-06, B=1, T=4096: 0.534 ms in all,
        against 0.587-0.761 for BV=32 or 8 warps; NOTES.md run 6; 8 warps again slower with fp16
        products, run 12).
      num_stages: the state pass's pipeline depth; None: `default_num_stages` (3 for 16-bit
        inputs with all products in fp16, 2 for other 16-bit settings, 1 for fp32 inputs).
      fuse_products: state pass, bf16x3 only: the bf16 parts of a product in one dot of 2 or 4
        times the depth; True for every product, or a comma string of FUSABLE_PRODUCTS names
        (experimental: 1.6-2.2x slower as a piece on an H200, from register spills; NOTES.md
        runs 7 and 8).
      transposed: state pass with S^T held, so that no computed tile is staged in shared memory
        before a dot (experimental: 1.3x slower as a piece on an H200; NOTES.md run 8).
      wide_products: state pass, bf16x3 only: the products (True for all, or a comma string of
        FUSABLE_PRODUCTS names) whose right operand's bf16 parts go side by side along N in one
        dot (`kernel_common.mm_wide`): fewer dots per chunk, the same products (experimental:
        the state pass 0.38 -> 0.53 ms on an H100; NOTES.md run 10).
      stack_qk: the intra-chunk kernel also writes each chunk's [k; q] rows, and the state pass
        forms K S and Q S in one dot of 2C rows (experimental: no faster; NOTES.md run 10).
      bf16_products: state pass: the products (True for all, or a comma string of
        FUSABLE_PRODUCTS names) computed as one bf16 dot of their operands rounded to bf16 instead
        of at `precision`. "qs" and "pv" only reach o (one rounding of S, P and V' per chunk);
        "ks", "xv" and "update" feed the state, where the error compounds over the chunks.
        (Experimental: "qs" measured within the noise of the defaults on an H100; NOTES.md run 10.)
      fp16_products: state pass: the products (True for all, or a comma string) computed as one
        fp16 dot of their operands rounded to fp16 (2^-11 relative per rounding against bf16's
        2^-8; X and P are then stored as fp16 by the intra-chunk kernel). With all five the state
        pass runs 5 dots per chunk instead of 12. None (the default): `default_fp16_products`,
        all five for bf16/fp16 q, k, v at precision "bf16x3", else none; False keeps every
        product at `precision` (error of o 1.4e-4 against 1.2e-3 with bf16 o, 1.2-1.3x slower:
        NOTES.md run 12). v and the initial state are first rescaled by a
        power of two so their largest entry is in [8, 16) (one XLA reduction over v), and o and
        the final state scaled back, so fp16's range does not depend on the inputs' scale; a state
        that still outgrew fp16 (2^12 above the largest input) would come out inf/NaN, never
        finite and wrong. (At (1, 4096) on an H100: 0.42 ms in all with 3 stages against
        0.51-0.55 for every product at bf16x3 and 0.53-0.77 for fla; NOTES.md run 12.)

    Returns:
      (o [B, T, Hv, V] in out_dtype (default v.dtype), final_state [S, Hv, K, V] float32).
    """
    if chunk_size not in CHUNK_SIZES:
        raise ValueError(f"chunk_size must be one of {CHUNK_SIZES} for the Pallas kernels, got {chunk_size}")
    batch, seq_len, num_key_heads, key_dim = k.shape
    num_value_heads, value_dim = v.shape[-2:]
    out_dtype = jnp.dtype(v.dtype if out_dtype is None else out_dtype)
    total = batch * seq_len
    if cu_seqlens is None:
        cu_seqlens = np.arange(batch + 1) * seq_len
    elif batch != 1:
        raise ValueError(f"with cu_seqlens the batch must be 1 (sequences packed along T), got B={batch}")
    first, starts, lens = chunk_table(cu_seqlens, total, chunk_size)
    fp16_products, num_stages = resolve_defaults(
        (q.dtype, k.dtype, v.dtype), precision, block_v, fp16_products=fp16_products,
        num_stages=num_stages, fuse_products=fuse_products, transposed=transposed,
        wide_products=wide_products, stack_qk=stack_qk, bf16_products=bf16_products)
    # Power-of-two feature dims for Triton (>= 16 for its dots); zero padding is exact.
    kp, vp = kc.pow2_at_least(key_dim), kc.pow2_at_least(value_dim)
    if not kc.is_pow2(block_v) or block_v < 16:
        raise ValueError(f"block_v must be a power of two >= 16, got {block_v}")
    qf = kc.pad_axis(q, 3, kp).reshape(total, num_key_heads, kp)
    kf = kc.pad_axis(k, 3, kp).reshape(total, num_key_heads, kp)
    vf = kc.pad_axis(v, 3, vp).reshape(total, num_value_heads, vp)
    h0 = None
    if initial_state is not None:
        h0 = kc.pad_axis(kc.pad_axis(initial_state.astype(F32), 2, kp), 3, vp)
    o, ht = _chunk_gated_delta_packed(
        qf, kf, vf, g.reshape(total, num_value_heads), beta.reshape(total, num_value_heads), h0,
        first, starts, lens, jnp.asarray(cu_seqlens).astype(jnp.int32), chunk_size=chunk_size,
        out_dtype=out_dtype, precision=precision,
        block_v=block_v, num_warps=num_warps, num_stages=num_stages,
        num_warps_intra=num_warps_intra, interpret=interpret,
        fuse_products=",".join(sorted(fused_products(fuse_products))),  # hashable, validated
        transposed=bool(transposed),
        wide_products=",".join(sorted(product_names(wide_products, "wide_products"))),
        stack_qk=bool(stack_qk),
        bf16_products=",".join(sorted(product_names(bf16_products, "bf16_products"))),
        fp16_products=",".join(sorted(product_names(fp16_products, "fp16_products"))),
    )
    o = o.reshape(batch, seq_len, num_value_heads, vp)[..., :value_dim]
    return o, ht[..., :key_dim, :value_dim]
