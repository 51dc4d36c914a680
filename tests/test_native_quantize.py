"""The quantize kernels (native/quantize.cu) against their references in quant/ops.py.

CPU: ops.layernorm_modulate is the DiT's unfused LayerNorm + modulation bit for bit; the binding's CPU
fallback and argument errors. GPU (@gpu): codes and scales bit-identical to ops.quantize_act in both layouts
(packed; fp8_tiles = ops.pack_act_fp8_tiles byte for byte), signed/unsigned+shift, smooth on/off, ranks
0..128, M in {1, 7, 255, 4608}, bf16/fp16, every CTA tiling, token tiles shared by two CTAs (the persistent
split); the fused LayerNorm kernel against quantize_act(ops.layernorm_modulate(...)).
"""
import pytest
import torch

from conftest import reciprocal_boundary_group
from nunchaku_lite import native
from nunchaku_lite.models.dit import ModulationOut, layer_norm
from nunchaku_lite.quant import ops

DTYPES = [torch.bfloat16, torch.float16]


def _needs_lib():
    if native.library_error():
        pytest.skip(f"native library unavailable: {native.library_error()}")


def _act(m, k, dtype, gen, device="cpu"):
    x = torch.randn(m, k, generator=gen) * 2.0
    x[:, torch.randint(0, k, (max(1, k // 64),), generator=gen)] *= 30.0  # outlier channels
    return x.to(dtype).to(device)


# ---------------------------------------------------------------------------------------------- CPU


@pytest.mark.parametrize("dtype", DTYPES + [torch.float32])
def test_layernorm_modulate_is_the_dit_math(dtype):
    gen = torch.Generator().manual_seed(0)
    b, l, k = 2, 5, 192
    x = (torch.randn(b, l, k, generator=gen) * 3 + 1).to(dtype)
    shift, scale, gate = [(torch.randn(b, 1, k, generator=gen) * 0.5).to(dtype) for _ in range(3)]
    ref = ModulationOut(shift, scale, gate).apply(layer_norm(k)(x))
    got = ops.layernorm_modulate(x, shift, scale)
    assert got.dtype == dtype and torch.equal(got, ref)
    # the 16-bit roundings are part of the definition: the fp32 formula differs in some elements
    if dtype != torch.float32:
        f32 = (1 + scale.float()) * torch.nn.functional.layer_norm(x.float(), (k,), eps=1e-6) + shift.float()
        assert not torch.equal(got, f32.to(dtype))


def test_cpu_fallback_matches_the_reference_layouts():
    _needs_lib()
    gen = torch.Generator().manual_seed(1)
    x = _act(37, 192, torch.bfloat16, gen)
    smooth = torch.rand(192, generator=gen) + 0.5
    down = (torch.randn(16, 192, generator=gen) / 14).to(torch.bfloat16)
    codes, scales = ops.quantize_act(x, smooth, True, ops.UNSIGNED_SHIFT)
    act = native.quantize_act(x, smooth, down, True, ops.UNSIGNED_SHIFT)
    assert act.layout == "packed" and act.m == 37 and act.unsigned
    assert torch.equal(act.codes, ops.pack_int4(codes))
    assert act.scales.shape == (3, 128) and torch.equal(act.scales[:, :37].T, scales)
    assert (act.scales[:, 37:] == 0).all()
    assert torch.allclose(act.lora_act, x.float() @ down.float().T)
    tiles = native.quantize_act(x, smooth, down, True, ops.UNSIGNED_SHIFT, layout="fp8_tiles")
    c8, s8 = ops.pack_act_fp8_tiles(codes, scales)
    assert tiles.layout == "fp8_tiles" and tiles.m == 37
    assert torch.equal(tiles.codes, c8) and torch.equal(tiles.scales, s8)


def test_cpu_layernorm_quantize_matches_unfused_path():
    _needs_lib()
    gen = torch.Generator().manual_seed(2)
    b, l, k = 2, 9, 128
    x = (torch.randn(b, l, k, generator=gen) * 2).to(torch.bfloat16)
    shift, scale = [(torch.randn(b, 1, k, generator=gen) * 0.3).to(torch.bfloat16) for _ in range(2)]
    y = ops.layernorm_modulate(x, shift, scale)
    ref = native.quantize_act(y.reshape(-1, k))
    act, y2 = native.layernorm_quantize_act(x.reshape(-1, k), shift[:, 0], scale[:, 0], tokens_per_batch=l,
                                            return_y=True)
    assert torch.equal(y2, y.reshape(-1, k))
    assert torch.equal(act.codes, ref.codes) and torch.equal(act.scales, ref.scales)
    act3 = native.layernorm_quantize_act(x, shift, scale, layout="fp8_tiles")  # [B, L, K] form
    assert torch.equal(act3.codes, native.quantize_act(y.reshape(-1, k), layout="fp8_tiles").codes)


def test_argument_errors_name_the_argument():
    _needs_lib()
    x = torch.zeros(4, 128, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="layout"):
        native.quantize_act(x, layout="tiles")
    with pytest.raises(ValueError, match="lora_down rank=8"):
        native.quantize_act(x, lora_down=torch.zeros(8, 128, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="smooth"):
        native.quantize_act(x, smooth=torch.ones(64))
    with pytest.raises(ValueError, match="x has dtype"):
        native.quantize_act(x.float())
    s = torch.zeros(1, 128, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="shift must hold"):
        native.layernorm_quantize_act(x, torch.zeros(3, 128, dtype=torch.bfloat16), s)
    with pytest.raises(ValueError, match="scale has dtype"):
        native.layernorm_quantize_act(x, s, s.float())
    with pytest.raises(ValueError, match="tokens_per_batch"):
        native.layernorm_quantize_act(x.view(2, 2, 128), s.expand(2, 128), s.expand(2, 128), tokens_per_batch=3)


# ---------------------------------------------------------------------------------------------- GPU

DEV = "cuda"


@pytest.fixture
def gpu_native():
    if not torch.cuda.is_available() or not native.available():
        pytest.skip(f"native kernels unavailable: {native.library_error() or 'no suitable CUDA device'}")


def _reference(x, smooth, down, unsigned, shift, layout):
    """ops on the same device (its divisions and reciprocals are IEEE on CUDA too)."""
    return native.quantize_act_reference(x, smooth, down, unsigned, shift, layout)


def _assert_same(act, ref, m):
    assert act.layout == ref.layout and act.m == m
    assert act.codes.shape == ref.codes.shape and act.scales.shape == ref.scales.shape
    bad = (act.codes != ref.codes).sum().item()
    assert bad == 0, f"{bad} code bytes differ"
    assert torch.equal(act.scales, ref.scales)  # includes the zero padding rows
    if ref.lora_act is None:
        assert act.lora_act is None
    else:
        err = (act.lora_act.double() - ref.lora_act.double()).norm() / ref.lora_act.double().norm()
        assert err < 1e-5, err


CASES = [(True, 32), (False, 0), (True, 16), (False, 128), (True, 128), (True, 64)]


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["packed", "fp8_tiles"])
@pytest.mark.parametrize("m", [1, 7, 255, 4608])
@pytest.mark.parametrize("unsigned", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_bit_identical(gpu_native, dtype, unsigned, m, layout):
    k = 3072 if m == 4608 else 320  # 320: a partial last stage
    gen = torch.Generator().manual_seed(m * 3 + k + unsigned)
    x = _act(m, k, dtype, gen)
    if unsigned:
        x = torch.nn.functional.gelu(x.float(), approximate="tanh").to(dtype)
    if m > 1:
        x[0, :64] = 0  # an all-zero group: scale 0, codes 0
    x = x.to(DEV)
    shift = ops.UNSIGNED_SHIFT if unsigned else 0.0
    for use_smooth, rank in CASES:
        smooth = (torch.rand(k, generator=gen) * 2 + 0.25).to(DEV) if use_smooth else None
        down = (torch.randn(rank, k, generator=gen) / k ** 0.5).to(dtype).to(DEV) if rank else None
        act = native.quantize_act(x, smooth, down, unsigned, shift, layout=layout)
        _assert_same(act, _reference(x, smooth, down, unsigned, shift, layout), m)


@pytest.mark.gpu
@pytest.mark.parametrize("tiling", ["16", "32"])
def test_every_tiling(gpu_native, monkeypatch, tiling):
    monkeypatch.setenv("NUNCHAKU_LITE_QUANT_BM", tiling)
    gen = torch.Generator().manual_seed(int(tiling))
    m, k = 300, 1088
    x = _act(m, k, torch.bfloat16, gen).to(DEV)
    smooth = (torch.rand(k, generator=gen) + 0.5).to(DEV)
    for rank in (0, 16, 32):
        down = (torch.randn(rank, k, generator=gen) / 30).to(torch.bfloat16).to(DEV) if rank else None
        for layout in ("packed", "fp8_tiles"):
            act = native.quantize_act(x, smooth, down, False, 0.0, layout=layout)
            _assert_same(act, _reference(x, smooth, down, False, 0.0, layout), m)
            lnact = native.layernorm_quantize_act(x, x[:1], x[1:2], smooth=smooth, lora_down=down, layout=layout)
            assert lnact.codes.shape == act.codes.shape


@pytest.mark.gpu
@pytest.mark.parametrize("ctas", ["7", "2", "0", ""])
def test_token_tiles_shared_by_two_ctas(gpu_native, monkeypatch, ctas):
    """The persistent split (rank <= 32, 16-token tiles): NUNCHAKU_LITE_QUANT_SPLIT=N runs N CTAs over the
    (tile, stage) units, so most tiles are shared by two CTAs whose low-rank partial sums meet in lora_act;
    0 = one CTA per tile; unset (""): the default, here (19 tiles, small M) two CTAs per tile, each half of
    its stages. Partial last stages (K = 1088), a partial last tile (M = 300), LayerNorm-fused too."""
    monkeypatch.setenv("NUNCHAKU_LITE_QUANT_SPLIT", ctas)
    gen = torch.Generator().manual_seed(5)
    m, k = 300, 1088
    x = _act(m, k, torch.bfloat16, gen).to(DEV)
    smooth = (torch.rand(k, generator=gen) + 0.5).to(DEV)
    shift, scale = [(torch.randn(2, k, generator=gen) * 0.5).to(torch.bfloat16).to(DEV) for _ in range(2)]
    for rank in (0, 32):
        down = (torch.randn(rank, k, generator=gen) / 30).to(torch.bfloat16).to(DEV) if rank else None
        for layout in ("packed", "fp8_tiles"):
            for unsigned, cshift in ((False, 0.0), (True, ops.UNSIGNED_SHIFT)):
                act = native.quantize_act(x, smooth, down, unsigned, cshift, layout=layout)
                _assert_same(act, _reference(x, smooth, down, unsigned, cshift, layout), m)
                again = native.quantize_act(x, smooth, down, unsigned, cshift, layout=layout)
                if rank:  # two addends per shared entry: the same sum in either order
                    assert torch.equal(again.lora_act, act.lora_act)
                lnact, y = native.layernorm_quantize_act(x, shift, scale, 150, smooth, down, unsigned, cshift,
                                                         layout, return_y=True)
                _assert_same(lnact, _reference(y, smooth, down, unsigned, cshift, layout), m)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_every_16bit_value_times_inv_smooth(gpu_native, dtype):
    """Every finite 16-bit input, alone in its group so that RN(x * RN(1/smooth)) is the group's amax, gives
    the reference scale (= RN(RN(x * RN(1/smooth)) / 7)) and code for random smooth values, signed and
    unsigned + shift."""
    bits = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16)
    vals = bits.view(dtype).float()
    vals = torch.where(torch.isfinite(vals), vals, torch.zeros_like(vals))
    k = 1024
    x = torch.zeros(vals.numel() // 16, k)
    pos = torch.arange(vals.numel()) % 64
    x.view(-1, 64)[torch.arange(vals.numel()), pos] = vals  # one value per 64-group
    x = x.to(dtype).to(DEV)
    for seed in range(3):
        gen = torch.Generator().manual_seed(seed)
        smooth = (torch.rand(k, generator=gen) * 4 + 0.01).to(DEV)
        for unsigned, shift in ((False, 0.0), (True, ops.UNSIGNED_SHIFT)):
            act = native.quantize_act(x, smooth, None, unsigned, shift)
            _assert_same(act, _reference(x, smooth, None, unsigned, shift, "packed"), x.shape[0])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_reciprocal_boundary_codes(gpu_native, dtype):
    """conftest.reciprocal_boundary_group (values where dividing by the scale, or one fma rounding, would give
    other codes) as 40 tokens x 2 groups, plain and power-of-two, every layout: the kernels' codes are the
    reference's, and those are the group's expected codes."""
    x, smooth, want = reciprocal_boundary_group()
    x, smooth = x.repeat(40, 2).to(dtype).to(DEV), smooth.repeat(2).to(DEV)
    for pow2, layouts in ((False, ("packed", "fp8_tiles")), (True, ("packed", "fp8_tiles", "s8_tiles"))):
        for layout in layouts:
            act = native.quantize_act(x, smooth, None, layout=layout, pow2=pow2)
            ref = native.quantize_act_reference(x, smooth, None, layout=layout, pow2=pow2)
            _assert_same(act, ref, x.shape[0])
        codes, _ = ops.quantize_act(x, smooth, pow2=pow2)
        assert torch.equal(codes.cpu(), want.repeat(40, 2))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_rounding_ties_and_tiny_values(gpu_native, dtype):
    """Products exactly on x.5 (half to even), and groups whose scale is below 2^-126 (codes 0)."""
    k = 128
    ties = torch.tensor([7.0, 2.5, 3.5, -0.5, -1.5, 0.5, 1.5, -2.5] * 8)
    rows = [ties, -ties, ties * 2 ** -130, ties * 2 ** -120, torch.full((64,), 2 ** -133)]
    x = torch.stack([torch.cat([r, r.flip(0)]) for r in rows]).to(dtype).to(DEV)
    for unsigned, shift in ((False, 0.0), (True, 0.0), (True, ops.UNSIGNED_SHIFT)):
        for layout in ("packed", "fp8_tiles"):
            act = native.quantize_act(x, None, None, unsigned, shift, layout=layout)
            _assert_same(act, _reference(x, None, None, unsigned, shift, layout), x.shape[0])
    codes, _ = ops.quantize_act(x[:1].float().cpu())
    assert codes[0, 1].item() == 2 and codes[0, 2].item() == 4  # 2.5 -> 2, 3.5 -> 4
    codes, scales = ops.quantize_act(x[2:3].float().cpu())  # (zeros in fp16)
    assert (scales < ops.MIN_NORMAL).all() and not codes.any()  # scales below 2^-126: codes 0


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["packed", "fp8_tiles"])
@pytest.mark.parametrize("b,l", [(1, 7), (2, 255), (2, 2304)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_layernorm_quantize(gpu_native, dtype, b, l, layout):
    k = 3072 if l == 2304 else 320
    gen = torch.Generator().manual_seed(b * l + k)
    x = ((torch.randn(b, l, k, generator=gen) * 2 + torch.randn(b, l, 1, generator=gen) * 3)).to(dtype).to(DEV)
    shift, scale = [(torch.randn(b, 1, k, generator=gen) * 0.5).to(dtype).to(DEV) for _ in range(2)]
    smooth = (torch.rand(k, generator=gen) * 2 + 0.25).to(DEV)
    down = (torch.randn(32, k, generator=gen) / k ** 0.5).to(dtype).to(DEV)
    m = b * l
    for unsigned, cshift in ((False, 0.0), (True, ops.UNSIGNED_SHIFT)):
        act, y = native.layernorm_quantize_act(x.view(m, k), shift[:, 0], scale[:, 0], l, smooth, down, unsigned,
                                               cshift, layout, return_y=True)
        y_ref = ops.layernorm_modulate(x, shift, scale).view(m, k)
        # y: torch's LayerNorm reduction order is unspecified, so a value on a 16-bit rounding boundary may
        # round the other way: rare, and then by one unit in the last place
        diff = y != y_ref
        assert diff.float().mean().item() < 5e-3
        # a unit of LN(x) scaled by |1 + scale| plus the product's and the sum's roundings: a few units of
        # the product (1 + scale) * LN(x), whose magnitude is at most |y| + |shift|
        bound = (y_ref.float().abs() + shift.expand(b, l, k).reshape(m, k).float().abs()) * 2 ** -5 + 1e-6
        assert ((y.float() - y_ref.float()).abs() <= bound).all()
        # given the kernel's own y, codes/scales/low-rank are exactly quantize_act's
        _assert_same(act, _reference(y, smooth, down, unsigned, cshift, layout), m)
        # against the unfused path: codes differ in < 0.1% of entries, by at most 1
        ref = _reference(y_ref, smooth, down, unsigned, cshift, "packed")
        got = act if layout == "packed" else native.quantize_act(y, smooth, down, unsigned, cshift)
        c1 = ops.unpack_int4(got.codes, signed=not unsigned).int()
        c0 = ops.unpack_int4(ref.codes, signed=not unsigned).int()
        assert (c1 != c0).float().mean().item() < 1e-3
        assert (c1 - c0).abs().max().item() <= 1
        assert torch.allclose(got.scales, ref.scales, rtol=2 ** -7, atol=0)
        # without y_out the kernel writes the same codes
        act2 = native.layernorm_quantize_act(x, shift, scale, None, smooth, down, unsigned, cshift, layout)
        assert torch.equal(act2.codes, act.codes) and torch.equal(act2.lora_act, act.lora_act)
