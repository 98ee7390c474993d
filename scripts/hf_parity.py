"""Logit parity of a checkpoint directory between qwen35-jax and Hugging Face transformers (float32).

    python scripts/hf_parity.py runs/gpu-40m --text data/pydoc/validation.txt --tokens 1024

Loads the directory with ``qwen35_jax.load_checkpoint`` and with transformers' ``AutoModelForCausalLM``
(or ``AutoModelForImageTextToText`` for a VLM), both in float32, runs the first ``--tokens`` tokens of
the text (tokenized with the checkpoint's tokenizer; random ids with ``--random``) and prints the
largest logit difference relative to the largest reference logit, and the argmax agreement.
Exit status 1 when the relative error exceeds ``--tol`` (default 1e-4, the acceptance bound of the
parity tests: float32 on both sides differs by reduction order only, a few 1e-7 at these sizes).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax
import numpy as np

jax.config.update("jax_default_matmul_precision", "highest")  # true float32 dots on GPUs too (no TF32)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("--text", type=Path, default=None, help="a text file (default: random token ids)")
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--tol", type=float, default=1e-4)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    import torch
    import transformers

    import qwen35_jax as Q

    cfg, params = Q.load_checkpoint(args.checkpoint, dtype=np.float32)
    if args.text is not None:
        from qwen35_jax.small_model import matching_tokenizer

        ids = matching_tokenizer(args.checkpoint, cfg.text.vocab_size).encode(args.text.read_text())[: args.tokens]
        if len(ids) < 2:
            raise SystemExit(f"{args.text}: fewer than 2 tokens")
    else:
        ids = np.random.default_rng(0).integers(0, cfg.text.vocab_size, args.tokens).tolist()
    ids = np.asarray(ids, np.int32)[None]
    ours = np.asarray(Q.forward(cfg, params, ids), np.float32)[0]

    loader = (transformers.AutoModelForImageTextToText if cfg.vision is not None
              else transformers.AutoModelForCausalLM)
    hf = loader.from_pretrained(str(args.checkpoint), dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf(input_ids=torch.from_numpy(ids).long()).logits[0].float().numpy()
    rel = float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))
    agree = float((ours.argmax(-1) == ref.argmax(-1)).mean())
    result = {"checkpoint": str(args.checkpoint), "tokens": int(ids.shape[1]), "max_rel_err": rel,
              "argmax_agreement": agree, "transformers": transformers.__version__, "tol": args.tol}
    print(f"{args.checkpoint}: {ids.shape[1]} tokens, max |ours - transformers| / max |transformers| = {rel:.2e} "
          f"(tol {args.tol:g}), argmax agreement {agree:.4f}, transformers {transformers.__version__}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0 if rel < args.tol else 1


if __name__ == "__main__":
    sys.exit(main())
