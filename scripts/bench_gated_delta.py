"""The gated delta rule at the 27B shapes (Hk=16 key heads, Hv=48 value heads, K=V=128) on one GPU:
our Pallas kernels and our XLA implementations against flash-linear-attention (Triton), which vLLM
and transformers use.

    python scripts/bench_gated_delta.py --json out/bench_gated_delta.json

Prefill: (B, T) in {(1, 4096), (1, 16384), (8, 2048)}; decode: one token for B in {1, 8, 32}, per call
and per layer inside one jit over 48 layers (as in a model step). Times are medians of repeated,
warmed-up, synchronized runs; a run is `--inner` calls issued back to back then synchronized once,
so host dispatch overlaps device work (as fla's own benchmark times it).

flash-linear-attention is timed when ``fla`` imports (install the fla-core and flash-linear-attention
0.6.0 wheels, pure Python); its q/k are our key heads repeated to 48 heads, as its GVA-less API needs.
Every implementation is checked against our token-scan reference on the same inputs (relative error)
and, where fla ran, against fla.

``--processes N`` runs the prefill benchmark in N fresh processes and reports, per implementation, the
fastest and the median process: fla's Triton autotuner picks its launch settings anew in each process,
and its time moved between 0.469 and 0.726 ms at (1, 4096) in two processes on one H100, so one
process is not a fair sample of it (nor of us).

Implementations (--impls, comma list): ``pallas[:precision[:block_v[:num_warps[:num_stages[:chunk[:flags]]]]]]``
or ``chunked[:solve[:precision[:chunk_size[:scan_unroll]]]]`` or ``naive``. ``--pieces`` also times
the two Pallas kernels alone at the first prefill shape, in several launch settings.

State-pass flags (the last field of a pallas impl or a --piece-state spec), joined by ``/``: ``tr``
(the transposed state pass), ``stack`` (K S and Q S as one dot of the stacked [k; q] rows,
``stack_qk``), ``fuse`` or ``fuse=xv+pv`` (``fuse_products``: all products or those named, by
kernel_chunked.FUSABLE_PRODUCTS names joined by ``+``), ``wide`` or ``wide=xv+pv+update``
(``wide_products``, the same names), ``bf16=qs`` (``bf16_products``: those products as one bf16 dot
of their operands rounded to bf16), ``f16`` or ``f16=xv+pv`` (``fp16_products``: one fp16 dot of
operands rounded to fp16; X and P stored as fp16 for xv, pv; the default for bf16 inputs at bf16x3),
``nof16`` (``fp16_products=False``: every product at the precision, the accurate path). Example:
``pallas:bf16x3:64:4:2::stack/wide=xv+pv+update``.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.gated_delta import (
    gated_delta_recurrent,
    gated_delta_rule,
    kernel_chunked,
    naive_recurrent_gated_delta_rule,
    reference,
)

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from benchlib import device_info, print_table, traced_device_us, write_json  # noqa: E402

HK, HV, K, V = 16, 48, 128, 128
# FLOPs of the chunked form per token (B=1, T=4096 is ~31 GFLOP, see pallas_kernels/gated_delta/
# NOTES.md): the useful work, whatever an implementation recomputes.
FLOP_PER_TOKEN = 31e9 / 4096
DEFAULT_IMPLS = "pallas:bf16x3,pallas:bf16x3:::::nof16,pallas:tf32x3,chunked:blocked:tf32x3"


def make_inputs(B, T, seed=0):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, T, HK, K)).astype(np.float32)
    k = rng.standard_normal((B, T, HK, K)).astype(np.float32)
    q /= np.linalg.norm(q, axis=-1, keepdims=True)
    k /= np.linalg.norm(k, axis=-1, keepdims=True)
    v = rng.standard_normal((B, T, HV, V)).astype(np.float32)
    g = -np.log1p(np.exp(-rng.standard_normal((B, T, HV)))).astype(np.float32)  # logsigmoid, as fla's bench
    beta = (1 / (1 + np.exp(-rng.random((B, T, HV))))).astype(np.float32)
    return q, k, v, g, beta


def fla_available():
    try:
        import fla  # noqa: F401
        import torch
        return torch.cuda.is_available()
    except Exception:
        return False


def time_pipelined(fn, *args, reps=10, inner=5, warmup=2):
    """Median seconds per call of fn(*args): `inner` calls back to back, one synchronization."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(inner):
            out = fn(*args)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t0) / inner)
    return statistics.median(times)


def time_torch(fn, reps=10, inner=5):
    import torch

    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) / inner)
    return float(np.median(times))


def rel_err(a, b):
    if b is None:
        return None
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def parse_state_flags(text, where):
    """'tr/stack/fuse=xv+pv/wide=.../bf16=qs/f16' -> state-pass keyword arguments (validated names)."""
    kw = {}
    for flag in filter(None, text.split("/")):
        name, eq, which = flag.partition("=")
        names = which.replace("+", ",") if eq else True
        if name in ("tr", "stack") and not eq:
            kw["transposed" if name == "tr" else "stack_qk"] = True
        elif name == "nof16" and not eq:
            kw["fp16_products"] = False
        elif name in ("fuse", "wide", "bf16", "f16") and (names is True or which):
            option = {"fuse": "fuse_products", "wide": "wide_products", "bf16": "bf16_products",
                      "f16": "fp16_products"}[name]
            try:  # unknown names: an error before any GPU work
                kernel_chunked.product_names(names, option)
            except ValueError as e:
                raise SystemExit(f"{where}: {e}") from None
            kw[option] = names
        else:
            raise SystemExit(f"{where}: unknown state-pass flag {flag!r} (tr, stack, fuse[=a+b], wide[=a+b], bf16[=a+b], f16[=a+b], nof16)")
    return kw


def parse_impl(spec):
    """-> (label, kwargs for gated_delta_rule, scan_unroll)."""
    parts = spec.split(":")
    name, rest = parts[0], parts[1:] + [""] * 6
    if name == "pallas":
        precision, block_v, num_warps, num_stages, chunk, flags = rest[:6]
        kw = {"implementation": "pallas", "precision": precision or "tf32x3"}
        kw.update(parse_state_flags(flags, f"--impls {spec!r}"))
        for key, val in (("block_v", block_v), ("num_warps", num_warps), ("num_stages", num_stages),
                         ("chunk_size", chunk)):
            if val:
                kw[key] = int(val)
        return spec, kw, None
    solve, precision, chunk, unroll = rest[:4]
    kw = {"implementation": name}
    if solve:
        kw["solve"] = solve
    if precision:
        kw["precision"] = precision
    if chunk:
        kw["chunk_size"] = int(chunk)
    return spec, kw, int(unroll) if unroll else None


def bench_prefill(args, rows, use_fla):
    for n_shape, shape in enumerate(args.prefill.split(",")):
        B, T = map(int, shape.split("x"))
        q, k, v, g, beta = make_inputs(B, T)
        qj = jnp.asarray(q * K ** -0.5, jnp.bfloat16)
        kj, vj, bj = (jnp.asarray(x, jnp.bfloat16) for x in (k, v, beta))
        gj = jnp.asarray(g)
        case = f"prefill B={B} T={T}"
        o_ref = s_ref = None
        if not args.no_reference:
            o_ref, s_ref = jax.jit(naive_recurrent_gated_delta_rule)(qj, kj, vj, gj, bj)
            o_ref, s_ref = np.asarray(o_ref, np.float32), np.asarray(s_ref, np.float32)
        fla_o = None
        if use_fla:
            import torch
            from fla.ops.gated_delta_rule import chunk_gated_delta_rule

            tq, tk = (torch.tensor(np.repeat(x, HV // HK, axis=2), dtype=torch.bfloat16, device="cuda") for x in (q * np.float32(K ** -0.5), k))
            tv, tb = (torch.tensor(x, dtype=torch.bfloat16, device="cuda") for x in (v, beta))
            tg = torch.tensor(g, device="cuda")
            # scale=1: q is pre-scaled exactly as ours (fla's default would scale by K**-0.5 again)
            fla_fn = lambda: chunk_gated_delta_rule(tq, tk, tv, tg, tb, scale=1.0, output_final_state=True)  # noqa: E731
            fla_o, fla_s = (a.float().cpu().numpy() for a in fla_fn())
            dt = time_torch(fla_fn, reps=args.reps, inner=args.inner)
            rows.append({"case": case, "impl": "fla chunk (Triton)", "ms": dt * 1e3, "Mtok_s": B * T / dt / 1e6,
                         "TFLOP_s": FLOP_PER_TOKEN * B * T / dt / 1e12, "rel_err_vs_ref": rel_err(fla_o, o_ref),
                         "state_rel_err_vs_ref": rel_err(fla_s, s_ref), "rel_err_vs_fla": 0.0})
            print(rows[-1], flush=True)
        impls = args.impls.split(",")
        if n_shape > 0 and args.main_only:
            impls = impls[:2] + [i for i in impls if i.startswith("chunked")][:1]
        for spec in impls:
            label, kw, unroll = parse_impl(spec)
            reference.SCAN_UNROLL = unroll or 2
            fn = jax.jit(functools.partial(gated_delta_rule, **kw))
            try:
                t0 = time.perf_counter()
                o, s_fin = jax.block_until_ready(fn(qj, kj, vj, gj, bj))
                compile_s = time.perf_counter() - t0
            except Exception as e:
                print(f"{spec} {case} failed: {type(e).__name__}: {str(e)[:1500]}", flush=True)
                continue
            t = time_pipelined(fn, qj, kj, vj, gj, bj, reps=args.reps, inner=args.inner)
            rows.append({"case": case, "impl": f"ours {label}", "spec": spec, "ms": t * 1e3, "Mtok_s": B * T / t / 1e6,
                         "TFLOP_s": FLOP_PER_TOKEN * B * T / t / 1e12, "rel_err_vs_ref": rel_err(o, o_ref),
                         "state_rel_err_vs_ref": rel_err(s_fin, s_ref), "rel_err_vs_fla": rel_err(o, fla_o),
                         "compile_s": compile_s})
            print(rows[-1], flush=True)
        if args.pieces and n_shape == 0:
            bench_pieces(qj, kj, vj, gj, bj, case, rows, args)


def bench_pieces(q, k, v, g, beta, case, rows, args):
    """The two Pallas kernels alone (same inputs), so their shares of the total are known.
    --piece-intra: precision:num_warps[:fp32|f16] list (":fp32": X and P stored as float32 even for
    bf16x3, as before 2026-12-06; ":f16": as float16, for fp16_products; the state pass then uses
    the last intra variant's outputs, or an untimed call storing what the state spec reads);
    --piece-state: precision:block_v:num_warps[:num_stages[:flags]] list (flags as in --impls:
    tr, stack, fuse[=a+b], wide[=a+b], bf16[=a+b], f16[=a+b], joined by /; with "stack" the intra
    kernel's stacked [k; q] rows come from one untimed extra call of it)."""
    B, T = k.shape[:2]
    cu = jnp.asarray(np.arange(B + 1) * T, jnp.int32)
    first, starts, lens = kernel_chunked.chunk_table(np.arange(B + 1) * T, B * T, 64)
    q2, k2 = q.reshape(B * T, HK * K), k.reshape(B * T, HK * K)
    v2, g2, b2 = v.reshape(B * T, HV * V), g.reshape(B * T, HV), beta.reshape(B * T, HV)
    x = p = None
    for spec in args.piece_intra.split(","):
        prec, nw, *store = spec.split(":")
        intra = jax.jit(functools.partial(kernel_chunked.intra_chunk, chunk_size=64, group=HV // HK,
                                          precision=prec, num_warps=int(nw),
                                          split=False if store == ["fp32"] else None,
                                          fp16=("x", "p") if store == ["f16"] else ()))
        try:
            x, p = intra(q2, k2, g2, b2, starts, lens)
        except Exception as e:
            print(f"intra {spec} failed: {type(e).__name__}: {str(e)[:1500]}", flush=True)
            continue
        t = time_pipelined(intra, q2, k2, g2, b2, starts, lens, reps=args.reps, inner=args.inner)
        rows.append({"case": case, "impl": f"piece: intra-chunk kernel (X, P) {prec} warps={nw}"
                     + (f" {store[0]}" if store else ""), "ms": t * 1e3})
        print(rows[-1], flush=True)
    if x is None:
        return
    kq = None
    for spec in args.piece_state.split(","):
        prec, bv, nw, *st = spec.split(":")
        if len(st) > 2:
            raise SystemExit(f"--piece-state {spec!r}: at most five fields")
        kw = parse_state_flags(st[1] if st[1:] else "", f"--piece-state {spec!r}")
        stacked = None
        if kw.pop("stack_qk", False):
            if kq is None:  # the stacked rows do not depend on the precision: made once
                kq = jax.jit(functools.partial(kernel_chunked.intra_chunk, chunk_size=64, group=HV // HK,
                                               precision=prec, num_warps=1, stack_qk=True))(
                    q2, k2, g2, b2, starts, lens)[2]
            stacked = kq
        fp16 = tuple(m for m, prod in (("x", "xv"), ("p", "pv"))
                     if prod in kernel_chunked.product_names(kw.get("fp16_products"), "fp16_products"))
        xs, ps = x, p
        if tuple(m for m, a in (("x", x), ("p", p)) if getattr(a, "dtype", None) == jnp.float16) != fp16:
            xs, ps = jax.jit(functools.partial(kernel_chunked.intra_chunk, chunk_size=64, group=HV // HK,
                                               precision=prec, num_warps=1, fp16=fp16))(
                q2, k2, g2, b2, starts, lens)
        sp = jax.jit(functools.partial(kernel_chunked.state_pass, chunk_size=64, group=HV // HK,
                                       out_dtype=jnp.bfloat16, precision=prec, block_v=int(bv),
                                       num_warps=int(nw), num_stages=int(st[0]) if st and st[0] else 2, **kw))
        try:
            jax.block_until_ready(sp(q2, k2, v2, g2, b2, xs, ps, None, first, cu, kq=stacked))
        except Exception as e:
            print(f"state pass {spec} failed: {type(e).__name__}: {str(e)[:1500]}", flush=True)
            continue
        t = time_pipelined(functools.partial(sp, kq=stacked), q2, k2, v2, g2, b2, xs, ps, None, first,
                           cu, reps=args.reps, inner=args.inner)
        label = f"piece: state-pass kernel {prec} BV={bv} warps={nw} stages={st[0] if st and st[0] else 2}" + (
            f" [{st[1]}]" if st[1:] and st[1] else "")
        rows.append({"case": case, "impl": label, "ms": t * 1e3})
        print(rows[-1], flush=True)


def bench_decode(args, rows, use_fla):
    L = args.layers
    for B in map(int, args.decode.split(",")):
        q, k, v, g, beta = make_inputs(B, 1, seed=B)
        state = jnp.asarray(np.random.default_rng(0).standard_normal((B, HV, K, V)).astype(np.float32) * 0.1)
        args_j = (jnp.asarray(q * K ** -0.5, jnp.bfloat16), jnp.asarray(k, jnp.bfloat16),
                  jnp.asarray(v, jnp.bfloat16), jnp.asarray(g), jnp.asarray(beta, jnp.bfloat16))
        state_bytes = 2 * B * HV * K * V * 4
        case = f"decode B={B}"
        o_ref, _ = gated_delta_recurrent(*args_j, state, implementation="naive")
        variants = [("XLA step", dict(implementation="naive"))]
        for spec in args.decode_impls.split(","):
            bv, nw = (spec.split(":") + [""])[:2]
            variants.append((f"pallas BV={bv} warps={nw}", dict(implementation="pallas", block_v=int(bv), num_warps=int(nw))))
        for label, kw in variants:
            step = jax.jit(functools.partial(gated_delta_recurrent, **kw), donate_argnums=5)
            try:
                o, _ = step(*args_j, jnp.array(state))
                err = rel_err(o, o_ref)
            except Exception as e:
                print(f"{label} {case} failed: {type(e).__name__}: {str(e)[:1500]}", flush=True)
                continue
            s = jnp.array(state)
            for _ in range(3):
                _, s = step(*args_j, s)
            jax.block_until_ready(s)
            times = []
            for _ in range(args.reps * 5):
                t0 = time.perf_counter()
                _, s = step(*args_j, s)
                s.block_until_ready()
                times.append(time.perf_counter() - t0)
            t = float(np.median(times))
            rows.append({"case": case, "impl": f"ours {label} (one call)", "us": t * 1e6,
                         "GB_s": state_bytes / t / 1e9, "rel_err_vs_ref": err})
            print(rows[-1], flush=True)

            # L layers inside one jit, each its own donated state (as the model's cache tuple): the
            # per-layer cost inside a model step, launch gaps included.
            def layers(states, *a, kw=kw):
                outs = []
                for s_i in states:
                    o, s_i = gated_delta_recurrent(*a, s_i, **kw)
                    outs.append(s_i)
                    a = (a[0], a[1], o.astype(a[2].dtype)) + a[3:]  # chain the layers
                return tuple(outs)

            multi = jax.jit(layers, donate_argnums=0)
            ss = tuple(jnp.array(state) for _ in range(L))
            ss = multi(ss, *args_j)
            jax.block_until_ready(ss)
            times = []
            for _ in range(args.reps):
                t0 = time.perf_counter()
                ss = multi(ss, *args_j)
                jax.block_until_ready(ss)
                times.append(time.perf_counter() - t0)
            t = float(np.median(times)) / L
            rows.append({"case": case, "impl": f"ours {label} ({L} layers in one jit, per layer)", "us": t * 1e6,
                         "GB_s": state_bytes / t / 1e9})
            print(rows[-1], flush=True)
            # the same under a profiler: device time per layer, all kernels and the delta-rule kernel alone
            held = [ss]

            def once():
                held[0] = multi(held[0], *args_j)
                jax.block_until_ready(held[0])

            dev = traced_device_us(once, L)
            ss = held[0]
            if dev:
                kern = sum(v for n, v in dev["by_name"].items() if "gated_delta" in n)
                rows.append({"case": case, "impl": f"ours {label} (device time per layer: all kernels / "
                             f"the delta-rule kernel {kern:.1f} us)", "us": dev["busy_us"],
                             "GB_s": state_bytes / dev["busy_us"] / 1e3})
                print(rows[-1], flush=True)
        if use_fla:
            import torch
            from fla.ops.gated_delta_rule import fused_recurrent_gated_delta_rule

            tq, tk = (torch.tensor(np.repeat(x, HV // HK, axis=2), dtype=torch.bfloat16, device="cuda") for x in (q * np.float32(K ** -0.5), k))
            tv, tb = (torch.tensor(x, dtype=torch.bfloat16, device="cuda") for x in (v, beta))
            tg = torch.tensor(g, device="cuda")
            ts = torch.tensor(np.asarray(state), device="cuda")
            fn = lambda: fused_recurrent_gated_delta_rule(tq, tk, tv, tg, tb, scale=1.0, initial_state=ts,  # noqa: E731
                                                          output_final_state=True)
            dt = time_torch(fn, reps=args.reps, inner=20)
            rows.append({"case": case, "impl": "fla fused_recurrent (Triton, pipelined calls)", "us": dt * 1e6,
                         "GB_s": state_bytes / dt / 1e9})
            print(rows[-1], flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prefill", default="1x4096,1x16384,8x2048")
    ap.add_argument("--decode", default="1,8,32")
    ap.add_argument("--impls", default=DEFAULT_IMPLS)
    ap.add_argument("--decode-impls", default="16:1,32:4", help="comma list of block_v:num_warps")
    ap.add_argument("--main-only", action="store_true",
                    help="after the first prefill shape, time only the first impl and the first chunked one")
    ap.add_argument("--pieces", action="store_true")
    ap.add_argument("--piece-intra", default="bf16x3:1,bf16x3:1:f16")
    ap.add_argument("--piece-state", default="bf16x3:64:4:2,bf16x3:64:4:3:f16,bf16x3:64:8:3:f16")
    ap.add_argument("--no-reference", action="store_true", help="skip the token-scan reference (errors)")
    ap.add_argument("--layers", type=int, default=48)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--inner", type=int, default=5)
    ap.add_argument("--json", default=None)
    ap.add_argument("--processes", type=int, default=1,
                    help="prefill only: run it in this many fresh processes; report the fastest and "
                         "the median process of each implementation")
    args = ap.parse_args(argv)
    if args.processes > 1:
        return across_processes(args, argv if argv is not None else sys.argv[1:])
    use_fla = fla_available()
    rows = []
    if args.prefill:
        bench_prefill(args, rows, use_fla)
    if args.decode:
        bench_decode(args, rows, use_fla)
    print(f"\ngated delta rule, Hk={HK} Hv={HV} K={K} V={V}, bf16 inputs, fp32 state; {device_info()}")
    shown = [{key: (f"{val:.1e}" if "rel_err" in key and val is not None else val)
              for key, val in row.items()} for row in rows]
    print_table(shown, [("case", "case"), ("impl", "implementation"), ("ms", "ms"), ("us", "us"),
                       ("Mtok_s", "Mtok/s"), ("TFLOP_s", "TFLOP/s"), ("GB_s", "state GB/s"),
                       ("rel_err_vs_ref", "rel. err vs scan"), ("state_rel_err_vs_ref", "state rel. err vs scan"),
                       ("rel_err_vs_fla", "rel. err vs fla")])
    write_json(args.json, {"benchmark": "gated_delta", "device": device_info(), "rows": rows})


def _without(argv, flags):
    """argv minus each flag in ``flags`` and its value (``--flag v`` or ``--flag=v``)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in flags:
            skip = True
            continue
        if any(a.startswith(f + "=") for f in flags):
            continue
        out.append(a)
    return out


def across_processes(args, argv):
    """The prefill benchmark in ``args.processes`` fresh processes (no decode, no pieces, no
    token-scan reference), aggregated per (case, implementation): min and median of the process
    medians, and every value."""
    import json
    import subprocess
    import tempfile

    child = _without(argv, ("--processes", "--json", "--decode", "--reps")) + [
        "--decode", "", "--no-reference", "--reps", str(args.reps)]
    child = [a for a in child if a != "--pieces"]
    per = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.processes):
            path = f"{tmp}/run{i}.json"
            proc = subprocess.run([sys.executable, __file__, *child, "--json", path], capture_output=True,
                                  text=True)
            if proc.returncode != 0:
                print(f"process {i} failed (rc {proc.returncode}):\n{proc.stderr[-2000:]}", flush=True)
                continue
            with open(path) as f:
                timed = [row for row in json.load(f)["rows"] if "ms" in row]
            for row in timed:
                per.setdefault((row["case"], row["impl"]), []).append(row["ms"])
            print(f"process {i}: " + "; ".join(f"{row['case']} {row['impl']} {row['ms']:.3f} ms" for row in timed),
                  flush=True)
    rows = [{"case": case, "impl": impl, "min_ms": min(v), "median_ms": statistics.median(v),
             "processes": len(v), "all_ms": v} for (case, impl), v in per.items()]
    print(f"\ngated delta prefill across {args.processes} processes; {device_info()}")
    shown = [{**row, "all_ms": ", ".join(f"{x:.3f}" for x in row["all_ms"])} for row in rows]
    print_table(shown, [("case", "case"), ("impl", "implementation"), ("min_ms", "fastest process ms"),
                        ("median_ms", "median process ms"), ("processes", "processes"), ("all_ms", "every process")])
    write_json(args.json, {"benchmark": "gated_delta_processes", "device": device_info(), "rows": rows})


if __name__ == "__main__":
    main()
