"""GPTQModel 7.7.0's GPTQ codes for tests/quant/test_gptq.py::test_codes_match_gptqmodel.

Not run by the tests. Regenerate (CPU): unpack the gptqmodel 7.7.0 sdist to GPTQMODEL_SRC, make a venv
with --system-site-packages (torch 2.13 CPU) plus `pip install --no-deps pypcre logbar accelerate
threadpoolctl device-smi tokenicer defuser`, save the test's inputs with
`np.savez(IN, w=w, x=x)` from `_peer_inputs()`, then
`GPTQMODEL_CPU_WORKERS=2 venv/bin/python make_gptqmodel_codes.py IN gptqmodel_7.7.0_codes.npz`.
The GPTQ object is configured as gptqmodel/looper/gptq_processor.py does (perchannel quantizer).
"""
import sys, numpy as np, torch, os
sys.path.insert(0, os.environ.get("GPTQMODEL_SRC", "gptqmodel-7.7.0"))
from gptqmodel.quantization.gptq import GPTQ
from gptqmodel.quantization import QuantizeConfig
d = np.load(sys.argv[1]); res = {}
for bits, gs, ao, gar in [(4, 32, 0, 0), (4, 32, 0, 1), (4, 128, 1, 0), (3, 128, 1, 0), (8, 32, 0, 1), (8, 64, 1, 0)]:
    w = torch.tensor(d["w"]); x = torch.tensor(d["x"])
    lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False); lin.weight.data = w.clone()
    cfg = QuantizeConfig(bits=bits, group_size=gs, sym=True, desc_act=bool(ao), act_group_aware=bool(gar), damp_percent=0.01)
    g = GPTQ(lin, qcfg=cfg); g.fallback = cfg.fallback; g.expected_nsamples = None; g.quantizer.configure(perchannel=True)
    g.add_batch(x[None], None)
    Q, scale, zero, g_idx, *_ = g.quantize(blocksize=128)
    print(bits, gs, ao, gar, Q.shape, scale.shape, zero.shape, g_idx.shape, file=sys.stderr)
    sc = scale[:, g_idx.long()] if scale.shape[0] == Q.shape[0] else scale.T[:, g_idx.long()]
    zc = zero[:, g_idx.long()] if zero.shape[0] == Q.shape[0] else zero.T[:, g_idx.long()]
    codes = torch.round(Q.float() / sc.float()) + zc.float()
    res[f"w{bits}g{gs}_{'act_order' if ao else ('gar' if gar else 'plain')}"] = codes.numpy().astype(np.uint8)
np.savez_compressed(sys.argv[2], **res)
