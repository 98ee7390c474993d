"""Perplexity of a model (optionally quantized with a recipe) on a text file or a corpus split.

    python scripts/eval_ppl.py --model runs/cpu-small --split validation
    python scripts/eval_ppl.py --model runs/cpu-small --text notes.txt --seq-len 512 --stride 256
    python scripts/eval_ppl.py --model runs/cpu-small --split test --recipe int4-g128
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax.numpy as jnp


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True, help="HF-layout model directory with a tokenizer")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--text", type=Path, help="a UTF-8 text file")
    src.add_argument("--split", choices=("train", "validation", "test"), help="a split of --corpus")
    ap.add_argument("--corpus", type=Path, default=None, help="directory of .rst.txt documents (default: built-in sample)")
    ap.add_argument("--recipe", default=None, help="quantize first with this recipe preset (quant.PRESETS)")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--stride", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    args = ap.parse_args(argv)

    from qwen35_jax import checkpoint, corpus, evaluation
    from qwen35_jax.small_model import encode_documents, matching_tokenizer

    cfg, params = checkpoint.load_checkpoint(args.model, jnp.dtype(args.dtype))
    tok = matching_tokenizer(args.model, cfg.text.vocab_size)
    if args.text is not None:
        if not args.text.is_file():
            sys.exit(f"error: {args.text}: no such file")
        docs = [args.text.read_text(encoding="utf-8")]
    else:
        docs = corpus.read_split(args.corpus or corpus.sample_dir(), args.split)
    ids = encode_documents(tok, docs)[:-1] if args.text is not None else encode_documents(tok, docs)
    if args.recipe is not None:
        import quant

        params = quant.quantize_params(params, quant.get_recipe(args.recipe))
    try:
        result = evaluation.perplexity(cfg, params, ids, seq_len=args.seq_len, stride=args.stride,
                                       batch_size=args.batch_size)
    except evaluation.EvalError as e:
        sys.exit(f"error: {e}")
    print(f"{args.model}: {result}")


if __name__ == "__main__":
    main()
