"""``qwen35-jax ablate``: quantize a model with each recipe, measure what it costs and what it saves.

For every recipe: quantize (``quant.quantize_params``), evaluate sliding-window perplexity on a corpus
split, count bits per weight (with scales/zeros/padding) and bytes on disk (``quant.save``), and on a
GPU time greedy decoding. Writes ``results.csv``, ``results.json``, ``results.md`` and ``plot.png``
(perplexity change vs bits per weight, one point per recipe) into a fresh output directory.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from qwen35_jax import checkpoint, corpus, evaluation
from qwen35_jax.small_model import encode_documents, matching_tokenizer

BASELINE = "none"  # the unquantized model, always evaluated first
BF16 = "bf16"  # the unquantized weights rounded to bfloat16 (activations keep --dtype)
DEFAULT_RECIPES = (BASELINE, "int8-per-channel", "int8-g32-text", "gptq-int8-g32-text", "int8-attn-int4-rest-g128",
                   "gptq-int8-attn-int4-rest-g128-eora64", "int4-g32", "int4-g128", "gptq-int4-g128", "int3-g128")


@dataclasses.dataclass
class Row:
    recipe: str
    bits_per_weight: float        # over the quantized linears (16/32 for the baseline: its dtype)
    model_bits_per_weight: float  # over every parameter
    size_mb: float                # bytes on disk of quant.save(tree)
    ppl: float
    ppl_delta_pct: float
    quantize_s: float
    eval_s: float
    decode_tok_s: float | None = None


def _disk_bytes(tree) -> int:
    import quant

    with tempfile.TemporaryDirectory() as tmp:
        target = Path(tmp) / "tree"
        quant.save(target, tree)
        return sum(p.stat().st_size for p in target.rglob("*") if p.is_file())


def _decode_speed(cfg, tree, prompt: Sequence[int], new_tokens: int = 64) -> float:
    from qwen35_jax import generation

    generation.generate(cfg, tree, [list(prompt)], max_new_tokens=new_tokens, sampling="greedy")  # compile
    t0 = time.perf_counter()
    out = generation.generate(cfg, tree, [list(prompt)], max_new_tokens=new_tokens, sampling="greedy")
    dt = time.perf_counter() - t0
    return len(out.tokens[0]) / dt


def validate_recipes(names: Sequence[str]) -> list[str]:
    import quant

    names = [n.strip() for n in names if n.strip()]
    if not names:
        raise ValueError("no recipes given")
    known = {**quant.PRESETS, **quant.CALIBRATED_PRESETS}
    unknown = [n for n in names if n not in (BASELINE, BF16) and n not in known]
    if unknown:
        raise ValueError(f"unknown recipe(s) {unknown}; available: {[BASELINE, BF16, *sorted(known)]}")
    return [BASELINE] + [n for n in dict.fromkeys(names) if n != BASELINE]


def fresh_out_dir(out: str | Path | None, model_dir: Path) -> Path:
    if out is None:
        out = Path("runs") / f"ablate-{model_dir.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty; refusing to overwrite (choose another --out)")
    out.mkdir(parents=True, exist_ok=True)
    return out


def run_ablation(model_dir: str | Path, recipes: Sequence[str], *, out_dir: str | Path | None = None,
                 corpus_dir: str | Path | None = None, split: str = "validation", seq_len: int | None = None,
                 stride: int | None = None, batch_size: int = 8, dtype=jnp.float32, decode: bool | None = None,
                 calib_seqs: int = 32, calib_len: int | None = None, log=print) -> tuple[list[Row], Path]:
    """Evaluate every recipe on ``split``. Calibrated recipes (GPTQ/EoRA, ``quant.CALIBRATED_PRESETS``)
    calibrate on ``calib_seqs`` windows of ``calib_len`` tokens (default: the evaluation window) from
    the *train* split, never the evaluated one."""
    import quant

    model_dir = Path(model_dir)
    recipes = validate_recipes(recipes)
    cfg, params = checkpoint.load_checkpoint(model_dir, jnp.dtype(dtype))
    tok = matching_tokenizer(model_dir, cfg.text.vocab_size)
    ids = encode_documents(tok, corpus.read_split(corpus_dir or corpus.sample_dir(), split))
    if seq_len is None:  # evaluate at the context the model was trained with, if it says
        log_path = model_dir / "train_log.json"
        trained = json.loads(log_path.read_text())["train_config"]["seq_len"] if log_path.exists() else 2048
        seq_len = min(trained, 2048, ids.size)
    stride = stride or max(1, seq_len // 2)
    if decode is None:
        decode = jax.default_backend() == "gpu"
    calib = None
    if any(n in quant.CALIBRATED_PRESETS for n in recipes):
        train_ids = encode_documents(tok, corpus.read_split(corpus_dir or corpus.sample_dir(), "train"))
        length = calib_len or seq_len
        n = min(calib_seqs, train_ids.size // length)
        if n == 0:
            raise ValueError(f"the train split has {train_ids.size} tokens, fewer than one calibration window of {length}")
        calib = train_ids[: n * length].reshape(n, length).astype(np.int32)
    out = fresh_out_dir(out_dir, model_dir)
    log(f"model {model_dir} ({cfg.text.num_hidden_layers} layers, hidden {cfg.text.hidden_size}); "
        f"{split} split: {ids.size:,} tokens, seq_len {seq_len}, stride {stride}; results -> {out}")
    rows: list[Row] = []
    base_ppl = None
    for i, name in enumerate(recipes, 1):
        t0 = time.perf_counter()
        if name == BASELINE:
            tree = params
        elif name == BF16:
            tree = jax.tree.map(lambda x: x.astype(jnp.bfloat16) if jnp.issubdtype(x.dtype, jnp.floating) else x,
                                params)
        elif name in quant.CALIBRATED_PRESETS:
            tree, _ = quant.gptq_quantize_model(cfg, params, name, calib, batch_size=batch_size)
        else:
            tree = quant.quantize_params(params, name)
        jax.block_until_ready(tree)
        tq = time.perf_counter() - t0
        t0 = time.perf_counter()
        result = evaluation.perplexity(cfg, tree, ids, seq_len=seq_len, stride=stride, batch_size=batch_size)
        te = time.perf_counter() - t0
        bits = quant.average_bits(tree)
        if base_ppl is None:
            base_ppl = result.ppl
        row = Row(recipe=name,
                  bits_per_weight=(16.0 if name == BF16 else jnp.dtype(dtype).itemsize * 8.0 if name == BASELINE
                                   else bits.quantized_bits_per_weight),
                  model_bits_per_weight=bits.total_bits_per_weight, size_mb=_disk_bytes(tree) / 1e6,
                  ppl=result.ppl, ppl_delta_pct=100.0 * (result.ppl / base_ppl - 1.0), quantize_s=tq, eval_s=te)
        if decode:
            row.decode_tok_s = _decode_speed(cfg, tree, ids[:32].tolist())
        rows.append(row)
        log(f"[{i}/{len(recipes)}] {name:26s} ppl {row.ppl:9.4f} ({row.ppl_delta_pct:+7.3f}%)  "
            f"{row.bits_per_weight:5.2f} bits/w  {row.size_mb:8.2f} MB  quantize {tq:5.1f}s eval {te:5.1f}s")
        del tree
        # rewritten after every recipe: an interrupted ablation keeps the rows it finished
        write_results(rows, out, meta={"model": str(model_dir), "split": split, "tokens": int(ids.size),
                                       "seq_len": seq_len, "stride": stride, "dtype": str(jnp.dtype(dtype)),
                                       "device": str(jax.devices()[0].device_kind), "date": time.strftime("%Y-%m-%d"),
                                       "complete": i == len(recipes)})
    return rows, out


def markdown_table(rows: Sequence[Row]) -> str:
    decode = any(r.decode_tok_s is not None for r in rows)
    head = ["recipe", "bits/weight (linears)", "bits/weight (model)", "size MB", "ppl", "Δppl %"]
    head += ["decode tok/s"] if decode else []
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r.recipe, f"{r.bits_per_weight:.2f}", f"{r.model_bits_per_weight:.2f}", f"{r.size_mb:.2f}",
                 f"{r.ppl:.4f}", f"{r.ppl_delta_pct:+.3f}"]
        cells += [f"{r.decode_tok_s:.1f}" if r.decode_tok_s is not None else "-"] if decode else []
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_results(rows: Sequence[Row], out: Path, meta: dict) -> dict[str, Path]:
    paths = {k: out / f"results.{k}" for k in ("csv", "json", "md")}
    with paths["csv"].open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=[fl.name for fl in dataclasses.fields(Row)])
        w.writeheader()
        for r in rows:
            w.writerow(dataclasses.asdict(r))
    paths["json"].write_text(json.dumps({"meta": meta, "rows": [dataclasses.asdict(r) for r in rows]}, indent=1))
    paths["md"].write_text(f"{markdown_table(rows)}\n\n{json.dumps(meta)}\n")
    paths["png"] = out / "plot.png"
    plot(rows, paths["png"], title=f"{Path(meta['model']).name}: perplexity change vs bits per weight")
    return paths


def plot(rows: Sequence[Row], path: Path, title: str = "") -> None:
    """Scatter of Δppl % (y) against bits per weight of the quantized linears (x), drawn with Pillow."""
    from PIL import Image, ImageDraw

    W, H, L, R, T, B = 900, 560, 80, 30, 50, 60
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    pts = [(r.bits_per_weight, r.ppl_delta_pct, r.recipe) for r in rows if r.recipe != BASELINE]
    xs = [p[0] for p in pts] or [0.0, 1.0]
    ys = [p[1] for p in pts] + [0.0]
    x0, x1 = min(xs) - 0.5, max(xs) + 0.5
    y0, y1 = min(ys), max(ys)
    pad = 0.08 * (y1 - y0 or 1.0)
    y0, y1 = y0 - pad, y1 + pad

    def sx(x):
        return L + (x - x0) / (x1 - x0) * (W - L - R)

    def sy(y):
        return H - B - (y - y0) / (y1 - y0) * (H - T - B)

    d.rectangle([L, T, W - R, H - B], outline="black")
    for k in range(6):  # ticks
        xv, yv = x0 + k * (x1 - x0) / 5, y0 + k * (y1 - y0) / 5
        d.line([sx(xv), H - B, sx(xv), H - B + 5], fill="black")
        d.text((sx(xv) - 12, H - B + 8), f"{xv:.1f}", fill="black")
        d.line([L - 5, sy(yv), L, sy(yv)], fill="black")
        d.text((8, sy(yv) - 6), f"{yv:+.2f}%", fill="black")
    d.line([L, sy(0.0), W - R, sy(0.0)], fill=(160, 160, 160))  # the baseline
    for i, (x, y, name) in enumerate(sorted(pts)):
        cx, cy = sx(x), sy(y)
        d.ellipse([cx - 5, cy - 5, cx + 5, cy + 5], fill=(31, 119, 180))
        d.text((cx + 8, cy - 18 if i % 2 else cy + 4), name, fill="black")  # alternate: neighbours overlap
    d.text((L, 18), title, fill="black")
    d.text(((W - L) // 2, H - 25), "bits per weight (quantized linears, incl. scales)", fill="black")
    d.text((8, T - 20), "ppl change vs unquantized", fill="black")
    img.save(path)


def main(args) -> int:
    from qwen35_jax.small_model import default_model

    model_dir = Path(args.model) if args.model else default_model()
    if not (model_dir / "config.json").exists():
        print(f"error: {model_dir}: no config.json (not a model directory)", file=sys.stderr)
        return 2
    try:
        rows, out = run_ablation(model_dir, args.recipes.split(","), out_dir=args.out, corpus_dir=args.corpus,
                                 split=args.split, seq_len=args.seq_len, stride=args.stride,
                                 calib_seqs=args.calib_seqs, calib_len=args.calib_len,
                                 dtype=jnp.dtype(args.dtype), decode=False if args.no_decode else None)
    except (ValueError, FileExistsError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print()
    print(markdown_table(rows))
    print(f"\nplot: {out / 'plot.png'}\ntables: {out / 'results.md'}, {out / 'results.csv'}, {out / 'results.json'}")
    return 0


def add_arguments(p) -> None:
    p.add_argument("--model", default=None, help="HF-layout model dir with a tokenizer (default: the built-in "
                   "small model, trained on first use)")
    p.add_argument("--recipes", default=",".join(DEFAULT_RECIPES),
                   help=f"comma-separated recipe presets ('{BASELINE}' = unquantized, '{BF16}' = its weights rounded "
                   "to bfloat16); default: %(default)s")
    p.add_argument("--corpus", default=None, help="directory of .rst.txt documents (default: built-in sample)")
    p.add_argument("--split", default="validation", choices=corpus.SPLITS)
    p.add_argument("--seq-len", type=int, default=None, help="default: the model's training length (<= 2048)")
    p.add_argument("--stride", type=int, default=None, help="default: seq-len / 2")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--calib-seqs", type=int, default=32, help="GPTQ calibration windows from the train split")
    p.add_argument("--calib-len", type=int, default=None, help="their length (default: --seq-len)")
    p.add_argument("--no-decode", action="store_true", help="skip the decode-speed column on a GPU")
    p.add_argument("--out", default=None, help="output directory (default: runs/ablate-MODEL-TIME)")


__all__ = ["run_ablation", "markdown_table", "plot", "Row", "DEFAULT_RECIPES", "BASELINE", "BF16"]
