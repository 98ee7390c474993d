"""GPTQ at full Qwen3.5-27B shapes on one GPU: seconds per decoder layer (both layer types), the
projected whole-model time and the peak GPU memory.

    python scripts/bench_gptq.py --json out/bench_gptq.json
    python scripts/bench_gptq.py --recipe gptq-int8-attn-int4-rest-g128-eora64 --layers 8
    python scripts/bench_gptq.py --tiny --calib-seqs 4 --calib-len 64      # CPU smoke run

The model has the 27B's widths with its first ``--layers`` decoder layers (same 3 DeltaNet : 1 attention
pattern) and random bf16 weights. Calibration is ``--calib-seqs`` random token sequences of
``--calib-len`` tokens (the issue's setting: 128 x 2,048), pushed through ``quant.calibration.
gptq_quantize_model`` exactly as a real checkpoint would be (true sequential, the next layer sees the
quantized layer's outputs). GPTQ's cost does not depend on the weights' values, only on their shapes
and the number of calibration tokens, so random weights time it faithfully.

The first layer of each type includes jit compilation; the medians exclude it. The default 20 layers
(15 DeltaNet + 5 attention) leave at least 4 timed layers of each type. The projection is
``48 x median(DeltaNet layer) + 16 x median(attention layer)``, the 64 layers after compilation (the
embedding lookup and the one-off compilations come on top; both are printed). ``--json`` is rewritten
after every layer, so a run cut short keeps the layers it finished.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")

import jax
import jax.numpy as jnp
import numpy as np

import qwen35_jax as Q
from qwen35_jax.config import FULL_ATTENTION

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from benchlib import device_info, peak_memory_gb, print_table, write_json  # noqa: E402

# Qwen3.5-27B: 64 layers = 48 Gated DeltaNet + 16 gated full attention
FULL_MODEL_LAYERS = {"linear_attention": 48, FULL_ATTENTION: 16}
# GPTQModel on a Xeon Max + RTX 5000 Ada, the multi-level + EoRA-64 seed checkpoint, 2,048 x 4,096 tokens
SEED_REFERENCE_MIN = 208.0


def _config(layers: int, tiny: bool) -> Q.ModelConfig:
    if tiny:
        text = Q.TextConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=layers,
                            layer_types=Q.make_layer_types(layers), num_attention_heads=4, num_key_value_heads=2,
                            head_dim=32, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=32,
                            linear_value_head_dim=32)  # every in-dim a multiple of the recipes' group 128
    else:
        text = Q.qwen35_27b_text().text
        text = Q.TextConfig(**{**text.__dict__, "num_hidden_layers": layers, "layer_types": Q.make_layer_types(layers),
                               "mtp_num_hidden_layers": 0})
    return Q.ModelConfig(text=text, vision=None, architecture="Qwen3_5ForCausalLM")


def summarize(seconds: list[float], layer_types) -> tuple[list[dict], float | None]:
    """Per layer type: the timed layers (all but the first of the type, which compiled the jitted
    capture/forward functions) and their median; and the projected 64-layer time, None until every type
    has a timed layer. Works on a run cut short (``seconds`` covers the layers finished so far)."""
    rows, medians = [], {}
    for kind, n_full in FULL_MODEL_LAYERS.items():
        idx = [i for i, t in enumerate(layer_types) if t == kind and i < len(seconds)]
        warm = [seconds[i] for i in idx[1:]]
        if not warm:
            continue
        medians[kind] = statistics.median(warm)
        rows.append({"layer type": kind, "layers timed": len(warm), "median_s": medians[kind],
                     "min_s": min(warm), "max_s": max(warm), "first_s (compile)": seconds[idx[0]],
                     "in 27B": n_full})
    if len(medians) < len(FULL_MODEL_LAYERS):
        return rows, None
    return rows, sum(medians[k] * n for k, n in FULL_MODEL_LAYERS.items())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="gptq-int4-g128", help="a quant.CALIBRATED_PRESETS name")
    ap.add_argument("--layers", type=int, default=20, help="decoder layers to quantize (a multiple of 4)")
    ap.add_argument("--calib-seqs", type=int, default=128)
    ap.add_argument("--calib-len", type=int, default=2048)
    ap.add_argument("--batch-size", type=int, default=8, help="calibration sequences per forward batch")
    ap.add_argument("--tiny", action="store_true", help="a tiny config (CPU smoke run of this script)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.layers < 8 or args.layers % 4:
        ap.error("--layers must be a multiple of 4 and >= 8: two layers of each type time compilation, "
                 "the rest give the medians")

    import quant
    from quant.calibration import gptq_quantize_model

    cfg = _config(args.layers, args.tiny)
    c = cfg.text
    t0 = time.perf_counter()
    params = Q.random_params(cfg, dtype=jnp.bfloat16)
    jax.block_until_ready(params)
    print(f"{Q.count_params(params) / 1e9:.3f} B parameters ({args.layers} layers) initialised in "
          f"{time.perf_counter() - t0:.1f} s", flush=True)
    calib = np.random.default_rng(0).integers(0, c.vocab_size, size=(args.calib_seqs, args.calib_len), dtype=np.int32)

    shapes = "a tiny config" if args.tiny else "Qwen3.5-27B shapes"
    meta = {"benchmark": "gptq", "recipe": args.recipe, "shapes": shapes, "layers": args.layers, "tiny": args.tiny,
            "calib_seqs": args.calib_seqs, "calib_len": args.calib_len, "tokens": args.calib_seqs * args.calib_len,
            "batch_size": args.batch_size, "device": device_info()}
    seconds: list[float] = []

    def progress(done, total, s):
        seconds.append(s)
        print(f"layer {done - 1:3d} ({c.layer_types[done - 1]:16s}) {s:7.2f} s", flush=True)
        rows, projected_s = summarize(seconds, c.layer_types)
        write_json(args.json, {**meta, "complete": False, "layer_seconds": seconds, "rows": rows,
                               "projected_64_layer_s": projected_s, "peak_gb": peak_memory_gb()}, quiet=True)

    t0 = time.perf_counter()
    qparams, info = gptq_quantize_model(cfg, params, args.recipe, calib, batch_size=args.batch_size, progress=progress)
    jax.block_until_ready(qparams)
    total_s = time.perf_counter() - t0
    summary = quant.average_bits(qparams)

    rows, projected_s = summarize(seconds, c.layer_types)
    for row in rows:
        idx = [i for i, t in enumerate(c.layer_types) if t == row["layer type"]]
        errs = [inf.output_error for p, inf in info.items() if int(p.split(".")[2]) in idx]
        row["median output_error"] = statistics.median(errs) if errs else None
    print(f"\nGPTQ {args.recipe} at {shapes}, {args.calib_seqs} x {args.calib_len} calibration tokens "
          f"(batch {args.batch_size}); {device_info()}")
    print_table(rows, [("layer type", "layer type"), ("layers timed", "layers timed"), ("median_s", "median s"),
                       ("min_s", "min s"), ("max_s", "max s"), ("first_s (compile)", "first (compile) s"),
                       ("in 27B", "in the 27B"), ("median output_error", "median output error")])
    peak = peak_memory_gb()
    print(f"projected 64-layer time: {projected_s / 60:.1f} min (goal <= 30; GPTQModel seed reference with EoRA "
          f"{SEED_REFERENCE_MIN:.0f} min); this run {total_s:.0f} s for {args.layers} layers; "
          f"{summary.quantized_bits_per_weight:.3f} bits/weight on the quantized linears; "
          f"peak GPU memory {peak if peak is None else round(peak, 1)} GB")
    write_json(args.json, {**meta, "complete": True, "layer_seconds": seconds, "rows": rows,
                           "projected_64_layer_s": projected_s, "total_s": total_s, "peak_gb": peak,
                           "bits_per_weight": summary.quantized_bits_per_weight})


if __name__ == "__main__":
    main()
