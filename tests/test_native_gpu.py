"""Native W4A4 kernels on a CUDA device, checked against quant/ops.py (the definition).

Quantize: codes and scales bit-identical to ops.quantize_act (computed on the CPU). GEMM: relative error
< 1e-3 (fp32 output) against ops.w4a4_linear_f64 on the kernel's own codes, for both tensor-core paths
(the s4 path is emulated but runs on sm_90); exact=True bit-identical to ops.w4a4_linear. Fresh random
inputs with outliers, odd M (tile tails), poisoned outputs.
"""
import pytest
import torch

from nunchaku_lite.quant import ops
from conftest import random_w4a4_layer as _rand_layer, rel_err as _rel

pytestmark = pytest.mark.gpu

native = pytest.importorskip("nunchaku_lite.native")


@pytest.fixture(scope="module", autouse=True)
def _needs_native():
    if not torch.cuda.is_available() or not native.available():
        pytest.skip(f"native kernels unavailable: {native.library_error() or 'no suitable CUDA device'}")


DEV = "cuda"
PATHS = ["s4", "s8"]


def _rand_act(m, k, dtype, gen, outliers=True):
    x = torch.randn(m, k, generator=gen) * 2.0
    if outliers:  # a few large channels, as real activations have
        x[:, torch.randint(0, k, (max(1, k // 64),), generator=gen)] *= 30.0
    return x.to(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("unsigned", [False, True])
@pytest.mark.parametrize("m,k", [(1, 64), (37, 192), (300, 3072), (1000, 1024)])
def test_quantize_bit_identical(dtype, unsigned, m, k):
    gen = torch.Generator().manual_seed(m * 7 + k)
    x = _rand_act(m, k, dtype, gen)
    if unsigned:
        x = torch.nn.functional.gelu(x.float(), approximate="tanh").to(dtype)
    if m > 1:
        x[0, :64] = 0  # an all-zero group: scale 0, codes 0
    smooth = torch.rand(k, generator=gen) * 2 + 0.25
    shift = ops.UNSIGNED_SHIFT if unsigned else 0.0
    rank = 32
    lora_down = (torch.randn(rank, k, generator=gen) / k ** 0.5).to(dtype)
    act = native.quantize_act(x.to(DEV), smooth.to(DEV), lora_down.to(DEV), unsigned, shift)
    ref_codes, ref_scales = ops.quantize_act(x, smooth, unsigned, shift)
    got_codes = ops.unpack_int4(act.codes.cpu(), signed=not unsigned)
    assert torch.equal(got_codes, ref_codes), (got_codes != ref_codes).sum().item()
    assert torch.equal(act.scales[:, :m].T.cpu(), ref_scales)
    assert (act.scales[:, m:] == 0).all()  # padded rows of the GEMM operand are zero
    ref_lora = x.double() @ lora_down.double().T
    assert _rel(act.lora_act, ref_lora) < 1e-5


def test_quantize_without_smooth_or_lora():
    gen = torch.Generator().manual_seed(1)
    x = _rand_act(129, 256, torch.bfloat16, gen)
    act = native.quantize_act(x.to(DEV))
    ref_codes, ref_scales = ops.quantize_act(x)
    assert act.lora_act is None
    assert torch.equal(ops.unpack_int4(act.codes.cpu()), ref_codes)
    assert torch.equal(act.scales[:, :129].T.cpu(), ref_scales)


@pytest.fixture(params=["64", "128"])
def block_m(request, monkeypatch):
    """Both GEMM block shapes (the C side reads NUNCHAKU_LITE_GEMM_BM at every call)."""
    monkeypatch.setenv("NUNCHAKU_LITE_GEMM_BM", request.param)
    return int(request.param)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("unsigned", [False, True])
@pytest.mark.parametrize("m,k,n,rank", [(1, 128, 128, 32), (77, 320, 256, 16), (300, 1024, 384, 32),
                                        (513, 3072, 640, 64)])
def test_gemm_matches_float64(path, unsigned, m, k, n, rank, block_m):
    gen = torch.Generator().manual_seed(m + k + n)
    qweight, wscales, lora_down, lora_up, bias, smooth = _rand_layer(n, k, rank, gen)
    x = _rand_act(m, k, torch.bfloat16, gen)
    shift = ops.UNSIGNED_SHIFT if unsigned else 0.0
    if unsigned:
        x = torch.nn.functional.gelu(x.float(), approximate="tanh").to(torch.bfloat16)
    prep = native.prepare_w4a4(qweight.to(DEV), wscales.to(DEV), lora_down.to(DEV), lora_up.to(DEV),
                               bias.to(DEV), smooth.to(DEV), unsigned, shift)
    act = native.quantize_act(x.to(DEV), prep.smooth, prep.lora_down, unsigned, shift)
    out = torch.full((m, n), float("nan"), device=DEV)  # poisoned: every element must be written
    native.w4a4_gemm(act, prep, torch.float32, path=path, out=out)
    codes = ops.unpack_int4(act.codes.cpu(), signed=not unsigned)
    ref = ops.w4a4_linear_f64(x, codes, act.scales[:, :m].T.cpu(), qweight, wscales, lora_down, lora_up, bias)
    assert torch.isfinite(out).all()
    assert _rel(out, ref) < 1e-3
    # the 16-bit output is the same accumulator, rounded
    out16 = native.w4a4_gemm(act, prep, torch.bfloat16, path=path)
    assert torch.equal(out16, out.to(torch.bfloat16))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("unsigned", [False, True])
def test_gemm_exact_mode_is_bit_identical(path, unsigned, block_m):
    gen = torch.Generator().manual_seed(5)
    m, k, n = 70, 512, 256
    qweight, wscales, _, _, bias, smooth = _rand_layer(n, k, 0, gen)
    x = _rand_act(m, k, torch.bfloat16, gen)
    shift = ops.UNSIGNED_SHIFT if unsigned else 0.0
    prep = native.prepare_w4a4(qweight.to(DEV), wscales.to(DEV), None, None, bias.to(DEV), smooth.to(DEV),
                               unsigned, shift)
    act = native.quantize_act(x.to(DEV), prep.smooth, None, unsigned, shift)
    out = native.w4a4_gemm(act, prep, torch.float32, path=path, exact=True)
    ref = ops.w4a4_linear(x, qweight, wscales, None, None, bias, smooth, unsigned, shift, out_dtype=torch.float32)
    assert torch.equal(out.cpu(), ref)


@pytest.mark.parametrize("path", PATHS)
def test_paths_agree_and_fast_mode_is_accurate(path, block_m):
    gen = torch.Generator().manual_seed(9)
    m, k, n = 256, 3072, 512
    qweight, wscales, lora_down, lora_up, bias, smooth = _rand_layer(n, k, 32, gen)
    x = _rand_act(m, k, torch.bfloat16, gen)
    prep = native.prepare_w4a4(qweight.to(DEV), wscales.to(DEV), lora_down.to(DEV), lora_up.to(DEV),
                               bias.to(DEV), smooth.to(DEV))
    act = native.quantize_act(x.to(DEV), prep.smooth, prep.lora_down)
    fast = native.w4a4_gemm(act, prep, torch.float32, path=path)
    exact = native.w4a4_gemm(act, prep, torch.float32, path=path, exact=True)
    other = native.w4a4_gemm(act, prep, torch.float32, path="s8" if path == "s4" else "s4")
    codes = ops.unpack_int4(act.codes.cpu())
    ref = ops.w4a4_linear_f64(x, codes, act.scales[:, :m].T.cpu(), qweight, wscales, lora_down, lora_up, bias)
    assert torch.equal(fast, other)  # both paths compute the same integers and the same promotion
    assert _rel(fast, ref) <= _rel(exact, ref) * 1.5 + 1e-7


def test_gelu_epilogue_and_padded_n():
    gen = torch.Generator().manual_seed(3)
    m, k, n = 100, 256, 200  # N padded to 256 inside prepare_w4a4
    qweight, wscales, lora_down, lora_up, bias, smooth = _rand_layer(n, k, 32, gen)
    x = _rand_act(m, k, torch.bfloat16, gen)
    prep = native.prepare_w4a4(qweight.to(DEV), wscales.to(DEV), lora_down.to(DEV), lora_up.to(DEV),
                               bias.to(DEV), smooth.to(DEV))
    y = native.w4a4_linear_prepared(x.to(DEV), prep)
    g = native.w4a4_linear_prepared(x.to(DEV), prep, epilogue="gelu_tanh")
    assert y.shape == (m, n) and g.shape == (m, n)
    ref = ops.w4a4_linear(x, qweight, wscales, lora_down, lora_up, bias, smooth, out_dtype=torch.float32)
    assert _rel(y, ref) < 5e-3  # bf16 output rounding
    ref_g = torch.nn.functional.gelu(ref, approximate="tanh")
    assert _rel(g, ref_g) < 5e-3


def test_repack_layout():
    gen = torch.Generator().manual_seed(2)
    n, k = 256, 384
    q = torch.randint(0, 256, (n, k // 2), generator=gen, dtype=torch.uint8)
    tiled = native.repack_weight(q.to(DEV)).cpu()
    # documented order: [N/128][K/64][128][2 halves of 16 bytes], halves swapped when (row >> 2) & 1
    exp = q.view(n // 128, 128, k // 64, 2, 16).permute(0, 2, 1, 3, 4).clone()
    swap = ((torch.arange(128) >> 2) & 1).bool()
    exp[:, :, swap] = exp[:, :, swap].flip(3)
    assert torch.equal(tiled.view(-1), exp.reshape(-1))


@pytest.mark.parametrize("zeros", [False, True])
@pytest.mark.parametrize("m,k", [(1, 3072), (3, 3072), (9, 3072), (100, 3072), (2, 4160)])
def test_w4a16(zeros, m, k):
    """100 rows: the dequantize + cuBLAS path; K = 4160: 130 chunks of 32 codes per row, not a multiple of a
    warp's 32 lanes (a partial last round of the kernel's loads)."""
    gen = torch.Generator().manual_seed(m)
    n = 1000
    codes = torch.randint(0 if zeros else -8, 16 if zeros else 8, (n, k), generator=gen, dtype=torch.int16)
    qweight = ops.pack_int4(codes)
    wscales = (torch.rand(n, k // 64, generator=gen) * 0.02).to(torch.bfloat16)
    wzeros = (-7 * wscales.float()).to(torch.bfloat16) if zeros else None
    bias = torch.randn(n, generator=gen).to(torch.bfloat16)
    x = torch.randn(m, k, generator=gen).to(torch.bfloat16)
    prep = native.prepare_w4a16(qweight.to(DEV), wscales.to(DEV), bias.to(DEV),
                                None if wzeros is None else wzeros.to(DEV))
    y = native.w4a16_gemm(x.to(DEV), prep)
    w = ops.dequantize(ops.unpack_int4(qweight, signed=not zeros), wscales, wzeros).double()
    ref = x.double() @ w.T + bias.double()
    assert _rel(y, ref) < 5e-3  # bf16 output
    assert _rel(y, ops.w4a16_linear(x, qweight, wscales, bias, wzeros)) < 5e-3


def test_module_dispatch_uses_native():
    from nunchaku_lite.quant.modules import W4A4Linear
    gen = torch.Generator().manual_seed(4)
    lin = torch.nn.Linear(512, 384).to(torch.bfloat16)
    r = 32
    down = (torch.randn(r, 512, generator=gen) / 20).to(torch.bfloat16)
    up = (torch.randn(384, r, generator=gen) / 10).to(torch.bfloat16)
    mod = W4A4Linear.from_linear(lin, lin.weight.float(), None, down, up).to(DEV)
    x = _rand_act(50, 512, torch.bfloat16, gen).to(DEV)
    y = mod(x)
    assert getattr(mod, "_native_prepared", None) is not None  # the native path ran
    ref = ops.w4a4_linear(x.cpu(), mod.qweight.cpu(), mod.wscales.cpu(), mod.lora_down.cpu(), mod.lora_up.cpu(),
                          mod.bias.cpu(), mod.smooth.cpu(), out_dtype=torch.float32)
    assert _rel(y, ref) < 5e-3


def test_argument_errors_name_the_argument():
    x = torch.randn(4, 100, device=DEV, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="K=100"):
        native.quantize_act(x)
    with pytest.raises(ValueError, match="x has dtype"):
        native.quantize_act(torch.randn(4, 128, device=DEV))
    with pytest.raises(ValueError, match="smooth"):
        native.quantize_act(torch.randn(4, 128, device=DEV, dtype=torch.bfloat16), torch.ones(64, device=DEV))
    q = torch.zeros(100, 64, dtype=torch.uint8, device=DEV)
    with pytest.raises(ValueError, match="N=100"):
        native.repack_weight(q)
    # the C side reports too: a rank that is not a multiple of 16
    lib, ffi = native._lib()
    rc = lib.nl_quantize_act(ffi.cast("void *", x.data_ptr()), 1, 4, 128, 128, ffi.NULL, 0.0, 0, ffi.NULL, 8, 0,
                             ffi.NULL, ffi.NULL, 128, ffi.NULL, ffi.NULL, ffi.NULL)
    assert rc == 1 and b"rank=8" in ffi.string(lib.nl_last_error())
