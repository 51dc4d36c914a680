"""The sm_90 W4A4 GEMM (native/gemm_w4a4_sm90.cu): its data layouts on the CPU, the kernel on an H100.

CPU: the nibble -> e4m3 byte-permute recipe (an emulation of PTX prmt) and the weight order
ops.pack_weight_wgmma, decoded through the PTX ISA's wgmma A-fragment layout; the inverse of the s4/s8 tile
order used to convert a prepared weight between paths. GPU (sm_90 only): relative error < 1e-3 against
ops.w4a4_linear_f64 on the same codes, fresh random inputs, outputs poisoned with NaN.
"""
import pytest
import torch

from nunchaku_lite.quant import ops
from conftest import random_w4a4_layer as _layer, rel_err as _rel

native = pytest.importorskip("nunchaku_lite.native")

# ---- CPU: the kernel's register recipe and the weight layout -------------------------------------------


def _prmt(a: int, b: int, sel: int) -> int:
    """PTX prmt.b32 (default mode): byte i of the result = byte sel[i] & 7 of {b, a}, or its sign replicated
    when sel[i] & 8."""
    by = [(a >> (8 * i)) & 0xFF for i in range(4)] + [(b >> (8 * i)) & 0xFF for i in range(4)]
    out = 0
    for i in range(4):
        s = (sel >> (4 * i)) & 0xF
        v = by[s & 7]
        if s & 8:
            v = 0xFF if v & 0x80 else 0
        out |= v << (8 * i)
    return out


def _e4m3(v: int) -> int:
    return int(torch.tensor(float(v)).to(torch.float8_e4m3fn).view(torch.uint8))


def _word(bs) -> int:
    return sum(b << (8 * i) for i, b in enumerate(bs))


# the constants of gemm_w4a4_sm90.cu (POS_LO/HI = e4m3(0..7), NEG_LO/HI = e4m3(-8..-1))
POS_LO, POS_HI, NEG_LO, NEG_HI = 0x44403800, 0x4E4C4A48, 0xCACCCED0, 0xB8C0C4C8


def _nib8_to_e4m3(x: int) -> tuple[int, int]:
    """The kernel's nib8_to_e4m3, op for op."""
    t, x4 = x & 0x77777777, (x << 4) & 0xFFFFFFFF
    th = t >> 16
    sel = lambda p, q, m: ((p & ~m) | (q & m)) & 0xFFFFFFFF  # lop3 0xCA
    lo = sel(_prmt(POS_LO, POS_HI, t), _prmt(NEG_LO, NEG_HI, t), _prmt(x, x4, 0x9D8C))
    hi = sel(_prmt(POS_LO, POS_HI, th), _prmt(NEG_LO, NEG_HI, th), _prmt(x, x4, 0xBFAE))
    return lo, hi


def test_lookup_constants_are_e4m3_of_the_codes():
    assert (POS_LO, POS_HI) == (_word(_e4m3(i) for i in range(4)), _word(_e4m3(i) for i in range(4, 8)))
    assert (NEG_LO, NEG_HI) == (_word(_e4m3(i) for i in range(-8, -4)), _word(_e4m3(i) for i in range(-4, 0)))


def test_nibble_to_e4m3_recipe():
    gen = torch.Generator().manual_seed(0)
    words = torch.randint(0, 2 ** 32, (3000,), generator=gen, dtype=torch.int64).tolist()
    words += [0, 0xFFFFFFFF, 0x88888888, 0x77777777, 0x01234567, 0x89ABCDEF]
    for x in words:
        nib = [(x >> (4 * i)) & 0xF for i in range(8)]
        want = [_e4m3(n - 16 if n >= 8 else n) for n in nib]
        assert _nib8_to_e4m3(x) == (_word(want[:4]), _word(want[4:])), hex(x)


def test_weight_layout_matches_the_wgmma_a_fragments():
    """Each thread's 16 bytes decode (word j -> registers 2j, 2j+1; k32 step = register // 4) to the codes the
    PTX ISA's 64x32 8-bit A fragment assigns it: row 16w + l/4 (+8 for odd registers), k 4(l%4) + byte
    (+16 for registers 2, 3 of a step)."""
    n, k = 256, 192
    gen = torch.Generator().manual_seed(1)
    codes = torch.randint(-8, 8, (n, k), generator=gen, dtype=torch.int8)
    packed = ops.pack_weight_wgmma(ops.pack_int4(codes))
    assert packed.shape == (n // 128, k // 64, 2, 128, 16)
    words = packed.view(n // 128, k // 64, 2, 128, 4, 4).to(torch.int64)
    words = (words * (256 ** torch.arange(4))).sum(-1)  # little-endian uint32 words [nb, g, c, t, j]
    got = torch.empty_like(codes)
    for nb in range(n // 128):
        for g in range(k // 64):
            for c in range(2):
                for t in range(128):
                    w, l = t // 32, t % 32
                    for j in range(4):
                        lo, hi = _nib8_to_e4m3(int(words[nb, g, c, t, j]))
                        for reg_idx, reg in ((2 * j, lo), (2 * j + 1, hi)):
                            step, r = reg_idx // 4, reg_idx % 4
                            row = nb * 128 + c * 64 + 16 * w + l // 4 + 8 * (r & 1)
                            for b in range(4):
                                kk = 64 * g + 32 * step + 16 * (r >> 1) + 4 * (l % 4) + b
                                byte = torch.tensor([(reg >> (8 * b)) & 0xFF], dtype=torch.uint8)
                                got[row, kk] = int(byte.view(torch.float8_e4m3fn).float())
    assert torch.equal(got, codes)
    assert torch.equal(ops.unpack_weight_wgmma(packed, n, k), ops.pack_int4(codes))


def test_untile_inverts_the_s8_tile_order():
    """native._untile inverts repack.cu's order (emulated here), so a prepared weight converts between paths."""
    n, k = 256, 128
    q = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8)
    g = k // 64
    tiled = torch.empty(n // 128, g, 128, 2, 16, dtype=torch.uint8)
    src = q.view(n // 128, 128, g, 2, 16)
    for r in range(128):
        s = (r >> 2) & 1
        tiled[:, :, r, 0 ^ s] = src[:, r, :, 0]
        tiled[:, :, r, 1 ^ s] = src[:, r, :, 1]
    assert torch.equal(native._untile(tiled.flatten(), n, k), q)


# ---- GPU: the kernel against the float64 reference ----------------------------------------------------

DEV = "cuda"


@pytest.fixture(scope="module")
def sm90():
    if not torch.cuda.is_available() or not native.available():
        pytest.skip(f"native kernels unavailable: {native.library_error() or 'no suitable CUDA device'}")
    if torch.cuda.get_device_capability() != (9, 0) or not native.has_wgmma():
        pytest.skip("the wgmma GEMM needs an sm_90 device")


def _pow2_scales(n, k, gen, zero_groups=False):
    """Random power-of-two weight scales (ops.pow2_split form), every exponent 0..9 present; zero_groups
    zeroes some scales (their nonzero codes must then contribute nothing)."""
    ch = torch.rand(n, 1, generator=gen) * 0.02 + 1e-3
    e = torch.randint(0, ops.FP8_FOLD_MAX_EXP + 1, (n, k // 64), generator=gen)
    e[:, 0] = 0
    s = (ch.to(torch.bfloat16).float() * torch.exp2(-e.float())).to(torch.bfloat16)
    if zero_groups:
        s[torch.rand(n, k // 64, generator=gen) < 0.1] = 0
        s[:, 0] = ch.to(torch.bfloat16)[:, 0]
    return s


def _run(m, k, n, rank, unsigned, use_bias, out_dtype, epilogue="none", lora_dtype=torch.bfloat16, seed=0,
         pow2=False, fold=None, zero_groups=False):
    gen = torch.Generator().manual_seed(seed + m + 7 * k + 13 * n + rank)
    qweight, wscales, lora_down, lora_up, bias, smooth = _layer(n, k, rank, gen, lora_dtype)
    if pow2:
        wscales = _pow2_scales(n, k, gen, zero_groups)
    bias = bias if use_bias else None
    x = torch.randn(m, k, generator=gen) * 2.0
    x[:, torch.randint(0, k, (max(1, k // 64),), generator=gen)] *= 30.0  # outlier channels
    shift = ops.UNSIGNED_SHIFT if unsigned else 0.0
    if unsigned:
        x = torch.nn.functional.gelu(x, approximate="tanh")
    x = x.to(lora_dtype)
    dv = lambda t: None if t is None else t.to(DEV)
    prep = native.prepare_w4a4(qweight.to(DEV), wscales.to(DEV), dv(lora_down), dv(lora_up), dv(bias),
                               smooth.to(DEV), unsigned, shift, lora_dtype, path="wgmma")
    assert prep.w_layout == "wgmma" and (prep.w_exp is not None) == pow2
    # inputs in the contract layout from the reference quantizer (on the GPU)
    codes, scales = ops.quantize_act(x.to(DEV), smooth.to(DEV), unsigned, shift)
    codes8, scales8 = ops.pack_act_fp8_tiles(codes, scales)
    # the low-rank branch reads the raw x (ops.py), in fp32
    lora_act = (x.to(DEV).float() @ lora_down.to(DEV).float().T).contiguous() if rank else None
    act = native.QuantizedActivation(codes8, scales8, lora_act, unsigned, "fp8_tiles")
    npad = prep.w_tiled.shape[0]
    out = torch.full((m, npad), float("nan"), dtype=out_dtype, device=DEV)
    native.w4a4_gemm(act, prep, out_dtype, epilogue, path="wgmma", out=out, m=m, fold=fold)
    ref = ops.w4a4_linear_f64(x.float(), codes.cpu(), scales.cpu(), qweight, wscales, lora_down, lora_up, bias)
    if epilogue == "gelu_tanh":
        ref = torch.nn.functional.gelu(ref, approximate="tanh")
    return out[:, :n], ref


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 100, 255, 256, 4608])
@pytest.mark.parametrize("unsigned", [False, True])
def test_wgmma_gemm_matches_float64(sm90, m, unsigned):
    out, ref = _run(m, 3072, 3072 if m in (1, 4608) else 640, 32, unsigned, True, torch.float32)
    assert torch.isfinite(out).all()
    assert _rel(out, ref) < 1e-3


@pytest.mark.gpu
@pytest.mark.parametrize("rank", [0, 16, 32, 128])
@pytest.mark.parametrize("lora_dtype", [torch.bfloat16, torch.float16])
def test_wgmma_gemm_low_rank(sm90, rank, lora_dtype):
    out, ref = _run(300, 1024, 384, rank, False, True, torch.float32, lora_dtype=lora_dtype)
    assert torch.isfinite(out).all()
    assert _rel(out, ref) < 1e-3


@pytest.mark.gpu
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("epilogue", ["none", "gelu_tanh"])
@pytest.mark.parametrize("use_bias", [False, True])
def test_wgmma_gemm_epilogues(sm90, out_dtype, epilogue, use_bias):
    out, ref = _run(200, 512, 256, 16, False, use_bias, out_dtype, epilogue)
    assert torch.isfinite(out).all()
    assert _rel(out, ref) < 1e-2  # 16-bit output rounding (2^-9) dominates
    assert _rel(out, ref.to(out_dtype)) < 5e-3


VARIANTS = {  # kernel variants selected by environment variables (read by the C side at every call)
    "bt128": {}, "bt128-unpipelined": {"BT": "128", "SUB": "128"}, "bt128-16stages": {"STAGES": "16"},
    "bt128-raster0": {"RASTER": "0"}, "bt192": {"BT": "192"}, "bt192-unpipelined": {"BT": "192", "SUB": "192"},
    "bt256": {"BT": "256"}, "bt128-cluster2": {"CLUSTER": "2"}, "bt192-cluster2": {"BT": "192", "CLUSTER": "2"},
}


@pytest.mark.gpu
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_wgmma_kernel_variants(sm90, variant, monkeypatch):
    """Every kernel variant; M past Mp for 192-token tiles, odd and even group counts, N/128 even (clusters)
    and odd (cluster variants fall back to single CTAs)."""
    for key, val in VARIANTS[variant].items():
        monkeypatch.setenv(f"NUNCHAKU_LITE_WGMMA_{key}", val)
    for m, k, n, rank in ((100, 640, 256, 32), (257, 192, 384, 16), (1000, 1088, 512, 0), (1536, 1024, 512, 32)):
        out, ref = _run(m, k, n, rank, False, True, torch.float32)
        assert torch.isfinite(out).all()
        assert _rel(out, ref) < 1e-3


@pytest.mark.gpu
def test_repack_sm90_matches_reference(sm90):
    gen = torch.Generator().manual_seed(3)
    q = torch.randint(0, 256, (384, 320), generator=gen, dtype=torch.uint8)
    got = native.repack_weight_sm90(q.to(DEV)).cpu()
    assert torch.equal(got.flatten(), ops.pack_weight_wgmma(q).flatten())


@pytest.mark.gpu
def test_wgmma_end_to_end_and_path_conversion(sm90):
    """w4a4_linear_prepared through the wgmma path (packed -> fp8_tiles bridge) agrees with the s8 path on
    the same prepared layer (its weight converted on demand)."""
    gen = torch.Generator().manual_seed(4)
    qweight, wscales, lora_down, lora_up, bias, smooth = _layer(200, 256, 32, gen, torch.bfloat16)
    x = (torch.randn(77, 256, generator=gen) * 2).to(torch.bfloat16).to(DEV)
    prep = native.prepare_w4a4(qweight.to(DEV), wscales.to(DEV), lora_down.to(DEV), lora_up.to(DEV),
                               bias.to(DEV), smooth.to(DEV), path="wgmma")
    y = native.w4a4_linear_prepared(x, prep, path="wgmma")
    y8 = native.w4a4_linear_prepared(x, prep, path="s8")
    assert y.shape == (77, 200)
    assert _rel(y, y8) < 5e-3


# ---- power-of-two weight scales: the folded GEMM (nl_w4a4_gemm_fp8_pow2) ---------------------------------


def _pow2_table(e: int) -> tuple[int, int, int, int]:
    """The kernel's table entry for exponent e: {POS_LO, POS_HI, NEG_LO, NEG_HI} of e4m3(code * 2^-e)."""
    b = [int(torch.tensor((i if i < 8 else i - 16) * 2.0 ** -e).to(torch.float8_e4m3fn).view(torch.uint8))
         for i in range(16)]
    return tuple(_word(b[4 * j: 4 * j + 4]) for j in range(4))


def test_pow2_tables_are_exact_and_the_recipe_decodes_scaled_codes():
    gen = torch.Generator().manual_seed(5)
    dec = lambda w: [float(torch.tensor(((w >> (8 * i)) & 0xFF), dtype=torch.uint8).view(torch.float8_e4m3fn))
                     for i in range(4)]
    assert _pow2_table(0) == (POS_LO, POS_HI, NEG_LO, NEG_HI)
    for e in range(ops.FP8_FOLD_MAX_EXP + 1):
        t = _pow2_table(e)
        vals = sum((dec(w) for w in t), [])
        assert vals == [c * 2.0 ** -e for c in list(range(8)) + list(range(-8, 0))]  # exact, no rounding
        e1 = int(torch.randint(0, ops.FP8_FOLD_MAX_EXP + 1, (1,), generator=gen))
        t1 = _pow2_table(e1)
        for _ in range(20):
            x = int(torch.randint(0, 2 ** 32, (1,), generator=gen, dtype=torch.int64))
            tt = lambda tab, v: (_prmt(tab[0], tab[1], v), _prmt(tab[2], tab[3], v))
            xt, x4 = x & 0x77777777, (x << 4) & 0xFFFFFFFF
            sel = lambda p, q, m: ((p & ~m) | (q & m)) & 0xFFFFFFFF
            lo = sel(*tt(t, xt), _prmt(x, x4, 0x9D8C))
            hi = sel(*tt(t1, xt >> 16), _prmt(x, x4, 0xBFAE))
            nib = [(x >> (4 * i)) & 0xF for i in range(8)]
            code = [v - 16 if v >= 8 else v for v in nib]
            assert dec(lo) == [c * 2.0 ** -e for c in code[:4]]
            assert dec(hi) == [c * 2.0 ** -e1 for c in code[4:]]


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 100, 256, 4608])
@pytest.mark.parametrize("unsigned", [False, True])
def test_folded_gemm_matches_float64(sm90, m, unsigned):
    out, ref = _run(m, 3072, 3072 if m in (1, 4608) else 640, 32, unsigned, True, torch.float32, pow2=True)
    assert torch.isfinite(out).all()
    assert _rel(out, ref) < 1e-3


@pytest.mark.gpu
@pytest.mark.parametrize("variant", [{}, {"SUB": "128"}])
@pytest.mark.parametrize("rank", [0, 32, 128])
def test_folded_gemm_variants_and_ranks(sm90, variant, rank, monkeypatch):
    for key, val in variant.items():
        monkeypatch.setenv(f"NUNCHAKU_LITE_WGMMA_{key}", val)
    for m, k, n in ((300, 1024, 384), (257, 192, 256), (1536, 3072, 512)):
        out, ref = _run(m, k, n, rank, False, True, torch.float32, pow2=True)
        assert torch.isfinite(out).all()
        assert _rel(out, ref) < 1e-3


@pytest.mark.gpu
@pytest.mark.parametrize("epilogue", ["none", "gelu_tanh"])
def test_folded_gemm_epilogue_zero_groups_and_fallback(sm90, epilogue):
    """Zero-scale groups with nonzero codes contribute nothing; fold=False (plain scales rebuilt from the
    exponents) agrees with the folded kernel."""
    out, ref = _run(200, 1024, 256, 16, False, True, torch.bfloat16, epilogue, pow2=True, zero_groups=True)
    assert _rel(out, ref) < 1e-2 and _rel(out, ref.to(torch.bfloat16)) < 5e-3
    plain, _ = _run(200, 1024, 256, 16, False, True, torch.bfloat16, epilogue, pow2=True, zero_groups=True,
                    fold=False)
    assert _rel(out, plain) < 5e-3


@pytest.mark.gpu
def test_fold_true_refuses_plain_scales(sm90):
    with pytest.raises(ValueError, match="fold=True"):
        _run(100, 256, 128, 0, False, False, torch.float32, fold=True)


# ---- the GELU -> quantize epilogue (nl_w4a4_gemm_fp8_gelu_quantize) ------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("m,pow2,unsigned,rank2,dtype", [
    (100, False, True, 32, torch.bfloat16), (300, True, True, 32, torch.bfloat16),
    (4608, True, True, 32, torch.bfloat16), (257, False, False, 0, torch.float16),
    (640, True, False, 64, torch.float16)])
def test_gelu_quantize_epilogue_equals_gemm_then_quantize(sm90, m, pow2, unsigned, rank2, dtype):
    """One kernel gives the next layer's operand exactly as the GELU GEMM followed by the quantize kernel:
    codes and scales byte for byte (padding rows included), the low-rank activation to fp32 summation order."""
    gen = torch.Generator().manual_seed(m + rank2)
    k1, n1, n2 = 1024, 512, 256
    q1, s1, d1, u1, b1, sm1 = _layer(n1, k1, 32, gen, dtype)
    if pow2:
        s1 = _pow2_scales(n1, k1, gen)
    q2, s2, d2, u2, b2, sm2 = _layer(n2, n1, max(rank2, 16), gen, dtype)
    dv = lambda t: None if t is None else t.to(DEV)
    shift = ops.UNSIGNED_SHIFT if unsigned else 0.0
    p1 = native.prepare_w4a4(q1.to(DEV), s1.to(DEV), dv(d1), dv(u1), dv(b1), sm1.to(DEV), dtype=dtype, path="wgmma")
    p2 = native.prepare_w4a4(q2.to(DEV), s2.to(DEV), dv(d2[:rank2]) if rank2 else None,
                             dv(u2[:, :rank2]) if rank2 else None, dv(b2), sm2.to(DEV), unsigned, shift, dtype,
                             path="wgmma")
    x = (torch.randn(m, k1, generator=gen) * 2).to(dtype).to(DEV)
    act = native.quantize_act(x, p1.smooth, p1.lora_down, layout="fp8_tiles")
    y = native.w4a4_gemm(act, p1, dtype, "gelu_tanh", path="wgmma", m=m)
    ref = native.quantize_act(y, p2.smooth, p2.lora_down, unsigned, shift, layout="fp8_tiles")
    got = native.w4a4_gemm_gelu_quantize(act, p1, p2, dtype, m=m)
    assert got.layout == "fp8_tiles" and got.m == m and got.unsigned == unsigned
    assert torch.equal(got.codes, ref.codes)
    assert torch.equal(got.scales, ref.scales)
    if rank2:
        assert _rel(got.lora_act, ref.lora_act) < 1e-5
    else:
        assert got.lora_act is None
    out = native.w4a4_gemm(got, p2, dtype, path="wgmma", m=m)
    assert torch.equal(out, native.w4a4_gemm(ref, p2, dtype, path="wgmma", m=m)) or rank2  # same codes
    with pytest.raises(ValueError, match="multiple of 128"):
        native.w4a4_gemm_gelu_quantize(act, p1, p1, dtype, m=m)
