"""Our GPTQ vs GPTQModel 7.7.0 on the same tiny Qwen3.5 checkpoint and the same calibration tokens.

    PEERS_ROOT=/tmp/peers python scripts/compare_gptqmodel.py        # w4g32-gar, w8g32-gar, w4g128-act, w8g128-act
    PEERS_ROOT=/tmp/peers python scripts/compare_gptqmodel.py --configs w4g32-gar --json out/cmp.json
    PEERS_ROOT=/tmp/peers python scripts/compare_gptqmodel.py --redo-peer          # re-run GPTQModel too

What it compares. For each config (bits, group size, column order; always sym, damp_percent 0.05,
damp_auto_increment 0.01, true_sequential, block 128, min-max ranges, fp16 scales):

* theirs: GPTQModel 7.7.0 quantizes ``$PEERS_ROOT/tiny_lm`` (bf16 Qwen3_5ForCausalLM, hidden 128,
  8 layers) with ``GPTQConfig(bits, group_size, sym=True, desc_act, act_group_aware, damp_percent=0.05)``
  on the peers' calibration set, ``torch.randint(4, 1016, (16, 128), generator=manual_seed(0))``
  (``shared/peers/peer_gptq.py``: ``calib()``), batch_size 1. This script re-executes itself with
  ``--peer`` under ``$PEERS_ROOT/venv_gptq/bin/python`` for that, writes
  ``$PEERS_ROOT/out/compare_lm_<config>/`` and reuses it on later runs. The GPTQ v1 tensors
  (``qweight``/``qzeros``/``scales``/``g_idx``) are decoded here as
  ``W[o, i] = scales[g_idx[i], o] * (q[i, o] - (qzeros[g_idx[i], o] + 1))`` (quant_formats.md 1.8).
* ours: the same checkpoint loaded in float32 (the bf16 values exactly), quantized by
  ``quant.calibration.gptq_quantize_model`` with a Recipe selecting the same 50 linears GPTQModel
  quantizes (``in_proj_qkv``, ``in_proj_z``, ``out_proj``, ``q/k/v/o_proj``, ``gate/up/down_proj``;
  ``in_proj_a/b``, embeddings and ``lm_head`` stay float) and the same token ids.

Per linear: the relative output error ``||X W^T - X W_q^T||_F / ||X W^T||_F`` where X is that linear's
input in the FLOAT model (ours, float32) on the calibration tokens, so both quantizers are scored on
the same X (computed as ``sqrt(tr(D H D^T) / tr(W H W^T))``, ``H = X^T X``, ``D = W - W_q``, float64).
Also per linear: the same error for plain round-to-nearest (ours, same bits/group, a reference that
shows how much GPTQ gains on this model), the fraction of identical integer codes, and the ratio of
GPTQ's own loss (``sum (w - q)^2 / d^2 / 2 / n_tokens``, each side on its OWN true-sequential inputs:
ours from ``GPTQInfo.loss``, theirs from GPTQModel's ``quant_log.csv``). Whole model: the relative
error of the final logits and the mean KL(float || quantized) per token, on the calibration tokens and on 16 x 128
held-out tokens (seed 1), both quantized models run by our forward (theirs as dequantized float
weights). Later layers see different inputs on the two sides during calibration (each side's own
quantized earlier layers, bf16 forward in GPTQModel vs float32 here), so small differences are
expected; the float-X metric isolates per-layer quality.

Needs the peer venv and tiny_lm: ``PEERS_ROOT=/tmp/peers python ../shared/peers/peer_gptq.py --model lm
--bits 4`` creates both (a few minutes). Time on 2 CPU cores: about 11 s per config for GPTQModel
(cached in ``$PEERS_ROOT/out``; its first run ever also JIT-compiles a packer, ~40 s) and 10-15 s per
config for ours; the four default configs took 136 s with ``--redo-peer`` (less with GPTQModel's
outputs cached). Peak memory about 1.5 GB.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

PEERS_ROOT = Path(os.environ.get("PEERS_ROOT", "/tmp/peers"))
PEER_PY = PEERS_ROOT / "venv_gptq" / "bin" / "python"
TINY = PEERS_ROOT / "tiny_lm"
SETUP_HINT = ("create it with `PEERS_ROOT={root} python ../shared/peers/peer_gptq.py --model lm --bits 4` "
              "(run from the repository root; it builds the venv venv_gptq and tiny_lm, a few minutes)")

DAMP = 0.05
# name -> (bits, group_size, order); order "gar" = act_group_aware (GPTQModel's default), "act" = desc_act
CONFIGS = {
    "w4g32-gar": (4, 32, "gar"),
    "w8g32-gar": (8, 32, "gar"),
    "w4g128-act": (4, 128, "act"),
    "w8g128-act": (8, 128, "act"),
    "w4g128-gar": (4, 128, "gar"),
    "w4g32-plain": (4, 32, "plain"),
}
CALIB = dict(n=16, seqlen=128, seed=0)  # the peers' calibration set
HELDOUT = dict(n=16, seqlen=128, seed=1)
# quant_log.csv prints losses with 10 decimals: below 1e-7 they have too few digits for a ratio
LOSS_MIN = 1e-7


def token_ids(n: int, seqlen: int, seed: int, vocab: int = 1024):
    """``[n, seqlen]`` int64 ids, as ``shared/peers/peer_gptq.py`` ``calib()`` draws them (ids 4..1015)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, vocab - 8, (n, seqlen), generator=g).numpy()


def peer_dir(config: str) -> Path:
    return PEERS_ROOT / "out" / f"compare_lm_{config}"


# --------------------------------------------------------------------------------------------------
# GPTQModel side (runs in $PEERS_ROOT/venv_gptq, which has no JAX)
# --------------------------------------------------------------------------------------------------


def peer_main(config: str) -> None:
    """Quantize tiny_lm with GPTQModel for ``config``; writes :func:`peer_dir`."""
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")  # 2-core boxes fail without it (peers README)
    from gptqmodel import GPTQConfig, GPTQModel

    bits, group, order = CONFIGS[config]
    qcfg = GPTQConfig(bits=bits, group_size=group, sym=True, desc_act=order == "act",
                      act_group_aware=order == "gar", damp_percent=DAMP)
    calib = [{"input_ids": row.tolist(), "attention_mask": [1] * len(row)} for row in token_ids(**CALIB)]
    out = peer_dir(config)
    t0 = time.time()
    model = GPTQModel.load(str(TINY), qcfg, device="cpu")
    model.quantize(calib, batch_size=1)
    model.save(str(out))
    (out / "compare_settings.json").write_text(json.dumps({"config": config, "calibration": CALIB}) + "\n")
    print(f"[peer] {config}: {time.time() - t0:.1f} s -> {out}", flush=True)


def peer_cached(config: str) -> bool:
    """GPTQModel's output for ``config`` exists and was made with this script's settings."""
    out = peer_dir(config)
    marker = out / "compare_settings.json"
    return (marker.exists() and (out / "model.safetensors").exists()
            and json.loads(marker.read_text()) == {"config": config, "calibration": CALIB})


def ensure_peer(config: str, redo: bool) -> tuple[Path, float]:
    """The GPTQModel output for ``config`` (made by re-executing this script in the peer venv when
    missing or ``redo``), and the seconds that took (0 when reused)."""
    out = peer_dir(config)
    marker = out / "compare_settings.json"
    if not redo and peer_cached(config):
        return out, 0.0
    if not PEER_PY.exists():
        sys.exit(f"error: the GPTQModel venv {PEER_PY} does not exist; " + SETUP_HINT.format(root=PEERS_ROOT))
    env = dict(os.environ, GPTQMODEL_CPU_WORKERS=os.environ.get("GPTQMODEL_CPU_WORKERS", "2"),
               PEERS_ROOT=str(PEERS_ROOT))
    log = PEERS_ROOT / "out" / f"compare_lm_{config}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    print(f"running GPTQModel for {config} (log: {log}) ...", file=sys.stderr, flush=True)
    with open(log, "w") as fh:
        # cwd: GPTQModel writes a logs/ folder into the working directory
        rc = subprocess.call([str(PEER_PY), os.path.abspath(__file__), "--peer", config], env=env,
                             stdout=fh, stderr=subprocess.STDOUT, cwd=log.parent)
    if rc != 0 or not marker.exists():
        tail = log.read_text()[-3000:]
        sys.exit(f"error: GPTQModel failed for {config} (exit {rc}); end of {log}:\n{tail}")
    return out, time.time() - t0


def check_peer_config(out: Path, bits: int, group: int, order: str) -> dict:
    """GPTQModel's saved quantize_config.json must say what we asked for (names each mismatch)."""
    qc = json.loads((out / "quantize_config.json").read_text())
    meta = qc.get("meta", {})
    want = {
        "bits": (qc.get("bits"), bits), "group_size": (qc.get("group_size"), group), "sym": (qc.get("sym"), True),
        "desc_act": (qc.get("desc_act"), order == "act"),
        "act_group_aware": (meta.get("act_group_aware"), order == "gar"),
        "damp_percent": (meta.get("damp_percent"), DAMP),
        "damp_auto_increment": (meta.get("damp_auto_increment"), 0.01),
        "static_groups": (meta.get("static_groups"), False),
        "true_sequential": (meta.get("true_sequential"), True), "mse": (meta.get("mse"), 0.0),
        "format": (qc.get("format"), "gptq"), "pack_dtype": (qc.get("pack_dtype"), "int32"),
    }
    bad = [f"{k}: GPTQModel wrote {have!r}, expected {exp!r}" for k, (have, exp) in want.items() if have != exp]
    if bad:
        sys.exit(f"error: {out}/quantize_config.json does not match the config:\n  " + "\n  ".join(bad))
    return {"quantizer": meta.get("quantizer"), **{k: v[0] for k, v in want.items()}}


def _unpack_rows(words, bits: int):
    """int32 words ``[R, C]`` packed LSB-first along axis 0 -> codes ``[R * 32/bits, C]`` (2/4/8 bits)."""
    import numpy as np

    if bits not in (2, 4, 8):
        raise ValueError(f"decoding {bits}-bit GPTQ v1 is not implemented here (2/4/8 only)")
    w = np.asarray(words).astype(np.uint32)
    pf = 32 // bits
    shifts = (np.arange(pf, dtype=np.uint32) * bits)[None, :, None]
    codes = (w[:, None, :] >> shifts) & np.uint32(2 ** bits - 1)  # [R, pf, C]
    return codes.reshape(-1, w.shape[1])


def decode_gptq_v1(out: Path, bits: int) -> dict:
    """``{module prefix: (W [N, K] float64, codes [N, K] int)}`` for every quantized linear in a GPTQ v1
    checkpoint: ``W[o, i] = scales[g, o] * (q[i, o] - (stored_zero[g, o] + 1))``, ``g = g_idx[i]``."""
    import numpy as np
    from safetensors.numpy import load_file

    tensors = {}
    for f in sorted(out.glob("*.safetensors")):
        tensors.update(load_file(f))
    res = {}
    for key in tensors:
        if not key.endswith(".qweight"):
            continue
        p = key[: -len(".qweight")]
        q = _unpack_rows(tensors[key], bits)  # [K, N]
        z = _unpack_rows(tensors[p + ".qzeros"].T, bits).T.astype(np.int64) + 1  # [G, N]; v1 stores zero - 1
        s = tensors[p + ".scales"].astype(np.float64)  # [G, N]
        g = tensors[p + ".g_idx"].astype(np.int64)  # [K]
        k, n = g.shape[0], s.shape[1]
        q = q[:k].astype(np.int64)
        if z.shape != s.shape:
            raise ValueError(f"{p}: qzeros decode to {z.shape}, scales are {s.shape}")
        w = s[g] * (q - z[g])  # [K, N]
        res[p] = (w.T, q.T)
        assert w.shape == (k, n)
    return res


def read_quant_log(out: Path) -> dict:
    """GPTQModel's ``quant_log.csv``: ``{"<layer>.<module>": loss}`` (loss = sum / n_tokens)."""
    with open(out / "quant_log.csv") as fh:
        return {f"{r['layer']}.{r['module']}": float(r["loss"]) for r in csv.DictReader(fh)}


# --------------------------------------------------------------------------------------------------
# Our side
# --------------------------------------------------------------------------------------------------


def recipe_for(bits: int, group: int, order: str):
    from quant.recipes import TEXT_LINEARS, Recipe, Rule

    return Recipe([Rule(TEXT_LINEARS, "gptq", bits=bits, group_size=group, sym=True, act_order=order == "act",
                        act_group_aware=order == "gar", static_groups=False, damp_percent=DAMP,
                        damp_increment=0.01, block_size=128, scale_dtype="float16", clip="minmax")],
                  name=f"compare-w{bits}g{group}-{order}")


def float_input_gram(cfg, params, ids, names) -> dict:
    """``{path: X^T X}`` (float64 numpy) of each linear's input in the float model on ``ids`` (the
    calibration capture of ``quant.calibration``, run on the unquantized layers)."""
    import jax.numpy as jnp
    import numpy as np

    from qwen35_jax import layers as L
    from qwen35_jax.model import RuntimeOptions, default_position_ids
    from quant.calibration import _capture, _forward

    c = cfg.text
    opts = RuntimeOptions()
    ids = jnp.asarray(ids, jnp.int32)
    embed = params["language_model"]["embed_tokens"]["weight"]
    x = jnp.take(embed, ids, axis=0)
    cos, sin = L.rope_cos_sin(default_position_ids(*ids.shape), c.rotary_dim, c.rope_theta, c.mrope_section,
                              embed.dtype)
    out = {}
    for i in range(c.num_hidden_layers):
        prefix = f"language_model.layers.{i}."
        mods = tuple(p[len(prefix):-len(".weight")] for p in names if p.startswith(prefix))
        lp, kind = params["language_model"]["layers"][i], c.layer_types[i]
        grams = _capture(lp, x, cos, sin, c=c, layer_type=kind, names=mods, options=opts) if mods else {}
        for m, g in grams.items():
            out[f"{prefix}{m}.weight"] = np.asarray(g, np.float64)
        x = _forward(lp, x, cos, sin, c=c, layer_type=kind, options=opts)
    return out


def our_codes(leaf):
    """Integer codes ``[N, K]`` of a QuantizedWeight in input-feature order."""
    import numpy as np

    from pallas_kernels.quant_matmul import layout

    codes = np.asarray(layout.unpack(leaf.packed, leaf.bits, leaf.in_features)).astype(np.int64)  # [K, N] stored
    if leaf.perm is not None:
        codes = codes[np.argsort(np.asarray(leaf.perm))]
    return codes.T


def logit_metrics(cfg, ref_params, q_params, ids) -> dict:
    """Relative Frobenius error of the final logits and mean KL(float || quantized) per token."""
    import numpy as np

    import qwen35_jax as Q

    a = np.asarray(Q.forward(cfg, ref_params, ids), np.float64)
    b = np.asarray(Q.forward(cfg, q_params, ids), np.float64)
    la = a - a.max(-1, keepdims=True)
    la -= np.log(np.exp(la).sum(-1, keepdims=True))
    lb = b - b.max(-1, keepdims=True)
    lb -= np.log(np.exp(lb).sum(-1, keepdims=True))
    kl = float(np.mean(np.sum(np.exp(la) * (la - lb), -1)))
    top1 = float(np.mean(a.argmax(-1) == b.argmax(-1)))
    return {"logit_rel_err": float(np.linalg.norm(a - b) / np.linalg.norm(a)), "kl": kl, "top1_agree": top1}


# --------------------------------------------------------------------------------------------------
# The comparison
# --------------------------------------------------------------------------------------------------


def compare(config: str, cfg, params, flat, grams, calib_ids, heldout_ids, redo_peer: bool) -> dict:
    import jax.numpy as jnp
    import numpy as np

    import qwen35_jax as Q
    from quant.calibration import gptq_quantize_model
    from quant.quantize import path_string, walk
    from quant.rtn import rtn_quantize

    bits, group, order = CONFIGS[config]
    out, peer_s = ensure_peer(config, redo_peer)
    peer_settings = check_peer_config(out, bits, group, order)
    theirs = decode_gptq_v1(out, bits)
    their_loss = read_quant_log(out)

    t0 = time.perf_counter()
    qparams, info = gptq_quantize_model(cfg, params, recipe_for(bits, group, order), calib_ids)
    ours_s = time.perf_counter() - t0
    qflat = {path_string(k): v for k, v in walk(qparams)}
    n_tokens = int(np.asarray(calib_ids).size)

    paths = sorted(info, key=lambda p: (int(p.split(".")[2]), p))
    missing = sorted({Q.to_hf_name(cfg, p)[: -len(".weight")] for p in paths} - set(theirs))
    extra = sorted(set(theirs) - {Q.to_hf_name(cfg, p)[: -len(".weight")] for p in paths})
    if missing or extra:
        sys.exit(f"error: the quantized linears differ: only ours {missing}, only GPTQModel {extra}")

    rows = []
    their_flat = dict(flat)
    for p in paths:
        w = np.asarray(flat[p], np.float64)
        h = grams[p]
        leaf = qflat[p]
        w_ours = np.asarray(leaf.dequantize_stored(), np.float64)  # [K, N] stored order
        if leaf.perm is not None:
            w_ours = w_ours[np.argsort(np.asarray(leaf.perm))]
        w_ours = w_ours.T
        w_theirs, c_theirs = theirs[Q.to_hf_name(cfg, p)[: -len(".weight")]]
        their_flat[p] = jnp.asarray(w_theirs, jnp.float32)
        ref = np.sum((w @ h) * w)

        def rel(wq):
            d = w - wq
            return float(np.sqrt(np.sum((d @ h) * d) / ref))

        ours_e, theirs_e = rel(w_ours), rel(w_theirs)
        rtn = rtn_quantize(flat[p], bits=bits, group_size=group, sym=True, scale_dtype="float16")
        rtn_e = rel(np.asarray(rtn.dequantize(), np.float64))
        layer, module = p.split(".")[2], ".".join(p.split(".")[3:-1])
        tl = their_loss.get(f"{layer}.{module}")
        ol = info[p].loss / n_tokens
        rows.append({
            "linear": p[len("language_model."):-len(".weight")], "ours": ours_e, "theirs": theirs_e,
            "ratio": ours_e / theirs_e, "rtn": rtn_e, "same_codes": float(np.mean(our_codes(leaf) == c_theirs)),
            "w_err_ours": float(np.linalg.norm(w - w_ours) / np.linalg.norm(w)),
            "w_err_theirs": float(np.linalg.norm(w - w_theirs) / np.linalg.norm(w)),
            "loss_ours": ol, "loss_theirs": tl,
            "loss_ratio": ol / tl if tl is not None and tl >= LOSS_MIN else None, "damp_ours": info[p].damp,
        })
    theirs_params = Q.unflatten(their_flat)
    ratios = np.array([r["ratio"] for r in rows])
    model = {}
    for split, ids in (("calib", calib_ids), ("heldout", heldout_ids)):
        model[split] = {"ours": logit_metrics(cfg, params, qparams, ids),
                        "theirs": logit_metrics(cfg, params, theirs_params, ids)}
    summary = {"n_linears": len(rows), "median_ratio": float(np.median(ratios)), "max_ratio": float(ratios.max()),
               "min_ratio": float(ratios.min()), "geomean_ratio": float(np.exp(np.mean(np.log(ratios)))),
               "n_ratio_gt_1.10": int(np.sum(ratios > 1.10)),
               "median_ours_over_rtn": float(np.median([r["ours"] / r["rtn"] for r in rows])),
               "median_theirs_over_rtn": float(np.median([r["theirs"] / r["rtn"] for r in rows])),
               "median_loss_ratio": float(np.median([r["loss_ratio"] for r in rows if r["loss_ratio"]])),
               "mean_same_codes": float(np.mean([r["same_codes"] for r in rows])),
               "median_w_err_ours": float(np.median([r["w_err_ours"] for r in rows])),
               "median_w_err_theirs": float(np.median([r["w_err_theirs"] for r in rows]))}
    return {"config": config, "bits": bits, "group_size": group, "order": order, "peer_dir": str(out),
            "peer_settings": peer_settings, "seconds": {"gptqmodel": round(peer_s, 1), "ours": round(ours_s, 1)},
            "rows": rows, "summary": summary, "model": model}


def print_result(r: dict) -> None:
    order = {"gar": "act_group_aware", "act": "desc_act", "plain": "no reordering"}[r["order"]]
    print(f"\n## {r['config']}: {r['bits']}-bit, group {r['group_size']}, sym, {order}, damp {DAMP}, true_sequential"
          f"  (GPTQModel {r['seconds']['gptqmodel']} s{' (cached)' if not r['seconds']['gptqmodel'] else ''}, "
          f"ours {r['seconds']['ours']} s)\n")
    print("| linear | ours | GPTQModel | ours/theirs | RTN (ref.) | same codes | GPTQ loss ours/theirs (own inputs) |")
    print("|---|---|---|---|---|---|---|")
    for x in r["rows"]:
        lr = f"{x['loss_ratio']:.3f}" if x["loss_ratio"] else "n/a"
        flag = " **" if x["ratio"] > 1.10 else ""
        print(f"| {x['linear']} | {x['ours']:.5f} | {x['theirs']:.5f} | {x['ratio']:.3f}{flag} | {x['rtn']:.5f} | "
              f"{100 * x['same_codes']:.1f}% | {lr} |")
    s = r["summary"]
    print(f"\nper-linear output error, ours/theirs over {s['n_linears']} linears: median {s['median_ratio']:.3f}, "
          f"geomean {s['geomean_ratio']:.3f}, min {s['min_ratio']:.3f}, max {s['max_ratio']:.3f}, "
          f"> 1.10: {s['n_ratio_gt_1.10']}; GPTQ/RTN error median ours {s['median_ours_over_rtn']:.3f}, "
          f"theirs {s['median_theirs_over_rtn']:.3f}; identical codes {100 * s['mean_same_codes']:.1f}%; "
          f"GPTQ loss ratio median {s['median_loss_ratio']:.3f}; weight rel. error median ours "
          f"{s['median_w_err_ours']:.4f}, theirs {s['median_w_err_theirs']:.4f}")
    print(f"(GPTQ loss ratio n/a: GPTQModel's quant_log.csv loss below {LOSS_MIN:g}, printed with too few digits)")
    print("\n| whole model vs float | logits rel. err | KL(float‖q) / token | top-1 agree |")
    print("|---|---|---|---|")
    for split in ("calib", "heldout"):
        for side, label in (("ours", "ours"), ("theirs", "GPTQModel")):
            m = r["model"][split][side]
            print(f"| {label}, {split} tokens | {m['logit_rel_err']:.5f} | {m['kl']:.3e} | "
                  f"{100 * m['top1_agree']:.2f}% |")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default="w4g32-gar,w8g32-gar,w4g128-act,w8g128-act",
                    help=f"comma-separated, from {sorted(CONFIGS)}")
    ap.add_argument("--json", type=Path, default=None, help="write every number here")
    ap.add_argument("--redo-peer", action="store_true", help="re-run GPTQModel even if its output exists")
    ap.add_argument("--peer", metavar="CONFIG", help=argparse.SUPPRESS)  # internal: run in the GPTQModel venv
    args = ap.parse_args(argv)
    if args.peer:
        peer_main(args.peer)
        return 0
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown:
        ap.error(f"unknown config(s) {unknown}; known: {sorted(CONFIGS)}")
    if not (TINY / "config.json").exists():
        sys.exit(f"error: the tiny checkpoint {TINY} does not exist; " + SETUP_HINT.format(root=PEERS_ROOT))
    if not PEER_PY.exists() and (args.redo_peer or not all(peer_cached(c) for c in configs)):
        sys.exit(f"error: the GPTQModel venv {PEER_PY} does not exist; " + SETUP_HINT.format(root=PEERS_ROOT))

    t_start = time.perf_counter()
    import jax
    import jax.numpy as jnp

    import qwen35_jax as Q

    cfg, params = Q.load_checkpoint(TINY, dtype=jnp.float32)
    flat = Q.flatten(params)
    calib_ids = token_ids(**CALIB).astype("int32")
    heldout_ids = token_ids(**HELDOUT).astype("int32")
    from quant.recipes import TEXT_LINEARS

    names = [p for p in flat if re.fullmatch(TEXT_LINEARS, p)]
    grams = float_input_gram(cfg, params, calib_ids, names)
    print(f"# Our GPTQ vs GPTQModel 7.7.0 on {TINY} ({len(names)} linears), calibration "
          f"torch.randint(4, 1016, ({CALIB['n']}, {CALIB['seqlen']}), seed {CALIB['seed']}); error = "
          f"||X W^T - X W_q^T||_F / ||X W^T||_F with X the float model's inputs (jax {jax.__version__})")
    results = []
    for c in configs:
        r = compare(c, cfg, params, flat, grams, calib_ids, heldout_ids, args.redo_peer)
        print_result(r)
        sys.stdout.flush()
        results.append(r)
    total = time.perf_counter() - t_start
    print(f"\ntotal wall time {total:.0f} s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"checkpoint": str(TINY), "calibration": CALIB, "heldout": HELDOUT,
                                         "damp_percent": DAMP, "results": results, "seconds": round(total, 1)},
                                        indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
