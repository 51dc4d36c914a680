"""Kernel benchmark at FLUX.1 shapes: native W4A4 (fused low-rank, without low-rank, unfused) vs torch bf16
matmul and torch fp8 `_scaled_mm`, plus the quantize kernel's bandwidth against a device copy.

On sm_90 the wgmma GEMM (native/gemm_w4a4_sm90.cu) gets its own columns: `wgmma` (GEMM with the fused
low-rank branch, rank 32) and `wg0` (same GEMM without low-rank), both timed alone on activations already in
the fp8_tiles layout; then the same codes with power-of-two weight scales (`fold`, nl_w4a4_gemm_fp8_pow2) and
with power-of-two weight and activation scales (`s8`, the integer GEMM nl_w4a4_gemm_s8 on s8_tiles input,
whose `linear` column includes the statistics and quantize kernels). The legacy mma.sync columns then use the
s8 path (skip them with --no-legacy).

Timing: each variant is captured in a CUDA graph of `--reps` back-to-back calls (so Python launch overhead
is not measured) and the graph is replayed `--replays` times between CUDA events; the reported time is the
median replay divided by reps. All variants of a shape run in one process, side by side.
Tokens M: 4608 = 1024x1024 image (4096) + 512 text, 1536 = 512x512 (1024) + 512. Weight N x K.
`--quantize` prints only the quantize-kernel table (quantize_table): the three activation layouts, plain and
LayerNorm-fused, GB/s counting x read + codes/scales/lora_act written, and % of the copy bandwidth measured in
the same run; the statistics kernel (nl_act_stats) that precedes the LayerNorm-fused and power-of-two
quantization has rows of its own. `--w4a16` prints only the W4A16 GEMV table (the modulation linears: one
vector per image, 4-bit weights), GB/s counting the weight codes and scales read.
"""
import argparse
import json
import os
import statistics
import sys

import torch

from .. import native
from ..quant import ops

SHAPES = [(3072, 3072), (3072, 9216), (3072, 12288), (12288, 3072), (3072, 21504), (15360, 3072)]  # (K, N)
TOKENS = [4608, 1536]
RANK = 32


def time_ms(fn, reps=10, replays=25):
    """Median milliseconds per call of fn (CUDA-graph replays; falls back to an event-timed loop)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(reps):
                fn()
        run = graph.replay
    except Exception as e:  # capture not possible: time the plain launches (includes launch gaps)
        print(f"  (graph capture failed: {e}; timing eager launches)", file=sys.stderr)
        torch.cuda.synchronize()

        def run():
            for _ in range(reps):
                fn()
    run()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / reps)
    return statistics.median(times)


def copy_bandwidth() -> float:
    """Device-to-device copy of 1 GiB, GB/s counting bytes read plus written."""
    x = torch.empty(2 ** 29, device="cuda", dtype=torch.bfloat16).normal_()
    y = torch.empty_like(x)
    t = time_ms(lambda: y.copy_(x), reps=5, replays=15)
    return 2 * x.numel() * 2 / t / 1e6


def _baselines(r, x, m, k, n, out):
    """torch bf16 matmul and fp8 _scaled_mm on the same shape (same process, same output buffer)."""
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
    r["bf16_ms"] = time_ms(lambda: torch.mm(x, w.t(), out=out))
    try:
        x8, w8 = x.to(torch.float8_e4m3fn), w.to(torch.float8_e4m3fn)
        sa = torch.ones(m, 1, device="cuda")
        sb = torch.ones(1, n, device="cuda")
        r["fp8_ms"] = time_ms(lambda: torch._scaled_mm(x8, w8.t(), scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16))
    except Exception as e:
        print(f"  fp8 _scaled_mm unavailable: {e}", file=sys.stderr)
        r["fp8_ms"] = float("nan")


def make_layer(k, n, rank=RANK, seed=0, path=None):
    """Random layer in the ops layout + its prepared copy; bf16 weights for the baselines."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    codes = torch.randint(-8, 8, (n, k), generator=g, device="cuda", dtype=torch.int8)
    wscales = (torch.rand(n, k // 64, generator=g, device="cuda") * 0.02 + 1e-3).to(torch.bfloat16)
    lora_down = (torch.randn(rank, k, generator=g, device="cuda") / k ** 0.5).to(torch.bfloat16)
    lora_up = (torch.randn(n, rank, generator=g, device="cuda") * 0.1).to(torch.bfloat16)
    bias = torch.randn(n, generator=g, device="cuda").to(torch.bfloat16)
    smooth = torch.rand(k, generator=g, device="cuda") + 0.5
    qweight = ops.pack_int4(codes)
    prep = native.prepare_w4a4(qweight, wscales, lora_down, lora_up, bias, smooth, path=path)
    prep0 = native.prepare_w4a4(qweight, wscales, None, None, bias, smooth, path=path)
    return prep, prep0, lora_down, lora_up


def _time_wgmma(r, key, x, prep, prep0, out, fold):
    """r[key_*]: the sm_90 GEMM with (key_ms) and without (key_nolora_ms) the low-rank branch on fp8_tiles
    input, the whole linear (key_linear_ms: quantize kernel + GEMM, as w4a4_linear_prepared runs it), and
    their TOPS and ratios to the baselines already in r."""
    m, k = x.shape
    layout, pow2 = native.act_layout(prep, "wgmma"), prep.act_pow2
    quant = lambda down: native.quantize_act(x, prep.smooth, down, layout=layout, pow2=pow2,
                                             inv_smooth=prep.inv_smooth)
    act, act0 = quant(prep.lora_down), quant(None)
    gemm = lambda a, p: native.w4a4_gemm(a, p, out=out, path="wgmma", m=m, fold=fold)
    r[f"{key}_ms"] = time_ms(lambda: gemm(act, prep))
    r[f"{key}_nolora_ms"] = time_ms(lambda: gemm(act0, prep0))
    r[f"{key}_linear_ms"] = time_ms(lambda: gemm(quant(prep.lora_down), prep))
    r[f"{key}_tops"] = 2 * m * prep.n * k / r[f"{key}_ms"] / 1e9
    r[f"{key}_vs_bf16"] = r["bf16_ms"] / r[f"{key}_ms"]
    r[f"{key}_nolora_vs_bf16"] = r["bf16_ms"] / r[f"{key}_nolora_ms"]
    r[f"{key}_vs_fp8"] = r["fp8_ms"] / r[f"{key}_ms"]
    r[f"{key}_lowrank_overhead"] = r[f"{key}_ms"] / r[f"{key}_nolora_ms"] - 1
    r[f"{key}_linear_vs_bf16"] = r["bf16_ms"] / r[f"{key}_linear_ms"]


SM90_KERNELS = ("wgmma", "fold", "s8")


def bench_wgmma(r, x, k, n, kernels=SM90_KERNELS):
    """The sm_90 wgmma kernel on random codes: plain weight scales (wgmma_*), then the same codes with
    power-of-two weight scales through the folded kernel (fold_*, nl_w4a4_gemm_fp8_pow2), and with power-of-two
    weight and activation scales through the integer kernel (s8_*, nl_w4a4_gemm_s8)."""
    m = x.shape[0]
    g = torch.Generator(device="cuda").manual_seed(1)
    codes = torch.randint(-8, 8, (n, k), generator=g, device="cuda", dtype=torch.int8)
    wscales = (torch.rand(n, k // 64, generator=g, device="cuda") * 0.02 + 1e-3).to(torch.bfloat16)
    e = torch.randint(0, 3, wscales.shape, generator=g, device="cuda")
    e[:, 0] = 0
    pow2_scales = (wscales[:, :1].float() * torch.exp2(-e.float())).to(torch.bfloat16)
    lora_down = (torch.randn(RANK, k, generator=g, device="cuda") / k ** 0.5).to(torch.bfloat16)
    lora_up = (torch.randn(n, RANK, generator=g, device="cuda") * 0.1).to(torch.bfloat16)
    bias = torch.randn(n, generator=g, device="cuda").to(torch.bfloat16)
    smooth = torch.rand(k, generator=g, device="cuda") + 0.5
    qw = ops.pack_int4(codes)
    out = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
    for key, ws, fold, act_pow2 in (("wgmma", wscales, False, False), ("fold", pow2_scales, True, False),
                                    ("s8", pow2_scales, None, True)):
        if key not in kernels:
            continue
        prep = native.prepare_w4a4(qw, ws, lora_down, lora_up, bias, smooth, path="wgmma", act_pow2=act_pow2)
        prep0 = native.prepare_w4a4(qw, ws, None, None, bias, smooth, path="wgmma", act_pow2=act_pow2)
        _time_wgmma(r, key, x, prep, prep0, out, fold)


def bench_shape(m, k, n, path, exact=False, legacy=True, wgmma=False, sm90_kernels=SM90_KERNELS):
    torch.manual_seed(m + k + n)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    out = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
    r = dict(M=m, K=k, N=n, path=path, rank=RANK)
    _baselines(r, x, m, k, n, out)
    if wgmma:
        bench_wgmma(r, x, k, n, sm90_kernels)
    if not legacy:
        return r
    prep, prep0, lora_down, lora_up = make_layer(k, n, path=path)
    act = native.quantize_act(x, prep.smooth, prep.lora_down, inv_smooth=prep.inv_smooth)
    act0 = native.quantize_act(x, prep.smooth, inv_smooth=prep.inv_smooth)

    def fused():
        a = native.quantize_act(x, prep.smooth, prep.lora_down, inv_smooth=prep.inv_smooth)
        native.w4a4_gemm(a, prep, out=out, path=path, exact=exact)

    def nolora():
        a = native.quantize_act(x, prep0.smooth, inv_smooth=prep0.inv_smooth)
        native.w4a4_gemm(a, prep0, out=out, path=path, exact=exact)

    def unfused():  # separate quantize, GEMM, low-rank down and up (torch), add
        a = native.quantize_act(x, prep0.smooth, inv_smooth=prep0.inv_smooth)
        y = native.w4a4_gemm(a, prep0, out=out, path=path, exact=exact)
        y.addmm_(torch.mm(x, lora_down.t()), lora_up.t())

    r["fused_ms"] = time_ms(fused)
    r["fused_gemm_ms"] = time_ms(lambda: native.w4a4_gemm(act, prep, out=out, path=path, exact=exact))
    r["nolora_ms"] = time_ms(nolora)
    r["nolora_gemm_ms"] = time_ms(lambda: native.w4a4_gemm(act0, prep0, out=out, path=path, exact=exact))
    r["unfused_ms"] = time_ms(unfused)
    r["quantize_ms"] = time_ms(lambda: native.quantize_act(x, prep.smooth, prep.lora_down,
                                                           inv_smooth=prep.inv_smooth))
    flops = 2 * m * n * k
    r["fused_tops"] = flops / r["fused_ms"] / 1e9
    r["fused_gemm_tops"] = flops / r["fused_gemm_ms"] / 1e9
    r["bf16_tflops"] = flops / r["bf16_ms"] / 1e9
    r["speedup_vs_bf16"] = r["bf16_ms"] / r["fused_ms"]
    r["gemm_speedup_vs_bf16"] = r["bf16_ms"] / r["fused_gemm_ms"]
    r["speedup_vs_fp8"] = r["fp8_ms"] / r["fused_ms"]
    r["lowrank_overhead"] = r["fused_ms"] / r["nolora_ms"] - 1
    r["unfused_over_fused"] = r["unfused_ms"] / r["fused_ms"]
    q_bytes = m * k * 2 + m * k // 2 + (k // 64) * native.padded_rows(m) * 4 + m * RANK * 4 + RANK * k * 2
    r["quantize_gbps"] = q_bytes / r["quantize_ms"] / 1e6
    return r


QUANT_SHAPES = [(4608, 3072), (1536, 3072), (512, 3072), (4608, 12288), (1536, 12288), (512, 12288),
                (4608, 15360)]  # (M, K)


def quantize_bytes(m, k, rank, layout):
    """HBM bytes of one quantize call: x read + codes, scales and lora_act written (s8_tiles, the two-pass
    power-of-two quantization: counted as one pass, what a single-pass kernel would move)."""
    g = k // 64
    rows = native.padded_rows(m) if layout == "packed" else native.fp8_tile_rows(m)
    codes = m * k // 2 if layout == "packed" else rows * k
    scales = rows * 4 if layout == "s8_tiles" else g * rows * 4
    return m * k * 2 + codes + scales + m * rank * 4


def quantize_table(copy_gbps, tilings=("32",), rank=RANK):
    """The quantize + low-rank-down kernel, plain and LayerNorm-fused, packed and fp8_tiles, and the power-of-two
    quantization into s8_tiles (the statistics kernel nl_act_stats, then the quantize kernel; the statistics
    kernel alone is its own row, bytes = the read of x): GB/s and % of copy. The LayerNorm-fused rows include
    the statistics kernel (the rows' mean and rstd), also timed alone."""
    rows = []
    for m, k in QUANT_SHAPES:
        g = torch.Generator(device="cuda").manual_seed(m + k)
        x = torch.randn(m, k, generator=g, device="cuda").to(torch.bfloat16)
        smooth = torch.rand(k, generator=g, device="cuda") + 0.5
        inv = ops.smooth_reciprocal(smooth)  # what a prepared layer keeps (not timed)
        down = (torch.randn(rank, k, generator=g, device="cuda") / k ** 0.5).to(torch.bfloat16)
        shift, scale = [(torch.randn(2, k, generator=g, device="cuda") * 0.3).to(torch.bfloat16) for _ in range(2)]
        for tiling in tilings:
            os.environ["NUNCHAKU_LITE_QUANT_BM"] = tiling
            for layout in ("packed", "fp8_tiles", "s8_tiles"):
                pow2 = layout == "s8_tiles"
                for fused in (False, True):
                    if fused:
                        fn = lambda: native.layernorm_quantize_act(x, shift, scale, -(-m // 2), smooth, down,
                                                                   layout=layout, pow2=pow2, inv_smooth=inv)
                    else:
                        fn = lambda: native.quantize_act(x, smooth, down, layout=layout, pow2=pow2, inv_smooth=inv)
                    ms = time_ms(fn, reps=20, replays=25)
                    gbps = quantize_bytes(m, k, rank, layout) / ms / 1e6
                    rows.append(dict(M=m, K=k, rank=rank, tiling=int(tiling), layout=layout,
                                     kernel="layernorm+quantize" if fused else "quantize", us=ms * 1e3,
                                     gbps=gbps, pct_of_copy=100 * gbps / copy_gbps))
                    if pow2 or fused:  # the statistics kernel alone (part of the row above)
                        mod = (shift, scale, -(-m // 2), 1e-6) if fused else None
                        ms = time_ms(lambda: native._act_stats(x, m, k, inv, 0.0, False, pow2, mod), reps=20,
                                     replays=25)
                        gbps = (m * k * 2 + m * 4) / ms / 1e6
                        name = ("LN stats+token" if pow2 else "LN stats") if fused else "token scale"
                        rows.append(dict(M=m, K=k, rank=rank, tiling=int(tiling), layout=layout, kernel=name,
                                         us=ms * 1e3, gbps=gbps, pct_of_copy=100 * gbps / copy_gbps))
    os.environ.pop("NUNCHAKU_LITE_QUANT_BM", None)
    hdr = f"{'M':>5} {'K':>6} {'BM':>3} {'layout':>9} {'kernel':>18} | {'us':>7} {'GB/s':>6} {'%copy':>5}"
    print(f"\nquantize + low-rank down (rank {rank}, smooth; LN-fused: 2 batches), copy {copy_gbps:.0f} GB/s")
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        print(f"{r['M']:>5} {r['K']:>6} {r['tiling']:>3} {r['layout']:>9} {r['kernel']:>18} | {r['us']:7.1f} "
              f"{r['gbps']:6.0f} {r['pct_of_copy']:5.0f}")
    return rows


def _write_table_json(args, suffix, dev, copy_gbps, rows):
    """The rows of a single-table mode (--quantize, --w4a16) into args.json with `suffix` before .json."""
    path = args.json.replace(".json", f"_{suffix}.json") if args.json.endswith(".json") else args.json
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(dict(device=dev, torch=torch.__version__, copy_gbps=copy_gbps, rows=rows), f, indent=1)
    print(f"wrote {path}")
    return 0


MODULATION_SHAPES = [(3072, 18432), (3072, 9216)]  # (K, N): double-block (x2 per block) and single-block


def w4a16_main(args, dev):
    """--w4a16: the W4A16 GEMV at the modulation shapes, batch 1 and 4 (and JSON)."""
    copy_gbps = copy_bandwidth()
    print(f"device: {dev}  torch {torch.__version__}\ndevice copy: {copy_gbps:.0f} GB/s (read + write)")
    hdr = f"{'M':>3} {'K':>5} {'N':>6} | {'us':>7} {'GB/s':>6} {'%copy':>5}"
    print(f"\nW4A16 GEMV (nl_w4a16_gemm, signed codes, bf16)\n{hdr}\n" + "-" * len(hdr))
    rows = []
    g = torch.Generator(device="cuda").manual_seed(0)
    for k, n in MODULATION_SHAPES:
        codes = torch.randint(-8, 8, (n, k), generator=g, device="cuda", dtype=torch.int8)
        wscales = (torch.rand(n, k // 64, generator=g, device="cuda") * 0.02).to(torch.bfloat16)
        prep = native.prepare_w4a16(ops.pack_int4(codes), wscales, torch.zeros(n, device="cuda"))
        for m in (1, 4):
            x = torch.randn(m, k, generator=g, device="cuda").to(torch.bfloat16)
            ms = time_ms(lambda: native.w4a16_gemm(x, prep), reps=20, replays=25)
            gbps = (n * k // 2 + n * (k // 64) * 4) / ms / 1e6
            rows.append(dict(M=m, K=k, N=n, us=ms * 1e3, gbps=gbps, pct_of_copy=100 * gbps / copy_gbps))
            print(f"{m:>3} {k:>5} {n:>6} | {ms * 1e3:7.1f} {gbps:6.0f} {100 * gbps / copy_gbps:5.0f}")
    return _write_table_json(args, "w4a16", dev, copy_gbps, rows)


def quantize_main(args, dev):
    """--quantize: only the quantize table (and JSON)."""
    copy_gbps = copy_bandwidth()
    print(f"device: {dev}  torch {torch.__version__}\ndevice copy: {copy_gbps:.0f} GB/s (read + write)")
    rows = quantize_table(copy_gbps, tuple(args.quant_bm.split(",")))
    return _write_table_json(args, "quantize", dev, copy_gbps, rows)


def _print_wgmma_table(rows, key, title):
    """The `key`_* columns of _time_wgmma, one row per shape."""
    name, name0 = ("wgmma", "wg0") if key == "wgmma" else (key, key + "0")
    wh = (f"{'M':>5} {'K':>5} {'N':>5} | {name:>7} {name0:>7} {'linear':>7} {'bf16':>7} {'fp8':>7} | "
          f"{'TOPS':>5} {'xbf16':>5} {'x0bf16':>6} {'xfp8':>5} {'LRov%':>6} {'lin/bf16':>8}")
    print(f"\n{title}\n{wh}\n" + "-" * len(wh))
    for r in rows:
        g = lambda s: r[f"{key}_{s}"]
        print(f"{r['M']:>5} {r['K']:>5} {r['N']:>5} | {g('ms'):7.3f} {g('nolora_ms'):7.3f} {g('linear_ms'):7.3f} "
              f"{r['bf16_ms']:7.3f} {r['fp8_ms']:7.3f} | {g('tops'):5.0f} {g('vs_bf16'):5.2f} "
              f"{g('nolora_vs_bf16'):6.2f} {g('vs_fp8'):5.2f} {100 * g('lowrank_overhead'):6.1f} "
              f"{g('linear_vs_bf16'):8.2f}")


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m nunchaku_lite.bench kernels", description=__doc__.split("\n")[0])
    ap.add_argument("--json", default=os.path.join(os.environ.get("OUT", "."), "bench_kernels.json"))
    ap.add_argument("--quick", action="store_true", help="M=4608 and two shapes only")
    ap.add_argument("--path", choices=["auto", "s4", "s8"], default="auto",
                    help="path of the legacy mma.sync columns (auto: s8 on sm_90, s4 otherwise)")
    ap.add_argument("--no-legacy", action="store_true", help="only the baselines and the sm_90 wgmma columns")
    ap.add_argument("--exact", action="store_true", help="time the bit-exact accumulation mode")
    ap.add_argument("--block-m", choices=["64", "128"], help="GEMM block rows (sets NUNCHAKU_LITE_GEMM_BM)")
    ap.add_argument("--quantize", action="store_true", help="only the quantize-kernel table (both layouts, "
                    "plain and LayerNorm-fused)")
    ap.add_argument("--w4a16", action="store_true", help="only the W4A16 GEMV table (modulation shapes)")
    ap.add_argument("--quant-bm", default="16", help="quantize CTA token tilings to time, e.g. 16,32")
    ap.add_argument("--sm90", default=",".join(SM90_KERNELS), help="sm_90 kernels to time, a subset of "
                    f"{','.join(SM90_KERNELS)} (default all)")
    args = ap.parse_args(argv)
    if args.block_m:
        os.environ["NUNCHAKU_LITE_GEMM_BM"] = args.block_m
    if not native.available():
        print(f"native kernels unavailable: {native.library_error() or 'no suitable CUDA device'}", file=sys.stderr)
        return 1
    dev = torch.cuda.get_device_name()
    if args.quantize:
        return quantize_main(args, dev)
    if args.w4a16:
        return w4a16_main(args, dev)
    wgmma = torch.cuda.get_device_capability() == (9, 0) and native.has_wgmma()
    path = native.default_path() if args.path == "auto" else args.path
    if path == "wgmma":
        path = "s8"
    legacy = not args.no_legacy
    sm90 = tuple(k for k in args.sm90.split(",") if k)
    if not set(sm90) <= set(SM90_KERNELS):
        ap.error(f"--sm90: unknown kernels {sorted(set(sm90) - set(SM90_KERNELS))}")
    block_m = os.environ.get("NUNCHAKU_LITE_GEMM_BM", "128")
    print(f"device: {dev}  torch {torch.__version__}  path {path}  GEMM block rows {block_m}"
          f"{'  exact' if args.exact else ''}")
    copy_gbps = copy_bandwidth()
    print(f"device copy: {copy_gbps:.0f} GB/s (read + write)")
    rows = []
    tokens = [4608] if args.quick else TOKENS
    shapes = SHAPES[:1] + SHAPES[3:4] if args.quick else SHAPES
    for m in tokens:
        for k, n in shapes:
            r = bench_shape(m, k, n, path, args.exact, legacy, wgmma, sm90)
            if legacy:
                r["quantize_pct_of_copy"] = 100 * r["quantize_gbps"] / copy_gbps
                print(f"  M={m} K={k} N={n}: fused {r['fused_ms']:.3f} ms ({r['speedup_vs_bf16']:.2f}x bf16)",
                      flush=True)
            if wgmma:
                print(f"  M={m} K={k} N={n}: " + "; ".join(
                    f"{key} {r[key + '_ms']:.3f} ms ({r[key + '_vs_bf16']:.2f}x bf16, {r[key + '_vs_fp8']:.2f}x fp8, "
                    f"low-rank +{100 * r[key + '_lowrank_overhead']:.1f}%)" for key in sm90), flush=True)
            rows.append(r)
    hdr = (f"{'M':>5} {'K':>5} {'N':>5} | {'fused':>7} {'gemm':>7} {'nolora':>7} {'unfused':>7} {'quant':>6} "
           f"{'bf16':>7} {'fp8':>7} | {'TOPS':>5} {'xbf16':>5} {'gemm':>5} {'xfp8':>5} {'LRov%':>6} {'q%cp':>5}")
    titles = dict(
        wgmma="sm_90 wgmma GEMM, ms per call (wgmma: GEMM + low-rank rank 32; wg0: GEMM without low-rank; linear: "
              "quantize kernel + GEMM + low-rank)",
        fold="sm_90 folded GEMM (power-of-two weight group scales, nl_w4a4_gemm_fp8_pow2), same codes; columns as "
             "in the wgmma table",
        s8="sm_90 integer GEMM (power-of-two weight and activation scales, nl_w4a4_gemm_s8; linear includes the "
           "statistics and quantize kernels), same codes; columns as in the wgmma table")
    for key in sm90 if wgmma else ():
        _print_wgmma_table(rows, key, titles[key])
    print("\nms per call (fused/nolora/unfused include the quantize kernel; gemm = GEMM kernel alone)")
    print(hdr)
    print("-" * len(hdr))
    for r in rows if legacy else []:
        print(f"{r['M']:>5} {r['K']:>5} {r['N']:>5} | {r['fused_ms']:7.3f} {r['fused_gemm_ms']:7.3f} "
              f"{r['nolora_ms']:7.3f} {r['unfused_ms']:7.3f} {r['quantize_ms']:6.3f} {r['bf16_ms']:7.3f} "
              f"{r['fp8_ms']:7.3f} | {r['fused_tops']:5.0f} {r['speedup_vs_bf16']:5.2f} "
              f"{r['gemm_speedup_vs_bf16']:5.2f} {r['speedup_vs_fp8']:5.2f} {100 * r['lowrank_overhead']:6.1f} "
              f"{r['quantize_pct_of_copy']:5.0f}")
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(dict(device=dev, torch=torch.__version__, path=path, block_m=int(block_m), exact=args.exact,
                       wgmma_bt=int(os.environ.get("NUNCHAKU_LITE_WGMMA_BT", "128")),
                       s8_bt=int(os.environ.get("NUNCHAKU_LITE_S8_BT", "256")), sm90_kernels=list(sm90),
                       copy_gbps=copy_gbps,
                       rows=rows), f, indent=1)
    print(f"wrote {args.json}")
    return 0


def smoke(argv=None):
    """Every kernel once on small, odd shapes (tile tails), both paths: for compute-sanitizer runs."""
    if not native.available():
        print(f"native kernels unavailable: {native.library_error()}", file=sys.stderr)
        return 1
    torch.manual_seed(0)
    for m, k, n, rank in [(1, 64, 128, 16), (37, 192, 256, 32), (130, 256, 384, 48), (300, 3072, 128, 128)]:
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        codes = torch.randint(-8, 8, (n, k), device="cuda", dtype=torch.int8)
        wscales = torch.rand(n, k // 64, device="cuda").to(torch.bfloat16)
        down = torch.randn(rank, k, device="cuda", dtype=torch.bfloat16)
        up = torch.randn(n, rank, device="cuda", dtype=torch.bfloat16)
        bias = torch.randn(n, device="cuda", dtype=torch.bfloat16)
        for unsigned in (False, True):
            prep = native.prepare_w4a4(ops.pack_int4(codes), wscales, down, up, bias, torch.rand(k, device="cuda") + 1,
                                       unsigned, 0.171875 if unsigned else 0.0)
            paths = ("s4", "s8") + (("wgmma",) if torch.cuda.get_device_capability() == (9, 0) and native.has_wgmma() else ())
            for path in paths:
                for exact in (False, True) if path != "wgmma" else (False,):
                    native.w4a4_linear_prepared(x, prep, path=path, exact=exact)
                native.w4a4_linear_prepared(x, prep, epilogue="gelu_tanh", path=path)
            # power-of-two weight and activation scales: the pow2 quantize pass and, on sm_90, the integer GEMM
            e = torch.randint(0, 5, wscales.shape, device="cuda")
            e[:, 0] = 0
            p2 = native.prepare_w4a4(ops.pack_int4(codes), (wscales[:, :1].float() * torch.exp2(-e.float())).to(
                torch.bfloat16), down, up, bias, None, unsigned, 0.171875 if unsigned else 0.0, act_pow2=True)
            for path in paths:
                native.w4a4_linear_prepared(x, p2, epilogue="gelu_tanh", path=path)
        for zeros in (None, wscales):
            p16 = native.prepare_w4a16(ops.pack_int4(codes), wscales, bias, zeros)
            native.w4a16_gemm(x[: min(m, 5)].contiguous(), p16)
    torch.cuda.synchronize()
    print("smoke ok")
    return 0


def quantize_smoke(argv=None):
    """The quantize kernels once per layout/tiling on odd shapes (tile tails): for compute-sanitizer runs."""
    if not native.available():
        print(f"native kernels unavailable: {native.library_error()}", file=sys.stderr)
        return 1
    torch.manual_seed(0)
    for m, k, rank in [(1, 64, 16), (37, 192, 32), (300, 1088, 0), (130, 256, 128), (513, 320, 64)]:
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        down = torch.randn(rank, k, device="cuda", dtype=torch.bfloat16) if rank else None
        smooth = torch.rand(k, device="cuda") + 0.5
        sh, sc = torch.randn(2, 2, k, device="cuda", dtype=torch.bfloat16)
        for tiling in ("16", "32"):
            os.environ["NUNCHAKU_LITE_QUANT_BM"] = tiling
            for layout in ("packed", "fp8_tiles"):
                native.quantize_act(x, smooth, down, True, 0.171875, layout=layout)
                tpb = -(-m // 2)
                b = -(-m // tpb)  # 1 batch when m == 1
                native.layernorm_quantize_act(x, sh[:b], sc[:b], tpb, smooth, down, layout=layout, return_y=True)
            for layout in ("packed", "fp8_tiles", "s8_tiles"):
                native.quantize_act(x, smooth, down, True, 0.171875, layout=layout, pow2=True)
                native.layernorm_quantize_act(x, sh[:1], sc[:1], m, smooth, down, layout=layout, pow2=True)
    os.environ.pop("NUNCHAKU_LITE_QUANT_BM", None)
    torch.cuda.synchronize()
    print("quantize smoke ok")
    return 0
