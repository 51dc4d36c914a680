"""Device diagnostics of the wgmma GEMM: where are wrong / non-finite outputs (token, row patterns)."""
import os, sys, torch
sys.path.insert(0, os.getcwd())
from tests.test_native_sm90 import _run
cfgs = [(100, 3072, 640, 32), (300, 1024, 384, 128), (513, 704, 256, 48)]
for pipe in ("128,64", "128,128", "192,64", "192,192", "256,64"):
    os.environ["NUNCHAKU_LITE_WGMMA_BT"], os.environ["NUNCHAKU_LITE_WGMMA_SUB"] = pipe.split(",")
    for m, k, n, r in cfgs:
        out, ref = _run(m, k, n, r, False, True, torch.float32)
        o, rf = out.double().cpu(), ref.double().cpu()
        bad = ~torch.isfinite(o) | ((o - rf).abs() > 1e-2 * rf.abs().mean())
        fin = torch.isfinite(o)
        rel = ((o[fin] - rf[fin]).norm() / rf[fin].norm()).item() if fin.any() else float("nan")
        rows = bad.any(1).nonzero().flatten()
        cols = bad.any(0).nonzero().flatten()
        print(f"pipe={pipe} m={m} k={k} n={n} r={r}: nonfinite={(~fin).sum().item()} bad={bad.sum().item()}/{bad.numel()} "
              f"rel(finite)={rel:.2e} bad rows {rows[:12].tolist()}.. (#{len(rows)}) mod16 "
              f"{torch.bincount(rows % 16, minlength=16).tolist()} bad cols #{len(cols)} mod128 first {(cols % 128)[:8].tolist()}",
              flush=True)
