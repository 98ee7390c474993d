"""GPTQ: second-order weight quantization with error feedback, as a jit-compiled transform.

Frantar et al., "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers", arXiv:2210.17323. Conventions follow GPTQModel ``gptqmodel/quantization/gptq.py``
(``quantize``, ``hessian_inverse``) and ``gar.py`` as summarised in
``shared/reference/quant_formats.md`` section 1; the per-group quantizer is :mod:`quant.rtn`'s
(GPTQ's ``find_params``/``quantize``), so codes, scales and zeros land in a
:class:`quant.leaves.QuantizedWeight` exactly as chosen.

Shapes: N out features, K in features (the float weight is HF ``[N, K]``), T calibration tokens,
G = K // group_size groups, B the lazy-batch block size.

Pipeline of :func:`gptq_quantize`:

1. Dead inputs (``H_ii == 0``): ``H_ii = 1`` and ``W[:, i] = 0`` (GPTQ).
2. Column order: identity; act-order (``desc_act``): ``argsort(diag H)`` descending; or
   act_group_aware (GAR): columns sorted by ``diag H`` inside each group, groups ordered by their
   max ``diag H`` (``gar.py``), so every group in quantization order is one original group.
3. ``H' = H + damp * mean(diag H) * I``; ``U = chol(H'^-1)`` (upper). A failed Cholesky shows up
   as NaN in the factor: the damping grows by ``damp_increment`` (GPTQModel
   ``damp_auto_increment``) and a warning names the layer.
4. Blocked column loop with lazy batch updates (section 1.6): column ``j`` is quantized, its error
   ``e = (w - q) / U_jj`` is spread over the block's later columns by ``U[j, :]``, and over the
   columns after the block by one matmul at the block end.
5. Group scales come from the weights as they stand *at the start of the block* in which the group
   starts (GPTQModel calls ``find_params(W[:, col:col+gs])`` on ``W``, not on the block's working
   copy, so a g32 group starting mid-block misses that block's earlier updates; kept for
   bit-compatibility); ``static_groups`` takes them from the original weights instead.

Leaf layout: plain and act-order quantization store rows in quantization order with ``perm`` (the
leaf's groups are contiguous in stored order, matching GPTQ's ``g_idx = invperm // gs``).
act_group_aware and static-groups-with-act-order have monotonic ``g_idx``: their codes are put
back into the original column order and the leaf has no ``perm`` (no inference penalty).
"""

from __future__ import annotations

import dataclasses
import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.quant_matmul import layout
from quant.leaves import SCALE_DTYPES, QuantizedWeight, dtype_name
from quant.rtn import MSE_GRID, MSE_MAXSHRINK, MSE_NORM, _codes, check_weight_args, find_params

F32 = jnp.float32
HI = jax.lax.Precision.HIGHEST
ORDERS = ("none", "act_order", "act_group_aware")

# Damping (quant_formats.md 1.3): 0.01 is AutoGPTQ's default and the paper's; GPTQModel >= 5
# defaults to 0.05 (the "gptq-int8-g32-text" preset uses it). damp_auto_increment is 0.01 in both.
DEFAULT_DAMP = 0.01
DAMP_INCREMENT = 0.01


class GPTQWarning(UserWarning):
    """Calibration too small for a full-rank Hessian, or damping escalated after a failed Cholesky."""


# --------------------------------------------------------------------------------------------------
# Hessian accumulation
# --------------------------------------------------------------------------------------------------


@jax.jit
def _xtx(x):
    """``sum_t x_t x_t^T`` ``[K, K]`` float32 of activations ``[..., K]``.

    Half-precision activations (bfloat16, float16) enter the dot as they are: the product of two
    such numbers (8 or 11 significant bits) is exact in float32's 24, and the dot accumulates in
    float32, so the result equals the float32 HIGHEST product of the upcast activations up to
    summation order, computed at the tensor-core rate rather than the float32 one (the 27B's
    ``down_proj`` Hessian over 128 x 2,048 tokens is 1.6e14 flop: seconds in float32, a fraction
    of one in bfloat16). Other dtypes are upcast to float32 and multiplied at HIGHEST precision.
    """
    x = x.reshape(-1, x.shape[-1])
    if x.dtype in (jnp.bfloat16, jnp.float16):
        return jnp.dot(x.T, x, preferred_element_type=F32)
    x = x.astype(F32)
    return jnp.dot(x.T, x, precision=HI, preferred_element_type=F32)


class HessianAccumulator:
    """Streaming ``H = (2 / n) * sum_t x_t x_t^T`` in float32 (GPTQ's Hessian of the layer-wise
    squared error ``||X W^T - X W_q^T||^2``).

    ``update(x)`` takes activations ``[..., K]``; every leading position is a sample (token).
    ``count`` picks the ``n`` of the 2/n factor: "tokens" (GPTQModel ``process_batch`` /
    ``materialize_global_hessian``) or "sequences" (AutoGPTQ ``add_batch``: the leading axis of each
    ``[B, T, K]`` update). They differ by a constant factor, which changes nothing: damping is
    relative to ``mean(diag H)`` and GPTQ and EoRA are invariant to the scale of H
    (quant_formats.md 1.2). ``n`` (tokens) is what the rank checks of :func:`gptq_quantize` need.
    """

    def __init__(self, in_features: int, *, count: str = "tokens"):
        if count not in ("tokens", "sequences"):
            raise ValueError(f"count must be 'tokens' or 'sequences', got {count!r}")
        self.in_features = int(in_features)
        self.count = count
        self.xtx = jnp.zeros((self.in_features, self.in_features), F32)
        self.n = 0  # tokens
        self.sequences = 0

    def update(self, x) -> "HessianAccumulator":
        if x.shape[-1] != self.in_features:
            raise ValueError(f"activations have {x.shape[-1]} features, expected {self.in_features}")
        return self.add_xtx(_xtx(x), int(np.prod(x.shape[:-1])), x.shape[0] if x.ndim >= 3 else 1)

    def add_xtx(self, xtx, n: int, sequences: int = 1) -> "HessianAccumulator":
        """Add a precomputed ``sum x x^T`` over ``n`` tokens in ``sequences`` sequences."""
        self.xtx = self.xtx + xtx.astype(F32)
        self.n += int(n)
        self.sequences += int(sequences)
        return self

    @property
    def hessian(self) -> jax.Array:
        if self.n == 0:
            raise ValueError("no calibration samples were accumulated")
        return self.xtx * (2.0 / (self.n if self.count == "tokens" else self.sequences))


def hessian(x) -> tuple[jax.Array, int]:
    """``(H [K, K], n)`` from activations x ``[..., K]``: ``H = 2/n X^T X`` in float32, n samples."""
    acc = HessianAccumulator(x.shape[-1]).update(x)
    return acc.hessian, acc.n


# --------------------------------------------------------------------------------------------------
# Column orders
# --------------------------------------------------------------------------------------------------


def _act_order_perm(d):
    """desc_act: columns by ``diag H`` descending (stable, so ties keep their order)."""
    return jnp.argsort(-d, stable=True)


def _gar_perm(d, group_size: int):
    """act_group_aware (GPTQModel ``gar.py``): inside each group, columns by ``diag H`` descending;
    groups by their max ``diag H`` descending (stable). Returns ``(perm [K], group_order [G])``:
    quantization position p holds column ``perm[p]``; permuted group j is original group
    ``group_order[j]``."""
    k = d.shape[0]
    dg = d.reshape(k // group_size, group_size)
    local = jnp.argsort(-dg, axis=1, stable=True)  # [G, gs]
    group_order = jnp.argsort(-jnp.max(dg, axis=1), stable=True)  # [G]
    perm = (group_order[:, None] * group_size + local[group_order]).reshape(k)
    return perm, group_order


# --------------------------------------------------------------------------------------------------
# Damped inverse
# --------------------------------------------------------------------------------------------------


@jax.jit
def _prepare(w, h):
    """Dead inputs: ``H_ii = 1`` and ``W[:, i] = 0`` where ``H_ii == 0``."""
    d = jnp.diag(h)
    dead = d == 0
    h = h + jnp.diag(jnp.where(dead, 1.0, 0.0).astype(F32))
    w = jnp.where(dead[None, :], 0.0, w)
    return w, h, jnp.sum(dead)


@jax.jit
def _inverse_factor(h, damp):
    """Upper Cholesky factor ``U`` of ``(H + damp * mean(diag H) I)^-1`` (``H^-1 = U^T U``), and
    whether it is finite (a failed Cholesky gives NaN)."""
    k = h.shape[0]
    hd = h + damp * jnp.mean(jnp.diag(h)) * jnp.eye(k, dtype=F32)
    low = jnp.linalg.cholesky(hd)
    hinv = jax.scipy.linalg.cho_solve((low, True), jnp.eye(k, dtype=F32))
    hinv = (hinv + hinv.T) * 0.5  # exact symmetry for the second factorisation
    u = jnp.linalg.cholesky(hinv).T
    return u, jnp.all(jnp.isfinite(u))


def damped_inverse_factor(h, *, damp_percent: float = DEFAULT_DAMP, damp_increment: float = DAMP_INCREMENT,
                          name: str = "weight") -> tuple[jax.Array, float]:
    """``(U, damp)``: the upper Cholesky factor of the damped inverse Hessian and the damping that
    succeeded. Escalates ``damp`` by ``damp_increment`` while ``0 < damp < 1`` on failure (GPTQModel
    ``hessian_inverse``), warning with ``name``; raises ValueError when no damping works."""
    damp = float(damp_percent)
    if not 0.0 < damp < 1.0:
        raise ValueError(f"{name}: damp_percent must be in (0, 1), got {damp}")
    tried = []
    while 0.0 < damp < 1.0:
        u, ok = _inverse_factor(h, jnp.float32(damp))
        if bool(ok):
            if tried:
                warnings.warn(f"{name}: Cholesky of the damped Hessian failed at damp {tried}; "
                              f"escalated to damp_percent={damp:.3g}", GPTQWarning, stacklevel=3)
            return u, damp
        tried.append(round(damp, 6))
        damp += float(damp_increment)
        if damp_increment <= 0:
            break
    raise ValueError(f"{name}: the Hessian is not positive definite even with damping {tried}; "
                     f"is the calibration data degenerate (NaN, all zeros)?")


# --------------------------------------------------------------------------------------------------
# The column loop
# --------------------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("bits", "group_size", "sym", "order", "static_groups", "block_size",
                                             "scale_dtype", "clip", "norm", "grid", "maxshrink"))
def _gptq_arrays(w, h, u, *, bits, group_size, sym, order, static_groups, block_size, scale_dtype, clip, norm,
                 grid, maxshrink):
    """The jitted core. w ``[N, K]`` f32 (dead columns zeroed), h ``[K, K]`` (undamped, dead
    diagonal set to 1), u: upper Cholesky factor of the damped inverse *in quantization order*
    (computed by the caller on the permuted H). Returns the leaf's children (packed ``[S, N]``,
    scales/zeros ``[Gp, N]`` in the leaf's group order, the perm or None for an unpermuted leaf)
    and GPTQ's loss.

    Both loops are ``fori_loop``s over fixed shapes (blocks of ``B`` columns; K padded past a multiple
    of B with dead columns that U leaves untouched), so the program's size and its compilation do not
    grow with K: a 17,408-column weight compiles like a 512-column one. Any B works with any group
    size, with GPTQModel's group-start semantics (module docstring, point 5)."""
    n, k = w.shape
    gs = group_size
    g = k // gs
    maxq = 2 ** bits - 1
    qp = dict(bits=bits, sym=sym, clip=clip, scale_dtype=scale_dtype, norm=norm, grid=grid, maxshrink=maxshrink)
    bw = block_size
    nblocks = -(-k // bw)
    kp = nblocks * bw
    dynamic_groups = not (static_groups or gs == k)
    # Groups starting in a block: at most m, at first, first + gs, ... (first = i1 rounded up to a group
    # start), read as one [N, m, gs] slice. Candidates that start after the block are written too: the
    # block they start in rewrites them before any column reads them (those past K land in padding
    # slots). Padding past kp keeps the slice in range without clamping.
    m = -(-bw // gs)
    kx = kp + (m + 1) * gs if dynamic_groups else kp  # columns incl. padding
    gp = kx // gs + m + 1  # group slots incl. masked candidates

    d = jnp.diag(h)
    if order == "act_order":
        perm = _act_order_perm(d)
    elif order == "act_group_aware":
        perm, group_order = _gar_perm(d, gs)
    else:
        perm = None
    wp = w if perm is None else jnp.take(w, perm, axis=1)
    # group index of each column in quantization order
    if static_groups:  # parameters of the original contiguous groups, from the original weights
        s0, z0 = find_params(w.reshape(n, g, gs), **qp)
        scale_all, zero_all = s0[..., 0], z0[..., 0]  # [N, G], original group order
        col_group = (jnp.arange(k) if perm is None else perm) // gs
    elif gs == k:  # per-channel: the one group starts at column 0, where W is still untouched
        s0, z0 = find_params(wp.reshape(n, 1, k), **qp)
        scale_all, zero_all = s0[..., 0], z0[..., 0]
        col_group = jnp.zeros((k,), jnp.int32)
    else:  # filled block by block
        scale_all = jnp.zeros((n, gp), F32)
        zero_all = jnp.zeros((n, gp), F32)
        col_group = jnp.arange(k) // gs
    # padding columns: weight 0, U rows/columns of the identity, so their error (weighted by U) reaches
    # no real column; their codes are dropped and their loss masked
    wp = jnp.pad(wp, ((0, 0), (0, kx - k)))
    up = jnp.pad(u, ((0, kx - k), (0, kx - k))) + jnp.diag((jnp.arange(kx) >= k).astype(F32))
    col_group = jnp.pad(col_group, (0, kx - k))  # padding columns: any valid group (masked)

    def block(b, carry):
        wp, codes, scale_all, zero_all, loss = carry
        i1 = b * bw
        if dynamic_groups:  # parameters of the groups starting here, from W as it stands at block start
            first = (i1 + gs - 1) // gs * gs
            wg = jax.lax.dynamic_slice_in_dim(wp, first, m * gs, axis=1).reshape(n, m, gs)
            s1, z1 = find_params(wg, **qp)
            scale_all = jax.lax.dynamic_update_slice_in_dim(scale_all, s1[..., 0], first // gs, axis=1)
            zero_all = jax.lax.dynamic_update_slice_in_dim(zero_all, z1[..., 0], first // gs, axis=1)
        cg = jax.lax.dynamic_slice_in_dim(col_group, i1, bw)
        col_scale = jnp.take(scale_all, cg, axis=1)  # [N, bw]
        col_zero = jnp.take(zero_all, cg, axis=1)
        u1 = jax.lax.dynamic_slice(up, (i1, i1), (bw, bw))

        def column(i, carry):
            w1, q1, err1, ls = carry
            wc = jax.lax.dynamic_index_in_dim(w1, i, axis=1, keepdims=False)
            sc = jax.lax.dynamic_index_in_dim(col_scale, i, axis=1, keepdims=False)
            zc = jax.lax.dynamic_index_in_dim(col_zero, i, axis=1, keepdims=False)
            q = _codes(wc, sc, zc, maxq)
            wq = sc * (q - zc)
            row = jax.lax.dynamic_index_in_dim(u1, i, axis=0, keepdims=False)  # [bw]; zero below i
            dd = row[i]
            e = (wc - wq) / dd
            # U is upper triangular, so columns < i get exact zero updates
            w1 = w1 - e[:, None] * row[None, :]
            q1 = jax.lax.dynamic_update_index_in_dim(q1, q, i, axis=1)
            err1 = jax.lax.dynamic_update_index_in_dim(err1, e, i, axis=1)
            ls = ls + jnp.where(i1 + i < k, jnp.sum((wc - wq) ** 2) / (dd * dd) / 2, 0.0)
            return w1, q1, err1, ls

        init = (jax.lax.dynamic_slice_in_dim(wp, i1, bw, axis=1), jnp.zeros((n, bw), F32), jnp.zeros((n, bw), F32),
                jnp.zeros((), F32))
        _, q1, err1, ls = jax.lax.fori_loop(0, bw, column, init)
        codes = jax.lax.dynamic_update_slice_in_dim(codes, q1, i1, axis=1)
        # lazy batch update of every later column: U's rows i1:i1+bw are zero before column i1, and
        # this block's own columns (also touched) are never read again
        wp = wp - jnp.dot(err1, jax.lax.dynamic_slice_in_dim(up, i1, bw, axis=0), precision=HI,
                          preferred_element_type=F32)
        return wp, codes, scale_all, zero_all, loss + ls

    init = (wp, jnp.zeros((n, kx), F32), scale_all, zero_all, jnp.zeros((), F32))
    _, codes, scale_all, zero_all, loss = jax.lax.fori_loop(0, nblocks, block, init)
    codes = codes[:, :k]  # [N, K] in quantization order
    scale_all, zero_all = scale_all[:, :g], zero_all[:, :g]
    if order == "act_group_aware":
        # back to the original column order; permuted group j is original group group_order[j]
        inv = jnp.argsort(perm)
        codes = jnp.take(codes, inv, axis=1)
        if dynamic_groups:
            scale_all = jnp.zeros_like(scale_all).at[:, group_order].set(scale_all)
            zero_all = jnp.zeros_like(zero_all).at[:, group_order].set(zero_all)
        perm = None
    elif static_groups and perm is not None:
        codes = jnp.take(codes, jnp.argsort(perm), axis=1)  # groups are original: store unpermuted
        perm = None
    packed = layout.pack(codes.astype(jnp.uint32).T, bits, gs)  # [S, N]
    g_pad = layout.num_groups(k, bits, gs) - g  # padding groups: scale 0 (and zero 0)
    scales = jnp.pad(scale_all.T.astype(scale_dtype), ((0, g_pad), (0, 0)))
    zeros = None if sym else jnp.pad(zero_all.T.astype(jnp.uint8), ((0, g_pad), (0, 0)))
    return packed, scales, zeros, None if perm is None else perm.astype(jnp.int32), loss


@jax.jit
def _permute_h(h, perm):
    return h[perm][:, perm]


@functools.partial(jax.jit, static_argnames=("order", "group_size"))
def _order_perm(h, *, order, group_size):
    d = jnp.diag(h)
    return _act_order_perm(d) if order == "act_order" else _gar_perm(d, group_size)[0]


@jax.jit
def _output_error(w, w_hat, h):
    """``tr(D H D^T)`` with ``D = W - W_hat``: ``(2/n) ||X W^T - X W_hat^T||_F^2``."""
    dlt = w - w_hat
    return jnp.sum(jnp.dot(dlt, h, precision=HI) * dlt)


@dataclasses.dataclass(frozen=True)
class GPTQInfo:
    """What :func:`gptq_quantize` reports about one weight.

    loss: GPTQ's own ``sum (w - q)^2 / d^2 / 2`` over columns (GPTQModel's logged loss).
    output_error: ``tr(D H D^T)``, D = W - W_q, with the undamped H: equals
        ``(2/n) ||X W^T - X W_q^T||_F^2`` for the calibration activations X.
    damp: the damping fraction that was used (after any escalation). dead: dead input columns.
    """

    loss: float
    output_error: float
    damp: float
    dead: int


def gptq_quantize(w, h, *, bits: int = 4, group_size: int | None = 128, sym: bool = True, act_order: bool = False,
                  act_group_aware: bool = False, static_groups: bool = False, damp_percent: float = DEFAULT_DAMP,
                  damp_increment: float = DAMP_INCREMENT, block_size: int = 128, scale_dtype="float16",
                  clip: str = "minmax", norm: float = MSE_NORM, grid: int = MSE_GRID,
                  maxshrink: float = MSE_MAXSHRINK, n_samples: int | None = None, name: str = "weight",
                  return_info: bool = False):
    """GPTQ-quantize w ``[N, K]`` given the Hessian h ``[K, K]`` (:class:`HessianAccumulator`).

    bits 2/3/4/8; group_size (None/-1 per-channel); sym; act_order (GPTQ ``desc_act``);
    act_group_aware (GAR; exclusive with act_order, as in GPTQModel); static_groups;
    damp_percent (fraction of mean diag H; escalated by damp_increment on a failed Cholesky, with
    a warning); block_size (lazy-batch width B); scale_dtype (stored scales; the error feedback uses
    the rounded scales, so the leaf dequantizes to exactly the weights GPTQ chose); clip "minmax" or
    "mse" (GPTQ's range search, see :func:`quant.rtn.find_params`).
    n_samples: calibration samples behind h, if known: fewer than one group is an error, fewer than
    K (a rank-deficient H) a :class:`GPTQWarning` (damping makes it invertible).
    Returns the :class:`QuantizedWeight` (``method="gptq"``), or ``(leaf, GPTQInfo)`` with
    return_info. Deterministic: the same inputs give the same bits.
    """
    n, k, gs = check_weight_args(w, name, "GPTQ", bits, group_size, clip)
    if tuple(h.shape) != (k, k):
        raise ValueError(f"{name}: Hessian shape {tuple(h.shape)} does not match the input dim {k}")
    if act_order and act_group_aware:
        raise ValueError(f"{name}: act_order (desc_act) and act_group_aware are mutually exclusive")
    if block_size <= 0:
        raise ValueError(f"{name}: block_size must be positive")
    scale_dtype = dtype_name(scale_dtype)
    if scale_dtype not in SCALE_DTYPES:
        raise ValueError(f"{name}: scale dtype {scale_dtype} is not one of {SCALE_DTYPES}")
    if n_samples is not None:
        if n_samples < min(gs, k):
            raise ValueError(f"{name}: {n_samples} calibration samples are fewer than one group ({gs} columns); "
                             f"use more calibration tokens")
        if n_samples < k:
            warnings.warn(f"{name}: {n_samples} calibration samples < {k} input features: the Hessian is rank "
                          f"deficient and only damping (damp_percent={damp_percent}) makes it invertible",
                          GPTQWarning, stacklevel=2)
    order = "act_order" if act_order else ("act_group_aware" if act_group_aware else "none")
    w32 = jnp.asarray(w).astype(F32)
    h32 = jnp.asarray(h).astype(F32)
    if not bool(jnp.all(jnp.isfinite(w32))):
        raise ValueError(f"{name}: the weight holds NaN or Inf values; refusing to quantize it")
    if not bool(jnp.all(jnp.isfinite(h32))):
        raise ValueError(f"{name}: the Hessian holds NaN or Inf values")
    w32, h32, dead = _prepare(w32, h32)
    perm = None if order == "none" else _order_perm(h32, order=order, group_size=gs)
    hp = h32 if perm is None else _permute_h(h32, perm)
    u, damp = damped_inverse_factor(hp, damp_percent=damp_percent, damp_increment=damp_increment, name=name)
    packed, scales, zeros, leaf_perm, loss = _gptq_arrays(
        w32, h32, u, bits=bits, group_size=gs, sym=bool(sym), order=order, static_groups=bool(static_groups),
        block_size=int(block_size), scale_dtype=scale_dtype, clip=clip, norm=float(norm), grid=int(grid),
        maxshrink=float(maxshrink))
    leaf = QuantizedWeight(packed, scales, zeros, leaf_perm, bits=bits, group_size=gs, in_features=k,
                           out_features=n, method="gptq", orig_dtype=dtype_name(jnp.asarray(w).dtype)).validate()
    if not return_info:
        return leaf
    err = _output_error(jnp.asarray(w).astype(F32), leaf.dequantize().astype(F32), jnp.asarray(h).astype(F32))
    return leaf, GPTQInfo(loss=float(loss), output_error=float(err), damp=damp, dead=int(dead))


def output_error(w, leaf_or_w_hat, h) -> float:
    """``tr(D H D^T)`` for ``D = W - W_hat`` (a leaf is dequantized first): the calibration output
    error ``(2/n) ||X W^T - X W_hat^T||^2`` (any quantizer, so GPTQ and RTN compare directly)."""
    w_hat = leaf_or_w_hat.dequantize() if hasattr(leaf_or_w_hat, "dequantize") else leaf_or_w_hat
    return float(_output_error(jnp.asarray(w).astype(F32), jnp.asarray(w_hat).astype(F32), jnp.asarray(h).astype(F32)))
