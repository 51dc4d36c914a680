"""Reference ops (quant/ops.py) and the quantized modules (quant/modules.py), on CPU."""

import numpy as np
import pytest
import torch
from torch import nn

from conftest import reciprocal_boundary_group
from nunchaku_lite.quant import ops
from nunchaku_lite.quant.modules import (SplitInputLinear, W4A4Linear, W4A16Linear, is_quantized, quantized_linears,
                                         set_act_quant)


def gen(seed):
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------------------------------
# Packing


def test_pack_nibble_order_and_round_trip():
    codes = torch.tensor([[1, -1, -8, 7, 0, 5]], dtype=torch.int8)
    packed = ops.pack_int4(codes)
    assert packed.dtype == torch.uint8
    assert packed.tolist() == [[0xF1, 0x78, 0x50]]  # low nibble = even element, two's complement
    c = torch.randint(-8, 8, (5, 3, 128), generator=gen(0)).to(torch.int8)
    assert torch.equal(ops.unpack_int4(ops.pack_int4(c)), c)
    u = torch.randint(0, 16, (4, 64), generator=gen(1)).to(torch.int8)
    assert torch.equal(ops.unpack_int4(ops.pack_int4(u), signed=False), u)
    with pytest.raises(ValueError, match="odd"):
        ops.pack_int4(torch.zeros(3, 5, dtype=torch.int8))


# ---------------------------------------------------------------------------------------------------------
# Quantization rules


def test_weight_quant_round_trip_and_rounded_scale():
    w = torch.randn(48, 192, generator=gen(2))
    codes, scales = ops.quantize_weight(w)
    assert codes.dtype == torch.int8 and scales.dtype == torch.bfloat16 and scales.shape == (48, 3)
    assert codes.min() >= -8 and codes.max() <= 7
    s = scales.float().repeat_interleave(64, dim=1)
    # codes come from the bf16-rounded scale, so the dequantized error is at most half a (rounded) step,
    # except where the rounded-down scale pushed |w/s| past 7 and the code saturated
    err = (ops.dequantize(codes, scales) - w).abs()
    assert (err <= s / 2 + 1e-7).float().mean() > 0.99
    assert torch.equal(codes, torch.round(w / s).clamp(-8, 7).to(torch.int8))
    rel = (ops.dequantize(codes, scales) - w).norm() / w.norm()
    assert 0.05 < rel < 0.2  # 4-bit symmetric quantization of a Gaussian
    _, s32 = ops.quantize_weight(w, torch.float32)
    assert torch.allclose(s32, w.abs().view(48, 3, 64).amax(-1) / 7)


def test_pow2_weight_scales_split_exactly_and_cost_little():
    """quantize_weight(pow2=True): every group scale is the row's channel scale times 2^-e (0 <= e <= 4), so
    pow2_split recovers (channel scale, e) exactly; the error on Gaussian weights with uneven rows and
    channels stays within 1.5 dB of the plain scales'."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(256, 1024, generator=gen) * torch.rand(256, 1, generator=gen) * torch.rand(1, 1024, generator=gen) * 3
    w[:, 64:128] *= 1e-4  # a tiny group: rounds to zero under every exponent's scale
    w[3, 128:192] = 0     # an all-zero group
    sqnr = {}
    for pow2 in (False, True):
        codes, scales = ops.quantize_weight(w, pow2=pow2)
        sqnr[pow2] = 10 * torch.log10(w.square().sum() / (ops.dequantize(codes, scales) - w).square().sum())
        assert codes.min() >= -8 and codes.max() <= 7 and scales.dtype == torch.bfloat16
    assert ops.pow2_split(ops.quantize_weight(w)[1]) is None  # plain scales are not of the form
    ch, e = ops.pow2_split(scales)
    assert e.dtype == torch.uint8 and int(e.max()) <= ops.POW2_MAX_EXP and e.float().mean() > 0.1
    s = scales.float()
    assert torch.equal(torch.where(s > 0, ch[:, None] * torch.exp2(-e.float()), s), s)
    assert codes[3, 128:192].eq(0).all()
    assert sqnr[False] - 1.5 < sqnr[True] <= sqnr[False]
    bad = scales.clone()
    bad[0, 1] = bad[0, 0] * 0.75  # not a power-of-two ratio
    assert ops.pow2_split(bad) is None


def test_round_half_even_and_clamp():
    x = torch.zeros(1, 64)
    x[0, :8] = torch.tensor([7.0, 2.5, 3.5, -2.5, 0.5, 1.5, -0.5, -3.5])  # amax 7 -> scale exactly 1
    codes, scales = ops.quantize_act(x)
    assert scales.item() == 1.0
    assert codes[0, :8].tolist() == [7, 2, 4, -2, 0, 2, 0, -4]
    x = torch.zeros(1, 64)
    x[0, 0], x[0, 1] = -7.0, 7.0
    assert ops.quantize_act(x)[0][0, :2].tolist() == [-7, 7]


def test_all_zero_group_and_outlier():
    x = torch.randn(3, 256, generator=gen(3))
    x[1, 64:128] = 0  # an all-zero group
    x[2, 200] = 1e4  # one huge outlier in group 3
    codes, scales = ops.quantize_act(x)
    assert torch.isfinite(scales).all() and scales[1, 1] == 0 and (codes[1, 64:128] == 0).all()
    assert scales[2, 3] == pytest.approx(1e4 / 7)
    rest = torch.cat((codes[2, 192:200], codes[2, 201:256]))
    assert codes[2, 200] == 7 and rest.eq(0).all()  # the rest of its group collapses to 0
    assert torch.equal(scales[2, :3], x[2, :192].abs().view(3, 64).amax(-1) / 7)  # other groups untouched
    w = torch.zeros(2, 128)
    w[0, 3] = -5.0
    wc, ws = ops.quantize_weight(w)
    assert ws[1].eq(0).all() and ws[0, 1] == 0 and wc[1].eq(0).all() and wc[0, 3] == -7
    y = ops.w4a4_linear(torch.zeros(2, 128), ops.pack_int4(wc), ws)
    assert torch.isfinite(y).all() and y.eq(0).all()


def test_unsigned_shift_is_added_before_smooth():
    x = torch.rand(2, 64, generator=gen(4)) - 0.1  # a few negatives (post-GELU inputs go down to -0.17)
    smooth = torch.full((64,), 2.0)
    codes, scales = ops.quantize_act(x, smooth, unsigned=True, shift=ops.UNSIGNED_SHIFT)
    xh = (x + ops.UNSIGNED_SHIFT) * 0.5  # 1/smooth, exact here
    assert torch.allclose(scales[:, 0], xh.abs().amax(-1) / 15)
    assert codes.min() >= 0 and codes.max() == 15
    assert torch.equal(codes, torch.round(xh * (1 / scales)).clamp(0, 15).to(torch.int8))
    x[0, 0] = -1.0  # below -shift: clamps to code 0
    assert ops.quantize_act(x, smooth, unsigned=True, shift=ops.UNSIGNED_SHIFT)[0][0, 0] == 0


def test_k_not_multiple_of_64_is_refused_by_ops():
    with pytest.raises(ValueError, match="multiple of the group size"):
        ops.quantize_act(torch.zeros(2, 100))
    with pytest.raises(ValueError, match="multiple of the group size"):
        ops.quantize_weight(torch.zeros(2, 100))


# ---------------------------------------------------------------------------------------------------------
# W4A4 linear vs an independent float64 evaluation


def numpy_w4a4(x, codes, wscales, down, up, bias, smooth, unsigned, shift):
    """The contract's semantics written again with numpy: fp32 quantization, float64 sums."""
    xs = x.numpy().astype(np.float32) + np.float32(shift)
    inv = np.float32(1) / smooth.numpy().astype(np.float32)
    xs = (xs * inv).reshape(x.shape[0], -1, 64)
    qmax, lo, hi = (15, 0, 15) if unsigned else (7, -8, 7)
    sa = np.abs(xs).max(-1) / np.float32(qmax)
    normal = sa >= np.float32(2.0 ** -126)
    rs = np.where(normal, np.float32(1) / np.where(normal, sa, np.float32(1)), np.float32(0))
    qa = np.clip(np.rint(xs * rs[..., None]), lo, hi)
    cw = codes.numpy().astype(np.float64).reshape(codes.shape[0], -1, 64)
    y = np.einsum("mgk,ngk,mg,ng->mn", qa.astype(np.float64), cw, sa.astype(np.float64),
                  wscales.float().numpy().astype(np.float64))
    y += (x.numpy().astype(np.float64) @ down.float().numpy().T) @ up.float().numpy().T.astype(np.float64)
    return y + bias.float().numpy()


@pytest.mark.parametrize("unsigned", [False, True])
def test_w4a4_linear_matches_independent_float64(unsigned):
    g = gen(5)
    m, k, n, r = 37, 320, 96, 16
    x = torch.randn(m, k, generator=g)
    if unsigned:
        x = torch.nn.functional.gelu(x, approximate="tanh")
    x[:, 5] *= 30  # an outlier channel
    smooth = (torch.rand(k, generator=g) + 0.5)
    codes, wscales = ops.quantize_weight(torch.randn(n, k, generator=g))
    down = (torch.randn(r, k, generator=g) * 0.05).bfloat16()
    up = (torch.randn(n, r, generator=g) * 0.05).bfloat16()
    bias = torch.randn(n, generator=g).bfloat16()
    shift = ops.UNSIGNED_SHIFT if unsigned else 0.0
    y = ops.w4a4_linear(x, ops.pack_int4(codes), wscales, down, up, bias, smooth, unsigned, shift)
    ref = numpy_w4a4(x, codes, wscales, down, up, bias, smooth, unsigned, shift)
    assert y.dtype == torch.float32 and y.shape == (m, n)
    assert np.abs(y.double().numpy() - ref).max() <= 2e-6 * np.abs(ref).max()
    qa, sa = ops.quantize_act(x, smooth, unsigned, shift)
    f64 = ops.w4a4_linear_f64(x, qa, sa, ops.pack_int4(codes), wscales, down, up, bias)
    assert np.abs(f64.numpy() - ref).max() <= 1e-9 * np.abs(ref).max()


def test_w4a4_linear_shapes_dtypes_and_chunking(monkeypatch):
    g = gen(6)
    x = torch.randn(2, 9, 128, generator=g).bfloat16()
    codes, wscales = ops.quantize_weight(torch.randn(64, 128, generator=g))
    qw = ops.pack_int4(codes)
    y = ops.w4a4_linear(x, qw, wscales)
    assert y.shape == (2, 9, 64) and y.dtype == torch.bfloat16
    assert ops.w4a4_linear(x, qw, wscales, out_dtype=torch.float32).dtype == torch.float32
    full = ops.w4a4_linear(x.float(), qw, wscales)
    monkeypatch.setattr(ops, "_CHUNK_ELEMS", 64 * 2 * 3)  # 3 tokens per chunk: same bits
    assert torch.equal(ops.w4a4_linear(x.float(), qw, wscales), full)
    with pytest.raises(ValueError, match="does not match"):
        ops.w4a4_linear(torch.randn(3, 192), qw, wscales)


def test_w4a16_linear():
    g = gen(7)
    w = torch.randn(40, 128, generator=g)
    codes, scales = ops.quantize_weight(w)
    x = torch.randn(3, 128, generator=g)
    b = torch.randn(40, generator=g)
    y = ops.w4a16_linear(x, ops.pack_int4(codes), scales, b)
    ref = x.double() @ (codes.double() * scales.double().repeat_interleave(64, 1)).T + b.double()
    assert torch.allclose(y.double(), ref, atol=1e-5)
    u = torch.randint(0, 16, (40, 128), generator=g).to(torch.int8)
    z = -(7 * scales.float()).bfloat16()
    y = ops.w4a16_linear(x, ops.pack_int4(u), scales, None, z)
    ref = x.double() @ (u.double() * scales.double().repeat_interleave(64, 1) + z.double().repeat_interleave(64, 1)).T
    assert torch.allclose(y.double(), ref, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# Modules


def make_w4a4(linear, rank=8, unsigned=False, seed=8):
    g = gen(seed)
    k = linear.in_features
    smooth = torch.rand(k, generator=g) + 0.5
    down = torch.randn(rank, k, generator=g) * 0.02
    up = torch.randn(linear.out_features, rank, generator=g) * 0.02
    resid = linear.weight.detach() * smooth - (up @ (down * smooth))
    return W4A4Linear.from_linear(linear, resid, smooth, down, up, act_unsigned=unsigned,
                                  act_shift=ops.UNSIGNED_SHIFT if unsigned else 0.0)


def test_w4a4_module_forward_and_dense_weight():
    torch.manual_seed(0)
    lin = nn.Linear(192, 80)
    q = make_w4a4(lin)
    assert q.qweight.shape == (80, 96) and q.wscales.shape == (80, 3) and q.smooth.dtype == torch.float32
    x = torch.randn(4, 6, 192)
    y = q(x)
    ref = ops.w4a4_linear(x, q.qweight, q.wscales, q.lora_down, q.lora_up, q.bias, q.smooth)
    assert torch.equal(y, ref)
    with torch.no_grad():
        dense = lin(x)
    err = ((y - dense).norm() / dense.norm()).item()
    assert 0.01 < err < 0.3
    # act_quant=False: only the weight rounding is left, which dense_weight() represents exactly
    q.act_quant = False
    y16 = q(x)
    assert torch.allclose(y16, x @ q.dense_weight().T + q.bias, atol=1e-5)
    assert ((y16 - dense).norm() / dense.norm()) < err
    with pytest.raises(ValueError, match="expected 192"):
        q(torch.randn(2, 191))


def test_w4a4_module_pads_k():
    torch.manual_seed(1)
    lin = nn.Linear(100, 32)
    with pytest.warns(UserWarning, match="padding K to 128"):
        q = make_w4a4(lin, rank=4)
    assert q.qweight.shape == (32, 64) and q.in_features == 100
    x = torch.randn(5, 100)
    padded = nn.functional.pad(x, (0, 28))
    ref = ops.w4a4_linear(padded, q.qweight, q.wscales, q.lora_down, q.lora_up, q.bias, q.smooth)
    assert torch.equal(q(x), ref)
    assert not ops.unpack_int4(q.qweight)[:, 100:].any()  # the padded weight columns are zero
    assert q.dense_weight().shape == (32, 100)


def test_w4a4_unsigned_module_with_bias_compensation():
    torch.manual_seed(2)
    lin = nn.Linear(128, 48)
    q = make_w4a4(lin, unsigned=True)
    q.bias.copy_(q.bias - ops.UNSIGNED_SHIFT * (q.dequantized_weight() / q.smooth).sum(1))  # what QUANT does
    x = nn.functional.gelu(torch.randn(16, 128) * 2, approximate="tanh")
    with torch.no_grad():
        dense = lin(x)
    assert ((q(x) - dense).norm() / dense.norm()) < 0.2
    q.act_quant = False  # the shift stays in the 16-bit path too, so the compensated bias still fits
    assert torch.allclose(q(x), x @ q.dense_weight().T + lin.bias.detach(), atol=1e-5)


def test_w4a16_module_and_helpers():
    torch.manual_seed(3)
    block = nn.Sequential(nn.Linear(64, 96), nn.SiLU(), nn.Linear(96, 64))
    x = torch.randn(3, 64)
    with torch.no_grad():
        ref = block(x)
    assert not is_quantized(block)
    with pytest.warns(UserWarning):
        block[2] = W4A16Linear.from_linear(block[2])
    with pytest.warns(UserWarning, match="padding"):
        block[0] = SplitInputLinear([make_w4a4(nn.Linear(32, 96), seed=1), make_w4a4(nn.Linear(32, 96), seed=2)])
    assert is_quantized(block)
    names = [n for n, _ in quantized_linears(block)]
    assert names == ["0.parts.0", "0.parts.1", "2"]
    set_act_quant(block, False)
    assert all(not m.act_quant for m in block[0].parts)
    w16 = block[2]
    assert torch.allclose(w16(torch.ones(1, 96)), torch.ones(1, 96) @ w16.dense_weight().T + w16.bias, atol=1e-5)
    assert block(x).shape == ref.shape


def test_from_linear_errors():
    lin = nn.Linear(64, 32)
    with pytest.raises(ValueError, match="residual shape"):
        W4A4Linear.from_linear(lin, torch.zeros(32, 65))
    with pytest.raises(ValueError, match="both lora_down and lora_up"):
        W4A4Linear.from_linear(lin, lin.weight, lora_down=torch.zeros(4, 64))
    with pytest.raises(ValueError, match="rank"):
        W4A4Linear(64, 32, rank=-1)


@pytest.mark.gpu
def test_ops_on_cuda_match_cpu():
    g = gen(9)
    x = torch.randn(50, 256, generator=g)
    smooth = torch.rand(256, generator=g) + 0.5
    codes, wscales = ops.quantize_weight(torch.randn(128, 256, generator=g))
    qw = ops.pack_int4(codes)
    down, up = torch.randn(16, 256, generator=g) * 0.05, torch.randn(128, 16, generator=g) * 0.05
    bias = torch.randn(128, generator=g)
    for unsigned, shift in ((False, 0.0), (True, ops.UNSIGNED_SHIFT)):
        qa, sa = ops.quantize_act(x, smooth, unsigned, shift)
        qa_c, sa_c = ops.quantize_act(x.cuda(), smooth.cuda(), unsigned, shift)
        assert torch.equal(qa_c.cpu(), qa) and torch.equal(sa_c.cpu(), sa)  # bit-identical codes and scales
        args = (qw, wscales, down, up, bias, smooth)
        y = ops.w4a4_linear(x, *args, unsigned, shift)
        y_c = ops.w4a4_linear(x.cuda(), *(a.cuda() for a in args), unsigned, shift)
        assert torch.allclose(y_c.cpu(), y, rtol=1e-5, atol=1e-5)


def test_dtype_casts_keep_the_quantized_values():
    torch.manual_seed(4)
    q = make_w4a4(nn.Linear(128, 64))
    w16 = W4A16Linear.from_linear(nn.Linear(64, 32))
    before = (q.wscales.clone(), q.smooth.clone(), w16.wscales.clone())
    model = nn.Sequential(q, w16).to(torch.float16)
    assert q.lora_down.dtype == torch.float16 and q.bias.dtype == torch.float16 and w16.bias.dtype == torch.float16
    assert torch.equal(q.wscales, before[0]) and q.wscales.dtype == torch.bfloat16
    assert torch.equal(q.smooth, before[1]) and q.smooth.dtype == torch.float32
    assert torch.equal(w16.wscales, before[2])
    assert model(torch.randn(2, 128, dtype=torch.float16)).dtype == torch.float16


def test_quantize_act_multiplies_by_reciprocals():
    """Codes are rint(RN(xs * RN(1/scale))) with xs = x * RN(1/smooth): a group with values where dividing by
    the scale, or rounding the product only once (a fused multiply-add), gives other codes."""
    x, smooth, want = reciprocal_boundary_group()
    codes, scales = ops.quantize_act(x, smooth)
    assert torch.equal(codes, want)
    xs = x * (1 / smooth)
    s = xs.abs().amax() / torch.tensor(7.0)
    assert scales.item() == s.item()
    by_div = torch.round(xs / s).clamp(-8, 7).to(torch.int8)
    by_fma = torch.round((xs.double() * (1 / s).double())).clamp(-8, 7).to(torch.int8)
    assert not torch.equal(by_div, want) and not torch.equal(by_fma, want)  # the group tells them apart
    # the smoothing: x * RN(1/smooth), not x / smooth (random groups, where the scales tell the two apart)
    g = gen(11)
    x2 = torch.randn(256, 64, generator=g).bfloat16().float()
    sm = torch.rand(64, generator=g) * 3 + 0.1
    sc = ops.quantize_act(x2, sm)[1]
    assert torch.equal(sc, (x2 * (1 / sm)).abs().amax(-1, keepdim=True) / torch.tensor(7.0))
    assert not torch.equal(sc, (x2 / sm).abs().amax(-1, keepdim=True) / torch.tensor(7.0))
