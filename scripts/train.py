"""Train a small Qwen3.5-architecture model and save it in the Hugging Face layout.

    python scripts/train.py --out runs/cpu-small                      # built-in sample, CPU, minutes
    python scripts/build_corpus.py --out data/pydoc                   # full Python docs corpus
    python scripts/train.py --out runs/gpu-40m --preset gpu-40m --corpus data/pydoc/python_docs \
        --steps 2000 --batch-size 32 --seq-len 1024 --lr 1.5e-3 --bf16 --vocab 16384

Resumes from ``OUT/checkpoints`` when interrupted. Prints the validation perplexity at the end.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from qwen35_jax import corpus
from qwen35_jax.small_model import build_small_model, encode_documents
from qwen35_jax.train import MODEL_PRESETS, TrainConfig


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--corpus", type=Path, default=None, help="directory of .rst.txt documents (default: built-in sample)")
    ap.add_argument("--preset", default="cpu-small", choices=sorted(MODEL_PRESETS))
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--steps", type=int, default=TrainConfig.steps)
    ap.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    ap.add_argument("--seq-len", type=int, default=TrainConfig.seq_len)
    ap.add_argument("--lr", type=float, default=TrainConfig.learning_rate)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--bf16", action="store_true", help="bf16 compute (fp32 master weights)")
    ap.add_argument("--max-minutes", type=float, default=None, help="stop early after this long (saves the model)")
    ap.add_argument("--eval-seq-len", type=int, default=None, help="default: --seq-len")
    args = ap.parse_args(argv)
    tc = TrainConfig(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, learning_rate=args.lr,
                     seed=args.seed, compute_dtype="bfloat16" if args.bf16 else "float32")
    t0 = time.perf_counter()
    log = build_small_model(args.out, corpus_dir=args.corpus, preset=args.preset, vocab_size=args.vocab, tc=tc,
                             max_seconds=None if args.max_minutes is None else 60 * args.max_minutes)
    train_s = time.perf_counter() - t0

    from qwen35_jax import checkpoint, evaluation
    from qwen35_jax.tokenizer import Tokenizer

    cfg, params = checkpoint.load_checkpoint(args.out)
    tok = Tokenizer.from_checkpoint(args.out)
    source = args.corpus if args.corpus is not None else corpus.sample_dir()
    val = encode_documents(tok, corpus.read_split(source, "validation"))
    seq = args.eval_seq_len or args.seq_len
    result = evaluation.perplexity(cfg, params, val, seq_len=seq, stride=seq // 2)
    summary = {"out": str(args.out), "train_seconds": round(train_s, 1), "final_loss": log["losses"][-1][1],
               "steps": log["stopped_at"] or args.steps, "non_embedding_params": log["non_embedding_params"], "train_tokens": log["train_tokens"],
               "validation_ppl": result.ppl, "validation_tokens": result.num_tokens}
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
