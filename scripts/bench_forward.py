"""Full-size Qwen3.5-27B text prefill (random bf16 weights with the real shapes) on one GPU.

    python scripts/bench_forward.py --seq-lens 512 4096 --json out/bench_forward.json

Times the jitted forward (embedding -> 64 layers -> float32 logits over the 248,320-token vocabulary,
like transformers' ``model(input_ids).logits``) at batch 1, reports tokens/s, the peak GPU memory and
the transformers anchor measured on the same H100 model (``shared/anchors/README.md``; pass
``--anchor-log`` with the output of ``hf_qwen35_27b_bench.py`` run in the same session to use those
figures instead).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time

# 54 GB of weights on an 80 GB GPU: JAX's default pool (75% of memory) would leave too little for
# the T=4096 activations. Must be set before jax initialises its backend.
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")

import jax
import jax.numpy as jnp
import numpy as np

import qwen35_jax as Q
from qwen35_jax import model as M

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from benchlib import device_info, peak_memory_gb, print_table, time_fn, write_json  # noqa: E402

# transformers 5.17, torch 2.11, flash-linear-attention 0.6.0 kernels, bf16, batch 1, one H100 80GB HBM3
# (shared/anchors/README.md, measured 2026-11-23).
HF_ANCHOR_TOKS = {512: 4018.0, 4096: 8182.0}


def parse_anchor_log(path: str) -> dict[int, float]:
    found = {}
    for line in open(path):
        m = re.search(r"HF prefill T=(\d+): .* -> (\d+) tok/s", line)
        if m:
            found[int(m.group(1))] = float(m.group(2))
    return found


def _in_use_gb() -> float:
    return (jax.devices()[0].memory_stats() or {}).get("bytes_in_use", 0) / 1e9


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq-lens", type=int, nargs="+", default=[512, 4096])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--layers", type=int, default=64, help="decoder layers (64 = the real 27B)")
    ap.add_argument("--attention", default="auto", choices=["auto", "xla", "cudnn"],
                    help="auto: cudnn's fused kernel when it compiles, else the XLA einsum path")
    ap.add_argument("--gated-delta", default=None, help="delta-rule implementation (default: the library's)")
    ap.add_argument("--gd-precision", nargs="+", default=[M.RuntimeOptions.gated_delta_precision],
                    help="delta-rule dot arithmetic(s) to time (see RuntimeOptions; default: the library's)")
    ap.add_argument("--recipe", default=None,
                    help="quantize every selected linear first (a quant.PRESETS name, e.g. int4-g128)")
    ap.add_argument("--gd-chunk", type=int, default=64)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--anchor-log", default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    text = Q.qwen35_27b_text().text
    if args.layers != text.num_hidden_layers:
        text = Q.TextConfig(**{**text.__dict__, "num_hidden_layers": args.layers,
                               "layer_types": Q.make_layer_types(args.layers)})
    cfg = Q.ModelConfig(text=text, vision=None, architecture="Qwen3_5ForCausalLM")
    t0 = time.perf_counter()
    params = Q.random_params(cfg, dtype=jnp.bfloat16)
    jax.block_until_ready(params)
    n_params = Q.count_params(params)
    print(f"{n_params / 1e9:.3f} B parameters initialised in {time.perf_counter() - t0:.1f} s; "
          f"device memory in use {_in_use_gb():.1f} GB", flush=True)
    bits = None
    if args.recipe:
        import quant

        t0 = time.perf_counter()
        params = quant.quantize_params(params, args.recipe, donate=True)  # frees each bf16 weight as it goes
        summary = quant.average_bits(params)
        bits = {"linears": summary.quantized_bits_per_weight, "model": summary.total_bits_per_weight,
                "gb": summary.total_bytes / 1e9}
        print(f"quantized with {args.recipe} in {time.perf_counter() - t0:.1f} s: {bits['linears']:.3f} bits/weight "
              f"on the linears, {bits['gb']:.1f} GB of parameters; device memory in use {_in_use_gb():.1f} GB", flush=True)

    anchors = dict(HF_ANCHOR_TOKS)
    if args.anchor_log:
        anchors.update(parse_anchor_log(args.anchor_log))

    rows = []
    for T in args.seq_lens:
        ids = jnp.asarray(np.random.default_rng(T).integers(0, 240_000, size=(args.batch, T)), jnp.int32)
        attention_options = ["cudnn", "xla"] if args.attention == "auto" else [args.attention]
        for gd_precision, attn in [(p, a) for p in args.gd_precision for a in attention_options]:
            if any(r["T"] == T and r["gd_precision"] == gd_precision for r in rows):
                continue  # this precision already has a working attention implementation
            options = M.RuntimeOptions(attention=attn, gated_delta=args.gated_delta, chunk_size=args.gd_chunk,
                                       gated_delta_precision=gd_precision)
            fn = jax.jit(lambda p, i, o=options: M.forward_impl(cfg, p, i, None, None, o))
            try:
                t_c = time.perf_counter()
                out = jax.block_until_ready(fn(params, ids))
                compile_s = time.perf_counter() - t_c
            except Exception as e:  # e.g. cuDNN without support for head_dim 256 on this build
                print(f"T={T} attention={attn}: failed ({type(e).__name__}: {str(e)[:200]})", flush=True)
                continue
            assert out.shape == (args.batch, T, cfg.text.vocab_size) and bool(jnp.isfinite(out).all())
            del out
            timing = time_fn(fn, params, ids, warmup=1, reps=args.reps)
            toks = args.batch * T / timing["median_s"]
            row = {"T": T, "batch": args.batch, "attention": attn, "ms": timing["median_s"] * 1e3,
                   "gd_precision": gd_precision, "tok_s": toks, "hf_tok_s": anchors.get(T), "vs_hf": toks / anchors[T] if T in anchors else None,
                   "compile_s": compile_s, "peak_gb": peak_memory_gb(), "in_use_gb": _in_use_gb(), **timing}
            rows.append(row)
            print(row, flush=True)

    print(f"\nQwen3.5-27B text prefill, bf16{', ' + args.recipe if args.recipe else ''}, random weights, {cfg.text.num_hidden_layers} layers; {device_info()}")
    print_table(rows, [("T", "T"), ("batch", "batch"), ("attention", "attention"), ("gd_precision", "delta-rule dots"), ("ms", "ms"),
                       ("tok_s", "tok/s"), ("hf_tok_s", "transformers tok/s"), ("vs_hf", "x transformers"),
                       ("peak_gb", "peak GPU GB"), ("compile_s", "compile s")])
    write_json(args.json, {"benchmark": "forward_prefill", "config": "qwen35_27b_text", "dtype": "bfloat16",
                           "recipe": args.recipe, "bits": bits,
                           "n_params": n_params, "device": device_info(), "rows": rows})


if __name__ == "__main__":
    main()
