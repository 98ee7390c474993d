"""Compile a Pallas (Triton lowering) kernel of this project for sm_90 on a machine without a GPU, and
report what the NOTES' "offline compile" figures are: registers, spilled bytes, shared memory, the
wgmma instructions and their waits.

The kernel is lowered to TTIR by jax (as on a GPU), run through triton's ``make_ttir`` passes (the
inliner, canonicalizer, combine and CSE passes that XLA's Triton pipeline also runs before layout
assignment: without combine, every ``dot + acc`` keeps a zero accumulator and an add), compiled by the
``triton`` pip package for sm_90, and assembled by its bundled ``ptxas -v``. Needs ``pip install
triton==3.6.0`` (not a project dependency; the device machine's jax bundles its own Triton, so the
figures are indicative, not the GPU's exact build).

    python scripts/offline_compile.py quant gemm_s_128x128_r16_w8_st3 --m 512
    python scripts/offline_compile.py quant row_r16_bn128_w1_pf_t16 --m 1
    python scripts/offline_compile.py gated-delta --block-v 64 --num-warps 4 --num-stages 2
    python scripts/offline_compile.py gated-delta --stack-qk --wide-products xv,pv,update

Writes the .ttir / .ttgir / .ptx of each kernel under ``--out`` (default a temporary folder).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def capture_ttir(fn, *shapes) -> list[str]:
    """The TTIR of every Pallas kernel in ``jax.jit(fn)`` lowered for CUDA, in call order."""
    from jax._src.pallas.triton import lowering, pallas_call_registration as reg

    captured = []
    orig = lowering.lower_jaxpr_to_triton_module

    def cap(*a, **k):
        r = orig(*a, **k)
        captured.append(r.module.operation.get_asm(enable_debug_info=False))
        return r

    lowering.lower_jaxpr_to_triton_module = reg.lowering.lower_jaxpr_to_triton_module = cap
    try:
        jax.jit(fn).trace(*shapes).lower(lowering_platforms=("cuda",))
    finally:
        lowering.lower_jaxpr_to_triton_module = reg.lowering.lower_jaxpr_to_triton_module = orig
    return captured


def compile_sm90(ttir: str, path: str, num_warps: int, num_stages: int) -> dict:
    import triton
    from triton._C.libtriton import ir
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import CUDABackend

    target = GPUTarget("cuda", 90, 32)
    backend = CUDABackend(target)
    ctx = ir.context()
    ir.load_dialects(ctx)
    backend.load_dialects(ctx)
    with open(path + ".ttir", "w") as f:
        f.write(ttir)
    mod = ir.parse_mlir_module(path + ".ttir", ctx)
    mod.context = ctx
    opts = backend.parse_options(dict(num_warps=num_warps, num_stages=num_stages))
    CUDABackend.make_ttir(mod, None, opts, 90)
    with open(path + ".opt.ttir", "w") as f:
        f.write(str(mod))
    c = triton.compile(path + ".opt.ttir", target=target, options=dict(num_warps=num_warps, num_stages=num_stages))
    ptx, ttgir = c.asm["ptx"], c.asm["ttgir"]
    for ext, text in ((".ptx", ptx), (".ttgir", ttgir)):
        with open(path + ext, "w") as f:
            f.write(text)
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/ptxas")
    r = subprocess.run([ptxas, "-arch=sm_90a", "-v", path + ".ptx", "-o", path + ".cubin"],
                       capture_output=True, text=True)
    regs = re.search(r"Used (\d+) registers", r.stderr)
    spill = re.search(r"(\d+) bytes spill stores", r.stderr)
    return {"registers": int(regs.group(1)) if regs else None,
            "spill_bytes": int(spill.group(1)) if spill else None,
            "shared_bytes": c.metadata.shared,
            "wgmma": ptx.count("wgmma.mma_async"),
            "wgmma_waits": [int(x) for x in re.findall(r"wgmma\.wait_group\.sync\.aligned\s+(\d+)", ptx)]}


def quant_kernels(args):
    from pallas_kernels.quant_matmul import kernel as qk, layout

    cfg = qk.choose_config(args.m, args.n, bits=args.bits, group_size=args.group, in_features=args.k,
                           candidate=args.candidate)
    s_rows = layout.slab_rows(args.k, args.bits, args.group)
    sd = jax.ShapeDtypeStruct
    shapes = (sd((args.m, args.k), jnp.bfloat16), sd((s_rows, args.n), jnp.uint32),
              sd((args.k // args.group, args.n), jnp.bfloat16))
    fn = lambda x, w, s: qk.quant_matmul_pallas(x, w, s, None, bits=args.bits, group_size=args.group,  # noqa: E731
                                                in_features=args.k, config=cfg)
    print(cfg)
    return [(args.candidate, ttir, cfg.num_warps, cfg.num_stages) for ttir in capture_ttir(fn, *shapes)]


def gated_delta_kernels(args):
    from pallas_kernels.gated_delta import kernel_chunked as kc

    sd, dt = jax.ShapeDtypeStruct, jnp.dtype(args.dtype)
    qk_ = sd((1, args.t, 16, 128), dt)
    shapes = (qk_, qk_, sd((1, args.t, 48, 128), dt), sd((1, args.t, 48), jnp.float32),
              sd((1, args.t, 48), dt))
    # the library's defaults where not given, resolved here so that the compile below gets the
    # same stage count as the kernel
    fp16, stages = kc.resolve_defaults(
        (dt,) * 3, args.precision, args.block_v, fp16_products=args.fp16_products,
        num_stages=args.num_stages, fuse_products=args.fuse_products, transposed=args.transposed,
        wide_products=args.wide_products, stack_qk=args.stack_qk, bf16_products=args.bf16_products)
    fn = lambda q, k, v, g, b: kc.chunk_gated_delta_rule_pallas(  # noqa: E731
        q, k, v, g, b, precision=args.precision, block_v=args.block_v, num_warps=args.num_warps, num_stages=stages,
        num_warps_intra=args.num_warps_intra, fuse_products=args.fuse_products,
        transposed=args.transposed, wide_products=args.wide_products, stack_qk=args.stack_qk,
        bf16_products=args.bf16_products, fp16_products=fp16)
    intra, state = capture_ttir(fn, *shapes)
    return [("intra_chunk", intra, args.num_warps_intra, 1),
            ("state_pass", state, args.num_warps, stages)]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="what", required=True)
    q = sub.add_parser("quant", help="a quant_matmul candidate (kernel.CANDIDATES name)")
    q.add_argument("candidate")
    q.add_argument("--m", type=int, default=512)
    q.add_argument("--k", type=int, default=5120)
    q.add_argument("--n", type=int, default=34816)
    q.add_argument("--bits", type=int, default=4)
    q.add_argument("--group", type=int, default=128)
    g = sub.add_parser("gated-delta", help="the two chunked prefill kernels at the 27B head shapes")
    g.add_argument("--t", type=int, default=4096)
    g.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"),
                   help="dtype of q, k, v and beta")
    g.add_argument("--precision", default="bf16x3", help="kernel_common.PRECISIONS name")
    g.add_argument("--block-v", type=int, default=64)
    g.add_argument("--num-warps", type=int, default=4)
    g.add_argument("--num-stages", type=int, default=None, help="default: kernel_chunked.default_num_stages")
    g.add_argument("--num-warps-intra", type=int, default=1)
    g.add_argument("--fuse-products", nargs="?", const=True, default=False,
                   help="state pass: each product's bf16 parts in one dot (kernel_common.mm_fused); "
                        "optionally only some products, e.g. xv,pv (kernel_chunked.FUSABLE_PRODUCTS)")
    g.add_argument("--transposed", action="store_true", help="state pass holding S^T (kernel_chunked)")
    g.add_argument("--wide-products", nargs="?", const=True, default=False,
                   help="state pass: the right operand's bf16 parts side by side along N "
                        "(kernel_common.mm_wide); optionally only some products, e.g. xv,pv,update")
    g.add_argument("--bf16-products", nargs="?", const=True, default=False,
                   help="state pass: products as one bf16 dot of their operands rounded to bf16, "
                        "e.g. qs (kernel_chunked.FUSABLE_PRODUCTS)")
    g.add_argument("--fp16-products", nargs="?", const=True, default=None,
                   help="state pass: products as one fp16 dot of their operands rounded to fp16 "
                        "(all five with no value; X and P then stored as fp16; '' for none; "
                        "default: kernel_chunked.default_fp16_products)")
    g.add_argument("--stack-qk", action="store_true",
                   help="K S and Q S as one dot of the stacked [k; q] rows (intra kernel writes them)")
    for p in (q, g):
        p.add_argument("--out", default=None, help="folder for the .ttir/.ttgir/.ptx files")
    args = ap.parse_args(argv)
    out = args.out or tempfile.mkdtemp(prefix="offline_compile_")
    os.makedirs(out, exist_ok=True)
    kernels = quant_kernels(args) if args.what == "quant" else gated_delta_kernels(args)
    for name, ttir, warps, stages in kernels:
        facts = compile_sm90(ttir, os.path.join(out, name), warps, stages)
        print(f"{name}: {warps} warps, {stages} stages: {facts}", flush=True)
    print(f"files in {out}")


if __name__ == "__main__":
    main()
