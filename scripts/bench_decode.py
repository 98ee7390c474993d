"""Full-size Qwen3.5-27B decode on one GPU: tokens/s at batch 1 and 8, context 512 and 32k, plain and
with MTP speculative verification (random bf16 weights with the real shapes).

    python scripts/bench_decode.py --json out/bench_decode.json

The decode state is filled with random keys/values and random DeltaNet states at the given context
length (decode cost depends on the cache size, not its contents), so no long prefill is needed. The
plain step is the jitted greedy step of ``qwen35_jax.generation`` (forward of one token, sampling, state
update in place). With random weights an MTP head's drafts are never right, so for speculative
decoding the script reports the cost of one verification round (target forward over K+1 tokens +
MTP catch-up + K-1 extra drafts) and the tokens/s it implies at acceptance rates 0.5 and 0.8.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")

import jax
import jax.numpy as jnp
import numpy as np

import qwen35_jax as Q
from qwen35_jax import generation as G
from qwen35_jax.cache import DecodeState, DeltaNetCache, KVCache, init_decode_state
from qwen35_jax.config import FULL_ATTENTION
from qwen35_jax.sampling import get_preset

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from benchlib import device_info, peak_memory_gb, print_table, write_json  # noqa: E402

HF_ANCHOR_TOK_S = 6.82  # transformers 5.17 generate, bf16, batch 1, prompt 512, 64 new tokens, same H100 model


def random_state(cfg, batch, context, max_len, *, layer_types=None, seed=0, kv_dtype=None) -> DecodeState:
    """A decode state whose first ``context`` slots hold random keys/values (scale of real k-normed keys);
    ``kv_dtype`` "int8" / "fp8": a quantized cache (random codes, per-slot scales of 1/64)."""
    state = init_decode_state(cfg, batch, max_len, dtype=jnp.bfloat16, layer_types=layer_types, kv_dtype=kv_dtype)
    key = jax.random.key(seed)
    layers = []
    for i, layer in enumerate(state.layers):
        k1, k2 = jax.random.split(jax.random.fold_in(key, i))
        if isinstance(layer, KVCache) and layer.quantized:
            def codes(k, like):
                return (64 * jax.random.normal(k, like.shape, jnp.float32)).clip(-127, 127).astype(like.dtype)
            layers.append(KVCache(codes(k1, layer.k), codes(k2, layer.v),
                                  jnp.full_like(layer.k_scale, 1 / 64), jnp.full_like(layer.v_scale, 1 / 64)))
        elif isinstance(layer, KVCache):
            layers.append(KVCache(jax.random.normal(k1, layer.k.shape, jnp.bfloat16),
                                  jax.random.normal(k2, layer.v.shape, jnp.bfloat16)))
        else:
            layers.append(DeltaNetCache(jax.random.normal(k1, layer.conv.shape, layer.conv.dtype),
                                        0.1 * jax.random.normal(k2, layer.recurrent.shape, jnp.float32)))
    length = jnp.full((batch,), context, jnp.int32)
    return state.replace(layers=tuple(layers), length=length)


def first_tokens(cfg, batch):
    """Random token ids [batch] to start decoding from (below the 27B's 248,320 real tokens)."""
    return jnp.asarray(np.random.default_rng(0).integers(0, min(240_000, cfg.text.vocab_size), batch), jnp.int32)


def greedy_stepper(cfg, params, options, batch):
    """``one(carry) -> carry`` with carry ``(tokens [B], DecodeState, key)``: the jitted greedy decode
    step of ``qwen35_jax.generation`` (one token forward, sampling, the state donated and updated)."""
    step, greedy, done = G._jitted("step"), get_preset("greedy"), jnp.zeros((batch,), bool)

    def one(carry):
        tok, state, key = carry
        key, sub = jax.random.split(key)
        tok, state, _, _ = step(cfg, options, greedy, (), params, state, tok, sub, None, None, done)
        return tok, state, key

    return one


def time_steps(fn, carry, n):
    """Run ``carry = fn(carry)`` n times after 2 warm-ups: (seconds per call, one sync at the end; the
    last carry, as ``fn`` donates the state it is given)."""
    for _ in range(2):
        carry = fn(carry)
    jax.block_until_ready(carry)
    t0 = time.perf_counter()
    for _ in range(n):
        carry = fn(carry)
    jax.block_until_ready(carry)
    return (time.perf_counter() - t0) / n, carry


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default="1x512,8x512,1x32768,8x32768", help="batch x context[:kv dtype] (int8 or fp8: a quantized KV cache; default bf16)")
    ap.add_argument("--drafts", default="1,3", help="MTP draft counts to time (empty: none)")
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--layouts", default="fused,separate",
                    help="parameter layouts to time, in order: 'fused' (model.fuse_projections: one GEMV per group "
                         "of projections that read one input) and/or 'separate' (the HF layout)")
    ap.add_argument("--separate-cases", default="1x512",
                    help="cases (batch x context) timed in the 'separate' layout too ('all': every case)")
    ap.add_argument("--tiny", action="store_true", help="a tiny config (a CPU smoke test of the script)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    layouts = [x for x in args.layouts.split(",") if x]
    if not layouts or set(layouts) - {"fused", "separate"}:
        ap.error(f"--layouts: a comma list of 'fused' and 'separate', got {args.layouts!r}")

    text = Q.qwen35_27b_text().text if not args.tiny else Q.tiny_text_config(mtp_num_hidden_layers=1)
    cfg = Q.ModelConfig(text=text, vision=None, architecture="Qwen3_5ForCausalLM")
    options = Q.RuntimeOptions()
    rows = []
    for layout in layouts:
        cases = args.cases.split(",")
        if layout == "separate" and len(layouts) > 1 and args.separate_cases != "all":
            cases = [c for c in cases if c in args.separate_cases.split(",")]
        t0 = time.perf_counter()
        params = Q.random_params(cfg, dtype=jnp.bfloat16, fused=layout == "fused")
        jax.block_until_ready(params)
        print(f"{layout} layout: {Q.count_params(params) / 1e9:.2f} B parameters (with MTP) in "
              f"{time.perf_counter() - t0:.1f} s", flush=True)
        rows += run_cases(cfg, params, options, cases, args, layout)
        del params
    print(f"\nQwen3.5-27B decode, bf16, random weights; {device_info()}")
    print_table(rows, [("layout", "layout"), ("batch", "batch"), ("context", "context"), ("kv", "KV cache"),
                       ("mode", "mode"),
                       ("ms_per_step", "ms/step"),
                       ("tok_s", "tok/s"), ("hf_tok_s", "transformers tok/s"),
                       ("verify_cost_x_plain", "round cost / plain step"),
                       ("tok_s_at_accept_0.5", "tok/s if 50% accepted"), ("tok_s_at_accept_0.8", "tok/s if 80% accepted"),
                       ("peak_gb", "peak GPU GB")])
    write_json(args.json, {"benchmark": "decode", "device": device_info(), "rows": rows})


def run_cases(cfg, params, options, cases, args, layout):
    rows = []
    for case in cases:
        shape, _, kv_dtype = case.partition(":")
        B, ctx = map(int, shape.split("x"))
        kv_dtype = kv_dtype or None
        max_len = G.cache_length(ctx, args.steps + 8, 3)
        try:
            state = random_state(cfg, B, ctx, max_len, kv_dtype=kv_dtype)
            tok = first_tokens(cfg, B)
            one = greedy_stepper(cfg, params, options, B)
            t, _ = time_steps(one, (tok, state, jax.random.key(0)), args.steps)
            row = {"layout": layout, "batch": B, "context": ctx, "kv": kv_dtype or "bf16", "mode": "plain", "ms_per_step": t * 1e3, "tok_s": B / t,
                   "hf_tok_s": HF_ANCHOR_TOK_S if (B, ctx) == (1, 512) else None, "peak_gb": peak_memory_gb()}
            rows.append(row)
            plain = row["ms_per_step"]
            print(row, flush=True)
            del state
        except Exception as e:  # e.g. out of memory at batch 8 x 32k
            print(f"B={B} ctx={ctx} plain: failed ({type(e).__name__}: {str(e)[:160]})", flush=True)
            continue
        limit = (jax.devices()[0].memory_stats() or {}).get("bytes_limit")
        if limit and row["peak_gb"] and row["peak_gb"] * 1e9 > 0.97 * limit and args.drafts:
            # An MTP round needs the MTP head's cache and K+1 tokens of activations on top: when the
            # plain step already filled the memory, XLA's allocator would retry (minutes) and fail.
            print(f"B={B} ctx={ctx} MTP: skipped, the plain step peaked at {row['peak_gb']:.1f} GB of "
                  f"{limit / 1e9:.1f} GB", flush=True)
            continue
        for K in [int(k) for k in args.drafts.split(",") if k]:
            try:
                state = random_state(cfg, B, ctx, max_len, kv_dtype=kv_dtype)
                mtp_state = random_state(cfg, B, ctx, max_len, layer_types=(FULL_ATTENTION,), seed=1,
                                         kv_dtype=kv_dtype)
                drafts = jnp.zeros((B, K), jnp.int32) + 7
                rnd = G._jitted("spec_round")

                def one_round(carry):
                    last, drafts, state, mtp_state = carry
                    _, _, last, drafts, state, mtp_state = rnd(cfg, options, K, params, state, mtp_state, last, drafts)
                    return last, drafts, state, mtp_state

                t, _ = time_steps(one_round, (tok, drafts, state, mtp_state), max(8, args.steps // 4))
                row = {"layout": layout, "batch": B, "context": ctx, "kv": kv_dtype or "bf16", "mode": f"MTP K={K}", "ms_per_step": t * 1e3,
                       "verify_cost_x_plain": t * 1e3 / plain,
                       "tok_s_at_accept_0.5": B * (1 + 0.5 * K) / t, "tok_s_at_accept_0.8": B * (1 + 0.8 * K) / t,
                       "peak_gb": peak_memory_gb()}
                rows.append(row)
                print(row, flush=True)
                del state, mtp_state
            except Exception as e:
                print(f"B={B} ctx={ctx} MTP K={K}: failed ({type(e).__name__}: {str(e)[:160]})", flush=True)
    return rows


if __name__ == "__main__":
    main()
