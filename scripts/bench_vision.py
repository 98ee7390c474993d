"""The 27-block Qwen3.5 ViT (+ patch merger) on one 1024x1024 image, on the GPU: ms per image, ours
beside transformers' Qwen3_5VisionModel in the same run (random bf16 weights, real shapes).

    python scripts/bench_vision.py --json out/bench_vision.json [--no-hf]

A 1024x1024 image is 64x64 patches of 16 px (4,096 patches, 1,024 merged tokens of width 5120).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

# torch runs in the same process: JAX must not grab 75% of the GPU up front
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax
import jax.numpy as jnp
import numpy as np

import qwen35_jax as Q
from qwen35_jax.api import vision_features

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from benchlib import device_info, peak_memory_gb, print_table, time_fn, write_json  # noqa: E402


def hf_time(size: int, pixels: np.ndarray, grid: np.ndarray, reps: int) -> tuple[float, np.ndarray]:
    import torch
    from transformers import Qwen3_5VisionConfig
    from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5VisionModel

    torch.manual_seed(0)
    cfg = Qwen3_5VisionConfig(out_hidden_size=5120)
    with torch.device("cuda"):
        model = Qwen3_5VisionModel(cfg).to(torch.bfloat16).eval()
    x = torch.tensor(pixels, dtype=torch.bfloat16, device="cuda")
    g = torch.tensor(grid, device="cuda")
    with torch.no_grad():
        for _ in range(2):
            out = model(x, grid_thw=g).pooler_output
        torch.cuda.synchronize()
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            model(x, grid_thw=g)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
    return float(np.median(times)), out.float().cpu().numpy()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--no-hf", action="store_true")
    ap.add_argument("--tiny", action="store_true", help="tiny vision config (CPU smoke test)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    vision = Q.tiny_vision_config(out_hidden_size=64) if args.tiny else Q.VisionConfig()
    text = Q.tiny_text_config() if args.tiny else Q.TextConfig()
    cfg = Q.ModelConfig(text=text, vision=vision)
    params = Q.random_params(cfg, dtype=jnp.bfloat16, only="visual.")
    side = args.size // vision.patch_size
    grid = np.array([[1, side, side]])
    pixels = np.random.default_rng(0).standard_normal((side * side, vision.patch_dim)).astype(np.float32)
    pix = jnp.asarray(pixels, jnp.bfloat16)
    t = time_fn(lambda: vision_features(cfg, params, pix, grid), warmup=2, reps=args.reps)["median_s"]
    rows = [{"impl": "ours (XLA)", "ms": t * 1e3, "patches": side * side, "peak_gb": peak_memory_gb()}]
    if not args.no_hf:
        try:
            t_hf, _ = hf_time(args.size, pixels, grid, args.reps)
            rows.append({"impl": "transformers (torch, sdpa)", "ms": t_hf * 1e3, "patches": side * side})
        except Exception as e:
            print(f"transformers run failed: {type(e).__name__}: {str(e)[:200]}")
    print(f"\nQwen3.5 ViT ({vision.depth} blocks) + merger, one {args.size}x{args.size} image, bf16; {device_info()}")
    print_table(rows, [("impl", "implementation"), ("ms", "ms / image"), ("patches", "patches"), ("peak_gb", "peak GB")])
    write_json(args.json, {"benchmark": "vision", "device": device_info(), "rows": rows})


if __name__ == "__main__":
    main()
