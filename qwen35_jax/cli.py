"""The ``qwen35-jax`` command.

    qwen35-jax info CHECKPOINT                 config, parameter counts, tensors not used
    qwen35-jax next-token CHECKPOINT --ids 1,2,3 [--top 5] [--dtype bfloat16]
    qwen35-jax generate CHECKPOINT --prompt TEXT [--chat] [--no-think] [--preset NAME] [--mtp K]
                                        [--image PATH ...]

Later issues add ``quantize`` and ``ablate`` here.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np


def _dtype(name: str):
    import jax.numpy as jnp

    try:
        return {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}[name]
    except KeyError:
        raise SystemExit(f"--dtype must be float32, bfloat16 or float16, got {name!r}") from None


def cmd_info(args) -> int:
    from qwen35_jax import checkpoint, config, model
    from qwen35_jax.safetensors_io import index_checkpoint

    cfg = config.load_config(args.checkpoint)
    t = cfg.text
    specs = model.param_specs(cfg)
    index = index_checkpoint(args.checkpoint)
    stored = sorted({info.dtype for info in index.values()})
    print(f"architecture      {cfg.architecture}")
    print(f"layers            {t.num_hidden_layers} ({t.num_linear_attention_layers} Gated DeltaNet, "
          f"{t.num_full_attention_layers} gated attention)")
    print(f"hidden / mlp      {t.hidden_size} / {t.intermediate_size}")
    print(f"attention         {t.num_attention_heads} q heads, {t.num_key_value_heads} kv heads, head dim "
          f"{t.head_dim}, rotary dim {t.rotary_dim}, theta {t.rope_theta:g}")
    print(f"deltanet          {t.linear_num_key_heads} key heads x {t.linear_key_head_dim}, "
          f"{t.linear_num_value_heads} value heads x {t.linear_value_head_dim}, conv {t.linear_conv_kernel_dim}")
    print(f"vocab             {t.vocab_size} ({'tied' if cfg.tie_word_embeddings else 'untied'} head)")
    text = model.count_params(specs, "language_model.") + model.count_params(specs, "lm_head.")
    print(f"parameters        {text:,} text" + (f" + {model.count_params(specs, 'visual.'):,} vision" if cfg.vision else ""))
    print(f"stored dtypes     {', '.join(stored)}; {len(index)} tensors")
    unused = [n for n in index if checkpoint.from_hf_name(cfg, n) not in specs]
    if unused:
        print(f"not used          {len(unused)} tensors, e.g. {', '.join(sorted(unused)[:3])}")
    return 0


def cmd_next_token(args) -> int:
    import qwen35_jax as Q

    try:
        ids = np.array([[int(x) for x in args.ids.split(",")]], np.int32)
    except ValueError:
        raise SystemExit(f"--ids must be comma-separated integers, got {args.ids!r}") from None
    cfg, params = Q.load_checkpoint(args.checkpoint, dtype=_dtype(args.dtype))
    logits = np.asarray(Q.forward(cfg, params, ids))[0, -1]
    logp = logits - np.logaddexp.reduce(logits)
    top = np.argsort(-logits)[: args.top]
    print("token_id  logprob")
    for i in top:
        print(f"{int(i):8d}  {logp[i]:.4f}")
    return 0


def _safe_decode(tokenizer, ids) -> str:
    """Decode, showing ids the tokenizer does not know (the padded embedding rows 248077..248319 of the
    real vocabulary, which only an untrained model samples) as <id:N> instead of failing mid-stream."""
    from qwen35_jax.tokenizer import TokenizerError

    try:
        return tokenizer.decode(ids)
    except TokenizerError:
        known = [i for i in ids if i < tokenizer.vocab_size]
        return tokenizer.decode(known) + "".join(f"<id:{i}>" for i in ids if i >= tokenizer.vocab_size)


def cmd_generate(args) -> int:
    import qwen35_jax as Q
    from qwen35_jax.tokenizer import Tokenizer

    vision_inputs = {}
    if args.image:  # images go through the chat template: --image implies --chat
        from qwen35_jax.image_processing import ProcessorConfig, chat_inputs

        # read the images before the weights, so that a bad image fails fast
        cfg = Q.load_config(args.checkpoint)
        tokenizer = Tokenizer.from_checkpoint(args.checkpoint)
        content = [{"type": "image", "image": path} for path in args.image] + [{"type": "text", "text": args.prompt}]
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
            {"role": "user", "content": content}]
        processor = ProcessorConfig.from_checkpoint(args.checkpoint, vision=cfg.vision)
        inputs = chat_inputs(tokenizer, messages, cfg, processor=processor, add_generation_prompt=True,
                             enable_thinking=not args.no_think)
        ids, vision_inputs = inputs.input_ids, inputs.model_kwargs()
        cfg, params = Q.load_checkpoint(args.checkpoint, dtype=_dtype(args.dtype))
    else:
        cfg, params = Q.load_checkpoint(args.checkpoint, dtype=_dtype(args.dtype))
        tokenizer = Tokenizer.from_checkpoint(args.checkpoint)
        if args.chat:
            messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
                {"role": "user", "content": args.prompt}]
            ids = tokenizer.encode_chat(messages, add_generation_prompt=True, enable_thinking=not args.no_think)
        else:
            ids = tokenizer.encode(args.prompt)
    if not ids:
        raise ValueError("the prompt encodes to no tokens")
    # the weights are ours (just loaded): the decode layout, freeing the separate arrays as it goes
    params = Q.fuse_projections(params, delete_inputs=True)
    generated: list[int] = []
    printed = ""

    def stream(step):
        nonlocal printed
        if step[0] is None:
            return
        generated.append(step[0])
        text = _safe_decode(tokenizer, generated)
        if text.endswith("\ufffd"):  # an incomplete multi-byte character: wait for the next token
            return
        sys.stdout.write(text[len(printed):])
        sys.stdout.flush()
        printed = text

    result = Q.generate(cfg, params, [ids], max_new_tokens=args.max_new_tokens, sampling=args.preset,
                        stop_token_ids=tokenizer.stop_token_ids, seed=args.seed, num_draft_tokens=args.mtp,
                        stream=stream, **vision_inputs)
    text = _safe_decode(tokenizer, result.tokens[0])
    sys.stdout.write(text[len(printed):] + "\n")
    st = result.stats
    extra = f", {st['acceptance_rate']:.0%} of MTP drafts accepted" if args.mtp else ""
    print(f"[{len(result.tokens[0])} tokens, {result.finish_reason[0]}; prefill {st['prefill_s']:.2f} s, "
          f"decode {st['decode_tok_s']:.1f} tok/s{extra}]", file=sys.stderr)
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="qwen35-jax", description="Qwen3.5 / Qwen3.6 in JAX")
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="summarise a checkpoint directory")
    p.add_argument("checkpoint")
    p.set_defaults(fn=cmd_info)
    p = sub.add_parser("next-token", help="top next tokens after a sequence of token ids")
    p.add_argument("checkpoint")
    p.add_argument("--ids", required=True, help="comma-separated token ids")
    p.add_argument("--top", type=int, default=5)
    p.add_argument("--dtype", default="float32")
    p.set_defaults(fn=cmd_next_token)
    p = sub.add_parser("generate", help="generate text, streaming to the terminal")
    p.add_argument("checkpoint")
    p.add_argument("--prompt", required=True)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    p.add_argument("--image", action="append", default=[], metavar="PATH",
                   help="an image shown before the prompt (repeat for several; implies --chat)")
    p.add_argument("--system", default=None, help="system prompt (with --chat)")
    p.add_argument("--no-think", action="store_true", help="chat with thinking off (enable_thinking=false)")
    p.add_argument("--preset", default="greedy",
                   help="sampling preset: greedy, thinking-general, thinking-coding, instruct-general, instruct-reasoning")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--mtp", type=int, default=0, help="MTP draft tokens per step (speculative decoding, greedy)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="bfloat16")
    p.set_defaults(fn=cmd_generate)
    p = sub.add_parser("ablate", help="quantize with several recipes; perplexity, bits, size (and decode speed)")
    from qwen35_jax import ablate

    ablate.add_arguments(p)
    p.set_defaults(fn=ablate.main)
    args = ap.parse_args(argv)
    from qwen35_jax.config import ConfigError
    from qwen35_jax.safetensors_io import CheckpointError

    try:
        return args.fn(args)
    except (ConfigError, CheckpointError, ValueError) as e:
        print(f"qwen35-jax: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
