"""Quantize a checkpoint with a recipe (GPTQ recipes calibrate layer by layer) and save it with orbax.

    python scripts/quantize.py runs/cpu-small --recipe gptq-int4-g128 --out runs/cpu-small-gptq4
    python scripts/quantize.py CKPT --recipe gptq-int8-attn-int4-rest-g128-eora64 --calib notes.txt \
        --calib-seqs 128 --calib-len 2048 --out DIR
    python scripts/quantize.py CKPT --recipe int4-g128 --out DIR          # RTN: no calibration

Calibration text: ``--calib FILE`` or a split of ``--corpus`` (default: the train split of the built-in
corpus), tokenized with the checkpoint's tokenizer and cut into ``--calib-seqs`` sequences of
``--calib-len`` tokens. Load the result with ``quant.load(OUT)``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np


def _bar(done: int, total: int, seconds: float, t_start: float) -> None:
    frac = done / total
    eta = (time.perf_counter() - t_start) / frac * (1 - frac)
    sys.stderr.write(f"\r[{'#' * int(30 * frac):-<30}] layer {done}/{total} ({seconds:.1f} s) eta {eta:.0f}s ")
    if done == total:
        sys.stderr.write("\n")
    sys.stderr.flush()


def calibration_tokens(ids: np.ndarray, num_seqs: int, seq_len: int) -> np.ndarray:
    """``[S, T]``: consecutive non-overlapping windows (as many as the text holds, at most ``num_seqs``)."""
    have = ids.size // seq_len
    if have == 0:
        raise ValueError(f"the calibration text has {ids.size} tokens, fewer than one sequence of {seq_len}")
    n = min(num_seqs, have)
    return ids[: n * seq_len].reshape(n, seq_len).astype(np.int32)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("--recipe", required=True, help="a preset name (quant.PRESETS / quant.CALIBRATED_PRESETS)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--calib", type=Path, default=None, help="calibration text file")
    ap.add_argument("--corpus", type=Path, default=None, help="directory of .rst.txt documents (default: built-in)")
    ap.add_argument("--calib-split", default="train", choices=("train", "validation", "test"))
    ap.add_argument("--calib-seqs", type=int, default=128)
    ap.add_argument("--calib-len", type=int, default=2048)
    ap.add_argument("--batch-size", type=int, default=8, help="calibration sequences per forward batch")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    args = ap.parse_args(argv)

    import quant
    from quant.recipes import METHODS
    from qwen35_jax import checkpoint, corpus
    from qwen35_jax.small_model import encode_documents, matching_tokenizer

    try:
        if args.out.exists():
            raise FileExistsError(f"{args.out} exists; refusing to overwrite it")
        recipe = quant.get_recipe(args.recipe)
        cfg, params = checkpoint.load_checkpoint(args.checkpoint, jnp.dtype(args.dtype))
        calibrated = any(r.method is not None and METHODS[r.method].needs_calibration for r in recipe.rules)
        t0 = time.perf_counter()
        if calibrated:
            tok = matching_tokenizer(args.checkpoint, cfg.text.vocab_size)
            if args.calib is not None:
                if not args.calib.is_file():
                    raise FileNotFoundError(f"{args.calib}: no such calibration file")
                docs = [args.calib.read_text(encoding="utf-8")]
            else:
                docs = corpus.read_split(args.corpus or corpus.sample_dir(), args.calib_split)
            calib = calibration_tokens(encode_documents(tok, docs), args.calib_seqs, args.calib_len)
            print(f"calibration: {calib.shape[0]} sequences x {calib.shape[1]} tokens", file=sys.stderr)
            qparams, info = quant.gptq_quantize_model(
                cfg, params, recipe, calib, batch_size=args.batch_size,
                progress=lambda d, n, s: _bar(d, n, s, t0))
        else:
            qparams, info = quant.quantize_params(params, recipe), {}
        quant.save(args.out, qparams, extra={"recipe": args.recipe, "checkpoint": str(args.checkpoint)})
    except (ValueError, FileExistsError, FileNotFoundError, NotImplementedError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    bits = quant.average_bits(qparams)
    print(f"{args.recipe}: {bits.quantized_bits_per_weight:.3f} bits/weight on the quantized linears, "
          f"{bits.total_bytes / 1e6:.2f} MB in all, {time.perf_counter() - t0:.1f} s -> {args.out}")
    if info:
        errs = sorted((float(v.output_error), k) for k, v in info.items())
        print(f"GPTQ output error over {len(errs)} linears: median {errs[len(errs) // 2][0]:.4g}, "
              f"largest {errs[-1][0]:.4g} ({errs[-1][1]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
