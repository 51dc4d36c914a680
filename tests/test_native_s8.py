"""Power-of-two activation scales and the sm_90 integer GEMM (native/gemm_w4a4_s8_sm90.cu; the power-of-two
quantization in native/quantize.cu: stats_kernel (nl_act_stats), then quantize_kernel with the token
scales).

CPU: the format (ops.quantize_act(pow2=True), ops.pack_act_s8_tiles), the int8 tables of the kernel's nibble
recipe (PTX prmt emulation), the layer flag. GPU: the pow2 quantization bit for bit against the
reference, the integer GEMM against ops.w4a4_linear_f64 on the same codes (relative error < 1e-3), the layer's
native path end to end.
"""
import pytest
import torch

from nunchaku_lite.quant import ops
from nunchaku_lite.quant.modules import W4A4Linear, module_from_config
from conftest import random_w4a4_layer as _layer, rel_err as _rel
from test_native_sm90 import _prmt, _word, sm90  # noqa: F401 (sm90: the sm_90 fixture)

native = pytest.importorskip("nunchaku_lite.native")
DEV = "cuda"

# ---- CPU: the format ------------------------------------------------------------------------------------


def _acts(m, k, gen, unsigned=False):
    x = torch.randn(m, k, generator=gen) * torch.rand(1, k, generator=gen) * 3
    x[:, torch.randint(0, k, (max(1, k // 64),), generator=gen)] *= 30.0  # outlier channels
    x[0, :64] = 0  # an all-zero group
    if unsigned:
        x = torch.nn.functional.gelu(x, approximate="tanh")
    return x.to(torch.bfloat16)


@pytest.mark.parametrize("unsigned", [False, True])
def test_pow2_act_scales_cover_and_are_tightest(unsigned):
    gen = torch.Generator().manual_seed(1)
    x = _acts(64, 1024, gen, unsigned)
    smooth = torch.rand(1024, generator=gen) + 0.5
    shift = ops.UNSIGNED_SHIFT if unsigned else 0.0
    _, plain = ops.quantize_act(x, smooth, unsigned, shift)
    codes, s = ops.quantize_act(x, smooth, unsigned, shift, pow2=True)
    top = plain.amax(dim=1, keepdim=True)
    e = torch.round(torch.log2(top / s))
    assert torch.equal(s, top * torch.exp2(-e)) and e.min() >= 0 and e.max() <= ops.POW2_MAX_EXP
    assert (s >= plain).all()  # nothing clips
    tighter = top * torch.exp2(-(e + 1))  # the next exponent would not cover the plain scale
    assert ((e == ops.POW2_MAX_EXP) | (tighter < plain)).all()
    lo, hi = (0, 15) if unsigned else (-8, 7)
    assert codes.min() >= lo and codes.max() <= hi
    # the codes are those of the reference formula with these scales
    xs = ((x.float() + shift) * ops.smooth_reciprocal(smooth)).view(64, -1, 64)
    inv = torch.where(s > 0, 1 / s, torch.zeros_like(s))
    assert torch.equal(codes.view(64, -1, 64).float(), torch.round(xs * inv[..., None]).clamp(lo, hi))


@pytest.mark.parametrize("unsigned", [False, True])
def test_s8_tiles_are_exact(unsigned):
    gen = torch.Generator().manual_seed(2)
    m, k = 300, 512
    codes, s = ops.quantize_act(_acts(m, k, gen, unsigned), None, unsigned,
                                ops.UNSIGNED_SHIFT if unsigned else 0.0, pow2=True)
    b8, t = ops.pack_act_s8_tiles(codes, s)
    mp = 512
    assert b8.shape == (k // 64, mp, 64) and t.shape == (mp,)
    # undo the tile order and the 16-token permutation
    vals = b8.view(k // 64, mp // 8, 4, 8, 16).permute(1, 3, 0, 2, 4).reshape(mp, k)
    vals = vals.to(torch.int16) if unsigned else vals.view(torch.int8).to(torch.int16)
    tok = t.view(mp // 16, 4, 2, 2).permute(0, 2, 1, 3).reshape(mp)
    deq = vals[:m].float() * tok[:m, None]
    assert torch.equal(deq, (codes.float().view(m, -1, 64) * s[..., None]).view(m, k))
    assert vals[m:].eq(0).all() and tok[m:].eq(0).all()
    with pytest.raises(ValueError, match="power-of-two"):
        ops.pack_act_s8_tiles(*ops.quantize_act(_acts(m, k, gen), None))


def _int8_table(e: int) -> tuple[int, int, int, int]:
    """The kernel's table for exponent e: {POS_LO, POS_HI, NEG_LO, NEG_HI} of int8(code << (4 - e))."""
    b = lambda c: (c * (1 << (4 - e))) & 0xFF
    return (_word(b(i) for i in range(4)), _word(b(i) for i in range(4, 8)),
            _word(b(i) for i in range(-8, -4)), _word(b(i) for i in range(-4, 0)))


def test_nibble_lookup_decodes_shifted_int8_codes():
    """nib8_lookup with the int8 tables turns 8 two's-complement nibbles (row halves with exponents e0, e1)
    into the bytes code << (4 - e)."""
    gen = torch.Generator().manual_seed(3)
    for _ in range(200):
        x = int(torch.randint(0, 2 ** 32, (1,), generator=gen, dtype=torch.int64))
        e0, e1 = (int(v) for v in torch.randint(0, ops.POW2_MAX_EXP + 1, (2,), generator=gen))
        t0, t1 = _int8_table(e0), _int8_table(e1)
        t, x4 = x & 0x77777777, (x << 4) & 0xFFFFFFFF
        sel = lambda p, q, msk: ((p & ~msk) | (q & msk)) & 0xFFFFFFFF
        lo = sel(_prmt(t0[0], t0[1], t), _prmt(t0[2], t0[3], t), _prmt(x, x4, 0x9D8C))
        hi = sel(_prmt(t1[0], t1[1], t >> 16), _prmt(t1[2], t1[3], t >> 16), _prmt(x, x4, 0xBFAE))
        nib = [(x >> (4 * i)) & 0xF for i in range(8)]
        code = [v - 16 if v >= 8 else v for v in nib]
        # lo: codes 0-3 (the low-half row), hi: codes 4-7 (the high-half row), as nib8_to_e4m3
        want_lo = _word((c * (1 << (4 - e0))) & 0xFF for c in code[:4])
        want_hi = _word((c * (1 << (4 - e1))) & 0xFF for c in code[4:])
        assert (lo, hi) == (want_lo, want_hi)


def test_layer_flag_round_trips_and_changes_the_reference():
    gen = torch.Generator().manual_seed(4)
    lin = torch.nn.Linear(256, 128)
    layer = W4A4Linear.from_linear(lin, lin.weight.detach(), pow2=True, act_pow2=True)
    assert layer.act_pow2 and layer.config()["act_pow2"] is True and "act_pow2=True" in repr(layer)
    again = module_from_config(layer.config(), torch.float32)
    assert again.act_pow2
    plain = W4A4Linear.from_linear(lin, lin.weight.detach(), pow2=True)
    assert "act_pow2" not in plain.config()  # files without the flag load as before
    x = _acts(8, 256, gen).float()
    ref = ops.w4a4_linear(x, layer.qweight, layer.wscales, bias=layer.bias.float(), smooth=layer.smooth,
                          act_pow2=True)
    assert torch.equal(layer(x), ref)
    assert not torch.equal(plain(x), ref)


def test_native_reference_layouts_and_errors():
    """The reference of native.quantize_act (what it runs on CPU tensors): s8_tiles equals
    ops.pack_act_s8_tiles; with the library, the layout needs pow2."""
    gen = torch.Generator().manual_seed(5)
    x = _acts(40, 256, gen)
    act = native.quantize_act_reference(x, layout="s8_tiles", pow2=True)
    b8, t = ops.pack_act_s8_tiles(*ops.quantize_act(x, pow2=True))
    assert torch.equal(act.codes, b8) and torch.equal(act.scales, t) and act.layout == "s8_tiles"
    if native.library_error() is not None:
        pytest.skip(f"native library not loadable: {native.library_error()}")
    assert torch.equal(native.quantize_act(x, layout="s8_tiles", pow2=True).codes, b8)
    with pytest.raises(ValueError, match="pow2=True"):
        native.quantize_act(x, layout="s8_tiles")


def test_entry_points_reject_bad_arguments():
    """The new C entries check their arguments on the host, before any CUDA call (so this runs without a GPU)."""
    if native.library_error() is not None:
        pytest.skip(f"native library not loadable: {native.library_error()}")
    _, ffi = native._lib()
    null = ffi.NULL
    gemm = lambda m, n, k, mp, rank=0, ws=null, epilogue=0, out_dtype=1, tok=null, inv=null: native._call(
        "nl_w4a4_gemm_s8", null, null, mp, 0, null, null, null, null, null, 1, rank, null, null, out_dtype, n, m, n,
        k, epilogue, ws, 1 << 20, inv, 0.0, 0, tok, null)
    with pytest.raises(ValueError, match="nl_w4a4_gemm_s8: K=65600 must be a positive multiple of 64, at most 65536"):
        gemm(10, 128, 65600, 256)
    with pytest.raises(ValueError, match="nl_w4a4_gemm_s8: N=100"):
        gemm(10, 100, 64, 256)
    with pytest.raises(ValueError, match="nl_w4a4_gemm_s8: activation rows mp=128"):
        gemm(10, 128, 64, 128)
    with pytest.raises(ValueError, match="nl_w4a4_gemm_s8: lora_act must be non-null"):
        gemm(10, 128, 64, 256, rank=16)
    with pytest.raises(ValueError, match="nl_w4a4_gemm_s8: act_bytes8 must be non-null"):
        gemm(10, 128, 64, 256)
    a, odd = ffi.cast("void *", 1 << 20), ffi.cast("int *", (1 << 20) + 4)  # never dereferenced
    with pytest.raises(ValueError, match="nl_w4a4_gemm_s8: workspace must be 16-byte aligned"):
        native._call("nl_w4a4_gemm_s8", a, a, 256, 0, a, a, a, null, null, 1, 0, null, a, 1, 128, 10, 128, 64, 0,
                     odd, 1 << 20, null, 0.0, 0, null, null)
    tok = ffi.cast("float *", 1 << 20)
    gemm_a = lambda epilogue=0, out_dtype=1, inv=null: native._call(
        "nl_w4a4_gemm_s8", a, a, 256, 0, a, a, a, null, null, 1, 0, null, a, out_dtype, 128, 10, 128, 64, epilogue,
        null, 0, inv, 0.0, 0, tok, null)
    with pytest.raises(ValueError, match="nl_w4a4_gemm_s8: next_token_scale needs 16-bit outputs"):
        gemm_a(out_dtype=0)
    with pytest.raises(ValueError, match="nl_w4a4_gemm_s8: next_token_scale needs 16-bit outputs"):
        gemm_a(epilogue=2)
    with pytest.raises(ValueError, match="nl_w4a4_gemm_s8: next_inv_smooth must be 16-byte aligned"):
        gemm_a(inv=ffi.cast("float *", (1 << 20) + 4))
    with pytest.raises(ValueError, match="nl_w4a4_gemm_s8: epilogue code 3"):
        gemm(10, 128, 64, 256, epilogue=3)
    x = ffi.cast("void *", 1 << 20)  # never dereferenced: the checks fail first
    quant = lambda layout, tok=null: native._call(
        "nl_quantize_act", x, 1, 10, 64, 64, null, 0.0, 0, null, 0, layout, x, x, 256, null, tok, null)
    with pytest.raises(ValueError, match="nl_quantize_act: layout=3 is not"):
        quant(3)
    with pytest.raises(ValueError, match="nl_quantize_act: NL_ACT_S8_TILES holds power-of-two scales only"):
        quant(2)
    ln = lambda stats: native._call(
        "nl_layernorm_quantize_act", x, 1, 10, 64, 64, x, x, 10, 1e-6, null, 0.0, 0, null, 0, 2, x, x, 256, null,
        null, x, stats, null)
    with pytest.raises(ValueError, match="nl_layernorm_quantize_act: row_stats must be a non-null"):
        ln(null)
    stats = lambda msh, tok, st, k=64: native._call(
        "nl_act_stats", x, 1, 10, k, k, msh, msh, 10, 1e-6, null, 0.0, 0, tok, st, null)
    with pytest.raises(ValueError, match="nl_act_stats: row_stats must be a non-null 8-byte aligned pointer with"):
        stats(x, x, null)
    with pytest.raises(ValueError, match="nl_act_stats: token_scale must be non-null without LayerNorm"):
        stats(null, null, null)
    with pytest.raises(ValueError, match="nl_act_stats: row_stats without LayerNorm"):
        stats(null, x, x)
    with pytest.raises(ValueError, match="nl_act_stats: K=100 must be a positive multiple of 64"):
        stats(null, x, null, 100)


# ---- GPU ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cuda_lib():
    if not torch.cuda.is_available() or not native.available():
        pytest.skip(f"native kernels unavailable: {native.library_error() or 'no CUDA device'}")


@pytest.mark.gpu
@pytest.mark.parametrize("m,k", [(1, 3072), (100, 3072), (300, 3072), (1536, 3072), (3000, 3072), (4608, 3072),
                                 (300, 15360)])
@pytest.mark.parametrize("unsigned", [False, True])
@pytest.mark.parametrize("layout", ["packed", "fp8_tiles", "s8_tiles"])
def test_pow2_quantize_kernel_is_bit_exact(cuda_lib, m, k, unsigned, layout):
    """Bytes against the reference; the M values give the statistics kernel 8, 4, 2 and 1 warps per row (on
    132 SMs) and the quantize kernel two CTAs per tile (small M) or the persistent split (M = 4608)."""
    gen = torch.Generator().manual_seed(m + k)
    rank = 32
    x = _acts(m, k, gen, unsigned)
    if m > 2:
        x[2] = 0  # an all-zero token: scale 0, codes 0
    x = x.to(DEV)
    smooth = (torch.rand(k, generator=gen) + 0.5).to(DEV)
    down = (torch.randn(rank, k, generator=gen) / k ** 0.5).to(torch.bfloat16).to(DEV)
    shift = ops.UNSIGNED_SHIFT if unsigned else 0.0
    got = native.quantize_act(x, smooth, down, unsigned, shift, layout=layout, pow2=True)
    want = native.quantize_act_reference(x, smooth, down, unsigned, shift, layout, pow2=True)
    assert torch.equal(got.codes, want.codes) and torch.equal(got.scales, want.scales)
    assert _rel(got.lora_act, want.lora_act) < 1e-5


@pytest.mark.gpu
@pytest.mark.parametrize("env", [{}, {"NUNCHAKU_LITE_QUANT_SPLIT": "3"}, {"NUNCHAKU_LITE_QUANT_SPLIT": "0"}])
def test_pow2_quantize_kernel_modes(cuda_lib, env, monkeypatch):
    """Tiles shared by two CTAs (3 CTAs for 19 tiles; by default at this M, 38 CTAs: two per tile) and one CTA
    per tile give the same bytes; the statistics kernel runs 8 warps per row here."""
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    gen = torch.Generator().manual_seed(8)
    x = _acts(300, 1024, gen).to(DEV)
    smooth = (torch.rand(1024, generator=gen) + 0.5).to(DEV)
    down = (torch.randn(16, 1024, generator=gen) / 32).to(torch.bfloat16).to(DEV)
    got = native.quantize_act(x, smooth, down, layout="s8_tiles", pow2=True)
    want = native.quantize_act_reference(x, smooth, down, layout="s8_tiles", pow2=True)
    assert torch.equal(got.codes, want.codes) and torch.equal(got.scales, want.scales)
    assert _rel(got.lora_act, want.lora_act) < 1e-5


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["packed", "fp8_tiles", "s8_tiles"])
@pytest.mark.parametrize("unsigned", [False, True])
def test_pow2_layernorm_quantize(cuda_lib, layout, unsigned):
    """The LayerNorm kernel with the statistics kernel's row statistics and token scales: its y (return_y)
    quantizes, by the reference, to the same bytes; and without return_y the outputs are the same."""
    gen = torch.Generator().manual_seed(6)
    b, L, k = 2, 150, 3072
    x = (torch.randn(b, L, k, generator=gen) * 2).to(torch.bfloat16).to(DEV)
    shift = (torch.randn(b, 1, k, generator=gen) * 0.1).to(torch.bfloat16).to(DEV)
    scale = (torch.randn(b, 1, k, generator=gen) * 0.1).to(torch.bfloat16).to(DEV)
    smooth = (torch.rand(k, generator=gen) + 0.5).to(DEV)
    down = (torch.randn(32, k, generator=gen) / 64).to(torch.bfloat16).to(DEV)
    sc = ops.UNSIGNED_SHIFT if unsigned else 0.0
    act, y = native.layernorm_quantize_act(x, shift, scale, None, smooth, down, unsigned, sc, layout=layout,
                                           pow2=True, return_y=True)
    want = native.quantize_act_reference(y, smooth, down, unsigned, sc, layout=layout, pow2=True)
    assert torch.equal(act.codes, want.codes) and torch.equal(act.scales, want.scales)
    assert _rel(act.lora_act, want.lora_act) < 1e-5
    again = native.layernorm_quantize_act(x, shift, scale, None, smooth, down, unsigned, sc, layout=layout,
                                          pow2=True)
    assert torch.equal(again.codes, act.codes) and torch.equal(again.scales, act.scales)
    # y does not depend on the format (the same statistics kernel)
    _, y_plain = native.layernorm_quantize_act(x, shift, scale, None, smooth, None, layout="packed", return_y=True)
    assert torch.equal(y, y_plain)


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["packed", "fp8_tiles", "s8_tiles"])
def test_quantize_no_tokens(cuda_lib, layout):
    """M = 0: no kernel runs, the padded codes and scales are zeros, shaped as the reference's."""
    x = torch.empty(0, 256, dtype=torch.bfloat16)
    zero = torch.zeros(1, 256, dtype=torch.bfloat16)
    pow2 = layout == "s8_tiles"
    want = native.quantize_act_reference(x, layout=layout, pow2=pow2)
    for got in (native.quantize_act(x.to(DEV), layout=layout, pow2=pow2),
                native.layernorm_quantize_act(x.to(DEV), zero.to(DEV), zero.to(DEV), 1, layout=layout, pow2=pow2)):
        assert torch.equal(got.codes.cpu(), want.codes) and torch.equal(got.scales.cpu(), want.scales)
        assert not got.codes.any() and not got.scales.any()


def _pow2_layer(n, k, rank, unsigned, gen, lora_dtype=torch.bfloat16, use_bias=True):
    """A random layer with power-of-two weight scales (exponents 0..POW2_MAX_EXP), prepared for the integer GEMM
    with power-of-two activations -> (prep, (qweight, wscales, lora_down, lora_up, bias, smooth) on the CPU)."""
    qweight, _, lora_down, lora_up, bias, smooth = _layer(n, k, rank, gen, lora_dtype)
    ch = torch.rand(n, 1, generator=gen) * 0.02 + 1e-3
    e = torch.randint(0, ops.POW2_MAX_EXP + 1, (n, k // 64), generator=gen)
    e[:, 0] = 0
    wscales = (ch.to(torch.bfloat16).float() * torch.exp2(-e.float())).to(torch.bfloat16)
    bias = bias if use_bias else None
    shift = ops.UNSIGNED_SHIFT if unsigned else 0.0
    dv = lambda t: None if t is None else t.to(DEV)
    prep = native.prepare_w4a4(qweight.to(DEV), wscales.to(DEV), dv(lora_down), dv(lora_up), dv(bias),
                               smooth.to(DEV), unsigned, shift, lora_dtype, path="wgmma", act_pow2=True)
    assert prep.s8_ok and native.act_layout(prep, "wgmma") == "s8_tiles"
    return prep, (qweight, wscales, lora_down, lora_up, bias, smooth)


def _s8_run(m, k, n, rank, unsigned, use_bias, out_dtype, epilogue="none", lora_dtype=torch.bfloat16, seed=0):
    gen = torch.Generator().manual_seed(seed + m + 7 * k + 13 * n + rank)
    prep, (qweight, wscales, lora_down, lora_up, bias, smooth) = _pow2_layer(n, k, rank, unsigned, gen, lora_dtype,
                                                                             use_bias)
    shift = ops.UNSIGNED_SHIFT if unsigned else 0.0
    x = _acts(m, k, gen, unsigned).to(lora_dtype)
    codes, scales = ops.quantize_act(x.to(DEV), smooth.to(DEV), unsigned, shift, pow2=True)
    b8, tsc = ops.pack_act_s8_tiles(codes, scales)
    lora_act = (x.to(DEV).float() @ lora_down.to(DEV).float().T).contiguous() if rank else None
    act = native.QuantizedActivation(b8, tsc, lora_act, unsigned, "s8_tiles", m)
    out = torch.full((m, prep.w_tiled.shape[0]), float("nan"), dtype=out_dtype, device=DEV)
    native.w4a4_gemm(act, prep, out_dtype, epilogue, path="wgmma", out=out)
    ref = ops.w4a4_linear_f64(x.float(), codes.cpu(), scales.cpu(), qweight, wscales, lora_down, lora_up, bias)
    if epilogue == "gelu_tanh":
        ref = torch.nn.functional.gelu(ref, approximate="tanh")
    return out[:, :n], ref


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 100, 256, 4608])
@pytest.mark.parametrize("unsigned", [False, True])
def test_s8_gemm_matches_float64(sm90, m, unsigned):
    out, ref = _s8_run(m, 3072, 3072 if m in (1, 4608) else 640, 32, unsigned, True, torch.float32)
    assert torch.isfinite(out).all()
    assert _rel(out, ref) < 1e-3


@pytest.mark.gpu
@pytest.mark.parametrize("bt", ["128", "192", "256"])
@pytest.mark.parametrize("rank", [0, 16, 128])
def test_s8_gemm_tiles_and_ranks(sm90, bt, rank, monkeypatch):
    monkeypatch.setenv("NUNCHAKU_LITE_S8_BT", bt)
    for m, k, n in ((300, 1024, 384), (257, 192, 256), (1536, 15360, 128)):
        out, ref = _s8_run(m, k, n, rank, m == 257, True, torch.float32)
        assert torch.isfinite(out).all()
        assert _rel(out, ref) < 1e-3


S8_MODES = {"auto": {}, "stream-k": {"NUNCHAKU_LITE_S8_SK": "1"}, "one-tile-per-cta": {"NUNCHAKU_LITE_S8_SK": "0"},
            "one-tile-prefetch": {"NUNCHAKU_LITE_S8_SK": "0", "NUNCHAKU_LITE_S8_PREFETCH": "1"},
            "one-tile-no-prefetch": {"NUNCHAKU_LITE_S8_SK": "0", "NUNCHAKU_LITE_S8_PREFETCH": "0"}}


@pytest.mark.gpu
@pytest.mark.parametrize("rank", [0, 16, 32, 48, 128])
def test_s8_gemm_stream_k(sm90, rank, monkeypatch):
    """Stream-K (w4a4_s8_sk_kernel: a persistent grid taking equal runs of (tile, group) units, tiles split
    across CTAs, int32 partial sums handed over through the workspace) and one CTA per tile with and without
    its epilogue operands prefetched by helper warps (at any K; ranks <= 32), against one CTA per tile as
    the default picks it. Cases (132 SMs): whole tiles per CTA (1000 x 256 x 5120; one CTA for
    257 x 128 x 128), tiles split in 2 (4608 x 320 x 3072), 6 (300 x 3072 x 256, fp16 output) and 9 parts (a
    shape the default picks stream-K for: 16 tiles, K = 6144), token tails, low-rank in one or several
    chunks, both epilogues, signed and unsigned. All results are bit-identical (integer partial sums, the
    same low-rank products); where tiles split, partial sums went through the workspace; the flags are left
    at zero."""
    dev = torch.device(DEV)
    for m, k, n, epilogue, unsigned, dtype, splits in (
            (1000, 256, 5120, "none", False, torch.bfloat16, False),
            (4608, 320, 3072, "gelu_tanh", True, torch.bfloat16, True),
            (257, 128, 128, "none", False, torch.bfloat16, False),
            (300, 3072, 256, "none", False, torch.float16, True),
            (512, 6144, 1024, "gelu_tanh", False, torch.bfloat16, True)):
        outs = {}
        for mode, env in S8_MODES.items():
            ws = native._S8_WORKSPACE.get(native._s8_workspace_key(dev))
            if ws is not None:  # stale partial sums of the last launch must not be what an early read finds
                ws[1024:].fill_(0x55555555)
            with monkeypatch.context() as mp:
                for key, value in env.items():
                    mp.setenv(key, value)
                out, ref = _s8_run(m, k, n, rank, unsigned, True, dtype, epilogue)
            assert torch.isfinite(out.float()).all(), (mode, m, k, n)
            assert _rel(out.float(), ref.to(dtype).float()) < 5e-3, (mode, m, k, n)
            outs[mode] = out
            if mode == "stream-k" and splits:  # the split really ran: partial sums were handed over
                ws = native._S8_WORKSPACE[native._s8_workspace_key(dev)]
                assert (ws[1024:] != 0x55555555).any(), (m, k, n)
        for mode in S8_MODES:
            assert torch.equal(outs[mode], outs["one-tile-per-cta"]), (mode, m, k, n)
    ws = native._S8_WORKSPACE[native._s8_workspace_key(dev)]
    assert not ws[:1024].any()  # every call leaves the hand-over flags zero


@pytest.mark.gpu
@pytest.mark.parametrize("use_bias", [False, True])
@pytest.mark.parametrize("lora_dtype", [torch.bfloat16, torch.float16])
def test_s8_gemm_prefetch_matches_plain_epilogue(sm90, use_bias, lora_dtype, monkeypatch):
    """The one-tile kernel's prefetched epilogue (helper warps put tscale, channel scales, bias, lora_up and
    lora_act's 16-bit halves into shared memory during the main loop) gives the same bits as its plain epilogue
    (global loads after the last group), for both low-rank dtypes, with and without bias, with token tails,
    and with the FLUX shape's K = 3072 at M = 4608 (where the default prefetches)."""
    for m, k, n, rank in ((4608, 3072, 384, 32), (257, 640, 256, 16), (513, 1024, 128, 32), (40, 192, 256, 0)):
        outs = []
        for pre in ("0", "1"):
            monkeypatch.setenv("NUNCHAKU_LITE_S8_SK", "0")
            monkeypatch.setenv("NUNCHAKU_LITE_S8_PREFETCH", pre)
            out, ref = _s8_run(m, k, n, rank, m == 257, use_bias, lora_dtype, "none", lora_dtype=lora_dtype)
            assert _rel(out.float(), ref.to(lora_dtype).float()) < 5e-3, (pre, m, k, n)
            outs.append(out)
        assert torch.equal(outs[0], outs[1]), (m, k, n, rank)


@pytest.mark.gpu
@pytest.mark.parametrize("unsigned", [False, True])
def test_s8_gemm_token_scale_for_next_layer(sm90, unsigned, monkeypatch):
    """w4a4_gemm_token_scale: the same output as w4a4_gemm, and the next layer's power-of-two token scales
    bit-identical to the statistics pass over that output (nl_act_stats), with and without smoothing, signed
    and unsigned next layers, GELU or not, in every kernel variant (one CTA per tile with and without
    prefetched operands, 128/192-token tiles, stream-K); quantize_act given them writes the same codes."""
    from dataclasses import replace
    gen = torch.Generator().manual_seed(11)
    cases = ((300, 1024, 256, "gelu_tanh", {"NUNCHAKU_LITE_S8_SK": "0", "NUNCHAKU_LITE_S8_PREFETCH": "0"}),
             (4608, 640, 384, "gelu_tanh", {"NUNCHAKU_LITE_S8_SK": "0"}),
             (257, 512, 512, "none", {"NUNCHAKU_LITE_S8_BT": "128"}),
             (200, 256, 256, "gelu_tanh", {"NUNCHAKU_LITE_S8_BT": "192"}),
             (512, 6144, 1024, "gelu_tanh", {"NUNCHAKU_LITE_S8_SK": "1"}))
    for m, k, n, epilogue, env in cases:
        prep, _ = _pow2_layer(n, k, 32, False, gen)
        nprep, _ = _pow2_layer(128, n, 16, unsigned, gen)
        x = _acts(m, k, gen).to(DEV)
        act = native.quantize_act(x, prep.smooth, prep.lora_down, layout="s8_tiles", pow2=True,
                                  inv_smooth=prep.inv_smooth)
        for nxt in (nprep, replace(nprep, smooth=None, inv_smooth=None)):
            with monkeypatch.context() as mp:
                for key, value in env.items():
                    mp.setenv(key, value)
                y, tok = native.w4a4_gemm_token_scale(act, prep, nxt, torch.bfloat16, epilogue)
                plain = native.w4a4_gemm(act, prep, torch.bfloat16, epilogue, path="wgmma")
            assert torch.equal(y, plain), (m, k, n, env)
            want = native._act_stats(y, m, n, nxt.inv_smooth, nxt.act_shift, nxt.act_unsigned, True)[0]
            assert torch.equal(tok, want), (m, k, n, env, nxt.smooth is None)
            q = lambda **kw: native.quantize_act(y, nxt.smooth, nxt.lora_down, nxt.act_unsigned, nxt.act_shift,
                                                 "s8_tiles", True, nxt.inv_smooth, **kw)
            a, b = q(), q(token_scale=tok)
            assert torch.equal(a.codes, b.codes) and torch.equal(a.scales, b.scales)
    with pytest.raises(ValueError, match="power-of-two"):
        native.w4a4_gemm_token_scale(act, prep, replace(nprep, act_pow2=False), torch.bfloat16)
    with pytest.raises(ValueError, match="token_scale"):
        native.quantize_act(y, nprep.smooth, None, layout="fp8_tiles", token_scale=tok)


@pytest.mark.gpu
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_s8_gemm_accumulate(sm90, out_dtype, monkeypatch):
    """epilogue="accumulate" (out += result in the integer GEMM's stores) gives out.add_(result)'s bits, in
    the one-tile kernel with and without prefetched operands and in stream-K (token tails, rows >= M of out
    untouched); on the fp8 wgmma path it is a separate add_; without `out` it is refused."""
    gen = torch.Generator().manual_seed(5)
    for m, k, n, env in ((300, 1024, 256, {"NUNCHAKU_LITE_S8_SK": "0", "NUNCHAKU_LITE_S8_PREFETCH": "0"}),
                         (257, 640, 384, {"NUNCHAKU_LITE_S8_SK": "0", "NUNCHAKU_LITE_S8_PREFETCH": "1"}),
                         (512, 6144, 1024, {"NUNCHAKU_LITE_S8_SK": "1"})):
        prep, (qweight, wscales, lora_down, lora_up, bias, smooth) = _pow2_layer(n, k, 32, False, gen,
                                                                                 torch.bfloat16, True)
        x = _acts(m, k, gen, False).to(torch.bfloat16).to(DEV)
        act = native.quantize_act(x, prep.smooth, prep.lora_down, layout="s8_tiles", pow2=True,
                                  inv_smooth=prep.inv_smooth)
        base = (torch.randn(m + 3, n, generator=gen) * 4).to(out_dtype).to(DEV)
        with monkeypatch.context() as mp:
            for key, value in env.items():
                mp.setenv(key, value)
            y = native.w4a4_gemm(act, prep, out_dtype, path="wgmma")
            acc = base.clone()
            res = native.w4a4_gemm(act, prep, out_dtype, "accumulate", path="wgmma", out=acc[:m])
        assert res.data_ptr() == acc.data_ptr()
        assert torch.equal(acc[:m], base[:m].clone().add_(y)), (m, k, n, env)
        assert torch.equal(acc[m:], base[m:])
    fp8 = native.quantize_act(x, prep.smooth, prep.lora_down, layout="fp8_tiles", inv_smooth=prep.inv_smooth)
    y = native.w4a4_gemm(fp8, prep, out_dtype, path="wgmma", m=m)
    acc = base[:m].clone()
    native.w4a4_gemm(fp8, prep, out_dtype, "accumulate", path="wgmma", out=acc, m=m)
    assert torch.equal(acc, base[:m].clone().add_(y))
    with pytest.raises(ValueError, match="accumulate"):
        native.w4a4_gemm(act, prep, out_dtype, "accumulate", path="wgmma")


@pytest.mark.gpu
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("epilogue", ["none", "gelu_tanh"])
def test_s8_gemm_epilogues(sm90, out_dtype, epilogue):
    out, ref = _s8_run(200, 1024, 256, 16, False, True, out_dtype, epilogue, lora_dtype=out_dtype)
    assert _rel(out, ref.to(out_dtype)) < 5e-3


@pytest.mark.gpu
def test_s8_refuses_unfoldable_weights(sm90):
    gen = torch.Generator().manual_seed(7)
    qweight, wscales, *_ = _layer(128, 256, 0, gen)
    prep = native.prepare_w4a4(qweight.to(DEV), wscales.to(DEV), path="wgmma", act_pow2=True)
    assert not prep.s8_ok and native.act_layout(prep, "wgmma") == "fp8_tiles"
    act = native.quantize_act(_acts(10, 256, gen).to(DEV), layout="s8_tiles", pow2=True)
    with pytest.raises(ValueError, match="power-of-two weight scales"):
        native.w4a4_gemm(act, prep, path="wgmma")


@pytest.mark.gpu
@pytest.mark.parametrize("s8", ["1", "0"])
def test_pow2_layer_native_path_end_to_end(cuda_lib, s8, monkeypatch):
    """A W4A4Linear with power-of-two weights and act_pow2 on CUDA (integer GEMM on sm_90, or the fp8 / s4 / s8
    kernels with NUNCHAKU_LITE_S8=0 or elsewhere) against its reference forward."""
    monkeypatch.setenv("NUNCHAKU_LITE_S8", s8)
    gen = torch.Generator().manual_seed(8)
    lin = torch.nn.Linear(1024, 512).to(torch.bfloat16)
    torch.nn.init.normal_(lin.weight, std=0.05, generator=gen)
    layer = W4A4Linear.from_linear(lin, lin.weight.detach().float(), pow2=True, act_pow2=True,
                                   lora_down=torch.randn(32, 1024, generator=gen) * 0.01,
                                   lora_up=torch.randn(512, 32, generator=gen) * 0.01)
    x = _acts(333, 1024, gen)
    ref = layer(x.float()).float()
    layer = layer.to(DEV)
    got = layer(x.to(DEV)).float().cpu()
    assert _rel(got, ref) < 5e-3


@pytest.mark.gpu
def test_programmatic_dependent_launch_chain(sm90, monkeypatch):
    """A chain of the step's kernels back to back: statistics + quantize -> integer GEMM split by stream-K
    (forced; K = 6144) with the GELU epilogue -> statistics + quantize -> integer GEMM -> gate + residual,
    eager and from a CUDA graph, with programmatic dependent launch (each kernel may start before its
    predecessor ends, native/common.cuh nl_launch) and without (NUNCHAKU_LITE_PDL=0): bit-identical."""
    from nunchaku_lite import fused
    gen = torch.Generator().manual_seed(21)
    m, k, n = 700, 6144, 1024
    fc1, fc2 = _pow2_layer(n, k, 32, False, gen)[0], _pow2_layer(k, n, 32, True, gen)[0]
    x = _acts(m, k, gen).to(DEV)
    gate = (torch.randn(1, k, generator=gen) * 0.1).to(torch.bfloat16).to(DEV)
    monkeypatch.setenv("NUNCHAKU_LITE_S8_SK", "1")

    def chain():
        h = native.w4a4_linear_prepared(x, fc1, epilogue="gelu_tanh")
        y = native.w4a4_linear_prepared(h, fc2)
        return fused.gate_residual(x.view(1, m, k), gate, y)

    outs = {}
    for pdl in ("0", "1"):
        monkeypatch.setenv("NUNCHAKU_LITE_PDL", pdl)
        eager = chain()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            chain()  # warm-up outside the capture (workspaces, prepared layouts)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            graphed = chain()
        graph.replay()
        torch.cuda.synchronize()
        outs[pdl] = (eager, graphed.clone())
    for a, b in zip(outs["0"], outs["1"]):
        assert torch.equal(a, b)
    assert torch.equal(outs["1"][0], outs["1"][1])
